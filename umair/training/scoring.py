"""Scoring rows with a trained model and the metrics of a window (AUC, logloss, GAUC,
mean modality attention per user segment)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from umair import storage
from umair.errors import FeatureError
from umair.metrics import mean_attention
from umair.training.lookup import Lookup, load_lookup

if TYPE_CHECKING:
    from umair.training.inputs import Prepared


@dataclass
class Scores:
    """Scores of some interaction rows: probabilities, and ᾱ [N, J] when multimodal."""

    probs: np.ndarray
    weights: np.ndarray | None


def score_rows(
    model: Any, lookup: Lookup, user_rows: Any, item_rows: Any, batch_size: int = 4096, ts: Any = None
) -> Scores:
    """σ(logit) and the effective modality weights ᾱ = Σ_k β_k α_k of each row; ``ts`` [N]
    int64 (None: now) is where a model with a user history cuts it (:mod:`umair.model.history`)."""
    import torch

    from umair.metrics import modality_weights

    model.eval()
    lookup.pack_for(model)
    probs, weights = [], []
    with torch.no_grad():
        for s in range(0, len(user_rows), batch_size):
            u, i = user_rows[s : s + batch_size], item_rows[s : s + batch_size]
            t = None if ts is None else ts[s : s + batch_size]
            out = model.explain(lookup.packed(u, i), lookup.row_vectors(u, i, t))
            probs.append(torch.sigmoid(out.logits).float().cpu().numpy())
            if out.alpha is not None:
                weights.append(modality_weights(out.alpha.float().cpu().numpy(), out.beta.float().cpu().numpy()))
    p = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    return Scores(p, np.concatenate(weights) if weights else None)


COLLAPSED_STD = 1e-3
"""A window whose predictions vary less than this (std of ŷ) is scored by a collapsed model: on the
demo's world a run whose deep MLP died had std 1e-6 (val AUC 0.5006), healthy runs ~0.12."""


def window_metrics(users: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, logloss and GAUC (impression-weighted; users with one class skipped) of one
    window, and ``pred_std``, the std of the predictions (:func:`collapse_warning` reads it)."""
    from umair.metrics import auc, gauc, logloss

    g = gauc(users, labels, probs)
    return {
        "auc": auc(labels, probs),
        "logloss": logloss(labels, probs),
        "gauc": g.value,
        "gauc_users": g.users,
        "gauc_skipped": g.skipped,
        "pred_std": float(np.std(probs)) if len(probs) else float("nan"),
    }


def collapse_warning(metrics: dict[str, float], prefix: str) -> str | None:
    """A one-line warning when every prediction of the window ``prefix`` (``val``, ``test``)
    is the same (``<prefix>_pred_std`` < :data:`COLLAPSED_STD`), else None: the model has
    collapsed (typically no unit of the deep MLP's last ReLU layer is active for any row),
    so its ``<prefix>_auc`` of 0.5 says nothing about the features or the settings."""
    std = metrics.get(f"{prefix}_pred_std")
    if std is None or std >= COLLAPSED_STD:
        return None
    return (
        f"every prediction in the {prefix} window is the same (std {std:.1e} < {COLLAPSED_STD:g}): the model collapsed, so "
        f"{prefix}_auc={metrics.get(f'{prefix}_auc', float('nan')):.4f} measures nothing; "
        "train again with another seed or a lower lr"
    )


def window_scores(
    model: Any,
    lookup: Lookup,
    user_rows: np.ndarray,
    item_rows: np.ndarray,
    labels: np.ndarray,
    prefix: str,
    batch_size: int = 4096,
    *,
    ts: np.ndarray,
) -> dict[str, float]:
    """:func:`window_metrics` of ``model`` on one window's rows (numpy ``user_row``,
    ``item_row``, ``label``, and ``ts`` where the model's user history is cut), keys ``<prefix>_auc``, ``<prefix>_logloss``, ``<prefix>_gauc``...
    (``val`` for the validation window scored every epoch, ``test`` for the test window
    scored once with the chosen weights). Empty rows give an empty dict."""
    import torch

    if len(labels) == 0:
        return {}
    device = lookup.uid.device
    scores = score_rows(
        model,
        lookup,
        torch.as_tensor(np.array(user_rows, np.int64), device=device),  # a copy: arrow's arrays are read-only
        torch.as_tensor(np.array(item_rows, np.int64), device=device),
        max(batch_size, 4096),
        torch.as_tensor(np.array(ts, np.int64), device=device),
    )
    m = window_metrics(np.asarray(user_rows), np.asarray(labels), scores.probs)
    return {f"{prefix}_{k}": float(v) for k, v in m.items()}


def score_state(
    prepared: Prepared, state_dict: dict[str, Any], batch_size: int, settings: storage.StorageSettings | None
) -> dict[str, float]:
    """``test_auc`` / ``test_logloss`` / ``test_gauc`` of the weights ``state_dict`` (the
    chosen epoch's) on ``prepared.test_rows``, scored once on the CPU of this process;
    empty when the test window is."""
    from umair.model.fusion import UmairFPS

    rows = prepared.test_rows
    if rows.num_rows == 0:
        return {}
    lookup, _, _ = load_lookup(
        prepared.space,
        prepared.inputs,
        prepared.modalities,
        "cpu",
        settings,
        prepared.info.fingerprint,
        prepared.users_fingerprint,
    )
    model = UmairFPS(prepared.model_config)
    model.load_state_dict(state_dict)
    u, i, ts, y = (rows.column(c).to_numpy() for c in ("user_row", "item_row", "ts", "label"))
    return window_scores(model, lookup, u, i, y, "test", batch_size, ts=ts)


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


def seen_before(ids: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Per row, True where ``ids[row]`` is in ``seen`` (the ids of the training window):
    a warm user or item; False: cold (first seen after the training window)."""
    return np.isin(np.asarray(ids), np.asarray(seen))


def warm_cold_report(
    users: np.ndarray, labels: np.ndarray, probs: np.ndarray, warm: dict[str, np.ndarray]
) -> dict[str, dict[str, dict[str, Any]]]:
    """AUC / logloss / GAUC of warm vs cold rows, per kind: ``warm["users"]`` is a row
    mask of users seen in the training window, ``warm["items"]`` of items. Returns
    ``{"users": {"warm": {...}, "cold": {...}}, "items": {...}}``; an empty side has
    ``rows`` 0 and NaN metrics."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for kind, mask in warm.items():
        out[kind] = {}
        for side, rows in (("warm", mask), ("cold", ~mask)):
            out[kind][side] = {
                "rows": int(rows.sum()),
                "users": int(len(np.unique(users[rows]))),
                **window_metrics(users[rows], labels[rows], probs[rows]),
            }
    return out
