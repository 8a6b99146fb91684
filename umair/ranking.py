"""Top-K ranking metrics and the popularity baseline (no Ray).

For one user with ranked list ``r_1, r_2, ...`` (illustration ids, best first) and the
set ``R`` of relevant items (their bookmarks in the test window), binary relevance
``rel_i = 1[r_i ∈ R]``:

- ``Recall@K = |{r_1..r_K} ∩ R| / |R|`` (the whole of ``R`` in the denominator, so an
  item the system could never have ranked still counts against it);
- ``DCG@K = Σ_{i=1..K} rel_i / log2(i + 1)``, ``IDCG@K = Σ_{i=1..min(K, |R|)} 1 / log2(i + 1)``
  (every relevant item ranked first), ``NDCG@K = DCG@K / IDCG@K``; equal to
  scikit-learn's ``ndcg_score`` with binary gains over the ranked items.

:func:`evaluate_rankings` averages both over users (each user counts once); users
without any relevant item have no recall and are skipped and counted; a user with
relevant items but no list scores 0.

:func:`popularity_ranking` is the non-personal baseline: every user gets the most
bookmarked items of the training window (ties: more recently created first, then the
smaller id), minus the items excluded for that user.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")


def recall_at_k(ranked: Sequence[int] | np.ndarray, relevant: Collection[int], k: int) -> float:
    """``|top-K ∩ R| / |R|``; NaN when ``R`` is empty (recall is undefined)."""
    _check_k(k)
    rel = {int(x) for x in relevant}
    if not rel:
        return float("nan")
    top = [int(x) for x in list(ranked)[:k]]
    return len(rel.intersection(top)) / len(rel)


def dcg_at_k(ranked: Sequence[int] | np.ndarray, relevant: Collection[int], k: int) -> float:
    """``Σ_{i=1..K} 1[r_i ∈ R] / log2(i + 1)`` (binary gains, ranks from 1)."""
    _check_k(k)
    rel = {int(x) for x in relevant}
    return float(sum(1.0 / np.log2(i + 2) for i, x in enumerate(list(ranked)[:k]) if int(x) in rel))


def ndcg_at_k(ranked: Sequence[int] | np.ndarray, relevant: Collection[int], k: int) -> float:
    """``DCG@K / IDCG@K`` with ``IDCG@K = Σ_{i=1..min(K,|R|)} 1 / log2(i + 1)``; NaN when ``R`` is empty."""
    _check_k(k)
    rel = {int(x) for x in relevant}
    if not rel:
        return float("nan")
    ideal = float(sum(1.0 / np.log2(i + 2) for i in range(min(k, len(rel)))))
    return dcg_at_k(ranked, rel, k) / ideal


@dataclass(frozen=True)
class RankingResult:
    """Mean ``Recall@K`` / ``NDCG@K`` per cut-off over ``users`` users with at least one
    relevant item; ``skipped``: users with none; ``hits``: relevant items found in the
    top-K (per cut-off); ``relevant``: relevant items in all."""

    recall: dict[int, float]
    ndcg: dict[int, float]
    users: int
    skipped: int
    relevant: int
    hits: dict[int, int] = field(default_factory=dict)

    def flat(self, prefix: str = "") -> dict[str, float]:
        """``{prefix}recall_at_K``, ``{prefix}ndcg_at_K`` for every cut-off, plus user counts."""
        out: dict[str, float] = {}
        for k in sorted(self.recall):
            out[f"{prefix}recall_at_{k}"] = self.recall[k]
            out[f"{prefix}ndcg_at_{k}"] = self.ndcg[k]
        return out


def evaluate_rankings(
    rankings: Mapping[int, Sequence[int] | np.ndarray],
    relevant: Mapping[int, Collection[int]],
    ks: Sequence[int],
    users: Collection[int] | None = None,
) -> RankingResult:
    """Mean Recall@K and NDCG@K for every ``K`` in ``ks`` over ``users`` (default: every
    user of ``relevant``); users with no relevant item are skipped and counted."""
    ks = sorted({int(k) for k in ks})
    if not ks:
        raise ValueError("give at least one cut-off K")
    for k in ks:
        _check_k(k)
    who = sorted({int(u) for u in (users if users is not None else relevant)})
    sums_r = dict.fromkeys(ks, 0.0)
    sums_n = dict.fromkeys(ks, 0.0)
    hits = dict.fromkeys(ks, 0)
    counted = skipped = n_rel = 0
    for u in who:
        rel = {int(x) for x in relevant.get(u, ())}
        if not rel:
            skipped += 1
            continue
        ranked = list(rankings.get(u, ()))
        counted += 1
        n_rel += len(rel)
        for k in ks:
            sums_r[k] += recall_at_k(ranked, rel, k)
            sums_n[k] += ndcg_at_k(ranked, rel, k)
            hits[k] += len(rel.intersection(int(x) for x in ranked[:k]))
    nan = float("nan")
    return RankingResult(
        recall={k: sums_r[k] / counted if counted else nan for k in ks},
        ndcg={k: sums_n[k] / counted if counted else nan for k in ks},
        users=counted,
        skipped=skipped,
        relevant=n_rel,
        hits=hits,
    )


def popularity_order(illust_ids: np.ndarray, bookmarks: np.ndarray, created_s: np.ndarray | None = None) -> np.ndarray:
    """``illust_ids`` sorted by bookmark count (descending), ties by creation time
    (``created_s``, newest first), then by id; ``bookmarks[i]`` counts item ``i``."""
    ids = np.asarray(illust_ids, dtype=np.int64)
    counts = np.asarray(bookmarks, dtype=np.float64)
    if counts.shape != ids.shape:
        raise ValueError(f"bookmarks must have one count per id: {counts.shape} vs {ids.shape}")
    created = np.zeros(len(ids)) if created_s is None else np.asarray(created_s, dtype=np.float64)
    return ids[np.lexsort((ids, -created, -counts))]


def popularity_ranking(order: np.ndarray, k: int, exclude: Collection[int] = ()) -> list[int]:
    """The first ``k`` ids of ``order`` (from :func:`popularity_order`) not in ``exclude``."""
    _check_k(k)
    out: list[int] = []
    ex = {int(x) for x in exclude}
    for x in order:
        if int(x) not in ex:
            out.append(int(x))
            if len(out) == k:
                break
    return out


def bookmark_counts(item_ids: np.ndarray, bookmarked: np.ndarray) -> np.ndarray:
    """How often each of ``item_ids`` occurs in ``bookmarked`` (the positives' ids)."""
    ids = np.asarray(item_ids, dtype=np.int64)
    uniq, counts = np.unique(np.asarray(bookmarked, dtype=np.int64), return_counts=True)
    pos = np.searchsorted(uniq, ids)
    pos = np.clip(pos, 0, max(len(uniq) - 1, 0))
    found = (len(uniq) > 0) & (uniq[pos] == ids) if len(uniq) else np.zeros(len(ids), bool)
    return np.where(found, counts[pos] if len(uniq) else 0, 0).astype(np.int64)
