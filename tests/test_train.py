"""Fusion-model training and evaluation: metrics by hand, the feature space fitted on the
training window only, the input errors raised before training, negative sampling, and
(slow) a 2-worker Ray Train run that evaluate loads, and a killed worker that resumes.

Item features here come from :func:`umair.baselines.sample_features.fixture_item_features`, a
test fixture standing in for the extraction job (a random-weight ResNet18 over the
world's images, hashed-tag e_TSEM); training only consumes the item-features contract.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pytest
import yaml

from pipelines import evaluate, train
from umair import contracts, storage
from umair.config import ConfigError, MlflowConfig, RayConfig, load_config
from umair.errors import FeatureError
from umair.metrics import auc, gauc, logloss, mean_attention, modality_weights, rank_auc
from umair.model.features import FeatureSpace
from umair.model.interactions import ItemPool, NegativeSettings, training_window, with_negatives
from umair.training.inputs import prepare
from umair.training.lookup import load_lookup
from umair.training.step import StepSettings, TrainingDiverged, check_finite_loss, train_epoch

ROOT = Path(__file__).resolve().parents[1]
UMAIR = str(Path(sys.executable).parent / "umair")


def _bench_module():
    spec = importlib.util.spec_from_file_location("ablation_sample", ROOT / "bench" / "ablation_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- metrics by hand


def test_auc_and_logloss_match_hand_computed_values():
    y = [1, 0, 1, 0]
    p = [0.9, 0.1, 0.4, 0.6]
    # positive/negative pairs ranked right: (.9,.1) (.9,.6) (.4,.1) yes, (.4,.6) no -> 3/4
    assert auc(y, p) == pytest.approx(0.75)
    expected = -(np.log(0.9) + np.log(0.9) + np.log(0.4) + np.log(0.4)) / 4
    assert logloss(y, p) == pytest.approx(expected)
    assert np.isnan(auc([1, 1], [0.2, 0.3]))


def test_gauc_weights_users_by_impressions_and_skips_one_class_users():
    users = [7, 7, 8, 8, 8, 9, 9]
    y = [1, 0, 1, 0, 0, 1, 1]
    p = [0.8, 0.3, 0.2, 0.5, 0.1, 0.9, 0.1]
    # user 7: 1.0 (2 impressions); user 8: positive .2 beats .1 not .5 -> 0.5 (3); user 9: one class, skipped
    g = gauc(users, y, p)
    assert g.value == pytest.approx((2 * 1.0 + 3 * 0.5) / 5)
    assert (g.users, g.skipped, g.weighting) == (2, 1, "impressions")
    assert gauc(users, y, p, weighting="uniform").value == pytest.approx(0.75)
    assert np.isnan(gauc([1, 1], [1, 1], [0.1, 0.2]).value)


def test_per_user_auc_of_gauc_equals_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    y[:2] = [0, 1]
    s = rng.integers(0, 5, 40) / 4.0  # many ties
    assert rank_auc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_modality_weights_mix_experts_by_the_gate_and_average_per_user_then_segment():
    alpha = np.array([[[0.5, 0.5], [1.0, 0.0]], [[0.2, 0.8], [0.2, 0.8]], [[0.0, 1.0], [0.0, 1.0]]])
    beta = np.array([[0.5, 0.5], [1.0, 0.0], [0.3, 0.7]])
    w = modality_weights(alpha, beta)
    np.testing.assert_allclose(w, [[0.75, 0.25], [0.2, 0.8], [0.0, 1.0]])
    # users 1 (two impressions), 2 (one); user 1 averages to [0.475, 0.525] first
    out = mean_attention([1, 1, 2], w, ["sty", "sem"], {1: "style", 2: "content"})
    assert out["style"] == pytest.approx({"sty": 0.475, "sem": 0.525, "users": 1})
    assert out["content"] == pytest.approx({"sty": 0.0, "sem": 1.0, "users": 1})
    assert out["all"]["sty"] == pytest.approx((0.475 + 0.0) / 2)


# --------------------------------------------------------------------------- hand-made tables


def _t(month: int, day: int = 1, year: int = 2021) -> datetime:
    return datetime(year, month, day, tzinfo=UTC)


def _tables() -> dict[str, pa.Table]:
    """Train window (< 2021-10-01): users 1, 2 on items 10, 20, 40. Test window: user 3
    (new, unseen tag 'fox', unseen gender 'x') and item 30 (new, by a new artist)."""
    ill = pa.table(
        {
            "illust_id": pa.array([10, 20, 30, 40], pa.int64()),
            "image_uri": pa.array(["a.jpg", "b.jpg", "c.jpg", "d.jpg"]),
            "tags": pa.array([["cat"], ["dog"], ["cat", "fox"], []], contracts.TAGS),
            "created_at": pa.array([_t(1), _t(2), _t(10, 15), _t(3)], contracts.TIMESTAMP),
            "width": pa.array([100, 200, 300, 150], pa.int32()),
            "height": pa.array([100, 120, 140, 160], pa.int32()),
            "page_count": pa.array([1, 1, 3, 2], pa.int32()),
            "artist": pa.array(["ann", "bob", "cid", "ann"]),
        }
    )
    users = pa.table(
        {
            "user_id": pa.array([1, 2, 3], pa.int64()),
            "interest_tags": pa.array([["cat"], ["dog", "cat"], ["fox"]], contracts.TAGS),
            "gender": pa.array(["f", "m", "x"]),
        }
    )
    inter = pa.table(
        {
            "user_id": pa.array([1, 1, 2, 2, 3, 1], pa.int64()),
            "illust_id": pa.array([10, 20, 10, 40, 30, 30], pa.int64()),
            "ts": pa.array([_t(4), _t(5), _t(6), _t(7), _t(11, 5), _t(11, 6)], contracts.TIMESTAMP),
            "label": pa.array([1, 0, 0, 1, 1, 0], pa.int8()),
        }
    )
    return {"illustrations": ill, "users": users, "interactions": inter}


def _features(ids: list[int], dims: dict[str, int]) -> pa.Table:
    rng = np.random.default_rng(0)
    cols = {"illust_id": pa.array(ids, pa.int64())}
    for m, d in dims.items():
        cols[m] = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(len(ids) * d).astype(np.float32)), d)
    meta = {f"umair.{m}.dim": str(d) for m, d in dims.items()}
    return pa.table(cols).replace_schema_metadata(meta)


DIMS = {"sem": 4, "sty": 3, "tsem": 2}


@pytest.fixture
def hand_paths(tmp_path):
    paths = {}
    for name, table in _tables().items():
        paths[name] = str(tmp_path / f"{name}.parquet")
        storage.write_parquet(table, paths[name])
    paths["item_features"] = str(tmp_path / "features.parquet")
    storage.write_parquet(_features([10, 20, 30, 40], DIMS), paths["item_features"])
    return paths


def _cfg(paths: dict[str, str], tmp_path, **kw) -> train.TrainConfig:
    return train.TrainConfig(
        **paths,
        split=kw.pop("split", "2021-10-01"),
        checkpoint_dir=str(tmp_path / "rr"),
        output=str(tmp_path / "model"),
        **kw,
    )


# --------------------------------------------------------------------------- feature space


def test_feature_space_is_fitted_on_the_training_window_only_and_unknowns_map_to_zero():
    t = _tables()
    train_rows = training_window(t["interactions"], "2021-10-01")
    space = FeatureSpace.fit(t["illustrations"], t["users"], train_rows, "2021-10-01")
    assert space.fitted_on == {"interactions": 4, "users": 2, "illustrations": 3}
    assert list(space.item_fields) == ["created_at", "width", "height", "page_count", "illust_id", "artist"]
    assert list(space.user_fields) == ["gender"]

    users = space.encode_users(t["users"])
    assert users.uid[2] == 0 and (users.uid[:2] > 0).all()  # user 3 only acts in the test window
    assert (users.tags[2] == 0).all()  # 'fox' is nobody's interest in the training window
    assert users.fields[2, 0] == 0 and (users.fields[:2, 0] > 0).all()  # gender 'x' unseen
    assert users.tags.shape == (3, space.settings.max_user_tags)

    items = space.encode_items(t["illustrations"], np.array([10, 20, 40, 30, 99]))
    col = {name: j for j, name in enumerate(space.item_fields)}
    assert (items[:3, col["illust_id"]] > 0).all() and items[3, col["illust_id"]] == 0  # item 30: test window only
    assert items[3, col["artist"]] == 0 and items[0, col["artist"]] == items[2, col["artist"]] > 0  # 'cid' unseen
    assert items[3, col["created_at"]] == len(space.item_fields["created_at"]) - 1  # later than any training item
    assert (items[4] == 0).all()  # not in the illustrations table at all

    again = FeatureSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    np.testing.assert_array_equal(again.encode_items(t["illustrations"], np.array([10, 20, 40, 30])), items[:4])
    np.testing.assert_array_equal(again.encode_users(t["users"]).tags, users.tags)

    with pytest.raises(FeatureError, match="at or after the split"):
        FeatureSpace.fit(t["illustrations"], t["users"], t["interactions"], "2021-10-01")


def test_prepare_maps_interactions_to_rows_of_the_item_features_table(hand_paths, tmp_path):
    p = prepare(_cfg(hand_paths, tmp_path))
    assert p.train_rows.column_names == ["user_row", "item_row", "ts", "label"]
    assert p.train_rows.schema.field("item_row").type == pa.int64()
    ids = p.info.illust_ids[p.train_rows.column("item_row").to_numpy()]
    np.testing.assert_array_equal(ids, [10, 20, 10, 40])
    assert p.test_rows.num_rows == 2
    assert p.model_config.vectors == {"tsem": 2, "sem": 4, "sty": 3}
    assert p.model_config.n_users == 3 and p.model_config.item_fields["artist"] == 3
    assert set(p.space.vector_stats) == {"sem", "sty", "tsem"}  # standardised with training-item statistics


# --------------------------------------------------------------------------- errors before training


def test_empty_training_window_is_refused(hand_paths, tmp_path):
    with pytest.raises(FeatureError) as err:
        prepare(_cfg(hand_paths, tmp_path, split="2021-03-01"))
    inter = hand_paths["interactions"]
    assert str(err.value) == (
        f"{inter}: the training window (ts < 2021-03-01T00:00:00+00:00) is empty: the 6 interactions run from "
        "2021-04-01T00:00:00+00:00 to 2021-11-06T00:00:00+00:00; set the split after 2021-04-01T00:00:00+00:00"
    )
    assert not (tmp_path / "rr").exists()


def test_missing_item_features_are_counted_with_an_example(hand_paths, tmp_path):
    storage.write_parquet(_features([10, 20], DIMS), hand_paths["item_features"])
    with pytest.raises(FeatureError) as err:
        prepare(_cfg(hand_paths, tmp_path))
    assert str(err.value) == (
        f"{hand_paths['item_features']}: 2 illustration(s) referenced by 3 interaction(s) in {hand_paths['interactions']} "
        "have no item features (e.g. illust_id 40); run the extraction over them first"
    )


def test_feature_dimension_must_match_the_model_config(hand_paths, tmp_path):
    with pytest.raises(FeatureError) as err:
        prepare(_cfg(hand_paths, tmp_path, model={"vectors": {"sem": 8, "sty": None, "tsem": None}}))
    assert str(err.value) == (
        f"{hand_paths['item_features']}: column 'sem' holds 4-d vectors (file metadata umair.sem.dim=4), "
        "but the model config sets vectors.sem=8"
    )
    # A table without e_STY trains the "w/o STY" variant, and refuses the full model.
    storage.write_parquet(_features([10, 20, 30, 40], {"sem": 4, "tsem": 2}), hand_paths["item_features"])
    assert prepare(_cfg(hand_paths, tmp_path, variant="w/o STY")).model_config.modalities == ("tsem", "sem", "meta")
    with pytest.raises(FeatureError, match=r"no column 'sty' in the item features .*leave it out of model\.vectors"):
        prepare(_cfg(hand_paths, tmp_path))


def test_settings_refuse_derived_sizes_and_unknown_variants(hand_paths, tmp_path):
    with pytest.raises(ValueError, match="derived from the training data"):
        _cfg(hand_paths, tmp_path, model={"n_users": 5})
    with pytest.raises(ValueError, match="unknown Table-4 variant"):
        _cfg(hand_paths, tmp_path, variant="w/o COLOUR")
    for name, model in (("train.yaml", train.TrainConfig), ("evaluate.yaml", evaluate.EvaluateConfig)):
        assert load_config(ROOT / "pipelines" / "configs" / name, model)
    with pytest.raises(ConfigError, match="epochs"):
        load_config(ROOT / "pipelines" / "configs" / "train.yaml", train.TrainConfig, {"epochs": 0})


def test_the_shipped_train_config_keeps_the_demo_protocol_and_accepts_the_new_keys():
    path = ROOT / "pipelines" / "configs" / "train.yaml"
    demo = load_config(path, train.TrainConfig)
    # the demo trains on ts < split and keeps its last epoch, as before validation windows
    assert (demo.validation, demo.validation_fraction, demo.patience) == (None, None, None)
    assert not demo.has_validation and demo.checks.before_created_at == "warn"
    cfg = load_config(path, train.TrainConfig, {"variant": "dcn_v2_only", "validation_fraction": 0.2, "patience": 2})
    assert cfg.variant == "dcn_v2_only" and cfg.has_validation
    with pytest.raises(ConfigError, match="before_created_at"):
        load_config(path, train.TrainConfig, {"checks": {"before_created_at": "sometimes"}})


# --------------------------------------------------------------------------- divergence guard


def _one_epoch(hand_paths, tmp_path, lr: float, batch_size: int = 2):
    """A real model on the hand-made tables, Adam at ``lr``, one epoch through
    ``train_epoch`` (batches as Ray's iter_torch_batches gives them)."""
    import torch

    from umair.model.fusion import UmairFPS

    p = prepare(_cfg(hand_paths, tmp_path))
    lookup, _, _ = load_lookup(p.space, p.inputs, p.modalities, "cpu")
    torch.manual_seed(0)
    model = UmairFPS(p.model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rows = p.train_rows
    u, i, y = (torch.tensor(rows.column(c).to_numpy()) for c in ("user_row", "item_row", "label"))
    batches = [
        {"user_row": u[s : s + batch_size], "item_row": i[s : s + batch_size], "label": y[s : s + batch_size].float()}
        for s in range(0, rows.num_rows, batch_size)
    ]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = lambda: sorted({int(st["step"]) for st in optimizer.state.values()})  # noqa: E731
    try:
        return (
            train_epoch(model, model, optimizer, batches, lookup, StepSettings(lr=lr, l2_emb=1e-3), 3),
            steps(),
            None,
            before,
            model,
        )
    except TrainingDiverged as err:
        return None, steps(), err, before, model


def test_a_diverging_loss_stops_training_before_the_step_is_applied(hand_paths, tmp_path):
    # Adam moves every weight the first batch touches by ~lr: the second batch's logits overflow.
    _, steps, err, before, model = _one_epoch(hand_paths, tmp_path, lr=1e30)
    assert isinstance(err, TrainingDiverged) and err.exit_code == 1
    msg = str(err)
    assert msg.startswith("training diverged: the BCE loss is nan at epoch 3, step 1 (lr 1e+30)"), msg
    assert "lower the learning rate (lr)" in msg
    assert steps == [1], "the diverged step's update must not be applied (Adam stepped once)"
    assert any(not bool((before[k] == v).all()) for k, v in model.state_dict().items())  # the first step was

    sums, steps, err, _, _ = _one_epoch(hand_paths, tmp_path, lr=1e-3)
    assert err is None and steps == [2]
    assert float(sums[1]) == 4 and np.isfinite(float(sums[0])) and float(sums[0]) > 0


def test_the_loss_check_names_epoch_step_and_lr():
    check_finite_loss(0.69, epoch=0, step=0, lr=1e-3)
    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(TrainingDiverged, match=r"epoch 2, step 17 \(lr 0\.5\); .*lower the learning rate"):
            check_finite_loss(value, epoch=2, step=17, lr=0.5)


# --------------------------------------------------------------------------- negatives


def test_negatives_are_sampled_for_a_positives_only_log_and_recorded(hand_paths, tmp_path):
    t = _tables()
    positives = t["interactions"].filter(pa.array(t["interactions"].column("label").to_numpy() == 1))
    settings = NegativeSettings(ratio=3, seed=5)
    pool = ItemPool.build(t["illustrations"], np.array([10, 20, 30, 40]), settings)
    rows, record = with_negatives(positives, pool, settings)
    again, _ = with_negatives(positives, pool, settings)
    assert rows.equals(again)  # seeded
    neg = rows.filter(pa.array(rows.column("label").to_numpy() == 0))
    assert record["applied"] and record["reason"] == "log holds positives only"
    assert record["positives"] == 3 and record["negatives"] == neg.num_rows
    assert record["negatives"] + record["dropped_collisions"] + record["dropped_no_candidate"] == 9
    liked = set(zip(positives.column("user_id").to_pylist(), positives.column("illust_id").to_pylist()))
    created = dict(
        zip(t["illustrations"].column("illust_id").to_pylist(), t["illustrations"].column("created_at").to_pylist())
    )
    for u, i, ts in zip(
        neg.column("user_id").to_pylist(), neg.column("illust_id").to_pylist(), neg.column("ts").to_pylist()
    ):
        assert (u, i) not in liked and created[i] <= ts  # never a bookmark, never an unpublished item
    # A log with both labels is left alone in mode auto.
    same, rec = with_negatives(t["interactions"], pool, settings)
    assert same.equals(t["interactions"]) and rec["applied"] is False

    # The training job samples and records it when the log holds positives only.
    storage.write_parquet(positives, hand_paths["interactions"])
    p = prepare(_cfg(hand_paths, tmp_path, negatives={"ratio": 2, "strategy": "popularity"}))
    assert p.negatives["train"]["applied"] and p.negatives["train"]["strategy"] == "popularity"
    assert p.train_rows.num_rows == 2 + p.negatives["train"]["negatives"]


def test_popularity_strategy_prefers_items_bookmarked_in_training():
    base = _t(1)
    ill = pa.table(
        {
            "illust_id": pa.array([1, 2, 3], pa.int64()),
            "image_uri": pa.array(["x", "y", "z"]),
            "tags": pa.array([[], [], []], contracts.TAGS),
            "created_at": pa.array([base] * 3, contracts.TIMESTAMP),
            "width": pa.array([1] * 3, pa.int32()),
            "height": pa.array([1] * 3, pa.int32()),
            "page_count": pa.array([1] * 3, pa.int32()),
        }
    )
    hits = pa.table(
        {
            "user_id": pa.array(np.arange(100, 150), pa.int64()),
            "illust_id": pa.array([2] * 50, pa.int64()),
            "ts": pa.array([_t(2)] * 50, contracts.TIMESTAMP),
            "label": pa.array([1] * 50, pa.int8()),
        }
    )
    one = pa.table(
        {
            "user_id": pa.array([1] * 400, pa.int64()),
            "illust_id": pa.array([1] * 400, pa.int64()),
            "ts": pa.array([_t(3)] * 400, contracts.TIMESTAMP),
            "label": pa.array([1] * 400, pa.int8()),
        }
    )
    share = {}
    for strategy in ("uniform", "popularity"):
        s = NegativeSettings(ratio=1, strategy=strategy, popularity_power=1.0, seed=0)
        rows, _ = with_negatives(one, ItemPool.build(ill, np.array([1, 2, 3]), s, hits), s)
        drawn = rows.filter(pa.array(rows.column("label").to_numpy() == 0)).column("illust_id").to_numpy()
        assert 1 not in drawn  # the user's own bookmark is never a negative
        share[strategy] = float((drawn == 2).mean())
    assert 0.4 < share["uniform"] < 0.6  # items 2 and 3 alike
    assert share["popularity"] > 0.9  # weights 51 : 1


# --------------------------------------------------------------------------- Ray Train (slow)


def _slow_cfg(tiny_world, tiny_features, root: Path, **kw) -> train.TrainConfig:
    return train.TrainConfig(
        world=tiny_world.root,
        item_features=tiny_features,
        num_workers=2,
        seed=0,
        checkpoint_dir=str(root / "ray_results"),
        output=str(root / "model"),
        mlflow=MlflowConfig(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", experiment="t-train"),
        ray=RayConfig(num_cpus=4),
        **kw,
    )


# What the issue #20 found on a job's console and must never be there again.
CHATTER = ("Traceback", "(PlacementGroupCleaner", "core_worker", "Warning", "(RayTrainWorker", "(TrainController")


@pytest.mark.slow
def test_two_worker_training_saves_a_model_that_evaluate_loads(tiny_world, tiny_features, tmp_path):
    """``umair train`` with 2 Ray Train workers, as a user runs it (off a terminal): the saved
    model and its MLflow run, evaluate agreeing with it, and the console: rank 0's epoch and
    memory lines reach it through the driver, once each and without Ray's
    "(RayTrainWorker pid=…)" prefix, with periodic step progress within each epoch."""
    cfg = _slow_cfg(tiny_world, tiny_features, tmp_path, epochs=2, batch_size=32, run_name="t-2workers")
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = subprocess.run(
        [UMAIR, "train", "--config", str(tmp_path / "train.yaml")],
        capture_output=True,
        text=True,
        env={**os.environ, "UMAIR_LOG_DIR": str(tmp_path / "logs"), "UMAIR_PROGRESS_S": "0.5"},
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for chatter in CHATTER:
        assert chatter not in out.stdout + out.stderr, chatter
    lines = out.stdout.splitlines()
    for epoch in (0, 1):
        assert sum(line.startswith(f"[train] epoch {epoch}: train_loss=") for line in lines) == 1, lines
    assert sum(line.startswith("[train] memory: w0 peak RSS") for line in lines) == 2, lines  # first and last epoch
    assert any(re.match(r"\[train\] epoch [01]:\s+\d+% \d+/\d+ \[", line) for line in lines), lines
    (done,) = [line for line in lines if line.startswith("[train] done: ")]
    summary = json.loads(done.removeprefix("[train] done: "))
    assert summary["epochs"] == 2 and summary["attempt_start_epochs"] == [0]
    assert 0.0 <= summary["test_auc"] <= 1.0 and summary["train_rows"] > 300

    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["format"] == "umair-fps-model/1" and meta["split"] == "2021-10-01T00:00:00+00:00"
    assert meta["encoder_versions"]["encoder.version"] == "fixture-resnet18-32px-random-seed0"
    assert meta["feature_dims"] == {"sem": 512, "sty": 64, "tsem": 16}
    assert [h["epoch"] for h in meta["training"]["history"]] == [0, 1]
    assert (tmp_path / "model" / "model.pt").stat().st_size > 0
    assert json.loads((tmp_path / "model" / "feature_space.json").read_text())["format"] == "umair-feature-space/1"

    client = mlflow.MlflowClient(cfg.mlflow.resolved_uri())
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["num_workers"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0, 1]
    # no validation window: the last epoch is the model, the test window is scored once, with it
    assert meta["best_epoch"] == 1 and meta["selected_on"] == "last epoch" and meta["train_end"] == meta["split"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_auc")] == [1]
    assert not client.get_metric_history(run.info.run_id, "val_auc")
    assert {f.path for f in client.list_artifacts(run.info.run_id, "model")} == {
        "model/model.pt",
        "model/model.json",
        "model/feature_space.json",
    }

    conf = {
        "model": str(tmp_path / "model"),
        "world": tiny_world.root,
        "output": str(tmp_path / "evaluation.json"),
        "mlflow": {"tracking_uri": cfg.mlflow.resolved_uri(), "experiment": "t-train"},
    }
    (tmp_path / "evaluate.yaml").write_text(yaml.safe_dump(conf))
    proc = subprocess.run(
        [UMAIR, "evaluate", "--config", str(tmp_path / "evaluate.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "AUC=" in proc.stdout and "style" in proc.stdout
    report = json.loads((tmp_path / "evaluation.json").read_text())
    # Same model, same window: evaluate agrees with the training job's last test AUC.
    assert report["auc"] == pytest.approx(summary["test_auc"], abs=1e-6)
    assert set(report["segments"]) == {"all", "style", "content", "tag", "popularity"}
    for seg in report["segments"].values():
        assert sum(seg["alpha"].values()) == pytest.approx(1.0, abs=1e-5)
        assert set(seg["alpha"]) == {"tsem", "sem", "sty", "meta"}
    metrics = client.get_run(report["mlflow_run_id"]).data.metrics
    assert metrics["test_auc"] == pytest.approx(report["auc"]) and "style.alpha_sty" in metrics


@pytest.mark.slow
def test_training_reads_the_committed_output_of_the_extraction_job(ray_local, tiny_world, tmp_path):
    from pipelines import extract

    out = tmp_path / "extracted"
    extract.run(
        extract.ExtractConfig(
            catalogue=str(Path(tiny_world.root) / "illustrations.parquet"),
            output=str(out),
            encoder={"source": None, "spec": {"backbone": "resnet18", "image_size": 32}},
            text_model=None,
            batch_size=32,
            decode_batch_size=16,
            chunk_rows=50,
            write_batch_rows=50,
            ray=RayConfig(num_cpus=4),
            mlflow=MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="t-extract"),
        )
    )
    p = prepare(_slow_cfg(tiny_world, str(out), tmp_path, variant="w/o TSEM"))
    assert p.info.dims == {"sem": 512, "sty": 64} and p.model_config.modalities == ("sem", "sty", "meta")
    assert p.inputs.encoder_version == p.info.metadata["umair.encoder.version"]  # the feature set is pinned
    lookup, _, items = load_lookup(p.space, p.inputs, p.modalities, "cpu", None, p.info.fingerprint)
    assert items.vectors["sem"].shape == (96, 512) and abs(float(items.vectors["sty"].mean())) < 0.2  # standardised
    with pytest.raises(FeatureError, match=r"no column 'tsem' in the item features \(columns: sem, sty\)"):
        prepare(_slow_cfg(tiny_world, str(out), tmp_path))


def _latest_registered_epoch(run_dir: Path) -> int | None:
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
    except (OSError, json.JSONDecodeError):
        return None
    return None if not latest else int(latest["metrics"]["epoch"])


def _train_worker_pids() -> list[int]:
    """PIDs of this Ray cluster's live Ray Train workers (from the GCS actor table; the
    state API needs the dashboard, which local mode does not start)."""
    import ray._private.state

    return [
        a["Pid"]
        for a in ray._private.state.actors().values()
        if a.get("ActorClassName") == "RayTrainWorker" and a.get("State") == "ALIVE" and a.get("Pid")
    ]


@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_local, tiny_world, tiny_features, tmp_path):
    epochs = 6
    cfg = _slow_cfg(
        tiny_world,
        tiny_features,
        tmp_path,
        epochs=epochs,
        batch_size=8,
        eval_every_epoch=False,
        max_failures=2,
        run_name="t-kill",
    )
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["summary"] = train.run(cfg)
        except BaseException as err:  # reported by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    run_dir = tmp_path / "ray_results" / "t-kill"
    killed_after = None
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive():
        epoch = _latest_registered_epoch(run_dir)
        if epoch is not None:
            pids = _train_worker_pids()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed_after = epoch
                break
        time.sleep(0.05)
    thread.join(timeout=400)
    assert "error" not in outcome, repr(outcome.get("error"))
    assert killed_after is not None and killed_after < epochs - 1, "the run ended before a worker could be killed"
    summary = outcome["summary"]
    starts = summary["attempt_start_epochs"]
    # The restarted worker group continued after a registered checkpoint, not from scratch.
    assert len(starts) == 2 and starts[0] == 0 and killed_after + 1 <= starts[1] < epochs
    assert summary["epochs"] == epochs
    history = json.loads((tmp_path / "model" / "model.json").read_text())["training"]["history"]
    assert [h["epoch"] for h in history] == list(range(epochs))
    client = mlflow.MlflowClient(cfg.mlflow.resolved_uri())
    steps = {m.step for m in client.get_metric_history(summary["mlflow_run_id"], "train_loss")}
    assert steps == set(range(epochs))  # one MLflow run holds every epoch, across the restart


def test_a_fourth_vector_modality_needs_only_a_registry_entry(hand_paths, tmp_path):
    """A toy CLIP-like vector registered in umair.modalities flows through the contract,
    the feature space (standardised), the model config, the lookup and one training step."""
    import torch

    from umair import modalities
    from umair.model.fusion import UmairFPS
    from umair.model.settings import table4_variant

    modalities.register(modalities.Modality("clip", "e_CLIP", "clip", 5, "a toy CLIP-like image vector"))
    try:
        storage.write_parquet(_features([10, 20, 30, 40], {**DIMS, "clip": 5}), hand_paths["item_features"])
        p = prepare(_cfg(hand_paths, tmp_path))
        assert p.model_config.vectors == {"tsem": 2, "sem": 4, "sty": 3, "clip": 5}
        assert p.model_config.modalities == ("tsem", "sem", "sty", "clip", "meta")
        assert set(p.space.vector_stats) == {"sem", "sty", "tsem", "clip"}
        assert table4_variant(p.model_config, "w/o CLIP").vector_names == ("tsem", "sem", "sty")
        lookup, _, _ = load_lookup(p.space, p.inputs, p.modalities, "cpu")
        torch.manual_seed(0)
        model = UmairFPS(p.model_config)
        before = model.modality_proj["clip"].weight.detach().clone()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        rows = p.train_rows
        u, i, y = (torch.tensor(rows.column(c).to_numpy()) for c in ("user_row", "item_row", "label"))
        sums = train_epoch(
            model,
            model,
            optimizer,
            [{"user_row": u, "item_row": i, "label": y.float()}],
            lookup,
            StepSettings(lr=1e-2, l2_emb=1e-3),
        )
        assert int(sums[1]) == rows.num_rows and np.isfinite(float(sums[0]))
        assert not torch.equal(before, model.modality_proj["clip"].weight), "the new modality's projection trained"
        out = model.explain(lookup.packed(u, i), lookup.item_vectors(i))
        assert out.alpha.shape == (rows.num_rows, len(p.model_config.expert_kinds), 5)
    finally:
        modalities.unregister("clip")
    assert "clip" not in modalities.names()
