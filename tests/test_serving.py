"""The trained fusion model as an MLflow pyfunc model (pipelines/serving.py): logged into a
run and registered against a sqlite store and a real ``mlflow server``, then loaded with
``mlflow.pyfunc.load_model("models:/NAME/N")`` in a fresh Python process whose
probabilities and ᾱ must equal scoring in-process with the code ``umair evaluate`` runs;
unknown users and items; ``umair tune``'s registration of a trial run's pyfunc model.

The model is trained for real, in this process (``prepare`` + ``fit_local``, one epoch on
the tiny world: what ``umair train`` runs, minus Ray) and saved as ``umair train`` saves it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipelines import serving, tune
from umair.training.inputs import prepare, resolve_eval_inputs
from umair.training.local import LocalRecipe, fit_local
from umair.training.lookup import load_lookup
from umair.training.model_io import load_model, save_model, training_meta
from umair.training.scoring import score_rows
from umair.training.settings import TrainConfig

SMALL = {
    "emb_dim": 4,
    "d": 8,
    "experts": ["att"],
    "cross_layers": 1,
    "mlp": [16],
    "user_history": True,
    "history_len": 4,
}
UNKNOWN_USER, UNKNOWN_ITEM = 10**9 + 7, 10**9 + 9


@pytest.fixture(scope="module")
def model_dir(tiny_world, tiny_features, tmp_path_factory) -> str:
    """A model directory as ``umair train`` writes it, from one real epoch of training."""
    root = tmp_path_factory.mktemp("serving_model")
    cfg = TrainConfig(world=tiny_world.root, item_features=tiny_features, model=SMALL, output=str(root / "model"))
    p = prepare(cfg)
    fitted = fit_local(p, p.model_config, LocalRecipe(epochs=1, batch_size=64))
    state = {"model": fitted.model.state_dict(), "epoch": 0, "history": fitted.history, "starts": [0]}
    meta = training_meta(cfg, p, state, state, {"test_auc": 0.5})
    save_model(cfg.output, state["model"], meta, p.space)
    return cfg.output


def _rows(tiny_world) -> pd.DataFrame:
    """Test-window interactions as a log holds them (tz-aware ts, a label column), plus a
    row of an unknown user and one of an unknown item."""
    inter = pd.read_parquet(os.path.join(tiny_world.root, "interactions.parquet"))
    test = inter[inter["ts"] >= pd.Timestamp("2021-10-01", tz="UTC")].head(60)
    first = test.iloc[0]
    extra = pd.DataFrame(
        {
            "user_id": [UNKNOWN_USER, first.user_id],
            "illust_id": [first.illust_id, UNKNOWN_ITEM],
            "ts": [first.ts, first.ts],
            "label": [1, 0],
        }
    ).astype({"label": test["label"].dtype})
    return pd.concat([test[["user_id", "illust_id", "ts", "label"]], extra], ignore_index=True)


def _evaluate_scores(model_dir: str, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Probabilities and ᾱ of the known rows, scored as ``umair evaluate`` scores them."""
    import torch

    saved = load_model(model_dir)
    inputs, _ = resolve_eval_inputs(saved, None)
    lookup, users, items = load_lookup(saved.space, inputs, saved.modalities, "cpu")
    u = users.rows(rows["user_id"].to_numpy())
    i = items.rows(rows["illust_id"].to_numpy())
    assert (u >= 0).all() and (i >= 0).all()
    s = score_rows(saved.model, lookup, torch.as_tensor(u), torch.as_tensor(i))
    return s.probs, s.weights, list(saved.config.modalities)


def _predict_in_fresh_process(uri: str, model_uri: str, rows: pd.DataFrame, tmp: Path) -> pd.DataFrame:
    rows.to_parquet(tmp / "rows.parquet")
    script = textwrap.dedent(
        f"""
        import mlflow, pandas as pd
        model = mlflow.pyfunc.load_model({model_uri!r})
        model.predict(pd.read_parquet({str(tmp / "rows.parquet")!r})).to_parquet({str(tmp / "out.parquet")!r})
        """
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return pd.read_parquet(tmp / "out.parquet")


@pytest.mark.parametrize("store", ["sqlite", pytest.param("server", marks=pytest.mark.slow)])  # server: ~30 s to start
def test_a_registered_version_scores_rows_in_a_fresh_process_as_evaluate_does(
    store, model_dir, tiny_world, tmp_path, request
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if store == "sqlite" else request.getfixturevalue("mlflow_server").url
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment(f"t-serving-{store}-{tmp_path.name}")
    run_id = client.create_run(exp).info.run_id
    name = f"umair-fps-{store}"

    version = serving.log_fusion_model(uri, run_id, model_dir, register_as=name)
    meta = json.loads((Path(model_dir) / "model.json").read_text())
    assert version.run_id == run_id and version.source.endswith("/pyfunc")
    assert version.tags["encoder_version"] == meta["encoder_versions"]["encoder.version"]
    assert version.tags["text_model"] == meta["encoder_versions"]["tsem.encoder"] == version.tags["umair.tsem.encoder"]
    assert (version.tags["variant"], version.tags["test_auc"]) == ("full", "0.500000")
    assert serving.has_pyfunc(client, run_id)

    rows = _rows(tiny_world)
    out = _predict_in_fresh_process(uri, f"models:/{name}/{version.version}", rows, tmp_path)
    modalities = ["tsem", "sem", "sty", "meta"]
    assert list(out.columns) == ["prob", *(f"alpha_{m}" for m in modalities), "status"] and len(out) == len(rows)

    known = rows.index[: len(rows) - 2]
    probs, weights, mods = _evaluate_scores(model_dir, rows.loc[known])
    assert mods == modalities
    np.testing.assert_allclose(out.loc[known, "prob"].to_numpy(), probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.loc[known, [f"alpha_{m}" for m in mods]].to_numpy(), weights, atol=1e-5, rtol=0)
    alpha = out[[f"alpha_{m}" for m in mods]].to_numpy()
    np.testing.assert_allclose(alpha[: len(known)].sum(axis=1), 1.0, atol=1e-5)
    assert len(np.unique(out.loc[known, "prob"].round(6))) > 1, "scores depend on the row"

    # An unknown user is scored as a new user with no profile; an unknown item is not scored.
    user_row, item_row = out.iloc[-2], out.iloc[-1]
    assert user_row["status"] == "unknown_user" and 0.0 < user_row["prob"] < 1.0
    assert alpha[-2].sum() == pytest.approx(1.0, abs=1e-5)
    assert item_row["status"] == "unknown_item" and np.isnan(item_row["prob"]) and np.isnan(alpha[-1]).all()
    assert set(out.loc[known, "status"]) == {"ok"}


def test_the_scorer_needs_no_ts_and_names_missing_columns(model_dir, tmp_path):
    path = serving.save_pyfunc(model_dir, str(tmp_path / "pyfunc"))
    files = {p.relative_to(path).as_posix() for p in Path(path).rglob("*") if p.is_file()}
    assert {
        "MLmodel",
        "umair_fps_pyfunc.py",
        "artifacts/model/model.pt",
        "artifacts/tables/item_features.parquet",
    } <= files
    scorer = serving.FusionScorer.load(
        str(Path(path) / "artifacts" / "model"), str(Path(path) / "artifacts" / "tables")
    )
    users = scorer.users.user_ids[:3]
    items = scorer.item_ids[:3]
    plain = scorer.predict(pd.DataFrame({"user_id": users, "illust_id": items}))
    again = scorer.predict({"user_id": [float(u) for u in users] + [None], "illust_id": [*items.tolist(), items[0]]})
    np.testing.assert_allclose(again["prob"].to_numpy()[:3], plain["prob"].to_numpy(), atol=1e-7)
    assert again["status"].tolist() == ["ok", "ok", "ok", "unknown_user"]
    with pytest.raises(ValueError, match=r"no column\(s\) \['illust_id'\]"):
        scorer.predict(pd.DataFrame({"user_id": users}))


def test_tune_registers_the_best_trials_pyfunc_model_with_its_config(model_dir, tmp_path, monkeypatch):
    """A trial run holding only ``model/`` files (as before pyfunc models): ``_register``
    builds its pyfunc model, adds best_train.yaml to it and registers it; a rerun keeps it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t-tune-register")).info.run_id
    client.log_artifacts(run_id, model_dir, "model")
    (tmp_path / "best_train.yaml").write_text("# best trial\nepochs: 3\n")
    row = {"mlflow_run_id": run_id, "val_auc": 0.61, "experts": "att", "K": 1, "cross_layers": 1, "trial_id": "t1"}

    version = tune._register(client, "umair-fps-tune", row, "epochs: 3\n", str(tmp_path / "best_train.yaml"))
    assert version.source.endswith("/pyfunc") and version.tags["experts"] == "att" and version.tags["K"] == "1"
    assert version.tags["val_auc"] == "0.610000" and version.tags["encoder_version"].startswith("fixture-resnet18")
    assert "umair train config" in version.description
    again = tune._register(client, "umair-fps-tune", row, "epochs: 3\n", str(tmp_path / "best_train.yaml"))
    assert again.version == version.version and len(client.search_model_versions("name='umair-fps-tune'")) == 1

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    got = Path(
        mlflow.artifacts.download_artifacts(f"models:/umair-fps-tune/{version.version}", dst_path=str(tmp_path / "v"))
    )
    assert (got / "best_train.yaml").read_text() == "# best trial\nepochs: 3\n" and (got / "MLmodel").is_file()
    assert (
        load_model(str(got / "artifacts" / "model")).meta["encoder_versions"]
        == json.loads((Path(model_dir) / "model.json").read_text())["encoder_versions"]
    )
