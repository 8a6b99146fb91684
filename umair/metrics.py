"""Ranking metrics of the fusion model and its explanation statistics (no Ray).

- :func:`auc`: ROC AUC over all impressions (scikit-learn's ``roc_auc_score``).
- :func:`logloss`: binary cross-entropy of probabilities ``ŷ = σ(logit)``.
- :func:`gauc`: group AUC. Per user ``u`` with both classes, ``AUC_u``; then
  ``GAUC = Σ_u w_u AUC_u / Σ_u w_u`` with ``w_u`` = the user's impressions (default,
  as in DIN) or ``w_u = 1`` (``weighting="uniform"``). Users with one class only have
  no AUC and are skipped (counted in the result).
- :func:`modality_weights`: the effective weight of modality ``j`` in ``v_il``:
  ``ᾱ_j = Σ_k β_k α_{k,j}`` (``v_il = Σ_k β_k Σ_j α_{k,j} e_j``, paper Eq. 6-7 + MoE gate).
- :func:`mean_attention`: mean ``ᾱ`` per modality per user segment: each user's
  impressions are averaged first, then users are averaged, so every user counts once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Weighting = Literal["impressions", "uniform"]


def _arrays(
    labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {len(y)} vs {len(s)}")
    if len(y) and not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return y, s


def auc(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC; NaN when ``labels`` hold one class only (AUC is undefined)."""
    from sklearn.metrics import roc_auc_score

    y, s = _arrays(labels, scores)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, s))


def logloss(labels: Sequence[float] | np.ndarray, probs: Sequence[float] | np.ndarray, eps: float = 1e-7) -> float:
    """``-mean(y log p + (1 - y) log(1 - p))`` with ``p`` clipped to ``[eps, 1 - eps]``."""
    y, p = _arrays(labels, probs)
    if len(y) == 0:
        return float("nan")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


def rank_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUC as the Mann-Whitney statistic (ties count 1/2), equal to ``roc_auc_score``;
    used per user by :func:`gauc`, where scikit-learn's input checks dominate the cost.
    Both classes must be present."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    pos = labels == 1
    n_pos = float(pos.sum())
    n_neg = float(len(labels)) - n_pos
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class GaucResult:
    """``value``: the GAUC; ``users``: users counted; ``skipped``: users with one class."""

    value: float
    users: int
    skipped: int
    weighting: Weighting


def gauc(
    users: Sequence[int] | np.ndarray,
    labels: Sequence[float] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    weighting: Weighting = "impressions",
) -> GaucResult:
    """Group AUC over users (see the module docstring); NaN when no user has both classes."""
    y, s = _arrays(labels, scores)
    u = np.asarray(users).ravel()
    if u.shape != y.shape:
        raise ValueError(f"users and labels differ in length: {len(u)} vs {len(y)}")
    if weighting not in ("impressions", "uniform"):
        raise ValueError(f"weighting must be 'impressions' or 'uniform', got {weighting!r}")
    order = np.argsort(u, kind="stable")
    bounds = np.flatnonzero(np.diff(u[order])) + 1
    total = weight = 0.0
    counted = skipped = 0
    for idx in np.split(order, bounds) if len(order) else []:
        yu = y[idx]
        if yu.min() == yu.max():
            skipped += 1
            continue
        w = float(len(idx)) if weighting == "impressions" else 1.0
        total += w * rank_auc(yu, s[idx])
        weight += w
        counted += 1
    return GaucResult(total / weight if weight else float("nan"), counted, skipped, weighting)


def modality_weights(alpha: np.ndarray, beta: np.ndarray | None = None) -> np.ndarray:
    """``ᾱ`` [N, J] from ``alpha`` [N, K, J] and the gate ``beta`` [N, K]
    (``ᾱ_j = Σ_k β_k α_{k,j}``); ``alpha`` [N, J] is returned as is."""
    a = np.asarray(alpha, dtype=np.float64)
    if a.ndim == 2:
        return a
    if a.ndim != 3:
        raise ValueError(f"alpha must be [N, J] or [N, K, J], got shape {a.shape}")
    if beta is None:
        return a.mean(axis=1)
    b = np.asarray(beta, dtype=np.float64)
    if b.shape != a.shape[:2]:
        raise ValueError(f"beta must be [N, K] = {list(a.shape[:2])}, got {list(b.shape)}")
    return np.einsum("nk,nkj->nj", b, a)


def mean_attention(
    users: Sequence[int] | np.ndarray,
    weights: np.ndarray,
    modalities: Sequence[str],
    segment_of_user: dict[int, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Mean ``ᾱ`` per modality for each user segment (``"all"`` included).

    ``weights`` [N, J] (from :func:`modality_weights`), one row per impression of
    ``users``; users missing from ``segment_of_user`` count in ``"all"`` only. Returns
    ``{segment: {modality: mean, "users": n}}``.
    """
    w = np.asarray(weights, dtype=np.float64)
    u = np.asarray(users).ravel()
    if w.ndim != 2 or w.shape != (len(u), len(modalities)):
        raise ValueError(f"weights must be [N, J] = [{len(u)}, {len(modalities)}], got {list(w.shape)}")
    if len(u) == 0:
        return {}
    uniq, inverse = np.unique(u, return_inverse=True)
    per_user = np.zeros((len(uniq), w.shape[1]))
    np.add.at(per_user, inverse, w)
    per_user /= np.bincount(inverse, minlength=len(uniq))[:, None]
    segments = {"all": np.ones(len(uniq), dtype=bool)}
    if segment_of_user:
        labels = np.array([segment_of_user.get(int(x)) for x in uniq], dtype=object)
        for name in sorted({s for s in labels if s is not None}):
            segments[name] = labels == name
    out: dict[str, dict[str, float]] = {}
    for name, mask in segments.items():
        means = per_user[mask].mean(axis=0)
        out[name] = {m: float(v) for m, v in zip(modalities, means)} | {"users": int(mask.sum())}
    return out


PLANTED_MODALITY: dict[str, str] = {"style": "sty", "content": "sem", "tag": "tsem"}
"""The sample world's planted tastes (``truth/users.parquet`` ``taste``) and the modality
that carries each: style-driven users -> e_STY, content-driven -> e_SEM, tag-driven ->
e_TSEM (popularity-driven users have none)."""


def per_user_attention(users: Sequence[int] | np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(user ids [U], mean ᾱ per user [U, J])``: each user's impressions averaged."""
    w = np.asarray(weights, dtype=np.float64)
    u = np.asarray(users).ravel()
    if w.ndim != 2 or len(w) != len(u):
        raise ValueError(f"weights must be [N, J] with N = {len(u)}, got {list(w.shape)}")
    uniq, inverse = np.unique(u, return_inverse=True)
    per_user = np.zeros((len(uniq), w.shape[1]))
    np.add.at(per_user, inverse, w)
    per_user /= np.maximum(np.bincount(inverse, minlength=len(uniq)), 1)[:, None]
    return uniq, per_user


def alpha_spread(
    users: Sequence[int] | np.ndarray,
    weights: np.ndarray,
    modalities: Sequence[str],
    segment_of_user: dict[int, str],
    planted: dict[str, str] | None = None,
) -> dict[str, dict[str, object]]:
    """How user-aware ᾱ is, per segment (``"all"`` included): over the segment's users'
    mean ᾱ [U, J], the ``std`` per modality, and ``share_planted_top``, the share of its
    users whose largest ᾱ_j is the segment's planted modality (``planted``, default
    :data:`PLANTED_MODALITY`; None for a segment without one or a modality not stacked).
    For ``"all"`` the share counts every user whose segment has a planted modality."""
    planted = PLANTED_MODALITY if planted is None else planted
    uniq, per_user = per_user_attention(users, weights)
    seg = np.array([segment_of_user.get(int(x)) for x in uniq], dtype=object)
    top = np.asarray(modalities, dtype=object)[per_user.argmax(axis=1)] if len(uniq) else np.array([], object)
    want = np.array([planted.get(s) if s is not None else None for s in seg], dtype=object)
    want = np.array([m if m in modalities else None for m in want], dtype=object)
    out: dict[str, dict[str, object]] = {}
    for name in ["all", *sorted({s for s in seg if s is not None})]:
        mask = np.ones(len(uniq), bool) if name == "all" else seg == name
        has = mask & (want != None)  # noqa: E711 - elementwise on an object array
        out[name] = {
            "users": int(mask.sum()),
            "std": {m: float(per_user[mask, j].std()) for j, m in enumerate(modalities)} if mask.any() else {},
            "share_planted_top": float((top[has] == want[has]).mean()) if has.any() else None,
        }
    return out
