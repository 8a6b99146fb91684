"""The UMAIR-FPS ranking model in plain PyTorch, and the vocabularies that feed it.

- :mod:`umair.model.crossnet`: DCN-V2 cross layers (full rank, low-rank mixture).
- :mod:`umair.model.umcm`: UMCM experts (ATT, SEN, mean) and their MoE.
- :mod:`umair.model.fusion`: :class:`ModelConfig`, :class:`UmairFPS`, Table-4 variants, the DCN-V2 baseline.
- :mod:`umair.model.vocab`: :class:`Vocabulary` and :class:`Buckets` (index 0 = OOV).
"""

from umair.model.crossnet import CrossLayer, CrossNet, LowRankMixtureCrossLayer
from umair.model.fusion import (
    TABLE4_VARIANTS,
    FusionOutput,
    ModelConfig,
    UmairFPS,
    count_parameters,
    dcn_v2_only,
    l2_embedding_penalty,
    table4_variant,
    table4_variants,
)
from umair.model.umcm import AttentionUMCM, MeanUMCM, MoEOutput, MoEUMCM, SENetUMCM, UMCMOutput
from umair.model.vocab import Buckets, Vocabulary

__all__ = [
    "TABLE4_VARIANTS",
    "AttentionUMCM",
    "Buckets",
    "CrossLayer",
    "CrossNet",
    "FusionOutput",
    "LowRankMixtureCrossLayer",
    "MeanUMCM",
    "MoEOutput",
    "MoEUMCM",
    "ModelConfig",
    "SENetUMCM",
    "UMCMOutput",
    "UmairFPS",
    "Vocabulary",
    "count_parameters",
    "dcn_v2_only",
    "l2_embedding_penalty",
    "table4_variant",
    "table4_variants",
]
