"""DCN-V2 cross network: explicit, bounded-degree feature crosses (paper section 2.5).

Shapes follow TorchRec's ``crossnet.py``: ``B`` is the batch size and ``D`` the width
of the stacked input ``x_0`` (every layer keeps that width).

- Full rank (:class:`CrossLayer`)::

      x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l          W_l: [D, D], b_l: [D]

- Low-rank mixture of experts (:class:`LowRankMixtureCrossLayer`), expert ``e`` of ``E``::

      E_e(x_l) = x_0 ⊙ (U_e g(C_e g(V_e x_l)) + b_l)  V_e: [r, D], C_e: [r, r], U_e: [D, r]
      G(x_l)   = softmax_e(<w_e, x_l>)                w_e: [D] (a gate vector per expert)
      x_{l+1}  = Σ_e G_e(x_l) E_e(x_l) + x_l

  ``g`` is ``tanh`` (DeepCTR's CrossNetMix, the authors' 2 layers / rank 32 / 4 experts)
  or ``relu`` (TorchRec); ``b_l`` is shared by the layer's experts as in both libraries.

:class:`CrossNet` stacks ``L`` layers; ``L = 0`` returns its input unchanged. Nothing
here depends on batch statistics, so any batch size (1 included) works in train and eval.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

CrossType = Literal["full", "lowrank"]
Activation = Literal["tanh", "relu"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


class CrossLayer(nn.Module):
    """One full-rank cross layer: ``x_0 ⊙ (W x_l + b) + x_l``.

    Args:
        in_features: ``D``, the width of ``x_0`` and ``x_l``.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, in_features)
        nn.init.xavier_normal_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x0: Tensor, xl: Tensor) -> Tensor:
        """``x0``, ``xl``: [B, D] -> [B, D]."""
        return x0 * self.linear(xl) + xl


class LowRankMixtureCrossLayer(nn.Module):
    """One low-rank mixture-of-experts cross layer (DCN-Mix).

    Args:
        in_features: ``D``.
        low_rank: ``r``, the rank of each expert's ``U C V`` factorisation.
        num_experts: ``E``.
        activation: ``g``, applied after ``V`` and after ``C``.

    Parameters: ``V`` [E, r, D], ``C`` [E, r, r], ``U`` [E, D, r], ``bias`` [D],
    ``gate`` [E, D] (one bias-free gate vector per expert).
    """

    def __init__(self, in_features: int, low_rank: int = 32, num_experts: int = 4, activation: Activation = "tanh") -> None:
        super().__init__()
        d, r, e = in_features, low_rank, num_experts
        self.V = nn.Parameter(torch.empty(e, r, d))
        self.C = nn.Parameter(torch.empty(e, r, r))
        self.U = nn.Parameter(torch.empty(e, d, r))
        self.bias = nn.Parameter(torch.zeros(d))
        self.gate = nn.Parameter(torch.empty(e, d))
        for p in (self.V, self.C, self.U):
            for k in range(e):
                nn.init.xavier_normal_(p.data[k])
        nn.init.xavier_normal_(self.gate)
        self.g = _ACTIVATIONS[activation]()

    def forward(self, x0: Tensor, xl: Tensor) -> Tensor:
        """``x0``, ``xl``: [B, D] -> [B, D]."""
        h = self.g(torch.einsum("erd,bd->ber", self.V, xl))  # [B, E, r]
        h = self.g(torch.einsum("ers,bes->ber", self.C, h))  # [B, E, r]
        experts = x0.unsqueeze(1) * (torch.einsum("edr,ber->bed", self.U, h) + self.bias)  # [B, E, D]
        weights = torch.softmax(xl @ self.gate.T, dim=-1)  # [B, E]
        return torch.einsum("be,bed->bd", weights, experts) + xl


class CrossNet(nn.Module):
    """``L`` stacked cross layers applied to ``x_0`` ([B, D] -> [B, D]).

    Args:
        in_features: ``D``.
        num_layers: ``L``; 0 makes the network the identity.
        cross_type: ``"full"`` (:class:`CrossLayer`) or ``"lowrank"``
            (:class:`LowRankMixtureCrossLayer`).
        low_rank, num_experts, activation: used by ``"lowrank"`` only.
    """

    def __init__(
        self,
        in_features: int,
        num_layers: int,
        cross_type: CrossType = "lowrank",
        low_rank: int = 32,
        num_experts: int = 4,
        activation: Activation = "tanh",
    ) -> None:
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            if cross_type == "full":
                layers.append(CrossLayer(in_features))
            elif cross_type == "lowrank":
                layers.append(LowRankMixtureCrossLayer(in_features, low_rank, num_experts, activation))
            else:
                raise ValueError(f"cross_type must be 'full' or 'lowrank', got {cross_type!r}")
        self.layers = nn.ModuleList(layers)

    def forward(self, x0: Tensor) -> Tensor:
        """``x0``: [B, D] -> ``x_L``: [B, D]."""
        xl = x0
        for layer in self.layers:
            xl = layer(x0, xl)
        return xl
