"""The settings of the UMAIR-FPS ranking model, without PyTorch.

:class:`ModelConfig` (every knob of :class:`umair.model.fusion.UmairFPS`), the paper's
Table-4 variants as changes of it, :func:`dcn_v2_only`, and :func:`model_variant`
(either, by the name a job's ``variant`` setting holds). Job settings, the CLI and
``umair --help`` import this module only, so they start without loading torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from umair import modalities as registry

CrossType = Literal["full", "lowrank"]
Activation = Literal["tanh", "relu"]
ExpertKind = Literal["att", "sen", "mean"]
SenWeights = Literal["softmax", "sigmoid"]

META = "meta"  # the item-metadata modality: projected item-field embeddings, stacked last
ITEM_ID_FIELD = "illust_id"  # the item field holding the item's own id (FeatureSettings.item_id)


class ModelConfig(BaseModel):
    """Every knob of :class:`UmairFPS`; each paper Table-4 ablation is one of these.

    Vocabulary sizes count index 0 (out-of-vocabulary / padding), i.e. they are
    ``len(vocabulary)`` of :class:`umair.model.vocab.Vocabulary` or ``Buckets``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_users: int = Field(..., ge=1, description="user-id vocabulary size (incl. index 0)")
    n_tags: int = Field(..., ge=1, description="interest-tag vocabulary size (incl. index 0 = padding)")
    user_fields: dict[str, int] = Field(
        default_factory=dict, description="profile field -> vocabulary size; column order of user_fields"
    )
    item_fields: dict[str, int] = Field(
        default_factory=dict, description="item metadata field -> vocabulary size; column order of item_fields"
    )
    user_bags: dict[str, int] = Field(
        default_factory=dict,
        description="user bag field (a list<string> column, mean-pooled ids) -> vocabulary size; part of v_user's input",
    )
    item_bags: dict[str, int] = Field(
        default_factory=dict,
        description="item bag field (genres, cast, keywords: mean-pooled ids) -> vocabulary size; part of F_emb(i^O)",
    )
    max_bag: int = Field(16, ge=1, description="L: id columns of every bag field in packed ids (features.max_bag)")
    vectors: dict[str, int] = Field(
        default_factory=registry.default_dims,
        description="vector modalities the model reads (umair.modalities names) -> width; "
        "default every registered one at its production width (e_SEM 2048, e_STY 256, e_TSEM 384)",
    )
    emb_dim: int = Field(8, ge=1, description="k: width of every id / field embedding (8 in the paper)")
    d: int = Field(16, ge=1, description="common width of v_user and of every projected modality")
    umcm: Literal["moe", "att", "sen", "none"] = Field(
        "moe", description="none = mean of the modalities, no reweighting"
    )
    experts: tuple[Literal["att", "sen"], ...] = Field(
        ("att", "sen", "att"), description="expert kinds when umcm='moe'; K = len"
    )
    att_user_proj: bool = Field(
        True, description="each ATT expert learns q = W v_user; False = paper's Eq. 7, parameter-free"
    )
    user_history: bool = Field(
        False,
        description="v_user also reads the mean standardised vectors of the user's last history_len bookmarks "
        "and non-bookmarks strictly before each row (umair.model.history)",
    )
    history_len: int = Field(
        32, ge=1, description="K: how many of the user's latest bookmarks (and non-bookmarks) the history averages"
    )
    history_cosines: bool = Field(
        True, description="x_0 also gets the item's cosine to each history mean, per modality (umair.model.history)"
    )
    cosine_gate: bool = Field(
        False,
        description="scale each modality's history cosines by J·ᾱ_m (the user's effective UMCM weight of m, "
        "ᾱ = Σ_k β_k α_k): the model uses a modality's history likeness only through its attention to it",
    )
    att_temperature: float = Field(
        1.0, gt=0, description="τ of every ATT expert: α = softmax_j(<q, e_j> / τ); below 1 sharpens α"
    )
    modality_norm: Literal["none", "l2"] = Field(
        "none",
        description="l2: every projected e_j is scaled to norm sqrt(d) before UMCM, so only α (not a modality's "
        "learned magnitude) decides how much of it reaches v_il",
    )
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
    label_prior: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="p, the share of positive rows in the training window (the training job sets it): the output "
        "bias b_o starts at log(p / (1 - p)), so the first steps need not pull every logit towards the base rate "
        "through the deep MLP, which can leave its last ReLU layer dead (every prediction the same); None: "
        "nn.Linear's initialisation",
    )
    user_id_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="training only: this share of rows reads the out-of-vocabulary user id (row 0), so the model "
        "learns what an unseen user looks like and leans on the profile and history where the id is unknown",
    )
    item_id_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description=f"training only: this share of rows reads the out-of-vocabulary item id (row 0 of the "
        f"{ITEM_ID_FIELD!r} item field), so an item never seen in training (a cold item) is scored from its "
        "vectors and metadata by weights trained for that case",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.umcm == "moe" and not self.experts:
            raise ValueError("umcm='moe' needs at least one entry in experts")
        for name, size in {**self.user_fields, **self.item_fields, **self.user_bags, **self.item_bags}.items():
            if size < 1:
                raise ValueError(f"vocabulary size of field {name!r} must be >= 1, got {size}")
        unknown = [m for m in self.vectors if m not in registry.names()]
        if unknown:
            raise ValueError(f"vectors: unknown modality {unknown}; registered: {list(registry.names())}")
        bad = {m: w for m, w in self.vectors.items() if w < 1}
        if bad:
            raise ValueError(f"vectors: widths must be >= 1, got {bad}")
        if any(w < 1 for w in self.mlp):
            raise ValueError(f"mlp widths must be >= 1, got {self.mlp}")
        if self.item_id_dropout and ITEM_ID_FIELD not in self.item_fields:
            raise ValueError(
                f"item_id_dropout={self.item_id_dropout}: the config has no {ITEM_ID_FIELD!r} item field to drop "
                f"(item fields: {list(self.item_fields)}; FeatureSettings.item_id puts it there)"
            )
        return self

    @property
    def multimodal(self) -> bool:
        """False for "w/o ALL": no vector modality, hence no UMCM at all."""
        return bool(self.vectors)

    @property
    def vector_names(self) -> tuple[str, ...]:
        """The vector modalities read, in stacking (registry) order."""
        return tuple(m for m in registry.names() if m in self.vectors)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Names of the J stacked modalities, in order (empty when not multimodal)."""
        if not self.multimodal:
            return ()
        return self.vector_names + ((META,) if self.item_fields or self.item_bags else ())

    @property
    def expert_kinds(self) -> tuple[ExpertKind, ...]:
        """The UMCM experts actually built: ``experts`` for moe, one expert otherwise."""
        if self.umcm == "moe":
            return self.experts
        return ({"att": "att", "sen": "sen", "none": "mean"}[self.umcm],)


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
        changes = {"vectors": {}}
    elif name.startswith("w/o ") and name[4:].lower() in registry.names():
        changes = {"vectors": {m: w for m, w in base.vectors.items() if m != name[4:].lower()}}
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


def dcn_v2_only(base: ModelConfig) -> ModelConfig:
    """This project's DCN-V2 baseline (the paper's Table-3 "DCN-V2" row, and the model
    compared with deepctr-torch's DCN-V2 in ``bench/train_throughput.py``): the id and
    metadata embeddings alone (no e_SEM / e_STY / e_TSEM, hence no UMCM), ``base``'s
    depth ``L`` and MLP, and DCN-V2's own full-rank cross ``x_0 ⊙ (W_l x_l + b_l) + x_l``
    (deepctr's ``cross_parameterization='matrix'``). The Table-4 "w/o ALL" variant is the
    same model with ``base``'s cross form (the low-rank mixture by default)."""
    return table4_variant(base, "w/o ALL").model_copy(update={"cross_type": "full"})


DCN_V2_ONLY = "dcn_v2_only"
VARIANTS: tuple[str, ...] = (*TABLE4_VARIANTS, DCN_V2_ONLY)
"""What a job's ``variant`` setting accepts: the Table-4 variants and ``dcn_v2_only``."""


def model_variant(base: ModelConfig, name: str) -> ModelConfig:
    """``variant`` ``name`` of :data:`VARIANTS` as a change of ``base``: a Table-4 variant
    (:func:`table4_variant`) or ``dcn_v2_only`` (:func:`dcn_v2_only`: no e_SEM / e_STY /
    e_TSEM, no UMCM, DCN-V2's full-rank cross). ``umair train``, ``umair ablate``'s
    "DCN-V2-only (umair)" row and the benches build the baseline through this one name."""
    if name == DCN_V2_ONLY:
        return dcn_v2_only(base)
    if name not in TABLE4_VARIANTS:
        raise KeyError(f"unknown variant {name!r}; expected one of {list(VARIANTS)}")
    return table4_variant(base, name)


def table4_variants(base: ModelConfig) -> dict[str, ModelConfig]:
    """Every Table-4 variant of ``base``, keyed by name, in the paper's order."""
    return {name: table4_variant(base, name) for name in TABLE4_VARIANTS}
