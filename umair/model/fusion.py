"""UMAIR-FPS: user-aware multi-modal fusion + DCN-V2 crosses + deep MLP -> one logit.

:class:`UmairFPS` is the model (its docstring gives the formulas, inputs and outputs);
:class:`FusionOutput` what :meth:`UmairFPS.explain` returns. The building blocks are
:mod:`umair.model.umcm` (UMCM experts and their MoE) and :mod:`umair.model.crossnet`
(DCN-V2 cross layers); :class:`ModelConfig` (:mod:`umair.model.settings`) holds every knob.

No layer depends on batch statistics, so batch size 1 works in train and eval mode.

Layout for speed (the function computed is the one of :class:`UmairFPS`): every id table
is a block of rows of one ``embeddings`` table (``user_emb``, ``tag_emb``,
``user_field_embs``, ``user_bag_embs``, ``item_field_embs``, ``item_bag_embs`` are views of
it) read by one weighted ``embedding_bag`` per step (:mod:`umair.model.packing`;
:meth:`UmairFPS.pack_ids` turns the ids into rows of it; pack
a whole window, or each table once, and call the model on the packed ids), and the deep MLP, each
cross layer (either form) and the output layer keep their weights and biases in one flat
parameter each, so Adam updates a handful of tensors per step (5 for the default 2-layer
model without UMCM). Initialisation: tables N(0, 0.1²) (the tag padding row 0), MLP and
output layer like ``nn.Linear``, cross layers as in :mod:`umair.model.crossnet`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from umair.model.crossnet import CrossNet
from umair.model.history import HistoryBatch, history_stats
from umair.model.packing import PackLayout, compact_tags  # noqa: F401  (compact_tags re-exported)
from umair.model.settings import META, ModelConfig
from umair.model.umcm import MoEUMCM


class FusionOutput(NamedTuple):
    """``logits`` [B]; ``alpha`` [B, K, J] and ``beta`` [B, K] (None for "w/o ALL")."""

    logits: Tensor
    alpha: Tensor | None
    beta: Tensor | None


def _linear_init_(weight: Tensor, bias: Tensor, fan_in: int) -> None:
    """``nn.Linear``'s default initialisation, in place: weight and bias ~ U(-1/√fan_in, 1/√fan_in)
    (what its ``kaiming_uniform_(a=√5)`` amounts to)."""
    bound = 1.0 / fan_in**0.5 if fan_in > 0 else 0.0
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


class _FlatMLP(nn.Module):
    """The deep MLP: per width ``Linear`` -> ReLU (-> dropout), with every weight and bias
    a view of one flat parameter ``weight`` (one optimizer update instead of two per
    layer), each layer initialised like ``nn.Linear``. No widths: the identity."""

    def __init__(self, in_features: int, widths: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        dims = (in_features, *widths)
        self.shapes = list(zip(dims[1:], dims[:-1], strict=True))  # (out, in) of each layer
        self._sizes = [n for o, i in self.shapes for n in (o * i, o)]
        self.out_features = dims[-1]
        self.dropout = dropout
        self.weight = nn.Parameter(torch.empty(sum(self._sizes))) if self.shapes else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is None:
            return
        with torch.no_grad():
            parts = self.weight.split(self._sizes)
            for j, (_, i) in enumerate(self.shapes):
                _linear_init_(parts[2 * j], parts[2 * j + 1], i)

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is None:
            return x
        parts = self.weight.split(self._sizes)
        for j, (o, i) in enumerate(self.shapes):
            x = torch.relu(torch.addmm(parts[2 * j + 1], x, parts[2 * j].view(o, i).T))
            if self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
        return x


class _FlatLinear(nn.Module):
    """``nn.Linear(in_features, out_features)`` (its initialisation too) whose weight and
    bias are views of one flat parameter ``flat`` (one optimizer update instead of two)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.flat = nn.Parameter(torch.empty(in_features * out_features + out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            _linear_init_(self.weight, self.bias, self.in_features)

    @property
    def weight(self) -> Tensor:
        return self.flat[: self.in_features * self.out_features].view(self.out_features, self.in_features)

    @property
    def bias(self) -> Tensor:
        return self.flat[self.in_features * self.out_features :]

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.flat.split([self.in_features * self.out_features, self.out_features])
        return torch.addmm(b, x, w.view(self.out_features, self.in_features).T)


class UmairFPS(nn.Module):
    """The UMAIR-FPS ranking model (paper section 2.4-2.5): one bookmark logit per
    user-item pair from id embeddings, the item's image / text features and their
    user-aware fusion.

    With ``k`` = ``emb_dim`` (8 like the paper), ``d`` the common width, ``E_*`` the id
    embedding tables (width ``k``) and ``[a; b]`` concatenation::

        raw      = [u_raw; E_f(i^O_f)...; mean_{g ∈ i_b} E_b(g)...]                       [B, (2 + P + U + M + I) k]
        u_raw    = [E_uid(u); mean_{t ∈ u^IL} E_tag(t); E_f(u^O_f)...; mean_{g ∈ u_b} E_b(g)...]
        v_user   = W_u u_raw + b_u                                                       [B, d]
        e_j      = W_j x_j + b_j   for x_j in (e_TSEM, e_SEM, e_STY, F_emb(i^O))          [B, J, d]
        F_emb(i^O) = [E_f(i^O_f)...; mean_{g ∈ i_b} E_b(g)...]                            [B, (M + I) k]

    with P profile fields, U user bags, M item fields and I item bags (a bag field ``b``:
    a list<string> column such as genres, its ids mean-pooled over the non-padding ones, an
    empty bag the zero vector; ``cfg.user_bags`` / ``cfg.item_bags``). The enabled
    modalities come in that order (:attr:`modality_names`; the last one is ``F_emb(i^O)``,
    present when there are item fields or item bags). ``cfg.user_history`` adds
    ``Σ_m (W_m h⁺_m + D_m h⁻_m)`` to ``v_user`` (mean vectors of the user's last bookmarks and
    non-bookmarks before the row, ``vectors.history``; :mod:`umair.model.history`) and appends
    the item's cosine to each history and the user's behaviour statistics to ``x_0`` (those
    alone without modalities); ``cfg.modality_norm = "l2"`` rescales every ``e_j`` to
    norm ``√d``, so only α sets a modality's share of ``v_il``. UMCM (:mod:`umair.model.umcm`),
    ``K`` experts of ``cfg.expert_kinds``; an ATT expert ``k``::

        α^k_j    = softmax_j(<q_k, e_j> / τ),  q_k = v_user (paper) or W_k v_user       [B, K, J]
        v_il^k   = Σ_j α^k_j e_j                                                         [B, K, d]

    (a SEN expert takes ``α^k`` from squeeze-and-excitation of ``e``, "w/o UMCM" is the
    mean), and the gate::

        β_k      = softmax_k(<v_user, v_il^k>)                                           [B, K]
        v_il     = Σ_k β_k v_il^k                                                        [B, d]

    then DCN-V2 (:mod:`umair.model.crossnet`, ``L = cfg.cross_layers``; the low-rank
    mixture of experts form by default), the deep MLP and the output layer::

        x_0      = [raw; v_user; v_il]                                                   [B, D]
        x_{l+1}  = x_0 ⊙ (W_l x_l + b_l) + x_l,    l = 0 .. L - 1                        [B, D]
        h        = MLP(x_L)    (ReLU layers ``cfg.mlp``; "parallel": [x_L; MLP(x_0)])
        logit    = w_o h + b_o,    ŷ = sigmoid(logit)                                    [B]

    (b_o starts at log(p / (1 - p)) for ``cfg.label_prior`` = p, the training base rate.)

    The sigmoid is left to the caller (train with ``BCEWithLogitsLoss``). With every
    multimodal feature off ("w/o ALL") there is no ``v_user``, ``e``, UMCM: ``x_0 = raw``,
    a DCN-V2 model over id / metadata embeddings (:func:`umair.model.settings.dcn_v2_only` is the same with
    DCN-V2's own full-rank cross).

    Args:
        cfg: every knob (:class:`ModelConfig`): vocabulary sizes, the vector modalities
            read and their widths (``vectors``, names from :mod:`umair.modalities`),
            ``emb_dim``, ``d``, the UMCM experts, the cross network and the MLP.

    Inputs (one batch of B user-item pairs; every id is a vocabulary index, 0 =
    out-of-vocabulary / padding, see :mod:`umair.model.vocab`). The ids go through
    :meth:`pack_ids` into one matrix ``packed`` [B, 1 + T + P + U·L + M + I·L] (L =
    ``cfg.max_bag``) that :meth:`forward` and :meth:`explain` read, with the item vectors as a
    mapping ``vectors``:

    =============  ==============  ====================================================
    name           shape, dtype    meaning
    =============  ==============  ====================================================
    user_id        [B] int64       the user (``n_users`` rows)
    user_tags      [B, T] int64    the user's interest tags u^IL, padded with 0; the
                                   non-zero entries are mean-pooled (all-0 -> zero vector)
    user_fields    [B, P] int64    profile fields u^O, columns in ``user_fields`` order
    item_fields    [B, M] int64    item metadata i^O (bucketised created_at, size, page
                                   count, artist, optionally the illustration id itself),
                                   columns in ``item_fields`` order
    user_bags[b]   [B, L] int64    each user bag (``cfg.user_bags``), 0-padded, L <= ``cfg.max_bag``;
                                   mean-pooled like the tags
    item_bags[b]   [B, L] int64    each item bag (``cfg.item_bags``: genres, cast...), likewise
    vectors[m]     [B, d_m] float  each modality m of ``cfg.vectors`` (e_SEM ``sem``,
                                   e_STY ``sty``, e_TSEM ``tsem``, any registered one)
    =============  ==============  ====================================================

    Outputs: :meth:`forward` the logits [B]; :meth:`explain` a :class:`FusionOutput`
    (``logits`` [B], ``alpha`` [B, K, J], ``beta`` [B, K]; None for "w/o ALL").

    Example::

        >>> import torch
        >>> from umair.model import ModelConfig, UmairFPS
        >>> cfg = ModelConfig(n_users=10, n_tags=20, user_fields={"gender": 3},
        ...                   item_fields={"artist": 7, "size": 4}, vectors={"sem": 12, "sty": 6, "tsem": 5})
        >>> model = UmairFPS(cfg).eval()
        >>> B = 4
        >>> ids = dict(user_id=torch.tensor([1, 2, 3, 0]),
        ...            user_tags=torch.tensor([[3, 7, 0], [1, 0, 0], [0, 0, 0], [2, 5, 9]]),
        ...            user_fields=torch.tensor([[1], [2], [0], [1]]),
        ...            item_fields=torch.tensor([[6, 1], [2, 3], [0, 0], [4, 2]]))
        >>> packed = model.pack_ids(**ids)  # [B, 1 + T + P + M]
        >>> packed.shape
        torch.Size([4, 7])
        >>> vectors = dict(sem=torch.randn(B, 12), sty=torch.randn(B, 6), tsem=torch.randn(B, 5))
        >>> logits = model(packed, vectors)
        >>> logits.shape
        torch.Size([4])
        >>> probs = torch.sigmoid(logits)  # bookmark probabilities
        >>> out = model.explain(packed, vectors)
        >>> model.modality_names, out.alpha.shape, out.beta.shape  # J = 4, K = 3
        (('tsem', 'sem', 'sty', 'meta'), torch.Size([4, 3, 4]), torch.Size([4, 3]))
        >>> bool(torch.allclose(out.alpha.sum(-1), torch.ones(B, 3)))
        True
        >>> bool(torch.allclose(out.logits, logits))
        True
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        k, d = cfg.emb_dim, cfg.d
        # Every id table (user id, tags, each profile field / user bag, each item field / item
        # bag) is one block of rows of a single [Σ vocab, k] table: one lookup, one L2 norm and
        # one Adam update per step instead of one per table. ``user_emb`` etc. are views of the
        # blocks; the column layout of packed ids is :class:`umair.model.packing.PackLayout`'s.
        self.layout = layout = PackLayout(cfg)
        starts, sizes, n = layout.starts, layout.sizes, layout.total_rows
        self.embeddings = nn.Embedding(n, k, padding_idx=starts[1], _weight=torch.empty(n, k))
        with torch.no_grad():
            nn.init.normal_(self.embeddings.weight, std=0.1)
            self.embeddings.weight[starts[1]].zero_()  # tag padding (tag id 0)
            for row in layout.bag_blocks():  # bag padding (id 0 of every bag field)
                self.embeddings.weight[row].zero_()
        views = [_TableView(self, a, n) for a, n in zip(starts, sizes, strict=True)]
        p, u, m = len(cfg.user_fields), len(cfg.user_bags), len(cfg.item_fields)
        self.user_emb, self.tag_emb = views[0], views[1]
        self.user_field_embs: tuple[_TableView, ...] = tuple(views[2 : 2 + p])
        self.user_bag_embs: tuple[_TableView, ...] = tuple(views[2 + p : 2 + p + u])
        self.item_field_embs: tuple[_TableView, ...] = tuple(views[2 + p + u : 2 + p + u + m])
        self.item_bag_embs: tuple[_TableView, ...] = tuple(views[2 + p + u + m :])
        user_width = (2 + p + u) * k
        item_width = (m + len(cfg.item_bags)) * k
        self.modality_names: tuple[str, ...] = cfg.modalities
        width = user_width + item_width
        if cfg.multimodal:
            self.user_proj = nn.Linear(user_width, d)
            in_dims = {**cfg.vectors, META: item_width}
            self.modality_proj = nn.ModuleDict({m: nn.Linear(in_dims[m], d) for m in self.modality_names})
            self.umcm = MoEUMCM(
                cfg.expert_kinds,
                d,
                len(self.modality_names),
                cfg.att_user_proj,
                cfg.sen_reduction,
                cfg.sen_weights,
                cfg.att_temperature,
            )
            width += 2 * d
        # D_m of the dislike history h⁻_m (umair.model.history); W_m of h⁺_m is modality_proj[m]'s
        self.history_names: tuple[str, ...] = ()
        if cfg.multimodal and cfg.user_history:
            self.history_names = tuple(m for m in self.modality_names if m in cfg.vectors)
            self.dislike_proj = nn.ModuleDict({m: nn.Linear(cfg.vectors[m], d, bias=False) for m in self.history_names})
        self.cosine_names = self.history_names if cfg.history_cosines else ()
        if cfg.user_history:  # x_0 += [cos(x_m, h⁺_m), cos(x_m, h⁻_m) ...; history_stats]
            width += 2 * len(self.cosine_names) + 3
        self.x0_width = width
        self.cross = CrossNet(
            width, cfg.cross_layers, cfg.cross_type, cfg.low_rank, cfg.cross_experts, cfg.cross_activation
        )
        self.deep = _FlatMLP(width, cfg.mlp, cfg.dropout)
        deep_out = self.deep.out_features
        parallel = cfg.structure == "parallel" and cfg.cross_layers > 0
        self.head = _FlatLinear(deep_out + (width if parallel else 0), 1)
        if cfg.label_prior is not None:  # b_o = logit(p): ŷ starts near the base rate
            with torch.no_grad():
                self.head.bias.fill_(math.log(cfg.label_prior / (1.0 - cfg.label_prior)))

    def pack_ids(
        self,
        user_id: Tensor,
        user_tags: Tensor,
        user_fields: Tensor | None = None,
        item_fields: Tensor | None = None,
        drop_tag_padding: bool = False,
        user_bags: Mapping[str, Tensor] | None = None,
        item_bags: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """The id inputs as one int64 matrix [B, 1 + T + P + U·L + M + I·L] of rows of the
        fused table ``embeddings`` (columns: user id, the T tags, profile fields, user bags,
        item fields, item bags; each id shifted to its table's block; layout:
        :mod:`umair.model.packing`). ``user_bags[name]`` / ``item_bags[name]`` [B, L_b]
        (L_b <= L = ``cfg.max_bag``, 0-padded; padded to L here), one per bag of
        ``cfg.user_bags`` / ``cfg.item_bags``. Raises IndexError for an id outside its
        vocabulary, like a per-table ``nn.Embedding`` lookup, and ValueError for a missing
        field or bag. :meth:`forward` reads it; pack a whole window (or each user and item
        table) once to skip this per step.

        ``drop_tag_padding``: every row's tags are moved ahead of its padding (order kept)
        and the tag columns that are then padding in every row are dropped (T becomes the
        most tags any row has, at least 1). The masked mean is the same (padding has weight
        0), but each step reads fewer ids: users hold ~1–3 of T = 16 tags in the sample
        world. It costs a host sync, so use it on a whole window, not per step."""
        return self.layout.pack(user_id, user_tags, user_fields, item_fields, drop_tag_padding, user_bags, item_bags)

    def embed_packed(self, packed: Tensor) -> Tensor:
        """The raw features [B, (2 + P + U + M + I) k] of packed ids (:meth:`pack_ids`): user
        id, mean of the non-padding tag embeddings (all padding -> zero vector), profile
        fields, the mean of each user bag's non-padding ids (likewise), item fields, each
        item bag's mean, in that order.

        One weighted ``embedding_bag`` (sum) does every lookup (:meth:`PackLayout.embed`):
        each field bag holds one id of weight 1, the tag bag and each bag field their ids,
        each of weight 1/(number of non-padding ids) and padding of weight 0 — the masked
        mean. Its backward is an ``index_add_``, several times cheaper on CPU than the
        sort-based dense ``embedding_bag`` backward."""
        return self.layout.embed(self.embeddings.weight, packed)

    def _modality(self, name: str, x: Tensor | None, width: int) -> Tensor:
        if x is None:
            raise ValueError(f"modality {name!r} is enabled in the config but no tensor was given")
        if x.dim() != 2 or x.shape[1] != width:
            raise ValueError(f"{name}: expected shape [B, {width}], got {list(x.shape)}")
        return self.modality_proj[name](x.to(self.user_proj.weight.dtype))

    def _present(self, vectors: Mapping[str, Tensor], stack: Tensor) -> Tensor | None:
        """[B, J] bool from ``vectors.present`` (:class:`umair.training.lookup.ItemVectors`;
        F_emb(i^O) is always present), or None when every modality is present."""
        masks = getattr(vectors, "present", None) or {}
        if not any(m in masks for m in self.modality_names):
            return None
        ones = torch.ones(stack.shape[0], dtype=torch.bool, device=stack.device)
        return torch.stack([masks[m].bool() if m in masks else ones for m in self.modality_names], dim=1)

    def explain(self, packed: Tensor, vectors: Mapping[str, Tensor] | None = None) -> FusionOutput:
        """Logits [B] plus the UMCM weights α [B, K, J] (J in :attr:`modality_names`
        order) and β [B, K] (K in ``cfg.expert_kinds`` order) of ids packed by
        :meth:`pack_ids` and the item vectors ``vectors[m]`` [B, cfg.vectors[m]]; a
        ``vectors.present[m]`` [B] bool marks rows lacking m (α_m = 0, :mod:`umair.model.umcm`).
        With ``cfg.user_history``, ``vectors.history`` (a
        :class:`umair.model.history.HistoryBatch`, :meth:`umair.training.lookup.Lookup.row_vectors`)
        holds each row's h⁺_m and h⁻_m; a model with a history refuses rows without one."""
        cfg = self.cfg
        if self.training and (cfg.user_id_dropout or cfg.item_id_dropout):  # rows read as unseen user / cold item
            packed = self.layout.drop_ids(packed, cfg.user_id_dropout, cfg.item_id_dropout)
        raw = self.embed_packed(packed)  # [B, (2 + P + U + M + I) k] = [user id, tags, profile, bags | item]
        alpha = beta = None
        x0 = raw
        given = vectors if vectors is not None else {}
        hist: HistoryBatch | None = getattr(given, "history", None)
        if cfg.user_history and hist is None:
            raise ValueError(
                "this model reads the user's history (user_history): give vectors with .history "
                "(umair.training.lookup.Lookup.row_vectors)"
            )
        if cfg.multimodal:
            split = (2 + len(cfg.user_fields) + len(cfg.user_bags)) * cfg.emb_dim
            user_raw, item_raw = raw[:, :split], raw[:, split:]
            v_user = self.user_proj(user_raw)
            if hist is not None:  # + Σ_m (W_m h⁺_m + D_m h⁻_m), see umair.model.history
                for m in self.history_names:
                    v_user = v_user + F.linear(hist.liked[m].to(v_user.dtype), self.modality_proj[m].weight)
                    v_user = v_user + self.dislike_proj[m](hist.disliked[m].to(v_user.dtype))
            e = [
                self.modality_proj[META](item_raw) if m == META else self._modality(m, given.get(m), cfg.vectors[m])
                for m in self.modality_names
            ]
            stack = torch.stack(e, dim=1)  # [B, J, d]
            if cfg.modality_norm == "l2":  # ‖e_j‖ = √d: α alone sets each modality's share of v_il
                stack = F.normalize(stack, dim=-1) * cfg.d**0.5
            v_il, alpha, beta = self.umcm(v_user, stack, self._present(given, stack))
            x0 = torch.cat([raw, v_user, v_il], dim=-1)
        if cfg.user_history and hist is not None:  # the item's likeness to each history, the behaviour stats
            masks = getattr(given, "present", None) or {}
            gate: dict[str, Tensor | float] = {m: 1.0 for m in self.cosine_names}
            if cfg.cosine_gate and alpha is not None and beta is not None:  # J·ᾱ_m, ᾱ = Σ_k β_k α_k  [B, J]
                a_bar = (beta.unsqueeze(-1) * alpha).sum(1) * len(self.modality_names)
                gate = {m: a_bar[:, self.modality_names.index(m)] for m in self.cosine_names}
            sims = [  # an item without m: 0, whatever its vector row holds
                (
                    F.cosine_similarity(given[m].to(x0.dtype), h[m].to(x0.dtype), dim=1, eps=1e-6)
                    * (masks[m].to(x0.dtype) if m in masks else 1.0)
                    * gate[m]
                ).unsqueeze(1)
                for m in self.cosine_names
                for h in (hist.liked, hist.disliked)
            ]
            x0 = torch.cat([x0, *sims, history_stats(hist.counts).to(x0.dtype)], dim=-1)
        xl = self.cross(x0)
        if cfg.structure == "parallel" and cfg.cross_layers > 0:
            h = torch.cat([xl, self.deep(x0)], dim=-1)
        else:
            h = self.deep(xl)
        return FusionOutput(self.head(h).squeeze(-1), alpha, beta)

    def forward(self, packed: Tensor, vectors: Mapping[str, Tensor] | None = None) -> Tensor:
        """Logits [B] of ids packed by :meth:`pack_ids` [B, 1 + T + P + U·L + M + I·L] and the item
        vectors (apply a sigmoid for bookmark probabilities), as in :meth:`explain`."""
        return self.explain(packed, vectors).logits


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (every table row included, like the paper's counts)."""
    return sum(p.numel() for p in model.parameters())


def l2_embedding_penalty(model: nn.Module) -> Tensor:
    """Σ of squared weights of every ``nn.Embedding`` in ``model`` (scale it, e.g. by 1e-3).

    :class:`UmairFPS` keeps all its tables as blocks of one ``nn.Embedding``, so for it
    this is one ``Σ w²`` over that table (= the sum over its per-table views)."""
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    if not tables:
        return torch.zeros(())
    if len(tables) == 1:
        w = tables[0].reshape(-1)
        return torch.dot(w, w)
    return torch.stack([w.pow(2).sum() for w in tables]).sum()


class _TableView:
    """One id table of :class:`UmairFPS` as a block of rows of its fused ``embeddings``:
    ``weight`` [n, k] (a view, gradients flow to the fused table) and ``view(ids)``."""

    def __init__(self, owner: UmairFPS, start: int, size: int) -> None:
        self._owner = [owner]  # a list, so that nn.Module does not register the owner as a child
        self.start, self.num_embeddings = start, size

    @property
    def weight(self) -> Tensor:
        return self._owner[0].embeddings.weight.narrow(0, self.start, self.num_embeddings)

    def __call__(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)
