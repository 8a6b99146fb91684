"""The training protocol (issue 15): a validation window cut from the training window,
the epoch chosen on it (``val_*``) with early stopping, the test window scored once with
the chosen weights (``test_*``), the ``dcn_v2_only`` variant, and ``umair evaluate``'s
per-row predictions and warm / cold segments. In-process tests use
:func:`umair.training.local.fit_local`; the slow one runs Ray Train."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import evaluate, train
from umair.config import MlflowConfig, RayConfig
from umair.errors import FeatureError
from umair.model.interactions import parse_time
from umair.training.inputs import prepare
from umair.training.local import LocalRecipe, fit_local, rows_of_window
from umair.training.model_io import load_model, save_model, training_meta
from umair.training.scoring import COLLAPSED_STD, collapse_warning, score_rows, window_scores
from umair.training.step import EpochSelection

SMALL = {"emb_dim": 4, "d": 8, "experts": ["att"], "cross_layers": 1, "mlp": [16]}


def _cfg(tiny_world, tiny_features, root: Path, **kw) -> train.TrainConfig:
    return train.TrainConfig(
        world=tiny_world.root,
        item_features=tiny_features,
        model=kw.pop("model", SMALL),
        seed=0,
        checkpoint_dir=str(root / "ray_results"),
        output=str(root / "model"),
        mlflow=MlflowConfig(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", experiment="t-protocol"),
        ray=RayConfig(num_cpus=4),
        **kw,
    )


# --------------------------------------------------------------------------- epoch selection


def test_the_best_epoch_is_the_highest_val_auc_and_patience_counts_epochs_since_it():
    sel = EpochSelection(patience=2)
    for epoch, v in enumerate([0.60, 0.70, 0.65, 0.70]):
        sel.update(epoch, v)
    # a tie does not move the best epoch; two epochs without improvement stop
    assert (sel.best_epoch, sel.best_auc, sel.stop) == (1, 0.70, True)
    assert not EpochSelection(patience=None, best_epoch=0, last_epoch=50).stop
    # a resumed run replays its checkpoint's history to the same state
    history = [{"epoch": e, "val_auc": v} for e, v in enumerate([0.6, 0.7, 0.65])]
    again = EpochSelection.replay(history, 2)
    assert (again.best_epoch, again.stop) == (1, False)
    assert again.metrics() == {"best_epoch": 1.0, "best_val_auc": 0.7}


def test_settings_refuse_two_validation_windows_and_patience_without_one(tiny_world, tiny_features, tmp_path):
    with pytest.raises(ValueError, match="not both"):
        _cfg(tiny_world, tiny_features, tmp_path, validation="2021-09-01", validation_fraction=0.2)
    with pytest.raises(ValueError, match="patience needs a validation window"):
        _cfg(tiny_world, tiny_features, tmp_path, patience=2)
    with pytest.raises(ValueError, match="validation_fraction"):
        _cfg(tiny_world, tiny_features, tmp_path, validation_fraction=1.5)


def test_the_validation_window_is_cut_from_the_training_window_and_nothing_is_fitted_on_it(
    tiny_world, tiny_features, tmp_path
):
    plain = prepare(_cfg(tiny_world, tiny_features, tmp_path))
    p = prepare(_cfg(tiny_world, tiny_features, tmp_path, validation_fraction=0.25))
    assert plain.val_rows is None and plain.train_end == plain.inputs.split
    start = parse_time(p.validation)
    assert parse_time(p.train_end) == start < parse_time(p.inputs.split)
    # the training part shrank by the validation rows; the test window is the same
    assert p.train_rows.num_rows + p.val_rows.num_rows == plain.train_rows.num_rows
    assert p.test_rows.num_rows == plain.test_rows.num_rows
    assert set(p.val_rows.column("label").to_numpy()) == {0.0, 1.0}
    # feature space and vector statistics are fitted on ts < validation only
    assert p.space.split == p.validation and p.space.fitted_on["interactions"] == p.train_rows.num_rows
    assert p.space.vector_stats["sty"].to_dict() != plain.space.vector_stats["sty"].to_dict()
    given = prepare(_cfg(tiny_world, tiny_features, tmp_path, validation="2021-09-01"))
    assert given.validation == "2021-09-01T00:00:00+00:00"
    with pytest.raises(FeatureError, match="validation window must start before the split"):
        prepare(_cfg(tiny_world, tiny_features, tmp_path, validation="2021-10-05"))


def test_fit_local_keeps_the_best_validation_epoch_and_stops_early(tiny_world, tiny_features, tmp_path):
    p = prepare(_cfg(tiny_world, tiny_features, tmp_path, validation_fraction=0.25))
    # lr far too high for this data: validation AUC peaks early, then the model overfits
    fitted = fit_local(p, p.model_config, LocalRecipe(epochs=40, batch_size=16, lr=0.05, patience=2))
    aucs = [h["val_auc"] for h in fitted.history]
    assert len(fitted.history) < 40, "patience 2 should stop a run this overfitted"
    assert fitted.best_epoch == int(np.argmax(aucs)) and fitted.best_epoch == len(aucs) - 3
    assert fitted.val_auc == pytest.approx(max(aucs)) and aucs[-1] < max(aucs)
    # the returned weights are the best epoch's, not the last epoch's
    u, i, y, ts = (p.val_rows.column(c).to_numpy() for c in ("user_row", "item_row", "label", "ts"))
    again = window_scores(fitted.model, fitted.lookup, u, i, y, "val", ts=ts)
    assert again["val_auc"] == pytest.approx(fitted.history[fitted.best_epoch]["val_auc"], abs=1e-9)
    # without a validation window: every epoch, the last one kept
    plain = prepare(_cfg(tiny_world, tiny_features, tmp_path))
    last = fit_local(plain, plain.model_config, LocalRecipe(epochs=2, batch_size=64, patience=2))
    assert (len(last.history), last.best_epoch, last.val_auc) == (2, 1, None)


def test_the_output_bias_starts_at_the_training_base_rate_and_a_collapsed_model_is_named(
    tiny_world, tiny_features, tmp_path, caplog
):
    import torch

    from umair.model.fusion import UmairFPS
    from umair.training.lookup import load_lookup

    p = prepare(_cfg(tiny_world, tiny_features, tmp_path, validation_fraction=0.25))
    rate = float(p.train_rows.column("label").to_numpy().mean())
    assert 0.0 < rate < 0.5 and p.model_config.label_prior == pytest.approx(rate)
    assert float(torch.sigmoid(UmairFPS(p.model_config).head.bias)) == pytest.approx(rate)
    # the settings may turn it off: nn.Linear's initialisation
    off = prepare(_cfg(tiny_world, tiny_features, tmp_path, model={**SMALL, "label_prior": None}))
    assert off.model_config.label_prior is None

    # a model whose every prediction is the same: its val AUC of 0.5 is called what it is
    lookup, _, _ = load_lookup(p.space, p.inputs, p.modalities, "cpu")
    u, i, y, ts = (p.val_rows.column(c).to_numpy() for c in ("user_row", "item_row", "label", "ts"))
    collapsed = UmairFPS(p.model_config)
    with torch.no_grad():
        collapsed.head.weight.zero_()
    m = window_scores(collapsed, lookup, u, i, y, "val", ts=ts)
    assert m["val_auc"] == 0.5 and m["val_pred_std"] < COLLAPSED_STD
    warning = collapse_warning(m, "val")
    assert warning is not None and "collapsed" in warning and "val_auc=0.5000" in warning
    # a trained model's predictions vary: no warning from fit_local's epochs
    with caplog.at_level("WARNING", logger="umair"):
        fitted = fit_local(p, p.model_config, LocalRecipe(epochs=2, batch_size=16))
    assert (
        fitted.history[-1]["val_pred_std"] > 10 * COLLAPSED_STD and collapse_warning(fitted.history[-1], "val") is None
    )
    assert "collapsed" not in caplog.text


def test_dcn_v2_only_trains_without_modalities_or_umcm(tiny_world, tiny_features, tmp_path):
    import torch

    from umair.model.fusion import UmairFPS

    p = prepare(_cfg(tiny_world, tiny_features, tmp_path, variant="dcn_v2_only"))
    mc = p.model_config
    assert not mc.multimodal and mc.modalities == () and mc.cross_type == "full" and mc.cross_layers == 1
    names = [n for n, _ in UmairFPS(mc).named_parameters()]
    assert names and not [n for n in names if n.startswith(("modality_proj", "umcm"))]
    fitted = fit_local(p, mc, LocalRecipe(epochs=1, batch_size=64))
    u, i, _, _ = rows_of_window(p.test_rows)
    scores = score_rows(fitted.model, fitted.lookup, u, i)
    assert scores.weights is None and torch.isfinite(torch.as_tensor(scores.probs)).all()


def test_dcn_v2_only_with_a_user_history_reads_the_behaviour_stats_on_every_worker(tiny_world, tiny_features, tmp_path):
    """The ablation drops the modalities, not the user's behaviour: the workers' shared tables
    carry the interaction log, and its counts are those strictly before each row."""
    import numpy as np
    import torch

    from umair.model.fusion import UmairFPS
    from umair.training.lookup import shared_tables

    p = prepare(_cfg(tiny_world, tiny_features, tmp_path, variant="dcn_v2_only", model={**SMALL, "user_history": True}))
    shared = shared_tables(p)
    assert shared.log is not None and len(shared.log) > 0
    lookup = shared.lookup(p.modalities, "cpu")
    lookup.pack_for(UmairFPS(p.model_config))
    u, i, _, ts = rows_of_window(p.test_rows)
    got = lookup.row_vectors(u[:50], i[:50], ts[:50]).history.counts
    # a direct count over the interactions table: the user's rows strictly before the row's time
    import pyarrow as pa

    from umair import contracts
    from umair.model.interactions import rows_of

    inter = contracts.read_table(p.inputs.interactions, "interactions")
    user = rows_of(shared.users.user_ids, inter.column("user_id").to_numpy())
    known = rows_of(shared.items.illust_ids, inter.column("illust_id").to_numpy()) >= 0
    when, label = inter.column("ts").cast(pa.int64()).to_numpy(), inter.column("label").to_numpy()
    for j in range(50):
        mine = known & (user == int(u[j])) & (when < int(ts[j]))
        assert got[j].tolist() == [float((label[mine] > 0).sum()), float((label[mine] == 0).sum())]
    assert np.asarray(got[:, 0]).sum() > 0
    fitted = fit_local(p, p.model_config, LocalRecipe(epochs=1, batch_size=64), lookup)
    assert torch.isfinite(torch.as_tensor(score_rows(fitted.model, lookup, u, i, ts=ts).probs)).all()


# --------------------------------------------------------------------------- umair evaluate


def test_evaluate_writes_predictions_and_warm_cold_segments(tiny_world, tiny_features, tmp_path):
    cfg = _cfg(tiny_world, tiny_features, tmp_path, validation_fraction=0.25)
    p = prepare(cfg)
    fitted = fit_local(p, p.model_config, LocalRecipe(epochs=2, batch_size=32))
    state = {"model": fitted.model.state_dict(), "epoch": fitted.best_epoch, "history": fitted.history, "starts": [0]}
    meta = training_meta(cfg, p, state, state, {})
    assert (meta["train_end"], meta["best_epoch"]) == (p.validation, fitted.best_epoch)
    save_model(str(tmp_path / "model"), state["model"], meta, p.space)
    assert load_model(str(tmp_path / "model")).meta["val_auc"] == pytest.approx(fitted.val_auc)

    report = evaluate.run(
        evaluate.EvaluateConfig(
            model=str(tmp_path / "model"),
            world=tiny_world.root,
            output=str(tmp_path / "eval" / "evaluation.json"),
            mlflow=cfg.mlflow,
        )
    )
    preds = pq.read_table(tmp_path / "eval" / "predictions.parquet")
    assert preds.column_names == [
        "user_id",
        "illust_id",
        "ts",
        "label",
        "prob",
        "user_warm",
        "item_warm",
        *(f"alpha_{m}" for m in p.model_config.modalities),
    ]
    assert preds.num_rows == report["rows"]
    alpha = np.stack([preds.column(f"alpha_{m}").to_numpy() for m in p.model_config.modalities], 1)
    assert np.allclose(alpha.sum(1), 1.0, atol=1e-5)
    # warm = seen before the model's training window ended (its validation start)
    inter = pq.read_table(Path(tiny_world.root) / "interactions.parquet").to_pandas()
    trained = inter[inter.ts < p.validation]
    frame = preds.to_pandas()
    assert (frame.item_warm == frame.illust_id.isin(trained.illust_id)).all()
    assert (frame.user_warm == frame.user_id.isin(trained.user_id)).all()
    assert (~frame.item_warm).any() and frame.item_warm.any(), "the tiny world has new items after the split"
    wc = report["warm_cold"]
    assert wc["items"]["warm"]["rows"] + wc["items"]["cold"]["rows"] == report["rows"]
    assert wc["items"]["cold"]["rows"] == int((~frame.item_warm).sum())
    assert report["predictions"] == str(tmp_path / "eval" / "predictions.parquet")
    metrics = mlflow.MlflowClient(cfg.mlflow.resolved_uri()).get_run(report["mlflow_run_id"]).data.metrics
    assert "warm_items.auc" in metrics and "test_auc" in metrics


# --------------------------------------------------------------------------- Ray Train (slow)


@pytest.mark.slow
def test_ray_training_saves_the_best_validation_epoch_and_names_metrics_truthfully(
    ray_local, tiny_world, tiny_features, tmp_path
):
    cfg = _cfg(
        tiny_world,
        tiny_features,
        tmp_path,
        validation_fraction=0.25,
        patience=2,
        epochs=30,
        lr=0.05,
        batch_size=16,
        num_workers=2,
        run_name="t-protocol",
    )
    summary = train.run(cfg)
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    history = meta["training"]["history"]
    aucs = [h["val_auc"] for h in history]
    assert summary["stopped_early"] and len(history) == summary["epochs"] < 30
    assert meta["best_epoch"] == int(np.argmax(aucs)) == summary["best_epoch"] < len(history) - 1
    assert meta["val_auc"] == pytest.approx(max(aucs)) and meta["selected_on"] == "val_auc"

    # the saved model is the best epoch's: it scores the validation window to that epoch's AUC
    p = prepare(cfg)
    saved = load_model(str(tmp_path / "model"))
    from umair.training.lookup import load_lookup

    lookup, _, _ = load_lookup(saved.space, p.inputs, saved.modalities, "cpu")
    u, i, y, ts = (p.val_rows.column(c).to_numpy() for c in ("user_row", "item_row", "label", "ts"))
    assert window_scores(saved.model, lookup, u, i, y, "val", ts=ts)["val_auc"] == pytest.approx(
        meta["val_auc"], abs=1e-6
    )
    assert summary["test_auc"] == pytest.approx(meta["test"]["test_auc"])

    # MLflow: val_* every epoch, test_* once (at the chosen epoch), no per-epoch test_*
    client = mlflow.MlflowClient(cfg.mlflow.resolved_uri())
    rid = summary["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(rid, "val_auc")] == list(range(len(history)))
    assert [m.step for m in client.get_metric_history(rid, "test_auc")] == [meta["best_epoch"]]
    assert not any(k.startswith("test_") for h in history for k in h)

    # Ray kept the best checkpoint and the latest one only
    kept = sorted(d.name for d in (tmp_path / "ray_results" / "t-protocol").glob("checkpoint_epoch_*"))
    assert kept == [f"checkpoint_epoch_{meta['best_epoch']:04d}", f"checkpoint_epoch_{len(history) - 1:04d}"]

    # a rerun resumes, replays the early stop and trains nothing more
    again = train.run(cfg)
    assert again["epochs"] == summary["epochs"] and again["best_epoch"] == summary["best_epoch"]
