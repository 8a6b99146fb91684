"""The UMAIR-FPS ranking model in plain PyTorch, and the vocabularies that feed it.

- :mod:`umair.model.settings`: :class:`ModelConfig`, Table-4 variants, the DCN-V2
  baseline (no torch: job settings and the CLI import only this).
- :mod:`umair.model.crossnet`: DCN-V2 cross layers (full rank, low-rank mixture).
- :mod:`umair.model.umcm`: UMCM experts (ATT, SEN, mean) and their MoE.
- :mod:`umair.model.fusion`: :class:`UmairFPS`.
- :mod:`umair.model.vocab`: :class:`Vocabulary` and :class:`Buckets` (index 0 = OOV).

The torch modules load on first use of one of their names (``from umair.model import
UmairFPS``), so importing the package, its settings or its vocabularies does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from umair.model.settings import TABLE4_VARIANTS, ModelConfig, dcn_v2_only, table4_variant, table4_variants
from umair.model.vocab import Buckets, Vocabulary

_LAZY = {
    "CrossLayer": "crossnet",
    "CrossNet": "crossnet",
    "LowRankMixtureCrossLayer": "crossnet",
    "FusionOutput": "fusion",
    "UmairFPS": "fusion",
    "count_parameters": "fusion",
    "l2_embedding_penalty": "fusion",
    "AttentionUMCM": "umcm",
    "MeanUMCM": "umcm",
    "MoEOutput": "umcm",
    "MoEUMCM": "umcm",
    "SENetUMCM": "umcm",
    "UMCMOutput": "umcm",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'umair.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"umair.model.{module}"), name)
    globals()[name] = value
    return value


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
