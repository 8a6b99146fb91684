"""Train job: the UMAIR-FPS fusion model with Ray Train (TorchTrainer, N workers).

Before any worker starts, the driver reads the tables (contracts checked), cuts the
training window ``ts < split``, samples negatives when the log holds positives only,
fits the :class:`~umair.model.features.FeatureSpace` on that window, builds the
:class:`~umair.model.fusion.ModelConfig` (sizes from the feature space, vector widths
from the item-features file, overrides and an optional Table-4 variant from the
settings) and maps every interaction to ``(user_row, item_row, label)``. Bad inputs stop
the job here with a :class:`~umair.model.features.FeatureError`.

Each worker loads the users and the item-features table once (the vectors as tensors,
on the GPU when there is one) and gathers rows by index per batch; the narrow
interaction rows stream through Ray Data (``random_shuffle``) into
``iter_torch_batches``. Loss: BCE on the logit + ``l2_emb`` · Σ‖embedding tables‖²
(paper: Adam, lr 1e-3, L2 1e-3, one epoch). Rank 0 checkpoints every epoch; a worker
that dies restarts the group from the latest checkpoint (``max_failures``), and a rerun
with the same ``run_name`` / ``checkpoint_dir`` resumes too. Per-epoch metrics (train
loss, and AUC / logloss / GAUC on the later window when ``eval_every_epoch``) go to
MLflow; at the end the model is written to ``output``::

    OUTPUT/
      model.pt            UmairFPS state dict (torch.load(weights_only=True))
      model.json          format, model_config, variant, split, feature dims, encoder
                          versions and umair.* metadata of the features file, data URIs
                          and fingerprints, negative sampling record, training history
      feature_space.json  the fitted FeatureSpace (vocabularies, buckets, vector stats)

and logged to the MLflow run as artifacts under ``model/``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from pipelines.ray_runtime import MlflowConfig, RayConfig, init_ray, resumable_mlflow_run
from umair import contracts, storage
from umair.config import Settings, StorageConfig
from umair.model.features import (
    MODALITIES,
    FeatureError,
    FeatureSettings,
    FeaturesInfo,
    FeatureSpace,
    ItemPool,
    ItemTable,
    NegativeSettings,
    UserTable,
    attach_rows,
    build_item_table,
    check_dims,
    check_item_coverage,
    features_info,
    fit_vector_stats,
    ids_fingerprint,
    inspect_item_features,
    parse_time,
    require_both_labels,
    training_window,
    vector_stats_of,
    window,
    with_negatives,
)
from umair.model.settings import TABLE4_VARIANTS, ModelConfig, table4_variant

MODEL_FORMAT = "umair-fps-model/1"
WEIGHTS, META, SPACE = "model.pt", "model.json", "feature_space.json"
DERIVED = ("n_users", "n_tags", "user_fields", "item_fields")
TAG = "[train]"


def check_model_overrides(v: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields a config may set: known ones, none of the data-derived sizes."""
    derived = sorted(set(v) & set(DERIVED))
    if derived:
        raise ValueError(f"{derived} are derived from the training data; remove them")
    unknown = sorted(set(v) - set(ModelConfig.model_fields))
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}")
    return v


class TrainConfig(Settings):
    """Settings of ``umair train`` (see pipelines/configs/train.yaml)."""

    world: str | None = Field(None, description="a sample world: its tables and split are the defaults below")
    illustrations: str | None = None
    users: str | None = None
    interactions: str | None = None
    item_features: str = Field(..., description="item-features table (parquet) or the output root of `umair extract`")
    encoder_version: str | None = Field(None, description="feature set of an extraction output holding several (umair.encoder.version)")
    text_version: str | None = Field(None, description="... and its text encoder (umair.tsem.encoder)")
    split: str | None = Field(None, description="train on ts < split, test on ts >= split (default: the world's)")
    test_end: str | None = Field(None, description="end the test window here (ts < test_end); `umair tune` validates on [split, test_end)")
    model: dict[str, Any] = Field(default_factory=dict, description="ModelConfig fields to override (d, emb_dim, experts...)")
    variant: str | None = Field(None, description="a Table-4 variant applied on top, e.g. 'w/o STY'")
    features: FeatureSettings = FeatureSettings()
    negatives: NegativeSettings = NegativeSettings()
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(256, ge=1, description="rows per step on each worker; one optimizer step sees batch_size × num_workers")
    lr: float = Field(1e-3, gt=0)
    l2_emb: float = Field(1e-3, ge=0)
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each training worker holds")
    threads: int = Field(1, ge=1, description="torch threads per CPU worker")
    eval_every_epoch: bool = Field(True, description="score the later window after every epoch (monitoring only)")
    seed: int = 0
    run_name: str = "train"
    checkpoint_dir: str = "outputs/ray_results"
    max_failures: int = Field(2, ge=0)
    output: str = "outputs/model"
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig(experiment="umair-train")
    storage: StorageConfig = StorageConfig()

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, v: str | None) -> str | None:
        if v is not None and v not in TABLE4_VARIANTS:
            raise ValueError(f"unknown Table-4 variant {v!r}; expected one of {list(TABLE4_VARIANTS)}")
        return v

    @field_validator("split", "test_end")
    @classmethod
    def _iso_split(cls, v: str | None) -> str | None:
        if v is not None:
            parse_time(v)  # an ISO date or datetime, e.g. 2021-10-01
        return v

    @field_validator("model")
    @classmethod
    def _model_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_model_overrides(v)

    @model_validator(mode="after")
    def _tables(self) -> TrainConfig:
        if self.world is None and None in (self.illustrations, self.users, self.interactions):
            raise ValueError("give 'world' or all of 'illustrations', 'users', 'interactions'")
        return self


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    """Resolved table URIs and the train/test boundary."""

    illustrations: str
    users: str
    interactions: str
    item_features: str
    split: str
    encoder_version: str | None = None  # the feature set read from an extraction output
    text_version: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return dict(self.__dict__)

    def pinned(self, info: FeaturesInfo) -> Inputs:
        """These inputs with the feature set's versions fixed from its metadata, so the
        workers and later evaluations read the same set even if another is committed."""
        meta = info.metadata
        return replace(self, encoder_version=meta.get("umair.encoder.version", self.encoder_version),
                       text_version=meta.get("umair.tsem.encoder", self.text_version))


def world_split(world: str, settings: storage.StorageSettings | None = None) -> str:
    """The train/test boundary a sample world's manifest records (``spec.split``)."""
    manifest_uri = storage.join(world, "world.json")
    if not storage.exists(manifest_uri, settings):
        raise FeatureError(f"{world}: no world.json manifest, so not a complete sample world (write one with "
                           "`umair sample`); or give the tables and 'split' explicitly")
    return json.loads(storage.read_bytes(manifest_uri, settings))["spec"]["split"]


def resolve_inputs(
    world: str | None,
    tables: dict[str, str | None],
    item_features: str,
    split: str | None,
    settings: storage.StorageSettings | None = None,
    versions: tuple[str | None, str | None] = (None, None),
) -> Inputs:
    """Explicit table URIs win over the world's; the split defaults to the world's.
    Local paths are made absolute (Ray workers run in other directories)."""
    uris = {k: v or (storage.join(world, f"{k}.parquet") if world else None) for k, v in tables.items()}
    missing = [k for k, v in uris.items() if v is None]
    if missing:
        raise FeatureError(f"no URI for {missing}: give them or a world")
    if split is None:
        if world is None:
            raise FeatureError("no split: give 'split' (an ISO date) or a world whose manifest records one")
        split = world_split(world, settings)
    return Inputs(absolute(uris["illustrations"]), absolute(uris["users"]), absolute(uris["interactions"]),
                  absolute(item_features), parse_time(split).isoformat(), *versions)


def absolute(uri: str) -> str:
    """A local path made absolute; s3:// and file:// URIs unchanged."""
    return uri if "://" in uri else os.path.abspath(uri)


def is_extraction_output(uri: str, settings: storage.StorageSettings | None = None) -> bool:
    """True for the output root of ``umair extract`` (committed parts listed in ``_commits/``)."""
    return storage.exists(storage.join(uri, "_commits"), settings)


def read_item_features(inputs: Inputs, settings: storage.StorageSettings | None = None,
                       columns: list[str] | None = None) -> pa.Table:
    """The item-features table (contract ``item_features``): a parquet file or directory,
    or the committed feature set of an extraction output (``pipelines.extract.read_features``)."""
    uri = inputs.item_features
    if is_extraction_output(uri, settings):
        from pipelines.extract import read_features

        table = read_features(uri, inputs.encoder_version, inputs.text_version, settings)
        return table.select(columns) if columns else table
    return contracts.validate(storage.read_parquet(uri, settings, columns=columns), "item_features", uri)


def inspect_features(inputs: Inputs, settings: storage.StorageSettings | None = None) -> tuple[FeaturesInfo, pa.Table | None]:
    """Ids, dims and metadata of the item features; from a plain parquet without reading
    the vectors (None returned), from an extraction output via the whole committed table."""
    if is_extraction_output(inputs.item_features, settings):
        table = read_item_features(inputs, settings)
        return features_info(table, inputs.item_features), table
    return inspect_item_features(inputs.item_features, settings), None


@dataclass
class Prepared:
    """Everything the workers need, checked on the driver before training."""

    inputs: Inputs
    space: FeatureSpace
    model_config: ModelConfig
    info: FeaturesInfo
    users_fingerprint: str
    train_rows: pa.Table  # user_row, item_row, label
    test_rows: pa.Table
    negatives: dict[str, Any]

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if getattr(self.model_config, f"use_{m}")]


def build_model_config(
    space: FeatureSpace, info: FeaturesInfo, overrides: dict[str, Any], variant: str | None
) -> ModelConfig:
    """Sizes from ``space``, vector widths from the features file (checked against any
    ``d_*`` override), then the overrides and the Table-4 ``variant``."""
    probe = ModelConfig(**space.model_sizes(), **overrides)
    probe = table4_variant(probe, variant) if variant else probe
    used = [m for m in MODALITIES if getattr(probe, f"use_{m}")]
    dims = check_dims(info, {m: overrides.get(f"d_{m}") for m in used})
    base = ModelConfig(**{**space.model_sizes(), **overrides, **{f"d_{m}": d for m, d in dims.items()}})
    return table4_variant(base, variant) if variant else base


def read_inputs(inputs: Inputs, settings: storage.StorageSettings | None) -> tuple[pa.Table, pa.Table, pa.Table]:
    """illustrations, users, interactions, each checked against its contract and across."""
    ill = contracts.read_table(inputs.illustrations, "illustrations", settings)
    users = contracts.read_table(inputs.users, "users", settings)
    inter = contracts.read_table(inputs.interactions, "interactions", settings)
    contracts.check_interactions(inter, users, ill, inputs.interactions)
    return ill, users, inter


def prepare(cfg: TrainConfig) -> Prepared:
    """Read and check the inputs, fit the feature space, build the model config and the
    interaction rows. Every :class:`FeatureError` is raised here, before training."""
    settings = cfg.storage.to_settings()
    inputs = resolve_inputs(
        cfg.world, {"illustrations": cfg.illustrations, "users": cfg.users, "interactions": cfg.interactions},
        cfg.item_features, cfg.split, settings, (cfg.encoder_version, cfg.text_version),
    )
    ill, users, inter = read_inputs(inputs, settings)
    train = training_window(inter, inputs.split, inputs.interactions)
    info, features = inspect_features(inputs, settings)
    if features is not None:
        inputs = inputs.pinned(info)
    check_item_coverage(inter, info.illust_ids, inputs.item_features, inputs.interactions)
    pool = ItemPool.build(ill, info.illust_ids, cfg.negatives, train)
    train, neg_train = with_negatives(train, pool, cfg.negatives, inputs.interactions)
    require_both_labels(train, f"{inputs.interactions}: training window")
    test_settings = cfg.negatives.model_copy(update={"seed": cfg.negatives.seed + 1})
    test, neg_test = with_negatives(window(inter, start=inputs.split, end=cfg.test_end), pool, test_settings, inputs.interactions)
    space = FeatureSpace.fit(ill, users, train, inputs.split, cfg.features)
    model_config = build_model_config(space, info, cfg.model, cfg.variant)
    train_rows = attach_rows(train, users.column("user_id").to_numpy(), info.illust_ids, inputs.item_features,
                             f"{inputs.interactions} (training window)")
    test_rows = attach_rows(test, users.column("user_id").to_numpy(), info.illust_ids, inputs.item_features,
                            f"{inputs.interactions} (test window)")
    prepared = Prepared(inputs, space, model_config, info, ids_fingerprint(users.column("user_id").to_numpy()),
                        train_rows, test_rows, {"train": neg_train, "test": neg_test})
    if cfg.features.standardize and prepared.modalities:
        train_items = info.illust_ids[np.unique(train_rows.column("item_row").to_numpy())]
        if features is not None:
            stats = vector_stats_of(features, train_items, prepared.modalities, inputs.item_features)
        else:
            stats = fit_vector_stats(inputs.item_features, train_items, prepared.modalities, settings)
        prepared.space = space.with_vector_stats(stats)
    return prepared


# --------------------------------------------------------------------------- lookup tables (torch, no Ray)


class Lookup:
    """The user and item tables as tensors on one device; gathers model inputs by row."""

    def __init__(self, users: UserTable, items: ItemTable, modalities: list[str], device: Any):
        import torch

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(a), device=device)

        self.uid, self.tags, self.ufields = t(users.uid), t(users.tags), t(users.fields)
        self.ifields = t(items.fields)
        self.vectors = {m: t(items.vectors[m]) for m in modalities}

    def inputs(self, user_row: Any, item_row: Any) -> dict[str, Any]:
        """Keyword arguments of :meth:`UmairFPS.forward` for the given rows."""
        out = {
            "user_id": self.uid[user_row],
            "user_tags": self.tags[user_row],
            "user_fields": self.ufields[user_row],
            "item_fields": self.ifields[item_row],
        }
        out.update({m: v[item_row] for m, v in self.vectors.items()})
        return out


def load_lookup(
    space: FeatureSpace,
    inputs: Inputs,
    modalities: list[str],
    device: Any,
    settings: storage.StorageSettings | None = None,
    features_fingerprint: str | None = None,
    users_fingerprint: str | None = None,
) -> tuple[Lookup, UserTable, ItemTable]:
    """Read users, illustrations and the item features and encode them (once per worker)."""
    users = contracts.read_table(inputs.users, "users", settings)
    if users_fingerprint is not None and ids_fingerprint(users.column("user_id").to_numpy()) != users_fingerprint:
        raise FeatureError(f"{inputs.users}: the users table changed since this run was prepared")
    ill = contracts.read_table(inputs.illustrations, "illustrations", settings)
    features = read_item_features(inputs, settings, columns=["illust_id", *modalities])
    user_table = space.encode_users(users)
    item_table = build_item_table(features, ill, space, modalities, features_fingerprint, inputs.item_features)
    return Lookup(user_table, item_table, modalities, device), user_table, item_table


@dataclass
class Scores:
    """Scores of some interaction rows: probabilities, and ᾱ [N, J] when multimodal."""

    probs: np.ndarray
    weights: np.ndarray | None


def score_rows(model: Any, lookup: Lookup, user_rows: Any, item_rows: Any, batch_size: int = 4096) -> Scores:
    """σ(logit) and the effective modality weights ᾱ = Σ_k β_k α_k of each row."""
    import torch

    from umair.metrics import modality_weights

    model.eval()
    probs, weights = [], []
    with torch.no_grad():
        for s in range(0, len(user_rows), batch_size):
            out = model.explain(**lookup.inputs(user_rows[s:s + batch_size], item_rows[s:s + batch_size]))
            probs.append(torch.sigmoid(out.logits).float().cpu().numpy())
            if out.alpha is not None:
                weights.append(modality_weights(out.alpha.float().cpu().numpy(), out.beta.float().cpu().numpy()))
    p = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    return Scores(p, np.concatenate(weights) if weights else None)


def window_metrics(users: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, logloss and GAUC (impression-weighted; users with one class skipped) of one window."""
    from umair.metrics import auc, gauc, logloss

    g = gauc(users, labels, probs)
    return {"auc": auc(labels, probs), "logloss": logloss(labels, probs), "gauc": g.value, "gauc_users": g.users,
            "gauc_skipped": g.skipped}


# --------------------------------------------------------------------------- the worker loop


def _restore(raw: Any, optimizer: Any, rank: int) -> tuple[int, list[int], list[dict[str, float]]]:
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
        if rank == 0:
            print(f"{TAG} the checkpoint's optimizer state does not fit this model's parameter layout ({err}); "
                  "continuing with a fresh Adam state", flush=True)
    start = int(state["epoch"]) + 1
    if rank == 0:
        print(f"{TAG} resuming from the checkpoint of epoch {start - 1}; next epoch {start}", flush=True)
    return start, list(state["starts"]), list(state["history"])


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite (usually a learning rate too high)."""


def check_finite_loss(value: float, *, epoch: int, step: int, lr: float) -> None:
    """Raise :class:`TrainingDiverged` when a step's loss ``value`` is NaN or infinite."""
    if not np.isfinite(value):
        raise TrainingDiverged(
            f"training diverged: the BCE loss is {value} at epoch {epoch}, step {step} (lr {lr:g}); "
            "this step was not applied and this epoch is not checkpointed; lower the learning rate (lr)")


def _train_epoch(model: Any, raw: Any, optimizer: Any, batches: Any, lookup: Lookup, config: dict[str, Any],
                 epoch: int = 0) -> Any:
    """One pass over this worker's batches (dicts of ``user_row``, ``item_row``, ``label``
    tensors): BCE(logit, y) + l2_emb · Σ‖E‖² (every embedding table E), Adam. Returns
    [Σ BCE·n, n] of this worker (float64 tensor).

    Raises :class:`TrainingDiverged` on a non-finite loss, before that step updates the
    weights, and at the end if any weight is not finite, so a diverged model is never
    checkpointed. The check reuses the per-step loss value the epoch sum needs anyway
    (no extra device sync per step)."""
    import torch
    import torch.nn.functional as F

    from umair.model.fusion import l2_embedding_penalty

    model.train()
    sums = torch.zeros(2, dtype=torch.float64)
    step = -1
    for step, batch in enumerate(batches):
        logits = model(**lookup.inputs(batch["user_row"], batch["item_row"]))
        bce = F.binary_cross_entropy_with_logits(logits, batch["label"])
        loss = bce + config["l2_emb"] * l2_embedding_penalty(raw).to(bce.device) if config["l2_emb"] else bce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = float(bce.detach())
        check_finite_loss(value, epoch=epoch, step=step, lr=config["lr"])
        optimizer.step()
        sums += torch.tensor([value * len(logits), len(logits)], dtype=torch.float64)
    with torch.no_grad():
        finite = bool(torch.stack([torch.isfinite(p).all() for p in raw.parameters()]).all())
    if not finite:
        raise TrainingDiverged(
            f"training diverged: weights are NaN or infinite after epoch {epoch}, step {step} (lr {config['lr']:g}); "
            "this epoch is not checkpointed; lower the learning rate (lr)")
    return sums


def _log_epoch(client: Any, run_id: str, metrics: dict[str, float]) -> None:
    import mlflow

    epoch = int(metrics["epoch"])
    print(f"{TAG} epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"), flush=True)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, epoch)
                                      for k, v in metrics.items() if k != "epoch" and np.isfinite(v)])


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: load the lookup tables once, train, and report
    every epoch (rank 0 logs to MLflow and saves the checkpoint)."""
    import mlflow
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device, prepare_model

    from umair.model.fusion import UmairFPS, l2_embedding_penalty

    torch.manual_seed(config["seed"])
    if not config["use_gpu"]:
        torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    lookup, _, _ = load_lookup(FeatureSpace.from_dict(config["space"]), Inputs(**config["inputs"]), config["modalities"], device,
                               StorageConfig(**config["storage"]).to_settings(), config["features_fingerprint"],
                               config["users_fingerprint"])
    raw = UmairFPS(ModelConfig(**config["model"])).to(device)
    optimizer = torch.optim.Adam(raw.parameters(), lr=config["lr"])  # built on the device: resumed state lands there too
    start_epoch, starts, history = _restore(raw, optimizer, rank)
    starts.append(start_epoch)
    model = prepare_model(raw)
    train_shard = ray.train.get_dataset_shard("train")
    client = mlflow.MlflowClient(config["tracking_uri"]) if rank == 0 else None
    dtypes = {"user_row": torch.int64, "item_row": torch.int64, "label": torch.float32}

    for epoch in range(start_epoch, config["epochs"]):
        t0 = time.perf_counter()
        batches = train_shard.iter_torch_batches(batch_size=config["batch_size"], device=device, dtypes=dtypes)
        sums = _train_epoch(model, raw, optimizer, batches, lookup, config, epoch)
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
        }
        name = f"checkpoint_epoch_{epoch:04d}"
        # The worker group's placement group, for `umair tune`: when Tune stops a trial early
        # it kills the trial before Ray Train can release this reservation (pipelines/tune.py).
        pg = ray.util.get_current_placement_group()
        extra = {"placement_group": pg.id.hex()} if pg is not None else {}
        if rank != 0:
            ray.train.report({**metrics, **extra}, checkpoint=None, checkpoint_dir_name=name)
            continue
        if config["eval"]:
            metrics.update(_eval_test(raw, lookup, ray.train.get_dataset_shard("test"), config["batch_size"],
                                      config.get("eval_name", "test")))
        history.append(metrics)
        _log_epoch(client, config["run_id"], metrics)
        with tempfile.TemporaryDirectory() as d:
            torch.save({"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                        "starts": starts, "history": history}, os.path.join(d, "state.pt"))
            ray.train.report({**metrics, **extra}, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)


def _eval_test(model: Any, lookup: Lookup, shard: Any, batch_size: int, name: str = "test") -> dict[str, float]:
    """Later-window AUC / logloss / GAUC on rank 0, keys ``<name>_auc`` etc. (monitoring
    for ``umair train``; the validation metric ASHA stops on for ``umair tune``)."""
    import torch

    users, items, labels = [], [], []
    for batch in shard.iter_batches(batch_size=65536, batch_format="numpy"):
        users.append(batch["user_row"])
        items.append(batch["item_row"])
        labels.append(batch["label"])
    if not users:
        return {}
    u, i, y = (np.concatenate(x) for x in (users, items, labels))
    device = lookup.uid.device
    scores = score_rows(model, lookup, torch.as_tensor(u, device=device), torch.as_tensor(i, device=device), max(batch_size, 4096))
    m = window_metrics(u, y, scores.probs)
    return {f"{name}_{k}": float(v) for k, v in m.items()}


# --------------------------------------------------------------------------- the saved model


@dataclass
class SavedModel:
    """A trained model with everything needed to score: the module (eval mode), its
    config, the feature space and the ``model.json`` metadata."""

    model: Any
    config: ModelConfig
    space: FeatureSpace
    meta: dict[str, Any]

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if getattr(self.config, f"use_{m}")]


def save_model(out: str, state_dict: dict[str, Any], meta: dict[str, Any], space: FeatureSpace,
               settings: storage.StorageSettings | None = None) -> None:
    """Write ``model.pt``, ``feature_space.json`` and ``model.json`` (last) under ``out``."""
    import torch

    buf = io.BytesIO()
    torch.save(state_dict, buf)
    storage.write_bytes(storage.join(out, WEIGHTS), buf.getvalue(), settings)
    space.save(storage.join(out, SPACE), settings)
    storage.write_bytes(storage.join(out, META), json.dumps(meta, indent=2, default=str).encode(), settings)


def load_model(path: str, settings: storage.StorageSettings | None = None, device: Any = "cpu") -> SavedModel:
    """Load a model written by :func:`save_model` (local dir or s3:// prefix)."""
    import torch

    from umair.model.fusion import UmairFPS

    meta_uri = storage.join(path, META)
    if not storage.exists(meta_uri, settings):
        raise FeatureError(f"{path}: no {META}; not a trained model directory (run `umair train` first)")
    meta = json.loads(storage.read_bytes(meta_uri, settings))
    if meta.get("format") != MODEL_FORMAT:
        raise FeatureError(f"{meta_uri}: format {meta.get('format')!r}, expected {MODEL_FORMAT!r}")
    config = ModelConfig(**meta["model_config"])
    model = UmairFPS(config)
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(path, WEIGHTS), settings)), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    return SavedModel(model, config, FeatureSpace.load(storage.join(path, SPACE), settings), meta)


# --------------------------------------------------------------------------- the driver


def ensure_experiment(cfg: MlflowConfig) -> None:
    """Create the experiment with its artifacts beside a local sqlite store
    (``<db dir>/mlartifacts``) rather than in the working directory."""
    import mlflow

    uri = cfg.resolved_uri()
    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(cfg.experiment) is not None:
        return
    location = None
    if uri.startswith("sqlite:///"):
        location = "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
    try:
        client.create_experiment(cfg.experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        if client.get_experiment_by_name(cfg.experiment) is None:  # not a lost race: a real error
            raise


def _run_dir(cfg: TrainConfig) -> str:
    if storage.is_s3(cfg.checkpoint_dir):
        return storage.join(cfg.checkpoint_dir, cfg.run_name)
    return os.path.abspath(os.path.join(cfg.checkpoint_dir, cfg.run_name))


def _run_fingerprint(cfg: TrainConfig, prepared: Prepared) -> str:
    """What must not change between a run and its resumption (epochs may grow)."""
    data = {
        "model": prepared.model_config.model_dump(mode="json"),
        "space": prepared.space.to_dict(),
        "features": prepared.info.fingerprint,
        "train_rows": prepared.train_rows.num_rows,
        "opt": cfg.model_dump(include={"batch_size", "lr", "l2_emb", "seed", "num_workers"}),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _guard_run_dir(run_dir: str, fingerprint: str, settings: storage.StorageSettings | None) -> None:
    """Refuse to resume a run directory that was started with different settings or data."""
    marker = storage.join(run_dir, "umair_train_fingerprint")
    if storage.exists(marker, settings):
        old = storage.read_bytes(marker, settings).decode().strip()
        if old != fingerprint:
            raise FeatureError(
                f"{run_dir}: this run was started with other settings or data (fingerprint {old}, now {fingerprint}); "
                "use another run_name or delete the directory"
            )
        return
    storage.write_bytes(marker, fingerprint.encode(), settings)


def _params(cfg: TrainConfig, prepared: Prepared) -> dict[str, Any]:
    mc = prepared.model_config
    params: dict[str, Any] = {
        **prepared.inputs.to_dict(),
        "variant": cfg.variant or "full",
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "l2_emb": cfg.l2_emb,
        "num_workers": cfg.num_workers, "use_gpu": cfg.use_gpu, "seed": cfg.seed,
        "emb_dim": mc.emb_dim, "d": mc.d, "umcm": mc.umcm, "experts": ",".join(mc.experts), "cross_layers": mc.cross_layers,
        "modalities": ",".join(mc.modalities) or "none",
        "train_rows": prepared.train_rows.num_rows, "test_rows": prepared.test_rows.num_rows,
        "features_fingerprint": prepared.info.fingerprint,
        "negatives": json.dumps(prepared.negatives["train"], sort_keys=True),
    }
    params.update({f"encoder.{k}": v for k, v in prepared.info.encoder_versions().items()})
    return params


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
    if cfg.eval_every_epoch and prepared.test_rows.num_rows:
        out["test"] = ray.data.from_arrow(blocks(prepared.test_rows))
    return out


def run(cfg: TrainConfig, *, parent_run_id: str | None = None, callbacks: list[Any] | None = None,
        eval_name: str = "test") -> dict[str, Any]:
    """Train with Ray Train, save the model to ``cfg.output``, return a summary (also in MLflow).

    ``parent_run_id`` makes the MLflow run a child of that run (a Tune trial under its
    search); ``callbacks`` are Ray Train callbacks (e.g. Tune's ``TuneReportCallback``);
    ``eval_name`` prefixes the later window's metrics (``val`` when tuning: ``val_auc``)."""
    import mlflow
    import torch
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from umair.model.fusion import UmairFPS, count_parameters

    t_start = time.perf_counter()
    settings = cfg.storage.to_settings()
    prepared = prepare(cfg)
    mc = prepared.model_config
    n_params = count_parameters(UmairFPS(mc))
    print(f"{TAG} {prepared.train_rows.num_rows} training rows, {prepared.test_rows.num_rows} test rows (split "
          f"{prepared.inputs.split}); variant {cfg.variant or 'full'}, modalities {list(mc.modalities)}, "
          f"{n_params} parameters; negatives: {json.dumps(prepared.negatives['train'])}", flush=True)

    run_dir = _run_dir(cfg)
    _guard_run_dir(run_dir, _run_fingerprint(cfg, prepared), settings)
    ensure_experiment(cfg.mlflow)
    run_id = resumable_mlflow_run(cfg.mlflow, run_dir, cfg.run_name, parent_run_id, settings)
    client = mlflow.MlflowClient(cfg.mlflow.resolved_uri())
    _log_params(client, run_id, _params(cfg, prepared))

    init_ray(cfg.ray)
    datasets = _datasets(prepared, cfg)
    loop_config = {
        **cfg.model_dump(include={"epochs", "batch_size", "lr", "l2_emb", "seed", "use_gpu", "threads"}),
        "eval": "test" in datasets,
        "eval_name": eval_name,
        "inputs": prepared.inputs.to_dict(),
        "storage": cfg.storage.model_dump(),
        "space": prepared.space.to_dict(),
        "model": mc.model_dump(mode="json"),
        "modalities": prepared.modalities,
        "features_fingerprint": prepared.info.fingerprint,
        "users_fingerprint": prepared.users_fingerprint,
        "run_id": run_id,
        "tracking_uri": cfg.mlflow.resolved_uri(),
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage.parent(run_dir) if not storage.is_s3(run_dir) else cfg.checkpoint_dir,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks or None,
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    history, starts = list(state["history"]), list(state["starts"])
    final = history[-1] if history else {}
    meta = {
        "format": MODEL_FORMAT,
        "model_config": mc.model_dump(mode="json"),
        "variant": cfg.variant or "full",
        "split": prepared.inputs.split,
        "test_end": cfg.test_end,
        "modalities": list(mc.modalities),
        "feature_dims": {m: prepared.info.dims[m] for m in prepared.modalities},
        "encoder_versions": prepared.info.encoder_versions(),
        "feature_metadata": prepared.info.metadata,
        "data": {**prepared.inputs.to_dict(), "features_fingerprint": prepared.info.fingerprint,
                 "users_fingerprint": prepared.users_fingerprint},
        "negatives": prepared.negatives,
        "training": {"epochs": int(state["epoch"]) + 1, "attempt_start_epochs": starts, "history": history,
                     **cfg.model_dump(include={"batch_size", "lr", "l2_emb", "num_workers", "use_gpu", "seed"})},
        "parameters": n_params,
        "mlflow_run_id": run_id,
    }
    with tempfile.TemporaryDirectory() as tmp:
        save_model(tmp, state["model"], meta, prepared.space)
        for name in (WEIGHTS, SPACE, META):
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes(storage.join(cfg.output, name), f.read(), settings)
        client.log_artifacts(run_id, tmp, "model")
    client.set_terminated(run_id, "FINISHED")
    summary = {
        "model": cfg.output,
        "variant": cfg.variant or "full",
        "epochs": int(state["epoch"]) + 1,
        "attempt_start_epochs": starts,
        "train_rows": prepared.train_rows.num_rows,
        "test_rows": prepared.test_rows.num_rows,
        "train_loss": final.get("train_loss"),
        f"{eval_name}_auc": final.get(f"{eval_name}_auc"),
        f"{eval_name}_logloss": final.get(f"{eval_name}_logloss"),
        f"{eval_name}_gauc": final.get(f"{eval_name}_gauc"),
        "parameters": n_params,
        "negatives": prepared.negatives["train"],
        "encoder_versions": prepared.info.encoder_versions(),
        "run_dir": run_dir,
        "mlflow_run_id": run_id,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(f"{TAG} done: " + json.dumps(summary, default=str), flush=True)
    return summary


def register(sub: Any) -> None:
    """Add ``umair train`` to the CLI."""
    from umair.config import load_with_flags

    def handler(args: Any) -> int:
        keys = ("world", "item_features", "output", "epochs", "num_workers", "run_name", "variant")
        run(load_with_flags(args.config, TrainConfig, args, keys))
        return 0

    p = sub.add_parser("train", help="train the UMAIR-FPS fusion model (Ray Train) and save it")
    p.add_argument("--config", required=True, help="settings YAML (see pipelines/configs/train.yaml)")
    p.add_argument("--world", help="sample world whose tables and split to use (overrides the config)")
    p.add_argument("--item-features", help="item-features table, the extraction output (overrides the config)")
    p.add_argument("--output", help="where the trained model goes (overrides the config)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--variant", help=f"a Table-4 variant: {', '.join(TABLE4_VARIANTS)}")
    p.add_argument("--run-name", help="a rerun with the same name resumes from its latest checkpoint")
    p.set_defaults(func=handler)
