"""Settings of ``umair extract`` (see pipelines/configs/extract.yaml); unknown keys are errors."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from umair.config import MlflowConfig, RayConfig, Settings, StorageConfig
from umair.image.preprocess import MAX_PIXELS
from umair.text.item_texts import TEXT_MAX_CHARS


class EncoderSource(Settings):
    """Which image encoder. ``source``: an exported encoder directory (local or s3://),
    ``torchvision:<WEIGHTS>`` (production, needs the internet) or ``None`` for random
    weights drawn with ``seed`` (tests, benchmarks). ``spec`` (the keys of
    :class:`umair.image.spec.EncoderSpec`) applies only when the source is not an
    exported directory, whose own manifest defines backbone and image size.

    ``spec`` is held as a validated dict so that importing this module does not import
    torch: the read/decode and write workers import it, and torch would cost each of
    them seconds and hundreds of MiB."""

    source: str | None = None
    spec: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    seed: int = 0

    @field_validator("spec")
    @classmethod
    def _valid_spec(cls, value: dict[str, Any]) -> dict[str, Any]:
        from umair.image.spec import EncoderSpec

        try:
            return EncoderSpec(**value).model_dump(mode="json")
        except ValidationError as err:
            raise ValueError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())) from None


class ExtractConfig(Settings):
    """Settings of ``umair extract`` (unknown keys are errors)."""

    catalogue: str = Field(..., description="illustrations table: parquet file or directory, local or s3://")
    output: str = Field(..., description="item-features prefix: local directory or s3://bucket/prefix")
    encoder: EncoderSource = Field(default_factory=EncoderSource)
    text_model: str | None = Field(
        None,
        description="E^text for e_TSEM: a fine-tuned encoder directory (umair finetune-text), 'base' (the packaged "
        "all-MiniLM-L6-v2) or a local Sentence-Transformers model directory; None = no e_TSEM",
    )
    text_columns: tuple[str, ...] = Field(
        ("tags",),
        description="illustrations columns whose text makes e_TSEM: string (title, description) or list<string> "
        "(tags); see umair.text.item_texts",
    )
    text_mode: Literal["dedup", "joined"] = Field(
        "dedup",
        description="dedup: mean of the distinct pieces' vectors (each tag, each string value); "
        "joined: one text per item, 'Title | tag1, tag2'",
    )
    text_max_chars: int = Field(TEXT_MAX_CHARS, ge=1, description="texts (pieces in dedup mode) are cut to this")
    text_batch_size: int = Field(256, ge=1, description="strings per text-encoder forward pass")
    text_concurrency: int = Field(1, ge=1, description="text-encoder actors")
    text_num_gpus: float = Field(0.0, ge=0, description="GPU share per text actor (0 = CPU)")
    since: datetime | None = Field(
        None, description="only illustrations with created_at >= since (ISO date or time, UTC)"
    )
    batch_size: int = Field(64, ge=1, description="images per encoder forward pass")
    decode_batch_size: int = Field(32, ge=1, description="rows per read+decode batch (and per input block)")
    encode_concurrency: int = Field(1, ge=1, description="encoder actors (one model load each)")
    encode_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per encoder actor (torch threads on CPU)")
    decode_num_cpus: float = Field(1.0, gt=0, description="CPUs per read+decode task")
    use_gpu: bool = False
    decode: Literal["cpu", "gpu", "auto"] = Field(
        "auto",
        description="cpu: decode on the CPU tasks; gpu: CPU tasks read bytes, the encoder actors decode JPEGs on "
        "their GPU in batches (other files and refused JPEGs on the actor's CPU); auto: gpu when use_gpu",
    )
    chunk_rows: int = Field(10_000, ge=1, description="rows per commit: a killed run keeps every committed chunk")
    write_batch_rows: int = Field(2048, ge=1, description="rows per part file (at most)")
    max_image_bytes: int = Field(64 * 2**20, ge=1, description="larger files are error rows (stage read)")
    max_image_pixels: int = Field(MAX_PIXELS, ge=1, description="larger images (from the header) are error rows")
    io_retry_s: float = Field(
        120.0, ge=0, description="how long transient storage errors are retried before the job stops"
    )
    retry_failed: bool = Field(False, description="try again ids whose committed record is an error")
    stale_after_s: float = Field(
        1800.0,
        gt=0,
        description="a lease whose heartbeat is older than this (or whose process on this host is gone) is dead",
    )
    heartbeat_s: float = Field(30.0, gt=0, description="how often a running extraction renews its lease on the output")
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig(experiment="umair-extract")
    storage: StorageConfig = StorageConfig()

    @field_validator("text_columns")
    @classmethod
    def _distinct_text_columns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("name at least one column (e.g. [tags]); to skip e_TSEM set text_model: null")
        blank = [c for c in value if not c.strip()]
        repeated = sorted({c for c in value if value.count(c) > 1})
        if blank or repeated:
            raise ValueError(f"columns must be distinct, non-blank names; got {list(value)}")
        if "image_uri" in value or "illust_id" in value:
            raise ValueError(f"illust_id and image_uri are not text columns; got {list(value)}")
        return value

    @model_validator(mode="after")
    def _gpu_decode_needs_gpus(self) -> ExtractConfig:
        if self.decode == "gpu" and not self.use_gpu:
            raise ValueError(
                "decode: gpu decodes on the encoder actors' GPUs and needs use_gpu: true (or decode: auto)"
            )
        return self

    def resolved_decode(self) -> Literal["cpu", "gpu"]:
        """Where images are decoded: ``gpu`` for ``decode: gpu``, and for ``auto`` when the encoders use GPUs."""
        return "gpu" if self.decode == "gpu" or (self.decode == "auto" and self.use_gpu) else "cpu"

    @field_validator("encoder", mode="before")
    @classmethod
    def _encoder_shorthand(cls, value: Any) -> Any:
        """``encoder: some/dir`` (or ``encoder: null``) is short for ``encoder: {source: some/dir}``."""
        return {"source": value} if value is None or isinstance(value, str) else value

    @field_validator("since", mode="before")
    @classmethod
    def _since_utc(cls, value: Any) -> Any:
        """A date means its midnight UTC; a time without a zone is UTC."""
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if isinstance(value, date) and not isinstance(value, datetime):
            value = datetime(value.year, value.month, value.day)
        if isinstance(value, datetime) and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value
