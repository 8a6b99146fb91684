"""Retrieval scores of a text encoder on (anchor, positive) pairs: R@1 and MRR."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


@torch.no_grad()
def retrieval_metrics(
    model: SentenceTransformer, anchors: Sequence[str], positives: Sequence[str], batch_size: int = 128
) -> dict[str, float]:
    """R@1 and MRR of anchor → positive, ranking every distinct positive by cosine.

    Returns ``{"r1", "mrr", "n"}`` (NaN scores for no pairs). Candidates are the
    distinct ``positives``. When an anchor has several positives (a title with two
    Chinese names), the others are left out of its ranking, so finding any one of them
    first is not counted as a miss.
    """
    if len(anchors) != len(positives):
        raise ValueError("anchors and positives differ in length")
    if not anchors:
        return {"r1": float("nan"), "mrr": float("nan"), "n": 0.0}
    cand = list(dict.fromkeys(positives))
    cidx = {c: i for i, c in enumerate(cand)}
    uniq_anchors = list(dict.fromkeys(anchors))
    aidx = {a: i for i, a in enumerate(uniq_anchors)}
    kw = dict(batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False)
    cand_emb = model.encode(cand, **kw).float()
    anchor_emb = model.encode(uniq_anchors, **kw).float()
    correct_of: dict[str, list[int]] = {}
    for a, p in zip(anchors, positives, strict=True):
        correct_of.setdefault(a, []).append(cidx[p])
    ranks = []
    for a, p in zip(anchors, positives, strict=True):
        scores = cand_emb @ anchor_emb[aidx[a]]
        target = cidx[p]
        others = [j for j in correct_of[a] if j != target]
        if others:
            scores = scores.clone()
            scores[others] = -math.inf
        s = scores[target]
        ranks.append(int((scores > s).sum()) + int((scores == s).sum()))  # ties count against
    r = np.asarray(ranks, dtype=np.float64)
    return {"r1": float((r == 1).mean()), "mrr": float((1.0 / r).mean()), "n": float(len(r))}
