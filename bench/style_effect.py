"""Benchmark: where the planted painting-style effect is lost on the demo's chain (issue #16).

Reads the demo's world and item features (``make demo`` writes them to
``outputs/demo/{world,features}``) and measures, without re-running the chain:

- ``probe``: linear probes of the sample world's latent factors on the extracted vectors
  (multinomial logistic regression, 70 / 30 split of the illustrations by a seeded
  permutation, z-scored like training): style on e_STY, content on e_SEM, and the
  crossed pairs (style on e_SEM, content on e_STY, both on e_TSEM). Chance is 1/4 for
  style (4 styles) and 1/6 for content (6 contents).
- ``train``: the fusion model trained in-process (the training job's own ``prepare``,
  the one training step of :mod:`umair.training.step` through
  :func:`umair.baselines.training.fit`; not Ray Train, so a run takes ~20-60 s) with a
  recipe and model overrides, scored on a window: ``val`` = train on ``ts < 2021-08-01``,
  score ``[2021-08-01, split)`` (choose settings here), ``test`` = train on ``ts < split``,
  score ``ts >= split`` (report only). Per planted taste: AUC, mean ᾱ per modality, and
  over users: the std of per-user ᾱ(STY) and the share of users whose largest ᾱ is the
  modality of their planted taste (:func:`umair.metrics.alpha_spread`).

    .venv/bin/python bench/style_effect.py probe
    .venv/bin/python bench/style_effect.py train --window val --seeds 0 1 2 --name demo-recipe
    .venv/bin/python bench/style_effect.py train --window val --seeds 0 1 2 --name l2=0 --l2-emb 0
    .venv/bin/python bench/style_effect.py train --window val --seeds 0 1 2 --name fix --epochs 5 \\
        --model '{"user_history": true, "modality_norm": "l2", "umcm": "moe", "experts": ["att"]}'
    .venv/bin/python bench/style_effect.py residual --out outputs/bench/style_effect  # e_SEM minus e_STY's part
    .venv/bin/python bench/style_effect.py fixture --size default --seeds 0 1 2 3 4 --epochs 5 --model '{...}'

Each run appends one JSON line per seed to ``OUT/results.jsonl`` and prints a summary row
(mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_line  # noqa: E402

VAL_START = "2021-08-01T00:00:00+00:00"


def probe(world: str, features: str, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy of a linear probe of each latent factor on each modality."""
    import pyarrow.compute as pc

    from umair import storage
    from umair.feature_store import read_features

    table = read_features(features, None, None)
    truth = storage.read_parquet(os.path.join(world, "truth", "items.parquet"))
    ids = table.column("illust_id").to_numpy()
    idx = pc.index_in(pa_array(ids), value_set=truth.column("illust_id")).to_numpy(zero_copy_only=False)
    factors = {f: truth.column(f).to_numpy()[idx] for f in ("style", "content")}
    perm = np.random.default_rng(seed).permutation(len(ids))
    cut = int(0.7 * len(ids))
    tr, te = perm[:cut], perm[cut:]
    out: dict[str, float] = {}
    for m in ("sty", "sem", "tsem"):
        if m not in table.column_names:
            continue
        col = table.column(m).combine_chunks()
        x = col.flatten().to_numpy(zero_copy_only=False).reshape(len(ids), col.type.list_size).astype(np.float32)
        for f, y in factors.items():
            out[f"{f}|{m}"] = probe_accuracy(x, y, tr, te)
    return out


def probe_accuracy(x: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray) -> float:
    """Held-out accuracy of a multinomial logistic regression of ``y`` on z-scored ``x``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[tr])
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(x[tr]), y[tr])
    return float((clf.predict(scaler.transform(x[te])) == y[te]).mean())


def residual(args: argparse.Namespace) -> None:
    """Two plain item-features parquets in ``--out`` from the demo's extraction output:
    ``features_as_extracted.parquet`` and ``features_sem_residual.parquet``, where e_SEM is
    replaced by its residual after a least-squares fit on z-scored e_STY over the whole
    catalogue (no labels used). An absent e_TSEM becomes zeros in both (a plain parquet
    cannot hold NULL vectors). Prints the style / content probes of e_SEM and its residual;
    train on either with ``train --features OUT/<file>``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from umair import storage
    from umair.feature_store import read_features

    table = read_features(args.features, None, None)

    def matrix(name: str) -> np.ndarray:
        col = table.column(name).combine_chunks()
        x = np.zeros((len(col), col.type.list_size), np.float64)
        ok = col.is_valid().to_numpy(zero_copy_only=False)
        x[ok] = col.filter(pa.array(ok)).flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
        return x

    def vectors(x: np.ndarray) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), x.shape[1])

    sem, sty = matrix("sem"), matrix("sty")
    zs = (sty - sty.mean(0)) / (sty.std(0) + 1e-6)
    centred = sem - sem.mean(0)
    resid = centred - zs @ np.linalg.lstsq(zs, centred, rcond=None)[0] + sem.mean(0)
    truth = storage.read_parquet(os.path.join(args.world, "truth", "items.parquet"))
    idx = pc.index_in(table.column("illust_id"), value_set=truth.column("illust_id")).to_numpy(zero_copy_only=False)
    perm = np.random.default_rng(0).permutation(len(table))
    tr, te = perm[: int(0.7 * len(table))], perm[int(0.7 * len(table)) :]
    for name, x in (("sem", sem), ("sem_residual", resid)):
        for f in ("style", "content"):
            print(f"probe {f}|{name}: {probe_accuracy(x, truth.column(f).to_numpy()[idx], tr, te):.3f}")
    base = table.set_column(table.column_names.index("tsem"), "tsem", vectors(matrix("tsem")))
    for name, t in (
        ("as_extracted", base),
        ("sem_residual", base.set_column(base.column_names.index("sem"), "sem", vectors(resid))),
    ):
        pq.write_table(
            t.replace_schema_metadata(table.schema.metadata), os.path.join(args.out, f"features_{name}.parquet")
        )
    print(f"wrote {args.out}/features_as_extracted.parquet and features_sem_residual.parquet")


def pa_array(x: np.ndarray) -> Any:
    import pyarrow as pa

    return pa.array(x)


def _segments(world: str) -> dict[int, str]:
    from umair.training.scoring import segment_map

    return segment_map(os.path.join(world, "truth", "users.parquet"), "taste", None)


def train_once(args: argparse.Namespace, seed: int, segments: dict[int, str]) -> dict[str, Any]:
    """One in-process training (:func:`umair.training.local.fit_local`) + scoring run;
    per-taste AUC and ᾱ figures."""
    from umair.metrics import PLANTED_MODALITY, alpha_spread
    from umair.model.settings import dcn_v2_only
    from umair.training.inputs import prepare, world_split
    from umair.training.local import LocalRecipe, fit_local, rows_of_window
    from umair.training.scoring import score_rows, segment_report
    from umair.training.settings import TrainConfig

    split = world_split(args.world)
    cfg = TrainConfig(
        world=args.world,
        item_features=args.features,
        split=VAL_START if args.window == "val" else split,
        test_end=split if args.window == "val" else None,
        model=json.loads(args.model),
        variant=None if args.variant in ("full", "dcn") else args.variant,
        seed=seed,
    )
    prepared = prepare(cfg)
    mc = dcn_v2_only(prepared.model_config) if args.variant == "dcn" else prepared.model_config
    recipe = LocalRecipe(args.epochs, args.batch_size, args.lr, args.l2_emb, seed)
    t0 = time.perf_counter()
    fitted = fit_local(prepared, mc, recipe)
    train_s = time.perf_counter() - t0
    u, i, y, ts = rows_of_window(prepared.test_rows)
    scores = score_rows(fitted.model, fitted.lookup, u, i, ts=ts)
    names = list(mc.modalities)
    user_ids = _user_ids(prepared, u.numpy())
    rep = segment_report(user_ids, y, scores.probs, scores.weights, names, segments)
    w = scores.weights
    spread = alpha_spread(user_ids, w, names, segments, PLANTED_MODALITY) if w is not None else {}
    return {
        "name": args.name,
        "window": args.window,
        "variant": args.variant,
        "seed": seed,
        "recipe": {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "l2_emb")},
        "model": json.loads(args.model),
        "train_s": round(train_s, 1),
        "auc": {k: v["auc"] for k, v in rep.items()},
        "alpha": {k: v["alpha"] for k, v in rep.items()},
        "spread": spread,
    }


def _user_ids(prepared: Any, user_rows: np.ndarray) -> np.ndarray:
    from umair import contracts

    users = contracts.read_table(prepared.inputs.users, "users")
    return users.column("user_id").to_numpy()[user_rows]


def fixture(args: argparse.Namespace) -> None:
    """The slow test's scenario (tests/test_style_effect.py) over seeds: a sample world
    (``--size``, seed 7) with in-process item features (random-weight ResNet18 at
    ``--image-size`` px, hashed-tag e_TSEM), full vs w/o STY; prints the style-user margin
    and the ᾱ ratio."""
    from umair.baselines.sample_features import fixture_item_features
    from umair.sample.world import load_world, write_world
    from umair.training.local import LocalRecipe
    from umair.training.planted import style_effect

    base = os.path.join(args.out, f"fixture-{args.size}-{args.image_size}px")
    world, feats = os.path.join(base, "world"), os.path.join(base, "features.parquet")
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(world, "world.json")):
        write_world(world, args.size, 7, True, progress=False)
    if not os.path.exists(feats):
        fixture_item_features(load_world(world), feats, image_size=args.image_size, tsem_dim=16, seed=0)
    print(f"world + features in {time.perf_counter() - t0:.0f}s", flush=True)
    out = []
    for seed in args.seeds:
        recipe = LocalRecipe(args.epochs, args.batch_size, args.lr, args.l2_emb, seed)
        r = style_effect(world, feats, json.loads(args.model), recipe, baseline={})
        out.append(r)
        print(
            f"  seed {seed}: style AUC {r['style_auc']:.3f}, margin {r['margin']:+.3f}, "
            f"ᾱ ratio {r['alpha_ratio']:.2f}, STY largest {r['style_top_share']:.0%}, "
            f"all {r['rows']['full']['auc']['all']:.3f}; over the paper's v_user {r['over_baseline']:+.3f} "
            f"(baseline style AUC {r['rows']['baseline']['auc']['style']:.3f})",
            flush=True,
        )
    for k in ("margin", "alpha_ratio", "style_top_share", "style_auc", "over_baseline"):
        v = np.array([r[k] for r in out])
        print(f"{k}: mean {v.mean():.3f} std {v.std():.3f} min {v.min():.3f} max {v.max():.3f}")


def _summary(rows: list[dict[str, Any]]) -> str:
    def ms(vals: list[float]) -> str:
        a = np.asarray(vals, dtype=float)
        return f"{a.mean():.3f} ± {a.std():.3f}" if len(a) > 1 else f"{a.mean():.3f}"

    auc = {k: ms([r["auc"].get(k, np.nan) for r in rows]) for k in ("all", "style", "content", "tag", "popularity")}
    parts = [f"{rows[0]['name']} [{rows[0]['window']}, {rows[0]['variant']}, seeds {[r['seed'] for r in rows]}]"]
    parts.append("AUC " + ", ".join(f"{k} {v}" for k, v in auc.items()))
    if rows[0]["spread"] and "sty" in rows[0]["alpha"]["style"]:
        ratio = [r["alpha"]["style"]["sty"] / r["alpha"]["content"]["sty"] for r in rows]
        share = [r["spread"]["style"]["share_planted_top"] for r in rows]
        std = [r["spread"]["all"]["std"]["sty"] for r in rows]
        parts.append(
            f"α(STY) style/content {ms(ratio)}; style users with STY largest {ms(share)}; std α(STY) {ms(std)}"
        )
    return "; ".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("probe", "residual", "train", "fixture"))
    p.add_argument("--world", default="outputs/demo/world")
    p.add_argument("--features", default="outputs/demo/features")
    p.add_argument("--out", default="outputs/bench/style_effect")
    p.add_argument("--window", choices=("val", "test"), default="val")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--name", default="run")
    p.add_argument("--variant", default="full", help="full, a Table-4 variant, or dcn (DCN-V2-only)")
    p.add_argument("--model", default="{}", help="ModelConfig overrides as JSON")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--l2-emb", type=float, default=1e-3)
    p.add_argument("--size", default="small", help="fixture world size (tiny, small, default)")
    p.add_argument("--image-size", type=int, default=48, help="fixture encoder input size")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(machine_line(), flush=True)
    if args.what == "probe":
        res = probe(args.world, args.features)
        print(json.dumps(res, indent=1))
        with open(os.path.join(args.out, "probe.json"), "w") as f:
            json.dump(res, f, indent=1)
        return 0
    if args.what == "fixture":
        fixture(args)
        return 0
    if args.what == "residual":
        residual(args)
        return 0
    segments = _segments(args.world)
    rows = []
    for seed in args.seeds:
        r = train_once(args, seed, segments)
        rows.append(r)
        with open(os.path.join(args.out, "results.jsonl"), "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"  seed {seed}: " + json.dumps({"auc": r["auc"], "train_s": r["train_s"]}), flush=True)
    print(_summary(rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
