"""The Ray Train run of the UMAIR-FPS fusion model (TorchTrainer, N workers), shared by
``umair train`` (pipelines/train.py) and every ``umair tune`` trial.

Before any worker starts, the driver reads the tables (contracts checked), cuts the
training window ``ts < split``, samples negatives when the log holds positives only,
fits the :class:`~umair.model.features.FeatureSpace` on that window, builds the
:class:`~umair.model.settings.ModelConfig` (sizes from the feature space, vector widths
from the item-features file, overrides and an optional Table-4 variant from the
settings) and maps every interaction to ``(user_row, item_row, label)``. Bad inputs stop
the job here with a :class:`~umair.errors.FeatureError`. With a validation window
(``validation`` / ``validation_fraction``) the training part is ``ts < validation``, and
everything above is fitted on it alone.

The driver reads and encodes the users and the item-features table once
(:func:`~umair.training.lookup.shared_tables`: e_SEM / e_STY / e_TSEM standardised, kept
as float16) and puts them in the Ray object store: every worker of a node maps the same
read-only buffers without a copy (a GPU worker makes one device copy) and gathers rows
by index per batch, converting vectors to float32 per batch. The narrow interaction
rows stream through Ray Data (``random_shuffle``) into ``iter_torch_batches``. Each
worker's memory (peak RSS, USS, PSS, where its item tables live) is logged per epoch as
``mem.w<rank>.*`` (:mod:`umair.training.memory`).

Loss: BCE on the logit + ``l2_emb`` · Σ‖embedding tables‖²
(paper: Adam, lr 1e-3, L2 1e-3, one epoch). After every epoch rank 0 scores the
validation window (``val_auc``, ``val_logloss``, ``val_gauc``, logged to MLflow per epoch
with ``train_loss``) and checkpoints; Ray keeps the best-``val_auc`` checkpoint and the
latest (``CheckpointConfig``), and ``patience`` epochs without a better ``val_auc`` stop
every worker. A worker that dies restarts the group from the latest checkpoint
(``max_failures``), and a rerun with the same ``run_name`` / ``checkpoint_dir`` resumes
too. At the end the best-validation checkpoint (the last one without a validation
window) is the model: the driver scores the test window once with it (``test_auc``,
``test_logloss``, ``test_gauc``; never used to choose anything) and writes ``output``::

    OUTPUT/
      model.pt            UmairFPS state dict (torch.load(weights_only=True))
      model.json          format, model_config, variant, windows (train_end, validation,
                          split, test_end), best_epoch, val_auc, test metrics, feature
                          dims, encoder versions and umair.* metadata of the features
                          file, data URIs and fingerprints, negatives, training history
      feature_space.json  the fitted FeatureSpace (vocabularies, buckets, vector stats)

and logged to the MLflow run as artifacts under ``model/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.runtime import (
    TrainReporter,
    claim_run_dir,
    ended_run,
    ensure_experiment,
    fingerprint,
    init_ray,
    resumable_mlflow_run,
    run_dir_of,
    train_console,
)
from pipelines.serving import publish_trained_model
from umair import storage
from umair.model.item_features import modality_coverage
from umair.model.settings import ModelConfig
from umair.training.inputs import Prepared, prepare
from umair.training.lookup import SharedTables, shared_tables
from umair.training.memory import gather_reports, memory_line
from umair.training.model_io import META, SPACE, WEIGHTS, save_model, training_meta
from umair.training.run_params import run_params
from umair.training.scoring import collapse_warning, window_scores
from umair.training.settings import TrainConfig
from umair.training.step import EpochSelection, StepSettings, train_epoch

TAG = "[train]"


@dataclass(frozen=True)
class WorkerSettings:
    """What every Ray Train worker of one run needs (pickled into ``train_loop_config``);
    the tables themselves travel through the object store (``tables``)."""

    tables: Any  # ray.ObjectRef of the run's SharedTables: put once by the driver
    model: ModelConfig
    modalities: list[str]
    step: StepSettings
    epochs: int
    batch_size: int
    seed: int
    use_gpu: bool
    threads: int
    validate: bool  # score the validation window every epoch and select on val_auc
    patience: int | None
    run_id: str
    tracking_uri: str
    console: TrainReporter  # rank 0's lines and step counts, shown by the driver (quiet in a Tune trial)


def _silent(*args: Any, **kwargs: Any) -> None:
    """``print`` for a run that keeps the console quiet (``fit(console=False)``)."""


def _restore(raw: Any, optimizer: Any, show: TrainReporter) -> tuple[int, list[int], list[dict[str, float]]]:
    """Load the latest checkpoint, if any: (next epoch, start epoch of every attempt so
    far, per-epoch metrics so far)."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, [], []
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    raw.load_state_dict(state["model"])
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:  # a checkpoint of the older per-table parameter layout
        show.say(
            f"{TAG} the checkpoint's optimizer state does not fit this model's parameter layout ({err}); "
            "continuing with a fresh Adam state"
        )
    start = int(state["epoch"]) + 1
    show.say(f"{TAG} resuming from the checkpoint of epoch {start - 1}; next epoch {start}")
    return start, list(state["starts"]), list(state["history"])


def _log_epoch(client: Any, run_id: str, metrics: dict[str, float], show: TrainReporter, last: bool) -> None:
    """Every epoch's metrics to MLflow; on the console (``show``) one line per epoch and
    the workers' memory after the first and the last epoch (every epoch's is in MLflow)."""
    import mlflow

    epoch = int(metrics["epoch"])
    shown = {k: v for k, v in metrics.items() if k != "epoch" and not k.startswith("mem.")}
    workers = sorted({k.split(".")[1] for k in metrics if k.startswith("mem.")})
    show.say(f"{TAG} epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    if warning := collapse_warning(metrics, "val"):
        show.say(f"{TAG} warning, epoch {epoch}: {warning}")
    if workers and (epoch == 0 or last):
        show.say(f"{TAG} memory: " + "; ".join(memory_line(w, metrics) for w in workers))
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[
            mlflow.entities.Metric(k, float(v), now, epoch)
            for k, v in metrics.items()
            if k != "epoch" and np.isfinite(v)
        ],
    )


def train_loop(config: dict[str, WorkerSettings]) -> None:
    """Runs on every Ray Train worker: map the shared tables (one read-only copy per node
    in the object store), train, and report every epoch (rank 0 logs to MLflow and saves
    the checkpoint). ``config["settings"]`` holds everything the worker needs, typed."""
    import mlflow
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device, prepare_model

    from umair.model.fusion import UmairFPS, l2_embedding_penalty

    ws = config["settings"]
    torch.manual_seed(ws.seed)
    if not ws.use_gpu:
        torch.set_num_threads(ws.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    shared: SharedTables = ray.get(ws.tables)  # zero-copy: read-only views of the node's object store
    lookup = shared.lookup(ws.modalities, device)
    show = ws.console if rank == 0 else ws.console.muted()
    if ws.modalities:
        show.say(f"[train] items with each modality (all / present): {modality_coverage(shared.items)}")
    raw = UmairFPS(ws.model).to(device)
    optimizer = torch.optim.Adam(raw.parameters(), lr=ws.step.lr)  # built on the device: resumed state lands there too
    start_epoch, starts, history = _restore(raw, optimizer, show)
    starts.append(start_epoch)
    model = prepare_model(raw)
    train_shard = ray.train.get_dataset_shard("train")
    client = mlflow.MlflowClient(ws.tracking_uri) if rank == 0 else None
    dtypes = {"user_row": torch.int64, "item_row": torch.int64, "ts": torch.int64, "label": torch.float32}

    selection = EpochSelection.replay(history, ws.patience)
    for epoch in range(start_epoch, ws.epochs):
        if selection.stop:  # a resumed run that had already stopped early
            break
        t0 = time.perf_counter()
        batches = train_shard.iter_torch_batches(batch_size=ws.batch_size, device=device, dtypes=dtypes)
        show.begin_epoch(epoch, ws.epochs)
        sums = train_epoch(model, raw, optimizer, show.counted(batches), lookup, ws.step, epoch)
        if world > 1:
            dist.all_reduce(sums)
        with torch.no_grad():
            penalty = float(l2_embedding_penalty(raw))
        metrics: dict[str, float] = {
            "epoch": epoch,
            "train_loss": float(sums[0] / max(float(sums[1]), 1.0)),
            "train_rows": float(sums[1]),
            "rows_per_s": float(sums[1]) / (time.perf_counter() - t0),
            "l2_penalty": penalty,
            **gather_reports(lookup.shared_tensors(), rank, world),
        }
        name = f"checkpoint_epoch_{epoch:04d}"
        # The worker group's placement group, for `umair tune`: when Tune stops a trial early
        # it kills the trial before Ray Train can release this reservation (pipelines/tune.py).
        pg = ray.util.get_current_placement_group()
        extra = {"placement_group": pg.id.hex()} if pg is not None else {}
        if rank != 0:
            ray.train.report({**metrics, **extra}, checkpoint=None, checkpoint_dir_name=name)
        else:
            if ws.validate:
                metrics.update(_score_shard(raw, lookup, ray.train.get_dataset_shard("val"), ws.batch_size))
                selection.update(epoch, metrics["val_auc"])
                metrics.update(selection.metrics())
            history.append(metrics)
            _log_epoch(client, ws.run_id, metrics, show, last=epoch == ws.epochs - 1)
            with tempfile.TemporaryDirectory() as d:
                torch.save(
                    {
                        "model": raw.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch,
                        "starts": starts,
                        "history": history,
                    },
                    os.path.join(d, "state.pt"),
                )
                ray.train.report(
                    {**metrics, **extra}, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name
                )
        if ws.patience is not None:  # rank 0 decides; every worker stops together
            flag = torch.tensor([1.0 if selection.stop else 0.0], device=device)
            if world > 1:
                dist.broadcast(flag, src=0)
            if float(flag[0]) > 0:
                show.say(
                    f"{TAG} early stop after epoch {epoch}: no better val_auc in {ws.patience} epoch(s) "
                    f"(best {selection.best_auc:.4f} at epoch {selection.best_epoch})"
                )
                break


def _score_shard(model: Any, lookup: Any, shard: Any, batch_size: int) -> dict[str, float]:
    """Validation-window AUC / logloss / GAUC on rank 0 (``val_auc`` etc.): the metric
    the best epoch, early stopping and ``umair tune``'s ASHA are decided on."""
    cols: dict[str, list[np.ndarray]] = {c: [] for c in ("user_row", "item_row", "ts", "label")}
    for batch in shard.iter_batches(batch_size=65536, batch_format="numpy"):
        for c, parts in cols.items():
            parts.append(batch[c])
    if not cols["label"]:
        return {}
    u, i, ts, y = (np.concatenate(cols[c]) for c in ("user_row", "item_row", "ts", "label"))
    return window_scores(model, lookup, u, i, y, "val", batch_size, ts=ts)


def _run_fingerprint(cfg: TrainConfig, prepared: Prepared) -> str:
    """What must not change between a run and its resumption (epochs may grow)."""
    windows = {"validation": prepared.validation} if prepared.validation else {}  # absent: old runs keep theirs
    return fingerprint(
        {
            **windows,
            "model": prepared.model_config.model_dump(mode="json"),
            "space": prepared.space.to_dict(),
            "features": prepared.info.fingerprint,
            "train_rows": prepared.train_rows.num_rows,
            "opt": cfg.model_dump(include={"batch_size", "lr", "l2_emb", "seed", "num_workers"}),
        }
    )


def _log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    import mlflow

    existing = client.get_run(run_id).data.params
    new = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    if new:
        client.log_batch(run_id, params=new)


def _datasets(prepared: Prepared, cfg: TrainConfig) -> dict[str, Any]:
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # also inside Tune trial processes

    def blocks(t: pa.Table) -> list[pa.Table]:
        n = max(1, min(4 * cfg.num_workers, t.num_rows // 1024 or 1))
        step = -(-t.num_rows // n) or 1
        return [t.slice(s, step) for s in range(0, max(t.num_rows, 1), step)]

    out = {"train": ray.data.from_arrow(blocks(prepared.train_rows)).random_shuffle(seed=cfg.seed)}
    if cfg.eval_every_epoch and prepared.val_rows is not None:
        out["val"] = ray.data.from_arrow(blocks(prepared.val_rows))
    return out


def _chosen_state(result: Any, validate: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(latest checkpoint's state, the chosen one's): with a validation window the
    checkpoint of the best epoch by ``val_auc`` (first on ties; Ray keeps it beside the
    latest), else the latest."""
    import torch

    def load(checkpoint: Any) -> dict[str, Any]:
        with checkpoint.as_directory() as d:
            return torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)

    latest = load(result.checkpoint)
    if not validate:
        return latest, latest
    best = EpochSelection.replay(list(latest["history"]), None).best_epoch
    kept = {int(m["epoch"]): c for c, m in (result.best_checkpoints or []) if "epoch" in m}
    if best in kept:
        return latest, load(kept[best])
    return latest, load(result.get_best_checkpoint(metric="val_auc", mode="max") or result.checkpoint)


def _score_test(prepared: Prepared, state: dict[str, Any], shared: SharedTables, batch_size: int) -> dict[str, float]:
    """``test_auc`` / ``test_logloss`` / ``test_gauc`` of the weights ``state`` (the chosen
    epoch's) on the test window, scored once on this process's CPU over the shared tables."""
    from umair.model.fusion import UmairFPS

    rows = prepared.test_rows
    if rows.num_rows == 0:
        return {}
    model = UmairFPS(prepared.model_config)
    model.load_state_dict(state)
    u, i, ts, y = (rows.column(c).to_numpy() for c in ("user_row", "item_row", "ts", "label"))
    return window_scores(model, shared.lookup(prepared.modalities, "cpu"), u, i, y, "test", batch_size, ts=ts)


def fit(
    cfg: TrainConfig,
    *,
    parent_run_id: str | None = None,
    callbacks: list[Any] | None = None,
    console: bool = True,
) -> dict[str, Any]:
    """Train with Ray Train, save the best-validation model to ``cfg.output``, score the
    test window once with it; return a summary (also in MLflow).

    ``parent_run_id`` makes the MLflow run a child of that run (a Tune trial under its
    search); ``callbacks`` are Ray Train callbacks (e.g. Tune's ``TuneReportCallback``,
    which reports every epoch's ``val_auc`` to ASHA). ``console=False`` (a Tune trial):
    only warnings and errors are printed; the rest is in MLflow and the returned summary."""
    say = print if console else _silent
    import mlflow
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from umair.model.fusion import UmairFPS, count_parameters

    t_start = time.perf_counter()
    settings = cfg.storage.to_settings()
    prepared = prepare(cfg)
    for line in prepared.check_report.lines() if prepared.check_report else []:
        print(f"{TAG} warning: {line}", flush=True)
    mc = prepared.model_config
    n_params = count_parameters(UmairFPS(mc))
    val = prepared.val_rows
    say(
        f"{TAG} {prepared.train_rows.num_rows} training rows (ts < {prepared.train_end}), "
        + (f"{val.num_rows} validation rows [{prepared.validation}, {prepared.inputs.split}), " if val else "")
        + f"{prepared.test_rows.num_rows} test rows (from {prepared.inputs.split}); variant {cfg.variant or 'full'}, "
        f"modalities {list(mc.modalities)}, {n_params} parameters; negatives: {json.dumps(prepared.negatives['train'])}",
        flush=True,
    )

    run_dir = run_dir_of(cfg.checkpoint_dir, cfg.run_name)
    claim_run_dir(run_dir, _run_fingerprint(cfg, prepared), "train", settings)
    ensure_experiment(cfg.mlflow)
    run_id = resumable_mlflow_run(cfg.mlflow, run_dir, cfg.run_name, parent_run_id, settings)
    client = mlflow.MlflowClient(cfg.mlflow.resolved_uri())
    _log_params(client, run_id, run_params(cfg, prepared))

    with ended_run(client, run_id):  # FINISHED, FAILED, or KILLED on Ctrl-C / SIGTERM
        init_ray(cfg.ray)
        t_tables = time.perf_counter()
        tables = ray.put(shared_tables(prepared, settings))  # one copy per node, mapped by its workers
        say(f"{TAG} shared tables in the object store in {time.perf_counter() - t_tables:.1f}s", flush=True)
        datasets = _datasets(prepared, cfg)
        validate = "val" in datasets
        steps = max(1, -(-(prepared.train_rows.num_rows // cfg.num_workers) // cfg.batch_size))
        # rank 0's lines and step bar, shown here once (no "(RayTrainWorker pid=…)" prefix)
        shown = train_console(TAG, steps) if console else contextlib.nullcontext(TrainReporter(quiet=True))
        with shown as reporter:
            worker = WorkerSettings(
                tables=tables,
                model=mc,
                modalities=prepared.modalities,
                step=StepSettings(lr=cfg.lr, l2_emb=cfg.l2_emb),
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                use_gpu=cfg.use_gpu,
                threads=cfg.threads,
                validate=validate,
                patience=cfg.patience if validate else None,
                run_id=run_id,
                tracking_uri=cfg.mlflow.resolved_uri(),
                console=reporter,
            )
            # With a validation window Ray keeps the best checkpoint by val_auc and, always, the latest.
            kept = (
                CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_auc", checkpoint_score_order="max")
                if validate
                else CheckpointConfig(num_to_keep=2)
            )
            trainer = TorchTrainer(
                train_loop,
                train_loop_config={"settings": worker},
                scaling_config=ScalingConfig(
                    num_workers=cfg.num_workers,
                    use_gpu=cfg.use_gpu,
                    resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
                ),
                datasets=datasets,
                dataset_config=DataConfig(datasets_to_split=["train"]),
                run_config=RunConfig(
                    name=cfg.run_name,
                    storage_path=storage.parent(run_dir) if not storage.is_s3(run_dir) else cfg.checkpoint_dir,
                    checkpoint_config=kept,
                    failure_config=FailureConfig(max_failures=cfg.max_failures),
                    callbacks=callbacks or None,
                ),
            )
            result = trainer.fit()
        state, chosen = _chosen_state(result, validate)
        history, starts = list(state["history"]), list(state["starts"])
        best_epoch = int(chosen["epoch"])
        best = next((h for h in history if int(h["epoch"]) == best_epoch), {})
        test = _score_test(prepared, chosen["model"], ray.get(tables), cfg.batch_size)
        if test:
            say(
                f"{TAG} test window, epoch {best_epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in test.items()),
                flush=True,
            )
            if warning := collapse_warning(test, "test"):
                say(f"{TAG} warning: {warning}", flush=True)
            now = int(time.time() * 1000)
            client.log_batch(
                run_id,
                metrics=[mlflow.entities.Metric(k, v, now, best_epoch) for k, v in test.items() if np.isfinite(v)],
            )
        meta = training_meta(cfg, prepared, state, chosen, test)
        meta.update(parameters=n_params, mlflow_run_id=run_id)
        with tempfile.TemporaryDirectory() as tmp:
            save_model(tmp, chosen["model"], meta, prepared.space)
            for name in (WEIGHTS, SPACE, META):
                with open(os.path.join(tmp, name), "rb") as f:
                    storage.write_bytes(storage.join(cfg.output, name), f.read(), settings)
            client.log_artifacts(run_id, tmp, "model")
            registered = publish_trained_model(
                client, run_id, tmp, cfg, prepared.inputs, history, best_epoch, settings, parent_run_id
            )
    if registered:
        say(f"{TAG} registered: {registered}", flush=True)
    summary = {
        "model": cfg.output,
        "variant": cfg.variant or "full",
        "epochs": int(state["epoch"]) + 1,
        "best_epoch": best_epoch,
        "stopped_early": int(state["epoch"]) + 1 < cfg.epochs,
        "attempt_start_epochs": starts,
        "train_rows": prepared.train_rows.num_rows,
        "val_rows": val.num_rows if val is not None else 0,
        "test_rows": prepared.test_rows.num_rows,
        "train_loss": best.get("train_loss"),
        "val_auc": best.get("val_auc"),
        "val_logloss": best.get("val_logloss"),
        "val_gauc": best.get("val_gauc"),
        "test_auc": test.get("test_auc"),
        "test_logloss": test.get("test_logloss"),
        "test_gauc": test.get("test_gauc"),
        "parameters": n_params,
        "negatives": prepared.negatives["train"],
        "encoder_versions": prepared.info.encoder_versions(),
        "run_dir": run_dir,
        "mlflow_run_id": run_id,
        "registered_model": registered,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    say(f"{TAG} done: " + json.dumps(summary, default=str), flush=True)
    return summary
