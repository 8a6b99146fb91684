"""UMCM: user-aware multi-modal contribution measurement (paper section 2.4).

Every module here takes the user vector ``v_user`` [B, d] and the stack of an item's
modality vectors ``e`` [B, J, d] (``e_j``: TSEM, SEM, STY, F_emb(i_O), each already
projected to width ``d``) and returns the reweighted item vector ``v_il`` [B, d]
together with the weights it used, so a recommendation can be explained.

- :class:`AttentionUMCM` (ATT, Eq. 6-7): ``a_j = <q, e_j>``, ``α = softmax_j(a)``,
  ``v_il = Σ_j α_j e_j`` with ``q = v_user`` exactly as in the paper when
  ``user_proj=False``. With ``user_proj=True`` (the default) each expert owns a
  bias-free ``d × d`` map ``W`` and uses ``q = W v_user``, initialised near the
  identity. Reason: Eq. 7 has no parameters, so K parameter-free ATT experts would
  be K copies of one function and the MoE over them would be pointless; the paper's
  Table 4 indeed reports equal parameter counts for ATT*2..4. ``user_proj=False``
  reproduces that.
- :class:`SENetUMCM` (SEN): squeeze each ``e_j`` to its mean, excite with two FC layers
  (``J -> max(1, J // reduction) -> J``, ReLU between), turn the scores into weights
  with ``softmax`` (default) or ``sigmoid`` (classic SENet), ``v_il = Σ_j α_j e_j``.
  Softmax is the default so SEN weights lie on the same simplex as ATT weights: the
  explanations compare, and the MoE gate sees ``v_il`` of comparable scale from
  either kind. SEN weights depend on the item only (the user enters through the gate).
- :class:`MeanUMCM` ("w/o UMCM"): ``α_j = 1/J``, the plain mean; no reweighting.
- :class:`MoEUMCM`: K parallel experts (any mix of the above), gate
  ``β = softmax_k(<v_user, v_il^k>)``, ``v_il = Σ_k β_k v_il^k``.

Absent modalities: every module takes an optional ``present`` [B, J] bool (False where the
item lacks modality j, e.g. no image: no e_SEM / e_STY). Then ``α_j = 0`` for an absent j
and the weights of the present ones are renormalised (the softmax runs over them only;
MEAN averages them; a sigmoid SEN weight is zeroed; SEN's squeeze ignores absent
e_j), so an absent modality's placeholder e_j never reaches ``v_il``. An item with no
modality present gets ``α = 0`` and ``v_il = 0``. ``present=None`` (or all true) computes
exactly what the unmasked module does, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from umair.model.settings import ExpertKind, SenWeights


class UMCMOutput(NamedTuple):
    """One expert's result: ``v_il`` [B, d] and the modality weights ``alpha`` [B, J]."""

    v_il: Tensor
    alpha: Tensor


class MoEOutput(NamedTuple):
    """The MoE's result: ``v_il`` [B, d], ``alpha`` [B, K, J] (per expert), ``beta`` [B, K]."""

    v_il: Tensor
    alpha: Tensor
    beta: Tensor


def masked_softmax(scores: Tensor, present: Tensor | None) -> Tensor:
    """``softmax_j`` of ``scores`` [B, J] over the present j only (0 for absent ones; all 0
    for a row with none present), finite gradients everywhere."""
    if present is None:
        return torch.softmax(scores, dim=-1)
    none = ~present.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~present, float("-inf")).masked_fill(none, 0.0)
    return torch.softmax(scores, dim=-1) * present


def _weighted_sum(alpha: Tensor, e: Tensor) -> Tensor:
    """``Σ_j α_j e_j``: ``alpha`` [B, J], ``e`` [B, J, d] -> [B, d]."""
    return torch.einsum("bj,bjd->bd", alpha, e)


class AttentionUMCM(nn.Module):
    """Dot-product attention of the user over the modalities (see module docstring).

    Args:
        d: modality width.
        user_proj: learn a per-expert query map ``W`` (``q = W v_user``); False gives
            the paper's parameter-free ``q = v_user``.
    """

    def __init__(self, d: int, user_proj: bool = True, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.query: nn.Linear | None = None
        if user_proj:
            self.query = nn.Linear(d, d, bias=False)
            with torch.no_grad():
                self.query.weight.copy_(torch.eye(d) + 0.1 * torch.randn(d, d))

    def forward(self, v_user: Tensor, e: Tensor, present: Tensor | None = None) -> UMCMOutput:
        """``v_user`` [B, d], ``e`` [B, J, d], ``present`` [B, J] -> (``v_il`` [B, d], ``alpha`` [B, J])."""
        q = v_user if self.query is None else self.query(v_user)
        alpha = masked_softmax(torch.einsum("bd,bjd->bj", q, e) / self.temperature, present)
        return UMCMOutput(_weighted_sum(alpha, e), alpha)


class SENetUMCM(nn.Module):
    """Squeeze-and-excitation weights over the J-modality stack (see module docstring).

    Args:
        n_modalities: ``J``.
        reduction: the hidden FC layer has ``max(1, J // reduction)`` units.
        weights: ``"softmax"`` (weights sum to 1) or ``"sigmoid"`` (each in (0, 1)).
    """

    def __init__(self, n_modalities: int, reduction: int = 2, weights: SenWeights = "softmax") -> None:
        super().__init__()
        hidden = max(1, n_modalities // reduction)
        self.fc1 = nn.Linear(n_modalities, hidden)
        self.fc2 = nn.Linear(hidden, n_modalities)
        if weights not in ("softmax", "sigmoid"):
            raise ValueError(f"weights must be 'softmax' or 'sigmoid', got {weights!r}")
        self.weights = weights

    def forward(self, v_user: Tensor, e: Tensor, present: Tensor | None = None) -> UMCMOutput:
        """``v_user`` [B, d] (unused), ``e`` [B, J, d], ``present`` [B, J] -> (``v_il`` [B, d], ``alpha`` [B, J])."""
        z = e.mean(dim=-1)  # squeeze: [B, J]
        if present is not None:
            z = z * present  # an absent modality's placeholder says nothing
        s = self.fc2(torch.relu(self.fc1(z)))  # excitation scores: [B, J]
        if self.weights == "softmax":
            alpha = masked_softmax(s, present)
        else:
            alpha = torch.sigmoid(s) if present is None else torch.sigmoid(s) * present
        return UMCMOutput(_weighted_sum(alpha, e), alpha)


class MeanUMCM(nn.Module):
    """No reweighting: ``α_j = 1/J``, ``v_il`` is the mean of the modality vectors."""

    def forward(self, v_user: Tensor, e: Tensor, present: Tensor | None = None) -> UMCMOutput:
        """``v_user`` [B, d] (unused), ``e`` [B, J, d], ``present`` [B, J] -> (``v_il`` [B, d], ``alpha`` [B, J])
        (``α_j = 1 / #present``; rows with every modality present as without a mask)."""
        alpha = torch.full(e.shape[:2], 1.0 / e.shape[1], dtype=e.dtype, device=e.device)
        if present is None:
            return UMCMOutput(e.mean(dim=1), alpha)
        full = present.all(dim=-1, keepdim=True)
        share = present / present.sum(dim=-1, keepdim=True).clamp(min=1)
        alpha = torch.where(full, alpha, share.to(e.dtype))
        return UMCMOutput(torch.where(full, e.mean(dim=1), _weighted_sum(alpha, e)), alpha)


def build_expert(
    kind: ExpertKind,
    d: int,
    n_modalities: int,
    att_user_proj: bool = True,
    sen_reduction: int = 2,
    sen_weights: SenWeights = "softmax",
    att_temperature: float = 1.0,
) -> nn.Module:
    """One UMCM expert of the given kind: ``"att"``, ``"sen"`` or ``"mean"``."""
    if kind == "att":
        return AttentionUMCM(d, att_user_proj, att_temperature)
    if kind == "sen":
        return SENetUMCM(n_modalities, sen_reduction, sen_weights)
    if kind == "mean":
        return MeanUMCM()
    raise ValueError(f"unknown UMCM expert kind {kind!r}; expected 'att', 'sen' or 'mean'")


class MoEUMCM(nn.Module):
    """K parallel UMCM experts combined by a dot-product gate with the user as query.

    Args:
        experts: the kind of each expert, e.g. ``("att", "sen", "att")``; ``K = len``.
        d: modality width.
        n_modalities: ``J``.
        att_user_proj, sen_reduction, sen_weights: passed to the experts.
    """

    def __init__(
        self,
        experts: Sequence[ExpertKind],
        d: int,
        n_modalities: int,
        att_user_proj: bool = True,
        sen_reduction: int = 2,
        sen_weights: SenWeights = "softmax",
        att_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not experts:
            raise ValueError("MoEUMCM needs at least one expert")
        self.kinds = tuple(experts)
        self.experts = nn.ModuleList(
            build_expert(k, d, n_modalities, att_user_proj, sen_reduction, sen_weights, att_temperature)
            for k in self.kinds
        )

    def forward(self, v_user: Tensor, e: Tensor, present: Tensor | None = None) -> MoEOutput:
        """``v_user`` [B, d], ``e`` [B, J, d], ``present`` [B, J] bool (None: all) ->
        (``v_il`` [B, d], ``alpha`` [B, K, J], ``beta`` [B, K]); see the module docstring."""
        outs = [expert(v_user, e, present) for expert in self.experts]
        v_k = torch.stack([o.v_il for o in outs], dim=1)  # [B, K, d]
        alpha = torch.stack([o.alpha for o in outs], dim=1)  # [B, K, J]
        beta = torch.softmax(torch.einsum("bd,bkd->bk", v_user, v_k), dim=-1)
        return MoEOutput(torch.einsum("bk,bkd->bd", beta, v_k), alpha, beta)
