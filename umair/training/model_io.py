"""A trained model on disk or object storage::

OUTPUT/
  model.pt            UmairFPS state dict (torch.load(weights_only=True))
  model.json          format, model_config, variant, windows (train_end, validation,
                      split, test_end), best_epoch, val_auc, test metrics, feature
                      dims, encoder versions, data URIs and fingerprints, negatives,
                      training history
  feature_space.json  the fitted FeatureSpace (vocabularies, buckets, vector stats)
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from umair import storage
from umair.model.features import FeatureSpace
from umair.model.settings import ModelConfig

if TYPE_CHECKING:
    from umair.training.inputs import Prepared
    from umair.training.settings import TrainConfig

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


def training_meta(
    cfg: TrainConfig,
    prepared: Prepared,
    latest: dict[str, Any],
    chosen: dict[str, Any],
    test: dict[str, float],
) -> dict[str, Any]:
    """``model.json`` of a training run: ``latest`` is the last checkpoint's state (its
    epoch and per-epoch ``history``), ``chosen`` the saved one's (the best ``val_auc``
    epoch, or the last without a validation window), ``test`` its test-window metrics.
    ``train_end`` records where the training window ends, so ``umair evaluate`` can tell
    users and items seen in training (warm) from the rest (cold)."""
    mc = prepared.model_config
    history = list(latest["history"])
    best_epoch = int(chosen["epoch"])
    best = next((h for h in history if int(h["epoch"]) == best_epoch), {})
    return {
        "format": MODEL_FORMAT,
        "model_config": mc.model_dump(mode="json"),
        "variant": cfg.variant or "full",
        "split": prepared.inputs.split,
        "test_end": cfg.test_end,
        "validation": prepared.validation,
        "train_end": prepared.train_end,
        "best_epoch": best_epoch,
        "selected_on": "val_auc" if prepared.validation and "val_auc" in best else "last epoch",
        "val_auc": best.get("val_auc"),
        "val_logloss": best.get("val_logloss"),
        "test": test,
        "modalities": list(mc.modalities),
        "feature_dims": {m: prepared.info.dims[m] for m in prepared.modalities},
        "encoder_versions": prepared.info.encoder_versions(),
        "feature_metadata": prepared.info.metadata,
        "data": {
            **prepared.inputs.to_dict(),
            "features_fingerprint": prepared.info.fingerprint,
            "users_fingerprint": prepared.users_fingerprint,
        },
        "negatives": prepared.negatives,
        "training": {
            "epochs": int(latest["epoch"]) + 1,
            "best_epoch": best_epoch,
            "patience": cfg.patience,
            "attempt_start_epochs": list(latest["starts"]),
            "history": history,
            **cfg.model_dump(include={"batch_size", "lr", "l2_emb", "num_workers", "use_gpu", "seed"}),
        },
    }


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
