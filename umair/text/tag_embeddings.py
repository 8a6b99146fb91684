"""e_TSEM: the text-semantic vector of each illustration, E^text applied to its text (eq. 5).

Which text: the ``columns`` of the illustrations table (default ``tags``), composed as
:mod:`umair.text.item_texts` describes. Two modes:

- ``"dedup"`` (default): tags repeat enormously across a catalogue, so every distinct
  piece (a tag, a title) is encoded once (unit-normalised) and an illustration's e_TSEM
  is the mean of its distinct pieces' vectors (not re-normalised, so agreeing tags give
  a longer vector).
- ``"joined"``: the illustration's columns are composed into one text
  (``"Toy Story (1995) | Adventure, Animation"``), encoded (unit-normalised) as one.

Texts are cut to ``max_chars`` characters and encoded ``batch_size`` at a time. With
``cache_dir`` the vectors are kept as parquet, one file per encoder version, keyed by the
sha256 of the text: a later call with the same version encodes only texts it has not
seen, and identical texts are encoded once per call anyway. An illustration with no text
at all gets a NULL e_TSEM (absent modality), never the vector of an empty string.

Output: ``illust_id`` (int64) and ``tsem`` (fixed_size_list<float32>[dim], nullable),
in the input order, with file metadata ``umair.tsem.dim`` and ``umair.tsem.encoder``
(:func:`umair.text.item_texts.text_feature_version`) so the item-features contract can
check it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umair import storage
from umair.contracts import ContractError
from umair.text.item_texts import DEFAULT_COLUMNS, TEXT_MAX_CHARS, column_parts, compose, pieces, text_feature_version

Mode = Literal["dedup", "joined"]
POOL_CHUNK = 16384  # illustrations pooled per step in "dedup" mode
CACHE_PREFIX = "text-vectors-"


@dataclass
class TagEmbeddingStats:
    """Counts of one :func:`embed_texts` call (``distinct_tags``: distinct texts, i.e.
    pieces in "dedup" mode and composed texts in "joined" mode)."""

    mode: str
    illustrations: int
    illustrations_without_tags: int  # no text at all: NULL e_TSEM
    distinct_tags: int
    encoded_strings: int  # strings sent through the encoder in this call
    cached_tags: int  # distinct texts found in the cache
    encode_seconds: float
    wall_seconds: float


def _dim_of(model: Any) -> int:
    for name in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
        fn = getattr(model, name, None)
        if fn is not None and fn() is not None:
            return int(fn())
    return int(np.asarray(_encode(model, ["x"], 1)).shape[1])


def _encode(model: Any, texts: Sequence[str], batch_size: int) -> np.ndarray:
    if not texts:
        return np.zeros((0, _dim_of(model)), np.float32)
    out = model.encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return np.asarray(out, dtype=np.float32)


def text_key(text: str) -> str:
    """The cache key of ``text``: its sha256, hex (so long descriptions cost 64 bytes)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _ids(illustrations: pa.Table, file: str) -> np.ndarray:
    if "illust_id" not in illustrations.column_names:
        raise ContractError(
            file, "illust_id", "an int64 column", f"no such column (columns: {', '.join(illustrations.column_names)})"
        )
    ids_col = illustrations.column("illust_id")
    if not pa.types.is_integer(ids_col.type):
        raise ContractError(file, "illust_id", "int64", str(ids_col.type))
    row = pc.index(pc.fill_null(ids_col.is_null(), False), True).as_py()
    if row is not None and row >= 0:
        raise ContractError(file, "illust_id", "no nulls", "null", row)
    return ids_col.cast(pa.int64()).to_numpy()


def _cache_uri(cache_dir: str, model_version: str) -> str:
    key = hashlib.sha256(model_version.encode()).hexdigest()[:16]
    return storage.join(cache_dir, f"{CACHE_PREFIX}{key}.parquet")


def _read_cache(
    uri: str, model_version: str, dim: int, settings: storage.StorageSettings | None
) -> dict[str, np.ndarray]:
    if not storage.exists(uri, settings):
        return {}
    table = storage.read_parquet(uri, settings)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("umair.tsem.encoder") != model_version:
        raise ContractError(
            uri,
            None,
            f"a text-vector cache of encoder {model_version!r}",
            f"encoder {meta.get('umair.tsem.encoder')!r}",
        )
    vt = table.schema.field("vector").type
    if not pa.types.is_fixed_size_list(vt) or vt.list_size != dim:
        raise ContractError(uri, "vector", f"fixed_size_list<float32>[{dim}]", str(vt))
    flat = table.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return dict(zip(table.column("text_sha256").to_pylist(), flat, strict=True))


def _vectors_table(keys: Sequence[str], vectors: np.ndarray, dim: int, model_version: str) -> pa.Table:
    vec = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1).astype(np.float32), pa.float32()), dim)
    return pa.table({"text_sha256": pa.array(list(keys), pa.string()), "vector": vec}).replace_schema_metadata(
        {"umair.tsem.dim": str(dim), "umair.tsem.encoder": model_version}
    )


def text_vectors(
    texts: Sequence[str],
    model: Any,
    model_version: str,
    batch_size: int = 256,
    cache_dir: str | None = None,
    settings: storage.StorageSettings | None = None,
) -> tuple[dict[str, np.ndarray], int, int]:
    """Unit vectors of the distinct ``texts``: (text → vector, strings encoded, found in
    the cache). The cache (``cache_dir``, one parquet per ``model_version``) maps the
    sha256 of a text to its vector."""
    dim = _dim_of(model)
    cache_uri = _cache_uri(cache_dir, model_version) if cache_dir else None
    known = _read_cache(cache_uri, model_version, dim, settings) if cache_uri else {}
    wanted = list(dict.fromkeys(texts))
    keys = {t: text_key(t) for t in wanted}
    missing = [t for t in wanted if keys[t] not in known]
    hits = len(wanted) - len(missing)
    if missing:
        fresh = _encode(model, missing, batch_size)
        known.update(zip((keys[t] for t in missing), fresh, strict=True))
        if cache_uri:
            all_keys = list(known)
            storage.write_parquet(
                _vectors_table(all_keys, np.stack([known[k] for k in all_keys]), dim, model_version),
                cache_uri,
                settings,
            )
    return {t: known[keys[t]] for t in wanted}, len(missing), hits


def _null_where(out: np.ndarray, present: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    values = pa.array(out.reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~present))


def embed_texts(
    illustrations: pa.Table,
    model: Any,
    model_version: str,
    columns: Sequence[str] = DEFAULT_COLUMNS,
    mode: Mode = "dedup",
    max_chars: int = TEXT_MAX_CHARS,
    batch_size: int = 256,
    cache_dir: str | None = None,
    settings: storage.StorageSettings | None = None,
    file: str = "<illustrations>",
) -> tuple[pa.Table, TagEmbeddingStats]:
    """e_TSEM (n, dim) for every row of ``illustrations`` (``illust_id`` and the text
    ``columns``); see the module doc. A row without text gets NULL.

    ``model`` is anything with Sentence-Transformers' ``encode`` (and
    ``get_embedding_dimension``); ``model_version`` keys the cache and, with
    ``columns``, ``mode`` and ``max_chars``, names the output
    (:func:`~umair.text.item_texts.text_feature_version`), so it must change whenever
    the weights do.
    """
    if mode not in ("dedup", "joined"):
        raise ValueError(f"unknown e_TSEM mode {mode!r}; expected 'dedup' or 'joined'")
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    t0 = time.perf_counter()
    ids = _ids(illustrations, file)
    parts = column_parts(illustrations, columns, file)
    dim = _dim_of(model)
    n = len(parts)
    out = np.zeros((n, dim), np.float32)
    t_enc = time.perf_counter()
    if mode == "dedup":
        lists = [pieces(p, max_chars) for p in parts]
        present = np.fromiter((bool(t) for t in lists), dtype=bool, count=n)
        distinct = list(dict.fromkeys(t for row in lists for t in row))
        vectors, encoded, hits = text_vectors(distinct, model, model_version, batch_size, cache_dir, settings)
        index = {t: i for i, t in enumerate(distinct)}
        table = np.stack([vectors[t] for t in distinct]) if distinct else np.zeros((0, dim), np.float32)
        tagged = np.flatnonzero(present)
        for lo in range(0, len(tagged), POOL_CHUNK):  # bounded memory: gather one chunk at a time
            rows = tagged[lo : lo + POOL_CHUNK]
            counts = np.array([len(lists[r]) for r in rows])
            flat = np.fromiter((index[t] for r in rows for t in lists[r]), dtype=np.int64, count=int(counts.sum()))
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            out[rows] = np.add.reduceat(table[flat], starts, axis=0) / counts[:, None]
    else:
        texts = [compose(p, max_chars) for p in parts]
        present = np.fromiter((t is not None for t in texts), dtype=bool, count=n)
        distinct = list(dict.fromkeys(t for t in texts if t is not None))
        vectors, encoded, hits = text_vectors(distinct, model, model_version, batch_size, cache_dir, settings)
        rows = np.flatnonzero(present)
        if len(rows):
            out[rows] = np.stack([vectors[texts[r]] for r in rows])
    encode_seconds = time.perf_counter() - t_enc
    version = text_feature_version(model_version, columns, mode, max_chars)
    tsem = _null_where(out, present, dim)
    result = pa.table({"illust_id": pa.array(ids, pa.int64()), "tsem": tsem}).replace_schema_metadata(
        {"umair.tsem.dim": str(dim), "umair.tsem.encoder": version}
    )
    stats = TagEmbeddingStats(
        mode=mode,
        illustrations=n,
        illustrations_without_tags=int((~present).sum()),
        distinct_tags=len(distinct),
        encoded_strings=encoded,
        cached_tags=hits,
        encode_seconds=encode_seconds,
        wall_seconds=time.perf_counter() - t0,
    )
    return result, stats


def embed_tags(
    illustrations: pa.Table,
    model: Any,
    model_version: str,
    mode: Mode = "dedup",
    batch_size: int = 256,
    cache_dir: str | None = None,
    settings: storage.StorageSettings | None = None,
    file: str = "<illustrations>",
) -> tuple[pa.Table, TagEmbeddingStats]:
    """e_TSEM from the ``tags`` column alone: :func:`embed_texts` with ``columns=("tags",)``."""
    return embed_texts(
        illustrations,
        model,
        model_version,
        columns=DEFAULT_COLUMNS,
        mode=mode,
        batch_size=batch_size,
        cache_dir=cache_dir,
        settings=settings,
        file=file,
    )
