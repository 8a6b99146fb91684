"""Exported encoders: a directory with ``encoder.pt`` (state dict) and ``manifest.json``.

The manifest records everything that defines the encoder's outputs (backbone,
preprocessing, style layers, output dims) and where it came from (tag vocabulary hash,
training data version), so extraction and training can check they use the same one.
Loading uses ``torch.load(weights_only=True)``; a corrupt or mismatched checkpoint
raises :class:`CheckpointError` naming the file and the mismatch.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from datetime import datetime, timezone

import torch

from umair import storage
from umair.image.encoder import DualEncoder, EncoderSpec
from umair.errors import UmairError

MANIFEST = "manifest.json"
WEIGHTS = "encoder.pt"


class CheckpointError(UmairError, ValueError):
    """A checkpoint cannot be used; the message names the file and why."""


def encoder_version(manifest: dict) -> str:
    """A short stable identifier of an exported encoder (goes into feature files)."""
    return f"{manifest['spec']['backbone']}-{manifest['spec']['image_size']}px-{manifest['weights_sha'][:12]}"


def save_encoder(model: DualEncoder, out: str, **provenance) -> dict:
    """Write the encoder (without any classifier head) and its manifest to ``out``."""
    import hashlib

    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    manifest = {
        "format": "umair-dual-encoder/1",
        "spec": model.spec.model_dump(mode="json"),
        "style_layers": list(model.style_layers),
        "sem_dim": model.sem_dim,
        "sty_dim": model.sty_dim,
        "preprocessing": {"resize": [model.spec.image_size, model.spec.image_size], "interpolation": "bilinear", "scale": "0..1", "mode": "RGB"},
        "weights_sha": hashlib.sha256(data).hexdigest(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **provenance,
    }
    manifest["version"] = encoder_version(manifest)
    storage.write_bytes(storage.join(out, WEIGHTS), data)
    storage.write_bytes(storage.join(out, MANIFEST), json.dumps(manifest, indent=2).encode())
    return manifest


def load_encoder(source: str | None, spec: EncoderSpec | None = None) -> tuple[DualEncoder, dict]:
    """Load an encoder from an exported directory (local or s3://), a torchvision
    weights enum (``torchvision:IMAGENET1K_V2``: production, downloads where internet
    exists) or ``None`` (random weights, with ``spec``)."""
    if source is None or source.startswith("torchvision:"):
        spec = spec or EncoderSpec()
        weights = source.split(":", 1)[1] if source else None
        model = DualEncoder(spec, weights=weights)
        manifest = {"spec": spec.model_dump(mode="json"), "sem_dim": model.sem_dim, "sty_dim": model.sty_dim,
                    "weights_sha": f"{weights or 'random'}-init", "source": source or "random"}
        manifest["version"] = encoder_version(manifest)
        return model, manifest
    manifest_uri = storage.join(source, MANIFEST)
    weights_uri = storage.join(source, WEIGHTS)
    try:
        manifest = json.loads(storage.read_bytes(manifest_uri))
        spec = EncoderSpec(**manifest["spec"])
    except (storage.StorageError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{manifest_uri}: not a readable encoder manifest ({err})") from err
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, WEIGHTS)
            with open(local, "wb") as f:
                f.write(storage.read_bytes(weights_uri))
            state = torch.load(local, map_location="cpu", weights_only=True)
    except storage.StorageError:
        raise
    except Exception as err:  # torch raises several types for damaged files
        raise CheckpointError(f"{weights_uri}: corrupt checkpoint, cannot be loaded ({type(err).__name__}: {err})") from err
    model = DualEncoder(spec)
    result = model.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.startswith("head.")]
    if result.missing_keys or unexpected:
        raise CheckpointError(
            f"{weights_uri}: weights do not match the manifest's backbone {spec.backbone} "
            f"(missing {len(result.missing_keys)} keys e.g. {result.missing_keys[:2]}, unexpected {len(unexpected)} e.g. {unexpected[:2]})"
        )
    for key in ("sem_dim", "sty_dim"):
        if manifest.get(key) != getattr(model, key):
            raise CheckpointError(f"{manifest_uri}: {key} {manifest.get(key)} does not match the backbone's {getattr(model, key)}")
    return model, manifest
