"""Training throughput: this project's DCN-V2-only model vs deepctr-torch's DCN-V2, and
1 vs 2 Ray Train workers.

Part A, identical data, side by side in one process. The rows come from the training
job's own ``prepare`` (sample world + in-process item features, the same files
``umair ablate --generate default`` writes and reuses). Every model reads the same
inputs — user id, mean-pooled interest tags u^IL, profile fields u^O, item metadata i^O
(buckets, illustration id) — and no e_SEM / e_STY / e_TSEM, because the DCN-V2-only
configuration has none. All are trained by the same loop
(``umair.baselines.training.fit``: same seeded shuffles, batch size, epochs, Adam lr
with torch's default implementation, BCE + L2 1e-3 on every embedding table) and scored
on the same test window. Two pairs, each the same model form in both libraries:

- headline: ``umair DCN-V2-only`` (:func:`umair.model.settings.dcn_v2_only`: DCN-V2's
  full-rank cross x_0 ⊙ (W x_l + b) + x_l, 2 layers, MLP [64, 32, 16]; the ablate
  table's "DCN-V2-only (umair)") vs ``deepctr DCN-V2``
  (``deepctr_torch.models.DCN(cross_parameterization='matrix')``, cross_num 2, DNN
  [64, 32, 16] (``--deepctr-dnn``), embedding width 8);
- ``umair w/o ALL`` (the same inputs with the project's default cross, the low-rank
  mixture: 4 experts of rank 32, the authors' setting; Table 4's "w/o ALL") vs
  ``deepctr DCNMix`` (deepctr's low-rank mixture cross, same rank / experts / depth);
  ``--no-mixture-pair`` skips it;
- ``deepctr DCN-V2 fit()``: the deepctr DCN-V2 trained by deepctr's own ``fit`` (its
  DataLoader and its L2 terms), to show the shared loop does not handicap it.

Each model is trained ``--repeat`` times per batch size in ``--batch-sizes``, models
alternating within a repeat (so load drift hits all), repeat ``i`` with seed
``--seed + i`` (so the AUC spread over seeds is shown); samples/s = training rows of all
epochs / loop wall time, reported as the median over repeats. ``--epochs`` (default 6)
is where both forms have reached their plateau test AUC on the default world (at 3
epochs and batch 256 the models are still moving, 0.55–0.57).

Part B: the full UMAIR-FPS with the real ``umair train`` job (Ray Train, item features
looked up per worker) on 1 and then 2 workers, same per-worker batch, no per-epoch
evaluation; throughput = the job's own ``rows_per_s`` per epoch (first epoch dropped as
warm-up when there are more).

    .venv/bin/python bench/train_throughput.py --epochs 6 --batch-sizes 32,256 --repeat 3

Prints the machine, the command and the figures (also written as JSON to --out).
"""

from __future__ import annotations

import argparse
import contextlib
import io
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

from _machine import machine_info, print_machine  # noqa: E402


def _data(args: argparse.Namespace) -> tuple[Any, Any, Any, str, str]:
    from pipelines.ablate import GenerateSettings, generate_inputs, window_rows
    from umair.training.inputs import prepare
    from umair.training.settings import TrainConfig

    gen = GenerateSettings(out=args.sample_out, size=args.size, seed=args.world_seed)
    world, features = generate_inputs(gen)
    prepared = prepare(TrainConfig(world=world, item_features=features))
    train, test = window_rows(prepared, None)
    train, test = _compact_tags(train, test)
    return prepared, train, test, world, features


def _compact_tags(*windows: Any) -> list[Any]:
    """Identical inputs for every model: each row's tags moved ahead of its padding and the
    columns that are padding in every row of every window dropped (what FusionRanker's
    ``drop_tag_padding`` does to its own input), so deepctr-torch reads the same T."""
    import dataclasses

    from umair.model.fusion import compact_tags

    keep = max(max(int((w.user_tags != 0).sum(dim=1).max()) if len(w.labels) else 0 for w in windows), 1)
    out = [dataclasses.replace(w, user_tags=compact_tags(w.user_tags, keep).contiguous()) for w in windows]
    print(
        f"user tags: T {int(windows[0].user_tags.shape[1])} -> {keep} columns for every model (padding dropped)",
        flush=True,
    )
    return out


def _deepctr_fit(model_cfg: Any, train: Any, test: Any, args: argparse.Namespace, batch: int) -> dict[str, Any]:
    """deepctr's own compile + fit on the same rows (its loop, its L2 terms)."""
    from umair.baselines.deepctr_adapter import DeepCTRRanker
    from umair.training.scoring import window_metrics

    sizes = {k: getattr(model_cfg, k) for k in ("n_users", "n_tags", "user_fields", "item_fields")}
    ranker = DeepCTRRanker(
        "DCN-V2",
        sizes,
        int(train.user_tags.shape[1]),
        {},
        model_cfg.emb_dim,
        args.seed,
        {"dnn_hidden_units": args.deepctr_dnn, "l2_reg_embedding": args.l2_emb, "l2_reg_linear": args.l2_emb},
        name="deepctr DCN-V2 fit()",
    )
    m = ranker.module
    x_train = ranker.encode(train).numpy()
    feats = {name: x_train[:, s:e] if e - s > 1 else x_train[:, s] for name, (s, e) in m.feature_index.items()}
    m.compile("adam", "binary_crossentropy")
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        m.fit(feats, train.labels.numpy(), batch_size=batch, epochs=args.epochs, verbose=0, shuffle=True)
    train_s = time.perf_counter() - t0
    from umair.baselines.training import predict

    probs = predict(ranker, test)
    met = window_metrics(test.users, test.labels.numpy(), probs)
    return {
        "model": ranker.name,
        "samples_per_s": len(train) * args.epochs / train_s,
        "train_s": train_s,
        "auc": met["auc"],
        "logloss": met["logloss"],
        "gauc": met["gauc"],
        "parameters": ranker.parameters,
    }


PAIRS: dict[str, tuple[str, str]] = {
    "DCN-V2 (full-rank cross)": ("umair DCN-V2-only", "deepctr DCN-V2"),
    "low-rank mixture cross": ("umair w/o ALL", "deepctr DCNMix"),
}


def part_a(args: argparse.Namespace, prepared: Any, train: Any, test: Any) -> list[dict[str, Any]]:
    from umair.baselines.deepctr_adapter import DeepCTRRanker
    from umair.baselines.rankers import FusionRanker
    from umair.baselines.training import fit, predict
    from umair.model.settings import dcn_v2_only, table4_variant
    from umair.training.scoring import window_metrics

    base = prepared.model_config
    sizes = {k: getattr(base, k) for k in ("n_users", "n_tags", "user_fields", "item_fields")}
    n_tags = int(train.user_tags.shape[1])

    def deepctr(kind: str, name: str, seed: int) -> Any:
        return DeepCTRRanker(
            kind, sizes, n_tags, {}, base.emb_dim, seed, {"dnn_hidden_units": args.deepctr_dnn}, name=name
        )

    builders = {
        "umair DCN-V2-only": lambda seed: FusionRanker("umair DCN-V2-only", dcn_v2_only(base), seed),
        "deepctr DCN-V2": lambda seed: deepctr("DCN-V2", "deepctr DCN-V2", seed),
    }
    if args.mixture_pair:
        builders["umair w/o ALL"] = lambda seed: FusionRanker("umair w/o ALL", table4_variant(base, "w/o ALL"), seed)
        builders["deepctr DCNMix"] = lambda seed: deepctr("DCNMix", "deepctr DCNMix", seed)
    out = []
    for batch in args.batch_sizes:
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in builders}
        for rep in range(args.repeat):
            seed = args.seed + rep
            for name, build in builders.items():  # alternate so load drift hits every model
                ranker = build(seed)
                res = fit(ranker, train, args.epochs, batch, args.lr, args.l2_emb, seed)
                probs = predict(ranker, test)
                met = window_metrics(test.users, test.labels.numpy(), probs)
                runs[name].append(
                    {
                        "samples_per_s": res.samples_per_s,
                        "train_s": res.train_s,
                        "auc": met["auc"],
                        "logloss": met["logloss"],
                        "gauc": met["gauc"],
                        "parameters": ranker.parameters,
                    }
                )
                print(
                    f"  batch {batch:>4} seed {seed}: {name:<18} {res.samples_per_s:>8.0f} samples/s "
                    f"AUC {met['auc']:.4f} ({res.train_s:.1f}s)",
                    flush=True,
                )
        summary: dict[str, Any] = {"batch_size": batch, "models": {}, "pairs": {}}
        for name, rs in runs.items():
            aucs = [r["auc"] for r in rs]
            summary["models"][name] = {
                "samples_per_s": float(np.median([r["samples_per_s"] for r in rs])),
                "samples_per_s_runs": [round(r["samples_per_s"], 1) for r in rs],
                "auc": float(np.mean(aucs)),
                "auc_runs": [round(a, 4) for a in aucs],
                "logloss": float(np.mean([r["logloss"] for r in rs])),
                "gauc": float(np.mean([r["gauc"] for r in rs])),
                "parameters": rs[0]["parameters"],
            }
        if args.deepctr_fit:
            f = _deepctr_fit(base, train, test, args, batch)
            summary["models"][f["model"]] = f
            print(
                f"  batch {batch:>4}: {f['model']:<18} {f['samples_per_s']:>8.0f} samples/s AUC {f['auc']:.4f} ({f['train_s']:.1f}s)",
                flush=True,
            )
        for pair, (ours_name, theirs_name) in PAIRS.items():
            if ours_name not in summary["models"]:
                continue
            ours, theirs = summary["models"][ours_name], summary["models"][theirs_name]
            # AUC "equal" when the mean difference is within the larger of the two seed spreads (or 0.005)
            spread = max(
                max(ours["auc_runs"]) - min(ours["auc_runs"]), max(theirs["auc_runs"]) - min(theirs["auc_runs"]), 0.005
            )
            summary["pairs"][pair] = {
                "ours": ours_name,
                "theirs": theirs_name,
                "ratio": ours["samples_per_s"] / theirs["samples_per_s"],
                "ratio_runs": [
                    round(a / b, 2)
                    for a, b in zip(ours["samples_per_s_runs"], theirs["samples_per_s_runs"], strict=True)
                ],
                "auc_difference": ours["auc"] - theirs["auc"],
                "auc_tolerance": spread,
                "equal_auc": bool(abs(ours["auc"] - theirs["auc"]) <= spread),
            }
        out.append(summary)
    return out


def part_b(args: argparse.Namespace, world: str, features: str) -> dict[str, Any]:
    from pipelines.train import run
    from umair.config import MlflowConfig, RayConfig
    from umair.training.settings import TrainConfig

    res: dict[str, Any] = {"batch_size_per_worker": args.ray_batch, "epochs": args.ray_epochs}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            out = os.path.join(tmp, f"model-{n}")
            cfg = TrainConfig(
                world=world,
                item_features=features,
                num_workers=n,
                epochs=args.ray_epochs,
                batch_size=args.ray_batch,
                eval_every_epoch=False,
                seed=args.seed,
                run_name=f"throughput-{n}w-{int(time.time())}",
                checkpoint_dir=os.path.join(tmp, "ray"),
                output=out,
                ray=RayConfig(num_cpus=4),
                mlflow=MlflowConfig(
                    tracking_uri=f"sqlite:///{os.path.join(tmp, 'mlflow.db')}", experiment="throughput"
                ),
            )
            t0 = time.perf_counter()
            summary = run(cfg)
            wall = time.perf_counter() - t0
            with open(os.path.join(out, "model.json")) as f:
                history = json.load(f)["training"]["history"]
            per_epoch = [h["rows_per_s"] for h in history]
            steady = per_epoch[1:] if len(per_epoch) > 1 else per_epoch
            res[f"{n}_worker"] = {
                "rows_per_s_per_epoch": [round(x, 1) for x in per_epoch],
                "rows_per_s": float(np.mean(steady)),
                "wall_s": round(wall, 1),
                "train_rows": summary["train_rows"],
            }
            print(
                f"  Ray Train {n} worker(s): {res[f'{n}_worker']['rows_per_s']:.0f} rows/s (epochs {per_epoch}), job wall {wall:.0f}s",
                flush=True,
            )
    res["speedup_2_vs_1"] = res["2_worker"]["rows_per_s"] / res["1_worker"]["rows_per_s"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample-out", default="outputs/ablate/sample", help="where the world + features are (re)used")
    ap.add_argument("--size", default="default", choices=["tiny", "small", "default"])
    ap.add_argument("--world-seed", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[32, 256])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--l2-emb", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of part A")
    ap.add_argument("--deepctr-dnn", type=lambda s: tuple(int(x) for x in s.split(",")), default=(64, 32, 16))
    ap.add_argument(
        "--no-mixture-pair",
        dest="mixture_pair",
        action="store_false",
        help="skip the low-rank mixture pair (umair w/o ALL vs deepctr DCNMix)",
    )
    ap.add_argument("--no-deepctr-fit", dest="deepctr_fit", action="store_false", help="skip deepctr's own fit()")
    ap.add_argument("--skip-ray", action="store_true", help="skip part B")
    ap.add_argument("--ray-epochs", type=int, default=3)
    ap.add_argument("--ray-batch", type=int, default=64, help="rows per step on each Ray Train worker")
    ap.add_argument("--out", default="outputs/bench/train_throughput.json")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    print_machine()
    t0 = time.perf_counter()
    prepared, train, test, world, features = _data(args)
    print(
        f"data: {world} + {features}; {len(train)} training rows, {len(test)} test rows; "
        f"{args.epochs} epochs, Adam lr {args.lr}, L2 {args.l2_emb}, {args.threads} torch thread(s)",
        flush=True,
    )
    print("Part A: same rows, same loop (ids + metadata, no vectors)", flush=True)
    a = part_a(args, prepared, train, test)
    b = None
    if not args.skip_ray:
        print("Part B: full UMAIR-FPS, umair train (Ray Train), 1 vs 2 workers", flush=True)
        b = part_b(args, world, features)
    print("\nsummary")
    for s in a:
        ms = s["models"]
        print(
            f"  batch {s['batch_size']}: "
            + "; ".join(f"{k} {v['samples_per_s']:.0f}/s AUC {v['auc']:.4f}" for k, v in ms.items())
        )
        for pair, p in s["pairs"].items():
            print(
                f"    {pair}: {p['ours']} / {p['theirs']} = {p['ratio']:.2f}x (per seed {p['ratio_runs']}), "
                f"AUC difference {p['auc_difference']:+.4f} ({'equal' if p['equal_auc'] else 'NOT equal'} "
                f"within {p['auc_tolerance']:.4f})"
            )
    if b:
        print(
            f"  Ray Train full model, batch {b['batch_size_per_worker']}/worker: 1 worker {b['1_worker']['rows_per_s']:.0f} "
            f"rows/s, 2 workers {b['2_worker']['rows_per_s']:.0f} rows/s, speed-up {b['speedup_2_vs_1']:.2f}x"
        )
    result = {
        "command": " ".join(
            [".venv/bin/python", "bench/train_throughput.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine_info(),
        "world": world,
        "features": features,
        "train_rows": len(train),
        "test_rows": len(test),
        "part_a": a,
        "part_b": b,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wall {result['wall_s']}s; JSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
