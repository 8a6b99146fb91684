"""The directory a fine-tuned text encoder is saved to, and loading it back.

A saved encoder is a Sentence-Transformers model directory plus ``umair_manifest.json``
(:data:`MANIFEST`: base model, added tokens, data hash, metrics, embedding dim, version
string), local or on ``s3://``. (A plain model directory gets its manifest in a cache
instead: :mod:`umair.text.base_manifest`.) :func:`publish_encoder_dir` copies the manifest last, so
its presence means the directory is complete; :func:`read_manifest` and
:func:`load_text_encoder` refuse a directory without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from umair import storage
from umair.text.settings import TextEncoderError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

MANIFEST = "umair_manifest.json"
FORMAT_VERSION = 1


@dataclass
class TextEncoder:
    """A loaded fine-tuned encoder: the model, its version string and its manifest."""

    model: SentenceTransformer
    version: str
    manifest: dict[str, Any]
    path: str


def content_hash(local_dir: str) -> str:
    """sha256 over every file of a saved model (path and bytes): the encoder's identity."""
    h = hashlib.sha256()
    for root, _, names in sorted(os.walk(local_dir)):
        for n in sorted(names):
            path = os.path.join(root, n)
            h.update(os.path.relpath(path, local_dir).encode() + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def check_output_dir(output_dir: str, settings: storage.StorageSettings | None = None) -> None:
    """Raise :class:`TextEncoderError` unless ``output_dir`` is empty, absent or a saved
    encoder (an encoder may be replaced; any other non-empty directory may not)."""
    if storage.list_files(output_dir, settings) and not storage.exists(storage.join(output_dir, MANIFEST), settings):
        raise TextEncoderError(f"{output_dir}: exists and holds files but no {MANIFEST}; refusing to overwrite it")


def publish_encoder_dir(local_dir: str, output_dir: str, settings: storage.StorageSettings | None = None) -> None:
    """Copy a local model directory to ``output_dir`` (local or s3://), replacing the
    encoder there (:func:`check_output_dir`), the manifest last."""
    check_output_dir(output_dir, settings)
    storage.delete_dir(output_dir, settings)
    files = []
    for root, _, names in os.walk(local_dir):
        for n in names:
            files.append(os.path.relpath(os.path.join(root, n), local_dir))
    files.sort(key=lambda f: (f == MANIFEST, f))
    for rel in files:
        with open(os.path.join(local_dir, rel), "rb") as f:
            storage.write_bytes(storage.join(output_dir, *rel.split(os.sep)), f.read(), settings)


def read_manifest(path: str, settings: storage.StorageSettings | None = None) -> dict[str, Any]:
    """The manifest of the saved encoder at ``path``; :class:`TextEncoderError` when it is
    missing, not JSON, or lacks ``version``, ``embedding_dim`` or ``base_model``."""
    uri = storage.join(path, MANIFEST)
    if not storage.exists(uri, settings):
        raise TextEncoderError(
            f"{uri}: no manifest; {path} is not a complete umair text encoder (was the run interrupted?)"
        )
    try:
        manifest = json.loads(storage.read_bytes(uri, settings))
    except json.JSONDecodeError as err:
        raise TextEncoderError(f"{uri}: not valid JSON ({err.msg}, line {err.lineno})") from None
    for key in ("version", "embedding_dim", "base_model"):
        if key not in manifest:
            raise TextEncoderError(f"{uri}: manifest lacks '{key}'")
    return manifest


def load_text_encoder(
    path: str, device: str | None = None, settings: storage.StorageSettings | None = None
) -> TextEncoder:
    """Load E^text: a saved encoder directory (local or s3://; s3 is copied to a temp
    dir), ``base`` (the packaged all-MiniLM-L6-v2) or a local plain Sentence-Transformers
    directory, whose manifest :mod:`umair.text.base_manifest` writes on first use."""
    from sentence_transformers import SentenceTransformer

    from umair.text.base_manifest import resolve_text_model

    path, manifest = resolve_text_model(path, settings)
    local = path
    tmp: str | None = None
    if storage.is_s3(path):
        tmp = tempfile.mkdtemp(prefix="umair-text-load-")
        prefix = path.rstrip("/") + "/"
        for uri in storage.list_files(path, settings):
            dest = os.path.join(tmp, *uri[len(prefix) :].split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(storage.read_bytes(uri, settings))
        local = tmp
    try:
        model = SentenceTransformer(local, device=device)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    dim = int(model.get_embedding_dimension())
    if dim != int(manifest["embedding_dim"]):
        raise TextEncoderError(f"{path}: model gives {dim}-d embeddings, manifest says {manifest['embedding_dim']}")
    return TextEncoder(model=model, version=str(manifest["version"]), manifest=manifest, path=path)
