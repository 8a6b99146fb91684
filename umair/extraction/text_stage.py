"""The e_TSEM stage of the extraction pipeline: a Ray Data actor (Ray-free code) that
runs E^text over each batch's text columns (:func:`umair.text.tag_embeddings.embed_texts`)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umair.config import StorageConfig


class _RememberingTextModel:
    """Wraps a Sentence-Transformers model so every text is encoded once per actor, keyed
    by its sha256 (dedup mode sends each batch's distinct tags; most were seen in earlier
    batches; the actor's model version is fixed, so the key is (version, text hash))."""

    def __init__(self, model: Any, max_entries: int = 1_000_000):
        self.model, self.max_entries = model, max_entries
        self.memory: dict[bytes, np.ndarray] = {}

    def get_embedding_dimension(self) -> int:
        fn = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(fn())

    def encode(self, texts: list[str], batch_size: int = 32, normalize_embeddings: bool = True, **_: Any) -> np.ndarray:
        keys = [hashlib.sha256(t.encode("utf-8")).digest() for t in texts]
        todo: dict[bytes, str] = {}
        for t, k in zip(texts, keys, strict=True):
            if k not in self.memory and k not in todo:
                todo[k] = t
        if todo:
            vectors = self.model.encode(
                list(todo.values()),
                batch_size=batch_size,
                normalize_embeddings=normalize_embeddings,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            if len(self.memory) + len(todo) > self.max_entries:
                self.memory.clear()
            self.memory.update(zip(todo, np.asarray(vectors, np.float32), strict=True))
        dim = self.get_embedding_dimension()
        return np.stack([self.memory[k] for k in keys]) if texts else np.zeros((0, dim), np.float32)


class EmbedTags:
    """Ray Data actor: e_TSEM [n, dim] of each row from its text columns; NULL for a row
    without text. ``path``: a saved encoder, ``base`` or a plain model directory
    (:func:`umair.text.saved_encoder.load_text_encoder`). ``columns`` None = every column
    of the batch but illust_id and image_uri, in order (what
    :func:`umair.extraction.plan.select_rows` selects: the ``text_columns``);
    ``max_chars`` None = :data:`umair.text.item_texts.TEXT_MAX_CHARS`. The text columns
    are dropped from the batch, ``tsem`` is appended."""

    def __init__(
        self,
        path: str,
        mode: str,
        batch_size: int,
        use_gpu: bool,
        storage_config: StorageConfig,
        columns: list[str] | tuple[str, ...] | None = None,
        max_chars: int | None = None,
    ):
        from umair.text.item_texts import TEXT_MAX_CHARS
        from umair.text.saved_encoder import load_text_encoder

        encoder = load_text_encoder(path, device="cuda" if use_gpu else "cpu", settings=storage_config.to_settings())
        self.model, self.version = _RememberingTextModel(encoder.model), encoder.version
        self.mode, self.batch_size = mode, batch_size
        self.columns = list(columns) if columns is not None else None
        self.max_chars = max_chars or TEXT_MAX_CHARS

    def __call__(self, batch: pa.Table) -> pa.Table:
        from umair.text.tag_embeddings import embed_texts

        columns = self.columns or [c for c in batch.column_names if c not in ("illust_id", "image_uri")]
        tsem, _ = embed_texts(
            batch.select(["illust_id", *columns]),
            self.model,
            self.version,
            columns=columns,
            mode=self.mode,
            max_chars=self.max_chars,
            batch_size=self.batch_size,
        )
        if not tsem.column("illust_id").equals(batch.column("illust_id")):
            order = {i: r for r, i in enumerate(tsem.column("illust_id").to_pylist())}  # join by id
            tsem = tsem.take(pa.array([order[i] for i in batch.column("illust_id").to_pylist()]))
        dense, given = dense_vectors(tsem.column("tsem"))
        return batch.drop_columns(columns).append_column("tsem", dense).append_column(GIVEN.format("tsem"), given)


GIVEN = "{}_given"  # a bool column beside a vector column that may be absent in some rows


def dense_vectors(column: pa.ChunkedArray | pa.Array) -> tuple[pa.FixedSizeListArray, pa.BooleanArray]:
    """(vectors with NULL rows as zeros, given [n] bool). Ray Data turns a fixed-size list
    column holding NULLs into Python objects and one without into a tensor, and blocks of
    both kinds do not unify; so absent vectors travel as zeros with a ``<m>_given`` mask
    (``write_parts`` stores only the given ones)."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = col.type.list_size
    given = pc.invert(col.is_null()).to_numpy(zero_copy_only=False).astype(bool)
    dense = np.zeros((len(col), dim), np.float32)
    if given.any():
        dense[given] = col.filter(pa.array(given)).flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1), pa.float32()), dim), pa.array(given)
