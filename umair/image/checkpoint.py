"""Exported encoders: a directory with ``encoder.pt`` (state dict) and ``manifest.json``.

The manifest records everything that defines the encoder's outputs (the full spec:
backbone, image size, style layers; preprocessing, pooling, weights hash, output dims)
and where it came from (tag vocabulary hash, training data version), so extraction and
training can check they use the same one. Its ``version`` (:func:`encoder_version`) is
a hash over all that changes outputs and nothing else.
Loading uses ``torch.load(weights_only=True)``; a corrupt or mismatched checkpoint
raises :class:`CheckpointError` naming the file and the mismatch.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from datetime import UTC, datetime

import torch

from umair import storage
from umair.errors import UmairError
from umair.image.encoder import POOLING, DualEncoder
from umair.image.preprocess import preprocessing_manifest
from umair.image.spec import EncoderSpec

MANIFEST = "manifest.json"
WEIGHTS = "encoder.pt"


class CheckpointError(UmairError, ValueError):
    """A checkpoint cannot be used; the message names the file and why."""


VERSION_SCHEME = 2  # how encoder_version hashes a manifest; 1 = backbone-size-weights only (no longer written)


def version_inputs(manifest: dict) -> dict:
    """Everything in ``manifest`` that changes the encoder's outputs: the spec's
    output-affecting fields (:meth:`EncoderSpec.output_identity`), the preprocessing, the
    pooling and the weights. Provenance (creation time, tag vocabulary, training data)
    and derived values (dims) are left out: they do not change outputs."""
    spec = EncoderSpec(**manifest["spec"])
    return {
        "scheme": VERSION_SCHEME,
        "spec": spec.output_identity(),
        "preprocessing": manifest.get("preprocessing") or preprocessing_manifest(spec.image_size),
        "pooling": manifest.get("pooling") or POOLING,
        "weights": manifest["weights_sha"],
    }


def encoder_version(manifest: dict) -> str:
    """A short stable identifier of an encoder's outputs (goes into feature files):
    ``<backbone>-<size>px-[<weights>-]<hash>``, the hash (12 hex digits) over
    :func:`version_inputs`, so any change to an output-affecting setting gives a new
    version; ``<weights>`` names non-exported weights (``random``, a torchvision enum)."""
    import hashlib

    inputs = version_inputs(manifest)
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]
    weights = str(manifest["weights_sha"])
    label = [weights[: -len("-init")]] if weights.endswith("-init") else []
    return "-".join([inputs["spec"]["backbone"], f"{inputs['spec']['image_size']}px", *label, digest])


def _manifest(model: DualEncoder, weights_sha: str, **extra) -> dict:
    """The manifest of ``model`` (the full spec and all that defines its outputs), with its version."""
    manifest = {
        "format": "umair-dual-encoder/1",
        "version_scheme": VERSION_SCHEME,
        "spec": model.spec.model_dump(mode="json"),
        "style_layers": list(model.style_layers),
        "sem_dim": model.sem_dim,
        "sty_dim": model.sty_dim,
        "preprocessing": preprocessing_manifest(model.spec.image_size),
        "pooling": dict(POOLING),
        "weights_sha": weights_sha,
        **extra,
    }
    manifest["version"] = encoder_version(manifest)
    return manifest


def save_encoder(model: DualEncoder, out: str, **provenance) -> dict:
    """Write the encoder (without any classifier head) and its manifest to ``out``."""
    import hashlib

    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    manifest = _manifest(
        model,
        hashlib.sha256(data).hexdigest(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        **provenance,
    )
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
        return model, _manifest(model, f"{weights or 'random'}-init", source=source or "random")
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
        raise CheckpointError(
            f"{weights_uri}: corrupt checkpoint, cannot be loaded ({type(err).__name__}: {err})"
        ) from err
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
            raise CheckpointError(
                f"{manifest_uri}: {key} {manifest.get(key)} does not match the backbone's {getattr(model, key)}"
            )
    if manifest.get("version_scheme") == VERSION_SCHEME:  # older manifests keep the version they were written with
        try:
            expected = encoder_version(manifest)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"{manifest_uri}: not a readable encoder manifest ({type(err).__name__}: {err})"
            ) from err
        if manifest.get("version") != expected:
            raise CheckpointError(
                f"{manifest_uri}: recorded version {manifest.get('version')} does not match the "
                f"manifest's contents ({expected}); was it edited after export?"
            )
    return model, manifest
