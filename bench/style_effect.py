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
    .venv/bin/python bench/style_effect.py train --window test --seeds 0 1 2 --name fix \\
        --model '{"user_history": true}'

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
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

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
        scaler = StandardScaler().fit(x[tr])
        xs = scaler.transform(x)
        for f, y in factors.items():
            clf = LogisticRegression(max_iter=2000, C=1.0).fit(xs[tr], y[tr])
            out[f"{f}|{m}"] = float((clf.predict(xs[te]) == y[te]).mean())
    return out


def pa_array(x: np.ndarray) -> Any:
    import pyarrow as pa

    return pa.array(x)


def _segments(world: str) -> dict[int, str]:
    from umair.training.scoring import segment_map

    return segment_map(os.path.join(world, "truth", "users.parquet"), "taste", None)


def train_once(args: argparse.Namespace, seed: int, segments: dict[int, str]) -> dict[str, Any]:
    """One in-process training + scoring run; per-taste AUC and ᾱ figures."""
    import torch

    from pipelines.ablate import window_rows
    from umair.baselines.rankers import FusionRanker
    from umair.baselines.training import fit
    from umair.metrics import PLANTED_MODALITY, alpha_spread, modality_weights
    from umair.model.settings import dcn_v2_only
    from umair.training.inputs import world_split
    from umair.training.scoring import segment_report
    from umair.training.settings import TrainConfig

    torch.set_num_threads(1)
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
    from umair.training.inputs import prepare

    prepared = prepare(cfg)
    train, test = window_rows(prepared, None)
    mc = dcn_v2_only(prepared.model_config) if args.variant == "dcn" else prepared.model_config
    ranker = FusionRanker(args.variant, mc, seed)
    module = ranker.module
    if module.history is not None:
        module.history.fit(train.user_id, train.labels, train.vectors)
    t0 = time.perf_counter()
    if module.history is None:
        fit(ranker, train, args.epochs, args.batch_size, args.lr, args.l2_emb, seed)
    else:  # the same loop as umair.baselines.training.fit, the labels passed as `own` (leave-one-out)
        _fit_own(ranker, train, args, seed)
    train_s = time.perf_counter() - t0
    encoded = ranker.encode(test)
    module.eval()
    probs, weights = [], []
    with torch.no_grad():
        for idx in torch.arange(len(test)).split(4096):
            out = module.explain(encoded["packed"][idx], {m: v[idx] for m, v in encoded["vectors"].items()})
            probs.append(torch.sigmoid(out.logits).numpy())
            if out.alpha is not None:
                weights.append(modality_weights(out.alpha.numpy(), out.beta.numpy()))
    p = np.concatenate(probs)
    w = np.concatenate(weights) if weights else None
    names = list(mc.modalities)
    rep = segment_report(test.users, test.labels.numpy(), p, w, names, segments)
    spread = alpha_spread(test.users, w, names, segments, PLANTED_MODALITY) if w is not None else {}
    return {
        "name": args.name,
        "window": args.window,
        "variant": args.variant,
        "seed": seed,
        "recipe": {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "l2_emb", "no_loo")},
        "model": json.loads(args.model),
        "train_s": round(train_s, 1),
        "auc": {k: v["auc"] for k, v in rep.items()},
        "alpha": {k: v["alpha"] for k, v in rep.items()},
        "spread": spread,
    }


def _fit_own(ranker: Any, rows: Any, args: argparse.Namespace, seed: int) -> None:
    """:func:`umair.baselines.training.fit`'s loop (same shuffles, :func:`bce_step`), with
    each batch's labels as ``own`` so positive rows leave their item out of the history."""
    import torch

    from umair.training.step import StepSettings, bce_step

    encoded = ranker.encode(rows)
    module = ranker.module
    optimizer = torch.optim.Adam(module.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(seed)
    settings = StepSettings(lr=args.lr, l2_emb=args.l2_emb)
    module.train()
    step = 0
    loo = not args.no_loo
    for epoch in range(args.epochs):
        for idx in torch.randperm(len(rows), generator=gen).split(args.batch_size):
            y = rows.labels[idx]
            vec = {m: v[idx] for m, v in encoded["vectors"].items()}
            out = module(encoded["packed"][idx], vec, own=y if loo else None)
            bce_step(module, optimizer, out, y, settings, epoch=epoch, step=step)
            step += 1


def _summary(rows: list[dict[str, Any]]) -> str:
    def ms(vals: list[float]) -> str:
        a = np.asarray(vals, dtype=float)
        return f"{a.mean():.3f} ± {a.std():.3f}" if len(a) > 1 else f"{a.mean():.3f}"

    auc = {k: ms([r["auc"].get(k, np.nan) for r in rows]) for k in ("all", "style", "content", "tag", "popularity")}
    parts = [f"{rows[0]['name']} [{rows[0]['window']}, {rows[0]['variant']}, seeds {[r['seed'] for r in rows]}]"]
    parts.append("AUC " + ", ".join(f"{k} {v}" for k, v in auc.items()))
    if rows[0]["spread"]:
        ratio = [r["alpha"]["style"]["sty"] / r["alpha"]["content"]["sty"] for r in rows]
        share = [r["spread"]["style"]["share_planted_top"] for r in rows]
        std = [r["spread"]["all"]["std"]["sty"] for r in rows]
        parts.append(
            f"α(STY) style/content {ms(ratio)}; style users with STY largest {ms(share)}; std α(STY) {ms(std)}"
        )
    return "; ".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("probe", "train"))
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
    p.add_argument("--no-loo", action="store_true", help="user history without leave-one-out in training")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(machine_line(), flush=True)
    if args.what == "probe":
        res = probe(args.world, args.features)
        print(json.dumps(res, indent=1))
        with open(os.path.join(args.out, "probe.json"), "w") as f:
            json.dump(res, f, indent=1)
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
