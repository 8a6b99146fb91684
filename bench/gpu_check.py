"""GPU figures of the production image path (issue 21), prepared for a GPU machine:

A. bare encoder: ResNet101 dual output at 512² in bf16 (:func:`umair.image.encoder.encode`:
   autocast, channels_last), images/s at batch 64 / 128 / 256 on uint8 input already on
   the GPU, and peak GPU memory;
B. the extraction pipeline (``pipelines.extract.run``, Ray Data, one GPU encoder actor,
   batch 256) on a synthetic catalogue of ``--images`` JPEGs of mixed aspect ratios,
   ``decode: cpu`` vs ``decode: gpu``: images/s (the summary's steady figure) and the
   ratios pipeline ÷ bare encoder (target ≥ 0.8) and GPU ÷ CPU decode (target ≥ 2).

Not measured here (left for a later script): one-GPU fusion-model training rows/s at batch 4096.
Run: ``bench/gpu_check.sh`` (prints the device, then one JSON line per figure).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from typing import Any

import numpy as np


def bare_encoder(batches: list[int], size: int, steps: int) -> list[dict[str, Any]]:
    """Images/s and peak memory of the bare ResNet101 encoder, bf16, per batch size."""
    import torch

    from umair.image.encoder import DualEncoder, encode
    from umair.image.spec import EncoderSpec

    model = DualEncoder(EncoderSpec(backbone="resnet101", image_size=size)).cuda().eval()
    model = model.to(memory_format=torch.channels_last)
    rows = []
    for batch in batches:
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device="cuda")
        for _ in range(3):
            encode(model, x, "cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            encode(model, x, "cuda")
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rows.append(
            {
                "figure": "bare_encoder",
                "batch": batch,
                "images_per_s": round(batch * steps / dt, 1),
                "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _write_jpeg(args: tuple[str, int]) -> str:
    from PIL import Image

    path, seed = args
    rng = np.random.default_rng(seed)
    w, h = [(768, 512), (512, 768), (600, 600), (900, 300), (400, 1000)][seed % 5]
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def catalogue(root: str, n: int) -> str:
    """A catalogue parquet of ``n`` synthetic JPEGs (five aspect ratios, 0.3–0.8 MP)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(f"{root}/images", exist_ok=True)
    jobs = [(f"{root}/images/{i}.jpg", i) for i in range(n)]
    with ProcessPoolExecutor(max(1, (os.cpu_count() or 2) - 1)) as pool:
        uris = list(pool.map(_write_jpeg, jobs, chunksize=256))
    table = pa.table(
        {
            "illust_id": pa.array(np.arange(1, n + 1), pa.int64()),
            "image_uri": pa.array(uris, pa.string()),
            "created_at": pa.array([datetime(2024, 1, 1, tzinfo=UTC)] * n, pa.timestamp("us", tz="UTC")),
            "tags": pa.array([["synthetic"]] * n, pa.list_(pa.string())),
            "width": pa.array([[768, 512, 600, 900, 400][i % 5] for i in range(n)], pa.int32()),
            "height": pa.array([[512, 768, 600, 300, 1000][i % 5] for i in range(n)], pa.int32()),
            "page_count": pa.array([1] * n, pa.int32()),
        }
    )
    pq.write_table(table, f"{root}/illustrations.parquet")
    return f"{root}/illustrations.parquet"


def pipeline(cat: str, root: str, decode: str, size: int, cpus: int) -> dict[str, Any]:
    """One extraction run (random ResNet101 encoder, one GPU actor) with ``decode``."""
    import ray
    import torch

    from pipelines.extract import run
    from umair.extraction.settings import ExtractConfig

    cfg = ExtractConfig(
        catalogue=cat,
        output=f"{root}/features_{decode}",
        encoder={"source": None, "spec": {"backbone": "resnet101", "image_size": size}},
        batch_size=256,
        decode_batch_size=64,
        encode_concurrency=1,
        encode_num_cpus=2,
        use_gpu=True,
        decode=decode,
        chunk_rows=5000,
        write_batch_rows=4096,
        ray={"num_cpus": cpus},  # a local Ray detects the GPU itself
        mlflow={"tracking_uri": f"sqlite:///{root}/mlflow.db", "experiment": "gpu-check"},
    )
    torch.cuda.reset_peak_memory_stats()
    summary = run(cfg)
    ray.shutdown()
    row = {
        "figure": "pipeline",
        "decode": decode,
        "images_per_s": summary.get("steady_images_per_s") or summary["images_per_s"],
        "images_per_s_whole": summary["images_per_s"],
        "rows_ok": summary.get("rows_ok"),
        "pipeline_s": summary["pipeline_s"],
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _machine import print_machine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128, 256])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--cpus", type=int, default=(os.cpu_count() or 4))
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "outputs/bench") + "/gpu_check.json")
    args = ap.parse_args(argv)
    import torch

    print_machine()
    print(f"device: {torch.cuda.get_device_name(0)}", flush=True)
    rows = bare_encoder(args.batches, args.size, args.steps)
    if not args.skip_pipeline:
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            cat = catalogue(root, args.images)
            print(json.dumps({"figure": "catalogue", "images": args.images, "s": round(time.perf_counter() - t0, 1)}))
            cpu, gpu = (pipeline(cat, root, d, args.size, args.cpus) for d in ("cpu", "gpu"))
            rows += [cpu, gpu]
            best = max(r["images_per_s"] for r in rows if r["figure"] == "bare_encoder" and r["batch"] == 256)
            ratios = {
                "figure": "ratios",
                "pipeline_gpu_decode_over_bare_b256": round(gpu["images_per_s"] / best, 3),
                "gpu_over_cpu_decode": round(gpu["images_per_s"] / max(cpu["images_per_s"], 1e-9), 3),
            }
            print(json.dumps(ratios), flush=True)
            rows.append(ratios)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
