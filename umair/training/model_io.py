"""A trained model on disk or object storage::

OUTPUT/
  model.pt            UmairFPS state dict (torch.load(weights_only=True))
  model.json          format, model_config, variant, split, feature dims, encoder
                      versions, data URIs and fingerprints, negatives, training history
  feature_space.json  the fitted FeatureSpace (vocabularies, buckets, vector stats)
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

from umair import storage
from umair.model.features import FeatureSpace
from umair.model.settings import ModelConfig

WEIGHTS, META, SPACE = "model.pt", "model.json", "feature_space.json"
MODEL_FORMAT = "umair-fps-model/1"


@dataclass
class SavedModel:
    """A trained model with everything needed to score: the module (eval mode), its
    config, the feature space and the ``model.json`` metadata."""

    model: Any
    config: ModelConfig
    space: FeatureSpace
    meta: dict[str, Any]

    @property
    def modalities(self) -> list[str]:
        return list(self.config.vector_names)


def save_model(
    out: str,
    state_dict: dict[str, Any],
    meta: dict[str, Any],
    space: FeatureSpace,
    settings: storage.StorageSettings | None = None,
) -> None:
    """Write ``model.pt``, ``feature_space.json`` and ``model.json`` (last) under ``out``."""
    import torch

    buf = io.BytesIO()
    torch.save(state_dict, buf)
    storage.write_bytes(storage.join(out, WEIGHTS), buf.getvalue(), settings)
    space.save(storage.join(out, SPACE), settings)
    storage.write_bytes(storage.join(out, META), json.dumps(meta, indent=2, default=str).encode(), settings)


def load_model(path: str, settings: storage.StorageSettings | None = None, device: Any = "cpu") -> SavedModel:
    """Load a model written by :func:`save_model` (local dir or s3:// prefix)."""
    import torch

    from umair.model.fusion import UmairFPS

    meta = storage.read_manifest(
        storage.join(path, META),
        MODEL_FORMAT,
        settings,
        missing=f"{path}: no {META}; not a trained model directory (run `umair train` first)",
    )
    config = ModelConfig(**meta["model_config"])
    model = UmairFPS(config)
    state = torch.load(
        io.BytesIO(storage.read_bytes(storage.join(path, WEIGHTS), settings)), map_location="cpu", weights_only=True
    )
    model.load_state_dict(state)
    model.to(device).eval()
    return SavedModel(model, config, FeatureSpace.load(storage.join(path, SPACE), settings), meta)
