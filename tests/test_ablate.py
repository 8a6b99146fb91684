"""umair ablate: the Table-3 adapters, the shared loop, the results table, the CLI job."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.ablate import run, window_rows
from umair.ablation import (
    ALL_MODELS,
    DCN_V2_ONLY,
    DEEPCTR_NAMES,
    AblateConfig,
    CheckMargins,
    build_ranker,
    planted_checks,
)
from umair.baselines.finalmlp import InteractionAggregation
from umair.baselines.training import fit, predict
from umair.config import ConfigError, load_config
from umair.model.settings import TABLE4_VARIANTS
from umair.training.inputs import prepare
from umair.training.settings import TrainConfig


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Like the job (threads: 1): on a busy shared CPU, 2 torch threads are many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rows(tiny_world, tiny_features):
    prepared = prepare(TrainConfig(world=str(tiny_world.root), item_features=tiny_features))
    train, test = window_rows(prepared, None)
    return prepared, train, test


def _cfg(tiny_world, tiny_features, tmp: Path, **kw) -> AblateConfig:
    return AblateConfig(
        world=str(tiny_world.root),
        item_features=tiny_features,
        output=str(tmp / "out"),
        mlflow={"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "test-ablate"},
        **kw,
    )


@pytest.mark.parametrize("name", [*DEEPCTR_NAMES, "FinalMLP", "full", "w/o ALL"])
def test_adapter_trains_a_step_and_predicts_probabilities(rows, tiny_world, tiny_features, tmp_path, name):
    prepared, train, test = rows
    cfg = _cfg(tiny_world, tiny_features, tmp_path)
    ranker = build_ranker(name, prepared.model_config, train, cfg)
    before = {k: v.detach().clone() for k, v in ranker.module.state_dict().items()}
    result = fit(ranker, train, epochs=1, batch_size=32, max_steps=2)
    assert result.rows == 64 and result.samples_per_s > 0 and math.isfinite(result.epoch_loss[0])
    after = ranker.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), f"{name}: one step changed no parameter"
    probs = predict(ranker, test)
    assert probs.shape == (len(test),)
    assert np.isfinite(probs).all() and probs.min() >= 0.0 and probs.max() <= 1.0
    assert ranker.parameters > 0


def test_deepctr_input_matrix_holds_the_rows(rows, tiny_world, tiny_features, tmp_path):
    prepared, train, _ = rows
    ranker = build_ranker("DCN-V2 (deepctr)", prepared.model_config, train, _cfg(tiny_world, tiny_features, tmp_path))
    x = ranker.encode(train)
    index = ranker.module.feature_index
    s, e = index["user_id"]
    assert torch.equal(x[:, s:e].long().squeeze(1), train.user_id)
    s, e = index["user_tags"]
    assert torch.equal(x[:, s:e].long(), train.user_tags)
    for i, f in enumerate(train.item_field_names):
        s, e = index[f"i_{f}"]
        assert torch.equal(x[:, s:e].long().squeeze(1), train.item_fields[:, i])
    s, e = index["sty"]
    assert torch.allclose(x[:, s:e], train.vectors["sty"])
    # DCN-V2 is the matrix (full-rank) cross: one [D, D] kernel per layer
    kernels = ranker.module.crossnet.kernels
    assert kernels.dim() == 3 and kernels.shape[1] == kernels.shape[2]


def test_dcn_v2_only_is_one_definition_shared_with_umair_train(rows, tiny_world, tiny_features, tmp_path):
    prepared, train, _ = rows
    cfg = _cfg(tiny_world, tiny_features, tmp_path, models=["full", "dcn_v2_only"])
    assert cfg.models == ["full", DCN_V2_ONLY]  # train's variant name is the ablation row's alias
    trained = prepare(TrainConfig(world=str(tiny_world.root), item_features=tiny_features, variant="dcn_v2_only"))
    ranker = build_ranker(DCN_V2_ONLY, prepared.model_config, train, cfg)
    assert ranker.config == trained.model_config and not trained.model_config.multimodal


def test_interaction_aggregation_is_the_papers_bilinear_form():
    torch.manual_seed(0)
    agg = InteractionAggregation(6, 4, heads=2)
    o1, o2 = torch.randn(5, 6), torch.randn(5, 4)
    want = agg.w1(o1).squeeze(-1) + agg.w2(o2).squeeze(-1)
    for h in range(2):
        want = want + torch.einsum("bi,ij,bj->b", o1[:, 3 * h : 3 * h + 3], agg.w3[h], o2[:, 2 * h : 2 * h + 2])
    assert torch.allclose(agg(o1, o2), want, atol=1e-6)


def test_every_model_gets_a_row_with_finite_metrics(tiny_world, tiny_features, tmp_path):
    summary = run(_cfg(tiny_world, tiny_features, tmp_path, epochs=1, batch_size=64))
    names = [r["model"] for r in summary["rows"]]
    assert sorted(names) == sorted(ALL_MODELS)
    for r in summary["rows"]:
        for k in ("auc", "logloss", "gauc", "samples_per_s"):
            assert math.isfinite(r[k]) and r[k] > 0, (r["model"], k, r[k])
        assert isinstance(r["parameters"], int) and r["parameters"] > 0
        assert r["group"] == ("Table 4" if r["model"] in TABLE4_VARIANTS else "Table 3")
    with open(tmp_path / "out" / "ablate.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["model"] for t in table] == names
    assert all(math.isfinite(float(t["auc"])) and int(t["parameters"]) > 0 for t in table)
    assert "auc_style" in table[0]  # the planted-taste segments become columns
    md = (tmp_path / "out" / "ablate.md").read_text()
    for name in ALL_MODELS:
        assert f"| {name}" in md
    # DCN-V2-only is its own model (DCN-V2's full-rank cross), not a copy of w/o ALL's row
    by = {r["model"]: r for r in summary["rows"]}
    assert by["DCN-V2-only (umair)"]["parameters"] != by["w/o ALL"]["parameters"]


def test_planted_effects_count_only_gaps_beyond_their_margins():
    by = {
        "full": {"auc": 0.75, "auc_style": 0.80},
        DCN_V2_ONLY: {"auc": 0.72, "auc_style": 0.60},
        "w/o STY": {"auc": 0.74, "auc_style": 0.79},
    }
    checks = planted_checks(by, "style")
    # +0.03 overall is below the 0.05 default margin; +0.01 on style users below 0.02
    assert checks["full ahead of DCN-V2-only"]["value"] == pytest.approx(0.03)
    assert not checks["full ahead of DCN-V2-only"]["met"] and not checks["STY matters for style-driven users"]["met"]
    assert "needs >= +0.05" in checks["full ahead of DCN-V2-only"]["text"]
    loose = planted_checks(by, "style", CheckMargins(full_vs_dcn_v2_only=0.02, sty_on_style_users=0.01))
    assert all(c["met"] for c in loose.values())
    by["w/o STY"]["auc_style"] = None  # no style-driven users in the test window: that check is not made
    assert set(planted_checks(by, "style")) == {"full ahead of DCN-V2-only"}


def test_bad_model_name_is_a_clear_error(tmp_path, capsys):
    from pipelines.cli import main

    bad = tmp_path / "ablate.yaml"
    bad.write_text("world: w\nitem_features: f.parquet\nmodels: [full, DCN-V3]\n")
    with pytest.raises(ConfigError, match=r"models: .*unknown model name\(s\) \['DCN-V3'\]"):
        load_config(bad, AblateConfig)
    assert main(["ablate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "DCN-V3" in err and str(bad) in err and "DCN-V2 (deepctr)" in err
    with pytest.raises(ConfigError, match="baselines: .*not external Table-3 models"):
        load_config(bad, AblateConfig, {"models": ["full"], "baselines": {"full": {"d": 4}}})


def test_missing_features_say_how_to_get_them(tiny_world, tmp_path):
    cfg = AblateConfig(world=str(tiny_world.root), item_features=str(tmp_path / "nope"), output=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="umair demo.*generate"):
        run(cfg)


E2E_MODELS = ["full", "w/o STY", "w/o ALL", "DCN-V2 (deepctr)", "FinalMLP", "DCN-V2-only (umair)"]


@pytest.mark.slow
def test_ablate_cli_end_to_end_with_generated_world(tmp_path):
    """`umair ablate` from a config with a generate section: world + features written,
    a few models trained, table + PNG written, MLflow parent with one child per model."""
    import mlflow

    from pipelines.cli import main

    db = tmp_path / "mlflow.db"
    config = tmp_path / "ablate.yaml"
    config.write_text(
        "generate:\n"
        f"  out: {tmp_path / 'sample'}\n  size: tiny\n  seed: 5\n  image_size: 32\n  pretext_epochs: 1\n  tsem_dim: 16\n"
        "epochs: 2\nbatch_size: 16\n"
        f"models: {json.dumps(E2E_MODELS)}\n"
        f"output: {tmp_path / 'out'}\n"
        f"mlflow:\n  tracking_uri: sqlite:///{db}\n  experiment: e2e\n"
    )
    assert main(["ablate", "--config", str(config), "--run-name", "e2e"]) == 0
    out = tmp_path / "out"
    for name in ("ablate.md", "ablate.csv", "ablate.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "ablate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "sample").glob("world-tiny-5/world.json"))
    assert list((tmp_path / "sample").glob("features-tiny-5-32px-p1-*.parquet"))
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("e2e")
    parents = client.search_runs([exp.experiment_id], "tags.`umair.job` = 'ablate' and attributes.run_name = 'e2e'")
    assert len(parents) == 1
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["umair.model"] for c in children) == sorted(E2E_MODELS)
    assert all(math.isfinite(c.data.metrics["auc"]) and c.data.metrics["parameters"] > 0 for c in children)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ablate.md", "ablate.csv", "ablate.png", "ablate.json"} <= artifacts
    summary = json.loads((out / "ablate.json").read_text())
    assert summary["mlflow_child_runs"] == {c.data.tags["umair.model"]: c.info.run_id for c in children}
