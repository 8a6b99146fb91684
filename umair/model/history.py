"""The user's history *as of each row* as part of ``v_user`` (issues #15, #16: profile and
interest tags cannot tell which painting style a user likes, the items they bookmarked can;
and most users a live service scores are new since the last training run, so their history
must be the one known at the moment of the row, not a table frozen at training time).

For a row ``(u, t)`` and the user's real interactions strictly before ``t`` (the log
:class:`InteractionLog`: training, validation and test windows alike, as a live service knows
them; sampled negatives never enter it), ``L⁺`` their last ``K`` bookmarks and ``L⁻`` their
last ``K`` non-bookmarks (``K`` = ``cfg.history_len``), per vector modality ``m`` (e_TSEM,
e_SEM, e_STY, ...)::

    h⁺_m(u, t) = (1 / |L⁺_m|) Σ_{i ∈ L⁺_m} x_m(i)        [B, d_m]   (0 when L⁺_m = ∅)
    h⁻_m(u, t) = (1 / |L⁻_m|) Σ_{i ∈ L⁻_m} x_m(i)        [B, d_m]

with ``x_m`` the standardised vectors the model reads and ``L^±_m`` the items of ``L^±`` that
have modality m (an item without an image adds nothing to h_SEM / h_STY). :class:`UmairFPS`
maps them into ``v_user`` with the modality's own projection ``W_m`` (no bias, so the liked
history lives in the space of the item's projected ``e_m``) and a dislike projection ``D_m``::

    v_user = W_u u_raw + b_u + Σ_m (W_m h⁺_m + D_m h⁻_m)                       [B, d]

and ``x_0`` also gets, per modality, the cosine of the item to each history and the
behaviour statistics of :func:`history_stats` (counts ``n⁺``, ``n⁻`` of all earlier
bookmarks and passes, and their smoothed rate; a DCN-V2-only model reads those too)::

    x_0 += [cos(x_m(i), h⁺_m), cos(x_m(i), h⁻_m) ...;  log(1+n⁺), log(1+n⁻), (n⁺+1)/(n⁺+n⁻+2)]   [B, 2M + 3]

"Strictly before ``t``" keeps a row's own label out of its features, in training as at
serving; a row without a time (``recommend``, ``explain``: "now") reads the whole log.
Memory: the log is two int64 columns of the interactions (24 M rows: ~0.4 GB), sorted once
and shared by the workers of a node (:class:`SortedLog`); a batch gathers ``B x K`` item rows
per modality, in chunks (:data:`HISTORY_GATHER_FLOATS`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

HISTORY_GATHER_FLOATS = 1 << 24  # rows x K x d_m floats gathered at once (64 MiB of float32)


class HistoryBatch(NamedTuple):
    """``liked[m]`` / ``disliked[m]`` [B, d_m]: h⁺_m and h⁻_m of a batch of rows;
    ``counts`` [B, 2] float32: ``(n⁺, n⁻)``, all the user's bookmarks and passes before the
    row (not capped at K)."""

    liked: dict[str, Tensor]
    disliked: dict[str, Tensor]
    counts: Tensor


def history_stats(counts: Tensor) -> Tensor:
    """The behaviour part of the history, [B, 3]: ``log(1 + n⁺)``, ``log(1 + n⁻)`` and the
    smoothed bookmark rate ``(n⁺ + 1) / (n⁺ + n⁻ + 2)`` (``counts`` [B, 2] = ``(n⁺, n⁻)``).
    Content-free, so a DCN-V2-only model reads it too."""
    pos, neg = counts[:, 0], counts[:, 1]
    return torch.stack([torch.log1p(pos), torch.log1p(neg), (pos + 1) / (pos + neg + 2)], dim=1)


@dataclass(frozen=True, eq=False)
class SortedLog:
    """The real interactions sorted once, per label, by the composite key
    ``user_row · (R + 1) + rank(ts)`` (``R`` distinct times in the log): plain numpy, so a
    training job builds it once on its driver (:meth:`build`), puts it in the Ray object
    store with the item table, and every worker's :class:`InteractionLog` wraps the same
    read-only buffers without a copy (its memory does not grow with the interactions).

    ``times`` [R] int64, sorted; ``liked_keys`` / ``liked_items`` [n⁺] the bookmarks' keys
    (sorted) and item rows; ``passed_keys`` / ``passed_items`` [n⁻] the same for the rest."""

    times: np.ndarray
    liked_keys: np.ndarray
    liked_items: np.ndarray
    passed_keys: np.ndarray
    passed_items: np.ndarray

    @classmethod
    def build(cls, user_row: np.ndarray, ts: np.ndarray, item_row: np.ndarray, label: np.ndarray) -> SortedLog:
        """Sort a log: ``user_row`` [N] user-table rows, ``ts`` [N] int64 times (one unit for
        the whole log and the rows that query it, e.g. µs), ``item_row`` [N] item-table rows,
        ``label`` [N] (1 = bookmarked, 0 = seen and not bookmarked)."""
        user_row, ts = np.asarray(user_row, np.int64), np.asarray(ts, np.int64)
        item_row, label = np.asarray(item_row, np.int64), np.asarray(label)
        times = np.unique(ts)  # the distinct times, sorted: rank(t) = searchsorted(times, t)
        rank = np.searchsorted(times, ts)
        sides = []
        for mask in (label > 0.5, label <= 0.5):
            key = user_row[mask] * (len(times) + 1) + rank[mask]
            order = np.argsort(key, kind="stable")
            sides += [key[order], item_row[mask][order]]
        return cls(times, *sides)

    @property
    def stride(self) -> int:
        return len(self.times) + 1

    def __len__(self) -> int:
        return len(self.liked_keys) + len(self.passed_keys)


def shared_tensor(a: np.ndarray, device: torch.device | str) -> Tensor:
    """``a`` as a tensor on ``device``: on the CPU sharing its memory, also when ``a`` is
    read-only (a view of the Ray object store; the tensor must then never be written in
    place); on a GPU one device copy."""
    with warnings.catch_warnings():  # torch warns on read-only arrays, which it wraps as they are
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(np.ascontiguousarray(a), device=device)


class InteractionLog:
    """Each user's real interactions of a :class:`SortedLog`, as tensors on ``device`` (on
    the CPU the log's own buffers, no copy).

    A query ``(u, t)`` finds the user's entries with ``ts < t`` by one ``searchsorted`` on the
    composite key, so no per-user Python loop runs at any size."""

    def __init__(self, log: SortedLog, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.stride = log.stride
        self.sides: dict[bool, tuple[Tensor, Tensor]] = {  # liked? -> (sorted keys [n], item rows [n])
            True: (shared_tensor(log.liked_keys, self.device), shared_tensor(log.liked_items, self.device)),
            False: (shared_tensor(log.passed_keys, self.device), shared_tensor(log.passed_items, self.device)),
        }
        self._times = shared_tensor(log.times, self.device)

    def tensors(self) -> list[Tensor]:
        """The log's tensors (keys and item rows per label, times): what grows with the interactions."""
        return [*self.sides[True], *self.sides[False], self._times]

    def recent(self, user_row: Tensor, ts: Tensor | None, k: int, liked: bool) -> tuple[Tensor, Tensor, Tensor]:
        """The last ``k`` item rows [B, k] (newest first) the users ``user_row`` [B] liked (or
        did not) strictly before ``ts`` [B] (None: the whole log), their mask [B, k] bool and
        how many there are in all [B] int64 (not capped at ``k``)."""
        keys, items = self.sides[liked]
        u = user_row.to(self.device).long()
        base = u * self.stride
        start = torch.searchsorted(keys, base)
        if ts is None:
            end = torch.searchsorted(keys, base + self.stride)
        else:
            end = torch.searchsorted(keys, base + torch.searchsorted(self._times, ts.to(self.device).long()))
        idx = end.unsqueeze(1) - 1 - torch.arange(k, device=self.device)  # [B, k], newest first
        valid = idx >= start.unsqueeze(1)
        if len(items) == 0:
            return torch.zeros_like(idx), valid & False, end - start
        return items[idx.clamp(min=0)], valid, end - start


def history_means(
    log: InteractionLog,
    vectors: Mapping[str, Tensor],
    present: Mapping[str, Tensor],
    user_row: Tensor,
    ts: Tensor | None,
    k: int,
) -> HistoryBatch:
    """h⁺_m, h⁻_m and ``(n⁺, n⁻)`` (module docstring) of the rows ``user_row`` [B] at ``ts`` [B]
    (None: now) from the item tables ``vectors[m]`` [I, d_m] (float16 or float32) with
    ``present[m]`` [I] bool for the modalities some item lacks; gathered
    :data:`HISTORY_GATHER_FLOATS` at a time."""
    means: dict[bool, dict[str, Tensor]] = {True: {}, False: {}}
    counts = []
    widest = max((v.shape[1] for v in vectors.values()), default=1)
    chunk = max(1, HISTORY_GATHER_FLOATS // (k * widest))
    for liked in (True, False):
        items, valid, n = log.recent(user_row, ts, k, liked)
        counts.append(n.to(torch.float32))
        for m, table in vectors.items():
            w = (valid & present[m][items] if m in present else valid).to(torch.float32)
            w = w / w.sum(1, keepdim=True).clamp(min=1)
            parts = [
                torch.einsum("bk,bkd->bd", w[s : s + chunk], table[items[s : s + chunk]].float())
                for s in range(0, len(items), chunk)
            ]
            means[liked][m] = torch.cat(parts) if parts else torch.zeros(0, table.shape[1], device=table.device)
    return HistoryBatch(means[True], means[False], torch.stack(counts, dim=1))
