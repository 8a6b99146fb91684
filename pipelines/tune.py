"""Tune job: Ray Tune over the UMCM experts (K and the ATT/SEN mix) and the DCN-V2 depth L.

Each trial is one distributed Ray Train run: a Tune function builds the trial's
:class:`~pipelines.TrainConfig` and calls :func:`pipelines.train.run`, whose
TorchTrainer reports every epoch back to Tune through ``TuneReportCallback``. Trials
train on ``ts < validation_start`` and are scored on the validation window
``[validation_start, split)`` (``val_auc``), each keeping its best epoch, so the test
window is never seen while searching; ASHA stops weak trials early on ``val_auc``. The
best trial's ``best_train.yaml`` refits on the same training window and validation
window (``refit_on_validation: true``: on everything before the split).

MLflow: one parent run for the search and a child run per trial (params, per-epoch
metrics, status FINISHED / KILLED when ASHA stopped it / FAILED with the error). At the
end the parent gets ``results.csv``, ``results.md``, a K × L heat map of validation AUC
(``heatmap_val_auc.png``) and ``best_train.yaml``; the best finished trial's model is
registered in the model registry as an MLflow pyfunc model (:mod:`pipelines.serving`)
with its config.

A rerun with the same ``name`` and ``storage_path`` restores the search
(``Tuner.restore``): finished trials are kept, unfinished ones continue from their last
Ray Train checkpoint. A trial that raises is recorded as failed; the others go on.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from pipelines.fusion_training import fit
from pipelines.runtime import claim_run_dir, ended_run, ensure_experiment, init_ray, resumable_mlflow_run
from pipelines.tune_callbacks import console_callback, release_callback
from umair import storage
from umair.config import MlflowConfig, StorageConfig
from umair.errors import JobFailed
from umair.plots import tune_heatmap
from umair.reports import results_csv, results_markdown
from umair.training.model_io import META
from umair.training.step import TrainingDiverged
from umair.tuning import (
    METRIC,
    TrialContext,
    TuneConfig,
    base_train_dict,
    best_train_config,
    check_trials,
    parse_experts,
    search_fingerprint,
    trial_key,
    trial_settings,
    tune_dir,
    validation_window,
)

TAG = "[tune]"


class TuneError(JobFailed):
    """The search ran but produced no usable trial (every trial failed)."""


# Keys of `umair train` settings that every trial sets itself: in tune's `train:` overrides
# they would be silently ignored, so they are refused with the tune setting to use instead.
# Optional search dimensions: (name in messages, example, valid value, the rule as words).


# --------------------------------------------------------------------------- search space helpers


# --------------------------------------------------------------------------- the trial (runs in a Tune actor)


def run_trial(params: dict[str, Any], context: TrialContext) -> None:
    """One trial: an MLflow child run, then a distributed :func:`pipelines.train.run`
    reporting each epoch to Tune. Raises (the trial fails) on bad settings or errors."""
    import mlflow
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    run_name = f"trial-{trial_id}"
    _, run_dir = context.trial_dir(trial_id)
    mcfg = context.mlflow
    ensure_experiment(mcfg)
    settings = StorageConfig(**(context.base.get("storage") or {})).to_settings()
    run_id = resumable_mlflow_run(mcfg, run_dir, run_name, context.parent_run_id, settings)
    client = mlflow.MlflowClient(mcfg.resolved_uri())
    client.set_tag(run_id, "umair.trial_id", trial_id)
    client.set_tag(run_id, "umair.search", context.name)
    if "trial_params" not in client.get_run(run_id).data.params:
        client.log_param(run_id, "trial_params", trial_key(params))
    attempts = len(client.get_metric_history(run_id, "trial_attempt"))
    client.log_metric(run_id, "trial_attempt", attempts + 1, step=attempts)
    try:
        cfg = trial_settings(context, params, trial_id)
        fit(cfg, parent_run_id=context.parent_run_id, callbacks=[TuneReportCallback()], console=False)
    except Exception as err:
        # Recorded here; the search driver sets the run's final status from Tune's view
        # (an ASHA stop also lands here, as the Train controller dying under us).
        client.set_tag(run_id, "umair.error", error_text(err)[:5000])
        raise


def error_text(err: BaseException) -> str:
    """An error as ``Type: message``; for a Ray Train worker group's failure the worker's
    own error comes first (a divergence preferred over the collateral errors of other
    ranks), then Ray's full report."""
    text = f"{type(err).__name__}: {err}"
    failures = getattr(err, "worker_failures", None) or {}
    if not failures:
        return text
    ranks = sorted(failures)
    rank = next((r for r in ranks if isinstance(failures[r], TrainingDiverged)), ranks[0])
    return f"{type(failures[rank]).__name__}: {failures[rank]} (Ray Train worker rank {rank})\n{text}"


# --------------------------------------------------------------------------- results


def collect(
    results: Any, epochs: int, runs: list[Any], logged_epochs: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """One row per trial from Tune's ResultGrid and the MLflow child runs.

    A child run is matched by its trial id (tag ``umair.trial_id``), else by the trial's
    point in the search space (:func:`trial_key`). A restored search's trial that failed
    before its first report has neither config nor metrics in Tune's result (only its id),
    so its point in the search space is then read back from the child run's
    ``trial_params``.

    ``logged_epochs`` (run id -> epochs its MLflow run recorded, each one checkpointed)
    wins over Tune's count when larger: a search killed after a trial's last epoch but
    before Tune saved that report restores the trial, which resumes with every epoch done
    and reports nothing new; Tune's result then holds an older epoch, the run the truth."""
    by_id = {r.data.tags["umair.trial_id"]: r for r in runs if "umair.trial_id" in r.data.tags}
    by_key = {r.data.params["trial_params"]: r for r in runs if "trial_params" in r.data.params}
    rows = []
    for r in results:
        metrics = r.metrics or {}
        cfg = r.config or {}
        run = by_id.get(metrics.get("trial_id")) or (by_key.get(trial_key(cfg)) if cfg else None)
        if not cfg and run is not None and "trial_params" in run.data.params:
            cfg = json.loads(run.data.params["trial_params"])
        trial_id = metrics.get("trial_id") or (run.data.tags.get("umair.trial_id") if run is not None else None) or "?"
        done = int(metrics.get("training_iteration", 0) or 0)
        logged = (logged_epochs or {}).get(run.info.run_id, 0) if run is not None else 0
        if r.error is None and logged > done:
            metrics = {**metrics, **run.data.metrics}
            done = logged
        if r.error is not None:
            status = "FAILED"
        elif done >= epochs:
            status = "FINISHED"
        else:
            status = "STOPPED"
        experts = parse_experts(cfg.get("experts", "att"))
        rows.append(
            {
                "trial_id": trial_id,
                "status": status,
                "experts": ",".join(experts),
                "K": len(experts),
                "cross_layers": int(cfg.get("cross_layers", -1)),
                "lr": cfg.get("lr"),
                "d": cfg.get("d"),
                "epochs": done,
                # the trial's saved model is its best epoch: rank trials by that epoch's val_auc
                "val_auc": metrics.get("best_val_auc", metrics.get("val_auc")),
                "best_epoch": int(metrics["best_epoch"]) if metrics.get("best_epoch") is not None else None,
                "val_logloss": metrics.get("val_logloss"),
                "val_gauc": metrics.get("val_gauc"),
                "mlflow_run_id": run.info.run_id if run is not None else None,
                "error": _one_line(
                    run.data.tags.get("umair.error")
                    if run is not None and "umair.error" in run.data.tags
                    else str(r.error)
                )
                if r.error is not None
                else "",
            }
        )
    rows.sort(key=lambda x: (x["val_auc"] is None, -(x["val_auc"] or 0.0)))
    return rows


def epochs_logged(client: Any, run_id: str) -> int:
    """Epochs a trial's MLflow run recorded (its ``train_loss`` steps are epoch numbers)."""
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    return max(steps) + 1 if steps else 0


def _one_line(text: str, limit: int = 300) -> str:
    """An error message as one table cell: its lines joined, pydantic's help links dropped."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip() and "errors.pydantic.dev" not in ln]
    return " ".join(lines)[:limit]


# --------------------------------------------------------------------------- the driver


def finalize_model(
    context: TrialContext, row: dict[str, Any], child: Any, settings: storage.StorageSettings | None
) -> None:
    """Make sure the best trial's model directory exists. A trial that ASHA stops at its
    last rung is stopped right after its last epoch's checkpoint, before it writes the
    model: rerunning its ``umair train`` settings resumes that checkpoint, trains no
    further epoch and writes the model (and its MLflow artifacts) from it."""
    params = json.loads(child.data.params["trial_params"])
    cfg = trial_settings(context, params, row["trial_id"])
    if storage.exists(storage.join(cfg.output, META), settings):
        return
    print(f"{TAG} writing the model of trial {row['trial_id']} from its last checkpoint", flush=True)
    fit(cfg, parent_run_id=context.parent_run_id)


def _register(
    client: Any,
    name: str,
    row: dict[str, Any],
    best_yaml: str,
    best_yaml_path: str,
    settings: storage.StorageSettings | None = None,
) -> Any:
    """Register the best trial's pyfunc model (its run's ``pyfunc/`` artifact, built from the
    run's ``model/`` files when missing: :func:`pipelines.serving.ensure_pyfunc`) as a version
    of ``name``, after adding ``best_yaml_path`` (best_train.yaml) to it: the version holds
    the model and its ``umair train`` config together. Tags: the encoder versions
    (:func:`~pipelines.serving.version_tags`) and the trial's val_auc, experts, K, L. A run
    already registered under ``name`` keeps its version (rerunning a finished search
    registers nothing new)."""
    from pipelines.serving import PYFUNC, ensure_pyfunc, register_pyfunc, version_tags

    run_id = row["mlflow_run_id"]
    same = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if same:  # a rerun of a finished search: its best model is already a version
        return max(same, key=lambda v: int(v.version))
    meta = ensure_pyfunc(client, run_id, settings)
    client.log_artifact(run_id, best_yaml_path, PYFUNC)
    tags = {
        **version_tags(meta),
        "val_auc": f"{row['val_auc']:.6f}",
        "experts": row["experts"],
        "K": str(row["K"]),
        "cross_layers": str(row["cross_layers"]),
        "trial_id": row["trial_id"],
    }
    return register_pyfunc(client, name, run_id, tags, "umair train config of this model:\n\n" + best_yaml)


def run(cfg: TuneConfig) -> dict[str, Any]:
    """Run (or restore) the search; returns a summary (also logged to the parent run)."""
    import mlflow
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t0 = time.perf_counter()
    settings = cfg.storage.to_settings()
    base = base_train_dict(cfg)
    check_trials(cfg, base)  # every grid point's settings, before any data is read or Ray starts
    start, split = validation_window(base, cfg.validation_start, settings)

    root = tune_dir(cfg)
    restoring = claim_run_dir(root, search_fingerprint(cfg, base, start), "tune", settings)
    ensure_experiment(cfg.mlflow)
    parent = resumable_mlflow_run(cfg.mlflow, root, cfg.name, settings=settings)
    client = mlflow.MlflowClient(cfg.mlflow.resolved_uri())
    existing = client.get_run(parent).data.params
    params = {
        "search": json.dumps(cfg.search.grid()),
        "trials": cfg.search.size() * cfg.num_samples,
        "epochs": cfg.epochs,
        "validation_start": start,
        "split": split,
        "scheduler": cfg.scheduler.kind,
        "max_concurrent_trials": cfg.max_concurrent_trials,
        "trial_workers": cfg.trial.num_workers,
        "refit_on_validation": cfg.refit_on_validation,
        "train_config": cfg.train_config,
    }
    new = [mlflow.entities.Param(k, str(v)) for k, v in params.items() if k not in existing]
    if new:
        client.log_batch(parent, params=new)
    print(
        f"{TAG} {'restoring' if restoring else 'starting'} search {cfg.name!r}: {cfg.search.size() * cfg.num_samples} trials "
        f"over {cfg.search.grid()}; {cfg.epochs} epochs each; train < {start}, validate [{start}, {split}); "
        f"MLflow parent run {parent}",
        flush=True,
    )

    started_with = existing.get("max_concurrent_trials")
    if restoring and started_with is not None and started_with != str(cfg.max_concurrent_trials):
        print(
            f"{TAG} note: max_concurrent_trials {cfg.max_concurrent_trials} is ignored: a restored search keeps the "
            f"concurrency it started with ({started_with}); start a new search (another name) to change it",
            flush=True,
        )

    # Tune's own console (its experiment box, status tables, TensorBoard hint) is off: the
    # search prints console_callback's lines. Ray's new output engine prints its box at any
    # verbosity; the classic reporter with verbose=0 prints nothing.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    with ended_run(client, parent):  # FINISHED; FAILED when no trial finished; KILLED on Ctrl-C / SIGTERM
        init_ray(cfg.ray)
        context = TrialContext(
            root,
            base,
            cfg.epochs,
            start,
            split,
            cfg.trial,
            MlflowConfig(tracking_uri=cfg.mlflow.resolved_uri(), experiment=cfg.mlflow.experiment),
            parent_run_id=parent,
            name=cfg.name,
        )
        trainable = ray.tune.with_resources(
            ray.tune.with_parameters(run_trial, context=context), {"cpu": cfg.trial.driver_cpus}
        )
        space: dict[str, Any] = {k: ray.tune.grid_search(v) for k, v in cfg.search.grid().items()}
        if cfg.num_samples > 1:
            space["sample"] = ray.tune.grid_search(list(range(cfg.num_samples)))
        # max_t one past the last epoch: a trial that survives every rung ends on its own (and
        # saves its model) instead of being stopped by ASHA at its last report.
        scheduler = (
            ASHAScheduler(
                time_attr="training_iteration",
                max_t=cfg.epochs + 1,
                grace_period=min(cfg.scheduler.grace_period, cfg.epochs),
                reduction_factor=cfg.scheduler.reduction_factor,
            )
            if cfg.scheduler.kind == "asha"
            else FIFOScheduler()
        )
        storage_path = storage.parent(root) if not storage.is_s3(root) else cfg.storage_path
        if restoring and ray.tune.Tuner.can_restore(root):
            tuner = ray.tune.Tuner.restore(
                root, trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False
            )
        else:
            tuner = ray.tune.Tuner(
                trainable,
                param_space=space,
                tune_config=ray.tune.TuneConfig(
                    metric=METRIC, mode="max", scheduler=scheduler, max_concurrent_trials=cfg.max_concurrent_trials
                ),
                run_config=ray.tune.RunConfig(
                    name=cfg.name,
                    storage_path=storage_path,
                    verbose=0,  # console_callback's lines instead of Tune's status tables
                    callbacks=[release_callback(), console_callback()],
                    failure_config=ray.tune.FailureConfig(max_failures=cfg.trial_retries),
                ),
            )
        results = tuner.fit()

        # Child runs of this search, by trial; close the ones Tune stopped or that died hard.
        children = client.search_runs(
            [client.get_run(parent).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent}'",
            max_results=10000,
        )
        logged = {c.info.run_id: epochs_logged(client, c.info.run_id) for c in children}
        rows = collect(results, cfg.epochs, children, logged)
        by_id = {r.info.run_id: r for r in children}
        for row in rows:
            run = by_id.get(row["mlflow_run_id"])
            if run is None:
                continue
            if row["status"] == "STOPPED":
                client.set_tag(run.info.run_id, "umair.stopped", f"ASHA stopped it after epoch {row['epochs']}")
                client.set_terminated(run.info.run_id, "KILLED")
            elif row["status"] == "FAILED":
                if "umair.error" not in run.data.tags:  # the trial died before it could say why
                    client.set_tag(run.info.run_id, "umair.error", row["error"])
                client.set_terminated(run.info.run_id, "FAILED")
            else:  # trained every epoch (ASHA may still have stopped it at its last rung, before it saved)
                client.set_terminated(run.info.run_id, "FINISHED")

        finished = [r for r in rows if r["status"] == "FINISHED" and r["val_auc"] is not None and r["mlflow_run_id"]]
        if finished:
            finalize_model(context, finished[0], by_id[finished[0]["mlflow_run_id"]], settings)
        summary: dict[str, Any] = {
            "name": cfg.name,
            "trials": len(rows),
            "finished": sum(r["status"] == "FINISHED" for r in rows),
            "stopped": sum(r["status"] == "STOPPED" for r in rows),
            "failed": sum(r["status"] == "FAILED" for r in rows),
            "validation_start": start,
            "split": split,
            "mlflow_parent_run_id": parent,
            "tracking_uri": cfg.mlflow.resolved_uri(),
            "experiment": cfg.mlflow.experiment,
            "tune_dir": root,
        }
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "results.md").write_text(results_markdown(rows))
            (Path(tmp) / "results.csv").write_text(results_csv(rows))
            tune_heatmap(rows, str(Path(tmp) / "heatmap_val_auc.png"))
            if finished:
                best = finished[0]
                best_cfg = best_train_config(base, best, cfg, start)
                best_yaml = (
                    f"# Best trial {best['trial_id']} of search {cfg.name!r}: val AUC {best['val_auc']:.4f} "
                    f"(K={best['K']} [{best['experts']}], L={best['cross_layers']}).\n"
                    + (
                        "# Refit on every interaction before the split (refit_on_validation) with: "
                        if cfg.refit_on_validation
                        else f"# Refit on ts < {start}, epoch chosen on [{start}, {split}), with: "
                    )
                    + "umair train --config THIS_FILE\n"
                    + yaml.safe_dump(best_cfg, sort_keys=False, allow_unicode=True)
                )
                (Path(tmp) / "best_train.yaml").write_text(best_yaml)
                out = cfg.best_config_out or storage.join(root, "best_train.yaml")
                storage.write_bytes(out, best_yaml.encode(), settings)
                summary.update(
                    {
                        "best_trial": best["trial_id"],
                        "best_val_auc": best["val_auc"],
                        "best_experts": best["experts"],
                        "best_K": best["K"],
                        "best_cross_layers": best["cross_layers"],
                        "best_config": out,
                        "best_mlflow_run_id": best["mlflow_run_id"],
                    }
                )
                client.log_metric(parent, "best_val_auc", float(best["val_auc"]))
                if cfg.register_model:
                    yaml_path = str(Path(tmp) / "best_train.yaml")
                    version = _register(client, cfg.register_model, best, best_yaml, yaml_path, settings)
                    summary.update({"registered_model": cfg.register_model, "model_version": str(version.version)})
            for name in ("results.md", "results.csv", "heatmap_val_auc.png"):
                storage.write_bytes(storage.join(root, name), (Path(tmp) / name).read_bytes(), settings)
            client.log_artifacts(parent, tmp)
        for k in ("finished", "stopped", "failed"):
            client.log_metric(parent, f"trials_{k}", summary[k])
        summary["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"{TAG} results (best first):\n" + results_markdown(rows), flush=True)
        print(f"{TAG} done: " + json.dumps(summary, default=str), flush=True)
        _where(summary)
        if not finished:
            raise TuneError(
                f"search {cfg.name!r}: no trial finished ({summary['failed']} failed, {summary['stopped']} stopped); "
                f"see the error column above and {storage.join(root, 'results.md')}"
            )
    return summary


def _where(summary: dict[str, Any]) -> None:
    uri = summary["tracking_uri"]
    ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else uri
    print(
        f"{TAG} MLflow: {ui} → experiment {summary['experiment']!r}, parent run {summary['mlflow_parent_run_id']} "
        f"(results.md, heatmap_val_auc.png, best_train.yaml; one child run per trial)",
        flush=True,
    )
    if "best_config" in summary:
        print(
            f"{TAG} best: K={summary['best_K']} [{summary['best_experts']}], L={summary['best_cross_layers']}, "
            f"val AUC {summary['best_val_auc']:.4f}; train it with: umair train --config {summary['best_config']}",
            flush=True,
        )
    if "registered_model" in summary:
        print(f"{TAG} registered: models:/{summary['registered_model']}/{summary['model_version']}", flush=True)


def register(sub: Any) -> None:
    """Add ``umair tune`` to the CLI."""
    from umair.config import load_with_flags

    def handler(args: Any) -> int:
        keys = ("name", "epochs", "max_concurrent_trials", "storage_path")
        run(load_with_flags(args.config, TuneConfig, args, keys))
        return 0

    p = sub.add_parser("tune", help="Ray Tune search over UMCM experts (K) and DCN-V2 depth (L), tracked in MLflow")
    p.add_argument("--config", required=True, help="settings YAML (see pipelines/configs/tune.yaml)")
    p.add_argument("--name", help="search name; a rerun with the same name restores the search")
    p.add_argument("--epochs", type=int, help="epochs per trial")
    p.add_argument("--max-concurrent-trials", type=int)
    p.add_argument("--storage-path", help="where the Tune experiment lives (local dir or s3://)")
    p.set_defaults(func=handler)
