"""Growth curve of the serving side (issue #18): candidate search at a million items, and
``umair evaluate`` / ``umair recommend`` over the synthetic worlds of ``bench/scale.py``.

**search**: unit vectors around planted directions (a catalogue clusters by subject and
hand; random vectors in high dimension have no neighbours worth finding, so they would
say nothing about recall), float16 like the :class:`umair.neighbors.FeatureIndex`, at
``--search-items`` (default 100 k and 1 M) × ``--search-dim`` (default 256, e_STY's width).
In a fresh process per size: the IVF index's build time (:class:`umair.ivf.IVFIndex`,
4√N lists), ms per query of the IVF search and of the exact blocked search
(:func:`umair.ivf.cosine_topk`) side by side on the same queries, the rows each ranks per
query, recall@20 of the IVF answers against the exact ones, and the process's peak RSS.

**serve**: per size of ``bench/scale.py`` (multiples of the demo world, ``paper`` = 1/10
of Table 2; real schema, random float16 vectors at 2048 / 256 / 384): one ``umair
train`` epoch (as scale.py, whose training table it also prints), then in fresh processes ``umair evaluate`` on the test
window (rows, rows/s over the whole job, driver peak RSS) and ``umair recommend`` for
``--recommend-users`` users with 2 actors (users/s, the ranking tables' size, each
actor's peak RSS / USS and its tables' shared vs private MiB, driver peak RSS).

    .venv/bin/python bench/scale_serving.py --parts search
    .venv/bin/python bench/scale_serving.py --parts serve --sizes 1,10

Prints the machine, the command and the figures (also JSON to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info, print_machine  # noqa: E402
from scale import _child, size_of, write_world  # noqa: E402

from umair.training.memory import peak_rss_mb  # noqa: E402

SEEDS = 10  # queries per search call: CandidateSettings.seeds, one user's recent bookmarks


def clustered_unit_rows(n: int, d: int, centres: int, seed: int, noise: float = 1.0) -> np.ndarray:
    """float16 unit rows around ``centres`` random directions (cosine ≈ 0.5 between two rows of
    one centre at ``noise = 1``, ≈ 0 across centres), written in chunks."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    x = np.empty((n, d), np.float16)
    for s in range(0, n, 65_536):
        e = min(n, s + 65_536)
        block = c[rng.integers(centres, size=e - s)] + noise * rng.standard_normal((e - s, d), dtype=np.float32)
        x[s:e] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x


def child_search(n: int, d: int, queries: int, exact_queries: int, k: int, probes: list[int]) -> list[dict]:
    from dataclasses import replace

    from umair.ivf import IVFIndex, cosine_topk

    x = clustered_unit_rows(n, d, centres=max(10, n // 100), seed=0)
    t0 = time.perf_counter()
    built = IVFIndex.build(x, np.arange(n))
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    q = np.asarray(x[rng.choice(n, queries, replace=False)], np.float32)
    # both in calls of SEEDS queries: one user's seeds per call, as the candidate generator does
    t0 = time.perf_counter()
    want = np.vstack([cosine_topk(q[s : s + SEEDS], x, k)[0] for s in range(0, exact_queries, SEEDS)])
    exact_ms = (time.perf_counter() - t0) / exact_queries * 1e3
    out = []
    for probe in probes:
        index = replace(built, probe=min(probe, built.lists))
        t0 = time.perf_counter()
        got = np.vstack([index.search(x, q[s : s + SEEDS], k)[0] for s in range(0, queries, SEEDS)])
        ivf_ms = (time.perf_counter() - t0) / queries * 1e3
        pairs = zip(got[:exact_queries].tolist(), want.tolist())
        sizes = np.diff(index.offsets)
        order = np.argsort(-(q @ index.centroids.T), axis=1)[:, : index.probe]
        out.append({"items": n, "dim": d, "lists": index.lists, "probe": index.probe, "build_s": build_s,
                    "ivf_ms_per_query": ivf_ms, "exact_ms_per_query": exact_ms, "speedup": exact_ms / ivf_ms,
                    "rows_ranked_per_query": float(sizes[order].sum(axis=1).mean()),
                    "recall_at_k": float(np.mean([len(set(a) & set(b)) / k for a, b in pairs])), "k": k,
                    "queries": queries, "exact_queries": exact_queries, "peak_rss_mb": peak_rss_mb()})  # fmt: skip
    return out


def child_evaluate(model: str, out: Path) -> dict:
    from pipelines.evaluate import EvaluateConfig, run
    from umair.config import MlflowConfig

    cfg = EvaluateConfig(
        model=model,
        output=str(out / "evaluation.json"),
        mlflow=MlflowConfig(tracking_uri=f"sqlite:///{out / 'mlflow.db'}", experiment="bench-scale"),
    )
    t0 = time.perf_counter()
    report = run(cfg)
    wall = time.perf_counter() - t0
    return {"rows": report["rows"], "wall_s": wall, "rows_per_s": report["rows"] / wall, "auc": report["auc"],
            "driver_peak_rss_mb": peak_rss_mb()}  # fmt: skip


def child_recommend(model: str, out: Path, users: int) -> dict:
    from pipelines.recommend import RecommendConfig, run
    from umair.config import MlflowConfig, RayConfig

    cfg = RecommendConfig(
        model=model,
        world=None,
        output=str(out / "recs"),
        user_ids=list(range(1, users + 1)),
        picture_users=0,
        actors=2,
        ray=RayConfig(num_cpus=4),
        mlflow=MlflowConfig(tracking_uri=f"sqlite:///{out / 'mlflow.db'}", experiment="bench-scale"),
    )
    s = run(cfg)
    keep = ("users", "rank_s", "tables_s", "users_per_s", "shared_tables_mb", "actor_memory", "wall_s")
    return {**{k: s[k] for k in keep}, "driver_peak_rss_mb": peak_rss_mb()}


def report_search(rows: list[dict]) -> None:
    print("\ncandidate search (clustered float16 unit vectors; ms per query, one process)")
    print(f"{'items':>9} {'dim':>5} {'lists':>6} {'probe':>5} {'build s':>8} {'ranked':>8} {'IVF ms':>8} "
          f"{'exact ms':>9} {'speed-up':>8} {'recall@k':>8} {'peak MiB':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['items']:>9} {r['dim']:>5} {r['lists']:>6} {r['probe']:>5} {r['build_s']:>8.1f} "
              f"{r['rows_ranked_per_query']:>8.0f} {r['ivf_ms_per_query']:>8.2f} {r['exact_ms_per_query']:>9.1f} "
              f"{r['speedup']:>7.0f}x {r['recall_at_k']:>8.3f} {r['peak_rss_mb']:>9.0f}")  # fmt: skip


def report_serve(results: dict[str, dict]) -> None:
    from scale import report_training

    report_training({name: {**r["train"], "size": r["size"]} for name, r in results.items()})
    print("\nevaluate and recommend (MiB, seconds)")
    print(f"{'size':>6} {'items':>8} {'eval rows':>9} {'eval r/s':>9} {'eval drv':>8} {'rec users':>9} {'users/s':>8} "
          f"{'tables':>7} {'a.peak':>7} {'a.uss':>6} {'a.shared':>8} {'a.priv':>6} {'rec drv':>8}")  # fmt: skip
    for name, r in results.items():
        e, c, n = r["evaluate"], r["recommend"], r["size"]
        a = list(c["actor_memory"].values())
        print(f"{name:>6} {n['items']:>8} {e['rows']:>9} {e['rows_per_s']:>9.0f} {e['driver_peak_rss_mb']:>8.0f} "
              f"{c['users']:>9} {c['users_per_s']:>8.1f} {c['shared_tables_mb']:>7.0f} "
              f"{max(x['peak_rss_mb'] for x in a):>7.0f} {max(x.get('uss_mb', 0) for x in a):>6.0f} "
              f"{min(x.get('items_shared_mb', 0) for x in a):>8.0f} {max(x.get('items_private_mb', 0) for x in a):>6.1f} "
              f"{c['driver_peak_rss_mb']:>8.0f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="search,serve", help="search and/or serve")
    ap.add_argument("--search-items", default="100000,1000000")
    ap.add_argument("--search-dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--exact-queries", type=int, default=50)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--probes", default="8,16,64", help="IVF lists ranked per query, each measured")
    ap.add_argument("--sizes", default="1,10", help="serve: multiples of the demo world, and/or 'paper'")
    ap.add_argument("--recommend-users", type=int, default=400)
    ap.add_argument("--root", default="/tmp/umair-bench-serving", help="scratch directory (deleted at the end)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    print_machine()
    root = Path(args.root)
    out: dict = {"machine": machine_info(), "command": sys.argv, "search": [], "serve": {}}
    parts = set(args.parts.split(","))
    try:
        if "search" in parts:
            for n in (int(s) for s in args.search_items.split(",")):
                payload = {"n": n, "d": args.search_dim, "queries": args.queries, "exact_queries": args.exact_queries,
                           "k": args.k, "probes": [int(p) for p in args.probes.split(",")]}  # fmt: skip
                r = _child_here("search", payload)
                out["search"].extend(r)
                print(f"[serving] search {n} x {args.search_dim}: {json.dumps(r)}", flush=True)
            report_search(out["search"])
        if "serve" in parts:
            for name in args.sizes.split(","):
                n = size_of(name)
                paths = write_world(root / f"world-{name}", n)
                run_dir = root / f"run-{name}"
                shutil.rmtree(run_dir, ignore_errors=True)
                trained = _child("train", {"paths": paths, "out": str(run_dir), "workers": 2, "batch": 1024}, 3600)
                model = str(run_dir / "model")
                ev = _child_here("evaluate", {"model": model, "out": str(run_dir)})
                rec = _child_here("recommend", {"model": model, "out": str(run_dir), "users": args.recommend_users})
                out["serve"][name] = {"size": n, "train": trained, "evaluate": ev, "recommend": rec}
                print(f"[serving] size {name}: {json.dumps(out['serve'][name])}", flush=True)
                shutil.rmtree(root / f"world-{name}", ignore_errors=True)
                shutil.rmtree(run_dir, ignore_errors=True)
            report_serve(out["serve"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))


def _child_here(kind: str, payload: dict, timeout: float = 3600) -> dict:
    """One measurement of this file in a fresh process (its own peak RSS)."""
    return _child(kind, payload, timeout, script=__file__)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        kind, p = sys.argv[2], json.loads(sys.argv[3])
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        if kind == "search":
            result = child_search(p["n"], p["d"], p["queries"], p["exact_queries"], p["k"], p["probes"])
        elif kind == "evaluate":
            result = child_evaluate(p["model"], Path(p["out"]))
        elif kind == "recommend":
            result = child_recommend(p["model"], Path(p["out"]), p["users"])
        else:
            raise SystemExit(f"unknown child {kind}")
        print("RESULT " + json.dumps(result), flush=True)
    else:
        main()
