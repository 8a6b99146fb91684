"""Benchmark: the pretext tag task on real anime faces (../shared/data/anime-faces).

Builds an illustrations table from tags.csv (hair and eye colour tags), holds out a
validation split (20 %, by a stable hash of the image id: the pretext job's own split),
trains the dual encoder with the real pretext job (Ray Train, N CPU workers) once per
recipe, side by side in one run, and prints for each: the pretext head's validation mAP
and micro-F1, a linear probe's validation mAP on the exported encoder's e_SEM, e_STY and
both (:mod:`umair.image.probe`: fitted on the training split only), images/s, against
the tag-frequency baseline (every image scored with the training tag rates).

Recipes: ``old`` = flips only, constant lr, BCE (the job before issue #22); ``new`` = the
job's defaults (:mod:`umair.image.pretext`: flips, no colour jitter; ASL γ− 4, m 0.05;
one warm-up epoch then cosine to 1 %); ``new+crops`` = ``new`` with random resized crops
of 85-100 % of the area. The settings are the literature's defaults, fixed before any
run; none was chosen on this validation split.

    .venv/bin/python bench/pretrain_anime_faces.py --epochs 10 --image-size 64 --recipes old new new+crops

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

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_line  # noqa: E402

from pipelines.pretrain_image import PretrainImageConfig, prepare_data, run  # noqa: E402
from umair import contracts, storage  # noqa: E402
from umair.config import MlflowConfig  # noqa: E402
from umair.image.checkpoint import load_encoder  # noqa: E402
from umair.image.pretext import AugmentSettings, LossSettings, ScheduleSettings  # noqa: E402
from umair.image.probe import embed_images, probe_map  # noqa: E402
from umair.image.spec import EncoderSpec  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {
    "old": {
        "augment": AugmentSettings(crop_scale=(1.0, 1.0)),
        "loss": LossSettings(kind="bce"),
        "schedule": ScheduleSettings(kind="constant"),
    },
    "new": {},  # the job's defaults
    "new+crops": {"augment": AugmentSettings(crop_scale=(0.85, 1.0))},
}


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


def linear_probe(cfg: PretrainImageConfig) -> dict[str, float]:
    """Validation mAP of logistic-regression probes on the exported encoder's outputs,
    fitted on the pretext's training split (same vocabulary, same split)."""
    data, _vocab, is_val = prepare_data(cfg)
    labels = np.stack(data.column("labels").to_numpy(zero_copy_only=False)).astype(int)
    model, _ = load_encoder(cfg.output)
    sem, sty, ok = embed_images(model, data.column("image_uri").to_pylist())
    y, val = labels[ok], is_val[ok]
    out = {}
    for name, x in (("sem", sem), ("sty", sty), ("sem+sty", np.concatenate([sem, sty], 1))):
        out[name] = probe_map(x[~val], y[~val], x[val], y[val], seed=cfg.seed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "anime-faces"))
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["old", "new", "new+crops"])
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="umair-bench-faces-")
    catalogue = os.path.join(work, "illustrations.parquet")
    n = build_catalogue(os.path.abspath(args.data), catalogue)
    results = {}
    for name in args.recipes:
        cfg = PretrainImageConfig(
            catalogue=catalogue,
            output=os.path.join(work, f"encoder-{name}"),
            encoder=EncoderSpec(backbone=args.backbone, image_size=args.image_size),
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            num_workers=args.workers,
            val_fraction=0.2,
            seed=args.seed,
            run_name=f"bench-anime-faces-{name}",
            checkpoint_dir=os.path.join(work, "ray_results"),
            mlflow=MlflowConfig(tracking_uri=f"sqlite:///{work}/mlflow.db", experiment="bench-anime-faces"),
            **RECIPES[name],
        )
        t0 = time.perf_counter()
        summary = run(cfg)
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        probe = linear_probe(cfg)
        results[name] = {**summary, "probe": probe, "train_s": train_s, "probe_s": time.perf_counter() - t1}

    print("\n== anime-faces pretext benchmark ==")
    print(f"machine: {machine_line()}")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(
        f"images: {n} (validation 20% by stable id hash, seed {args.seed}); backbone {args.backbone} at "
        f"{args.image_size}px; {args.epochs} epochs; {args.workers} CPU workers; global batch {args.batch_size}, "
        f"peak lr {args.lr}"
    )
    base = next(iter(results.values()))["baseline_val_mAP"]
    print(f"tag-frequency baseline val mAP: {base:.4f}")
    print("| recipe | head val mAP | head micro-F1 | probe e_SEM | probe e_STY | probe both | images/s | job s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        p = r["probe"]
        print(
            f"| {name} | {r['val_mAP']:.4f} | {r['val_micro_f1']:.4f} | {p['sem']:.4f} | {p['sty']:.4f} | "
            f"{p['sem+sty']:.4f} | {r['images_per_s']:.1f} | {r['train_s']:.0f} |"
        )
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
