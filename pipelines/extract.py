"""Streaming feature extraction: ``umair extract --config pipelines/configs/extract.yaml``.

Illustrations (a catalogue table, images in object storage or on disk) become item
features: e_SEM and e_STY from the dual image encoder and, when ``text_model`` is set,
e_TSEM from the tag-text encoder. One Ray Data pipeline streams the catalogue rows
still to do through four stages, so they overlap and memory stays bounded:

    [tags → e_TSEM actors]  → read bytes + decode (CPU tasks, per row)
    → encode (actor pool, one model load per actor; bf16 + channels_last on a GPU)
    → write part files (tasks)  → the driver commits chunks of rows.

A row that cannot be read (missing object, file over ``max_image_bytes``) or decoded
(zero bytes, truncated, not an image, absurd header dimensions) gets an error row
(``illust_id, uri, stage, reason, error``) and a feature row with NULL e_SEM / e_STY (and
its e_TSEM); so does a NULL ``image_uri``, without an error row. ``--retry-failed`` tries
failed images again (:func:`umair.feature_store.done_ids`); a plain rerun skips them.
Transient storage failures (endpoint down, 5xx) are retried for ``io_retry_s``; after
that the job stops with a message naming the object, and a rerun resumes.

Output layout and the commit protocol that makes a killed run resumable without
duplicates or holes: :mod:`umair.feature_store`; a run's chunk manifests are folded into
one when it ends (:mod:`umair.commit_log`). Stages (Ray-free): :mod:`umair.extraction.stages`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable

import pyarrow as pa

from pipelines.runtime import ended_run, ensure_experiment, init_ray, log_png
from umair import storage
from umair.errors import JobFailed, root_cause
from umair.extraction.plan import encoder_info, run_params, select_rows, text_info
from umair.extraction.progress import Progress, print_summary, summary_metrics
from umair.extraction.settings import ExtractConfig
from umair.extraction.stages import EmbedTags, EncodeImages, decode_rows, write_parts
from umair.feature_store import (
    chunk_manifest,
    commit_chunk,
    compact,
    done_ids,
    list_manifests,
    new_run_id,
    output_meta,
    part_uri,
    read_json,
    recover,
    utc_now,
    write_json,
)
from umair.feature_store import (
    repair as repair_duplicates,
)
from umair.lease import Lease
from umair.plots_runs import extraction_summary_plot
from umair.storage import with_retries

LOG = "[extract]"


class ExtractError(JobFailed):
    """The extraction stopped; committed chunks are kept and a rerun resumes."""


# --------------------------------------------------------------------------- driver


def decode_task_memory(cfg: ExtractConfig, image_size: int) -> int:
    """Bytes a read+decode task holds at peak: a worker's own footprint (Python, pyarrow,
    Pillow), its output batch, and one file with its decoded pixels at the largest size
    allowed (RGBA, 4 bytes a pixel)."""
    worker = 384 * 2**20
    largest = min(cfg.max_image_pixels * 4, 2**30) + min(cfg.max_image_bytes, 2**30)
    return worker + cfg.decode_batch_size * image_size * image_size * 3 + largest


def build_pipeline(todo: pa.Table, cfg: ExtractConfig, enc: dict, text: dict | None, run_id: str, meta: dict[str, str]):
    """The Ray Data plan: [e_TSEM] → read+decode → encode → write parts (descriptor rows out).
    ``decode: gpu`` (:meth:`ExtractConfig.resolved_decode`): the CPU tasks only read bytes and the encoder actors
    decode. Images are fitted by the encoder's resize mode (an exported one's from its manifest)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from umair.image.spec import EncoderSpec, read_exported_spec

    storage_config, source, decode = cfg.storage, cfg.encoder.source, cfg.resolved_decode()
    exported = source is not None and not source.startswith("torchvision:")
    fitted = read_exported_spec(source, storage_config.to_settings()) if exported else EncoderSpec(**cfg.encoder.spec)
    step = cfg.decode_batch_size
    ds = ray.data.from_arrow([todo.slice(i, step) for i in range(0, todo.num_rows, step)])
    if text:
        ds = ds.map_batches(
            EmbedTags,
            batch_format="pyarrow",
            batch_size=step,
            compute=ActorPoolStrategy(size=cfg.text_concurrency),
            num_gpus=cfg.text_num_gpus,
            num_cpus=1,
            fn_constructor_kwargs={
                "path": cfg.text_model,
                "mode": cfg.text_mode,
                **{"columns": list(cfg.text_columns), "max_chars": cfg.text_max_chars},
                "batch_size": cfg.text_batch_size,
                "use_gpu": cfg.text_num_gpus > 0,
                "storage_config": storage_config,
            },
        )
    # Decode tasks reserve the memory they hold at peak. That also keeps them a stage of their
    # own: Ray Data fuses a task stage into a following actor stage only when their remote
    # args match, and decode fused into the encoder actors would not overlap with encoding
    # (tests/test_extract.py checks the physical plan).
    ds = ds.map_batches(
        decode_rows,
        batch_format="numpy",
        batch_size=step,
        num_cpus=cfg.decode_num_cpus,
        memory=decode_task_memory(cfg, enc["image_size"]),
        fn_kwargs={
            "image_size": enc["image_size"],
            "max_pixels": cfg.max_image_pixels,
            "max_bytes": cfg.max_image_bytes,
            "storage_config": storage_config,
            "retry_s": cfg.io_retry_s,
            "resize": fitted.resize,
            "decode": decode,
        },
    )
    ds = ds.map_batches(
        EncodeImages,
        batch_format="numpy",
        batch_size=cfg.batch_size,
        compute=ActorPoolStrategy(size=cfg.encode_concurrency),
        num_gpus=1 if cfg.use_gpu else 0,
        num_cpus=cfg.encode_num_cpus,
        fn_constructor_kwargs={
            "source": cfg.encoder.source,
            "spec": dict(cfg.encoder.spec),
            "seed": cfg.encoder.seed,
            "use_gpu": cfg.use_gpu,
            "threads": int(cfg.encode_num_cpus),
            "storage_config": storage_config,
            "decode": decode,
            "max_pixels": cfg.max_image_pixels,
        },
    )
    return ds.map_batches(
        write_parts,
        batch_format="numpy",
        batch_size=cfg.write_batch_rows,
        num_cpus=0.5,
        fn_kwargs={
            "output": cfg.output,
            "run_id": run_id,
            "meta": meta,
            "storage_config": storage_config,
            "retry_s": cfg.io_retry_s,
        },
    )


def stream_and_commit(
    ds,
    cfg: ExtractConfig,
    run_id: str,
    output_meta: dict,
    progress: Progress,
    settings: storage.StorageSettings,
    on_commit: Callable[[Progress], None],
    lease: Lease,
) -> None:
    """Consume the pipeline's descriptor rows; commit every ``chunk_rows`` rows, each
    after checking that this run still holds the output's lease."""
    pending: list[dict] = []
    rows = 0

    def commit() -> None:
        nonlocal pending, rows
        lease.check()  # a run that lost its lease commits nothing more
        manifest = chunk_manifest(pending, run_id, progress.chunks, output_meta)
        commit_chunk(cfg.output, manifest, settings, cfg.io_retry_s)
        progress.add(pending)
        print(progress.line(rows), flush=True)
        on_commit(progress)
        pending, rows = [], 0

    for d in ds.iter_rows():
        pending.append(d)
        rows += int(d["features_rows"]) + int(d["partial_rows"])  # one feature row per catalogue row
        if rows >= cfg.chunk_rows:
            commit()
    if pending:
        commit()


# --------------------------------------------------------------------------- MLflow and run markers


def _close_dead_runs(cfg: ExtractConfig, client, settings: storage.StorageSettings) -> int:
    """With the lease held, every other run still marked ``running`` is dead: mark it
    ``killed`` and its MLflow run KILLED. Returns how many were closed."""
    closed = 0
    for uri in storage.list_files(part_uri(cfg.output, "_runs"), settings):
        marker = read_json(uri, settings, cfg.io_retry_s)
        if marker.get("status") != "running":
            continue
        try:
            if client.get_run(marker["mlflow_run_id"]).info.status == "RUNNING":
                client.set_terminated(marker["mlflow_run_id"], status="KILLED")
        except Exception as err:  # another tracking store, a deleted run: the marker is still closed
            print(f"{LOG} note: could not close MLflow run {marker.get('mlflow_run_id')}: {err}", file=sys.stderr)
        write_json(uri, {**marker, "status": "killed", "closed_at": utc_now()}, settings, cfg.io_retry_s)
        closed += 1
    return closed


# --------------------------------------------------------------------------- run


def run(cfg: ExtractConfig) -> dict:
    """Extract features for every catalogue row not committed yet; return the summary
    (also printed and logged to MLflow: params, metrics, ``summary.json``)."""
    import mlflow

    t0 = time.perf_counter()
    settings = cfg.storage.to_settings()
    run_id = new_run_id()
    enc, text = encoder_info(cfg, settings), text_info(cfg, settings)
    # The lease first: recovery, the skip list, the MLflow run and every commit belong to one writer.
    lease = Lease.acquire(cfg.output, run_id, settings, cfg.stale_after_s, cfg.heartbeat_s)
    try:
        client = mlflow.MlflowClient(cfg.mlflow.resolved_uri())
        return _run_holding(cfg, run_id, enc, text, client, lease, t0)
    finally:
        lease.release()


def _run_holding(
    cfg: ExtractConfig, run_id: str, enc: dict, text: dict | None, client, lease: Lease, t0: float
) -> dict:
    """:func:`run` once the output's lease is held."""
    import mlflow

    settings = cfg.storage.to_settings()
    versions = {"image": enc["version"], **({"text": text["version"]} if text else {})}
    stale_runs = _close_dead_runs(cfg, client, settings)
    recovered = {**recover(cfg.output, settings, cfg.io_retry_s), "stale_runs_closed": stale_runs}
    recovered.update(compact(cfg.output, settings, cfg.io_retry_s))  # runs that stopped before compacting
    t_plan = time.perf_counter()
    same_set = [
        m
        for m in list_manifests(cfg.output, settings, cfg.io_retry_s)
        if m["status"] == "committed" and m["versions"] == versions
    ]
    done = done_ids(cfg.output, same_set, settings, cfg.catalogue if cfg.retry_failed else None)
    todo, counts = select_rows(cfg, settings, done)
    counts["plan_ms"] = int(1000 * (time.perf_counter() - t_plan))  # skip list + catalogue selection

    mlflow_run = client.create_run(ensure_experiment(cfg.mlflow), run_name=f"extract-{run_id}")
    mlflow_id = mlflow_run.info.run_id
    client.log_batch(
        mlflow_id, params=[mlflow.entities.Param(k, v) for k, v in run_params(cfg, enc, text, run_id).items()]
    )
    marker = part_uri(cfg.output, f"_runs/{run_id}.json")
    alive = {
        "run_id": run_id,
        "status": "running",
        "mlflow_run_id": mlflow_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": utc_now(),
    }
    write_json(marker, alive, settings, cfg.io_retry_s)
    text_note = f", text {text['version']} ({text['dim']}-d)" if text else ""
    since_note = f", {counts['selected_rows']} since {cfg.since.date().isoformat()}" if cfg.since else ""
    print(
        f"{LOG} run {run_id}: encoder {enc['version']} (sem {enc['sem_dim']}, sty {enc['sty_dim']}){text_note}; "
        f"catalogue {counts['catalogue_rows']} rows{since_note}, {counts['already_done']} already extracted, "
        f"{counts['to_process']} to process; output {cfg.output}",
        flush=True,
    )
    if any(recovered.values()):
        print(f"{LOG} recovered an interrupted run: {json.dumps(recovered)}", flush=True)

    progress = Progress(counts["to_process"])
    meta = output_meta(enc, text, run_id, mlflow_id)

    def after_commit(p: Progress) -> None:
        client.log_metric(mlflow_id, "rows_done", p.done, step=p.chunks)
        write_json(marker, {**alive, "heartbeat_at": utc_now(), "rows_done": p.done}, settings, cfg.io_retry_s)

    with ended_run(client, mlflow_id):  # FINISHED, FAILED, or KILLED on Ctrl-C / SIGTERM
        try:
            if counts["to_process"]:
                init_ray(cfg.ray)
                progress.start = time.perf_counter()
                ds = build_pipeline(todo, cfg, enc, text, run_id, meta["metadata"])
                stream_and_commit(ds, cfg, run_id, meta, progress, settings, after_commit, lease)
        except BaseException as err:
            failed = {"run_id": run_id, "status": "failed", "mlflow_run_id": mlflow_id, "ended_at": utc_now()}
            write_json(marker, {**failed, "error": root_cause(err)}, settings, cfg.io_retry_s)
            if isinstance(err, Exception):
                raise ExtractError(
                    f"extraction run {run_id} stopped after {progress.chunks} committed chunks "
                    f"({progress.done}/{progress.total} rows): {root_cause(err)}. "
                    "Committed chunks are kept; run the same command again to resume."
                ) from err
            raise
        pipeline_s = time.perf_counter() - progress.start
        tmp = part_uri(cfg.output, f"_tmp/{run_id}")
        with_retries(lambda: storage.delete_dir(tmp, settings), f"delete {tmp}", cfg.io_retry_s)
        lease.check()  # fold this run's chunk manifests into one (umair.commit_log), still the only writer
        compaction = compact(cfg.output, settings, cfg.io_retry_s)
        head = {"run_id": run_id, "output": cfg.output, "encoder_version": enc["version"]}
        head["text_version"] = text["version"] if text else None
        summary = progress.summary({**head, **counts}, pipeline_s, time.perf_counter() - t0, recovered, mlflow_id)
        summary["compaction"] = compaction
        now_ms = int(time.time() * 1000)
        metrics = [mlflow.entities.Metric(k, v, now_ms, 0) for k, v in summary_metrics(summary).items()]
        client.log_batch(mlflow_id, metrics=metrics)
        client.log_text(mlflow_id, json.dumps(summary, indent=2), "summary.json")
        picture = extraction_summary_plot(summary, storage.join(cfg.output, "extraction_summary.png"), settings)
        log_png(client, mlflow_id, picture, "extraction_summary.png")
    write_json(
        marker,
        {"run_id": run_id, "status": "finished", "mlflow_run_id": mlflow_id, "ended_at": utc_now(), "summary": summary},
        settings,
        cfg.io_retry_s,
    )
    print_summary(summary)
    return summary


def repair(cfg: ExtractConfig) -> dict[str, int]:
    """``umair extract --repair``: holding the output's lease, drop every illust_id committed
    more than once (the first committed copy stays; :func:`umair.feature_store.repair`)."""
    settings = cfg.storage.to_settings()
    with Lease.acquire(cfg.output, f"repair-{new_run_id()}", settings, cfg.stale_after_s, cfg.heartbeat_s):
        counts = repair_duplicates(cfg.output, settings, cfg.io_retry_s)
    print(f"{LOG} repair of {cfg.output}: {json.dumps(counts)}", flush=True)
    return counts


def register(sub) -> None:
    """Add ``umair extract`` to the CLI."""
    from umair.config import load_config

    def handler(args) -> int:
        overrides = {
            k: v
            for k, v in (
                ("catalogue", args.catalogue),
                ("output", args.output),
                ("since", args.since),
                ("text_model", args.text_model),
                ("chunk_rows", args.chunk_rows),
                ("encode_concurrency", args.encode_concurrency),
            )
            if v is not None
        }
        if args.use_gpu:
            overrides["use_gpu"] = True
        if args.retry_failed:
            overrides["retry_failed"] = True
        if args.endpoint:
            overrides["storage.endpoint"] = args.endpoint
        cfg = load_config(args.config, ExtractConfig, overrides)
        if args.repair:
            repair(cfg)
            return 0
        if args.encoder is not None:
            source = None if args.encoder == "random" else args.encoder
            cfg = cfg.model_copy(update={"encoder": cfg.encoder.model_copy(update={"source": source})})
        run(cfg)
        return 0

    p = sub.add_parser("extract", help="streaming feature extraction: images (+ tags) → item features (Ray Data)")
    p.add_argument("--config", required=True, help="settings YAML (see pipelines/configs/extract.yaml)")
    p.add_argument("--catalogue", help="illustrations table (overrides the config)")
    p.add_argument("--output", help="item-features prefix, local or s3:// (overrides the config)")
    p.add_argument("--encoder", help="exported encoder directory, torchvision:WEIGHTS, or 'random'")
    p.add_argument("--since", help="only illustrations created on/after this ISO date (UTC)")
    p.add_argument("--text-model", help="e_TSEM encoder: a finetune-text output, 'base' or a sentence-transformers dir")
    p.add_argument("--chunk-rows", type=int, help="rows per commit")
    p.add_argument("--encode-concurrency", type=int, help="encoder actors")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per encoder actor (bf16)")
    p.add_argument("--retry-failed", action="store_true", help="try again rows whose committed record is an error")
    p.add_argument(
        "--repair",
        action="store_true",
        help="drop illust_ids committed more than once (keeps the first); no extraction",
    )
    p.add_argument("--endpoint", help="S3-compatible endpoint URL (overrides storage.endpoint)")
    p.set_defaults(func=handler)
