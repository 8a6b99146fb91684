"""What one extraction run will do, decided before Ray starts: the image and text
encoders' versions and widths (from their manifests, without loading weights when
exported) and the catalogue rows still to process."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umair import contracts, storage
from umair.extraction.settings import ExtractConfig
from umair.extraction.stages import load_image_encoder
from umair.feature_store import read_json


def encoder_info(cfg: ExtractConfig, settings: storage.StorageSettings) -> dict:
    """Version, dims and spec of the configured image encoder (exported: manifest only)."""
    from umair.image.checkpoint import MANIFEST
    from umair.image.spec import EncoderSpec

    source = cfg.encoder.source
    if source is not None and not source.startswith("torchvision:"):
        manifest = read_json(storage.join(source, MANIFEST), settings, cfg.io_retry_s)
    else:
        _, manifest = load_image_encoder(source, dict(cfg.encoder.spec), cfg.encoder.seed)
    spec = EncoderSpec(**manifest["spec"])
    return {
        "version": manifest["version"],
        "sem_dim": int(manifest["sem_dim"]),
        "sty_dim": int(manifest["sty_dim"]),
        "spec": spec.model_dump(mode="json"),
        "image_size": spec.image_size,
    }


def text_info(cfg: ExtractConfig, settings: storage.StorageSettings) -> dict | None:
    """The configured text encoder and e_TSEM settings, or None without ``text_model``:
    ``version`` (the feature-set version: encoder version + text columns, mode and max
    chars, :func:`umair.text.item_texts.text_feature_version`), ``dim``,
    ``model_version``, ``path`` (``base`` resolved), ``columns``, ``mode`` and
    ``max_chars``. A plain model directory gets its manifest here, once
    (:mod:`umair.text.base_manifest`)."""
    if not cfg.text_model:
        return None
    from umair.text.base_manifest import resolve_text_model
    from umair.text.item_texts import text_feature_version

    path, manifest = resolve_text_model(cfg.text_model, settings)
    model_version = str(manifest["version"])
    return {
        "version": text_feature_version(model_version, cfg.text_columns, cfg.text_mode, cfg.text_max_chars),
        "dim": int(manifest["embedding_dim"]),
        "model_version": model_version,
        "path": path,
        "columns": list(cfg.text_columns),
        "mode": cfg.text_mode,
        "max_chars": cfg.text_max_chars,
    }


def select_rows(
    cfg: ExtractConfig, settings: storage.StorageSettings, done: np.ndarray
) -> tuple[pa.Table, dict[str, int]]:
    """The catalogue rows to process: created on/after ``since`` and not committed yet
    (``done``: the sorted int64 skip list, :func:`umair.feature_store.done_ids`); columns
    illust_id, image_uri and, with ``text_model``, the ``text_columns`` in their order
    (each checked to be string or list<string>: a :class:`ContractError` names the
    catalogue, the key ``text_columns`` and the column).

    Bounded and columnar at a million rows: only those columns are read, ``since`` is
    pushed down to the parquet reader (row groups or partitions older than it are not
    read), the catalogue's row count comes from its metadata, and the skip list is an
    Arrow hash lookup over the int64 column, never Python objects per id."""
    import pyarrow.dataset as pads

    fs, path = storage.resolve(cfg.catalogue, settings)
    with storage.storage_errors(cfg.catalogue, "read", settings):
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
    schema = dataset.schema
    columns = ["illust_id", "image_uri"]
    if cfg.text_model:
        from umair.text.item_texts import check_text_columns

        check_text_columns(schema, cfg.text_columns, cfg.catalogue)
        columns += list(cfg.text_columns)
    read, where = list(columns), None
    if cfg.since is not None:
        if "created_at" not in schema.names:
            raise contracts.ContractError(
                cfg.catalogue, "created_at", "a timestamp column (the 'since' setting filters on it)", "no such column"
            )
        read.append("created_at")
        have = schema.field("created_at").type
        if pa.types.is_timestamp(have):  # else the contract check below names the column
            where = pads.field("created_at") >= pa.scalar(cfg.since, contracts.TIMESTAMP).cast(have)
    with storage.storage_errors(cfg.catalogue, "read", settings):
        catalogue_rows = dataset.count_rows()
        selected = contracts.validate(dataset.to_table(columns=read, filter=where), "illustrations", cfg.catalogue)
    if cfg.since is not None:  # exact, in the contract's type (the pushdown only skips what it can)
        selected = selected.filter(
            pc.greater_equal(selected.column("created_at"), pa.scalar(cfg.since, contracts.TIMESTAMP))
        )
    todo = selected.filter(pc.invert(pc.is_in(selected.column("illust_id"), value_set=pa.array(done, pa.int64()))))
    counts = {
        "catalogue_rows": catalogue_rows,
        "selected_rows": selected.num_rows,
        "already_done": selected.num_rows - todo.num_rows,
        "to_process": todo.num_rows,
    }
    return todo.select(columns).combine_chunks(), counts


def run_params(cfg: ExtractConfig, enc: dict, text: dict | None, run_id: str) -> dict[str, str]:
    """The run's MLflow params: what it reads and writes, the encoders and the pipeline settings."""
    return {
        k: str(v)
        for k, v in {
            "run_id": run_id,
            "catalogue": cfg.catalogue,
            "output": cfg.output,
            "encoder_source": cfg.encoder.source,
            "encoder_version": enc["version"],
            "backbone": enc["spec"]["backbone"],
            "image_size": enc["image_size"],
            "text_model": cfg.text_model,
            "text_version": text["version"] if text else None,
            "text_model_version": text["model_version"] if text else None,
            "text_mode": cfg.text_mode,
            "text_columns": ",".join(cfg.text_columns),
            "text_max_chars": cfg.text_max_chars,
            "since": cfg.since.isoformat() if cfg.since else None,
            "batch_size": cfg.batch_size,
            "decode_batch_size": cfg.decode_batch_size,
            "encode_concurrency": cfg.encode_concurrency,
            "use_gpu": cfg.use_gpu,
            "chunk_rows": cfg.chunk_rows,
            "retry_failed": cfg.retry_failed,
        }.items()
    }
