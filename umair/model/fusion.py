"""UMAIR-FPS: user-aware multi-modal fusion + DCN-V2 crosses + deep MLP -> one logit.

Inputs (one batch of B user-item pairs; every id is a vocabulary index with 0 reserved
for out-of-vocabulary / padding, see :mod:`umair.model.vocab`):

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
sem            [B, d_sem]      e_SEM   (only read when ``use_sem``)
sty            [B, d_sty]      e_STY   (only read when ``use_sty``)
tsem           [B, d_tsem]     e_TSEM  (only read when ``use_tsem``)
=============  ==============  ====================================================

The computation, with ``k`` = ``emb_dim`` (8 like the paper) and ``d`` the modality width:

1. Field embeddings (width ``k`` each): user id, pooled tags, each profile field, each
   item field. Concatenated they are the "raw" features, width ``(2 + P + M) k``.
2. ``v_user = Linear(concat[user id, tags, profile])`` -> ``d``.
3. Modalities, each ``Linear`` -> ``d``: ``e_TSEM``, ``e_SEM``, ``e_STY`` (those enabled)
   and ``F_emb(i_O) = Linear(concat[item field embeddings])`` (when ``M > 0``), stacked
   in that order (:attr:`UmairFPS.modality_names`) as ``e`` [B, J, d].
4. UMCM (:mod:`umair.model.umcm`) -> ``v_il`` [B, d], ``α`` [B, K, J], ``β`` [B, K].
5. ``x_0 = concat[raw user features, raw item features, v_user, v_il]``. With every
   multimodal feature off ("w/o ALL") steps 2-4 are skipped and ``x_0`` is the raw
   features alone: the model is then the DCN-V2 baseline over id/metadata embeddings.
6. Cross network of depth ``L`` (:mod:`umair.model.crossnet`), then, ``structure =
   "stacked"`` (default): ``MLP(x_L)``; ``"parallel"``: ``concat[x_L, MLP(x_0)]`` (the
   MLP alone when ``L = 0``). A final ``Linear`` gives the logit; apply a sigmoid and BCE
   outside (``BCEWithLogitsLoss``).

No layer depends on batch statistics, so batch size 1 works in train and eval mode.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from umair.model.crossnet import Activation, CrossNet, CrossType
from umair.model.umcm import ExpertKind, MoEUMCM, SenWeights

VISUAL_TEXT_MODALITIES = ("tsem", "sem", "sty")
META = "meta"


class ModelConfig(BaseModel):
    """Every knob of :class:`UmairFPS`; each paper Table-4 ablation is one of these.

    Vocabulary sizes count index 0 (out-of-vocabulary / padding), i.e. they are
    ``len(vocabulary)`` of :class:`umair.model.vocab.Vocabulary` or ``Buckets``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_users: int = Field(..., ge=1, description="user-id vocabulary size (incl. index 0)")
    n_tags: int = Field(..., ge=1, description="interest-tag vocabulary size (incl. index 0 = padding)")
    user_fields: dict[str, int] = Field(default_factory=dict, description="profile field -> vocabulary size; column order of user_fields")
    item_fields: dict[str, int] = Field(default_factory=dict, description="item metadata field -> vocabulary size; column order of item_fields")
    d_sem: int = Field(2048, ge=1, description="width of e_SEM (2048 for a torchvision ResNet101)")
    d_sty: int = Field(256, ge=1, description="width of e_STY (channels of the style layers)")
    d_tsem: int = Field(384, ge=1, description="width of e_TSEM (384 for all-MiniLM-L6-v2)")
    emb_dim: int = Field(8, ge=1, description="k: width of every id / field embedding (8 in the paper)")
    d: int = Field(16, ge=1, description="common width of v_user and of every projected modality")
    use_sem: bool = True
    use_sty: bool = True
    use_tsem: bool = True
    umcm: Literal["moe", "att", "sen", "none"] = Field("moe", description="none = mean of the modalities, no reweighting")
    experts: tuple[Literal["att", "sen"], ...] = Field(("att", "sen", "att"), description="expert kinds when umcm='moe'; K = len")
    att_user_proj: bool = Field(True, description="each ATT expert learns q = W v_user; False = paper's Eq. 7, parameter-free")
    sen_reduction: int = Field(2, ge=1)
    sen_weights: SenWeights = "softmax"
    cross_layers: int = Field(2, ge=0, description="L; 0 = without DCN-V2")
    cross_type: CrossType = "lowrank"
    low_rank: int = Field(32, ge=1)
    cross_experts: int = Field(4, ge=1)
    cross_activation: Activation = "tanh"
    structure: Literal["stacked", "parallel"] = "stacked"
    mlp: tuple[int, ...] = Field((64, 32, 16), description="hidden widths of the deep MLP (ReLU)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.umcm == "moe" and not self.experts:
            raise ValueError("umcm='moe' needs at least one entry in experts")
        for name, size in {**self.user_fields, **self.item_fields}.items():
            if size < 1:
                raise ValueError(f"vocabulary size of field {name!r} must be >= 1, got {size}")
        if any(w < 1 for w in self.mlp):
            raise ValueError(f"mlp widths must be >= 1, got {self.mlp}")
        return self

    @property
    def multimodal(self) -> bool:
        """False for "w/o ALL": no e_SEM, e_STY, e_TSEM, hence no UMCM at all."""
        return self.use_sem or self.use_sty or self.use_tsem

    @property
    def modalities(self) -> tuple[str, ...]:
        """Names of the J stacked modalities, in order (empty when not multimodal)."""
        if not self.multimodal:
            return ()
        on = {"tsem": self.use_tsem, "sem": self.use_sem, "sty": self.use_sty}
        names = tuple(m for m in VISUAL_TEXT_MODALITIES if on[m])
        return names + ((META,) if self.item_fields else ())

    @property
    def expert_kinds(self) -> tuple[ExpertKind, ...]:
        """The UMCM experts actually built: ``experts`` for moe, one expert otherwise."""
        if self.umcm == "moe":
            return self.experts
        return ({"att": "att", "sen": "sen", "none": "mean"}[self.umcm],)


class FusionOutput(NamedTuple):
    """``logits`` [B]; ``alpha`` [B, K, J] and ``beta`` [B, K] (None for "w/o ALL")."""

    logits: Tensor
    alpha: Tensor | None
    beta: Tensor | None


def _mlp(in_features: int, widths: tuple[int, ...], dropout: float) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(in_features, w), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = w
    return nn.Sequential(*layers), in_features


class UmairFPS(nn.Module):
    """The UMAIR-FPS ranking model; see the module docstring for inputs and layout."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        k, d = cfg.emb_dim, cfg.d
        self.user_emb = nn.Embedding(cfg.n_users, k)
        self.tag_emb = nn.Embedding(cfg.n_tags, k, padding_idx=0)
        self.user_field_embs = nn.ModuleList(nn.Embedding(n, k) for n in cfg.user_fields.values())
        self.item_field_embs = nn.ModuleList(nn.Embedding(n, k) for n in cfg.item_fields.values())
        for emb in (self.user_emb, self.tag_emb, *self.user_field_embs, *self.item_field_embs):
            nn.init.normal_(emb.weight, std=0.1)
        with torch.no_grad():
            self.tag_emb.weight[0].zero_()  # padding
        user_width = (2 + len(cfg.user_fields)) * k
        item_width = len(cfg.item_fields) * k
        self.modality_names: tuple[str, ...] = cfg.modalities
        width = user_width + item_width
        if cfg.multimodal:
            self.user_proj = nn.Linear(user_width, d)
            in_dims = {"tsem": cfg.d_tsem, "sem": cfg.d_sem, "sty": cfg.d_sty, META: item_width}
            self.modality_proj = nn.ModuleDict({m: nn.Linear(in_dims[m], d) for m in self.modality_names})
            self.umcm = MoEUMCM(
                cfg.expert_kinds, d, len(self.modality_names), cfg.att_user_proj, cfg.sen_reduction, cfg.sen_weights
            )
            width += 2 * d
        self.x0_width = width
        self.cross = CrossNet(width, cfg.cross_layers, cfg.cross_type, cfg.low_rank, cfg.cross_experts, cfg.cross_activation)
        self.deep, deep_out = _mlp(width, cfg.mlp, cfg.dropout)
        parallel = cfg.structure == "parallel" and cfg.cross_layers > 0
        self.head = nn.Linear(deep_out + (width if parallel else 0), 1)

    def _pool_tags(self, user_tags: Tensor) -> Tensor:
        """Mean of the non-padding tag embeddings: [B, T] -> [B, k] (zeros if none)."""
        mask = (user_tags != 0).unsqueeze(-1).to(self.tag_emb.weight.dtype)
        total = (self.tag_emb(user_tags) * mask).sum(dim=1)
        return total / mask.sum(dim=1).clamp(min=1.0)

    @staticmethod
    def _fields(tables: nn.ModuleList, ids: Tensor | None, what: str) -> list[Tensor]:
        n = len(tables)
        if ids is None:
            if n:
                raise ValueError(f"{what}: the config names {n} fields but no tensor was given")
            return []
        if ids.dim() != 2 or ids.shape[1] != n:
            raise ValueError(f"{what}: expected shape [B, {n}], got {list(ids.shape)}")
        return [table(ids[:, i]) for i, table in enumerate(tables)]

    def _modality(self, name: str, x: Tensor | None, width: int) -> Tensor:
        if x is None:
            raise ValueError(f"modality {name!r} is enabled in the config but no tensor was given")
        if x.dim() != 2 or x.shape[1] != width:
            raise ValueError(f"{name}: expected shape [B, {width}], got {list(x.shape)}")
        return self.modality_proj[name](x.to(self.user_proj.weight.dtype))

    def explain(
        self,
        user_id: Tensor,
        user_tags: Tensor,
        user_fields: Tensor | None = None,
        item_fields: Tensor | None = None,
        sem: Tensor | None = None,
        sty: Tensor | None = None,
        tsem: Tensor | None = None,
    ) -> FusionOutput:
        """Logits [B] plus the UMCM weights α [B, K, J] (J in :attr:`modality_names`
        order) and β [B, K] (K in ``cfg.expert_kinds`` order)."""
        cfg = self.cfg
        user_parts = [self.user_emb(user_id), self._pool_tags(user_tags)]
        user_parts += self._fields(self.user_field_embs, user_fields, "user_fields")
        item_parts = self._fields(self.item_field_embs, item_fields, "item_fields")
        user_raw = torch.cat(user_parts, dim=-1)
        parts = [user_raw, *item_parts]
        alpha = beta = None
        if cfg.multimodal:
            v_user = self.user_proj(user_raw)
            given = {"tsem": (tsem, cfg.d_tsem), "sem": (sem, cfg.d_sem), "sty": (sty, cfg.d_sty)}
            e = [
                self.modality_proj[META](torch.cat(item_parts, dim=-1)) if m == META else self._modality(m, *given[m])
                for m in self.modality_names
            ]
            v_il, alpha, beta = self.umcm(v_user, torch.stack(e, dim=1))
            parts += [v_user, v_il]
        x0 = torch.cat(parts, dim=-1)
        xl = self.cross(x0)
        if cfg.structure == "parallel" and cfg.cross_layers > 0:
            h = torch.cat([xl, self.deep(x0)], dim=-1)
        else:
            h = self.deep(xl)
        return FusionOutput(self.head(h).squeeze(-1), alpha, beta)

    def forward(
        self,
        user_id: Tensor,
        user_tags: Tensor,
        user_fields: Tensor | None = None,
        item_fields: Tensor | None = None,
        sem: Tensor | None = None,
        sty: Tensor | None = None,
        tsem: Tensor | None = None,
    ) -> Tensor:
        """Logits [B] (apply a sigmoid for bookmark probabilities)."""
        return self.explain(user_id, user_tags, user_fields, item_fields, sem, sty, tsem).logits


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (every table row included, like the paper's counts)."""
    return sum(p.numel() for p in model.parameters())


def l2_embedding_penalty(model: nn.Module) -> Tensor:
    """Σ of squared weights of every ``nn.Embedding`` in ``model`` (scale it, e.g. by 1e-3)."""
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    if not tables:
        return torch.zeros(())
    return torch.stack([w.pow(2).sum() for w in tables]).sum()


TABLE4_VARIANTS: tuple[str, ...] = (
    "full",
    "w/o ALL",
    "w/o STY",
    "w/o SEM",
    "w/o TSEM",
    "w/o UMCM",
    "UMCM_ATT",
    "UMCM_SEN",
    "ATT*2",
    "ATT*3",
    "ATT*4",
    "SEN*2",
    "SEN*3",
    "SEN*4",
    "w/o DCN-V2",
)


def table4_variant(base: ModelConfig, name: str) -> ModelConfig:
    """The paper's Table-4 variant ``name`` (see :data:`TABLE4_VARIANTS`) as a change of ``base``."""
    changes: dict[str, object]
    if name == "full":
        changes = {}
    elif name == "w/o ALL":
        changes = {"use_sem": False, "use_sty": False, "use_tsem": False}
    elif name in ("w/o STY", "w/o SEM", "w/o TSEM"):
        changes = {f"use_{name[4:].lower()}": False}
    elif name == "w/o UMCM":
        changes = {"umcm": "none"}
    elif name in ("UMCM_ATT", "UMCM_SEN"):
        changes = {"umcm": name[5:].lower()}
    elif name[:4] in ("ATT*", "SEN*") and name[4:].isdigit() and int(name[4:]) >= 1:
        changes = {"umcm": "moe", "experts": (name[:3].lower(),) * int(name[4:])}
    elif name == "w/o DCN-V2":
        changes = {"cross_layers": 0}
    else:
        raise KeyError(f"unknown Table-4 variant {name!r}; expected one of {list(TABLE4_VARIANTS)}")
    return ModelConfig.model_validate({**base.model_dump(), **changes})


def table4_variants(base: ModelConfig) -> dict[str, ModelConfig]:
    """Every Table-4 variant of ``base``, keyed by name, in the paper's order."""
    return {name: table4_variant(base, name) for name in TABLE4_VARIANTS}
