"""The search space and trial settings of ``umair tune`` (no Ray here).

:class:`TuneConfig` validates a search before anything runs (K experts 1–4, DCN-V2 depth
L 0–4, optional lr / d grids); :func:`trial_settings` turns one point of the grid into
the ``umair train`` settings of that trial (its own run dir, model and MLflow child run,
trained on ``ts < validation_start``, its epochs scored and chosen on
``[validation_start, split)``; the test window ``ts >= split`` is never read);
:func:`best_train_config` turns the best trial into a ``umair train`` config, refitted on
the same training window with the same validation window unless ``refit_on_validation``.
``pipelines/tune.py`` runs the trials with Ray Tune.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from umair import contracts, storage
from umair.config import ConfigError, MlflowConfig, RayConfig, Settings, StorageConfig, parse_settings, read_yaml
from umair.errors import FeatureError
from umair.model.interactions import IsoTime, parse_time
from umair.training.inputs import absolute, train_inputs_of, validation_start
from umair.training.settings import TrainConfig

METRIC = "val_auc"
K_RANGE = (1, 4)  # UMCM experts per mix
L_RANGE = (0, 4)  # DCN-V2 cross layers
# Keys of `umair train` settings that every trial sets itself: in tune's `train:` overrides
# they would be silently ignored, so they are refused with the tune setting to use instead.
TRIAL_OWNED = {
    "epochs": "use tune's `epochs`",
    "test_end": "trials validate on [validation_start, split): use tune's `validation_start` (the split comes from the train config or world)",
    "validation": "trials validate on [validation_start, split): use tune's `validation_start`",
    "validation_fraction": "trials validate on [validation_start, split): use tune's `validation_start`",
    "patience": "ASHA stops weak trials (tune's `scheduler`); every other trial trains tune's `epochs`",
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
                raise ValueError(
                    f"expert mix {mix!r} has K = {k} experts; each mix in search.experts must have "
                    f"K in {K_RANGE[0]}..{K_RANGE[1]} (1 to 4 comma-separated att / sen)"
                )
        return v

    @field_validator("cross_layers")
    @classmethod
    def _depths(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one cross depth, e.g. [0, 2]")
        bad = [x for x in v if not L_RANGE[0] <= x <= L_RANGE[1]]
        if bad:
            raise ValueError(
                f"cross depth(s) {bad} out of range; each L in search.cross_layers must be in {L_RANGE[0]}..{L_RANGE[1]} (0 = no DCN-V2)"
            )
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
            raise ValueError(
                f"{what}(s) {bad} out of range; each {info.field_name} in search.{info.field_name} must be {rule}"
            )
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
    driver_cpus: float = Field(
        0.05, gt=0, description="CPUs held by the trial function itself (it mostly waits; > 0 for Tune)"
    )


class TuneConfig(Settings):
    """Settings of ``umair tune`` (see pipelines/configs/tune.yaml)."""

    train_config: str = Field(..., description="the `umair train` YAML every trial starts from")
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="keys of that YAML to override for every trial; keys each "
        "trial sets itself (TRIAL_OWNED, model.experts / cross_layers / umcm) are refused",
    )
    search: SearchSpace = SearchSpace()
    num_samples: int = Field(1, ge=1, description="repeats of the grid (trial seeds differ)")
    epochs: int = Field(4, ge=1, description="epochs per trial (ASHA's max_t)")
    validation_start: IsoTime | None = Field(
        None,
        description="validate on [validation_start, split); None = the train config's validation / "
        "validation_fraction, else the last 20 % of the training window's time",
    )
    refit_on_validation: bool = Field(
        False,
        description="best_train.yaml trains on ts < split (validation window included, best trial's epochs); "
        "default: on ts < validation_start, its epoch chosen on the validation window",
    )
    scheduler: SchedulerConfig = SchedulerConfig()
    trial: TrialResources = TrialResources()
    max_concurrent_trials: int = Field(2, ge=1)
    trial_retries: int = Field(0, ge=0, description="restarts of a trial whose process died")
    name: str = "umair-tune"
    storage_path: str = "outputs/tune"
    register_model: str | None = Field(
        "umair-fps", description="registered model name for the best trial; null = do not register"
    )
    best_config_out: str | None = Field(
        None, description="where best_train.yaml goes (default: STORAGE_PATH/NAME/best_train.yaml)"
    )
    ray: RayConfig = RayConfig(num_cpus=4)
    mlflow: MlflowConfig = MlflowConfig(experiment="umair-tune")
    storage: StorageConfig = StorageConfig()

    @field_validator("train")
    @classmethod
    def _not_trial_owned(cls, v: dict[str, Any]) -> dict[str, Any]:
        problems = [f"train.{k} is set per trial by tune: {why}" for k, why in TRIAL_OWNED.items() if k in v]
        model = v.get("model")
        if isinstance(model, dict):
            problems += [
                f"train.model.{k} is set per trial by tune: use tune's `{key}`"
                for k, key in MODEL_OWNED.items()
                if k in model
            ]
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @model_validator(mode="after")
    def _one_source_per_key(self) -> TuneConfig:
        if self.search.lr and "lr" in self.train:
            raise ValueError(
                "train.lr and search.lr both set: every trial takes its lr from search.lr; remove train.lr"
            )
        if self.search.d and isinstance(self.train.get("model"), dict) and "d" in self.train["model"]:
            raise ValueError(
                "train.model.d and search.d both set: every trial takes its d from search.d; remove train.model.d"
            )
        return self


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares (pickled into each Tune trial): where the
    search lives, the base ``umair train`` settings (a validated dict), the windows and
    the MLflow parent run."""

    tune_dir: str
    base: dict[str, Any]
    epochs: int
    validation_start: str | None
    split: str | None
    trial: TrialResources
    mlflow: MlflowConfig
    parent_run_id: str | None = None
    name: str = ""

    def trial_dir(self, trial_id: str) -> tuple[str, str]:
        """(the trials' checkpoint root, this trial's run directory)."""
        trials_dir = storage.join(self.tune_dir, "trials")
        run_name = f"trial-{trial_id}"
        return trials_dir, storage.join(trials_dir, run_name) if storage.is_s3(trials_dir) else os.path.join(
            trials_dir, run_name
        )


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
    merged = _merge(read_yaml(path, "train config (tune: train_config)"), cfg.train)
    parse_settings(merged, TrainConfig, f"{path} + tune 'train' overrides")
    # Trials run in their own working directories: relative local paths are made absolute here.
    for key in ("world", "illustrations", "users", "interactions", "item_features"):
        if merged.get(key):
            merged[key] = absolute(str(merged[key]))
    if isinstance(merged.get("mlflow"), dict) and merged["mlflow"].get("tracking_uri"):
        merged["mlflow"] = {**merged["mlflow"], "tracking_uri": MlflowConfig(**merged["mlflow"]).resolved_uri()}
    return merged


def _trial_model(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The base config's ``model`` overrides with a search point's experts, L (and d)."""
    model = dict(base.get("model") or {})
    model.update(
        {"umcm": "moe", "experts": list(parse_experts(params["experts"])), "cross_layers": int(params["cross_layers"])}
    )
    if params.get("d") is not None:
        model["d"] = int(params["d"])
    return model


def trial_train_dict(
    base: dict[str, Any],
    params: dict[str, Any],
    *,
    epochs: int,
    split: str | None,
    test_end: str | None,
    resources: TrialResources,
    run_name: str,
    checkpoint_dir: str,
    output: str,
    mlflow: MlflowConfig,
    seed: int | None = None,
    validation: str | None = None,
) -> dict[str, Any]:
    """The ``umair train`` settings of one point of the search space: trained on ``ts <
    validation``, scored every epoch on ``[validation, split)`` (``val_auc``), no early
    stop but ASHA's; ``test_end`` = ``split`` leaves the test window empty."""
    model = _trial_model(base, params)
    out = _merge(
        base,
        {
            "model": model,
            "epochs": epochs,
            "split": split,
            "test_end": test_end,
            "num_workers": resources.num_workers,
            "use_gpu": resources.use_gpu,
            "cpus_per_worker": resources.cpus_per_worker,
            "run_name": run_name,
            "checkpoint_dir": checkpoint_dir,
            "output": output,
            "mlflow": mlflow.model_dump(),
            "variant": None,
            "eval_every_epoch": True,
            "validation": validation,
            "validation_fraction": None,
            "patience": None,
        },
    )
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
    context = TrialContext(tune_dir(cfg), base, cfg.epochs, None, base.get("split"), cfg.trial, cfg.mlflow)
    for point in points:
        where = f"tune: grid point {json.dumps(point)}"
        tc = trial_settings(context, point, "check", where)
        parse_settings({"n_users": 1, "n_tags": 1, **tc.model}, ModelConfig, f"{where}: model")
    return len(points)


def validation_window(
    base: dict[str, Any], start: str | None, settings: storage.StorageSettings | None
) -> tuple[str, str]:
    """(validation_start, split) for the trials, checked: ``start``, else the train
    config's ``validation`` / ``validation_fraction``, else the 80 % time quantile of the
    training window; the trials' training window ``ts < start`` and the validation window
    ``[start, split)`` must both hold interactions."""
    tc = parse_settings(base, TrainConfig, "train config")
    inputs = train_inputs_of(tc, settings)
    split = inputs.split
    if start is not None and parse_time(start) >= parse_time(split):
        raise ConfigError(f"tune: validation_start {start} must be before the split {split}")
    inter = contracts.read_table(inputs.interactions, "interactions", settings)
    fraction = tc.validation_fraction if tc.validation_fraction is not None else 0.2
    found = validation_start(inter, split, start or tc.validation, fraction, inputs.interactions)
    if found is None:  # unreachable: a fraction is always given
        raise FeatureError(f"{inputs.interactions}: no validation window")
    return found, split


def trial_key(params: dict[str, Any]) -> str:
    """A trial's point in the search space as stable JSON (links Tune results to MLflow runs)."""
    return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True, default=str)


def trial_settings(
    context: TrialContext, params: dict[str, Any], trial_id: str, where: str | None = None
) -> TrainConfig:
    """The validated ``umair train`` settings of trial ``trial_id`` (its run dir, model
    output and MLflow run are keyed by the trial id, so a restored trial resumes);
    ``where`` names the source in an error (default: the trial)."""
    trials_dir, run_dir = context.trial_dir(trial_id)
    seed = int(context.base.get("seed", 0)) + int(params.get("sample", 0))
    data = trial_train_dict(
        context.base,
        params,
        epochs=context.epochs,
        split=context.split,
        test_end=context.split,
        validation=context.validation_start,
        resources=context.trial,
        run_name=f"trial-{trial_id}",
        checkpoint_dir=trials_dir,
        output=storage.join(run_dir, "model") if storage.is_s3(run_dir) else os.path.join(run_dir, "model"),
        mlflow=context.mlflow,
        seed=seed,
    )
    return parse_settings(data, TrainConfig, where or f"trial {trial_id}")


def best_train_config(
    base: dict[str, Any], best: dict[str, Any], cfg: TuneConfig, validation_start: str | None = None
) -> dict[str, Any]:
    """The best trial as settings ``umair train`` accepts unchanged: the base config with
    the trial's K/mix, L (and lr/d). By default it is refitted like the trial was: trained
    on ``ts < validation_start`` with its epoch chosen on ``[validation_start, split)``
    (None: the base's validation window, else its last 20 %), so the test window stays
    unseen. ``cfg.refit_on_validation`` trains on the whole ``ts < split`` instead, for
    the best trial's epoch count (no validation window left to choose one on).
    Its model, checkpoints and run name are the search's own (the model in ``best_model``
    beside ``best_config_out`` when that is set, else ``TUNE_DIR/best_model``; checkpoints in
    ``TUNE_DIR/best_checkpoints``), so training it overwrites no model of the base config."""
    params = {"experts": best["experts"], "cross_layers": best["cross_layers"], "lr": best["lr"], "d": best["d"]}
    root = tune_dir(cfg)
    out = copy.deepcopy(base)
    out["model"] = _trial_model(base, params)
    out["epochs"] = cfg.epochs
    out["variant"] = None
    if cfg.refit_on_validation:
        out.update(validation=None, validation_fraction=None, patience=None)
        if best.get("best_epoch") is not None:
            out["epochs"] = int(best["best_epoch"]) + 1
    elif validation_start is not None:
        out.update(validation=validation_start, validation_fraction=None)
    elif out.get("validation") is None and out.get("validation_fraction") is None:
        out["validation_fraction"] = 0.2
    out["eval_every_epoch"] = True
    if params["lr"] is not None:
        out["lr"] = float(params["lr"])
    out.setdefault("run_name", "train")
    out["run_name"] = f"{out['run_name']}-{cfg.name}-best"
    out["output"] = storage.join(storage.parent(cfg.best_config_out) if cfg.best_config_out else root, "best_model")
    out["checkpoint_dir"] = storage.join(root, "best_checkpoints")
    return parse_settings(out, TrainConfig, "best config").model_dump(mode="json")


def tune_dir(cfg: TuneConfig) -> str:
    """Where the search lives: ``storage_path/name`` (local paths made absolute)."""
    if storage.is_s3(cfg.storage_path):
        return storage.join(cfg.storage_path, cfg.name)
    return os.path.abspath(os.path.join(cfg.storage_path, cfg.name))


def search_fingerprint(cfg: TuneConfig, base: dict[str, Any], start: str) -> str:
    """What must not change between a search and its restoration."""
    data = {
        "base": base,
        "search": cfg.search.model_dump(),
        "epochs": cfg.epochs,
        "num_samples": cfg.num_samples,
        "validation_start": start,
        "scheduler": cfg.scheduler.model_dump(),
        "trial": cfg.trial.model_dump(),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
