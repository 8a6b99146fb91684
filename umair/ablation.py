"""The paper's Tables 3 and 4 as settings and models (no Ray, no MLflow): which models
``umair ablate`` compares (:data:`ALL_MODELS`), its settings, each model built behind
:class:`~umair.baselines.rankers.Ranker`, scored on the test window, and the sample
world's planted effects checked with a margin (:func:`planted_checks`)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from umair.config import MlflowConfig, Settings, StorageConfig
from umair.errors import FeatureError
from umair.model.features import FeatureSettings
from umair.model.interactions import IsoTime, NegativeSettings
from umair.model.settings import DCN_V2_ONLY as DCN_V2_ONLY_VARIANT
from umair.model.settings import TABLE4_VARIANTS, ModelConfig
from umair.training.settings import ModelOverrides

DCN_V2_ONLY = "DCN-V2-only (umair)"  # the model of `umair train`'s `variant: dcn_v2_only`
DEEPCTR_NAMES = {f"{m} (deepctr)": m for m in ("DCN", "xDeepFM", "FiBiNET", "DIFM", "DCN-V2", "DCNMix")}
FINALMLP = "FinalMLP"
TABLE3_MODELS: tuple[str, ...] = (
    "DCN (deepctr)",
    "xDeepFM (deepctr)",
    "FiBiNET (deepctr)",
    "DIFM (deepctr)",
    "DCN-V2 (deepctr)",
    "DCNMix (deepctr)",
    FINALMLP,
    DCN_V2_ONLY,
)
ALL_MODELS: tuple[str, ...] = (*TABLE4_VARIANTS, *TABLE3_MODELS)


class GenerateSettings(Settings):
    """A sample world plus in-process item features (:mod:`umair.baselines.sample_features`)
    written under ``out`` and reused when they exist."""

    out: str = "outputs/ablate/sample"
    size: Literal["tiny", "small", "default"] = "default"
    seed: int = 7
    image_size: int = Field(64, ge=16, description="dual-encoder input size")
    pretext_epochs: int = Field(3, ge=0, description="pretext training on the world's tags; 0 = random-weight encoder")
    feature_seed: int = 0
    tsem_dim: int = Field(32, ge=1)


class CheckMargins(Settings):
    """AUC gaps the planted-effect checks require (one seed moves AUC by about 0.01)."""

    full_vs_dcn_v2_only: float = Field(0.05, ge=0, description="full model AUC minus DCN-V2-only AUC, all users")
    sty_on_style_users: float = Field(0.02, ge=0, description="full minus w/o STY, AUC on style-driven users")


class AblateConfig(Settings):
    """Settings of ``umair ablate`` (see pipelines/configs/ablate.yaml)."""

    world: str | None = Field(
        "outputs/demo/world", description="sample world: tables, split, truth/users.parquet segments"
    )
    illustrations: str | None = None
    users: str | None = None
    interactions: str | None = None
    item_features: str | None = Field(
        "outputs/demo/features", description="item features (parquet or extraction output)"
    )
    generate: GenerateSettings | None = Field(None, description="set to generate a world + features instead")
    split: IsoTime | None = None
    models: list[str] = Field(
        default_factory=lambda: list(ALL_MODELS),
        description="names from Table 4 and Table 3 ('dcn_v2_only', umair train's variant name, is DCN-V2-only (umair))",
    )
    model: ModelOverrides = Field(default_factory=dict, description="ModelConfig overrides of the base UMAIR-FPS")
    baselines: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="constructor overrides per Table-3 model"
    )
    baseline_vectors: bool = Field(
        True, description="external models read e_SEM/e_STY/e_TSEM too (False: ids + metadata only)"
    )
    features: FeatureSettings = FeatureSettings()
    negatives: NegativeSettings = NegativeSettings()
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    l2_emb: float = Field(1e-3, ge=0)
    seed: int = 0
    threads: int = Field(
        1,
        ge=1,
        description="torch threads of this process (feature generation and training); "
        "more than 1 on a busy shared CPU slows small-batch training many times over",
    )
    segments: str | None = Field(
        None, description="table with user_id and segment_column; default WORLD/truth/users.parquet"
    )
    segment_column: str = "taste"
    style_segment: str = Field("style", description="the segment whose AUC shows what e_STY adds")
    check_margins: CheckMargins = CheckMargins()
    output: str = "outputs/ablate"
    run_name: str = "ablate"
    mlflow: MlflowConfig = MlflowConfig(tracking_uri="sqlite:///outputs/mlflow.db", experiment="umair-ablate")
    storage: StorageConfig = StorageConfig()

    @field_validator("models")
    @classmethod
    def _known_models(cls, v: list[str]) -> list[str]:
        v = [DCN_V2_ONLY if m == DCN_V2_ONLY_VARIANT else m for m in v]
        if not v:
            raise ValueError("name at least one model")
        unknown = [m for m in v if m not in ALL_MODELS]
        if unknown:
            raise ValueError(f"unknown model name(s) {unknown}; expected names from {list(ALL_MODELS)}")
        dup = sorted({m for m in v if v.count(m) > 1})
        if dup:
            raise ValueError(f"model(s) listed twice: {dup}")
        return v

    @model_validator(mode="after")
    def _check(self) -> AblateConfig:
        bad = sorted(k for k in self.baselines if k not in DEEPCTR_NAMES and k != FINALMLP)
        if bad:
            raise ValueError(
                f"baselines: {bad} are not external Table-3 models; expected keys from {[*DEEPCTR_NAMES, FINALMLP]}"
            )
        if self.generate is None and (
            self.item_features is None
            or (self.world is None and None in (self.illustrations, self.users, self.interactions))
        ):
            raise ValueError("give 'item_features' and 'world' (or the three tables), or a 'generate' section")
        return self


def build_ranker(name: str, base: ModelConfig, train: Any, cfg: AblateConfig) -> Any:
    """The :class:`~umair.baselines.rankers.Ranker` of a model name of :data:`ALL_MODELS`."""
    from umair.baselines.deepctr_adapter import DeepCTRRanker
    from umair.baselines.finalmlp import FinalMLPRanker
    from umair.baselines.rankers import FusionRanker
    from umair.model.settings import model_variant

    sizes = {
        "n_users": base.n_users,
        "n_tags": base.n_tags,
        "user_fields": base.user_fields,
        "item_fields": base.item_fields,
    }
    dims = train.dims if cfg.baseline_vectors else {}
    if name in TABLE4_VARIANTS:
        return FusionRanker(name, model_variant(base, name), cfg.seed)
    if name == DCN_V2_ONLY:  # the same definition as `umair train --variant dcn_v2_only`
        return FusionRanker(name, model_variant(base, DCN_V2_ONLY_VARIANT), cfg.seed)
    if name in DEEPCTR_NAMES:
        return DeepCTRRanker(
            DEEPCTR_NAMES[name],
            sizes,
            int(train.user_tags.shape[1]),
            dims,
            base.emb_dim,
            cfg.seed,
            cfg.baselines.get(name),
            name=name,
        )
    if name == FINALMLP:
        return FinalMLPRanker(sizes, dims, base.emb_dim, cfg.seed, name=name, **cfg.baselines.get(name, {}))
    raise ValueError(f"unknown model {name!r}; expected one of {list(ALL_MODELS)}")


def source_of(name: str) -> str:
    """Which implementation a row comes from."""
    from importlib import metadata

    if name in DEEPCTR_NAMES:
        return f"deepctr-torch {metadata.version('deepctr-torch')}"
    if name == FINALMLP:
        return f"fuxictr {metadata.version('fuxictr')} layers + paper"
    return "umair"


def evaluate_model(ranker: Any, test: Any, segments: dict[int, str]) -> dict[str, Any]:
    """Test-window AUC / logloss / GAUC overall and AUC per segment."""
    from umair.baselines.training import predict
    from umair.training.scoring import segment_report

    probs = predict(ranker, test)
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
        raise FeatureError(f"{ranker.name}: predictions outside [0, 1] or not finite")
    labels = test.labels.numpy()
    seg = segment_report(test.users, labels, probs, None, [], segments)
    out: dict[str, Any] = {k: seg["all"][k] for k in ("auc", "logloss", "gauc")}
    out["segments"] = {
        k: {"auc": v["auc"], "rows": v["rows"], "users": v["users"]} for k, v in seg.items() if k != "all"
    }
    return out


def planted_checks(
    by: dict[str, dict[str, Any]], style_segment: str, margins: CheckMargins | None = None
) -> dict[str, dict[str, Any]]:
    """The sample world's planted effects: the full model ahead of DCN-V2-only, and e_STY
    mattering for style-driven users (full vs w/o STY on that segment's AUC). An effect is
    met when its AUC gap reaches its margin (a gap inside one seed's noise is not an effect)."""
    m = margins or CheckMargins()
    out: dict[str, dict[str, Any]] = {}
    dcn = by.get(DCN_V2_ONLY) or by.get("w/o ALL")
    if "full" in by and dcn is not None:
        d = by["full"]["auc"] - dcn["auc"]
        out["full ahead of DCN-V2-only"] = {
            "value": d,
            "margin": m.full_vs_dcn_v2_only,
            "met": bool(d >= m.full_vs_dcn_v2_only),
            "text": f"AUC {by['full']['auc']:.4f} vs {dcn['auc']:.4f} ({d:+.4f}; needs >= +{m.full_vs_dcn_v2_only:g})",
        }
    key = f"auc_{style_segment}"
    if "full" in by and "w/o STY" in by and by["full"].get(key) is not None and by["w/o STY"].get(key) is not None:
        d = by["full"][key] - by["w/o STY"][key]
        out["STY matters for style-driven users"] = {
            "value": d,
            "margin": m.sty_on_style_users,
            "met": bool(d >= m.sty_on_style_users),
            "text": f"AUC on {style_segment} users {by['full'][key]:.4f} (full) vs {by['w/o STY'][key]:.4f} (w/o STY) "
            f"({d:+.4f}; needs >= +{m.sty_on_style_users:g})",
        }
    return out
