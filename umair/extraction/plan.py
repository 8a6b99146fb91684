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
    """Version and dim of the configured text encoder (from its manifest), or None."""
    if not cfg.text_model:
        return None
    from umair.text.saved_encoder import read_manifest

    manifest = read_manifest(cfg.text_model, settings)
    return {"version": str(manifest["version"]), "dim": int(manifest["embedding_dim"])}


def select_rows(
    cfg: ExtractConfig, settings: storage.StorageSettings, done: np.ndarray
) -> tuple[pa.Table, dict[str, int]]:
    """The catalogue rows to process: created on/after ``since`` and not committed yet."""
    catalogue = contracts.read_table(cfg.catalogue, "illustrations", settings)
    columns = ["illust_id", "image_uri"] + (["tags"] if cfg.text_model else [])
    selected = catalogue
    if cfg.since is not None:
        selected = selected.filter(
            pc.greater_equal(selected.column("created_at"), pa.scalar(cfg.since, contracts.TIMESTAMP))
        )
    todo = selected.filter(pc.invert(pc.is_in(selected.column("illust_id"), value_set=pa.array(done, pa.int64()))))
    counts = {
        "catalogue_rows": catalogue.num_rows,
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
            "text_mode": cfg.text_mode,
            "since": cfg.since.isoformat() if cfg.since else None,
            "batch_size": cfg.batch_size,
            "decode_batch_size": cfg.decode_batch_size,
            "encode_concurrency": cfg.encode_concurrency,
            "use_gpu": cfg.use_gpu,
            "chunk_rows": cfg.chunk_rows,
            "retry_failed": cfg.retry_failed,
        }.items()
    }
