"""Benchmark: the pretext tag task on real anime faces (../shared/data/anime-faces).

Builds an illustrations table from tags.csv (hair and eye colour tags), holds out a
validation split (by a stable hash of the image id), trains the dual encoder with the
real pretext job (Ray Train, N CPU workers) and prints validation mAP and micro-F1
against the tag-frequency baseline (every image scored with the training tag rates).

    .venv/bin/python bench/pretrain_anime_faces.py --epochs 6 --image-size 64

The data is read in place and never copied into the repository.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime

import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_line  # noqa: E402

from pipelines.pretrain_image import PretrainImageConfig, run  # noqa: E402
from umair import contracts, storage  # noqa: E402
from umair.config import MlflowConfig  # noqa: E402
from umair.image.spec import EncoderSpec  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_catalogue(data_dir: str, out: str) -> int:
    rows = list(csv.DictReader(open(os.path.join(data_dir, "tags.csv"), encoding="utf-8")))
    created = datetime(2024, 1, 1, tzinfo=UTC)
    table = pa.table(
        {
            "illust_id": pa.array([int(r["image_id"]) for r in rows], pa.int64()),
            "image_uri": [os.path.join(data_dir, r["file"]) for r in rows],
            "tags": pa.array([[t for t in r["tags"].split("|") if t] for r in rows], contracts.TAGS),
            "created_at": pa.array([created] * len(rows), contracts.TIMESTAMP),
            "width": pa.array([96] * len(rows), pa.int32()),
            "height": pa.array([96] * len(rows), pa.int32()),
            "page_count": pa.array([1] * len(rows), pa.int32()),
        }
    )
    storage.write_parquet(contracts.validate(table, "illustrations", out), out)
    return table.num_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "anime-faces"))
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="umair-bench-faces-")
    catalogue = os.path.join(work, "illustrations.parquet")
    n = build_catalogue(os.path.abspath(args.data), catalogue)
    cfg = PretrainImageConfig(
        catalogue=catalogue,
        output=os.path.join(work, "encoder"),
        encoder=EncoderSpec(backbone=args.backbone, image_size=args.image_size),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        num_workers=args.workers,
        val_fraction=0.2,
        run_name="bench-anime-faces",
        checkpoint_dir=os.path.join(work, "ray_results"),
        mlflow=MlflowConfig(tracking_uri=f"sqlite:///{work}/mlflow.db", experiment="bench-anime-faces"),
    )
    t0 = time.perf_counter()
    summary = run(cfg)
    print("\n== anime-faces pretext benchmark ==")
    print(f"machine: {machine_line()}")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(
        f"images: {n} (validation 20% by stable id hash); backbone {args.backbone} at {args.image_size}px; "
        f"{args.epochs} epochs; {args.workers} CPU workers"
    )
    print(
        f"val mAP: {summary['val_mAP']:.4f}   tag-frequency baseline mAP: {summary['baseline_val_mAP']:.4f}   "
        f"ratio: {summary['val_mAP'] / summary['baseline_val_mAP']:.2f}x"
    )
    print(f"val micro-F1 (threshold 0.5): {summary['val_micro_f1']:.4f}")
    print(f"wall time: {time.perf_counter() - t0:.0f}s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
