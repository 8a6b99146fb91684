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
    parameter ``weight`` (one optimizer update per layer instead of two). A state dict of
    the ``nn.Linear`` form (``linear.weight``, ``linear.bias``) loads too.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self._d = in_features
        linear = nn.Linear(in_features, in_features)  # same RNG draws as the nn.Linear form
        nn.init.xavier_normal_(linear.weight)
        nn.init.zeros_(linear.bias)
        self.weight = nn.Parameter(torch.cat([linear.weight.detach().reshape(-1), linear.bias.detach()]))
        self._register_load_state_dict_pre_hook(_merge_linear_state, with_module=True)

    @property
    def W(self) -> Tensor:  # noqa: N802 (the paper's name)
        return self.weight[: self._d * self._d].view(self._d, self._d)

    @property
    def bias(self) -> Tensor:
        return self.weight[self._d * self._d:]

    def forward(self, x0: Tensor, xl: Tensor) -> Tensor:
        """``x0``, ``xl``: [B, D] -> [B, D]."""
        d = self._d
        w, b = self.weight.split([d * d, d])
        return torch.addcmul(xl, x0, torch.addmm(b, xl, w.view(d, d).T))


def _merge_linear_state(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """load_state_dict pre-hook of :class:`CrossLayer`: ``linear.weight`` / ``linear.bias``."""
    keys = [prefix + "linear.weight", prefix + "linear.bias"]
    if prefix + "weight" not in state_dict and all(k in state_dict for k in keys):
        state_dict[prefix + "weight"] = torch.cat([state_dict.pop(k).reshape(-1) for k in keys])


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
    ``bias``. A state dict with the five separate tensors loads too.
    """

    def __init__(self, in_features: int, low_rank: int = 32, num_experts: int = 4, activation: Activation = "tanh") -> None:
        super().__init__()
        d, r, e = in_features, low_rank, num_experts
        self._shape = (e, r, d)
        v, c, u, gate = torch.empty(e, r, d), torch.empty(e, r, r), torch.empty(e, d, r), torch.empty(e, d)
        for p in (v, c, u):  # same draws, in the same order, as five separate parameters
            for k in range(e):
                nn.init.xavier_normal_(p[k])
        nn.init.xavier_normal_(gate)
        self.weight = nn.Parameter(_pack_lowrank(v, c, u, torch.zeros(d), gate))
        self.g = _ACTIVATIONS[activation]()
        self._register_load_state_dict_pre_hook(_merge_lowrank_state, with_module=True)

    def _blocks(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Views of ``weight``: ``[V; gate]`` [E r + E, D], ``C`` [E, r, r], ``Uᵀ`` [E r, D], ``bias`` [D]."""
        e, r, d = self._shape
        vg, c, ut, bias = self.weight.split([(e * r + e) * d, e * r * r, e * r * d, d])  # one backward cat
        return vg.view(e * r + e, d), c.view(e, r, r), ut.view(e * r, d), bias

    @property
    def V(self) -> Tensor:  # noqa: N802 (the paper's name)
        e, r, d = self._shape
        return self._blocks()[0][:e * r].view(e, r, d)

    @property
    def gate(self) -> Tensor:
        return self._blocks()[0][self._shape[0] * self._shape[1]:]

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


def _pack_lowrank(v: Tensor, c: Tensor, u: Tensor, bias: Tensor, gate: Tensor) -> Tensor:
    """The flat ``weight`` of :class:`LowRankMixtureCrossLayer`: V, gate, C, Uᵀ, bias."""
    return torch.cat([v.reshape(-1), gate.reshape(-1), c.reshape(-1), u.transpose(1, 2).reshape(-1), bias.reshape(-1)])


def _merge_lowrank_state(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """load_state_dict pre-hook: ``V``, ``C``, ``U``, ``bias``, ``gate`` saved as five
    tensors load into the flat ``weight``."""
    keys = [prefix + k for k in ("V", "C", "U", "bias", "gate")]
    if prefix + "weight" not in state_dict and all(k in state_dict for k in keys):
        state_dict[prefix + "weight"] = _pack_lowrank(*(state_dict.pop(k) for k in keys))


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
