"""Pretext job: train the dual image encoder on multi-label tag prediction (Ray Train).

Images stream through Ray Data (bytes read from object storage or disk, decoded per
row; a row that fails to decode is skipped and counted, never a crashed job) into a
TorchTrainer with N workers (CPU or GPU). The recipe (:mod:`umair.image.pretext`):
colour-preserving augmentation (flips, mild random resized crops; ``augment``), the
asymmetric multi-label loss over the N most frequent tags (``loss``; ``kind: bce`` for
plain BCE), AdamW with a warm-up then cosine learning rate per step (``schedule``); a
checkpoint every epoch; a rerun with the same ``run_name`` and ``checkpoint_dir``
resumes from the latest checkpoint (the schedule is a function of the step: nothing
else to restore). Metrics (loss, mAP, micro-F1 on
a validation split, and the tag-frequency baseline's mAP) go to MLflow. At the end the
encoder is exported without its classifier head, with a manifest.

Images are fitted to the encoder's size by its resize mode (``encoder.resize``) with the
same :func:`umair.image.preprocess.decode_image` as extraction; normalisation is the
encoder's own first layer (``encoder.normalize``; ``dataset`` statistics are measured
here on up to ``stats_images`` training images). ``init`` starts from pretrained weights
(``torchvision:IMAGENET1K_V2``, an exported encoder directory whose pretext head is
restored tag by tag, or a state-dict file); the start is validated once on the driver
(offline, a hub download fails there with what to do), scored on the validation split
before the first step (``init_val_mAP``) and recorded in the manifest and the version.
``freeze_epochs`` > 0 freezes the stem up to ``freeze_upto`` (weights and BatchNorm
statistics) for the first epochs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipelines.runtime import (
    TrainReporter,
    claim_run_dir,
    ended_run,
    ingest_options,
    init_ray,
    resumable_mlflow_run,
    run_dir_of,
    train_console,
)
from umair import contracts, storage
from umair.config import MlflowConfig, RayConfig, Settings, StorageConfig
from umair.console import say
from umair.image.pretext import AugmentSettings, LossSettings, ScheduleSettings, frequency_baseline, tag_metrics
from umair.image.spec import EncoderSpec, with_dataset_statistics
from umair.image.tags import multi_hot, split_ids, tag_vocabulary


class PretrainImageConfig(Settings):
    catalogue: str  # illustrations table (parquet file or directory, local or s3://)
    output: str  # where the exported encoder goes
    encoder: EncoderSpec = EncoderSpec()
    init: str | None = None  # torchvision:IMAGENET1K_V2 | PATH (exported encoder dir or state dict) | None (random)
    freeze_upto: Literal["stem", "layer1", "layer2", "layer3"] = "layer1"
    freeze_epochs: int = Field(0, ge=0)  # epochs (from the first) with the stem .. freeze_upto frozen
    stats_images: int = Field(512, ge=1)  # training images that measure normalize: dataset statistics
    label_column: str = "tags"  # list<string> column whose values are the pretext's labels (tags, genres...)
    top_tags: int = 100
    val_fraction: float = 0.2
    epochs: int = 3
    batch_size: int = 32  # global: each of the N workers takes batch_size / N
    lr: float = 2e-3  # the peak rate (after the warm-up of a cosine schedule)
    weight_decay: float = 1e-4
    augment: AugmentSettings = AugmentSettings()
    loss: LossSettings = LossSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    num_workers: int = 2
    use_gpu: bool = False
    seed: int = 0
    run_name: str = "pretrain-image"
    checkpoint_dir: str = "outputs/ray_results"
    max_failures: int = 2
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig(experiment="umair-pretrain-image")
    storage: StorageConfig = StorageConfig()


@dataclass(frozen=True)
class PretrainWorker:
    """What every Ray Train worker of one pretext run needs (pickled into ``train_loop_config``)."""

    cfg: PretrainImageConfig
    vocabulary: tuple[str, ...]
    run_id: str
    tracking_uri: str
    console: TrainReporter  # rank 0's lines and step counts, shown by the driver
    steps_per_epoch: int  # batches of each worker per epoch: the schedule's clock


class DecodeRows:
    """Ray Data UDF: read each image's bytes and decode it; failures are flagged, not raised."""

    def __init__(self, image_size: int, resize: str, storage_config: StorageConfig):
        self.size, self.resize = image_size, resize
        self.settings = storage_config.to_settings()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from umair.image.preprocess import DecodeError, decode_image

        n = len(batch["image_uri"])
        images = np.zeros((n, self.size, self.size, 3), np.uint8)
        ok = np.zeros(n, bool)
        for i, uri in enumerate(batch["image_uri"]):
            try:
                images[i] = decode_image(storage.read_bytes(str(uri), self.settings), self.size, resize=self.resize)
                ok[i] = True
            except (DecodeError, storage.StorageError):
                pass
        return {"image": images, "labels": np.stack(batch["labels"]).astype(np.float32), "ok": ok}


def _nchw(images: Any) -> Any:
    """uint8 NHWC images as float NCHW in [0, 1], contiguous: a channels-last input gives 1x1
    convolutions channels-last weight gradients, which DDP's contiguous buckets do not match."""
    import torch

    return images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).div_(255)


def train_loop(config: dict[str, PretrainWorker]) -> None:
    """Runs on every Ray Train worker; ``config["settings"]`` holds the run's typed settings."""
    import mlflow
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import prepare_model

    from umair.image.checkpoint import load_init
    from umair.image.encoder import DualEncoder, early_modules
    from umair.image.pretext import asymmetric_loss, augment, lr_factor

    w = config["settings"]
    c = w.cfg
    torch.manual_seed(c.seed)
    if not c.use_gpu:
        torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    show = w.console if rank == 0 else w.console.muted()
    model = DualEncoder(c.encoder, n_tags=len(w.vocabulary))
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        show.say(f"[pretrain-image] resuming from the checkpoint of epoch {start_epoch - 1}; next epoch {start_epoch}")
    elif c.init:
        load_init(model, c.init, list(w.vocabulary), c.storage.to_settings())
    frozen = early_modules(model, c.freeze_upto)
    model = prepare_model(model)
    device = next(model.parameters()).device
    per_worker_batch = max(1, c.batch_size // world)  # batch_size is the global batch
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    client = mlflow.MlflowClient(w.tracking_uri) if rank == 0 else None

    def allreduce(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def evaluate() -> tuple[dict[str, float], int]:
        model.eval()
        scores, labels, val_failed = [], [], 0
        with torch.no_grad():
            for batch in val_shard.iter_torch_batches(batch_size=c.batch_size, device=device):
                ok = batch["ok"].bool()
                val_failed += int((~ok).sum())
                if ok.any():
                    x = _nchw(batch["image"][ok])
                    scores.append(torch.sigmoid(model(x).logits).cpu().numpy())
                    labels.append(batch["labels"][ok].cpu().numpy())
        return tag_metrics(np.concatenate(scores), np.concatenate(labels)), val_failed

    if c.init and start_epoch == 0:  # the pretrained start's own score, before any step
        init_metrics, _ = evaluate()
        show.say(f"[pretrain-image] init {c.init}: val_mAP={init_metrics['mAP']:.4g}")
        if rank == 0:
            client.log_metric(w.run_id, "init_val_mAP", init_metrics["mAP"], step=0)

    for epoch in range(start_epoch, c.epochs):
        model.train()
        freezing = epoch < c.freeze_epochs
        for m in frozen if freezing else []:
            m.eval()  # BatchNorm statistics stay as they were
        t0 = time.perf_counter()
        loss_sum = seen = failed = 0.0
        show.begin_epoch(epoch, c.epochs)
        lr = c.lr
        for i, batch in enumerate(train_shard.iter_torch_batches(batch_size=per_worker_batch, device=device)):
            show.step()
            lr = c.lr * lr_factor(epoch * w.steps_per_epoch + i, w.steps_per_epoch, c.epochs, c.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ok = batch["ok"].bool()
            failed += float((~ok).sum())
            if not ok.any():
                continue
            x = augment(_nchw(batch["image"][ok]), c.augment)
            y = batch["labels"][ok]
            loss = asymmetric_loss(model(x).logits, y, c.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for m in frozen if freezing else []:
                for p in m.parameters():
                    p.grad = None  # AdamW skips parameters without a gradient (no decay either)
            optimizer.step()
            loss_sum += float(loss.detach()) * x.shape[0]
            seen += x.shape[0]
        loss_sum, seen, failed = allreduce([loss_sum, seen, failed])
        train_s = time.perf_counter() - t0

        val_metrics, val_failed = evaluate()
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            "train_images": seen,
            "decode_failures": failed + val_failed,
            "images_per_s": seen / train_s,
            "lr": lr,
            **{f"val_{k}": v for k, v in val_metrics.items()},
        }
        show.say(
            f"[pretrain-image] epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch")
        )
        if rank == 0:
            client.log_batch(
                w.run_id,
                metrics=[
                    mlflow.entities.Metric(k, float(v), int(time.time() * 1000), epoch)
                    for k, v in metrics.items()
                    if k != "epoch"
                ],
            )
            with tempfile.TemporaryDirectory() as d:
                raw = model.module if hasattr(model, "module") else model
                torch.save(
                    {"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
                    os.path.join(d, "state.pt"),
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def prepare_data(cfg: PretrainImageConfig) -> tuple[pa.Table, list[str], np.ndarray]:
    """Read and validate the catalogue; build the tag vocabulary on the training split."""
    settings = cfg.storage.to_settings()
    table = contracts.read_table(cfg.catalogue, "illustrations", settings)
    col = cfg.label_column
    if col not in table.column_names or not pa.types.is_list(table.schema.field(col).type):
        found = str(table.schema.field(col).type) if col in table.column_names else "no such column"
        raise contracts.ContractError(cfg.catalogue, col, "a list<string> column of labels (label_column)", found)
    with_image = pc.invert(pc.is_null(table.column("image_uri")))
    skipped = table.num_rows - pc.sum(with_image).as_py()
    if skipped:
        say(f"[pretrain-image] {skipped} illustration(s) without an image_uri are left out of the pretext task")
    table = table.filter(with_image)
    tags = [t or [] for t in table.column(col).to_pylist()]
    is_val = split_ids(table.column("illust_id").to_numpy(), cfg.val_fraction, cfg.seed)
    vocab = tag_vocabulary([t for t, v in zip(tags, is_val) if not v], cfg.top_tags)
    if not vocab:
        raise ValueError(f"{cfg.catalogue}: no tags in the training split; the pretext task needs tagged illustrations")
    labels = multi_hot(tags, vocab)
    data = pa.table(
        {
            "illust_id": table.column("illust_id"),
            "image_uri": table.column("image_uri"),
            "labels": pa.FixedSizeListArray.from_arrays(pa.array(labels.ravel()), len(vocab)),
        }
    )
    return data, vocab, is_val


def check_init(cfg: PretrainImageConfig, vocab: list[str]) -> dict | None:
    """Load ``cfg.init`` once on the driver (a clear error before Ray starts when it cannot
    be had, e.g. a hub download offline); its record for the manifest, or None."""
    if not cfg.init:
        return None
    from umair.image.checkpoint import load_init
    from umair.image.encoder import DualEncoder

    record = load_init(DualEncoder(cfg.encoder, n_tags=len(vocab)), cfg.init, vocab, cfg.storage.to_settings())
    if cfg.init.startswith("torchvision:IMAGENET") and cfg.encoder.normalize != "imagenet":
        say(
            f"[pretrain-image] note: {cfg.init} was trained on ImageNet-normalised inputs, "
            f"but encoder.normalize is {cfg.encoder.normalize}"
        )
    return record


def steps_per_epoch(train_rows: int, cfg: PretrainImageConfig) -> int:
    """Batches per epoch of each worker (equal shares of the training split, ``batch_size / N`` each)."""
    per_worker_batch = max(1, cfg.batch_size // cfg.num_workers)
    return max(1, math.ceil((train_rows // cfg.num_workers) / per_worker_batch))


def run(cfg: PretrainImageConfig) -> dict:
    """Train, export the encoder, return a summary (also logged to MLflow)."""
    import mlflow
    import ray.data
    from ray.data import ActorPoolStrategy
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from umair.image.checkpoint import save_encoder
    from umair.image.encoder import DualEncoder

    t_start = time.perf_counter()
    settings = cfg.storage.to_settings()
    run_dir = run_dir_of(cfg.checkpoint_dir, cfg.run_name)
    say(
        f"[pretrain-image] reads {cfg.catalogue}; writes the encoder to {cfg.output}, checkpoints to {run_dir}, "
        f"MLflow experiment {cfg.mlflow.experiment} ({cfg.mlflow.resolved_uri()}); "
        f"{cfg.epochs} epochs on {cfg.num_workers} {'GPU' if cfg.use_gpu else 'CPU'} worker(s)"
    )
    data, vocab, is_val = prepare_data(cfg)
    training_uris = [u for u, v in zip(data.column("image_uri").to_pylist(), is_val) if not v and u]
    spec = with_dataset_statistics(cfg.encoder, training_uris[: cfg.stats_images], cfg.catalogue, settings)
    cfg = cfg.model_copy(update={"encoder": spec})
    init_record = check_init(cfg, vocab)
    labels = np.stack(data.column("labels").to_numpy(zero_copy_only=False))
    baseline = frequency_baseline(labels, is_val)
    say(
        f"[pretrain-image] {data.num_rows} illustrations ({int(is_val.sum())} validation), {len(vocab)} tags; "
        f"tag-frequency baseline mAP={baseline['mAP']:.4f}"
    )

    vocab_hash = hashlib.sha256("\n".join(vocab).encode()).hexdigest()[:16]
    data_version = hashlib.sha256(
        data.column("illust_id").to_numpy().tobytes() + "\n".join(vocab).encode()
    ).hexdigest()[:16]
    claim_run_dir(run_dir, data_version, "pretrain-image", settings)  # resuming on other data would mix them
    run_id = resumable_mlflow_run(cfg.mlflow, run_dir, cfg.run_name, settings=settings)
    client = mlflow.MlflowClient(cfg.mlflow.resolved_uri())
    params = {
        "backbone": cfg.encoder.backbone,
        "image_size": cfg.encoder.image_size,
        "resize": cfg.encoder.resize,
        "normalize": cfg.encoder.normalize,
        "init": cfg.init,
        "init_weights": init_record["weights"] if init_record else None,
        "freeze": f"{cfg.freeze_upto} for {cfg.freeze_epochs} epochs" if cfg.freeze_epochs else None,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "augment": cfg.augment.model_dump_json(),
        "loss": cfg.loss.model_dump_json(),
        "schedule": cfg.schedule.model_dump_json(),
        "num_workers": cfg.num_workers,
        "use_gpu": cfg.use_gpu,
        "n_tags": len(vocab),
        "tag_vocab_hash": vocab_hash,
        "data_version": data_version,
        "catalogue": cfg.catalogue,
    }
    existing = client.get_run(run_id).data.params
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items() if k not in existing])
    client.log_metric(run_id, "baseline_val_mAP", baseline["mAP"])

    with ended_run(client, run_id):  # FINISHED, FAILED, or KILLED on Ctrl-C / SIGTERM
        init_ray(cfg.ray)
        decode = DecodeRows
        common = dict(
            fn_constructor_kwargs={
                "image_size": cfg.encoder.image_size,
                "resize": cfg.encoder.resize,
                "storage_config": cfg.storage,
            },
            batch_size=cfg.batch_size,
            compute=ActorPoolStrategy(size=1),
        )
        train_ds = (
            ray.data.from_arrow(data.filter(pa.array(~is_val)))
            .random_shuffle(seed=cfg.seed)
            .map_batches(decode, **common)
        )
        val_ds = ray.data.from_arrow(data.filter(pa.array(is_val))).map_batches(decode, **common)
        steps = steps_per_epoch(int((~is_val).sum()), cfg)
        with train_console("[pretrain-image]", steps) as reporter:  # rank 0's lines, printed here once
            trainer = TorchTrainer(
                train_loop,
                train_loop_config={
                    "settings": PretrainWorker(cfg, tuple(vocab), run_id, cfg.mlflow.resolved_uri(), reporter, steps)
                },
                scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
                datasets={"train": train_ds, "val": val_ds},
                dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest_options()),
                run_config=RunConfig(
                    name=cfg.run_name,
                    storage_path=os.path.dirname(run_dir) if not storage.is_s3(run_dir) else cfg.checkpoint_dir,
                    checkpoint_config=CheckpointConfig(num_to_keep=2),
                    failure_config=FailureConfig(max_failures=cfg.max_failures),
                ),
            )
            result = trainer.fit()
        import torch

        with result.checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
        model = DualEncoder(cfg.encoder, n_tags=len(vocab))
        model.load_state_dict(state["model"])
        init_history = client.get_metric_history(run_id, "init_val_mAP") if init_record else []
        init_metrics = {"val_mAP": init_history[0].value} if init_history else None
        manifest = save_encoder(
            model,
            cfg.output,
            init=init_record,
            init_metrics=init_metrics,
            tag_vocabulary=vocab,
            tag_vocab_hash=vocab_hash,
            training_data_version=data_version,
            catalogue=cfg.catalogue,
            epochs=state["epoch"] + 1,
            recipe={
                "augment": cfg.augment.model_dump(mode="json"),
                "loss": cfg.loss.model_dump(mode="json"),
                "schedule": cfg.schedule.model_dump(mode="json"),
                "lr": cfg.lr,
                "batch_size": cfg.batch_size,
            },
            final_metrics={k: float(v) for k, v in result.metrics.items()},
            baseline=baseline,
            mlflow_run_id=run_id,
        )
        client.log_text(run_id, json.dumps(manifest, indent=2), "encoder/manifest.json")
    summary = {
        "encoder": cfg.output,
        "version": manifest["version"],
        "epochs": state["epoch"] + 1,
        "val_mAP": result.metrics.get("val_mAP"),
        "baseline_val_mAP": baseline["mAP"],
        "init": cfg.init,
        "init_val_mAP": init_metrics["val_mAP"] if init_metrics else None,
        "val_micro_f1": result.metrics.get("val_micro_f1"),
        "images_per_s": result.metrics.get("images_per_s"),  # the last epoch's training rate
        "decode_failures": result.metrics.get("decode_failures"),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "mlflow_run_id": run_id,
    }
    print("[pretrain-image] done: " + json.dumps(summary), flush=True)
    return summary


def register(sub) -> None:
    """Add ``umair pretrain-image`` to the CLI."""
    from umair.config import load_with_flags

    def handler(args) -> int:
        run(
            load_with_flags(
                args.config, PretrainImageConfig, args, ("catalogue", "output", "epochs", "num_workers", "run_name")
            )
        )
        return 0

    p = sub.add_parser("pretrain-image", help="pretext tag training of the dual image encoder (Ray Train)")
    p.add_argument("--config", required=True, help="settings YAML (see pipelines/configs/pretrain_image.yaml)")
    p.add_argument("--catalogue", help="illustrations table (overrides the config)")
    p.add_argument("--output", help="where the exported encoder goes (overrides the config)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--run-name", help="a rerun with the same name resumes from its latest checkpoint")
    p.set_defaults(func=handler)
