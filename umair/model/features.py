"""The fusion model's inputs: the fitted feature space and the user / item lookup tables.

Paper symbols (section 2.1): a user ``u = (u^IL, u^O)`` (interest labels, profile), an
illustration ``i = (i^IMG, i^L, i^O)`` (image, artist tags, other metadata). The model
(:class:`umair.model.fusion.UmairFPS`) sees

- ``v_user`` from the user id, the interest tags ``u^IL`` (all padding when the users
  table has no ``interest_tags``) and the profile fields ``u^O``;
- ``F_emb(i^O)`` from the bucketised ``created_at``, ``width``, ``height``,
  ``page_count`` (each only when the illustrations table has it: they are optional
  columns of the contract), optionally the illustration id, and categorical extras
  (``artist``...);
- ``e_SEM``, ``e_STY``, ``e_TSEM`` from the item-features table (the extraction output).

What lives here (no Ray):

- :class:`FeatureSpace`: every vocabulary and bucketing, fitted on the training window
  only (ids, tags and artists first seen later encode as 0, the OOV slot; times after the
  window land in the last bucket), saved as JSON beside the model.
- :class:`UserTable` / :class:`ItemTable`: users and items encoded once into int arrays
  (and, for items, the float vectors), indexed by row. Interactions carry ``user_row``
  and ``item_row`` (int64) into them; float vectors are never joined into interaction
  rows. A training worker loads both tables once and gathers rows per batch.
Windows and negative sampling: :mod:`umair.model.interactions`; the item-features table
(widths, standardisation, rows): :mod:`umair.model.item_features`; bad inputs raise
:class:`umair.errors.FeatureError` before any training starts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from umair import storage
from umair.config import Settings
from umair.errors import FeatureError
from umair.model.interactions import parse_time, rows_of, take_by_id, window
from umair.model.settings import ITEM_ID_FIELD
from umair.model.vocab import Buckets, Vocabulary

ITEM_NUMERIC: tuple[str, ...] = ("created_at", "width", "height", "page_count")
ITEM_RESERVED = ("illust_id", "image_uri", "tags", *ITEM_NUMERIC)
USER_RESERVED = ("user_id", "interest_tags")
FORMAT = "umair-feature-space/1"

Encoder = Vocabulary | Buckets


class FeatureSettings(Settings):
    """How fields become embedding indices (all fitted on the training window)."""

    buckets: int = Field(
        10, ge=1, description="quantile buckets for created_at, width, height, page_count and float extras"
    )
    min_count: int = Field(
        1, ge=1, description="a categorical value (id, tag, artist...) seen fewer times is OOV (index 0)"
    )
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
    item_bags: tuple[str, ...] | None = Field(
        None,
        description="list<string> illustration columns (genres, cast, keywords) embedded as bags of ids, each one "
        "mean-pooled k-wide field of F_emb(i^O); None = every extra list<string> column but tags, [] = none",
    )
    user_bags: tuple[str, ...] | None = Field(
        None,
        description="list<string> users columns embedded as bags (one mean-pooled field of u^O each); "
        "None = every extra list<string> column but interest_tags, [] = none",
    )
    max_bag: int = Field(16, ge=1, description="L: ids kept per bag (the first L known ones, in list order)")


# --------------------------------------------------------------------------- windows


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
            raise FeatureError(
                f"{what}: configured column(s) {missing} not found (columns: {', '.join(table.column_names)})"
            )
        return list(chosen)
    return [
        c
        for c in table.column_names
        if c not in reserved
        and not pa.types.is_list(table.schema.field(c).type)
        and not pa.types.is_large_list(table.schema.field(c).type)
    ]


def _is_string_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
        pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)
    )


def _bag_columns(table: pa.Table, reserved: str, chosen: Sequence[str] | None, key: str, what: str) -> list[str]:
    """The list<string> columns to embed as bags: ``chosen`` (each checked to exist and be
    list<string>) or every list<string> column but ``reserved``."""
    if chosen is None:
        return [c for c in table.column_names if c != reserved and _is_string_list(table.schema.field(c).type)]
    for c in chosen:
        if c not in table.column_names:
            raise FeatureError(
                f"features.{key}: column {c!r} not found in {what} (columns: {', '.join(table.column_names)})"
            )
        t = table.schema.field(c).type
        if not _is_string_list(t):
            raise FeatureError(f"features.{key}: column {c!r} of {what} is {t}, expected list<string>")
    return list(chosen)


def _fit_bags(table: pa.Table, columns: Sequence[str], settings: FeatureSettings) -> dict[str, Vocabulary]:
    """A vocabulary per bag column over every value of its lists (``min_count`` applies)."""
    return {c: Vocabulary.fit(pc.list_flatten(table.column(c)).combine_chunks(), settings.min_count) for c in columns}


def _encode_bags(
    bags: Mapping[str, Vocabulary], table: pa.Table, n: int, max_bag: int, rows: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Each bag column of ``table`` as [n, max_bag] ids, 0-padded (unknown values dropped);
    ``rows``: the output rows ``table``'s rows fill (the rest stay padding). A column the
    table lacks is all padding."""
    out = {}
    for c, vocab in bags.items():
        got = np.zeros((n, max_bag), np.int64)
        if c in table.column_names:
            enc = vocab.encode_padded(table.column(c).to_pylist(), max_bag)
            if rows is None:
                got[:] = enc
            else:
                got[rows] = enc
        out[c] = got
    return out


def _interest_tags(users: pa.Table) -> pa.Array:
    """Every interest tag u^IL of ``users`` (flattened); empty when the column is absent."""
    if "interest_tags" not in users.column_names:
        return pa.array([], pa.string())
    return pc.list_flatten(users.column("interest_tags")).combine_chunks()


def _tag_lists(users: pa.Table) -> list[list[str] | None]:
    """Each user's interest tags; all None (encoded as padding) when the column is absent."""
    if "interest_tags" not in users.column_names:
        return [None] * users.num_rows
    return users.column("interest_tags").to_pylist()


@dataclass(frozen=True, eq=False)
class UserTable:
    """Users encoded once; row ``r`` is ``user_ids[r]`` (the users table's order).

    ``uid`` [N] (user-id index), ``tags`` [N, T] (u^IL indices, 0-padded), ``fields``
    [N, P] (u^O indices in :attr:`FeatureSpace.user_fields` order), ``bags[name]`` [N, L]
    (each user bag's ids, 0-padded, in :attr:`FeatureSpace.user_bags` order).
    """

    user_ids: np.ndarray
    uid: np.ndarray
    tags: np.ndarray
    fields: np.ndarray
    bags: dict[str, np.ndarray] = field(default_factory=dict)

    def rows(self, user_ids: np.ndarray) -> np.ndarray:
        """Row of each id; -1 where the id is not in the table."""
        return rows_of(self.user_ids, user_ids)


@dataclass(frozen=True, eq=False)
class ItemTable:
    """Items in the item-features table's row order: ``item_row`` indexes every array.

    ``fields`` [R, M]: F_emb(i^O) indices in :attr:`FeatureSpace.item_fields` order (0 for
    an item the illustrations table does not describe); ``vectors``: ``sem`` / ``sty`` /
    ``tsem`` arrays [R, d] as stored (float16 or float32); ``metadata``: the file's
    ``umair.*`` metadata (dims, encoder versions); ``present``: per modality a bool [R],
    false where the item lacks it (its vector was NULL, e.g. no image: no e_SEM / e_STY;
    its row of ``vectors`` then holds zeros). A modality not in ``present`` is present in
    every row. ``bags[name]`` [R, L]: each item bag's ids (genres...), 0-padded, in
    :attr:`FeatureSpace.item_bags` order (:meth:`FeatureSpace.encode_item_bags`).
    """

    illust_ids: np.ndarray
    fields: np.ndarray
    vectors: dict[str, np.ndarray]
    metadata: dict[str, str]
    present: dict[str, np.ndarray] = field(default_factory=dict)
    bags: dict[str, np.ndarray] = field(default_factory=dict)

    def rows(self, illust_ids: np.ndarray) -> np.ndarray:
        """Row of each id; -1 where the id has no item features."""
        return rows_of(self.illust_ids, illust_ids)

    def presence(self, modality: str) -> np.ndarray:
        """bool [R]: the rows that hold modality ``modality``."""
        got = self.present.get(modality)
        return np.ones(len(self.illust_ids), bool) if got is None else got


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
    ``user_fields`` / ``item_fields`` tensors and of :class:`ModelConfig`'s dicts;
    ``user_bags`` / ``item_bags``: a vocabulary per bag column (list<string>; index 0 =
    padding / unknown), likewise in :class:`ModelConfig` order.
    """

    settings: FeatureSettings
    split: str
    user_id: Vocabulary
    user_tags: Vocabulary
    user_fields: dict[str, Encoder]
    item_fields: dict[str, Encoder]
    fitted_on: dict[str, int] = field(default_factory=dict)
    vector_stats: dict[str, VectorStats] = field(default_factory=dict)
    user_bags: dict[str, Vocabulary] = field(default_factory=dict)
    item_bags: dict[str, Vocabulary] = field(default_factory=dict)

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
            raise FeatureError(
                f"train_interactions holds {late.num_rows} rows at or after the split {parse_time(split).isoformat()}"
            )
        uid_col = train_interactions.column("user_id")
        item_col = train_interactions.column("illust_id")
        train_users, _ = take_by_id(users, "user_id", pc.unique(uid_col).to_numpy())
        train_items, _ = take_by_id(illustrations, "illust_id", pc.unique(item_col).to_numpy())

        user_fields = {
            c: _fit_field(train_users.column(c), settings)
            for c in _extra_columns(users, USER_RESERVED, settings.user_profile, "users")
        }
        item_fields: dict[str, Encoder] = {
            c: Buckets.fit(train_items.column(c), settings.buckets)
            for c in ITEM_NUMERIC
            if c in illustrations.column_names
        }
        if settings.item_id:
            item_fields[ITEM_ID_FIELD] = Vocabulary.fit(item_col, settings.min_count)
        for c in _extra_columns(illustrations, ITEM_RESERVED, settings.item_categoricals, "illustrations"):
            item_fields[c] = _fit_field(train_items.column(c), settings)
        item_bag_cols = _bag_columns(illustrations, "tags", settings.item_bags, "item_bags", "illustrations")
        user_bag_cols = _bag_columns(users, "interest_tags", settings.user_bags, "user_bags", "users")
        return cls(
            settings=settings,
            split=parse_time(split).isoformat(),
            user_id=Vocabulary.fit(uid_col, settings.min_count),
            user_tags=Vocabulary.fit(_interest_tags(train_users), settings.min_count),
            user_fields=user_fields,
            item_fields=item_fields,
            fitted_on={
                "interactions": train_interactions.num_rows,
                "users": train_users.num_rows,
                "illustrations": train_items.num_rows,
            },
            user_bags=_fit_bags(train_users, user_bag_cols, settings),
            item_bags=_fit_bags(train_items, item_bag_cols, settings),
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
            "user_bags": {name: len(v) for name, v in self.user_bags.items()},
            "item_bags": {name: len(v) for name, v in self.item_bags.items()},
            "max_bag": self.settings.max_bag,
        }

    # ---- encoding

    def encode_users(self, users: pa.Table) -> UserTable:
        """Encode a users table (contract ``users``); unknown ids / values -> 0."""
        fields = [
            self.user_fields[c].encode(users.column(c))
            if c in users.column_names
            else np.zeros(users.num_rows, np.int64)
            for c in self.user_fields
        ]
        return UserTable(
            user_ids=users.column("user_id").to_numpy().astype(np.int64),
            uid=self.user_id.encode(users.column("user_id")),
            tags=self.user_tags.encode_padded(_tag_lists(users), self.settings.max_user_tags),
            fields=np.stack(fields, axis=1) if fields else np.zeros((users.num_rows, 0), np.int64),
            bags=_encode_bags(self.user_bags, users, users.num_rows, self.settings.max_bag),
        )

    def encode_items(self, illustrations: pa.Table, illust_ids: np.ndarray) -> np.ndarray:
        """F_emb(i^O) indices [len(illust_ids), M] for the given ids, in their order.

        An id the illustrations table does not hold gets 0 everywhere except its own id
        field (when ``item_id`` is on)."""
        illust_ids = np.asarray(illust_ids, dtype=np.int64)
        rows, found = take_by_id(illustrations, "illust_id", illust_ids)
        out = np.zeros((len(illust_ids), len(self.item_fields)), dtype=np.int64)
        for j, (name, enc) in enumerate(self.item_fields.items()):
            if name == ITEM_ID_FIELD:
                out[:, j] = enc.encode(illust_ids)
            elif name in rows.column_names:
                out[found, j] = enc.encode(rows.column(name))
        return out

    def encode_item_bags(self, illustrations: pa.Table, illust_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Each item bag's ids [len(illust_ids), L] for the given ids, in their order
        (0-padded; all padding for an id the illustrations table does not hold)."""
        illust_ids = np.asarray(illust_ids, dtype=np.int64)
        rows, found = take_by_id(illustrations, "illust_id", illust_ids)
        return _encode_bags(self.item_bags, rows, len(illust_ids), self.settings.max_bag, np.flatnonzero(found))

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
            "user_bags": {k: v.to_dict() for k, v in self.user_bags.items()},
            "item_bags": {k: v.to_dict() for k, v in self.item_bags.items()},
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
            user_bags={k: Vocabulary.from_dict(v) for k, v in data.get("user_bags", {}).items()},
            item_bags={k: Vocabulary.from_dict(v) for k, v in data.get("item_bags", {}).items()},
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


# --------------------------------------------------------------------------- negatives
