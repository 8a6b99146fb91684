"""Benchmark: which candidates and which exposure power γ let the model beat popularity.

Trains the fusion model with several seeds (``umair train``'s own code, Ray Train), then
ranks every user's candidates with each preset × γ and prints the model's Recall@K /
NDCG@K as a ratio to the popularity ranking on the same test window (mean and minimum
over the seeds). Two inputs:

- the demo's world and extraction output (``--world outputs/demo/world --item-features
  outputs/demo/features``, after ``make demo``) with pipelines/configs/train.yaml;
- ``--generate small``: the small sample world (seed 3) with in-process item features from
  a ResNet18 pretext-trained 6 epochs at 32 px, as tests/test_recommend.py builds them,
  trained 4 epochs at batch 32 on 2 workers as that test does.

    .venv/bin/python bench/recommend_candidates.py --world outputs/demo/world --item-features outputs/demo/features
    .venv/bin/python bench/recommend_candidates.py --generate small
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import print_machine  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "neighbours only (20 x 20 seeds)": {"recent": 0, "popular": 0, "neighbors": 20, "seeds": 20},
    "shipped: recent 10 + popular 10 + neighbours 20": {"recent": 10, "popular": 10, "neighbors": 20, "seeds": 10},
    "before: recent 20 + popular 50 + neighbours 10": {"recent": 20, "popular": 50, "neighbors": 10, "seeds": 10},
    "recent 20 + popular 200 + neighbours 10": {"recent": 20, "popular": 200, "neighbors": 10, "seeds": 10},
}
CUTOFFS = (5, 10, 20)


def _generate_small(root: str) -> tuple[str, str]:
    import torch

    from umair.baselines.sample_features import fixture_item_features, pretext_encoder
    from umair.sample.world import write_world

    world = write_world(os.path.join(root, "world"), "small", seed=3, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        encoder = pretext_encoder(world, image_size=32, epochs=6, seed=0)
        features = fixture_item_features(
            world,
            os.path.join(root, "features.parquet"),
            encoder,
            image_size=32,
            tsem_dim=16,
            seed=0,
            encoder_version="fixture-resnet18-32px-pretext6-seed0",
        )
    finally:
        torch.set_num_threads(threads)
    return world.root, features


def _train(args: argparse.Namespace, world: str, features: str, seed: int, root: str) -> str:
    from pipelines import train
    from umair.config import MlflowConfig, RayConfig, load_config

    out = os.path.join(root, f"model-seed{seed}")
    mlflow = MlflowConfig(tracking_uri=f"sqlite:///{os.path.join(root, 'mlflow.db')}", experiment="bench-recommend")
    common = {
        "world": world,
        "item_features": features,
        "seed": seed,
        "output": out,
        "run_name": f"bench-recommend-{seed}",
        "checkpoint_dir": os.path.join(root, "ray_results"),
        "mlflow": mlflow,
        "ray": RayConfig(num_cpus=4),
    }
    if args.generate:
        cfg = train.TrainConfig(num_workers=2, epochs=4, batch_size=32, eval_every_epoch=False, **common)
    else:
        cfg = load_config(args.train_config, train.TrainConfig).model_copy(update=common)
    train.run(cfg)
    return out


def evaluate(model: str, world: str, gammas: list[float]) -> dict[tuple[str, float], dict[str, float]]:
    """Ratio model / popularity of Recall@K and NDCG@K for every preset × γ (one model)."""
    from umair.neighbors import CandidateSettings
    from umair.recommender import load_context, rank_users, ranking_metrics
    from umair.training.inputs import resolve_eval_inputs
    from umair.training.model_io import load_model

    saved = load_model(model, None)
    inputs, _ = resolve_eval_inputs(saved, None, world=world)
    out: dict[tuple[str, float], dict[str, float]] = {}
    for name, preset in PRESETS.items():
        ctx = load_context(model, inputs, CandidateSettings(**preset), None)
        users = np.sort(ctx.user_table.user_ids)
        for g in gammas:
            top, _ = rank_users(ctx, users, max(CUTOFFS), 8192, g)
            m = ranking_metrics(ctx, top, users, None, list(CUTOFFS))
            mo, po = m["model"], m["popularity"]
            row = {}
            for k in CUTOFFS:
                row[f"R@{k}"] = mo.recall[k] / po.recall[k]
                row[f"N@{k}"] = mo.ndcg[k] / po.ndcg[k]
                row[f"model R@{k}"], row[f"popularity R@{k}"] = mo.recall[k], po.recall[k]
            out[(name, g)] = row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", help="a sample world directory (with --item-features)")
    ap.add_argument("--item-features", help="its item features (extraction output or parquet)")
    ap.add_argument("--train-config", default=str(REPO / "pipelines/configs/train.yaml"))
    ap.add_argument(
        "--generate", choices=["small"], help="build the small world + features as tests/test_recommend.py does"
    )
    ap.add_argument("--seeds", default="0,1,2", help="model seeds")
    ap.add_argument("--gammas", default="0.5,1.0", help="exposure powers γ")
    ap.add_argument("--out", default="outputs/bench/recommend_candidates.json")
    args = ap.parse_args(argv)
    if not args.generate and not (args.world and args.item_features):
        ap.error("give --world and --item-features, or --generate small")
    print_machine()
    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    gammas = [float(g) for g in args.gammas.split(",")]
    with tempfile.TemporaryDirectory() as root:
        world, features = (
            _generate_small(root)
            if args.generate
            else (os.path.abspath(args.world), os.path.abspath(args.item_features))
        )
        per_seed = []
        for seed in seeds:
            model = _train(args, world, features, seed, root)
            per_seed.append(evaluate(model, world, gammas))
    keys = [f"{m}@{k}" for k in CUTOFFS for m in ("R", "N")]
    print(f"\nmodel / popularity ranking on the test window, mean (min) over seeds {seeds}:")
    summary = []
    for name, g in per_seed[0]:
        rows = [r[(name, g)] for r in per_seed]
        cells = {k: (float(np.mean([r[k] for r in rows])), float(np.min([r[k] for r in rows]))) for k in keys}
        summary.append(
            {
                "candidates": name,
                "gamma": g,
                **{k: {"mean": v[0], "min": v[1]} for k, v in cells.items()},
                "recall": [{k: r[k] for k in r if " R@" in k} for r in rows],
            }
        )
        print(
            f"  {name:<50} γ {g:<4} " + " ".join(f"{k} {m:.2f} ({lo:.2f})" for k, (m, lo) in cells.items()), flush=True
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"seeds": seeds, "rows": summary, "wall_s": round(time.perf_counter() - t0, 1)}, f, indent=2)
    print(f"wall {time.perf_counter() - t0:.0f}s; JSON in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
