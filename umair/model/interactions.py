"""Interaction logs as the model sees them: time windows (``[.., split)`` trains,
``[split, end)`` tests) and negative sampling for logs that hold positives only
(:class:`NegativeSettings`), plus the id -> row helpers the tables share."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import AfterValidator, Field

from umair import contracts
from umair.config import Settings
from umair.errors import FeatureError


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


def parse_time(value: str | datetime) -> datetime:
    """A date or datetime (ISO string or object) as an aware UTC datetime."""
    t = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _iso_time(value: str) -> str:
    parse_time(value)  # an ISO date or datetime, e.g. 2021-10-01
    return value


IsoTime = Annotated[str, AfterValidator(_iso_time)]
"""A settings field holding an ISO date or datetime (``2021-10-01``), checked on load."""


def _micros(when: datetime) -> int:
    return (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


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


def take_by_id(table: pa.Table, id_column: str, ids: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """Rows of ``table`` whose ``id_column`` is in ``ids`` (in ``ids`` order), and the
    mask of ``ids`` found."""
    rows = rows_of(table.column(id_column).to_numpy(), ids)
    found = rows >= 0
    return table.take(pa.array(rows[found], pa.int64())), found


def rows_of(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if len(keys) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    pos = np.minimum(np.searchsorted(keys[order], ids), len(keys) - 1)
    hit = keys[order][pos] == ids
    return np.where(hit, order[pos], -1).astype(np.int64)


ALWAYS = np.iinfo(np.int64).min
"""``created_us`` of an item without a publication time: before any interaction."""


def created_at_us(illustrations: pa.Table) -> np.ndarray:
    """Each illustration's created_at as int64 microseconds since the epoch (UTC), [N];
    :data:`ALWAYS` (available from the start) where the column is absent or NULL."""
    if "created_at" not in illustrations.column_names:
        return np.full(illustrations.num_rows, ALWAYS, dtype=np.int64)
    col = illustrations.column("created_at").cast(pa.int64())
    return pc.fill_null(col, ALWAYS).to_numpy().astype(np.int64)


@dataclass(frozen=True)
class ItemPool:
    """Illustrations negatives may be drawn from, sorted by publication time.

    An item without a ``created_at`` (column absent or NULL) is available from the start
    (``created_us`` = :data:`ALWAYS`)."""

    illust_ids: np.ndarray  # sorted by created_us
    created_us: np.ndarray  # int64 microseconds since the epoch (UTC); ALWAYS when unknown
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
        rows, _ = take_by_id(illustrations, "illust_id", np.asarray(candidate_ids, np.int64))
        ids = rows.column("illust_id").to_numpy().astype(np.int64)
        created = created_at_us(rows)
        order = np.argsort(created, kind="stable")
        ids, created = ids[order], created[order]
        weights = np.ones(len(ids))
        if settings.strategy == "popularity":
            counts = np.zeros(len(ids))
            if train_positives is not None and train_positives.num_rows:
                pos = train_positives.filter(pc.equal(train_positives.column("label"), 1))
                r = rows_of(ids, pos.column("illust_id").to_numpy())
                np.add.at(counts, r[r >= 0], 1.0)
            weights = (counts + 1.0) ** settings.popularity_power
        return cls(ids, created, weights)


def sample_negatives(
    positives: pa.Table, pool: ItemPool, settings: NegativeSettings
) -> tuple[pa.Table, dict[str, Any]]:
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
        clash = np.array(
            [(u, i) in liked for u, i in zip(users[todo].tolist(), pool.illust_ids[draw].tolist())], dtype=bool
        )
        todo = todo[clash]
    pick[todo] = -1
    keep = pick >= 0
    negatives = pa.table(
        {
            "user_id": pa.array(users[keep], pa.int64()),
            "illust_id": pa.array(pool.illust_ids[pick[keep]], pa.int64()),
            "ts": pa.array(ts[keep], pa.int64()).cast(contracts.TIMESTAMP),
            "label": pa.array(np.zeros(int(keep.sum()), np.int8), pa.int8()),
        }
    )
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
        record: dict[str, Any] = {
            "applied": False,
            "mode": settings.mode,
            "positives": int((labels == 1).sum()),
            "negatives": int((labels == 0).sum()),
        }
        return interactions, record
    negatives, record = sample_negatives(interactions, pool, settings)
    record = {
        "applied": True,
        "mode": settings.mode,
        "reason": "log holds positives only" if positives_only else "mode=always",
        **record,
    }
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
