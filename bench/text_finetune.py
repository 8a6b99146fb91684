"""Benchmark: fine-tune E^text on real anime titles and score held-out retrieval.

Data: bangumi-titles/pairs.tsv (Japanese titles with their Simplified Chinese,
Traditional Chinese and English titles; derived from bangumi-data, CC BY 4.0). A seeded
share of the Japanese titles is held out with all their translations (split by title,
:func:`umair.text.finetune.split_by_group`); the model is fine-tuned from the offline base
(all-MiniLM-L6-v2) with the unknown CJK characters of the training pairs added as tokens.
For every direction (ja→zh, ja→zh-Hans, ja→zh-Hant, ja→en; candidates = every held-out
title of that language) it prints R@1 and MRR of three retrievers side by side: a
character n-gram TF-IDF baseline (no learning), the base model and the fine-tuned model.

    .venv/bin/python bench/text_finetune.py --max-train 4000 --epochs 1

``--select "lr=2e-5;lr=1e-4,embedding_lr=1e-3"`` first carves a validation split from
the *training* titles (by title, seeded), fine-tunes each candidate setting on the rest
and keeps the best validation R@1 (all validation pairs); the reported run then trains
on all training pairs with that setting. The held-out split is never used to choose.

``--speed N`` instead fine-tunes N steps' worth of pairs twice on the same data, with the
old speed settings (loss logged every step, no length bucketing, at each of ``--speed-threads``)
and with the current defaults (same recipe otherwise), and prints pairs/s, the ratio and
the held-out R@1 of both.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_line  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = {"zh": ("zh-Hans", "zh-Hant"), "zh-Hans": ("zh-Hans",), "zh-Hant": ("zh-Hant",), "en": ("en",)}
# speed settings only: the recipe stays the same
OLD_SETTINGS = {"logging_steps": 1, "length_buckets": 0, "precision": "fp32"}


def _parse_grid(text: str) -> list[dict[str, Any]]:
    """``"lr=2e-5,epochs=1;lr=1e-4"`` → ``[{"lr": 2e-5, "epochs": 1}, {"lr": 1e-4}]``."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        d: dict[str, Any] = {}
        for kv in part.split(","):
            k, v = (x.strip() for x in kv.split("="))
            if v.lower() == "none":
                d[k] = None
            elif k in ("epochs", "batch_size", "length_buckets"):
                d[k] = int(v)
            elif k in ("loss", "token_init"):
                d[k] = v
            else:
                d[k] = float(v)
        out.append(d)
    return out


def _fmt(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "(defaults)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "bangumi-titles" / "pairs.tsv"))
    ap.add_argument("--max-train", type=int, default=4000, help="cap on training pairs (seeded sample)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="default: FinetuneConfig's")
    ap.add_argument(
        "--embedding-lr",
        default=None,
        help="learning rate of the token embeddings ('none' = --lr; default: FinetuneConfig's)",
    )
    ap.add_argument("--loss", choices=("mnrl", "symmetric"), default=None, help="default: FinetuneConfig's")
    ap.add_argument("--token-init", choices=("variant", "resize"), default=None, help="default: FinetuneConfig's")
    ap.add_argument("--max-seq-length", type=int, default=32)
    ap.add_argument("--holdout", type=float, default=0.15, help="share of Japanese titles held out")
    ap.add_argument("--val", type=float, default=0.15, help="share of the training titles used to validate --select")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cjk-tokens", action="store_true", help="skip adding unknown CJK characters as tokens")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores)")
    ap.add_argument("--base-model", default=None, help="model dir or hub name (default: the offline all-MiniLM-L6-v2)")
    ap.add_argument("--out", default=None, help="where to save the model (default: a temporary directory)")
    ap.add_argument("--select", default=None, help="candidate settings chosen on a validation split (see above)")
    ap.add_argument("--speed", type=int, default=None, metavar="STEPS", help="old vs new settings, STEPS each")
    ap.add_argument(
        "--speed-fp32", action="store_true", help="--speed: also the new settings at fp32 (where auto picks bf16)"
    )
    ap.add_argument("--speed-threads", default="1,2", help="--speed: thread counts to run old and new at (default 1,2)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import __version__ as st_version

    from umair.text.finetune import finetune, split_by_group
    from umair.text.pairs import build_pairs, read_records
    from umair.text.retrieval import metrics_from_scores, retrieval_metrics, retrieval_sets, tfidf_scores
    from umair.text.settings import FinetuneConfig

    # evaluation threads (training sets its own, FinetuneConfig.threads)
    torch.set_num_threads(args.threads or FinetuneConfig(output_dir="-").resolved_threads())
    built = build_pairs([(args.data, "pairs")])
    records, _ = read_records(args.data, "pairs")
    lang_of = {(r["src_title"].strip(), r["tgt_title"].strip()): r["tgt_lang"].strip() for _, r in records}
    table = built.table

    def directions(held) -> list[tuple[str, list[str], list[str]]]:
        anchors, positives = held.column("anchor").to_pylist(), held.column("positive").to_pylist()
        langs = [lang_of.get((a, p), "?") for a, p in zip(anchors, positives, strict=True)]
        out = []
        for name, accepted in TARGETS.items():
            idx = [i for i, lang in enumerate(langs) if lang in accepted]
            out.append((f"ja→{name}", [anchors[i] for i in idx], [positives[i] for i in idx]))
        return out

    def config(tmp: str, tag: str, **over: Any) -> FinetuneConfig:
        kw: dict[str, Any] = dict(
            base_model=args.base_model,
            output_dir=os.path.join(tmp, tag),
            epochs=args.epochs,
            batch_size=args.batch_size,
            max_seq_length=args.max_seq_length,
            add_cjk_tokens=not args.no_cjk_tokens,
            eval_fraction=args.holdout,
            max_train_pairs=args.max_train,
            seed=args.seed,
            threads=args.threads,
        )
        if args.lr is not None:
            kw["lr"] = args.lr
        if args.embedding_lr is not None:
            kw["embedding_lr"] = None if args.embedding_lr.lower() == "none" else float(args.embedding_lr)
        if args.loss:
            kw["loss"] = args.loss
        if args.token_init:
            kw["token_init"] = args.token_init
        kw.update(over)
        return FinetuneConfig(**kw)

    header = [
        "# text encoder fine-tune benchmark (bangumi-titles)",
        f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}",
        f"machine: {machine_line()}",
        f"versions: torch {torch.__version__}, sentence-transformers {st_version} (SentenceTransformerTrainer)",
        f"data: {args.data}: {table.num_rows} pairs ({built.stats['duplicates_dropped']} duplicate, "
        f"{built.stats['identical_dropped']} identical dropped, {len(built.bad_rows)} bad rows)",
    ]

    with tempfile.TemporaryDirectory(prefix="umair-bench-text-") as tmp:
        if args.speed:
            return _speed(args, table, config, finetune, directions, header, tmp, t0)

        chosen: dict[str, Any] = {}
        val_lines: list[str] = []
        if args.select:
            train_all, _ = split_by_group(table, args.holdout, args.seed)
            fit, val = split_by_group(train_all, args.val, args.seed + 1)
            groups = {g for g in val.column("group").to_pylist()}
            val_lines.append(
                f"validation: {len(groups)} of the training titles ({args.val:.0%}, seed {args.seed + 1}), "
                f"{val.num_rows} pairs; candidates fit on {min(fit.num_rows, args.max_train)} pairs of the rest"
            )
            best = None
            for cand in _parse_grid(args.select):
                # finetune() holds out eval_fraction of what it gets; here: exactly the validation titles
                cfg = config(tmp, "val", eval_fraction=0.0, **cand)
                res = finetune(fit, cfg)
                m = retrieval_metrics(res.model, val.column("anchor").to_pylist(), val.column("positive").to_pylist())
                val_lines.append(
                    f"  {_fmt(cand)}: validation R@1 {m['r1']:.3f} MRR {m['mrr']:.3f} "
                    f"({res.manifest['train_seconds']:.0f} s)"
                )
                if best is None or m["r1"] > best[0]:
                    best = (m["r1"], cand)
                del res
            chosen = best[1] if best else {}
            val_lines.append(f"chosen on validation: {_fmt(chosen)}")

        cfg = config(tmp, "encoder", **chosen)
        if args.out:
            cfg = cfg.model_copy(update={"output_dir": args.out})
        base = SentenceTransformer(cfg.resolved_base_model())
        base.max_seq_length = args.max_seq_length
        t_ft = time.perf_counter()
        result = finetune(table, cfg)
        ft_seconds = time.perf_counter() - t_ft
        held = result.eval_pairs
        train_pairs, _ = split_by_group(table, args.holdout, args.seed)
        fit_texts = train_pairs.column("anchor").to_pylist() + train_pairs.column("positive").to_pylist()

        rows = []
        for name, a, p in directions(held):
            ua, cand = retrieval_sets(a, p)
            tfidf = metrics_from_scores(tfidf_scores(ua, cand), a, p)
            tfidf_train = metrics_from_scores(tfidf_scores(ua, cand, fit_texts=fit_texts), a, p)
            rows.append(
                (
                    name,
                    len(a),
                    len(cand),
                    tfidf,
                    tfidf_train,
                    retrieval_metrics(base, a, p),
                    retrieval_metrics(result.model, a, p),
                )
            )

    for line in header:
        print(line)
    n_titles = len(set(table.column("group").to_pylist()))
    n_held = len(set(held.column("group").to_pylist()))
    print(
        f"split: {n_titles} Japanese titles, {n_held} held out ({args.holdout:.0%}, seed {args.seed}); "
        f"train pairs used {result.train_pairs} (cap {args.max_train}), held-out pairs {held.num_rows}"
    )
    for line in val_lines:
        print(line)
    print(
        f"fine-tune: {cfg.resolved_base_model()}; added CJK tokens: {len(result.added_tokens)} "
        f"(init {cfg.token_init}); epochs {cfg.epochs}, batch {cfg.batch_size}, lr {cfg.lr}, "
        f"embedding lr {cfg.embedding_lr or cfg.lr}, loss {cfg.loss}, length buckets {cfg.length_buckets}, "
        f"max_seq_length {cfg.max_seq_length}, threads {cfg.resolved_threads()}"
    )
    first = result.loss_history[0]["loss"] if result.loss_history else float("nan")
    last = result.loss_history[-1]["loss"] if result.loss_history else float("nan")
    secs = result.manifest["train_seconds"]
    print(
        f"training: {result.train_pairs * cfg.epochs} pair-epochs, logged loss first {first:.3f} last {last:.3f}, "
        f"train {secs:.0f} s ({result.train_pairs * cfg.epochs / secs:.1f} pairs/s), finetune() total {ft_seconds:.0f} s"
    )
    print(
        "TF-IDF: char_wb 1-3-grams, sublinear tf, cosine; idf fit on the direction's anchors + candidates "
        "(held-out) or on the training pairs' texts (train)"
    )
    print()
    print(
        "| direction | pairs | candidates | R@1 TF-IDF (held-out idf) | R@1 TF-IDF (train idf) | R@1 base | "
        "R@1 fine-tuned | MRR TF-IDF (held-out idf) | MRR base | MRR fine-tuned |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, n, c, tf, tft, b, a in rows:
        print(
            f"| {name} | {n} | {c} | {tf['r1']:.3f} | {tft['r1']:.3f} | {b['r1']:.3f} | {a['r1']:.3f} "
            f"| {tf['mrr']:.3f} | {b['mrr']:.3f} | {a['mrr']:.3f} |"
        )
    mb, ma = result.metrics_before or {}, result.metrics_after or {}
    nan = float("nan")
    print(
        f"| all held-out (fine-tune's own score) | {held.num_rows} | {len(set(held.column('positive').to_pylist()))} "
        f"| | | {mb.get('r1', nan):.3f} | {ma.get('r1', nan):.3f} | | {mb.get('mrr', nan):.3f} | {ma.get('mrr', nan):.3f} |"
    )
    print()
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    return 0


def _speed(args, table, config, finetune, directions, header, tmp, t0) -> int:
    """Old vs new training speed settings on the same pairs and recipe, one after the other."""
    from umair.text.finetune import resolved_precision
    from umair.text.retrieval import retrieval_metrics

    n = args.speed * args.batch_size
    runs = []
    plan = []
    for spec in args.speed_threads.split(","):
        t_old, _, t_new = spec.partition("/")
        t_new = t_new or t_old
        n_old, n_new = (None if t == "auto" else int(t) for t in (t_old, t_new))
        plan.append(
            (f"old (loss logged every step, no length buckets), threads {t_old}", {**OLD_SETTINGS, "threads": n_old})
        )
        plan.append((f"new (FinetuneConfig defaults), threads {t_new}", {"threads": n_new}))
        if args.speed_fp32:
            plan.append((f"new but fp32 (precision: fp32), threads {t_new}", {"threads": n_new, "precision": "fp32"}))
    for name, over in plan:
        cfg = config(tmp, "speed", max_train_pairs=n, **over)
        n_threads = cfg.resolved_threads()  # what the run will use (auto: the usable cores)
        cfg = cfg.model_copy(update={"threads": n_threads})
        res = finetune(table, cfg)
        secs = res.manifest["train_seconds"]
        dirs = {d: (a, p) for d, a, p in directions(res.eval_pairs)}
        m = {d: retrieval_metrics(res.model, *dirs[d]) for d in ("ja→zh-Hans", "ja→en")}
        steps = res.manifest["train_steps"]
        runs.append((name, cfg, res.train_pairs, steps, secs, m))
        del res
    for line in header:
        print(line)
    print(
        f"speed: {n} training pairs ({args.speed} batches of {args.batch_size}), {args.epochs} epoch(s), "
        f"lr {cfg.lr}, embedding lr {cfg.embedding_lr or cfg.lr}, loss {cfg.loss}, held-out {args.holdout:.0%} seed {args.seed}"
    )
    print()
    print("| settings | threads | precision | steps | train s | pairs/s | R@1 ja→zh-Hans | R@1 ja→en |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, cfg, n_pairs, steps, secs, m in runs:
        print(
            f"| {name} | {cfg.threads} | {resolved_precision(cfg)} | {steps} | {secs:.1f} "
            f"| {n_pairs * cfg.epochs / secs:.1f} | {m['ja→zh-Hans']['r1']:.3f} | {m['ja→en']['r1']:.3f} |"
        )
    print()
    per_spec = len(runs) // len(args.speed_threads.split(","))
    for k in range(0, len(runs), per_spec):  # each thread spec: its old run, then the new ones
        old = runs[k]
        for new in runs[k + 1 : k + per_spec]:
            print(f"speed-up {new[0]} / {old[0]}: {old[4] / new[4]:.2f}x")
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
