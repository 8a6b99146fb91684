"""Settings of a training run (``umair train``, each ``umair tune`` trial, ``umair ablate``)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, Field, field_validator, model_validator

from umair import contracts
from umair.config import MlflowConfig, RayConfig, Settings, StorageConfig
from umair.model.features import FeatureSettings
from umair.model.interactions import IsoTime, NegativeSettings
from umair.model.settings import VARIANTS, ModelConfig

DERIVED = ("n_users", "n_tags", "user_fields", "item_fields", "user_bags", "item_bags", "max_bag")


def check_model_overrides(v: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields a config may set: known ones, none of the data-derived sizes."""
    derived = sorted(set(v) & set(DERIVED))
    if derived:
        raise ValueError(f"{derived} are derived from the training data; remove them")
    unknown = sorted(set(v) - set(ModelConfig.model_fields))
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}")
    return v


ModelOverrides = Annotated[dict[str, Any], AfterValidator(check_model_overrides)]
"""``model:`` overrides of a job's settings: :class:`ModelConfig` fields, none data-derived."""


class TrainConfig(Settings):
    """Settings of ``umair train`` (see pipelines/configs/train.yaml).

    Windows: train on ``ts < validation`` (or ``< split`` without a validation window),
    pick the epoch on ``[validation, split)``, report the test window ``[split, test_end)``
    once with the chosen weights. The feature space, vector statistics, negatives' item
    pool and user history are fitted on the training part only."""

    world: str | None = Field(None, description="a sample world: its tables and split are the defaults below")
    illustrations: str | None = None
    users: str | None = None
    interactions: str | None = None
    item_features: str = Field(..., description="item-features table (parquet) or the output root of `umair extract`")
    encoder_version: str | None = Field(
        None, description="feature set of an extraction output holding several (umair.encoder.version)"
    )
    text_version: str | None = Field(None, description="... and its text encoder (umair.tsem.encoder)")
    split: IsoTime | None = Field(None, description="train on ts < split, test on ts >= split (default: the world's)")
    test_end: IsoTime | None = Field(None, description="end the test window here (ts < test_end)")
    validation: IsoTime | None = Field(
        None, description="start of the validation window: train on ts < validation, pick epochs on [validation, split)"
    )
    validation_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="or: validate on the latest fraction of the training window's interactions (by ts)",
    )
    patience: int | None = Field(
        None, ge=1, description="stop after this many epochs without a better val_auc (None: run every epoch)"
    )
    model: ModelOverrides = Field(
        default_factory=dict, description="ModelConfig fields to override (d, emb_dim, experts...)"
    )
    variant: str | None = Field(
        None, description="a Table-4 variant applied on top, e.g. 'w/o STY', or 'dcn_v2_only' (no modalities, no UMCM)"
    )
    features: FeatureSettings = FeatureSettings()
    negatives: NegativeSettings = NegativeSettings()
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(
        256, ge=1, description="rows per step on each worker; one optimizer step sees batch_size × num_workers"
    )
    lr: float = Field(1e-3, gt=0)
    l2_emb: float = Field(1e-3, ge=0)
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each training worker holds")
    threads: int = Field(1, ge=1, description="torch threads per CPU worker")
    eval_every_epoch: bool = Field(
        True,
        description="score the validation window after every epoch and keep the best one; False: keep the last epoch",
    )
    checks: contracts.Checks = contracts.Checks()
    seed: int = 0
    run_name: str = "train"
    checkpoint_dir: str = "outputs/ray_results"
    max_failures: int = Field(2, ge=0)
    output: str = "outputs/model"
    register_model: str | None = Field(
        None,
        description="also register the run's MLflow pyfunc model (artifact pyfunc/) as a new version of this "
        "registered model, tagged with its encoder versions; None: log it, register nothing",
    )
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig(experiment="umair-train")
    storage: StorageConfig = StorageConfig()

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, v: str | None) -> str | None:
        if v is not None and v not in VARIANTS:
            raise ValueError(f"unknown Table-4 variant {v!r}; expected one of {list(VARIANTS)}")
        return v

    @model_validator(mode="after")
    def _tables(self) -> TrainConfig:
        if self.world is None and None in (self.illustrations, self.users, self.interactions):
            raise ValueError("give 'world' or all of 'illustrations', 'users', 'interactions'")
        if self.validation is not None and self.validation_fraction is not None:
            raise ValueError("give 'validation' (a start time) or 'validation_fraction', not both")
        if self.patience is not None and not self.has_validation:
            raise ValueError("patience needs a validation window: set 'validation' or 'validation_fraction'")
        if self.patience is not None and not self.eval_every_epoch:
            raise ValueError("patience needs eval_every_epoch: true (the validation window scored every epoch)")
        return self

    @property
    def has_validation(self) -> bool:
        """True when a validation window is set (``validation`` or ``validation_fraction``)."""
        return self.validation is not None or self.validation_fraction is not None
