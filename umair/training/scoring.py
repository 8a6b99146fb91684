"""Scoring rows with a trained model and the metrics of a window (AUC, logloss, GAUC,
mean modality attention per user segment)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from umair import storage
from umair.errors import FeatureError
from umair.metrics import mean_attention
from umair.training.lookup import Lookup


@dataclass
class Scores:
    """Scores of some interaction rows: probabilities, and ᾱ [N, J] when multimodal."""

    probs: np.ndarray
    weights: np.ndarray | None


def score_rows(model: Any, lookup: Lookup, user_rows: Any, item_rows: Any, batch_size: int = 4096) -> Scores:
    """σ(logit) and the effective modality weights ᾱ = Σ_k β_k α_k of each row."""
    import torch

    from umair.metrics import modality_weights

    model.eval()
    lookup.pack_for(model)
    probs, weights = [], []
    with torch.no_grad():
        for s in range(0, len(user_rows), batch_size):
            u, i = user_rows[s : s + batch_size], item_rows[s : s + batch_size]
            out = model.explain(lookup.packed(u, i), lookup.item_vectors(i))
            probs.append(torch.sigmoid(out.logits).float().cpu().numpy())
            if out.alpha is not None:
                weights.append(modality_weights(out.alpha.float().cpu().numpy(), out.beta.float().cpu().numpy()))
    p = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    return Scores(p, np.concatenate(weights) if weights else None)


def window_metrics(users: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, logloss and GAUC (impression-weighted; users with one class skipped) of one window."""
    from umair.metrics import auc, gauc, logloss

    g = gauc(users, labels, probs)
    return {
        "auc": auc(labels, probs),
        "logloss": logloss(labels, probs),
        "gauc": g.value,
        "gauc_users": g.users,
        "gauc_skipped": g.skipped,
    }


def segment_map(uri: str | None, column: str, settings: storage.StorageSettings | None) -> dict[int, str]:
    """user_id -> segment from a table with ``user_id`` and ``column`` (empty without one)."""
    if uri is None:
        return {}
    table = storage.read_parquet(uri, settings)
    if "user_id" not in table.column_names or column not in table.column_names:
        raise FeatureError(
            f"{uri}: expected columns 'user_id' and '{column}' (columns: {', '.join(table.column_names)})"
        )
    return {
        int(u): str(s)
        for u, s in zip(table.column("user_id").to_pylist(), table.column(column).to_pylist())
        if s is not None
    }


def segment_report(
    users: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    weights: np.ndarray | None,
    modalities: list[str],
    segments: dict[int, str],
) -> dict[str, dict[str, Any]]:
    """Per segment (``all`` first): rows, users, AUC, logloss, GAUC and mean ᾱ per modality."""
    alpha = mean_attention(users, weights, modalities, segments) if weights is not None else {}
    seg_of_row = np.array([segments.get(int(u), "") for u in users], dtype=object)
    names = ["all"] + sorted({s for s in seg_of_row if s})
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        mask = np.ones(len(users), bool) if name == "all" else seg_of_row == name
        m = window_metrics(users[mask], labels[mask], probs[mask])
        out[name] = {
            "rows": int(mask.sum()),
            "users": int(len(np.unique(users[mask]))),
            **m,
            "alpha": {k: v for k, v in alpha.get(name, {}).items() if k != "users"},
        }
    return out
