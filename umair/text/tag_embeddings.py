"""e_TSEM: the text-semantic vector of each illustration, E^text applied to its tags (eq. 5).

Two modes:

- ``"dedup"`` (default): tags repeat enormously across a catalogue, so every distinct tag
  is encoded once (unit-normalised) and an illustration's e_TSEM is the mean of its
  distinct tags' vectors (not re-normalised, so agreeing tags give a longer vector).
  With ``cache_dir`` the tag → vector table is kept as parquet, keyed by the encoder's
  version string; a later call with the same version encodes only tags it has not seen.
- ``"joined"``: the illustration's distinct tags, in their listed order, are joined with
  ``", "`` and the string is encoded (unit-normalised) as one text.

Tags are stripped; empty tags are ignored. An illustration without tags gets the zero
vector in both modes (it carries no text signal, and zero keeps it out of any mean).

Output: ``illust_id`` (int64) and ``tsem`` (fixed_size_list<float32>[dim]), in the
input order, with file metadata ``umair.tsem.dim`` and ``umair.tsem.encoder`` so the
item-features contract can check it.
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

Mode = Literal["dedup", "joined"]
JOIN_SEPARATOR = ", "
POOL_CHUNK = 16384  # illustrations pooled per step in "dedup" mode


@dataclass
class TagEmbeddingStats:
    """Counts of one :func:`embed_tags` call."""

    mode: str
    illustrations: int
    illustrations_without_tags: int
    distinct_tags: int
    encoded_strings: int  # strings sent through the encoder in this call
    cached_tags: int  # distinct tags found in the cache
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


def _tag_lists(illustrations: pa.Table, file: str) -> tuple[np.ndarray, list[list[str]]]:
    for col in ("illust_id", "tags"):
        if col not in illustrations.column_names:
            raise ContractError(
                file,
                col,
                "a column (illust_id int64, tags list<string>)",
                f"no such column (columns: {', '.join(illustrations.column_names)})",
            )
    ids_col = illustrations.column("illust_id")
    if not pa.types.is_integer(ids_col.type):
        raise ContractError(file, "illust_id", "int64", str(ids_col.type))
    t = illustrations.schema.field("tags").type
    if not (
        (pa.types.is_list(t) or pa.types.is_large_list(t))
        and (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type))
    ):
        raise ContractError(file, "tags", "list<string>", str(t))
    row = pc.index(pc.fill_null(ids_col.is_null(), False), True).as_py()
    if row is not None and row >= 0:
        raise ContractError(file, "illust_id", "no nulls", "null", row)
    ids = ids_col.cast(pa.int64()).to_numpy()
    lists = []
    for tags in illustrations.column("tags").to_pylist():
        clean = [s.strip() for s in (tags or []) if s is not None and s.strip()]
        lists.append(list(dict.fromkeys(clean)))  # distinct, first-listed order
    return ids, lists


def _cache_uri(cache_dir: str, model_version: str) -> str:
    key = hashlib.sha256(model_version.encode()).hexdigest()[:16]
    return storage.join(cache_dir, f"tag-vectors-{key}.parquet")


def _read_cache(
    uri: str, model_version: str, dim: int, settings: storage.StorageSettings | None
) -> dict[str, np.ndarray]:
    if not storage.exists(uri, settings):
        return {}
    table = storage.read_parquet(uri, settings)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("umair.tsem.encoder") != model_version:
        raise ContractError(
            uri, None, f"a tag cache of encoder {model_version!r}", f"encoder {meta.get('umair.tsem.encoder')!r}"
        )
    vt = table.schema.field("vector").type
    if not pa.types.is_fixed_size_list(vt) or vt.list_size != dim:
        raise ContractError(uri, "vector", f"fixed_size_list<float32>[{dim}]", str(vt))
    flat = table.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return dict(zip(table.column("tag").to_pylist(), flat, strict=True))


def _vectors_table(tags: Sequence[str], vectors: np.ndarray, dim: int, model_version: str) -> pa.Table:
    vec = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1).astype(np.float32), pa.float32()), dim)
    return pa.table({"tag": pa.array(list(tags), pa.string()), "vector": vec}).replace_schema_metadata(
        {"umair.tsem.dim": str(dim), "umair.tsem.encoder": model_version}
    )


def tag_vectors(
    tags: Sequence[str],
    model: Any,
    model_version: str,
    batch_size: int = 256,
    cache_dir: str | None = None,
    settings: storage.StorageSettings | None = None,
) -> tuple[dict[str, np.ndarray], int, int]:
    """Unit vectors of the distinct ``tags``: (tag → vector, strings encoded, found in cache)."""
    dim = _dim_of(model)
    cache_uri = _cache_uri(cache_dir, model_version) if cache_dir else None
    known = _read_cache(cache_uri, model_version, dim, settings) if cache_uri else {}
    wanted = list(dict.fromkeys(tags))
    missing = [t for t in wanted if t not in known]
    hits = len(wanted) - len(missing)
    if missing:
        fresh = _encode(model, missing, batch_size)
        known.update(zip(missing, fresh, strict=True))
        if cache_uri:
            all_tags = list(known)
            storage.write_parquet(
                _vectors_table(all_tags, np.stack([known[t] for t in all_tags]), dim, model_version),
                cache_uri,
                settings,
            )
    return known, len(missing), hits


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
    """e_TSEM for every row of ``illustrations`` (columns illust_id, tags); see the module doc.

    ``model`` is anything with Sentence-Transformers' ``encode`` (and
    ``get_embedding_dimension``); ``model_version`` names it in the output metadata and
    keys the tag cache, so it must change whenever the weights do.
    """
    if mode not in ("dedup", "joined"):
        raise ValueError(f"unknown e_TSEM mode {mode!r}; expected 'dedup' or 'joined'")
    t0 = time.perf_counter()
    ids, lists = _tag_lists(illustrations, file)
    dim = _dim_of(model)
    n = len(lists)
    out = np.zeros((n, dim), np.float32)
    has_tags = np.fromiter((bool(t) for t in lists), dtype=bool, count=n)
    distinct = list(dict.fromkeys(t for tags in lists for t in tags))
    t_enc = time.perf_counter()
    if mode == "dedup":
        vectors, encoded, hits = tag_vectors(distinct, model, model_version, batch_size, cache_dir, settings)
        index = {t: i for i, t in enumerate(distinct)}
        table = np.stack([vectors[t] for t in distinct]) if distinct else np.zeros((0, dim), np.float32)
        tagged = np.flatnonzero(has_tags)
        for lo in range(0, len(tagged), POOL_CHUNK):  # bounded memory: gather one chunk at a time
            rows = tagged[lo : lo + POOL_CHUNK]
            counts = np.array([len(lists[r]) for r in rows])
            flat = np.fromiter((index[t] for r in rows for t in lists[r]), dtype=np.int64, count=int(counts.sum()))
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            out[rows] = np.add.reduceat(table[flat], starts, axis=0) / counts[:, None]
    else:
        rows = np.flatnonzero(has_tags)
        texts = [JOIN_SEPARATOR.join(lists[r]) for r in rows]
        if texts:
            out[rows] = _encode(model, texts, batch_size)
        encoded, hits = len(texts), 0
    encode_seconds = time.perf_counter() - t_enc
    tsem = pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1), pa.float32()), dim)
    result = pa.table({"illust_id": pa.array(ids, pa.int64()), "tsem": tsem}).replace_schema_metadata(
        {"umair.tsem.dim": str(dim), "umair.tsem.encoder": model_version}
    )
    stats = TagEmbeddingStats(
        mode=mode,
        illustrations=n,
        illustrations_without_tags=int((~has_tags).sum()),
        distinct_tags=len(distinct),
        encoded_strings=encoded,
        cached_tags=hits,
        encode_seconds=encode_seconds,
        wall_seconds=time.perf_counter() - t0,
    )
    return result, stats
