"""Retrieval scores of a text encoder on (anchor, positive) pairs: R@1 and MRR.

:func:`retrieval_metrics` encodes with a model; :func:`metrics_from_scores` takes any
anchor × candidate score matrix (a TF-IDF baseline, say), so every retriever is scored
by the same definition. :func:`retrieval_sets` gives the rows and columns of that matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


def retrieval_sets(anchors: Sequence[str], positives: Sequence[str]) -> tuple[list[str], list[str]]:
    """(distinct anchors, distinct positives) in first-seen order: the rows and columns of
    the score matrix that :func:`metrics_from_scores` takes."""
    if len(anchors) != len(positives):
        raise ValueError("anchors and positives differ in length")
    return list(dict.fromkeys(anchors)), list(dict.fromkeys(positives))


def metrics_from_scores(scores: Any, anchors: Sequence[str], positives: Sequence[str]) -> dict[str, float]:
    """R@1 and MRR of anchor → positive from ``scores`` (distinct anchors × distinct
    positives, ordered as :func:`retrieval_sets` gives them; higher is better).

    Returns ``{"r1", "mrr", "n"}`` (NaN scores for no pairs). When an anchor has several
    positives (a title with two Chinese names), the others are left out of its ranking,
    so finding any one of them first is not counted as a miss. Ties count against: the
    rank of the positive is the number of candidates scoring at least as high.
    """
    uniq_anchors, cand = retrieval_sets(anchors, positives)
    if not anchors:
        return {"r1": float("nan"), "mrr": float("nan"), "n": 0.0}
    s = torch.as_tensor(np.asarray(scores, dtype=np.float32) if not torch.is_tensor(scores) else scores).float()
    if tuple(s.shape) != (len(uniq_anchors), len(cand)):
        raise ValueError(f"score matrix {tuple(s.shape)}, expected {(len(uniq_anchors), len(cand))}")
    cidx = {c: i for i, c in enumerate(cand)}
    aidx = {a: i for i, a in enumerate(uniq_anchors)}
    correct_of: dict[str, list[int]] = {}
    for a, p in zip(anchors, positives, strict=True):
        correct_of.setdefault(a, []).append(cidx[p])
    ranks = []
    for a, p in zip(anchors, positives, strict=True):
        row = s[aidx[a]]
        target = cidx[p]
        others = [j for j in correct_of[a] if j != target]
        if others:
            row = row.clone()
            row[others] = -math.inf
        t = row[target]
        ranks.append(int((row > t).sum()) + int((row == t).sum()))  # ties count against
    r = np.asarray(ranks, dtype=np.float64)
    return {"r1": float((r == 1).mean()), "mrr": float((1.0 / r).mean()), "n": float(len(r))}


@torch.no_grad()
def retrieval_metrics(
    model: SentenceTransformer, anchors: Sequence[str], positives: Sequence[str], batch_size: int = 128
) -> dict[str, float]:
    """R@1 and MRR of anchor → positive, ranking every distinct positive by cosine of the
    ``model``'s embeddings (:func:`metrics_from_scores`)."""
    uniq_anchors, cand = retrieval_sets(anchors, positives)
    if not anchors:
        return {"r1": float("nan"), "mrr": float("nan"), "n": 0.0}
    kw = dict(batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False)
    cand_emb = model.encode(cand, **kw).float()
    anchor_emb = model.encode(uniq_anchors, **kw).float()
    return metrics_from_scores((anchor_emb @ cand_emb.T).cpu(), anchors, positives)


def tfidf_scores(
    anchors: Sequence[str],
    candidates: Sequence[str],
    fit_texts: Sequence[str] | None = None,
    analyzer: str = "char_wb",
    ngram_range: tuple[int, int] = (1, 3),
) -> np.ndarray:
    """Cosine similarity of character n-gram TF-IDF vectors (scikit-learn), anchors ×
    candidates: the no-learning baseline. The vectoriser is fit on ``fit_texts`` (default:
    the anchors and candidates themselves)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(analyzer=analyzer, ngram_range=ngram_range, lowercase=True, sublinear_tf=True)
    vec.fit(list(fit_texts) if fit_texts is not None else [*anchors, *candidates])
    a, c = vec.transform(list(anchors)), vec.transform(list(candidates))  # rows are L2-normalised
    return (a @ c.T).toarray()
