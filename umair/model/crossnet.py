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

import torch
from torch import Tensor, nn

from umair.model.settings import Activation, CrossType

_ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


class CrossLayer(nn.Module):
    """One full-rank cross layer: ``x_0 ⊙ (W x_l + b) + x_l``.

    Args:
        in_features: ``D``, the width of ``x_0`` and ``x_l``.

    Parameters: ``W`` [D, D] (Xavier-normal) and ``b`` [D] (zeros) are views of one flat
    parameter ``weight`` [D D + D] (one optimizer update per layer instead of two).
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self._d = in_features
        self.weight = nn.Parameter(torch.empty(in_features * in_features + in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``W`` Xavier-normal, ``b`` zeros."""
        with torch.no_grad():
            nn.init.xavier_normal_(self.W)
            nn.init.zeros_(self.bias)

    @property
    def W(self) -> Tensor:  # noqa: N802 (the paper's name)
        return self.weight[: self._d * self._d].view(self._d, self._d)

    @property
    def bias(self) -> Tensor:
        return self.weight[self._d * self._d :]

    def forward(self, x0: Tensor, xl: Tensor) -> Tensor:
        """``x0``, ``xl``: [B, D] -> [B, D]."""
        d = self._d
        w, b = self.weight.split([d * d, d])
        return torch.addcmul(xl, x0, torch.addmm(b, xl, w.view(d, d).T))


class LowRankMixtureCrossLayer(nn.Module):
    """One low-rank mixture-of-experts cross layer (DCN-Mix).

    Args:
        in_features: ``D``.
        low_rank: ``r``, the rank of each expert's ``U C V`` factorisation.
        num_experts: ``E``.
        activation: ``g``, applied after ``V`` and after ``C``.

    Parameters: ``V`` [E, r, D], ``C`` [E, r, r], ``U`` [E, D, r], ``bias`` [D],
    ``gate`` [E, D] (one bias-free gate vector per expert). They are views of one flat
    parameter ``weight`` (one optimizer update per layer instead of five), laid out for
    the forward: ``[V; gate]`` as one [E r + E, D] block (one GEMM gives every ``V_e x_l``
    and every gate score), then ``C``, then ``U`` stored transposed ([E, r, D]), then
    ``bias``. Initialisation: every ``V_e``, ``C_e``, ``U_e`` and ``gate`` Xavier-normal
    (each expert's matrix on its own fans), ``bias`` zeros.
    """

    def __init__(
        self, in_features: int, low_rank: int = 32, num_experts: int = 4, activation: Activation = "tanh"
    ) -> None:
        super().__init__()
        d, r, e = in_features, low_rank, num_experts
        self._shape = (e, r, d)
        self.weight = nn.Parameter(torch.empty((e * r + e) * d + e * r * r + e * r * d + d))
        self.g = _ACTIVATIONS[activation]()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal ``V_e``, ``C_e``, ``U_e`` (per expert) and ``gate``; zero ``bias``."""
        with torch.no_grad():
            for block in (self.V, self.C, self.U):
                for expert in block:
                    nn.init.xavier_normal_(expert)
            nn.init.xavier_normal_(self.gate)
            nn.init.zeros_(self.bias)

    def _blocks(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Views of ``weight``: ``[V; gate]`` [E r + E, D], ``C`` [E, r, r], ``Uᵀ`` [E r, D], ``bias`` [D]."""
        e, r, d = self._shape
        vg, c, ut, bias = self.weight.split([(e * r + e) * d, e * r * r, e * r * d, d])  # one backward cat
        return vg.view(e * r + e, d), c.view(e, r, r), ut.view(e * r, d), bias

    @property
    def V(self) -> Tensor:  # noqa: N802 (the paper's name)
        e, r, d = self._shape
        return self._blocks()[0][: e * r].view(e, r, d)

    @property
    def gate(self) -> Tensor:
        return self._blocks()[0][self._shape[0] * self._shape[1] :]

    @property
    def C(self) -> Tensor:  # noqa: N802
        return self._blocks()[1]

    @property
    def U(self) -> Tensor:  # noqa: N802
        e, r, d = self._shape
        return self._blocks()[2].view(e, r, d).transpose(1, 2)

    @property
    def bias(self) -> Tensor:
        return self._blocks()[3]

    def forward(self, x0: Tensor, xl: Tensor) -> Tensor:
        """``x0``, ``xl``: [B, D] -> [B, D].

        Computed as ``x0 ⊙ (Σ_e G_e U_e h_e + b) + x_l`` (the gate weights sum to 1, so the
        shared bias factors out of the mixture) with the experts side by side: one GEMM
        for all ``V_e`` and the gate, one batched GEMM for the ``C_e``, one GEMM for all
        ``U_e`` (the gate-scaled ``h_e`` concatenated), no [B, E, D] intermediate."""
        e, r, _ = self._shape
        b = xl.shape[0]
        vg, c, ut, bias = self._blocks()
        z = xl @ vg.T  # [B, E r + E]: every V_e x_l, then every gate score <w_e, x_l>
        h, scores = z.split([e * r, e], dim=1)
        weights = torch.softmax(scores, dim=-1)  # [B, E]
        h = self.g(torch.bmm(self.g(h).view(b, e, r).transpose(0, 1), c.transpose(1, 2)))  # [E, B, r]: C_e h_e
        h = (h * weights.T.unsqueeze(-1)).transpose(0, 1).reshape(b, e * r)  # [B, E r]: G_e h_e
        return torch.addcmul(xl, x0, torch.addmm(bias, h, ut))  # x_l + x_0 ⊙ (Σ_e G_e U_e h_e + b)


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
