"""Benchmark: the paper's multimodal ablation (Table 4, first group) on the sample world.

One world (same seed, same split), one item-features table, three training runs with
the same settings: the full model, "w/o ALL" (no e_SEM / e_STY / e_TSEM: the DCN-V2
baseline over id and metadata embeddings) and "w/o STY". Each is evaluated on the later
window: AUC overall, AUC on style-driven users (the world's planted ``taste``), and the
mean effective attention ᾱ(STY) of style-driven vs content-driven users.

The item features here come from :func:`fixture_item_features`
(:mod:`umair.baselines.sample_features`), standing in for the extraction job (pipelines/extract.py): the dual image encoder
(ResNet18, small images) run in-process over the world's images, e_SEM / e_STY from
``umair.image.encoder.encode``, and e_TSEM = the mean of random but fixed per-tag vectors
(seeded by a hash of the tag). With ``--pretext-epochs N`` the encoder is first trained
briefly on the pretext task (multi-label tags, BCE), which gives e_SEM content; e_STY
(Gram statistics of the early blocks) separates styles even with random weights.

    .venv/bin/python bench/ablation_sample.py --out outputs/bench/ablation

prints one line per variant and a JSON summary (also written to OUT/ablation.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


# --------------------------------------------------------------------------- the features (library code)

# Moved to the library (umair ablate generates features the same way); re-exported here
# because tests/conftest.py loads fixture_item_features from this file.
from _machine import machine_line  # noqa: E402

from umair.baselines.sample_features import fixture_item_features, pretext_encoder  # noqa: E402

# --------------------------------------------------------------------------- the benchmark


VARIANTS = ("full", "w/o ALL", "w/o STY")


def _train_and_evaluate(args: argparse.Namespace, world: str, features: str, variant: str) -> dict[str, Any]:
    from pipelines import evaluate, train
    from umair.config import MlflowConfig, RayConfig

    slug = variant.replace("/", "").replace(" ", "_")
    mlflow = MlflowConfig(
        tracking_uri=f"sqlite:///{os.path.abspath(os.path.join(args.out, 'mlflow.db'))}", experiment="ablation"
    )
    model_dir = os.path.join(args.out, "models", slug)
    tcfg = train.TrainConfig(
        world=world,
        item_features=features,
        variant=None if variant == "full" else variant,
        model={"d": args.d},
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        l2_emb=args.l2_emb,
        num_workers=args.num_workers,
        seed=args.seed,
        run_name=f"ablation-{slug}-{int(time.time())}",
        checkpoint_dir=os.path.join(args.out, "ray_results"),
        output=model_dir,
        eval_every_epoch=False,
        ray=RayConfig(num_cpus=4),
        mlflow=mlflow,
    )
    t0 = time.perf_counter()
    summary = train.run(tcfg)
    train_s = time.perf_counter() - t0
    report = evaluate.run(
        evaluate.EvaluateConfig(model=model_dir, world=world, run_name=f"evaluate-{slug}", mlflow=mlflow)
    )
    seg = report["segments"]
    return {
        "variant": variant,
        "auc": report["auc"],
        "logloss": report["logloss"],
        "gauc": report["gauc"],
        "auc_style_users": seg.get("style", {}).get("auc"),
        "auc_content_users": seg.get("content", {}).get("auc"),
        "alpha_sty_style_users": seg.get("style", {}).get("alpha", {}).get("sty"),
        "alpha_sty_content_users": seg.get("content", {}).get("alpha", {}).get("sty"),
        "alpha_by_segment": {k: v["alpha"] for k, v in seg.items()},
        "parameters": summary["parameters"],
        "train_s": round(train_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/bench/ablation")
    ap.add_argument("--size", default="default", choices=["tiny", "small", "default"])
    ap.add_argument("--world-seed", type=int, default=7)
    ap.add_argument("--image-size", type=int, default=64, help="encoder input size")
    ap.add_argument("--pretext-epochs", type=int, default=3, help="0 = random-weight encoder")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16, help="per worker")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--l2-emb", type=float, default=1e-3)
    ap.add_argument("--d", type=int, default=16, help="modality width d")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="training seed (init, shuffling)")
    ap.add_argument("--feature-seed", type=int, default=0, help="seed of the fixture encoder and tag vectors")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)

    import torch

    from umair.sample.world import load_world, write_world

    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)
    world_dir = os.path.abspath(os.path.join(args.out, f"world-{args.size}-{args.world_seed}"))
    t0 = time.perf_counter()
    if os.path.exists(os.path.join(world_dir, "world.json")):
        world = load_world(world_dir)
    else:
        world = write_world(world_dir, args.size, seed=args.world_seed, progress=False)
    name = f"features-{args.size}-{args.world_seed}-{args.image_size}px-p{args.pretext_epochs}-s{args.feature_seed}.parquet"
    features = os.path.abspath(os.path.join(args.out, name))
    if not os.path.exists(features):
        encoder, version = None, None
        if args.pretext_epochs:
            encoder = pretext_encoder(world, args.image_size, args.pretext_epochs, args.feature_seed)
            version = f"fixture-resnet18-{args.image_size}px-pretext{args.pretext_epochs}-seed{args.feature_seed}"
        fixture_item_features(
            world, features, encoder, args.image_size, seed=args.feature_seed, encoder_version=version
        )
    prep_s = time.perf_counter() - t0
    results = [_train_and_evaluate(args, world_dir, features, v) for v in args.variants.split(",")]
    by = {r["variant"]: r for r in results}
    summary: dict[str, Any] = {
        "command": " ".join(
            [".venv/bin/python", "bench/ablation_sample.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine_line(),
        "world": {"size": args.size, "seed": args.world_seed, "split": world.spec.split},
        "features": features,
        "prep_s": round(prep_s, 1),
        "results": results,
    }
    if "full" in by and "w/o ALL" in by:
        summary["full_minus_woALL_auc"] = by["full"]["auc"] - by["w/o ALL"]["auc"]
    if "full" in by and "w/o STY" in by:
        summary["full_minus_woSTY_auc_style_users"] = by["full"]["auc_style_users"] - by["w/o STY"]["auc_style_users"]
    for r in results:
        print(
            f"{r['variant']:<8} AUC={r['auc']:.4f} logloss={r['logloss']:.4f} GAUC={r['gauc']:.4f} "
            f"AUC(style users)={r['auc_style_users']:.4f} α_STY style/content users="
            f"{r['alpha_sty_style_users']}/{r['alpha_sty_content_users']} ({r['train_s']}s)"
        )
    print(json.dumps(summary, indent=2, default=str))
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
