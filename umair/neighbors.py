"""Cosine nearest neighbours over item features, and candidate generation (no Ray).

:class:`FeatureIndex` holds, per feature space (``sem`` = e_SEM, ``sty`` = e_STY,
``tsem`` = e_TSEM), the catalogue's vectors mean-centred (by default: the catalogue mean
is subtracted, which removes the common component of all-positive vectors such as the
Gram-matrix statistics of e_STY) and L2-normalised, so the cosine of two items is one
dot product: ``cos(x, y) = <x̂, ŷ>``, ``x̂ = (x - μ) / ‖x - μ‖``; the unit rows are kept
as float16 (half the memory; products in float32, :mod:`umair.ivf`). :meth:`FeatureIndex.similar`
searches exactly.

:class:`CandidateGenerator` builds the set a model ranks for one user, as of a time
``T`` (the model's split: nothing created at or after ``T`` exists yet):

- **recent**: the ``recent`` newest illustrations created before ``T``;
- **popular**: the ``popular`` most bookmarked ones of the training window;
- **neighbours**: for each of the user's ``seeds`` most recent training-window
  bookmarks, its ``neighbors`` nearest illustrations by cosine in each space of
  ``spaces`` (e_SEM and e_STY by default: "same subject" and "same hand");

minus what the user already bookmarked (``exclude: bookmarked``), everything they were
shown (``seen``) or nothing (``none``). The neighbour search is exact below
``ivf_above`` eligible items per space and an IVF index (:class:`umair.ivf.IVFIndex`,
sub-quadratic, approximate) above it (``search: auto``; ``exact`` / ``ivf`` force one).
The generator holds only numpy arrays: ``umair recommend`` builds it once and its actors
map it read-only from the Ray object store.

An item whose vector of a space is NULL (no image: no e_SEM / e_STY) is never a
neighbour in that space, nor a seed there (``FeatureIndex.present``); the centring mean
is taken over the items that have the vector. It is still reachable through the other
spaces, recency and popularity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from umair import modalities as registry
from umair.config import Settings
from umair.errors import UmairError
from umair.ivf import BLOCK_ROWS, IVFIndex, cosine_topk

SPACE_BY: dict[str, str] = {"semantic": "sem", "style": "sty", "text": "tsem"}


class UnknownIdError(UmairError, ValueError):
    """An illustration or user id that the given table / model does not hold."""


class MissingVectorError(UmairError, ValueError):
    """The query illustration has no vector in the asked feature space (e.g. no image)."""


def vectors_of(table: pa.Table, column: str, source: str = "<item_features>") -> np.ndarray:
    """A fixed-size-list column as a float32 matrix [rows, d] (zero rows where NULL)."""
    from umair.model.item_features import vector_matrix

    if column not in table.column_names:
        raise UnknownIdError(f"{source}: no column '{column}' (columns: {', '.join(table.column_names)})")
    col = table.column(column).combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        raise ValueError(f"{source}: column '{column}' is {col.type}, expected fixed_size_list<float>")
    return vector_matrix(col)[0].astype(np.float32)


def unit_rows(x: np.ndarray, center: bool = True) -> np.ndarray:
    """Rows of ``x`` minus the column mean (when ``center``), scaled to unit L2 norm
    (an all-zero row stays zero: cosine 0 with everything)."""
    y = np.asarray(x, dtype=np.float32)
    if center and len(y):
        y = y - y.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(y, axis=1, keepdims=True)
    return np.divide(y, norms, out=np.zeros_like(y), where=norms > 0)


@dataclass(frozen=True, eq=False)
class FeatureIndex:
    """Unit-normalised vectors per feature space; row ``r`` is ``illust_ids[r]`` (the
    item-features table's row order, the same rows as the model's ItemTable)."""

    illust_ids: np.ndarray
    spaces: dict[str, np.ndarray]
    source: str
    present: dict[str, np.ndarray] = field(default_factory=dict)  # per space bool [N]; absent: all

    @classmethod
    def from_table(
        cls, table: pa.Table, spaces: Sequence[str], source: str = "<item_features>", center: bool = True
    ) -> FeatureIndex:
        """Index the given columns of an item-features table (contract ``item_features``)."""
        for s in spaces:
            if s not in registry.names():
                raise ValueError(f"unknown feature space {s!r}; expected one of {list(registry.names())}")
        from umair.model.item_features import vector_matrix

        ids = table.column("illust_id").to_numpy().astype(np.int64)
        units, present = {}, {}
        for s in spaces:
            vectors_of(table.slice(0, 0), s, source)
            x, has = vector_matrix(table.column(s))  # as stored (float16 or float32): no float32 copy
            mean = np.zeros(x.shape[1], np.float64)  # over the items that have the vector, in blocks
            if center and has.any():
                for b in range(0, len(x), BLOCK_ROWS):
                    mean += x[b : b + BLOCK_ROWS][has[b : b + BLOCK_ROWS]].sum(axis=0, dtype=np.float64)
                mean /= has.sum()
            out = np.zeros(x.shape, np.float16)
            for b in range(0, len(x), BLOCK_ROWS):
                block = (x[b : b + BLOCK_ROWS].astype(np.float32) - mean.astype(np.float32)) * has[
                    b : b + BLOCK_ROWS, None
                ]
                out[b : b + BLOCK_ROWS] = unit_rows(block, center=False)
            units[s], present[s] = out, has
            del x
        return cls(ids, units, source, present)

    def has(self, space: str) -> np.ndarray:
        """bool [N]: the rows with a vector in ``space``."""
        got = self.present.get(space)
        return np.ones(len(self), bool) if got is None else got

    def __len__(self) -> int:
        return len(self.illust_ids)

    def rows(self, illust_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row of each id; -1 where the id is not indexed."""
        order = np.argsort(self.illust_ids, kind="stable")
        ids = np.asarray(illust_ids, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.illust_ids[order], ids), 0, max(len(order) - 1, 0))
        found = self.illust_ids[order][pos] == ids if len(order) else np.zeros(len(ids), bool)
        return np.where(found, order[pos], -1).astype(np.int64)

    def row(self, illust_id: int) -> int:
        """The row of one id, or :class:`UnknownIdError` naming the id and the file."""
        r = int(self.rows([illust_id])[0])
        if r < 0:
            raise UnknownIdError(
                f"illustration {illust_id} is not in the item features {self.source} "
                f"({len(self)} illustrations; run `umair extract` over it first)"
            )
        return r

    def space(self, name: str) -> np.ndarray:
        if name not in self.spaces:
            raise ValueError(f"feature space {name!r} is not indexed (indexed: {', '.join(self.spaces)})")
        return self.spaces[name]

    def similar(
        self, illust_id: int, space: str, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` illustrations nearest to ``illust_id`` by cosine in ``space``, itself
        excluded: (illust_ids [k], cosines [k]), best first. ``allowed``: a row mask."""
        r = self.row(illust_id)
        x = self.space(space)
        if not self.has(space)[r]:
            raise MissingVectorError(
                f"illustration {illust_id} has no {registry.get(space).symbol} vector in {self.source} "
                f"(e.g. no image); try another feature space"
            )
        banned = np.zeros(len(self), bool) if allowed is None else ~np.asarray(allowed, bool)
        banned[r] = True
        banned |= ~self.has(space)  # items without the vector are never neighbours in it
        rows, sims = cosine_topk(x[r], x, k, banned)
        return self.illust_ids[rows[0]], sims[0]


class CandidateSettings(Settings):
    """How many candidates each source adds for one user (see the module docstring)."""

    recent: int = Field(10, ge=0, description="newest illustrations created before the as-of time")
    popular: int = Field(10, ge=0, description="most bookmarked illustrations of the training window")
    neighbors: int = Field(20, ge=0, description="nearest neighbours per seed bookmark per space")
    seeds: int = Field(10, ge=0, description="the user's most recent training-window bookmarks used as seeds")
    spaces: tuple[str, ...] = Field(("sem", "sty"), description="feature spaces of the neighbour search")
    exclude: Literal["bookmarked", "seen", "none"] = Field(
        "bookmarked", description="never recommend what the user already bookmarked / was shown / (none)"
    )
    center: bool = Field(True, description="mean-centre the vectors before the cosine")
    search: Literal["auto", "exact", "ivf"] = Field(
        "auto", description="neighbour search: exact, an IVF index (approximate), or auto (IVF above ivf_above items)"
    )
    ivf_above: int = Field(20_000, ge=0, description="search: auto uses the IVF index above this many items per space")
    ivf_lists: int | None = Field(None, ge=1, description="IVF lists (k-means centroids); default round(4 sqrt(items))")
    ivf_probe: int = Field(16, ge=1, description="IVF lists ranked exactly per seed (more: better recall, slower)")

    @field_validator("spaces")
    @classmethod
    def _registered(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [s for s in v if s not in registry.names()]
        if unknown:
            raise ValueError(f"unknown feature space(s) {unknown}; expected some of {list(registry.names())}")
        return v


@dataclass(frozen=True)
class Candidates:
    """One user's candidate item rows (index rows, no repeats) and how many each source
    contributed before de-duplication."""

    rows: np.ndarray
    sources: dict[str, int]


class CandidateGenerator:
    """Candidate sets as of one time (see the module docstring).

    ``eligible`` [N]: rows that existed at the as-of time (created before it and in the
    catalogue); ``created_s`` [N]: creation time in seconds (recency order);
    ``bookmarks`` [N]: training-window bookmark counts (popularity order).
    """

    def __init__(
        self,
        index: FeatureIndex,
        eligible: np.ndarray,
        created_s: np.ndarray,
        bookmarks: np.ndarray,
        settings: CandidateSettings,
    ) -> None:
        from umair.ranking import popularity_order

        n = len(index)
        for name, a in (("eligible", eligible), ("created_s", created_s), ("bookmarks", bookmarks)):
            if len(a) != n:
                raise ValueError(f"{name} must have one entry per indexed item ({n}), got {len(a)}")
        self.index, self.settings = index, settings
        self.eligible = np.asarray(eligible, bool)
        ok = np.flatnonzero(self.eligible)
        self.recent_rows = ok[np.lexsort((index.illust_ids[ok], -np.asarray(created_s, np.float64)[ok]))]
        order = popularity_order(index.illust_ids[ok], np.asarray(bookmarks)[ok], np.asarray(created_s)[ok])
        self.popular_rows = index.rows(order)
        self.popular_rows = self.popular_rows[np.asarray(bookmarks)[self.popular_rows] > 0]
        self.ivf: dict[str, IVFIndex] = {}  # per space searched approximately
        for s in settings.spaces:
            x = index.space(s)
            searchable = np.flatnonzero(self.eligible & index.has(s))  # nothing else is ever a neighbour
            wanted = settings.search == "ivf" or (settings.search == "auto" and len(searchable) > settings.ivf_above)
            if wanted and len(searchable):
                self.ivf[s] = IVFIndex.build(x, searchable, settings.ivf_lists, settings.ivf_probe)

    def _first(self, ordered: np.ndarray, n: int, banned: np.ndarray) -> np.ndarray:
        if n == 0:
            return np.zeros(0, np.int64)
        keep = ordered[~banned[ordered]]
        return keep[:n]

    def for_user(self, seed_rows: np.ndarray, excluded_rows: np.ndarray) -> Candidates:
        """Candidates of a user whose training-window bookmarks, newest first, are
        ``seed_rows`` and who must not get ``excluded_rows``."""
        s = self.settings
        banned = ~self.eligible.copy()
        banned[np.asarray(excluded_rows, np.int64)] = True
        parts = {
            "recent": self._first(self.recent_rows, s.recent, banned),
            "popular": self._first(self.popular_rows, s.popular, banned),
        }
        seeds = np.asarray(seed_rows, np.int64)[: s.seeds]
        for space in s.spaces:
            has = self.index.has(space)
            mine = seeds[has[seeds]]  # a seed without the vector has no neighbours in this space
            if s.neighbors == 0 or len(mine) == 0:
                parts[f"knn_{space}"] = np.zeros(0, np.int64)
                continue
            x = self.index.space(space)
            ivf = self.ivf.get(space)
            if ivf is not None:
                rows, _ = ivf.search(x, x[mine], s.neighbors, banned)
            else:
                rows, _ = cosine_topk(x[mine], x, s.neighbors, banned | ~has)
            parts[f"knn_{space}"] = rows.ravel()
        merged = np.concatenate(list(parts.values())) if parts else np.zeros(0, np.int64)
        _, first = np.unique(merged, return_index=True)
        return Candidates(merged[np.sort(first)], {k: int(len(v)) for k, v in parts.items()})


@dataclass(frozen=True, eq=False)
class UserHistories:
    """Per user of a window: the bookmarked item rows newest first and every shown item
    row (unique), as flat arrays (no Python object per user, so the table goes into the
    Ray object store whole): user ``user_ids[j]`` bookmarked
    ``bookmarked[bm_offsets[j]:bm_offsets[j + 1]]`` and was shown
    ``seen[seen_offsets[j]:seen_offsets[j + 1]]``."""

    user_ids: np.ndarray  # [U'] int64, sorted
    bm_offsets: np.ndarray  # [U' + 1]
    bookmarked: np.ndarray  # item rows
    seen_offsets: np.ndarray  # [U' + 1]
    seen: np.ndarray  # item rows

    @classmethod
    def of_window(
        cls, user_ids: np.ndarray, item_rows: np.ndarray, labels: np.ndarray, ts: np.ndarray
    ) -> UserHistories:
        """The histories of a window's rows; rows < 0 (items without features) are dropped."""
        u = np.asarray(user_ids, np.int64)
        r = np.asarray(item_rows, np.int64)
        y = np.asarray(labels)
        t = np.asarray(ts).astype("datetime64[us]").astype(np.int64)
        keep = r >= 0
        u, r, y, t = u[keep], r[keep], y[keep], t[keep]
        order = np.lexsort((-t, u))  # per user, newest first
        u, r, y = u[order], r[order], y[order]
        users, starts = np.unique(u, return_index=True)
        group = np.repeat(np.arange(len(users)), np.diff(np.r_[starts, len(u)]))
        liked = y == 1
        bm_offsets = np.r_[0, np.cumsum(np.bincount(group[liked], minlength=len(users)))].astype(np.int64)
        pairs = np.unique(np.stack([group, r], axis=1), axis=0) if len(u) else np.zeros((0, 2), np.int64)
        seen_offsets = np.r_[0, np.cumsum(np.bincount(pairs[:, 0], minlength=len(users)))].astype(np.int64)
        return cls(users.astype(np.int64), bm_offsets, r[liked], seen_offsets, pairs[:, 1].astype(np.int64))

    def __len__(self) -> int:
        return len(self.user_ids)

    def of(self, user_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(bookmarked item rows newest first, shown item rows) of one user; empty for a
        user without rows in the window."""
        j = int(np.searchsorted(self.user_ids, user_id))
        if j == len(self.user_ids) or self.user_ids[j] != user_id:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return (
            self.bookmarked[self.bm_offsets[j] : self.bm_offsets[j + 1]],
            self.seen[self.seen_offsets[j] : self.seen_offsets[j + 1]],
        )
