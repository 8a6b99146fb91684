"""Training throughput: this project's DCN-V2-only model vs deepctr-torch's DCN-V2, and
1 vs 2 Ray Train workers.

Part A, identical data, side by side in one process. The rows come from the training
job's own ``prepare`` (sample world + in-process item features, the same files
``umair ablate --generate default`` writes and reuses). Both models read the same
inputs — user id, mean-pooled interest tags u^IL, profile fields u^O, item metadata i^O
(buckets, illustration id) — and no e_SEM / e_STY / e_TSEM, because this project's
DCN-V2-only configuration (the Table-4 "w/o ALL" model) has none. Both are trained by the
same loop (``umair.baselines.training.fit``: same seeded shuffles, batch size, epochs,
Adam lr, BCE + L2 1e-3 on every embedding table) and scored on the same test window:

- ``umair DCN-V2-only``: UmairFPS "w/o ALL" (low-rank mixture cross, 2 layers, rank 32,
  4 experts; MLP [64, 32, 16]);
- ``deepctr DCN-V2``: ``deepctr_torch.models.DCN(cross_parameterization='matrix')``,
  cross_num 2, DNN [64, 32, 16] (``--deepctr-dnn``), embedding width 8;
- ``deepctr DCN-V2 fit()``: the same deepctr model trained by deepctr's own ``fit``
  (its DataLoader and its L2 terms), to show the shared loop does not handicap it;
- ``umair DCN-V2-only full-rank`` (side row, ``--no-full-cross`` skips it): ours with
  ``cross_type="full"``, i.e. deepctr's full-rank cross form x_0 ⊙ (W x_l + b) + x_l
  instead of the default low-rank mixture; not the headline, which stays the default.

Each model is measured ``--repeat`` times, alternating, and each batch size in
``--batch-sizes``; samples/s = training rows of all epochs / loop wall time.

Part B: the full UMAIR-FPS with the real ``umair train`` job (Ray Train, item features
looked up per worker) on 1 and then 2 workers, same per-worker batch, no per-epoch
evaluation; throughput = the job's own ``rows_per_s`` per epoch (first epoch dropped as
warm-up when there are more).

    .venv/bin/python bench/train_throughput.py --epochs 3 --batch-sizes 32,256 --repeat 2

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
    from pipelines.train import TrainConfig, prepare

    gen = GenerateSettings(out=args.sample_out, size=args.size, seed=args.world_seed)
    world, features = generate_inputs(gen)
    prepared = prepare(TrainConfig(world=world, item_features=features))
    train, test = window_rows(prepared, None)
    return prepared, train, test, world, features


def _deepctr_fit(model_cfg: Any, train: Any, test: Any, args: argparse.Namespace, batch: int) -> dict[str, Any]:
    """deepctr's own compile + fit on the same rows (its loop, its L2 terms)."""
    from pipelines.train import window_metrics
    from umair.baselines.deepctr_adapter import DeepCTRRanker

    sizes = {k: getattr(model_cfg, k) for k in ("n_users", "n_tags", "user_fields", "item_fields")}
    ranker = DeepCTRRanker("DCN-V2", sizes, int(train.user_tags.shape[1]), {}, model_cfg.emb_dim, args.seed,
                           {"dnn_hidden_units": args.deepctr_dnn, "l2_reg_embedding": args.l2_emb,
                            "l2_reg_linear": args.l2_emb}, name="deepctr DCN-V2 fit()")
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
    return {"model": ranker.name, "samples_per_s": len(train) * args.epochs / train_s, "train_s": train_s,
            "auc": met["auc"], "logloss": met["logloss"], "gauc": met["gauc"], "parameters": ranker.parameters}


def part_a(args: argparse.Namespace, prepared: Any, train: Any, test: Any) -> list[dict[str, Any]]:
    from pipelines.train import window_metrics
    from umair.baselines.deepctr_adapter import DeepCTRRanker
    from umair.baselines.rankers import FusionRanker
    from umair.baselines.training import fit, predict
    from umair.model.fusion import table4_variant

    base = prepared.model_config
    sizes = {k: getattr(base, k) for k in ("n_users", "n_tags", "user_fields", "item_fields")}
    builders = {
        "umair DCN-V2-only": lambda: FusionRanker("umair DCN-V2-only", table4_variant(base, "w/o ALL"), args.seed),
        "deepctr DCN-V2": lambda: DeepCTRRanker("DCN-V2", sizes, int(train.user_tags.shape[1]), {}, base.emb_dim,
                                                args.seed, {"dnn_hidden_units": args.deepctr_dnn}, name="deepctr DCN-V2"),
    }
    if args.full_cross:
        builders["umair DCN-V2-only full-rank"] = lambda: FusionRanker(
            "umair DCN-V2-only full-rank", table4_variant(base, "w/o ALL").model_copy(update={"cross_type": "full"}), args.seed)
    if args.with_dcnmix:
        builders["deepctr DCNMix"] = lambda: DeepCTRRanker("DCNMix", sizes, int(train.user_tags.shape[1]), {}, base.emb_dim,
                                                           args.seed, {"dnn_hidden_units": args.deepctr_dnn},
                                                           name="deepctr DCNMix")
    out = []
    for batch in args.batch_sizes:
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in builders}
        for rep in range(args.repeat):
            for name, build in builders.items():  # alternate so load drift hits every model
                ranker = build()
                res = fit(ranker, train, args.epochs, batch, args.lr, args.l2_emb, args.seed)
                probs = predict(ranker, test)
                met = window_metrics(test.users, test.labels.numpy(), probs)
                runs[name].append({"samples_per_s": res.samples_per_s, "train_s": res.train_s, "auc": met["auc"],
                                   "logloss": met["logloss"], "gauc": met["gauc"], "parameters": ranker.parameters})
                print(f"  batch {batch:>4} rep {rep}: {name:<20} {res.samples_per_s:>8.0f} samples/s "
                      f"AUC {met['auc']:.4f} ({res.train_s:.1f}s)", flush=True)
        summary = {"batch_size": batch, "models": {}}
        for name, rs in runs.items():
            summary["models"][name] = {
                "samples_per_s": float(np.mean([r["samples_per_s"] for r in rs])),
                "samples_per_s_runs": [round(r["samples_per_s"], 1) for r in rs],
                "auc": rs[0]["auc"], "logloss": rs[0]["logloss"], "gauc": rs[0]["gauc"], "parameters": rs[0]["parameters"],
                "auc_runs": [round(r["auc"], 4) for r in rs],
            }
        if args.deepctr_fit:
            f = _deepctr_fit(base, train, test, args, batch)
            summary["models"][f["model"]] = f
            print(f"  batch {batch:>4}: {f['model']:<20} {f['samples_per_s']:>8.0f} samples/s AUC {f['auc']:.4f} "
                  f"({f['train_s']:.1f}s)", flush=True)
        ours = summary["models"]["umair DCN-V2-only"]
        theirs = summary["models"]["deepctr DCN-V2"]
        summary["ratio"] = ours["samples_per_s"] / theirs["samples_per_s"]
        summary["auc_difference"] = ours["auc"] - theirs["auc"]
        out.append(summary)
    return out


def part_b(args: argparse.Namespace, world: str, features: str) -> dict[str, Any]:
    from pipelines.ray_runtime import MlflowConfig, RayConfig
    from pipelines.train import TrainConfig, run

    res: dict[str, Any] = {"batch_size_per_worker": args.ray_batch, "epochs": args.ray_epochs}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            out = os.path.join(tmp, f"model-{n}")
            cfg = TrainConfig(world=world, item_features=features, num_workers=n, epochs=args.ray_epochs,
                              batch_size=args.ray_batch, eval_every_epoch=False, seed=args.seed,
                              run_name=f"throughput-{n}w-{int(time.time())}", checkpoint_dir=os.path.join(tmp, "ray"),
                              output=out, ray=RayConfig(num_cpus=4),
                              mlflow=MlflowConfig(tracking_uri=f"sqlite:///{os.path.join(tmp, 'mlflow.db')}",
                                                  experiment="throughput"))
            t0 = time.perf_counter()
            summary = run(cfg)
            wall = time.perf_counter() - t0
            with open(os.path.join(out, "model.json")) as f:
                history = json.load(f)["training"]["history"]
            per_epoch = [h["rows_per_s"] for h in history]
            steady = per_epoch[1:] if len(per_epoch) > 1 else per_epoch
            res[f"{n}_worker"] = {"rows_per_s_per_epoch": [round(x, 1) for x in per_epoch],
                                  "rows_per_s": float(np.mean(steady)), "wall_s": round(wall, 1),
                                  "train_rows": summary["train_rows"]}
            print(f"  Ray Train {n} worker(s): {res[f'{n}_worker']['rows_per_s']:.0f} rows/s (epochs {per_epoch}), "
                  f"job wall {wall:.0f}s", flush=True)
    res["speedup_2_vs_1"] = res["2_worker"]["rows_per_s"] / res["1_worker"]["rows_per_s"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample-out", default="outputs/ablate/sample", help="where the world + features are (re)used")
    ap.add_argument("--size", default="default", choices=["tiny", "small", "default"])
    ap.add_argument("--world-seed", type=int, default=7)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[32, 256])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--l2-emb", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of part A")
    ap.add_argument("--deepctr-dnn", type=lambda s: tuple(int(x) for x in s.split(",")), default=(64, 32, 16))
    ap.add_argument("--no-full-cross", dest="full_cross", action="store_false",
                    help="skip the side row: ours with cross_type='full' (deepctr's full-rank cross form)")
    ap.add_argument("--with-dcnmix", action="store_true", help="also deepctr's DCNMix (low-rank mixture, like ours)")
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
    print(f"data: {world} + {features}; {len(train)} training rows, {len(test)} test rows; "
          f"{args.epochs} epochs, Adam lr {args.lr}, L2 {args.l2_emb}, {args.threads} torch thread(s)", flush=True)
    print("Part A: same rows, same loop (ids + metadata, no vectors)", flush=True)
    a = part_a(args, prepared, train, test)
    b = None
    if not args.skip_ray:
        print("Part B: full UMAIR-FPS, umair train (Ray Train), 1 vs 2 workers", flush=True)
        b = part_b(args, world, features)
    print("\nsummary")
    for s in a:
        ms = s["models"]
        line = "; ".join(f"{k} {v['samples_per_s']:.0f}/s AUC {v['auc']:.4f}" for k, v in ms.items())
        print(f"  batch {s['batch_size']}: {line}; ratio umair/deepctr DCN-V2 = {s['ratio']:.2f}x, "
              f"AUC difference {s['auc_difference']:+.4f}")
    if b:
        print(f"  Ray Train full model, batch {b['batch_size_per_worker']}/worker: 1 worker {b['1_worker']['rows_per_s']:.0f} "
              f"rows/s, 2 workers {b['2_worker']['rows_per_s']:.0f} rows/s, speed-up {b['speedup_2_vs_1']:.2f}x")
    result = {"command": " ".join([".venv/bin/python", "bench/train_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine_info(), "world": world, "features": features, "train_rows": len(train),
              "test_rows": len(test), "part_a": a, "part_b": b, "wall_s": round(time.perf_counter() - t0, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wall {result['wall_s']}s; JSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
