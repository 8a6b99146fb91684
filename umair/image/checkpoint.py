"""Exported encoders: a directory with ``encoder.pt`` (state dict) and ``manifest.json``.

The manifest records everything that defines the encoder's outputs (the full spec:
backbone, image size, style layers, resize mode, normalisation; preprocessing, pooling,
weights hash, output dims, the pretrained start ``init``) and where it came from (tag
vocabulary hash, training data version), so extraction and training can check they use
the same one. The pretext classifier head, when there is one, is kept beside the
encoder in ``pretext_head.pt`` (a later pretext run started from this encoder restores
it row by tag); the encoder itself never carries it. Its ``version`` (:func:`encoder_version`) is
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
HEAD = "pretext_head.pt"


class CheckpointError(UmairError, ValueError):
    """A checkpoint cannot be used; the message names the file and why."""


# How encoder_version hashes a manifest: 1 = backbone-size-weights only (no longer written);
# 2 = spec (backbone, size, style layers), preprocessing, pooling, weights; 3 = 2 + resize
# mode, normalisation and the pretrained start. Scheme-2 manifests are still verified.
VERSION_SCHEME = 3
VERIFIED_SCHEMES = (2, VERSION_SCHEME)
_SCHEME2_SPEC_FIELDS = ("backbone", "image_size", "style_layers")


def version_inputs(manifest: dict) -> dict:
    """Everything in ``manifest`` that changes the encoder's outputs: the spec's
    output-affecting fields (:meth:`EncoderSpec.output_identity`: resize mode and
    normalisation included), the preprocessing, the pooling, the weights and the weights
    it started from (``init``). Provenance (creation time, tag vocabulary, training
    data) and derived values (dims) are left out: they do not change outputs. A manifest
    of scheme 2 (or without a scheme) hashes as it did when it was written."""
    spec = EncoderSpec.from_manifest(manifest["spec"])
    identity = spec.output_identity()
    if manifest.get("version_scheme", 2) < VERSION_SCHEME:
        return {
            "scheme": 2,
            "spec": {k: identity[k] for k in _SCHEME2_SPEC_FIELDS},
            "preprocessing": manifest.get("preprocessing") or preprocessing_manifest(spec.image_size),
            "pooling": manifest.get("pooling") or POOLING,
            "weights": manifest["weights_sha"],
        }
    return {
        "scheme": VERSION_SCHEME,
        "spec": identity,
        "preprocessing": manifest.get("preprocessing") or preprocessing_manifest(spec.image_size, spec.resize),
        "pooling": manifest.get("pooling") or POOLING,
        "weights": manifest["weights_sha"],
        "init": (manifest.get("init") or {}).get("weights"),
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
        "preprocessing": preprocessing_manifest(model.spec.image_size, model.spec.resize),
        "pooling": dict(POOLING),
        "weights_sha": weights_sha,
        **extra,
    }
    manifest["version"] = encoder_version(manifest)
    return manifest


def save_encoder(model: DualEncoder, out: str, init: dict | None = None, **provenance) -> dict:
    """Write the encoder (without any classifier head) and its manifest to ``out``; the
    head, if any, goes to ``pretext_head.pt`` beside it. ``init``: the pretrained start
    (:func:`load_init`'s record: ``source``, ``weights``), versioned."""
    import hashlib

    if model.head is not None:
        head = io.BytesIO()
        torch.save(model.head.state_dict(), head)
        storage.write_bytes(storage.join(out, HEAD), head.getvalue())
    if init is not None:
        provenance["init"] = init
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
        spec = EncoderSpec.from_manifest(manifest["spec"])
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
    if manifest.get("version_scheme") in VERIFIED_SCHEMES:  # older manifests keep the version they were written with
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


def _torchvision_state(backbone: str, name: str) -> dict[str, torch.Tensor]:
    """The state dict of torchvision weights ``name`` for ``backbone`` (downloads once into
    torch's hub cache); CheckpointError naming what to do where that is impossible."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(backbone)[name]
    except KeyError:
        known = ", ".join(w.name for w in torchvision.models.get_model_weights(backbone))
        raise CheckpointError(f"init torchvision:{name}: {backbone} has no such weights (known: {known})") from None
    try:
        return weights.get_state_dict(progress=False)
    except Exception as err:  # URLError, HTTPError, OSError, RuntimeError (hash mismatch) ...
        raise CheckpointError(
            f"init torchvision:{name}: cannot download {weights.url} ({type(err).__name__}: {err}). "
            f"Offline, put the file in {torch.hub.get_dir()}/checkpoints/ or give init a local PATH "
            "(a state dict file or an exported encoder directory)"
        ) from err


def _as_encoder_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state dict (conv1, bn1, layerN, fc) in DualEncoder's key names
    (stem.0, stem.1, layerN; fc dropped); DualEncoder keys pass unchanged."""
    renamed = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        for old, new in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
            if key.startswith(old):
                key = new + key[len(old) :]
        renamed[key] = value
    return renamed


def load_init(model: DualEncoder, init: str, vocabulary: list[str] | None = None, settings=None) -> dict:
    """Load the pretrained start ``init`` into ``model`` (in place) and return its record
    for the manifest: ``{"source": init, "weights": <identity>, "head_tags": <rows restored>}``.

    ``init`` is ``torchvision:<WEIGHTS>`` (e.g. ``torchvision:IMAGENET1K_V2``; identity
    the enum), an exported encoder directory (identity its ``weights_sha``; its pretext
    head, when saved, restores the rows of the tags in ``vocabulary`` that it knows), or a
    state-dict file (DualEncoder or torchvision ResNet keys; identity its sha256). The
    backbone must match ``model.spec.backbone``; keys missing or unexpected raise
    :class:`CheckpointError` naming the source."""
    import hashlib

    head_tags = 0
    if init.startswith("torchvision:"):
        state, identity = _torchvision_state(model.spec.backbone, init.split(":", 1)[1]), init
    else:
        manifest_uri = storage.join(init, MANIFEST)
        if storage.exists(manifest_uri, settings):
            source, manifest = load_encoder(init)
            if manifest["spec"]["backbone"] != model.spec.backbone:
                raise CheckpointError(
                    f"init {init}: a {manifest['spec']['backbone']} encoder cannot start a {model.spec.backbone}"
                )
            state, identity = dict(source.state_dict()), str(manifest["weights_sha"])
            head_uri = storage.join(init, HEAD)
            old_vocab = manifest.get("tag_vocabulary") or []
            if model.head is not None and vocabulary and old_vocab and storage.exists(head_uri, settings):
                head = torch.load(
                    io.BytesIO(storage.read_bytes(head_uri, settings)), map_location="cpu", weights_only=True
                )
                index = {t: i for i, t in enumerate(old_vocab)}
                with torch.no_grad():
                    for row, tag in enumerate(vocabulary):
                        if tag in index:
                            model.head.weight[row] = head["weight"][index[tag]]
                            model.head.bias[row] = head["bias"][index[tag]]
                            head_tags += 1
        else:
            try:
                data = storage.read_bytes(init, settings)
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except storage.StorageError as err:
                raise CheckpointError(f"init {init}: neither an exported encoder nor a readable file ({err})") from err
            except Exception as err:
                raise CheckpointError(f"init {init}: not a state dict ({type(err).__name__}: {err})") from err
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                state = state["model"]  # a pretext job's own checkpoint (state.pt)
            if not isinstance(state, dict):
                raise CheckpointError(f"init {init}: not a state dict (a {type(state).__name__})")
            identity = hashlib.sha256(data).hexdigest()
    state = {k: v for k, v in _as_encoder_keys(state).items() if not k.startswith("head.")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that do not match
        first = str(err).split("\n\t")[1:2] or [str(err)[:200]]
        raise CheckpointError(f"init {init}: weights do not fit a {model.spec.backbone} ({first[0]})") from err
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"init {init}: weights do not fit a {model.spec.backbone} (missing {len(missing)} keys e.g. "
            f"{missing[:2]}, unexpected {len(result.unexpected_keys)} e.g. {result.unexpected_keys[:2]})"
        )
    return {"source": init, "weights": identity, "head_tags": head_tags}
