"""The user's bookmark history as part of ``v_user`` (issue #16: profile and interest tags
cannot tell which painting style a user likes; the items they bookmarked can).

Per vector modality ``m`` (e_TSEM, e_SEM, e_STY, ...) and user ``u`` with training-window
bookmarks ``P_u``::

    hist_m(u) = (1 / |P_u|) Σ_{i ∈ P_u} x_m(i)           [n_users, d_m]   (0 when P_u = ∅)

with ``x_m`` the standardised vectors the model reads. :class:`UmairFPS` maps it with the
modality's own projection ``W_m`` (no bias), so the history lives in the space of the
item's projected ``e_m`` and the UMCM query and the DCN-V2 crosses can match the two::

    v_user = W_u [E_uid(u); mean_t E_tag(t); E_f(u^O_f)...] + b_u + Σ_m W_m hist_m(u)   [B, d]

The table is a buffer of the model (saved in its state dict, not trained), indexed by
the user-id vocabulary index, so scoring, ``recommend`` and ``explain`` read it with no
new input. Cold-start users (index 0) and users without bookmarks have ``hist = 0``.

Absent modalities: ``P_u`` of modality m holds only the bookmarks that have m (an item
without an image adds nothing to hist_SEM / hist_STY; ``vectors.present`` of
:class:`umair.training.lookup.ItemVectors`), so hist_m is the mean of present vectors.

Leave-one-out in training: a positive training row's own item is part of its user's
history, which a test row's item never is; :meth:`UserHistory.leave_one_out` gives the
history without that item (``(n hist - x_i) / (n - 1)``), which the training step uses
for its positive rows so the model cannot learn "the item is in the history".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn


class UserHistory(nn.Module):
    """Mean standardised vectors of each user's bookmarks, per modality (buffers).

    Args:
        n_users: user-id vocabulary size (incl. the unknown index 0).
        widths: modality name -> vector width ``d_m``.
    """

    def __init__(self, n_users: int, widths: Mapping[str, int]) -> None:
        super().__init__()
        self.names: tuple[str, ...] = tuple(widths)
        self.widths = dict(widths)
        self.register_buffer("mean", torch.zeros(n_users, sum(widths.values())))
        self.register_buffer("count", torch.zeros(n_users))
        self.register_buffer("counts", torch.zeros(n_users, len(self.names)))  # bookmarks with each modality

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # a model saved before per-modality counts: every bookmark had every modality
        if prefix + "count" in state_dict and prefix + "counts" not in state_dict:
            state_dict[prefix + "counts"] = state_dict[prefix + "count"].unsqueeze(1).repeat(1, len(self.names))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _presence(self, vectors: Mapping[str, Tensor], n: int, device: torch.device) -> Tensor:
        """[n, M] presence of each modality in ``vectors`` (its ``present`` masks; default all)."""
        masks = getattr(vectors, "present", None) or {}
        ones = torch.ones(n, dtype=torch.bool, device=device)
        return torch.stack([masks[m].reshape(-1).bool().to(device) if m in masks else ones for m in self.names], 1)

    def fit(self, user_id: Tensor, labels: Tensor, vectors: Mapping[str, Tensor]) -> None:
        """Set the table from training rows: ``user_id`` [N] (vocabulary indices), ``labels``
        [N] (1 = bookmarked) and ``vectors[m]`` [N, d_m] (with ``vectors.present[m]`` [N]
        where some rows lack m); only the positive rows count, per modality those that have it."""
        self.fit_chunks([(user_id, labels, vectors)])

    def fit_chunks(self, chunks: Iterable[tuple[Tensor, Tensor, Mapping[str, Tensor]]]) -> None:
        """:meth:`fit` over the training rows given in pieces ``(user_id, labels, vectors)``
        (same shapes, [n_c] and [n_c, d_m]): sums and counts are accumulated chunk by chunk, so
        only one chunk's vectors are ever gathered (24 M rows x Σ d_m floats would not fit)."""
        device = self.mean.device
        width = torch.tensor([self.widths[m] for m in self.names], device=device)
        total, count, counts = torch.zeros_like(self.mean), torch.zeros_like(self.count), torch.zeros_like(self.counts)
        for user_id, labels, vectors in chunks:
            pos = labels.reshape(-1) > 0.5
            uid = user_id.reshape(-1)[pos].long().to(device)
            x = torch.cat([vectors[m][pos].float() for m in self.names], dim=1).to(device)
            has = self._presence(vectors, len(pos), device)[pos.to(device)]
            x = x * has.repeat_interleave(width, dim=1)  # absent vectors add nothing
            total.index_add_(0, uid, x)
            count.index_add_(0, uid, torch.ones_like(uid, dtype=count.dtype))
            counts.index_add_(0, uid, has.to(counts.dtype))
        total[0] = 0.0  # the unknown user never has a history
        count[0] = 0.0
        counts[0] = 0.0
        with torch.no_grad():
            self.mean.copy_(total / counts.clamp(min=1).repeat_interleave(width, dim=1))
            self.count.copy_(count)
            self.counts.copy_(counts)

    def forward(self, uid: Tensor) -> dict[str, Tensor]:
        """``hist_m`` [B, d_m] of the users ``uid`` [B] (vocabulary indices)."""
        return dict(zip(self.names, self.mean[uid].split(list(self.widths.values()), dim=1), strict=True))

    def leave_one_out(self, uid: Tensor, vectors: Mapping[str, Tensor], own: Tensor) -> dict[str, Tensor]:
        """``hist_m`` [B, d_m] with the row's own item removed where ``own`` [B] is true
        (a positive training row) and the item has m: ``(n_m hist - x) / (n_m - 1)``, 0 when
        it was the only one."""
        hist = self(uid)
        has = self._presence(vectors, len(uid), self.mean.device)
        out = {}
        for j, m in enumerate(self.names):
            n = self.counts[uid, j].unsqueeze(1)
            drop = (own.reshape(-1) * has[:, j]).reshape(-1, 1).to(hist[m].dtype)
            x = vectors[m].to(hist[m].dtype)
            loo = (n * hist[m] - x) / (n - 1).clamp(min=1)
            loo = torch.where(n > 1, loo, torch.zeros_like(loo))
            out[m] = drop * loo + (1 - drop) * hist[m]
        return out


def history_widths(vectors: Mapping[str, int], names: Sequence[str]) -> dict[str, int]:
    """The widths of the modalities ``names`` (stacking order) that have vectors."""
    return {m: vectors[m] for m in names if m in vectors}
