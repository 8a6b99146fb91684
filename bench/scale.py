"""Growth curve of the training data path and of extraction planning (issue #18).

Training: synthetic tables in the real schema (:mod:`umair.contracts`, the columns
:mod:`umair.sample.world` writes) and item features at the production widths (e_SEM
2048, e_STY 256, e_TSEM 384; random float16 values: the data path does not care about
their content), at multiples of the demo world (``pipelines/configs/demo.yaml``: size
``default``, 2,400 illustrations, 400 users, 400 × 60 impressions) and at 1/10 of the
paper's Table 2 (``paper``: 188,267 illustrations, 21,539 users, 2,423,366
interactions). Each size is one real ``umair train`` run
(:func:`pipelines.fusion_training.fit`: Ray Train, 2 CPU workers, 1 epoch, no
per-epoch validation; the model reads the user history as the shipped train.yaml's does,
``--no-history`` as before 2026-12-03) in a fresh process. Reported per size: the driver's
peak RSS (``getrusage``), each worker's peak RSS / USS / PSS and where its item tables and
interaction log live
(the job's own ``mem.w<rank>.*`` metrics: shared object-store pages vs private copies),
the object store's peak usage (sampled every second), the shared table's size, the
set-up time (fit wall time minus the epoch: reading, checks, windows, feature space,
shared tables, Ray start, test scoring, saving) and training rows/s.

Extraction planning: a 1,000,000-row catalogue and an output whose commit log lists
50,000 committed feature parts (50 runs × 100 chunk manifests × 10 parts; the parts hold
real illust_id columns and narrow 8/4-d vectors, since planning reads only the ids).
Measured in fresh processes: the driver's peak RSS and time to list the manifests, build
the skip list (:func:`umair.feature_store.done_ids`) and select the rows
(:func:`umair.extraction.plan.select_rows`), before and after
:func:`umair.commit_log.compact`, and the compaction itself.

    .venv/bin/python bench/scale.py --sizes 1,10            # minutes
    .venv/bin/python bench/scale.py --sizes 1,10,100,paper  # the whole curve (several GB of RAM)
    .venv/bin/python bench/scale.py --parts extract         # the planning part alone

Prints the machine, the command, the curve and the fitted growth per 10× (also JSON to
``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info, print_machine  # noqa: E402

from umair import contracts  # noqa: E402
from umair.sample.world import SIZES  # noqa: E402
from umair.training.memory import peak_rss_mb  # noqa: E402

WIDTHS = {"sem": 2048, "sty": 256, "tsem": 384}  # ResNet101 e_SEM + e_STY, MiniLM e_TSEM
START, SPLIT, END = (
    datetime(2021, 1, 1, tzinfo=UTC),
    datetime(2021, 10, 1, tzinfo=UTC),
    datetime(2022, 1, 1, tzinfo=UTC),
)
PAPER_TENTH = {"items": 188_267, "users": 21_539, "interactions": 2_423_366}  # Table 2 / 10


def size_of(name: str) -> dict[str, int]:
    """Items, users and interactions of a size: ``paper`` or a multiple of the demo world."""
    if name == "paper":
        return dict(PAPER_TENTH)
    spec, k = SIZES["default"], int(name)
    return {
        "items": spec.n_items * k,
        "users": spec.n_users * k,
        "interactions": spec.n_users * spec.impressions_per_user * k,
    }


def _lists(rng: np.random.Generator, n: int, vocab: list[str], lo: int, hi: int) -> pa.Array:
    counts = rng.integers(lo, hi + 1, n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    values = pa.array(np.asarray(vocab, dtype=object)[rng.integers(len(vocab), size=int(offsets[-1]))], pa.string())
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def write_world(root: Path, n: dict[str, int], seed: int = 0) -> dict[str, str]:
    """Synthetic illustrations / users / interactions / item features under ``root``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    tags = [f"tag_{i}" for i in range(400)]
    items, users, inter = n["items"], n["users"], n["interactions"]
    ids = 1000 + np.arange(items, dtype=np.int64) * 7
    t0 = START.timestamp() - 90 * 86400
    created = (t0 + rng.uniform(0, 90 * 86400 - 1, items)) * 1e6
    ill = pa.table(
        {
            "illust_id": pa.array(ids),
            "image_uri": pa.array([f"s3://synthetic/images/{i}.jpg" for i in ids.tolist()]),
            "tags": _lists(rng, items, tags, 1, 4),
            "created_at": pa.array(created.astype(np.int64), pa.int64()).cast(contracts.TIMESTAMP),
            "width": pa.array(np.full(items, 64, np.int32)),
            "height": pa.array(rng.choice([64, 80, 51], items).astype(np.int32)),
            "page_count": pa.array(rng.integers(1, 4, items).astype(np.int32)),
            "artist": pa.array(np.char.add("artist_", (rng.integers(max(items // 60, 1), size=items)).astype(str))),
        }
    )
    uids = np.arange(1, users + 1, dtype=np.int64)
    pick = lambda values: pa.array(np.asarray(values, dtype=object)[rng.integers(len(values), size=users)])  # noqa: E731
    usr = pa.table(
        {
            "user_id": pa.array(uids),
            "interest_tags": _lists(rng, users, tags, 0, 3),
            "gender": pick(["f", "m", "x"]),
            "age_group": pick(["<18", "18-24", "25-34", "35+"]),
            "region": pick(["jp", "cn", "us", "other"]),
        }
    )
    taste_u, taste_i = rng.normal(size=(users, 4)), rng.normal(size=(items, 4))
    pop = rng.lognormal(0, 1, items)
    u = rng.integers(users, size=inter)
    i = rng.choice(items, size=inter, p=pop / pop.sum())
    p = 1 / (1 + np.exp(-(1.2 * (taste_u[u] * taste_i[i]).sum(1) - 2.0)))
    ts = np.sort(rng.uniform(START.timestamp(), END.timestamp(), inter) * 1e6).astype(np.int64)
    order = rng.permutation(inter)  # rows in time order, pairs shuffled
    act = pa.table(
        {
            "user_id": pa.array(uids[u[order]]),
            "illust_id": pa.array(ids[i[order]]),
            "ts": pa.array(ts, pa.int64()).cast(contracts.TIMESTAMP),
            "label": pa.array((rng.random(inter) < p[order]).astype(np.int8)),
        }
    )
    for name, table in (("illustrations", ill), ("users", usr), ("interactions", act)):
        pq.write_table(table, root / f"{name}.parquet")
    spec = {"start": START.date().isoformat(), "split": SPLIT.date().isoformat(), "end": END.date().isoformat()}
    manifest = {"kind": "umair-scale-synthetic", "spec": spec, "counts": n, "seed": seed}
    (root / "world.json").write_text(json.dumps(manifest, indent=2))
    features = root / "item_features.parquet"
    meta = {f"umair.{m}.dim": str(d) for m, d in WIDTHS.items()}
    meta.update({"umair.encoder.version": "synthetic-random-fp16", "umair.tsem.encoder": "synthetic-random-fp16"})
    fields = [pa.field("illust_id", pa.int64())] + [pa.field(m, pa.list_(pa.float16(), d)) for m, d in WIDTHS.items()]
    schema = pa.schema(fields, metadata=meta)
    with pq.ParquetWriter(features, schema, compression="none") as w:
        for s in range(0, items, 8192):
            e = min(s + 8192, items)
            cols = {"illust_id": pa.array(ids[s:e])}
            for m, d in WIDTHS.items():
                x = rng.standard_normal((e - s, d), dtype=np.float32).astype(np.float16)
                cols[m] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)
            w.write_table(pa.table(cols, schema=schema))
    return {"world": str(root), "features": str(features)}


class PlasmaSampler(threading.Thread):
    """The object store's usage (MiB), sampled every second while Ray runs in this process."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stop = 0.0, threading.Event()

    def run(self) -> None:
        import ray
        from ray._private.internal_api import memory_summary

        while not self.stop.wait(1.0):
            try:
                if ray.is_initialized():
                    text = memory_summary(ray.get_runtime_context().gcs_address, stats_only=True)
                    got = re.search(r"Plasma memory usage (\d+) MiB", text)
                    self.peak = max(self.peak, float(got.group(1))) if got else self.peak
            except Exception:  # Ray starting or stopping
                pass


def child_train(paths: dict[str, str], out: Path, workers: int, batch: int, history: bool = True) -> dict:
    """One ``umair train`` run over a synthetic world, in this (fresh) process."""
    from pipelines.fusion_training import fit
    from umair.config import MlflowConfig, RayConfig
    from umair.training.settings import TrainConfig

    cfg = TrainConfig(
        world=paths["world"],
        item_features=paths["features"],
        num_workers=workers,
        epochs=1,
        batch_size=batch,
        eval_every_epoch=False,
        checkpoint_dir=str(out / "ray_results"),
        output=str(out / "model"),
        run_name="scale",
        max_failures=0,
        mlflow=MlflowConfig(tracking_uri=f"sqlite:///{out / 'mlflow.db'}", experiment="bench-scale"),
        ray=RayConfig(num_cpus=workers + 2),
        model={"user_history": history},  # the shipped train.yaml's model reads the history
    )
    sampler = PlasmaSampler()
    sampler.start()
    t0 = time.perf_counter()
    summary = fit(cfg)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    epoch = json.loads((out / "model" / "model.json").read_text())["training"]["history"][0]
    epoch_s = epoch["train_rows"] / epoch["rows_per_s"]
    mem = {k[len("mem.") :]: v for k, v in epoch.items() if k.startswith("mem.")}
    return {
        "train_rows": int(epoch["train_rows"]),
        "rows_per_s": epoch["rows_per_s"],
        "epoch_s": epoch_s,
        "wall_s": wall,
        "setup_s": wall - epoch_s,
        "driver_peak_rss_mb": peak_rss_mb(),
        "object_store_peak_mb": sampler.peak,
        "test_auc": summary.get("test_auc"),
        "workers": {w: {k.split(".", 1)[1]: v for k, v in mem.items() if k.startswith(w + ".")} for w in
                    sorted({k.split(".")[0] for k in mem})},
    }  # fmt: skip


# --------------------------------------------------------------------------- extraction planning

ENC = {"version": "synthetic-enc", "sem_dim": 8, "sty_dim": 4, "spec": {}, "image_size": 32}


def write_extraction(root: Path, rows: int, parts: int, runs: int = 50, parts_per_chunk: int = 10) -> dict[str, str]:
    """A ``rows``-row catalogue and an output whose committed chunk manifests list ``parts``
    feature parts (95% of the catalogue committed), written as ``umair extract`` leaves them."""
    from umair.feature_store import output_meta, utc_now, write_json
    from umair.storage import StorageSettings, parquet_bytes

    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    ids = 10 + np.arange(rows, dtype=np.int64) * 3
    created = START.timestamp() * 1e6 + np.sort(rng.uniform(0, 400 * 86400e6, rows))
    catalogue = pa.table(
        {
            "illust_id": pa.array(ids),
            "image_uri": pa.array([f"s3://synthetic/images/{i}.jpg" for i in ids.tolist()]),
            "tags": _lists(rng, rows, [f"tag_{i}" for i in range(400)], 1, 4),
            "created_at": pa.array(created.astype(np.int64)).cast(contracts.TIMESTAMP),
            "artist": pa.array(np.char.add("artist_", rng.integers(5000, size=rows).astype(str))),
        }
    )
    pq.write_table(catalogue, root / "catalogue.parquet", row_group_size=65536)
    output = root / "out"
    done = ids[: int(rows * 0.95)]
    per_run = np.array_split(done, runs)
    settings = StorageSettings()
    per_part = max(1, len(done) // parts)
    for r, run_ids in enumerate(per_run):
        run_id = f"20240{1 + r // 28:01d}{1 + r % 28:02d}T020000Z-{r:06x}"
        meta = output_meta(ENC, None, run_id, "none")
        folder = output / "features" / meta["key"]
        folder.mkdir(parents=True, exist_ok=True)
        chunks = np.array_split(run_ids, max(1, len(run_ids) // (per_part * parts_per_chunk)))
        for seq, chunk in enumerate(chunks):
            entries, moves = [], []
            for k, part in enumerate(np.array_split(chunk, parts_per_chunk)):
                n = len(part)
                table = pa.table(
                    {
                        "illust_id": pa.array(part),
                        "sem": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * 8, np.float32)), 8),
                        "sty": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * 4, np.float32)), 4),
                    }
                ).replace_schema_metadata(meta["metadata"])
                data = parquet_bytes(table)
                rel = f"features/{meta['key']}/{run_id}-{seq:06d}{k:02d}.parquet"
                (output / rel).write_bytes(data)
                moves.append([f"_tmp/{run_id}/features/{seq:06d}{k:02d}.parquet", rel])
                entries.append({"path": rel, "rows": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            manifest = {
                "format": "umair-extract-commit/1",
                "run_id": run_id,
                "seq": seq,
                "created_at": utc_now(),
                "committed_at": utc_now(),
                "status": "committed",
                "moves": moves,
                "features": entries,
                "errors": [],
                "rows_ok": int(len(chunk)),
                "rows_partial": 0,
                "rows_failed": 0,
                **{k: v for k, v in meta.items() if k != "key"},
            }
            write_json(str(output / "_commits" / f"{run_id}-{seq:06d}.json"), manifest, settings, 5.0)
    return {"catalogue": str(root / "catalogue.parquet"), "output": str(output)}


def child_plan(paths: dict[str, str]) -> dict:
    """What ``umair extract`` does before Ray starts: list, skip list, catalogue selection."""
    from umair.extraction.plan import select_rows
    from umair.extraction.settings import ExtractConfig
    from umair.feature_store import done_ids, list_manifests
    from umair.storage import StorageSettings

    settings = StorageSettings()
    cfg = ExtractConfig(catalogue=paths["catalogue"], output=paths["output"])
    t0 = time.perf_counter()
    manifests = [m for m in list_manifests(cfg.output, settings) if m["status"] == "committed"]
    t1 = time.perf_counter()
    done = done_ids(cfg.output, manifests, settings)
    t2 = time.perf_counter()
    todo, counts = select_rows(cfg, settings, done)
    t3 = time.perf_counter()
    return {
        "manifests": len(manifests),
        "parts": sum(len(m["features"]) for m in manifests),
        "list_s": t1 - t0,
        "skip_list_s": t2 - t1,
        "select_s": t3 - t2,
        "plan_s": t3 - t0,
        "driver_peak_rss_mb": peak_rss_mb(),
        **counts,
    }


def child_compact(paths: dict[str, str]) -> dict:
    from umair.commit_log import compact

    t0 = time.perf_counter()
    counts = compact(paths["output"])
    return {
        "compact_s": time.perf_counter() - t0,
        **counts,
        "peak_rss_mb": peak_rss_mb(),
    }


# --------------------------------------------------------------------------- driver


def _child(kind: str, payload: dict, timeout: float, script: str = __file__) -> dict:
    """Run one measurement of ``script`` (this file by default) in a fresh Python process
    (its own peak RSS, its own Ray): ``script _child KIND PAYLOAD`` prints ``RESULT <json>``."""
    proc = subprocess.run(
        [sys.executable, script, "_child", kind, json.dumps(payload)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{kind}: no result\n{proc.stdout[-3000:]}")


def growth_per_10x(xs: list[float], ys: list[float]) -> float | None:
    """10 ** (least-squares slope of log10 y on log10 x): the factor per 10× of x."""
    pts = [(math.log10(x), math.log10(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    return 10 ** float(np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)[0])


def growth_two(items: list[float], inter: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Per 10× of items and per 10× of interactions, from log y = a + b log items + c log inter."""
    rows = [(math.log10(i), math.log10(n), math.log10(y)) for i, n, y in zip(items, inter, ys) if y and y > 0]
    if len(rows) < 3:
        return None
    a = np.array([[1.0, r[0], r[1]] for r in rows])
    if np.linalg.matrix_rank(a) < 3:
        return None
    coef = np.linalg.lstsq(a, np.array([r[2] for r in rows]), rcond=None)[0]
    return 10 ** float(coef[1]), 10 ** float(coef[2])


def report_training(results: dict[str, dict]) -> None:
    names = list(results)
    print("\ntraining data path (1 epoch, 2 CPU workers; MiB, seconds)")
    head = (f"{'size':>6} {'items':>8} {'users':>7} {'inter':>9} {'table':>7} {'store':>7} {'driver':>7} "
            f"{'w.peak':>7} {'w.uss':>6} {'w.pss':>6} {'w.priv':>6} {'setup':>6} {'rows/s':>8}")  # fmt: skip
    print(head)
    for name in names:
        r, n = results[name], results[name]["size"]
        w = list(r["workers"].values())
        peak = max(x["peak_rss_mb"] for x in w)
        print(
            f"{name:>6} {n['items']:>8} {n['users']:>7} {n['interactions']:>9} {w[0].get('items_shared_mb', 0):>7.0f} "
            f"{r['object_store_peak_mb']:>7.0f} {r['driver_peak_rss_mb']:>7.0f} {peak:>7.0f} "
            f"{max(x.get('uss_mb', 0) for x in w):>6.0f} {max(x.get('pss_mb', 0) for x in w):>6.0f} "
            f"{max(x.get('items_private_mb', 0) for x in w):>6.1f} {r['setup_s']:>6.1f} {r['rows_per_s']:>8.0f}"
        )
    metrics = {
        "driver peak RSS": [results[n]["driver_peak_rss_mb"] for n in names],
        "worker peak RSS": [max(x["peak_rss_mb"] for x in results[n]["workers"].values()) for n in names],
        "worker peak RSS - shared table": [
            max(x["peak_rss_mb"] - x.get("items_shared_mb", 0) for x in results[n]["workers"].values()) for n in names
        ],
        "worker USS": [max(x.get("uss_mb", 0) for x in results[n]["workers"].values()) for n in names],
        "object store peak": [results[n]["object_store_peak_mb"] for n in names],
        "set-up time": [results[n]["setup_s"] for n in names],
        "rows/s": [results[n]["rows_per_s"] for n in names],
    }
    items = [results[n]["size"]["items"] for n in names]
    inter = [results[n]["size"]["interactions"] for n in names]
    print("\nfitted growth per 10x (least squares on log-log):")
    for label, ys in metrics.items():
        g = growth_per_10x(items, ys)
        two = growth_two(items, inter, ys)
        split = f"; per 10x items {two[0]:.2f}, per 10x interactions {two[1]:.2f}" if two else ""
        print(f"  {label:32s} x{g:.2f} per 10x of the world" + split if g else f"  {label:32s} -")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sizes", default="1,10,100,paper", help="multiples of the demo world, and/or 'paper' (1/10 Table 2)"
    )
    ap.add_argument("--parts", default="train,extract", help="train and/or extract")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-history", action="store_true", help="train without the user history (before 2026-12-03)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--extract-rows", type=int, default=1_000_000)
    ap.add_argument("--extract-parts", type=int, default=50_000)
    ap.add_argument("--root", default="/tmp/umair-bench-scale", help="scratch directory (deleted at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the generated tables")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    print_machine()
    root = Path(args.root)
    out: dict = {"machine": machine_info(), "command": sys.argv, "training": {}, "extraction": {}}
    parts = set(args.parts.split(","))
    try:
        if "train" in parts:
            for name in args.sizes.split(","):
                n = size_of(name)
                t0 = time.perf_counter()
                paths = write_world(root / f"world-{name}", n)
                print(f"[scale] size {name}: {n} written in {time.perf_counter() - t0:.0f}s", flush=True)
                run_dir = root / f"run-{name}"
                shutil.rmtree(run_dir, ignore_errors=True)
                r = _child(
                    "train",
                    {
                        "paths": paths,
                        "out": str(run_dir),
                        "workers": args.workers,
                        "batch": args.batch_size,
                        "history": not args.no_history,
                    },  # fmt: skip
                    3600,
                )
                out["training"][name] = {**r, "size": n}
                print(f"[scale] size {name}: {json.dumps(r)}", flush=True)
                if not args.keep:
                    shutil.rmtree(root / f"world-{name}", ignore_errors=True)
                    shutil.rmtree(run_dir, ignore_errors=True)
            report_training(out["training"])
        if "extract" in parts:
            t0 = time.perf_counter()
            paths = write_extraction(root / "extract", args.extract_rows, args.extract_parts)
            print(f"\n[scale] extraction output written in {time.perf_counter() - t0:.0f}s", flush=True)
            before = _child("plan", {"paths": paths}, 3600)
            compacted = _child("compact", {"paths": paths}, 3600)
            after = _child("plan", {"paths": paths}, 3600)
            out["extraction"] = {"before_compaction": before, "compaction": compacted, "after_compaction": after}
            print(f"\nextraction planning: {args.extract_rows} catalogue rows, {before['parts']} committed parts")
            for label, r in (("chunk manifests", before), ("compacted", after)):
                print(
                    f"  {label:16s} {r['manifests']:>6} manifests: list {r['list_s']:.2f}s, skip list {r['skip_list_s']:.2f}s, "
                    f"select {r['select_s']:.2f}s, total {r['plan_s']:.2f}s; driver peak RSS {r['driver_peak_rss_mb']:.0f} MiB; "
                    f"{r['to_process']} to process"
                )
            print(
                f"  compaction (once, all runs): {compacted['compact_s']:.1f}s, peak RSS {compacted['peak_rss_mb']:.0f} MiB"
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        kind, payload = sys.argv[2], json.loads(sys.argv[3])
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        if kind == "train":
            result = child_train(
                payload["paths"],
                Path(payload["out"]),
                payload["workers"],
                payload["batch"],
                payload.get("history", True),
            )
        elif kind == "plan":
            result = child_plan(payload["paths"])
        else:
            result = child_compact(payload["paths"])
        print("RESULT " + json.dumps(result), flush=True)
    else:
        main()
