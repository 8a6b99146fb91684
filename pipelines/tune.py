"""Tune job: Ray Tune over the UMCM experts (K and the ATT/SEN mix) and the DCN-V2 depth L.

Each trial is one distributed Ray Train run: a Tune function builds the trial's
:class:`~pipelines.TrainConfig` and calls :func:`pipelines.train.run`, whose
TorchTrainer reports every epoch back to Tune through ``TuneReportCallback``. Trials
train on ``ts < validation_start`` and are scored on the validation window
``[validation_start, split)`` (``val_auc``), so the test window is never seen while
searching; ASHA stops weak trials early on ``val_auc``.

MLflow: one parent run for the search and a child run per trial (params, per-epoch
metrics, status FINISHED / KILLED when ASHA stopped it / FAILED with the error). At the
end the parent gets ``results.csv``, ``results.md``, a K × L heat map of validation AUC
(``heatmap_val_auc.png``) and ``best_train.yaml``; the best finished trial's model is
registered in the model registry with its config.

A rerun with the same ``name`` and ``storage_path`` restores the search
(``Tuner.restore``): finished trials are kept, unfinished ones continue from their last
Ray Train checkpoint. A trial that raises is recorded as failed; the others go on.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipelines.fusion_training import fit
from pipelines.runtime import ensure_experiment
from umair.training.inputs import absolute, resolve_inputs
from umair.training.model_io import META
from umair.training.settings import TrainConfig
from umair.training.step import TrainingDiverged
from pipelines.runtime import init_ray, resumable_mlflow_run
from umair.config import MlflowConfig, RayConfig
from umair import contracts, storage
from umair.plots import tune_heatmap
from umair.reports import results_csv, results_markdown
from umair.config import ConfigError, Settings, StorageConfig, parse_settings
from umair.errors import JobFailed
from umair.model.features import FeatureError, parse_time, training_window, window

TAG = "[tune]"


class TuneError(JobFailed):
    """The search ran but produced no usable trial (every trial failed)."""
METRIC = "val_auc"
K_RANGE = (1, 4)  # UMCM experts per mix
L_RANGE = (0, 4)  # DCN-V2 cross layers
# Keys of `umair train` settings that every trial sets itself: in tune's `train:` overrides
# they would be silently ignored, so they are refused with the tune setting to use instead.
TRIAL_OWNED = {
    "epochs": "use tune's `epochs`",
    "test_end": "trials validate on [validation_start, split): use tune's `validation_start` (the split comes from the train config or world)",
    "num_workers": "use tune's `trial.num_workers`",
    "use_gpu": "use tune's `trial.use_gpu`",
    "cpus_per_worker": "use tune's `trial.cpus_per_worker`",
    "run_name": "each trial gets its own, under tune's `storage_path` / `name`",
    "checkpoint_dir": "each trial checkpoints under tune's `storage_path` / `name`",
    "output": "each trial writes its model under tune's `storage_path` / `name`",
    "mlflow": "use tune's `mlflow`",
    "variant": "trials build the model from tune's `search` (experts, cross_layers)",
    "eval_every_epoch": "trials always score the validation window (val_auc) every epoch",
    "ray": "trials run on the search's Ray: use tune's `ray`",
}
# Optional search dimensions: (name in messages, example, valid value, the rule as words).
_OPTIONAL_GRIDS: dict[str, tuple[str, str, Any, str]] = {
    "lr": ("learning rate", "[0.001, 0.003]", lambda x: math.isfinite(x) and x > 0, "> 0 (and finite)"),
    "d": ("width", "[16, 32]", lambda x: x >= 1, ">= 1"),
}
MODEL_OWNED = {"umcm": "search.experts", "experts": "search.experts", "cross_layers": "search.cross_layers"}


class SearchSpace(Settings):
    """The grid: every combination is one trial (``num_samples`` repeats it with new seeds).

    ``experts``: UMCM expert mixes, each a comma-separated list of ``att`` / ``sen``; K is
    its length (1–4, the paper's range). ``cross_layers``: DCN-V2 depths L (0–4; 0 = none).
    ``lr`` / ``d``: optional grids of the learning rate (> 0) and the common width d (>= 1).
    Values out of these ranges are refused when the settings are loaded."""

    experts: list[str] = Field(default_factory=lambda: ["att", "att,sen", "att,sen,att", "att,sen,att,sen"])
    cross_layers: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    lr: list[float] | None = None
    d: list[int] | None = None

    @field_validator("experts")
    @classmethod
    def _mixes(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one expert mix, e.g. ['att', 'att,sen']")
        for mix in v:
            k = len(parse_experts(mix))
            if not K_RANGE[0] <= k <= K_RANGE[1]:
                raise ValueError(f"expert mix {mix!r} has K = {k} experts; each mix in search.experts must have "
                                 f"K in {K_RANGE[0]}..{K_RANGE[1]} (1 to 4 comma-separated att / sen)")
        return v

    @field_validator("cross_layers")
    @classmethod
    def _depths(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one cross depth, e.g. [0, 2]")
        bad = [x for x in v if not L_RANGE[0] <= x <= L_RANGE[1]]
        if bad:
            raise ValueError(f"cross depth(s) {bad} out of range; each L in search.cross_layers must be in "
                             f"{L_RANGE[0]}..{L_RANGE[1]} (0 = no DCN-V2)")
        return v

    @field_validator("lr", "d")
    @classmethod
    def _optional_grid(cls, v: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        if v is None:
            return v
        what, example, ok, rule = _OPTIONAL_GRIDS[info.field_name]
        if not v:
            raise ValueError(f"give at least one {what}, e.g. {example}, or leave search.{info.field_name} out")
        bad = [x for x in v if not ok(x)]
        if bad:
            raise ValueError(f"{what}(s) {bad} out of range; each {info.field_name} in search.{info.field_name} must be {rule}")
        return v

    def grid(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"experts": list(self.experts), "cross_layers": list(self.cross_layers)}
        if self.lr:
            out["lr"] = list(self.lr)
        if self.d:
            out["d"] = list(self.d)
        return out

    def size(self) -> int:
        return int(np.prod([len(v) for v in self.grid().values()]))


class SchedulerConfig(Settings):
    """ASHA on ``val_auc`` per epoch (``fifo`` runs every trial to the end)."""

    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs every trial gets before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1.0)


class TrialResources(Settings):
    """Resources of one trial: its Ray Train workers, and the trial's own driver process."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    driver_cpus: float = Field(0.05, gt=0, description="CPUs held by the trial function itself (it mostly waits; > 0 for Tune)")


class TuneConfig(Settings):
    """Settings of ``umair tune`` (see pipelines/configs/tune.yaml)."""

    train_config: str = Field(..., description="the `umair train` YAML every trial starts from")
    train: dict[str, Any] = Field(default_factory=dict, description="keys of that YAML to override for every trial; keys each "
                                  "trial sets itself (TRIAL_OWNED, model.experts / cross_layers / umcm) are refused")
    search: SearchSpace = SearchSpace()
    num_samples: int = Field(1, ge=1, description="repeats of the grid (trial seeds differ)")
    epochs: int = Field(4, ge=1, description="epochs per trial (ASHA's max_t)")
    validation_start: str | None = Field(None, description="validate on [validation_start, split); None = the last 20 % of the training window's time")
    scheduler: SchedulerConfig = SchedulerConfig()
    trial: TrialResources = TrialResources()
    max_concurrent_trials: int = Field(2, ge=1)
    trial_retries: int = Field(0, ge=0, description="restarts of a trial whose process died")
    name: str = "umair-tune"
    storage_path: str = "outputs/tune"
    register_model: str | None = Field("umair-fps", description="registered model name for the best trial; null = do not register")
    best_config_out: str | None = Field(None, description="where best_train.yaml goes (default: STORAGE_PATH/NAME/best_train.yaml)")
    ray: RayConfig = RayConfig(num_cpus=4)
    mlflow: MlflowConfig = MlflowConfig(experiment="umair-tune")
    storage: StorageConfig = StorageConfig()

    @field_validator("validation_start")
    @classmethod
    def _iso(cls, v: str | None) -> str | None:
        if v is not None:
            parse_time(v)
        return v

    @field_validator("train")
    @classmethod
    def _not_trial_owned(cls, v: dict[str, Any]) -> dict[str, Any]:
        problems = [f"train.{k} is set per trial by tune: {why}" for k, why in TRIAL_OWNED.items() if k in v]
        model = v.get("model")
        if isinstance(model, dict):
            problems += [f"train.model.{k} is set per trial by tune: use tune's `{key}`" for k, key in MODEL_OWNED.items() if k in model]
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @model_validator(mode="after")
    def _one_source_per_key(self) -> TuneConfig:
        if self.search.lr and "lr" in self.train:
            raise ValueError("train.lr and search.lr both set: every trial takes its lr from search.lr; remove train.lr")
        if self.search.d and isinstance(self.train.get("model"), dict) and "d" in self.train["model"]:
            raise ValueError("train.model.d and search.d both set: every trial takes its d from search.d; remove train.model.d")
        return self


# --------------------------------------------------------------------------- search space helpers


def parse_experts(mix: str) -> tuple[str, ...]:
    """``"att,sen"`` → ``("att", "sen")``; K = the number of experts."""
    kinds = tuple(k.strip().lower() for k in str(mix).split(",") if k.strip())
    bad = [k for k in kinds if k not in ("att", "sen")]
    if not kinds or bad:
        raise ValueError(f"expert mix {mix!r}: expected a comma-separated list of 'att' / 'sen', e.g. 'att,sen'")
    return kinds


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def base_train_dict(cfg: TuneConfig) -> dict[str, Any]:
    """The trials' common starting point: ``train_config`` with ``train`` merged in,
    validated as a :class:`~pipelines.TrainConfig` (errors name the file)."""
    path = Path(cfg.train_config)
    if not path.is_file():
        raise ConfigError(f"{path}: no such train config (tune: train_config)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    merged = _merge(data, cfg.train)
    parse_settings(merged, TrainConfig, f"{path} + tune 'train' overrides")
    # Trials run in their own working directories: relative local paths are made absolute here.
    for key in ("world", "illustrations", "users", "interactions", "item_features"):
        if merged.get(key):
            merged[key] = absolute(str(merged[key]))
    if isinstance(merged.get("mlflow"), dict) and merged["mlflow"].get("tracking_uri"):
        merged["mlflow"] = {**merged["mlflow"], "tracking_uri": MlflowConfig(**merged["mlflow"]).resolved_uri()}
    return merged


def trial_train_dict(base: dict[str, Any], params: dict[str, Any], *, epochs: int, split: str, test_end: str | None,
                     resources: TrialResources, run_name: str, checkpoint_dir: str, output: str,
                     mlflow: MlflowConfig, seed: int | None = None) -> dict[str, Any]:
    """The ``umair train`` settings of one point of the search space."""
    model = dict(base.get("model") or {})
    model.update({"umcm": "moe", "experts": list(parse_experts(params["experts"])), "cross_layers": int(params["cross_layers"])})
    if params.get("d") is not None:
        model["d"] = int(params["d"])
    out = _merge(base, {
        "model": model, "epochs": epochs, "split": split, "test_end": test_end,
        "num_workers": resources.num_workers, "use_gpu": resources.use_gpu, "cpus_per_worker": resources.cpus_per_worker,
        "run_name": run_name, "checkpoint_dir": checkpoint_dir, "output": output,
        "mlflow": mlflow.model_dump(), "variant": None, "eval_every_epoch": True,
    })
    out["model"] = model  # replace, not merge: the experts list is the trial's own
    if params.get("lr") is not None:
        out["lr"] = float(params["lr"])
    if seed is not None:
        out["seed"] = seed
    return out


def grid_points(cfg: TuneConfig) -> list[dict[str, Any]]:
    """Every point of the search grid (without ``num_samples`` repeats)."""
    grid = cfg.search.grid()
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def check_trials(cfg: TuneConfig, base: dict[str, Any]) -> int:
    """Build every grid point's trial settings once, before Ray starts: the
    :class:`~pipelines.TrainConfig` and its :class:`ModelConfig` overrides (with
    placeholder data sizes). An invalid combination fails here with a
    :class:`ConfigError` naming the grid point, not later inside a trial. Returns the
    number of points checked."""
    from umair.model.settings import ModelConfig

    points = grid_points(cfg)
    context = {"tune_dir": _tune_dir(cfg), "base": base, "epochs": cfg.epochs, "validation_start": base.get("split"),
               "split": None, "trial": cfg.trial.model_dump(), "mlflow": cfg.mlflow.model_dump()}
    for point in points:
        where = f"tune: grid point {json.dumps(point)}"
        tc = trial_settings(context, point, "check", where)
        parse_settings({"n_users": 1, "n_tags": 1, **tc.model}, ModelConfig, f"{where}: model")
    return len(points)


def validation_window(base: dict[str, Any], start: str | None, settings: storage.StorageSettings | None) -> tuple[str, str]:
    """(validation_start, split) for the trials, checked: ``start`` or, when None, the 80 %
    time quantile of the training window; the trials' training window ``ts < start`` and
    the validation window ``[start, split)`` must both hold interactions."""
    tc = parse_settings(base, TrainConfig, "train config")
    inputs = resolve_inputs(tc.world, {"illustrations": tc.illustrations, "users": tc.users,
                                             "interactions": tc.interactions},
                                  tc.item_features, tc.split, settings, (tc.encoder_version, tc.text_version))
    split = inputs.split
    inter = contracts.read_table(inputs.interactions, "interactions", settings)
    if start is None:
        ts = training_window(inter, split, inputs.interactions).column("ts").cast("int64").to_numpy()
        start = np.datetime64(int(np.quantile(ts, 0.8)), "us").astype("datetime64[s]").item().isoformat() + "+00:00"
    if parse_time(start) >= parse_time(split):
        raise ConfigError(f"tune: validation_start {start} must be before the split {split}")
    training_window(inter, start, inputs.interactions)
    if window(inter, start=start, end=split).num_rows == 0:
        raise FeatureError(f"{inputs.interactions}: no interactions in the validation window [{start}, {split})")
    return start, split


# --------------------------------------------------------------------------- the trial (runs in a Tune actor)


def trial_key(params: dict[str, Any]) -> str:
    """A trial's point in the search space as stable JSON (links Tune results to MLflow runs)."""
    return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True, default=str)


def run_trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """One trial: an MLflow child run, then a distributed :func:`pipelines.train.run`
    reporting each epoch to Tune. Raises (the trial fails) on bad settings or errors."""
    import mlflow
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    run_name = f"trial-{trial_id}"
    trials_dir = storage.join(context["tune_dir"], "trials")
    run_dir = storage.join(trials_dir, run_name) if storage.is_s3(trials_dir) else os.path.join(trials_dir, run_name)
    mcfg = MlflowConfig(**context["mlflow"])
    ensure_experiment(mcfg)
    settings = StorageConfig(**(context["base"].get("storage") or {})).to_settings()
    run_id = resumable_mlflow_run(mcfg, run_dir, run_name, context["parent_run_id"], settings)
    client = mlflow.MlflowClient(mcfg.resolved_uri())
    client.set_tag(run_id, "umair.trial_id", trial_id)
    client.set_tag(run_id, "umair.search", context["name"])
    if "trial_params" not in client.get_run(run_id).data.params:
        client.log_param(run_id, "trial_params", trial_key(params))
    attempts = len(client.get_metric_history(run_id, "trial_attempt"))
    client.log_metric(run_id, "trial_attempt", attempts + 1, step=attempts)
    print(f"{TAG} trial {trial_id} (attempt {attempts + 1}): {json.dumps(params)}", flush=True)
    try:
        cfg = trial_settings(context, params, trial_id)
        fit(cfg, parent_run_id=context["parent_run_id"], callbacks=[TuneReportCallback()], eval_name="val")
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


def trial_settings(context: dict[str, Any], params: dict[str, Any], trial_id: str,
                   where: str | None = None) -> TrainConfig:
    """The validated ``umair train`` settings of trial ``trial_id`` (its run dir, model
    output and MLflow run are keyed by the trial id, so a restored trial resumes);
    ``where`` names the source in an error (default: the trial)."""
    run_name = f"trial-{trial_id}"
    trials_dir = storage.join(context["tune_dir"], "trials")
    run_dir = storage.join(trials_dir, run_name) if storage.is_s3(trials_dir) else os.path.join(trials_dir, run_name)
    seed = int(context["base"].get("seed", 0)) + int(params.get("sample", 0))
    data = trial_train_dict(
        context["base"], params, epochs=context["epochs"], split=context["validation_start"],
        test_end=context["split"], resources=TrialResources(**context["trial"]), run_name=run_name,
        checkpoint_dir=trials_dir, output=storage.join(run_dir, "model") if storage.is_s3(run_dir) else os.path.join(run_dir, "model"),
        mlflow=MlflowConfig(**context["mlflow"]), seed=seed,
    )
    return parse_settings(data, TrainConfig, where or f"trial {trial_id}")


def release_callback() -> Any:
    """A Tune callback that frees a finished or stopped trial's Ray Train reservation.

    When ASHA stops a trial, Tune kills the trial process; its Ray Train controller dies
    with it before removing the worker group's placement group (Ray's own cleaner needs
    the dashboard's state API, which a local Ray started by these jobs does not run). The
    workers report that group's id (``placement_group``); removing it here keeps the
    freed CPUs/GPUs available to the next trials instead of starving them."""
    from ray.tune import Callback

    class ReleaseTrainResources(Callback):
        def _release(self, trial: Any) -> None:
            from ray._raylet import PlacementGroupID
            from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

            pg_hex = (trial.last_result or {}).get("placement_group")
            if not pg_hex:
                return
            state = placement_group_table().get(pg_hex, {}).get("state")
            if state in (None, "REMOVED"):
                return
            try:
                remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex))))
            except Exception as err:  # noqa: BLE001 - best effort; Ray may have removed it meanwhile
                print(f"{TAG} could not release placement group {pg_hex} of trial {trial.trial_id}: {err}", flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._release(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._release(trial)

    return ReleaseTrainResources()


# --------------------------------------------------------------------------- results


def collect(results: Any, epochs: int, runs: list[Any]) -> list[dict[str, Any]]:
    """One row per trial from Tune's ResultGrid and the MLflow child runs.

    A child run is matched by its trial id (tag ``umair.trial_id``), else by the trial's
    point in the search space (:func:`trial_key`). A restored search's trial that failed
    before its first report has neither config nor metrics in Tune's result (only its id),
    so its point in the search space is then read back from the child run's
    ``trial_params``."""
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
        if r.error is not None:
            status = "FAILED"
        elif done >= epochs:
            status = "FINISHED"
        else:
            status = "STOPPED"
        experts = parse_experts(cfg.get("experts", "att"))
        rows.append({
            "trial_id": trial_id, "status": status, "experts": ",".join(experts), "K": len(experts),
            "cross_layers": int(cfg.get("cross_layers", -1)), "lr": cfg.get("lr"), "d": cfg.get("d"),
            "epochs": done,
            "val_auc": metrics.get("val_auc"), "val_logloss": metrics.get("val_logloss"), "val_gauc": metrics.get("val_gauc"),
            "mlflow_run_id": run.info.run_id if run is not None else None,
            "error": _one_line(run.data.tags.get("umair.error") if run is not None and "umair.error" in run.data.tags
                               else str(r.error)) if r.error is not None else "",
        })
    rows.sort(key=lambda x: (x["val_auc"] is None, -(x["val_auc"] or 0.0)))
    return rows


def _one_line(text: str, limit: int = 300) -> str:
    """An error message as one table cell: its lines joined, pydantic's help links dropped."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip() and "errors.pydantic.dev" not in ln]
    return " ".join(lines)[:limit]


def best_train_config(base: dict[str, Any], best: dict[str, Any], cfg: TuneConfig) -> dict[str, Any]:
    """The best trial as settings ``umair train`` accepts unchanged: the base config with
    the trial's K/mix, L (and lr/d), trained on the full training window (the world's split).
    Its model, checkpoints and run name are the search's own (the model in ``best_model``
    beside ``best_config_out`` when that is set, else ``TUNE_DIR/best_model``; checkpoints in
    ``TUNE_DIR/best_checkpoints``), so training it overwrites no model of the base config."""
    params = {"experts": best["experts"], "cross_layers": best["cross_layers"], "lr": best["lr"], "d": best["d"]}
    tune_dir = _tune_dir(cfg)
    model = dict(base.get("model") or {})
    model.update({"umcm": "moe", "experts": list(parse_experts(params["experts"])), "cross_layers": int(params["cross_layers"])})
    if params["d"] is not None:
        model["d"] = int(params["d"])
    out = copy.deepcopy(base)
    out["model"] = model
    out["epochs"] = cfg.epochs
    out["variant"] = None
    if params["lr"] is not None:
        out["lr"] = float(params["lr"])
    out.setdefault("run_name", "train")
    out["run_name"] = f"{out['run_name']}-{cfg.name}-best"
    out["output"] = storage.join(storage.parent(cfg.best_config_out) if cfg.best_config_out else tune_dir, "best_model")
    out["checkpoint_dir"] = storage.join(tune_dir, "best_checkpoints")
    return parse_settings(out, TrainConfig, "best config").model_dump(mode="json")


# --------------------------------------------------------------------------- the driver


def finalize_model(context: dict[str, Any], row: dict[str, Any], child: Any, settings: storage.StorageSettings | None) -> None:
    """Make sure the best trial's model directory exists. A trial that ASHA stops at its
    last rung is stopped right after its last epoch's checkpoint, before it writes the
    model: rerunning its ``umair train`` settings resumes that checkpoint, trains no
    further epoch and writes the model (and its MLflow artifacts) from it."""
    params = json.loads(child.data.params["trial_params"])
    cfg = trial_settings(context, params, row["trial_id"])
    if storage.exists(storage.join(cfg.output, META), settings):
        return
    print(f"{TAG} writing the model of trial {row['trial_id']} from its last checkpoint", flush=True)
    fit(cfg, parent_run_id=context["parent_run_id"], eval_name="val")


def _tune_dir(cfg: TuneConfig) -> str:
    if storage.is_s3(cfg.storage_path):
        return storage.join(cfg.storage_path, cfg.name)
    return os.path.abspath(os.path.join(cfg.storage_path, cfg.name))


def _fingerprint(cfg: TuneConfig, base: dict[str, Any], start: str) -> str:
    data = {"base": base, "search": cfg.search.model_dump(), "epochs": cfg.epochs, "num_samples": cfg.num_samples,
            "validation_start": start, "scheduler": cfg.scheduler.model_dump(), "trial": cfg.trial.model_dump()}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _guard(tune_dir: str, fingerprint: str, settings: storage.StorageSettings | None) -> bool:
    """True when a search with these settings already exists here (restore it); refuses
    a different search under the same name."""
    marker = storage.join(tune_dir, "umair_tune_fingerprint")
    if storage.exists(marker, settings):
        old = storage.read_bytes(marker, settings).decode().strip()
        if old != fingerprint:
            raise ConfigError(f"{tune_dir}: a search with other settings exists here (fingerprint {old}, now {fingerprint}); "
                              "use another name or delete the directory")
        return True
    storage.write_bytes(marker, fingerprint.encode(), settings)
    return False


def _register(client: Any, name: str, row: dict[str, Any], best_yaml: str, best_yaml_path: str) -> Any:
    """Register the best trial's ``model/`` artifacts as a version of ``name``, after adding
    ``best_yaml_path`` (best_train.yaml) to them: the version holds the model files and the
    ``umair train`` config together. A run already registered under ``name`` keeps its
    version (rerunning a finished search registers nothing new)."""
    import mlflow

    try:
        client.create_registered_model(name, description="UMAIR-FPS fusion model (best trial of `umair tune`)")
    except mlflow.exceptions.MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err) and "already exists" not in str(err):
            raise
    run = client.get_run(row["mlflow_run_id"])
    same = client.search_model_versions(f"name='{name}' and run_id='{run.info.run_id}'")
    if same:  # a rerun of a finished search: its best model is already a version
        return max(same, key=lambda v: int(v.version))
    client.log_artifact(run.info.run_id, best_yaml_path, "model")
    tags = {"val_auc": f"{row['val_auc']:.6f}", "experts": row["experts"], "K": str(row["K"]),
            "cross_layers": str(row["cross_layers"]), "trial_id": row["trial_id"]}
    return client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags,
                                       description="umair train config of this model:\n\n" + best_yaml)


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

    tune_dir = _tune_dir(cfg)
    restoring = _guard(tune_dir, _fingerprint(cfg, base, start), settings)
    ensure_experiment(cfg.mlflow)
    parent = resumable_mlflow_run(cfg.mlflow, tune_dir, cfg.name, settings=settings)
    client = mlflow.MlflowClient(cfg.mlflow.resolved_uri())
    existing = client.get_run(parent).data.params
    params = {"search": json.dumps(cfg.search.grid()), "trials": cfg.search.size() * cfg.num_samples,
              "epochs": cfg.epochs, "validation_start": start, "split": split, "scheduler": cfg.scheduler.kind,
              "max_concurrent_trials": cfg.max_concurrent_trials, "trial_workers": cfg.trial.num_workers,
              "train_config": cfg.train_config}
    new = [mlflow.entities.Param(k, str(v)) for k, v in params.items() if k not in existing]
    if new:
        client.log_batch(parent, params=new)
    print(f"{TAG} {'restoring' if restoring else 'starting'} search {cfg.name!r}: {cfg.search.size() * cfg.num_samples} trials "
          f"over {cfg.search.grid()}; {cfg.epochs} epochs each; train < {start}, validate [{start}, {split}); "
          f"MLflow parent run {parent}", flush=True)

    started_with = existing.get("max_concurrent_trials")
    if restoring and started_with is not None and started_with != str(cfg.max_concurrent_trials):
        print(f"{TAG} note: max_concurrent_trials {cfg.max_concurrent_trials} is ignored: a restored search keeps the "
              f"concurrency it started with ({started_with}); start a new search (another name) to change it", flush=True)

    init_ray(cfg.ray)
    context = {"tune_dir": tune_dir, "parent_run_id": parent, "name": cfg.name, "base": base, "epochs": cfg.epochs,
               "validation_start": start, "split": split, "trial": cfg.trial.model_dump(),
               "mlflow": {"tracking_uri": cfg.mlflow.resolved_uri(), "experiment": cfg.mlflow.experiment}}
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, context=context),
                                        {"cpu": cfg.trial.driver_cpus})
    space: dict[str, Any] = {k: ray.tune.grid_search(v) for k, v in cfg.search.grid().items()}
    if cfg.num_samples > 1:
        space["sample"] = ray.tune.grid_search(list(range(cfg.num_samples)))
    # max_t one past the last epoch: a trial that survives every rung ends on its own (and
    # saves its model) instead of being stopped by ASHA at its last report.
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=cfg.epochs + 1, grace_period=min(cfg.scheduler.grace_period, cfg.epochs),
                               reduction_factor=cfg.scheduler.reduction_factor)
                 if cfg.scheduler.kind == "asha" else FIFOScheduler())
    storage_path = storage.parent(tune_dir) if not storage.is_s3(tune_dir) else cfg.storage_path
    if restoring and ray.tune.Tuner.can_restore(tune_dir):
        tuner = ray.tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                       restart_errored=False)
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space=space,
            tune_config=ray.tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler,
                                            max_concurrent_trials=cfg.max_concurrent_trials),
            run_config=ray.tune.RunConfig(name=cfg.name, storage_path=storage_path, verbose=1, callbacks=[release_callback()],
                                          failure_config=ray.tune.FailureConfig(max_failures=cfg.trial_retries)),
        )
    results = tuner.fit()

    # Child runs of this search, by trial; close the ones Tune stopped or that died hard.
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=10000)
    rows = collect(results, cfg.epochs, children)
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
    summary: dict[str, Any] = {"name": cfg.name, "trials": len(rows),
                               "finished": sum(r["status"] == "FINISHED" for r in rows),
                               "stopped": sum(r["status"] == "STOPPED" for r in rows),
                               "failed": sum(r["status"] == "FAILED" for r in rows),
                               "validation_start": start, "split": split, "mlflow_parent_run_id": parent,
                               "tracking_uri": cfg.mlflow.resolved_uri(), "experiment": cfg.mlflow.experiment,
                               "tune_dir": tune_dir}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "results.md").write_text(results_markdown(rows))
        (Path(tmp) / "results.csv").write_text(results_csv(rows))
        tune_heatmap(rows, str(Path(tmp) / "heatmap_val_auc.png"))
        if finished:
            best = finished[0]
            best_cfg = best_train_config(base, best, cfg)
            best_yaml = (f"# Best trial {best['trial_id']} of search {cfg.name!r}: val AUC {best['val_auc']:.4f} "
                         f"(K={best['K']} [{best['experts']}], L={best['cross_layers']}).\n"
                         f"# Train the final model on the full training window with: umair train --config THIS_FILE\n"
                         + yaml.safe_dump(best_cfg, sort_keys=False, allow_unicode=True))
            (Path(tmp) / "best_train.yaml").write_text(best_yaml)
            out = cfg.best_config_out or storage.join(tune_dir, "best_train.yaml")
            storage.write_bytes(out, best_yaml.encode(), settings)
            summary.update({"best_trial": best["trial_id"], "best_val_auc": best["val_auc"], "best_experts": best["experts"],
                            "best_K": best["K"], "best_cross_layers": best["cross_layers"], "best_config": out,
                            "best_mlflow_run_id": best["mlflow_run_id"]})
            client.log_metric(parent, "best_val_auc", float(best["val_auc"]))
            if cfg.register_model:
                version = _register(client, cfg.register_model, best, best_yaml, str(Path(tmp) / "best_train.yaml"))
                summary.update({"registered_model": cfg.register_model, "model_version": str(version.version)})
        for name in ("results.md", "results.csv"):
            storage.write_bytes(storage.join(tune_dir, name), (Path(tmp) / name).read_bytes(), settings)
        client.log_artifacts(parent, tmp)
    for k in ("finished", "stopped", "failed"):
        client.log_metric(parent, f"trials_{k}", summary[k])
    client.set_terminated(parent, "FINISHED" if finished else "FAILED")
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"{TAG} results (best first):\n" + results_markdown(rows), flush=True)
    print(f"{TAG} done: " + json.dumps(summary, default=str), flush=True)
    _where(summary)
    if not finished:
        raise TuneError(f"search {cfg.name!r}: no trial finished ({summary['failed']} failed, {summary['stopped']} stopped); "
                        f"see the error column above and {storage.join(tune_dir, 'results.md')}")
    return summary


def _where(summary: dict[str, Any]) -> None:
    uri = summary["tracking_uri"]
    ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else uri
    print(f"{TAG} MLflow: {ui} → experiment {summary['experiment']!r}, parent run {summary['mlflow_parent_run_id']} "
          f"(results.md, heatmap_val_auc.png, best_train.yaml; one child run per trial)", flush=True)
    if "best_config" in summary:
        print(f"{TAG} best: K={summary['best_K']} [{summary['best_experts']}], L={summary['best_cross_layers']}, "
              f"val AUC {summary['best_val_auc']:.4f}; train it with: umair train --config {summary['best_config']}", flush=True)
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
