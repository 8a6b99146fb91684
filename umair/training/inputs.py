"""Training inputs: table URIs resolved and checked, the training window cut, negatives
sampled, the :class:`~umair.model.features.FeatureSpace` fitted and every interaction
mapped to ``(user_row, item_row, label)``. Bad inputs raise
:class:`~umair.errors.FeatureError` here, before any worker starts."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from umair import contracts, storage
from umair import modalities as registry
from umair.errors import FeatureError
from umair.feature_store import feature_set_versions, read_features
from umair.model.features import FeatureSpace
from umair.model.interactions import ItemPool, parse_time, require_both_labels, training_window, window, with_negatives
from umair.model.item_features import (
    FeaturesInfo,
    attach_rows,
    check_dims,
    check_item_coverage,
    features_info,
    fit_vector_stats,
    ids_fingerprint,
    inspect_item_features,
    vector_stats_of,
)
from umair.model.settings import ModelConfig, model_variant
from umair.training.model_io import SavedModel
from umair.training.settings import TrainConfig


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
        return replace(
            self,
            encoder_version=meta.get("umair.encoder.version", self.encoder_version),
            text_version=meta.get("umair.tsem.encoder", self.text_version),
        )


def world_split(world: str, settings: storage.StorageSettings | None = None) -> str:
    """The train/test boundary a sample world's manifest records (``spec.split``)."""
    manifest_uri = storage.join(world, "world.json")
    if not storage.exists(manifest_uri, settings):
        raise FeatureError(
            f"{world}: no world.json manifest, so not a complete sample world (write one with "
            "`umair sample`); or give the tables and 'split' explicitly"
        )
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
    return Inputs(
        absolute(uris["illustrations"]),
        absolute(uris["users"]),
        absolute(uris["interactions"]),
        absolute(item_features),
        parse_time(split).isoformat(),
        *versions,
    )


def absolute(uri: str) -> str:
    """A local path made absolute; s3:// and file:// URIs unchanged."""
    return uri if "://" in uri else os.path.abspath(uri)


def is_extraction_output(uri: str, settings: storage.StorageSettings | None = None) -> bool:
    """True for the output root of ``umair extract`` (committed parts listed in ``_commits/``)."""
    return storage.exists(storage.join(uri, "_commits"), settings)


def read_item_features(
    inputs: Inputs, settings: storage.StorageSettings | None = None, columns: list[str] | None = None
) -> pa.Table:
    """The item-features table (contract ``item_features``): a parquet file or directory,
    or the committed feature set of an extraction output (``umair.feature_store.read_features``)."""
    uri = inputs.item_features
    if is_extraction_output(uri, settings):
        table = read_features(uri, feature_set_versions(inputs.encoder_version, inputs.text_version), settings)
        return table.select(columns) if columns else table
    return contracts.validate(storage.read_parquet(uri, settings, columns=columns), "item_features", uri)


def inspect_features(
    inputs: Inputs, settings: storage.StorageSettings | None = None
) -> tuple[FeaturesInfo, pa.Table | None]:
    """Ids, dims and metadata of the item features; from a plain parquet without reading
    the vectors (None returned), from an extraction output via the whole committed table."""
    if is_extraction_output(inputs.item_features, settings):
        table = read_item_features(inputs, settings)
        return features_info(table, inputs.item_features), table
    return inspect_item_features(inputs.item_features, settings), None


@dataclass
class Prepared:
    """Everything the workers need, checked on the driver before training.

    Windows: ``train_rows`` ts < :attr:`train_end` (the validation start, else the
    split), ``val_rows`` ``[validation, split)`` (None without a validation window),
    ``test_rows`` ``[split, test_end)``; each table holds ``user_row``, ``item_row``,
    ``label``."""

    inputs: Inputs
    space: FeatureSpace
    model_config: ModelConfig
    info: FeaturesInfo
    users_fingerprint: str
    train_rows: pa.Table  # user_row, item_row, label
    test_rows: pa.Table
    negatives: dict[str, Any]
    val_rows: pa.Table | None = None
    validation: str | None = None  # start of the validation window
    check_report: contracts.CheckReport | None = None

    @property
    def train_end(self) -> str:
        """The end (exclusive) of the training window: the validation start, else the split."""
        return self.validation or self.inputs.split

    @property
    def modalities(self) -> list[str]:
        return list(self.model_config.vector_names)


def build_model_config(
    space: FeatureSpace, info: FeaturesInfo, overrides: dict[str, Any], variant: str | None
) -> ModelConfig:
    """Sizes from ``space``, vector widths from the features file, then the overrides and
    the ``variant`` (Table-4 or ``dcn_v2_only``). ``overrides["vectors"]`` (optional) names the modalities the
    model reads, each with its width or None for the file's (default: every registered
    modality); a width that disagrees with the file is an error."""
    given = overrides.get("vectors")
    wanted: dict[str, int | None] = dict(given) if given is not None else dict.fromkeys(registry.names())
    rest = {k: v for k, v in overrides.items() if k != "vectors"}
    probe = ModelConfig(**space.model_sizes(), **rest, vectors={m: w or 1 for m, w in wanted.items()})
    probe = model_variant(probe, variant) if variant else probe
    dims = check_dims(info, {m: wanted[m] for m in probe.vector_names})
    widths = {m: dims.get(m) or w or registry.get(m).default_dim for m, w in wanted.items()}
    base = ModelConfig(**space.model_sizes(), **rest, vectors=widths)
    return model_variant(base, variant) if variant else base


def read_checked(
    inputs: Inputs, settings: storage.StorageSettings | None, checks: contracts.Checks | None = None
) -> tuple[pa.Table, pa.Table, pa.Table, contracts.CheckReport]:
    """illustrations, users, interactions, each checked against its contract and across
    (:func:`umair.contracts.check_interactions` under ``checks``), and the report of the
    rules set to ``warn`` that rows broke (print its :meth:`~umair.contracts.CheckReport.lines`)."""
    ill = contracts.read_table(inputs.illustrations, "illustrations", settings)
    users = contracts.read_table(inputs.users, "users", settings)
    inter = contracts.read_table(inputs.interactions, "interactions", settings)
    report = contracts.check_interactions(inter, users, ill, inputs.interactions, checks)
    return ill, users, inter, report


def read_inputs(
    inputs: Inputs, settings: storage.StorageSettings | None, checks: contracts.Checks | None = None
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """:func:`read_checked` without the report (its warnings still go to the ``umair`` logger)."""
    return read_checked(inputs, settings, checks)[:3]


def validation_start(
    inter: pa.Table, split: str, start: str | None, fraction: float | None, source: str = "<interactions>"
) -> str | None:
    """The validation window's start: ``start`` as given, or the (1 - ``fraction``)
    quantile of the training window's ``ts`` (``ts < split``; the latest ``fraction`` of
    its interactions); None when neither is given. The
    training part ``ts < start`` and the window ``[start, split)`` must both hold rows."""
    if start is None and fraction is None:
        return None
    if start is None:
        ts = training_window(inter, split, source).column("ts").cast("int64").to_numpy()
        micros = int(np.quantile(ts, 1.0 - float(fraction or 0.0)))
        start = np.datetime64(micros, "us").astype("datetime64[s]").item().isoformat() + "+00:00"
    start = parse_time(start).isoformat()
    if parse_time(start) >= parse_time(split):
        raise FeatureError(f"{source}: the validation window must start before the split {split}, got {start}")
    training_window(inter, start, source)
    if window(inter, start=start, end=split).num_rows == 0:
        raise FeatureError(f"{source}: no interactions in the validation window [{start}, {split})")
    return start


def train_inputs_of(cfg: TrainConfig, settings: storage.StorageSettings | None) -> Inputs:
    """:func:`resolve_inputs` of a training run's settings."""
    tables = {"illustrations": cfg.illustrations, "users": cfg.users, "interactions": cfg.interactions}
    versions = (cfg.encoder_version, cfg.text_version)
    return resolve_inputs(cfg.world, tables, cfg.item_features, cfg.split, settings, versions)


def prepare(cfg: TrainConfig) -> Prepared:
    """Read and check the inputs, cut the windows (training, validation, test), fit the
    feature space, vector statistics and negatives' item pool on the training part, build
    the model config and the interaction rows. Every :class:`FeatureError` is raised here,
    before training."""
    settings = cfg.storage.to_settings()
    inputs = train_inputs_of(cfg, settings)
    ill, users, inter, report = read_checked(inputs, settings, cfg.checks)
    val_start = validation_start(inter, inputs.split, cfg.validation, cfg.validation_fraction, inputs.interactions)
    train_end = val_start or inputs.split
    train = training_window(inter, train_end, inputs.interactions)
    info, features = inspect_features(inputs, settings)
    if features is not None:
        inputs = inputs.pinned(info)
    check_item_coverage(inter, info.illust_ids, inputs.item_features, inputs.interactions)
    pool = ItemPool.build(ill, info.illust_ids, cfg.negatives, train)
    train, neg_train = with_negatives(train, pool, cfg.negatives, inputs.interactions)
    require_both_labels(train, f"{inputs.interactions}: training window")
    windows = {"test": (inputs.split, cfg.test_end, 1)}
    if val_start is not None:
        windows["validation"] = (val_start, inputs.split, 2)
    cut, negatives = {}, {"train": neg_train}
    for name, (start, end, offset) in windows.items():
        seeded = cfg.negatives.model_copy(update={"seed": cfg.negatives.seed + offset})
        cut[name], negatives[name] = with_negatives(
            window(inter, start=start, end=end), pool, seeded, inputs.interactions
        )
    if val_start is not None:
        require_both_labels(
            cut["validation"], f"{inputs.interactions}: validation window [{val_start}, {inputs.split})"
        )
    space = FeatureSpace.fit(ill, users, train, train_end, cfg.features)
    # b_o starts at the training window's base rate unless the settings say otherwise (ModelConfig.label_prior)
    prior = float(np.mean(train.column("label").to_numpy(zero_copy_only=False)))
    model_config = build_model_config(space, info, {"label_prior": prior, **cfg.model}, cfg.variant)
    user_ids = users.column("user_id").to_numpy()

    def rows(table: pa.Table, name: str) -> pa.Table:
        return attach_rows(
            table, user_ids, info.illust_ids, inputs.item_features, f"{inputs.interactions} ({name} window)"
        )

    prepared = Prepared(
        inputs,
        space,
        model_config,
        info,
        ids_fingerprint(user_ids),
        rows(train, "training"),
        rows(cut["test"], "test"),
        negatives,
        rows(cut["validation"], "validation") if val_start is not None else None,
        val_start,
        report,
    )
    if cfg.features.standardize and prepared.modalities:
        train_items = info.illust_ids[np.unique(prepared.train_rows.column("item_row").to_numpy())]
        if features is not None:
            stats = vector_stats_of(features, train_items, prepared.modalities, inputs.item_features)
        else:
            stats = fit_vector_stats(inputs.item_features, train_items, prepared.modalities, settings)
        prepared.space = space.with_vector_stats(stats)
    return prepared


def check_encoders(info: FeaturesInfo, saved: SavedModel) -> None:
    """The features must come from the encoders the model was trained on."""
    trained = saved.meta.get("encoder_versions", {})
    now = info.encoder_versions()
    differ = {k: (v, now[k]) for k, v in trained.items() if k in now and now[k] != v}
    if differ:
        k, (old, new) = next(iter(differ.items()))
        raise FeatureError(f"{info.uri}: {k} is {new!r}, but the model was trained on features from {old!r}")


EVAL_INPUT_KEYS = ("world", "illustrations", "users", "interactions", "item_features", "split", "segments")


def eval_inputs_of(
    settings_obj: Any, saved: SavedModel, settings: storage.StorageSettings | None
) -> tuple[Inputs, str | None]:
    """:func:`resolve_eval_inputs` from a job's settings holding any of :data:`EVAL_INPUT_KEYS`
    (``umair evaluate``, ``recommend``, ``explain``)."""
    return resolve_eval_inputs(saved, settings, **{k: getattr(settings_obj, k, None) for k in EVAL_INPUT_KEYS})


def resolve_eval_inputs(
    saved: SavedModel,
    settings: storage.StorageSettings | None,
    *,
    world: str | None = None,
    illustrations: str | None = None,
    users: str | None = None,
    interactions: str | None = None,
    item_features: str | None = None,
    split: str | None = None,
    segments: str | None = None,
) -> tuple[Inputs, str | None]:
    """Tables (explicit > world > the model's training data; the feature set the model
    was trained on), the test-window start and the segments table."""
    trained = saved.meta["data"]
    uris = {}
    for k in ("illustrations", "users", "interactions"):
        given = {"illustrations": illustrations, "users": users, "interactions": interactions}[k]
        uris[k] = given or (storage.join(world, f"{k}.parquet") if world else trained[k])
    split_at = parse_time(split or saved.meta["split"])
    if split_at < parse_time(saved.meta["split"]):
        raise FeatureError(
            f"the test window must start at or after the model's training split {saved.meta['split']}, got {split_at.isoformat()}"
        )
    if segments is None and world:
        candidate = storage.join(world, "truth", "users.parquet")
        segments = candidate if storage.exists(candidate, settings) else None
    return Inputs(
        absolute(uris["illustrations"]),
        absolute(uris["users"]),
        absolute(uris["interactions"]),
        absolute(item_features or trained["item_features"]),
        split_at.isoformat(),
        trained.get("encoder_version"),
        trained.get("text_version"),
    ), segments
