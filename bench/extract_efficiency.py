"""How close does the extraction pipeline come to the bare encoder, and is its memory flat?

One invocation measures, on a generated sample world (local files):

1. the bare encoder's images/s: the same backbone, image size and batch, fed decoded
   images already in memory, in this process with as many torch threads as the
   pipeline's encoder actors have CPUs in all;
2. the pipeline's images/s (``umair extract`` in-process: read bytes → decode tasks →
   encoder actors → parquet parts → commits) on the catalogue (1×) and on a catalogue
   ``--scale`` times longer (the same images under new ids), each in a fresh local Ray,
   and their ratio to (1): end to end (actor start-up and model load included) and
   steady (from the first commit on);
3. peak RSS of this driver plus every Ray process it started (raylet, GCS, workers:
   all its descendants, from /proc), sampled every 0.2 s during each run, with its
   private (RssAnon) and shared-memory (RssShmem: object-store pages) parts.

The bare encoder is measured before and after the pipelines; efficiency uses the mean.

    .venv/bin/python bench/extract_efficiency.py --items 200 --image-size 64 --scale 10

Prints the figures, the machine and the command. RSS sums count shared pages (the
object store's mmap, shared libraries) once per process, so they overstate the total;
what matters is whether 10× the rows needs more memory than 1×, and in which part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import threading
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_info, machine_line  # noqa: E402,F401

from pipelines.extract import ExtractConfig, run  # noqa: E402
from umair import storage  # noqa: E402
from umair.config import parse_settings  # noqa: E402
from umair.extraction.stages import load_image_encoder  # noqa: E402


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


MEMORY_FIELDS = ("VmRSS", "RssAnon", "RssShmem")  # RssAnon: private heap; RssShmem: object-store pages touched


def memory_bytes(pid: int) -> dict[str, int]:
    """The /proc/<pid>/status memory fields of :data:`MEMORY_FIELDS`, in bytes (0 when gone)."""
    out = dict.fromkeys(MEMORY_FIELDS, 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return "?"
    name = args[0].decode(errors="replace")
    if name.endswith("python") or name.endswith("python3"):
        name = " ".join(a.decode(errors="replace") for a in args[1:2])
    return os.path.basename(name)[:48] if "/" in name else name[:48]


class RssSampler:
    """Peaks of (driver + descendants) memory while running, each field on its own."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.peak_processes, self.samples = interval_s, 0, 0
        self.peaks = dict.fromkeys(MEMORY_FIELDS, 0)
        self.top: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @property
    def peak(self) -> int:
        return self.peaks["VmRSS"]

    def sample(self) -> tuple[dict[str, int], int]:
        """(memory fields summed, number of processes) of this driver and its descendants;
        keeps the per-process RSS of the largest sample in ``self.top``."""
        pids = [os.getpid(), *descendants(os.getpid())]
        totals = dict.fromkeys(MEMORY_FIELDS, 0)
        per_process = []
        for p in pids:
            fields = memory_bytes(p)
            per_process.append((fields["VmRSS"], process_name(p)))
            for k, v in fields.items():
                totals[k] += v
        if totals["VmRSS"] > self.peaks["VmRSS"]:
            self.top = sorted(per_process, reverse=True)[:6]
        return totals, len(pids)

    def total(self) -> int:
        return self.sample()[0]["VmRSS"]

    def _loop(self) -> None:
        while not self._stop.is_set():
            totals, n = self.sample()
            if totals["VmRSS"] > self.peaks["VmRSS"]:
                self.peak_processes = n
            self.peaks = {k: max(v, totals[k]) for k, v in self.peaks.items()}
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def machine() -> dict:
    """The shared bench/_machine.py description (date, CPU, cores, RAM, load, versions)."""
    return machine_info()


def make_world(root: str, items: int, image_size: int) -> pa.Table:
    from umair.sample.world import SIZES, write_world

    spec = dataclasses.replace(SIZES["small"], n_items=items, image_size=image_size, n_users=20, impressions_per_user=5)
    return write_world(os.path.join(root, "world"), spec, seed=11, overwrite=True, progress=False).illustrations


def scaled(table: pa.Table, factor: int) -> pa.Table:
    """``factor`` times the rows: the same images under new ids."""
    n = table.num_rows * factor
    out = table.take(pa.array(np.arange(n) % table.num_rows))
    return out.set_column(0, "illust_id", pa.array(np.arange(n, dtype=np.int64) + 10_000_000))


def bare_encoder_rate(args: argparse.Namespace, uris: list[str]) -> float:
    """images/s of encode() alone on decoded images, after one warm-up batch."""
    import torch

    from umair.image.encoder import encode
    from umair.image.preprocess import decode_image

    spec = {"backbone": args.backbone, "image_size": args.image_size}
    model, _ = load_image_encoder(None, spec, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.encode_concurrency * args.encode_cpus))
    decoded = np.stack([decode_image(storage.read_bytes(u), args.image_size) for u in uris[: args.batch_size]])
    batch = torch.from_numpy(np.resize(decoded, (args.batch_size, *decoded.shape[1:]))).permute(0, 3, 1, 2)
    encode(model, batch, "cpu")  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.bare_seconds:
        encode(model, batch, "cpu")
        n += args.batch_size
    rate = n / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return rate


def pipeline_run(args: argparse.Namespace, catalogue: str, output: str) -> tuple[dict, RssSampler, int]:
    """(summary, the RSS sampler after the run, RSS bytes just before the run)."""
    cfg = parse_settings(
        {
            "catalogue": catalogue,
            "output": output,
            "encoder": {"source": None, "spec": {"backbone": args.backbone, "image_size": args.image_size}},
            "batch_size": args.batch_size,
            "decode_batch_size": args.decode_batch_size,
            "encode_concurrency": args.encode_concurrency,
            "encode_num_cpus": args.encode_cpus,
            "chunk_rows": args.chunk_rows,
            "write_batch_rows": args.chunk_rows,
            "ray": {"num_cpus": args.num_cpus},
            "mlflow": {
                "tracking_uri": f"sqlite:///{os.path.join(args.workdir, 'mlflow.db')}",
                "experiment": "umair-extract-bench",
            },
        },
        ExtractConfig,
        "bench",
    )
    import ray

    with RssSampler() as sampler:
        before = sampler.total()
        summary = run(cfg)
    ray.shutdown()  # the next measurement starts its own Ray, so peaks compare
    return summary, sampler, before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=300, help="illustrations in the generated world (1×)")
    p.add_argument("--scale", type=int, default=10, help="the long catalogue is this many times the world")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--decode-batch-size", type=int, default=32)
    p.add_argument("--encode-concurrency", type=int, default=1)
    p.add_argument("--encode-cpus", type=int, default=1, help="CPUs (torch threads) per encoder actor")
    p.add_argument(
        "--chunk-rows", type=int, default=200, help="rows per commit (the steady rate counts from the first)"
    )
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--bare-seconds", type=float, default=10.0)
    p.add_argument("--workdir", default="/tmp/umair-bench-extract")
    args = p.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    world = make_world(args.workdir, args.items, args.image_size)
    small = os.path.join(args.workdir, "catalogue-1x.parquet")
    large = os.path.join(args.workdir, f"catalogue-{args.scale}x.parquet")
    storage.write_parquet(world, small)
    storage.write_parquet(scaled(world, args.scale), large)

    uris = world.column("image_uri").to_pylist()
    bare_before = bare_encoder_rate(args, uris)
    one, peak_one, base_one = pipeline_run(args, small, os.path.join(args.workdir, "features-1x"))
    many, peak_many, base_many = pipeline_run(args, large, os.path.join(args.workdir, f"features-{args.scale}x"))
    bare_after = bare_encoder_rate(args, uris)  # shared machines drift: measure on both sides
    bare = (bare_before + bare_after) / 2

    mib = 2**20
    figures = {
        "bare_encoder_images_per_s": round(bare, 1),
        "bare_encoder_before_after": [round(bare_before, 1), round(bare_after, 1)],
        "pipeline_images_per_s_1x": one["images_per_s"],
        f"pipeline_images_per_s_{args.scale}x": many["images_per_s"],
        f"pipeline_steady_images_per_s_{args.scale}x": many["steady_images_per_s"],
        "efficiency_1x": round(one["images_per_s"] / bare, 3),
        f"efficiency_{args.scale}x": round(many["images_per_s"] / bare, 3),
        f"efficiency_steady_{args.scale}x": round(many["steady_images_per_s"] / bare, 3)
        if many["steady_images_per_s"]
        else None,
        f"first_commit_s_{args.scale}x": many["first_commit_s"],
        "rows_1x": one["rows_ok"],
        f"rows_{args.scale}x": many["rows_ok"],
        "wall_s_1x": one["wall_s"],
        f"wall_s_{args.scale}x": many["wall_s"],
        "peak_rss_mib_1x": round(peak_one.peak / mib),
        f"peak_rss_mib_{args.scale}x": round(peak_many.peak / mib),
        "peak_rss_anon_mib_1x": round(peak_one.peaks["RssAnon"] / mib),
        f"peak_rss_anon_mib_{args.scale}x": round(peak_many.peaks["RssAnon"] / mib),
        "peak_rss_shmem_mib_1x": round(peak_one.peaks["RssShmem"] / mib),
        f"peak_rss_shmem_mib_{args.scale}x": round(peak_many.peaks["RssShmem"] / mib),
        "processes_at_peak_1x": peak_one.peak_processes,
        f"processes_at_peak_{args.scale}x": peak_many.peak_processes,
        "rss_before_mib_1x": round(base_one / mib),
        f"rss_before_mib_{args.scale}x": round(base_many / mib),
    }
    print("\n== extract efficiency ==")
    print("command:", " ".join([os.path.relpath(sys.executable), *sys.argv]))
    print("settings:", json.dumps({k: v for k, v in vars(args).items() if k != "workdir"}))
    print("machine:", json.dumps(machine()))
    for k, v in figures.items():
        print(f"  {k:<32} {v}")
    for label, sampler in (("1x", peak_one), (f"{args.scale}x", peak_many)):
        print(
            f"  largest processes at the {label} peak (RSS MiB):",
            ", ".join(f"{name} {rss // mib}" for rss, name in sampler.top),
        )


if __name__ == "__main__":
    main()
