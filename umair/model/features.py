"""The fusion model's inputs: fitted feature space, lookup tables, windows, negatives.

Paper symbols (section 2.1): a user ``u = (u^IL, u^O)`` (interest labels, profile), an
illustration ``i = (i^IMG, i^L, i^O)`` (image, artist tags, other metadata). The model
(:class:`umair.model.fusion.UmairFPS`) sees

- ``v_user`` from the user id, the interest tags ``u^IL`` and the profile fields ``u^O``;
- ``F_emb(i^O)`` from the bucketised ``created_at``, ``width``, ``height``,
  ``page_count``, optionally the illustration id, and categorical extras (``artist``...);
- ``e_SEM``, ``e_STY``, ``e_TSEM`` from the item-features table (the extraction output).

What lives here (no Ray):

- :class:`FeatureSpace`: every vocabulary and bucketing, fitted on the training window
  only (ids, tags and artists first seen later encode as 0, the OOV slot; times after the
  window land in the last bucket), saved as JSON beside the model.
- :class:`UserTable` / :class:`ItemTable`: users and items encoded once into int arrays
  (and, for items, the float vectors), indexed by row. Interactions carry ``user_row``
  and ``item_row`` (int64) into them; float vectors are never joined into interaction
  rows. A training worker loads both tables once and gathers rows per batch.
- Windows: ``[.., split)`` trains, ``[split, end)`` tests.
- Negative sampling for logs that hold positives only (:class:`NegativeSettings`).
- :class:`FeatureError`: the inputs cannot be used, raised before any training starts
  (empty training window, item features missing for referenced illustrations, a vector
  dimension that disagrees with the model config).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from umair import contracts, storage
from umair.config import Settings
from umair.model.vocab import Buckets, Vocabulary
from umair.errors import UmairError

MODALITIES: tuple[str, ...] = ("sem", "sty", "tsem")
ITEM_NUMERIC: tuple[str, ...] = ("created_at", "width", "height", "page_count")
ITEM_RESERVED = ("illust_id", "image_uri", "tags", *ITEM_NUMERIC)
USER_RESERVED = ("user_id", "interest_tags")
FORMAT = "umair-feature-space/1"

Encoder = Vocabulary | Buckets


class FeatureError(UmairError, ValueError):
    """The inputs cannot train or score the model; raised before any training starts."""


class FeatureSettings(Settings):
    """How fields become embedding indices (all fitted on the training window)."""

    buckets: int = Field(10, ge=1, description="quantile buckets for created_at, width, height, page_count and float extras")
    min_count: int = Field(1, ge=1, description="a categorical value (id, tag, artist...) seen fewer times is OOV (index 0)")
    max_user_tags: int = Field(16, ge=1, description="T: interest tags kept per user (the first T known ones)")
    item_id: bool = Field(True, description="embed the illustration id itself as an item field")
    item_categoricals: tuple[str, ...] | None = Field(
        None, description="extra illustration columns to embed; None = every extra non-list column (e.g. artist)"
    )
    user_profile: tuple[str, ...] | None = Field(
        None, description="profile columns u^O to embed; None = every extra non-list column of users"
    )
    standardize: bool = Field(
        True, description="z-score e_SEM / e_STY / e_TSEM per dimension with statistics of the training window's items"
    )


class NegativeSettings(Settings):
    """Negative sampling for a log without explicit non-bookmarks (label 0).

    mode: ``auto`` samples only when the window holds positives only; ``always`` adds
        sampled negatives to whatever the log holds; ``never`` uses the log as it is.
    ratio: negatives drawn per positive.
    strategy: ``uniform`` over the illustrations published by the positive's time, or
        ``popularity``: probability ∝ (training bookmarks + 1) ** popularity_power.
    A drawn illustration the user bookmarked in the same window is redrawn (up to 10
    rounds; what still collides is dropped and counted).
    """

    mode: Literal["auto", "always", "never"] = "auto"
    ratio: int = Field(4, ge=1)
    strategy: Literal["uniform", "popularity"] = "uniform"
    popularity_power: float = Field(0.75, ge=0.0)
    seed: int = 0


# --------------------------------------------------------------------------- windows


def parse_time(value: str | datetime) -> datetime:
    """A date or datetime (ISO string or object) as an aware UTC datetime."""
    t = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _micros(when: datetime) -> int:
    return (when - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)


def window(interactions: pa.Table, start: str | datetime | None = None, end: str | datetime | None = None) -> pa.Table:
    """Rows with ``start <= ts < end`` (either bound optional)."""
    ts = interactions.column("ts").cast(pa.int64()).to_numpy()
    mask = np.ones(len(ts), dtype=bool)
    if start is not None:
        mask &= ts >= _micros(parse_time(start))
    if end is not None:
        mask &= ts < _micros(parse_time(end))
    return interactions.filter(pa.array(mask))


def training_window(interactions: pa.Table, split: str | datetime, source: str = "<interactions>") -> pa.Table:
    """The interactions before ``split``; :class:`FeatureError` when there are none."""
    train = window(interactions, end=split)
    if train.num_rows == 0:
        when = parse_time(split).isoformat()
        if interactions.num_rows == 0:
            raise FeatureError(f"{source}: the training window (ts < {when}) is empty: the table holds no interactions")
        first, last = pc.min(interactions.column("ts")).as_py(), pc.max(interactions.column("ts")).as_py()
        raise FeatureError(
            f"{source}: the training window (ts < {when}) is empty: the {interactions.num_rows} interactions run from "
            f"{first.isoformat()} to {last.isoformat()}; set the split after {first.isoformat()}"
        )
    return train


# --------------------------------------------------------------------------- the feature space


def _encoder_from_dict(data: Mapping[str, Any]) -> Encoder:
    kind = data.get("kind")
    if kind == "vocabulary":
        return Vocabulary.from_dict(dict(data))
    if kind == "buckets":
        return Buckets.from_dict(dict(data))
    raise ValueError(f"unknown field encoder kind {kind!r}; expected 'vocabulary' or 'buckets'")


def _fit_field(values: pa.ChunkedArray | pa.Array, settings: FeatureSettings) -> Encoder:
    """Buckets for numbers and times, a vocabulary for everything else."""
    t = values.type
    if pa.types.is_floating(t) or pa.types.is_timestamp(t) or pa.types.is_date(t):
        return Buckets.fit(values, settings.buckets)
    return Vocabulary.fit(values, settings.min_count)


def _extra_columns(table: pa.Table, reserved: Sequence[str], chosen: Sequence[str] | None, what: str) -> list[str]:
    """The extra columns to embed: ``chosen`` (checked to exist) or every non-list extra."""
    if chosen is not None:
        missing = [c for c in chosen if c not in table.column_names]
        if missing:
            raise FeatureError(f"{what}: configured column(s) {missing} not found (columns: {', '.join(table.column_names)})")
        return list(chosen)
    return [
        c
        for c in table.column_names
        if c not in reserved and not pa.types.is_list(table.schema.field(c).type) and not pa.types.is_large_list(table.schema.field(c).type)
    ]


def _take_by_id(table: pa.Table, id_column: str, ids: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """Rows of ``table`` whose ``id_column`` is in ``ids`` (in ``ids`` order), and the
    mask of ``ids`` found."""
    rows = _rows_of(table.column(id_column).to_numpy(), ids)
    found = rows >= 0
    return table.take(pa.array(rows[found], pa.int64())), found


@dataclass(frozen=True, eq=False)
class UserTable:
    """Users encoded once; row ``r`` is ``user_ids[r]`` (the users table's order).

    ``uid`` [N] (user-id index), ``tags`` [N, T] (u^IL indices, 0-padded), ``fields``
    [N, P] (u^O indices in :attr:`FeatureSpace.user_fields` order).
    """

    user_ids: np.ndarray
    uid: np.ndarray
    tags: np.ndarray
    fields: np.ndarray

    def rows(self, user_ids: np.ndarray) -> np.ndarray:
        """Row of each id; -1 where the id is not in the table."""
        return _rows_of(self.user_ids, user_ids)


@dataclass(frozen=True, eq=False)
class ItemTable:
    """Items in the item-features table's row order: ``item_row`` indexes every array.

    ``fields`` [R, M]: F_emb(i^O) indices in :attr:`FeatureSpace.item_fields` order (0 for
    an item the illustrations table does not describe); ``vectors``: ``sem`` / ``sty`` /
    ``tsem`` arrays [R, d] as stored (float16 or float32); ``metadata``: the file's
    ``umair.*`` metadata (dims, encoder versions).
    """

    illust_ids: np.ndarray
    fields: np.ndarray
    vectors: dict[str, np.ndarray]
    metadata: dict[str, str]

    def rows(self, illust_ids: np.ndarray) -> np.ndarray:
        """Row of each id; -1 where the id has no item features."""
        return _rows_of(self.illust_ids, illust_ids)


def _rows_of(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if len(keys) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    pos = np.minimum(np.searchsorted(keys[order], ids), len(keys) - 1)
    hit = keys[order][pos] == ids
    return np.where(hit, order[pos], -1).astype(np.int64)


@dataclass(frozen=True, eq=False)
class VectorStats:
    """Per-dimension mean and standard deviation of one modality's vectors (training items)."""

    mean: np.ndarray
    std: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` as float32 (a constant dimension keeps std 1)."""
        return ((x.astype(np.float32) - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[float]]) -> VectorStats:
        return cls(np.asarray(data["mean"], np.float32), np.asarray(data["std"], np.float32))


@dataclass(frozen=True, eq=False)
class FeatureSpace:
    """Every fitted vocabulary / bucketing of the model's id and metadata inputs.

    Fitted by :meth:`fit` on the training window only; saved as JSON with the model
    (:meth:`to_dict` / :meth:`from_dict`, :meth:`save` / :meth:`load`). Index 0 of every
    field is the OOV / missing slot. Field order here is the column order of
    ``user_fields`` / ``item_fields`` tensors and of :class:`ModelConfig`'s dicts.
    """

    settings: FeatureSettings
    split: str
    user_id: Vocabulary
    user_tags: Vocabulary
    user_fields: dict[str, Encoder]
    item_fields: dict[str, Encoder]
    fitted_on: dict[str, int] = field(default_factory=dict)
    vector_stats: dict[str, VectorStats] = field(default_factory=dict)

    # ---- fitting

    @classmethod
    def fit(
        cls,
        illustrations: pa.Table,
        users: pa.Table,
        train_interactions: pa.Table,
        split: str | datetime,
        settings: FeatureSettings | None = None,
    ) -> FeatureSpace:
        """Fit on the users and illustrations that occur in ``train_interactions`` only
        (pass :func:`training_window`'s result): the later window never shapes a table."""
        settings = settings or FeatureSettings()
        if train_interactions.num_rows == 0:
            raise FeatureError("cannot fit a feature space on an empty training window")
        late = window(train_interactions, start=split)
        if late.num_rows:
            raise FeatureError(f"train_interactions holds {late.num_rows} rows at or after the split {parse_time(split).isoformat()}")
        uid_col = train_interactions.column("user_id")
        item_col = train_interactions.column("illust_id")
        train_users, _ = _take_by_id(users, "user_id", pc.unique(uid_col).to_numpy())
        train_items, _ = _take_by_id(illustrations, "illust_id", pc.unique(item_col).to_numpy())

        user_fields = {
            c: _fit_field(train_users.column(c), settings)
            for c in _extra_columns(users, USER_RESERVED, settings.user_profile, "users")
        }
        item_fields: dict[str, Encoder] = {c: Buckets.fit(train_items.column(c), settings.buckets) for c in ITEM_NUMERIC}
        if settings.item_id:
            item_fields["illust_id"] = Vocabulary.fit(item_col, settings.min_count)
        for c in _extra_columns(illustrations, ITEM_RESERVED, settings.item_categoricals, "illustrations"):
            item_fields[c] = _fit_field(train_items.column(c), settings)
        return cls(
            settings=settings,
            split=parse_time(split).isoformat(),
            user_id=Vocabulary.fit(uid_col, settings.min_count),
            user_tags=Vocabulary.fit(pc.list_flatten(train_users.column("interest_tags")), settings.min_count),
            user_fields=user_fields,
            item_fields=item_fields,
            fitted_on={
                "interactions": train_interactions.num_rows,
                "users": train_users.num_rows,
                "illustrations": train_items.num_rows,
            },
        )

    # ---- sizes for ModelConfig

    def user_field_sizes(self) -> dict[str, int]:
        return {name: len(enc) for name, enc in self.user_fields.items()}

    def item_field_sizes(self) -> dict[str, int]:
        return {name: len(enc) for name, enc in self.item_fields.items()}

    def model_sizes(self) -> dict[str, Any]:
        """The :class:`ModelConfig` fields this space decides."""
        return {
            "n_users": len(self.user_id),
            "n_tags": len(self.user_tags),
            "user_fields": self.user_field_sizes(),
            "item_fields": self.item_field_sizes(),
        }

    # ---- encoding

    def encode_users(self, users: pa.Table) -> UserTable:
        """Encode a users table (contract ``users``); unknown ids / values -> 0."""
        fields = [self.user_fields[c].encode(users.column(c)) if c in users.column_names else np.zeros(users.num_rows, np.int64)
                  for c in self.user_fields]
        return UserTable(
            user_ids=users.column("user_id").to_numpy().astype(np.int64),
            uid=self.user_id.encode(users.column("user_id")),
            tags=self.user_tags.encode_padded(users.column("interest_tags").to_pylist(), self.settings.max_user_tags),
            fields=np.stack(fields, axis=1) if fields else np.zeros((users.num_rows, 0), np.int64),
        )

    def encode_items(self, illustrations: pa.Table, illust_ids: np.ndarray) -> np.ndarray:
        """F_emb(i^O) indices [len(illust_ids), M] for the given ids, in their order.

        An id the illustrations table does not hold gets 0 everywhere except its own id
        field (when ``item_id`` is on)."""
        illust_ids = np.asarray(illust_ids, dtype=np.int64)
        rows, found = _take_by_id(illustrations, "illust_id", illust_ids)
        out = np.zeros((len(illust_ids), len(self.item_fields)), dtype=np.int64)
        for j, (name, enc) in enumerate(self.item_fields.items()):
            if name == "illust_id":
                out[:, j] = enc.encode(illust_ids)
            elif name in rows.column_names:
                out[found, j] = enc.encode(rows.column(name))
        return out

    # ---- persistence

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "split": self.split,
            "settings": self.settings.model_dump(mode="json"),
            "user_id": self.user_id.to_dict(),
            "user_tags": self.user_tags.to_dict(),
            "user_fields": {k: v.to_dict() for k, v in self.user_fields.items()},
            "item_fields": {k: v.to_dict() for k, v in self.item_fields.items()},
            "fitted_on": dict(self.fitted_on),
            "vector_stats": {k: v.to_dict() for k, v in self.vector_stats.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpace:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a feature space: format={data.get('format')!r}, expected {FORMAT!r}")
        return cls(
            settings=FeatureSettings(**data["settings"]),
            split=data["split"],
            user_id=Vocabulary.from_dict(data["user_id"]),
            user_tags=Vocabulary.from_dict(data["user_tags"]),
            user_fields={k: _encoder_from_dict(v) for k, v in data["user_fields"].items()},
            item_fields={k: _encoder_from_dict(v) for k, v in data["item_fields"].items()},
            fitted_on=dict(data.get("fitted_on", {})),
            vector_stats={k: VectorStats.from_dict(v) for k, v in data.get("vector_stats", {}).items()},
        )

    def with_vector_stats(self, stats: Mapping[str, VectorStats]) -> FeatureSpace:
        """A copy that standardises the given modalities (see :func:`fit_vector_stats`)."""
        return replace(self, vector_stats=dict(stats))

    def save(self, uri: str, settings: storage.StorageSettings | None = None) -> None:
        storage.write_bytes(uri, json.dumps(self.to_dict(), ensure_ascii=False).encode(), settings)

    @classmethod
    def load(cls, uri: str, settings: storage.StorageSettings | None = None) -> FeatureSpace:
        return cls.from_dict(json.loads(storage.read_bytes(uri, settings)))


# --------------------------------------------------------------------------- item features


@dataclass(frozen=True)
class FeaturesInfo:
    """What the driver needs of an item-features table without reading its vectors."""

    uri: str
    illust_ids: np.ndarray  # row order of the file(s): item_row r <-> illust_ids[r]
    dims: dict[str, int]  # modality -> vector width, for the modalities present
    metadata: dict[str, str]  # the umair.* file metadata

    @property
    def fingerprint(self) -> str:
        """Changes when the rows or their order change."""
        return ids_fingerprint(self.illust_ids)

    def encoder_versions(self) -> dict[str, str]:
        """``umair.<name>.encoder`` / ``*.version`` metadata entries, keyed without the prefix."""
        return {k[len("umair."):]: v for k, v in self.metadata.items() if k.endswith((".encoder", ".version", "encoder_version"))}


def ids_fingerprint(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def _umair_metadata(schema: pa.Schema) -> dict[str, str]:
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    return {k: v for k, v in meta.items() if k.startswith("umair.")}


def _schema_of(uri: str, settings: storage.StorageSettings | None) -> pa.Schema:
    import pyarrow.dataset as pads

    fs, path = storage.resolve(uri, settings)
    with storage.storage_errors(uri, "read", settings):
        return pads.dataset(path, filesystem=fs, format="parquet").schema


def features_info(table: pa.Table, uri: str) -> FeaturesInfo:
    """:class:`FeaturesInfo` of an item-features table already in memory (validated here)."""
    table = contracts.validate(table, "item_features", uri)
    dims = {m: table.schema.field(m).type.list_size for m in MODALITIES if m in table.column_names}
    return FeaturesInfo(uri, table.column("illust_id").to_numpy().astype(np.int64), dims, _umair_metadata(table.schema))


def inspect_item_features(uri: str, settings: storage.StorageSettings | None = None) -> FeaturesInfo:
    """Check an item-features table's contract (ids, vector types, dims vs metadata)
    reading only its ``illust_id`` column and schema."""
    schema = _schema_of(uri, settings)
    contracts.validate(schema.empty_table(), "item_features", uri)  # vector types, dims vs metadata
    ids = contracts.validate(storage.read_parquet(uri, settings, columns=["illust_id"]), "item_features", uri)
    dims = {m: schema.field(m).type.list_size for m in MODALITIES if m in schema.names}
    return FeaturesInfo(uri, ids.column("illust_id").to_numpy().astype(np.int64), dims, _umair_metadata(schema))


def check_dims(info: FeaturesInfo, wanted: Mapping[str, int | None]) -> dict[str, int]:
    """The width of each wanted modality (``wanted[m]``: the width the model config sets,
    or None to take the file's). Raises :class:`FeatureError` for a missing column or a
    width that disagrees with the config."""
    dims: dict[str, int] = {}
    for m, want in wanted.items():
        if m not in info.dims:
            raise FeatureError(
                f"{info.uri}: no column '{m}' in the item features (columns: {', '.join(info.dims) or 'none'}), "
                f"but the model uses e_{m.upper()}; extract it or switch it off (model.use_{m}: false)"
            )
        have = info.dims[m]
        if want is not None and want != have:
            declared = info.metadata.get(f"umair.{m}.dim")
            source = f"file metadata umair.{m}.dim={declared}" if declared is not None else "the column type"
            raise FeatureError(
                f"{info.uri}: column '{m}' holds {have}-d vectors ({source}), but the model config sets d_{m}={want}"
            )
        dims[m] = have
    return dims


def build_item_table(
    features: pa.Table,
    illustrations: pa.Table,
    space: FeatureSpace,
    modalities: Sequence[str],
    expected_fingerprint: str | None = None,
    source: str = "<item_features>",
) -> ItemTable:
    """Align a validated item-features table (contract ``item_features``) to item rows:
    its own row order. ``expected_fingerprint`` (from :class:`FeaturesInfo`) guards
    against the file changing between the driver's check and a worker's load."""
    ids = features.column("illust_id").to_numpy().astype(np.int64)
    if expected_fingerprint is not None and ids_fingerprint(ids) != expected_fingerprint:
        raise FeatureError(f"{source}: the item features changed since this run was prepared (rows or their order differ)")
    vectors: dict[str, np.ndarray] = {}
    for m in modalities:
        col = features.column(m).combine_chunks()
        d = col.type.list_size
        x = col.flatten().to_numpy(zero_copy_only=False).reshape(len(ids), d)
        stats = space.vector_stats.get(m)
        if stats is not None and len(stats.mean) != d:
            raise FeatureError(f"{source}: column '{m}' holds {d}-d vectors, but the feature space was fitted on {len(stats.mean)}-d ones")
        vectors[m] = stats.apply(x) if stats is not None else x
    return ItemTable(ids, space.encode_items(illustrations, ids), vectors, _umair_metadata(features.schema))


def _stats_of_batches(batches: Iterable[pa.RecordBatch], modalities: Sequence[str], source: str, n_wanted: int) -> dict[str, VectorStats]:
    """Per-dimension mean / std of each modality over the rows of ``batches`` (float64 sums)."""
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    n = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        n += batch.num_rows
        for m in modalities:
            col = batch.column(m)
            x = col.flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, col.type.list_size).astype(np.float64)
            sums[m] = sums.get(m, 0.0) + x.sum(axis=0)
            squares[m] = squares.get(m, 0.0) + (x * x).sum(axis=0)
    if n == 0:
        raise FeatureError(f"{source}: none of the {n_wanted} training-window illustrations has item features")
    stats = {}
    for m in modalities:
        mean = sums[m] / n
        std = np.sqrt(np.maximum(squares[m] / n - mean * mean, 0.0))
        std = np.where(std > 1e-6 * max(float(np.abs(mean).max()), 1.0), std, 1.0)
        stats[m] = VectorStats(mean.astype(np.float32), std.astype(np.float32))
    return stats


def fit_vector_stats(
    uri: str,
    item_ids: np.ndarray,
    modalities: Sequence[str],
    settings: storage.StorageSettings | None = None,
    batch_rows: int = 8192,
) -> dict[str, VectorStats]:
    """Mean / std per dimension of each modality over the items ``item_ids`` (the
    training window's), streaming a parquet file or directory in batches (bounded memory)."""
    import pyarrow.dataset as pads

    if not modalities:
        return {}
    fs, path = storage.resolve(uri, settings)
    wanted = pa.array(np.unique(np.asarray(item_ids, np.int64)), pa.int64())
    with storage.storage_errors(uri, "read", settings):
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        scanner = dataset.scanner(columns=list(modalities), filter=pads.field("illust_id").isin(wanted), batch_size=batch_rows)
        return _stats_of_batches(scanner.to_batches(), modalities, uri, len(wanted))


def vector_stats_of(table: pa.Table, item_ids: np.ndarray, modalities: Sequence[str], source: str = "<item_features>") -> dict[str, VectorStats]:
    """:func:`fit_vector_stats` for a table already in memory."""
    if not modalities:
        return {}
    wanted = pa.array(np.unique(np.asarray(item_ids, np.int64)), pa.int64())
    rows = table.filter(pc.is_in(table.column("illust_id"), value_set=wanted)).select(list(modalities))
    return _stats_of_batches(rows.to_batches(), modalities, source, len(wanted))


def check_item_coverage(interactions: pa.Table, item_ids: np.ndarray, features_uri: str, source: str = "<interactions>") -> None:
    """:class:`FeatureError` when interactions reference illustrations without item
    features, naming how many (and how many interactions) with the first one as example."""
    ids = interactions.column("illust_id").to_numpy()
    missing = _rows_of(np.asarray(item_ids, np.int64), ids) < 0
    if missing.any():
        raise FeatureError(
            f"{features_uri}: {len(np.unique(ids[missing]))} illustration(s) referenced by {int(missing.sum())} interaction(s) "
            f"in {source} have no item features (e.g. illust_id {int(ids[missing][0])}); run the extraction over them first"
        )


def attach_rows(
    interactions: pa.Table,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    features_uri: str,
    source: str = "<interactions>",
) -> pa.Table:
    """``user_row``, ``item_row`` (int64 rows of the user / item tables) and ``label``
    (float32) for each interaction. Every referenced illustration must have item
    features: otherwise :class:`FeatureError` says how many are missing, with an example."""
    check_item_coverage(interactions, item_ids, features_uri, source)
    item_rows = _rows_of(np.asarray(item_ids, np.int64), interactions.column("illust_id").to_numpy())
    user_rows = _rows_of(np.asarray(user_ids, np.int64), interactions.column("user_id").to_numpy())
    if (user_rows < 0).any():
        bad = interactions.column("user_id").to_numpy()[user_rows < 0]
        raise FeatureError(f"{source}: {len(np.unique(bad))} user(s) are not in the users table (e.g. user_id {int(bad[0])})")
    return pa.table({
        "user_row": pa.array(user_rows, pa.int64()),
        "item_row": pa.array(item_rows, pa.int64()),
        "label": pa.array(interactions.column("label").to_numpy().astype(np.float32), pa.float32()),
    })


# --------------------------------------------------------------------------- negatives


@dataclass(frozen=True)
class ItemPool:
    """Illustrations negatives may be drawn from, sorted by publication time."""

    illust_ids: np.ndarray  # sorted by created_us
    created_us: np.ndarray  # int64 microseconds since the epoch (UTC)
    weights: np.ndarray  # sampling weight of each (uniform: ones)

    @classmethod
    def build(
        cls,
        illustrations: pa.Table,
        candidate_ids: np.ndarray,
        settings: NegativeSettings,
        train_positives: pa.Table | None = None,
    ) -> ItemPool:
        """Candidates = ``candidate_ids`` (e.g. items with features) described by
        ``illustrations``; popularity = bookmarks in ``train_positives``."""
        rows, _ = _take_by_id(illustrations, "illust_id", np.asarray(candidate_ids, np.int64))
        ids = rows.column("illust_id").to_numpy().astype(np.int64)
        created = rows.column("created_at").cast(pa.int64()).to_numpy()
        order = np.argsort(created, kind="stable")
        ids, created = ids[order], created[order]
        weights = np.ones(len(ids))
        if settings.strategy == "popularity":
            counts = np.zeros(len(ids))
            if train_positives is not None and train_positives.num_rows:
                pos = train_positives.filter(pc.equal(train_positives.column("label"), 1))
                r = _rows_of(ids, pos.column("illust_id").to_numpy())
                np.add.at(counts, r[r >= 0], 1.0)
            weights = (counts + 1.0) ** settings.popularity_power
        return cls(ids, created, weights)


def sample_negatives(positives: pa.Table, pool: ItemPool, settings: NegativeSettings) -> tuple[pa.Table, dict[str, Any]]:
    """``settings.ratio`` negatives (label 0, same user and ts) per positive of
    ``positives``, drawn from the pool's items published at or before that ts."""
    rng = np.random.default_rng(settings.seed)
    pos = positives.filter(pc.equal(positives.column("label"), 1))
    users = np.repeat(pos.column("user_id").to_numpy(), settings.ratio)
    ts = np.repeat(pos.column("ts").cast(pa.int64()).to_numpy(), settings.ratio)
    n_avail = np.searchsorted(pool.created_us, ts, side="right")
    cum = np.cumsum(pool.weights)
    liked = set(zip(pos.column("user_id").to_numpy().tolist(), pos.column("illust_id").to_numpy().tolist()))
    pick = np.full(len(users), -1, dtype=np.int64)
    todo = np.flatnonzero(n_avail > 0)
    no_pool = int((n_avail == 0).sum())
    for _ in range(10):
        if len(todo) == 0:
            break
        tops = cum[n_avail[todo] - 1]
        draw = np.searchsorted(cum, rng.random(len(todo)) * tops, side="right")
        draw = np.minimum(draw, n_avail[todo] - 1)
        pick[todo] = draw
        clash = np.array([(u, i) in liked for u, i in zip(users[todo].tolist(), pool.illust_ids[draw].tolist())], dtype=bool)
        todo = todo[clash]
    pick[todo] = -1
    keep = pick >= 0
    negatives = pa.table({
        "user_id": pa.array(users[keep], pa.int64()),
        "illust_id": pa.array(pool.illust_ids[pick[keep]], pa.int64()),
        "ts": pa.array(ts[keep], pa.int64()).cast(contracts.TIMESTAMP),
        "label": pa.array(np.zeros(int(keep.sum()), np.int8), pa.int8()),
    })
    record = {
        "strategy": settings.strategy,
        "ratio": settings.ratio,
        "seed": settings.seed,
        "popularity_power": settings.popularity_power if settings.strategy == "popularity" else None,
        "positives": pos.num_rows,
        "negatives": negatives.num_rows,
        "dropped_collisions": len(todo),
        "dropped_no_candidate": no_pool,
    }
    return negatives, record


def with_negatives(
    interactions: pa.Table, pool: ItemPool, settings: NegativeSettings, source: str = "<interactions>"
) -> tuple[pa.Table, dict[str, Any]]:
    """Apply ``settings.mode`` to a window of interactions; returns the rows to use
    (original columns user_id, illust_id, ts, label) and the record of what was done."""
    labels = interactions.column("label").to_numpy()
    positives_only = interactions.num_rows > 0 and bool((labels == 1).all())
    sample = settings.mode == "always" or (settings.mode == "auto" and positives_only)
    if not sample:
        record: dict[str, Any] = {"applied": False, "mode": settings.mode, "positives": int((labels == 1).sum()),
                                  "negatives": int((labels == 0).sum())}
        return interactions, record
    negatives, record = sample_negatives(interactions, pool, settings)
    record = {"applied": True, "mode": settings.mode, "reason": "log holds positives only" if positives_only else "mode=always",
              **record}
    base = interactions.select(["user_id", "illust_id", "ts", "label"])
    return pa.concat_tables([base, negatives.cast(base.schema)]), record


def require_both_labels(rows: pa.Table, what: str) -> None:
    """:class:`FeatureError` unless ``rows['label']`` holds both 0 and 1."""
    labels = rows.column("label").to_numpy()
    if rows.num_rows and (labels == labels[0]).all():
        only = "positive" if labels[0] == 1 else "negative"
        raise FeatureError(
            f"{what}: every label is {only} ({rows.num_rows} rows); a click model needs both classes "
            f"(negative sampling: negatives.mode 'auto' or 'always')"
        )
