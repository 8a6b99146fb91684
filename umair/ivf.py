"""Cosine search over a large catalogue: exact in row blocks, or an inverted-file (IVF) index.

Both search the rows of a unit-normalised matrix ``x`` [N, d] (float16 or float32; every
product is taken in float32, one block of rows at a time, so no float32 copy of ``x`` is
ever made) for the rows most cosine-similar to each query ``q`` [Q, d]:
``cos(q, x_r) = <q, x_r>``.

- :func:`cosine_topk`: exact; ``Q · N · d`` multiply-adds. Over a catalogue of ``N`` items
  with one query per item (a candidate generator whose seeds are any item) that is
  quadratic in ``N``.
- :class:`IVFIndex`: approximate, sub-quadratic. The rows are grouped into ``C`` lists by
  their nearest centroid (spherical k-means: scikit-learn's ``MiniBatchKMeans`` on a
  sample of unit rows, centroids re-normalised). A query scores the ``C`` centroids and
  ranks exactly the rows of its ``probe`` best lists: ``C · d + probe · (N / C) · d``
  per query, ``O(√N · d)`` with the default ``C = 4√N`` (FAISS's rule of thumb; on
  clustered vectors at a million items 4√N lists found more true neighbours per ms than
  √N or 2√N: bench/RESULTS.md). A true neighbour in a list not
  probed is missed (recall < 1, measured in ``bench/scale_serving.py --parts search``); with
  ``probe = C`` the result is the exact one.

Every array of an :class:`IVFIndex` is plain numpy, so an index goes into the Ray object
store whole and every actor of a node reads it without a copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BLOCK_ROWS = 32_768  # rows of x multiplied at a time: Q x 32k float32 scores, 32k x d float32 rows


def _best(rows: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best (highest sim, ties by lower row) of each line of rows/sims [Q, n]."""
    if sims.shape[1] > k:
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        rows, sims = np.take_along_axis(rows, part, axis=1), np.take_along_axis(sims, part, axis=1)
    order = np.lexsort((rows, -sims), axis=1)
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(sims, order, axis=1)


def cosine_topk(
    queries: np.ndarray, matrix: np.ndarray, k: int, banned: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``matrix`` [N, d] most cosine-similar to each query row (both
    already unit-normalised), exactly: (rows [Q, k'] int64, cosines [Q, k'] float32), best
    first, ties by row, ``k' = min(k, allowed)``. ``banned``: a boolean mask over
    ``matrix`` rows, [N] or [Q, N], never returned. ``matrix`` is read in blocks of
    :data:`BLOCK_ROWS` rows (float16 is converted one block at a time)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    n = len(matrix)
    if banned is not None:
        banned = np.broadcast_to(np.asarray(banned, bool), (len(q), n))
        allowed = int((~banned).sum(axis=1).min()) if len(q) else 0
    else:
        allowed = n
    k = min(k, allowed)
    if k == 0 or len(q) == 0:
        return np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)
    best_rows = np.zeros((len(q), 0), np.int64)
    best_sims = np.zeros((len(q), 0), np.float32)
    for start in range(0, n, BLOCK_ROWS):
        stop = min(n, start + BLOCK_ROWS)
        sims = q @ np.asarray(matrix[start:stop], dtype=np.float32).T
        if banned is not None:
            sims = np.where(banned[:, start:stop], -np.inf, sims)
        rows = np.broadcast_to(np.arange(start, stop, dtype=np.int64), sims.shape)
        rows, sims = _best(rows, sims, k)
        best_rows, best_sims = _best(np.hstack([best_rows, rows]), np.hstack([best_sims, sims]), k)
    return best_rows, best_sims.astype(np.float32)


@dataclass(frozen=True, eq=False)
class IVFIndex:
    """An inverted-file index over some rows of a unit-normalised matrix ``x`` (which it
    does not hold: :meth:`search` is given it, e.g. the shared :class:`FeatureIndex`
    space). List ``c`` holds the rows ``rows[offsets[c]:offsets[c + 1]]``, the rows whose
    nearest centroid is ``centroids[c]``; rows not indexed are never returned."""

    centroids: np.ndarray  # [C, d] float32, unit rows
    offsets: np.ndarray  # [C + 1] int64
    rows: np.ndarray  # [n] int64: the indexed rows of x, grouped by list
    probe: int  # lists ranked exactly per query

    @classmethod
    def build(
        cls,
        x: np.ndarray,
        rows: np.ndarray,
        lists: int | None = None,
        probe: int = 16,
        seed: int = 0,
        sample_per_list: int = 32,
    ) -> IVFIndex:
        """Index ``rows`` of ``x`` [N, d]: ``lists`` centroids (default ``round(4√n)``)
        fitted by mini-batch spherical k-means on at most ``sample_per_list · lists``
        sampled rows, then every row assigned to its nearest centroid (in blocks)."""
        from sklearn.cluster import MiniBatchKMeans

        rows = np.asarray(rows, np.int64)
        n = len(rows)
        if n == 0:
            raise ValueError("an IVF index needs at least one row")
        c = max(1, min(n, lists if lists is not None else round(4 * math.sqrt(n))))
        if probe < 1:
            raise ValueError(f"probe must be >= 1, got {probe}")
        rng = np.random.default_rng(seed)
        fit_rows = np.sort(rng.choice(rows, size=min(n, sample_per_list * c), replace=False))
        km = MiniBatchKMeans(n_clusters=c, random_state=seed, n_init=1, batch_size=max(1024, 4 * c), max_iter=20)
        km.fit(np.asarray(x[fit_rows], dtype=np.float32))
        cent = km.cluster_centers_.astype(np.float32)
        cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
        assign = np.empty(n, np.int64)
        for s in range(0, n, BLOCK_ROWS):
            block = np.asarray(x[rows[s : s + BLOCK_ROWS]], dtype=np.float32)
            assign[s : s + len(block)] = np.argmax(block @ cent.T, axis=1)
        order = np.argsort(assign, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=c))]).astype(np.int64)
        return cls(cent, offsets, rows[order], min(probe, c))

    @property
    def lists(self) -> int:
        return len(self.centroids)

    def __len__(self) -> int:
        return len(self.rows)

    def _probed(self, order: np.ndarray, p: int, banned: np.ndarray | None) -> np.ndarray:
        cand = np.concatenate([self.rows[self.offsets[c] : self.offsets[c + 1]] for c in order[:p]])
        return cand if banned is None else cand[~banned[cand]]

    def search(
        self, x: np.ndarray, queries: np.ndarray, k: int, banned: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """About the ``k`` indexed rows of ``x`` most cosine-similar to each query [Q, d]:
        (rows [Q, k'], cosines [Q, k']), best first, ties by row, ``k' = min(k, allowed)``
        as :func:`cosine_topk`. ``banned`` [N] bool: rows never returned; a query whose
        ``probe`` lists hold fewer than ``k`` allowed rows probes twice as many, and so on
        up to every list (then the answer is exact)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        banned = None if banned is None else np.asarray(banned, bool)
        allowed = len(self.rows) if banned is None else int((~banned[self.rows]).sum())
        k = min(k, allowed)
        if k == 0 or len(q) == 0:
            return np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)
        lists = np.argsort(-(q @ self.centroids.T), axis=1, kind="stable")  # [Q, C] best list first
        out_rows = np.empty((len(q), k), np.int64)
        out_sims = np.empty((len(q), k), np.float32)
        for j in range(len(q)):
            p = self.probe
            cand = self._probed(lists[j], p, banned)
            while len(cand) < k and p < self.lists:
                p = min(self.lists, 2 * p)
                cand = self._probed(lists[j], p, banned)
            sims = np.asarray(x[cand], dtype=np.float32) @ q[j]
            r, s = _best(cand[None, :], sims[None, :], k)
            out_rows[j], out_sims[j] = r[0], s[0]
        return out_rows, out_sims
