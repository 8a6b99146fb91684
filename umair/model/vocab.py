"""Fitted vocabularies that turn raw field values into embedding indices.

- :class:`Vocabulary`: categorical values (user ids, tags, artist, gender, ...) ->
  ``1..n``; index 0 is reserved for anything unknown (unseen, rarer than ``min_count``,
  null) and for padding. ``len(vocab)`` (``n + 1``) is the embedding-table size.
- :class:`Buckets`: numbers and timestamps -> quantile buckets ``1..n``; 0 is for
  missing values (null, NaN). Values outside the fitted range land in the first or
  last bucket.

Both are fitted only on the values the caller passes. Fit them on the training
window alone, so that evaluating on a later window sees unseen users, tags and
artists as index 0 exactly as a deployed model would, and no information from the
evaluation window leaks into the embedding tables. Save them with the model
(``to_dict`` is JSON-serialisable) and load them with ``from_dict``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ArrayLike = pa.Array | pa.ChunkedArray | np.ndarray | Sequence[Any] | Iterable[Any]


def _arrow(values: ArrayLike) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    if isinstance(values, np.ndarray):
        return pa.array(values, from_pandas=True)
    return pa.array(list(values), from_pandas=True)


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """Categorical values -> int64 indices; ``tokens[i]`` has index ``i + 1``.

    Tokens are ordered by decreasing count, ties by value, so a fit is deterministic.
    """

    tokens: pa.Array

    @classmethod
    def fit(cls, values: ArrayLike, min_count: int = 1) -> Vocabulary:
        """Keep each distinct non-null value seen at least ``min_count`` times."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        arr = _arrow(values)
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        counts = pc.value_counts(arr.drop_null())
        table = pa.table({"value": counts.field("values"), "count": counts.field("counts")})
        table = table.filter(pc.greater_equal(table["count"], min_count))
        table = table.sort_by([("count", "descending"), ("value", "ascending")])
        return cls(table["value"].combine_chunks())

    def __len__(self) -> int:
        """Embedding-table size: the tokens plus index 0."""
        return len(self.tokens) + 1

    def encode(self, values: ArrayLike) -> np.ndarray:
        """Indices (int64, same length as ``values``); unknown or null -> 0."""
        arr = _arrow(values)
        if len(arr) == 0:
            return np.zeros(0, dtype=np.int64)
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if pa.types.is_null(arr.type):
            return np.zeros(len(arr), dtype=np.int64)
        try:
            arr = arr.cast(self.tokens.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise TypeError(
                f"cannot encode values of type {arr.type} with a vocabulary of {self.tokens.type}: {err}"
            ) from err
        idx = pc.index_in(arr, value_set=self.tokens)
        return pc.fill_null(pc.add(idx.cast(pa.int64()), 1), 0).to_numpy(zero_copy_only=False).astype(np.int64)

    def encode_padded(self, lists: Iterable[Sequence[Any] | None], max_len: int | None = None) -> np.ndarray:
        """Encode lists of values (e.g. interest tags) into a [N, T] int64 matrix padded
        with 0. Unknown values are dropped rather than kept as 0 (0 means padding);
        each row keeps its first ``max_len`` known values (T = longest row otherwise)."""
        rows = [self.encode(list(v) if v is not None else []) for v in lists]
        rows = [r[r != 0] for r in rows]
        width = max((len(r) for r in rows), default=0) if max_len is None else max_len
        out = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            r = r[:width]
            out[i, : len(r)] = r
        return out

    def decode(self, indices: Iterable[int]) -> list[Any]:
        """Values for ``indices``; index 0 gives None."""
        values = self.tokens.to_pylist()
        return [values[i - 1] if i > 0 else None for i in indices]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form; :meth:`from_dict` inverts it."""
        return {"kind": "vocabulary", "type": str(self.tokens.type), "tokens": self.tokens.to_pylist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        if data.get("kind") != "vocabulary":
            raise ValueError(f"not a vocabulary: kind={data.get('kind')!r}")
        return cls(pa.array(data["tokens"], type=_type_from_name(data["type"])))


_TYPES = {
    "string": pa.string(),
    "large_string": pa.large_string(),
    "bool": pa.bool_(),
    **{f"int{b}": getattr(pa, f"int{b}")() for b in (8, 16, 32, 64)},
    **{f"uint{b}": getattr(pa, f"uint{b}")() for b in (8, 16, 32, 64)},
}


def _type_from_name(name: str) -> pa.DataType:
    if name not in _TYPES:
        raise ValueError(f"unsupported vocabulary value type {name!r}; expected one of {sorted(_TYPES)}")
    return _TYPES[name]


def _numeric(values: ArrayLike) -> np.ndarray:
    """float64 values with NaN for missing; timestamps become microseconds since the epoch."""
    if isinstance(values, np.ndarray) and np.issubdtype(values.dtype, np.datetime64):
        out = values.astype("datetime64[us]").astype(np.int64).astype(np.float64)
        out[np.isnat(values)] = np.nan
        return out
    arr = _arrow(values)
    if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
        if pa.types.is_date(arr.type):
            arr = arr.cast(pa.timestamp("us"))
        arr = arr.cast(pa.timestamp("us", tz=arr.type.tz)).cast(pa.int64())
    return arr.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)


@dataclass(frozen=True, eq=False)
class Buckets:
    """Quantile buckets: value ``v`` -> ``1 + #{edges <= v}``; missing -> 0.

    ``edges`` are the distinct inner quantiles of the fitted values, so there are at most
    ``n`` buckets (fewer when values repeat). Timestamps are bucketed as microseconds
    since the epoch (UTC). The encoding is non-decreasing in the value.
    """

    edges: np.ndarray

    @classmethod
    def fit(cls, values: ArrayLike, n: int) -> Buckets:
        """Edges at the ``1/n, ..., (n-1)/n`` quantiles of the non-missing ``values``."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        x = _numeric(values)
        x = x[np.isfinite(x)]
        if len(x) == 0 or n == 1:
            return cls(np.zeros(0, dtype=np.float64))
        edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, n + 1)[1:-1]))
        return cls(edges.astype(np.float64))

    def __len__(self) -> int:
        """Embedding-table size: the buckets plus index 0."""
        return len(self.edges) + 2

    def encode(self, values: ArrayLike) -> np.ndarray:
        """Bucket indices (int64, 1..len-1); missing (null, NaN, NaT) -> 0."""
        x = _numeric(values)
        out = np.searchsorted(self.edges, x, side="right").astype(np.int64) + 1
        out[~np.isfinite(x)] = 0
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form; :meth:`from_dict` inverts it."""
        return {"kind": "buckets", "edges": self.edges.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Buckets:
        if data.get("kind") != "buckets":
            raise ValueError(f"not buckets: kind={data.get('kind')!r}")
        return cls(np.asarray(data["edges"], dtype=np.float64))
