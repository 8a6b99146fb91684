"""FinalMLP (Mao et al. 2023, arXiv 2304.00902) on this project's rows.

fuxictr (PyPI, 2.3.x) ships its layers but not its model zoo, so the model is built here:
the two MLP streams are fuxictr's ``MLP_Block`` and the tag pooling its
``MaskedAveragePooling``; the stream-specific feature selection and the multi-head
bilinear interaction aggregation are not among fuxictr's installed layers and are
written from the paper:

- inputs: every field embedded with width k (user id, mean-pooled interest tags u^IL,
  profile fields u^O, item fields i^O), each dense vector e_SEM / e_STY / e_TSEM projected
  to k by a linear layer (how fuxictr embeds pre-trained vector features), concatenated:
  ``e`` [B, F·k];
- feature selection (paper Eq. 5-6): ``g_s = 2 σ(MLP_s(c_s))`` with ``c_s`` a learnable
  context vector (the paper's default when no context fields are chosen), and the
  stream input ``x_s = g_s ⊙ e``, for streams s = 1, 2;
- two MLPs: ``o_1 = MLP_1(x_1)``, ``o_2 = MLP_2(x_2)``;
- interaction aggregation (paper Eq. 7-9): ``ŷ = b + w_1ᵀo_1 + w_2ᵀo_2 +
  Σ_h o_{1,h}ᵀ W_{3,h} o_{2,h}`` over ``heads`` chunks of both outputs; the logit is
  returned (apply σ outside).

Defaults here: both MLPs [64, 64, 64], feature-selection hidden [64], one head, embeddings
initialised N(0, 1e-4) like deepctr's; no batch norm, so batch size 1 works.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from umair.baselines.inputs import RowInputs
from umair.baselines.rankers import Ranker


def _fuxictr_layers() -> tuple[type[nn.Module], type[nn.Module]]:
    from fuxictr.pytorch.layers import MaskedAveragePooling, MLP_Block

    return MLP_Block, MaskedAveragePooling


class FeatureSelection(nn.Module):
    """Stream-specific gates ``g_s = 2 σ(MLP_s(c_s))`` over the flat embedding (paper §3.2)."""

    def __init__(self, feature_dim: int, context_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        mlp_block, _ = _fuxictr_layers()
        self.context = nn.ParameterList([nn.Parameter(torch.zeros(1, context_dim)) for _ in range(2)])
        self.gates = nn.ModuleList(
            mlp_block(
                input_dim=context_dim,
                hidden_units=list(hidden),
                hidden_activations="ReLU",
                output_dim=feature_dim,
                output_activation="Sigmoid",
            )
            for _ in range(2)
        )

    def forward(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_1, x_2)``, each ``g_s ⊙ e`` [B, F·k]."""
        out = [gate(ctx.expand(e.shape[0], -1)) * 2.0 * e for ctx, gate in zip(self.context, self.gates)]
        return out[0], out[1]


class InteractionAggregation(nn.Module):
    """``b + w_1ᵀo_1 + w_2ᵀo_2 + Σ_h o_{1,h}ᵀ W_{3,h} o_{2,h}`` (paper Eq. 7-9) -> [B]."""

    def __init__(self, dim1: int, dim2: int, heads: int = 1) -> None:
        super().__init__()
        if dim1 % heads or dim2 % heads:
            raise ValueError(f"FinalMLP: stream widths {dim1}, {dim2} must be divisible by heads={heads}")
        self.heads, self.h1, self.h2 = heads, dim1 // heads, dim2 // heads
        self.w1 = nn.Linear(dim1, 1)
        self.w2 = nn.Linear(dim2, 1, bias=False)
        self.w3 = nn.Parameter(torch.empty(heads, self.h1, self.h2))
        nn.init.xavier_normal_(self.w3)

    def forward(self, o1: Tensor, o2: Tensor) -> Tensor:
        b = o1.shape[0]
        a = o1.view(b, self.heads, self.h1)
        c = o2.view(b, self.heads, self.h2)
        bilinear = torch.einsum("bhi,hij,bhj->b", a, self.w3, c)
        return (self.w1(o1) + self.w2(o2)).squeeze(-1) + bilinear


class FinalMLP(nn.Module):
    """FinalMLP over user / item fields and the dense vectors; ``forward`` takes the
    keyword arguments of :meth:`UmairFPS.forward` and returns logits [B]."""

    def __init__(
        self,
        n_users: int,
        n_tags: int,
        user_fields: Mapping[str, int],
        item_fields: Mapping[str, int],
        vector_dims: Mapping[str, int],
        emb_dim: int = 8,
        mlp1: Sequence[int] = (64, 64, 64),
        mlp2: Sequence[int] = (64, 64, 64),
        fs_hidden: Sequence[int] = (64,),
        heads: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        mlp_block, pooling = _fuxictr_layers()
        k = emb_dim
        self.user_emb = nn.Embedding(n_users, k)
        self.tag_emb = nn.Embedding(n_tags, k, padding_idx=0)
        self.tag_pool = pooling()
        self.user_field_embs = nn.ModuleList(nn.Embedding(n, k) for n in user_fields.values())
        self.item_field_embs = nn.ModuleList(nn.Embedding(n, k) for n in item_fields.values())
        for emb in (self.user_emb, self.tag_emb, *self.user_field_embs, *self.item_field_embs):
            nn.init.normal_(emb.weight, std=1e-4)
        with torch.no_grad():
            self.tag_emb.weight[0].zero_()
        self.vector_names = tuple(vector_dims)
        self.vector_proj = nn.ModuleDict({m: nn.Linear(d, k) for m, d in vector_dims.items()})
        n_fields = 2 + len(user_fields) + len(item_fields) + len(vector_dims)
        feature_dim = n_fields * k
        self.feature_selection = FeatureSelection(feature_dim, k, fs_hidden)
        self.mlp1 = mlp_block(
            input_dim=feature_dim, hidden_units=list(mlp1), hidden_activations="ReLU", dropout_rates=dropout
        )
        self.mlp2 = mlp_block(
            input_dim=feature_dim, hidden_units=list(mlp2), hidden_activations="ReLU", dropout_rates=dropout
        )
        self.aggregate = InteractionAggregation(mlp1[-1], mlp2[-1], heads)

    def forward(
        self,
        user_id: Tensor,
        user_tags: Tensor,
        user_fields: Tensor,
        item_fields: Tensor,
        vectors: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        parts = [self.user_emb(user_id), self.tag_pool(self.tag_emb(user_tags), user_tags != 0)]
        parts += [t(user_fields[:, i]) for i, t in enumerate(self.user_field_embs)]
        parts += [t(item_fields[:, i]) for i, t in enumerate(self.item_field_embs)]
        given = vectors or {}
        for m in self.vector_names:
            if given.get(m) is None:
                raise ValueError(f"FinalMLP: built with {m!r} vectors but none were given")
            parts.append(self.vector_proj[m](given[m]))
        x1, x2 = self.feature_selection(torch.cat(parts, dim=-1))
        return self.aggregate(self.mlp1(x1), self.mlp2(x2))


class FinalMLPRanker(Ranker):
    """:class:`FinalMLP` behind :class:`Ranker`; reads the rows like :class:`UmairFPS`."""

    emits = "logits"

    def __init__(
        self,
        sizes: Mapping[str, object],
        vector_dims: Mapping[str, int],
        emb_dim: int = 8,
        seed: int = 0,
        name: str = "FinalMLP",
        **overrides: object,
    ) -> None:
        torch.manual_seed(seed)
        self.name = name
        self.vector_names = tuple(vector_dims)
        try:
            self.module = FinalMLP(
                sizes["n_users"],
                sizes["n_tags"],
                sizes["user_fields"],
                sizes["item_fields"],
                vector_dims,
                emb_dim,
                **overrides,
            )
        except TypeError as err:
            raise ValueError(f"{name}: bad FinalMLP argument: {err}") from None

    def encode(self, rows: RowInputs) -> dict[str, Tensor]:
        missing = [m for m in self.vector_names if m not in rows.vectors]
        if missing:
            raise ValueError(f"{self.name}: the rows hold no {missing} vectors")
        return {**rows.ids(), "vectors": {m: rows.vectors[m] for m in self.vector_names}}

    def forward(self, encoded: dict[str, Any], idx: Tensor) -> Tensor:
        ids = {k: v[idx] for k, v in encoded.items() if k != "vectors"}
        return self.module(**ids, vectors={m: v[idx] for m, v in encoded["vectors"].items()})
