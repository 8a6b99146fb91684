"""Benchmark: fine-tune E^text on real anime titles and score held-out retrieval.

Data: bangumi-titles/pairs.tsv (Japanese titles with their Simplified Chinese,
Traditional Chinese and English titles; derived from bangumi-data, CC BY 4.0). A seeded
share of the Japanese titles is held out with all their translations; the model is
fine-tuned from the offline base (all-MiniLM-L6-v2) with the unknown CJK characters of
the training pairs added as tokens, and held-out ja→zh and ja→en retrieval (R@1, MRR,
candidates = every held-out title of that language, cosine) is printed before and after.

    .venv/bin/python bench/text_finetune.py --max-train 4000 --epochs 1 --threads 1
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_line  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = {"zh": ("zh-Hans", "zh-Hant"), "zh-Hans": ("zh-Hans",), "zh-Hant": ("zh-Hant",), "en": ("en",)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "bangumi-titles" / "pairs.tsv"))
    ap.add_argument("--max-train", type=int, default=4000, help="cap on training pairs (seeded sample)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument(
        "--embedding-lr", type=float, default=None, help="learning rate of the token embeddings (default: --lr)"
    )
    ap.add_argument("--max-seq-length", type=int, default=32)
    ap.add_argument("--holdout", type=float, default=0.15, help="share of Japanese titles held out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cjk-tokens", action="store_true", help="skip adding unknown CJK characters as tokens")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--base-model", default=None, help="model dir or hub name (default: the offline all-MiniLM-L6-v2)")
    ap.add_argument("--out", default=None, help="where to save the model (default: a temporary directory)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import __version__ as st_version

    from umair.text.finetune import finetune
    from umair.text.pairs import build_pairs, read_records
    from umair.text.retrieval import retrieval_metrics
    from umair.text.settings import FinetuneConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    built = build_pairs([(args.data, "pairs")])
    records, _ = read_records(args.data, "pairs")
    lang_of = {(r["src_title"].strip(), r["tgt_title"].strip()): r["tgt_lang"].strip() for _, r in records}

    with tempfile.TemporaryDirectory(prefix="umair-bench-text-") as tmp:
        cfg = FinetuneConfig(
            base_model=args.base_model,
            output_dir=args.out or os.path.join(tmp, "encoder"),
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            embedding_lr=args.embedding_lr,
            max_seq_length=args.max_seq_length,
            add_cjk_tokens=not args.no_cjk_tokens,
            eval_fraction=args.holdout,
            max_train_pairs=args.max_train,
            seed=args.seed,
        )
        base = SentenceTransformer(cfg.resolved_base_model())
        base.max_seq_length = args.max_seq_length
        t_ft = time.perf_counter()
        result = finetune(built.table, cfg)
        ft_seconds = time.perf_counter() - t_ft

        held = result.eval_pairs
        anchors, positives = held.column("anchor").to_pylist(), held.column("positive").to_pylist()
        langs = [lang_of.get((a, p), "?") for a, p in zip(anchors, positives, strict=True)]
        rows = []
        for name, accepted in TARGETS.items():
            idx = [i for i, lang in enumerate(langs) if lang in accepted]
            a = [anchors[i] for i in idx]
            p = [positives[i] for i in idx]
            rows.append(
                (
                    f"ja→{name}",
                    len(idx),
                    len(set(p)),
                    retrieval_metrics(base, a, p),
                    retrieval_metrics(result.model, a, p),
                )
            )

    print("# text encoder fine-tune benchmark (bangumi-titles)")
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine_line()}")
    print(f"torch threads={torch.get_num_threads()} | device={result.model.device}")
    print(f"versions: torch {torch.__version__}, sentence-transformers {st_version} (SentenceTransformerTrainer)")
    print(
        f"data: {args.data}: {built.table.num_rows} pairs ({built.stats['duplicates_dropped']} duplicate, "
        f"{built.stats['identical_dropped']} identical dropped, {len(built.bad_rows)} bad rows)"
    )
    n_titles = len(set(built.table.column("group").to_pylist()))
    n_held = len(set(held.column("group").to_pylist()))
    print(
        f"split: {n_titles} Japanese titles, {n_held} held out ({args.holdout:.0%}, seed {args.seed}); "
        f"train pairs used {result.train_pairs} (cap {args.max_train}), held-out pairs {held.num_rows}"
    )
    print(
        f"base: {cfg.resolved_base_model()}; added CJK tokens: {len(result.added_tokens)}; epochs {args.epochs}, "
        f"batch {args.batch_size}, lr {args.lr}, embedding lr {args.embedding_lr or args.lr}, max_seq_length {args.max_seq_length}"
    )
    first = result.loss_history[0]["loss"] if result.loss_history else float("nan")
    last = result.loss_history[-1]["loss"] if result.loss_history else float("nan")
    print(
        f"training: {len(result.loss_history)} steps, loss first {first:.3f} last {last:.3f}, "
        f"train {result.manifest['train_seconds']:.0f} s, finetune() total {ft_seconds:.0f} s"
    )
    print()
    print("| direction | pairs | candidates | R@1 before | R@1 after | MRR before | MRR after |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, c, b, a in rows:
        print(f"| {name} | {n} | {c} | {b['r1']:.3f} | {a['r1']:.3f} | {b['mrr']:.3f} | {a['mrr']:.3f} |")
    mb, ma = result.metrics_before or {}, result.metrics_after or {}
    print(
        f"| all held-out | {held.num_rows} | {len(set(positives))} | {mb.get('r1', float('nan')):.3f} | {ma.get('r1', float('nan')):.3f} "
        f"| {mb.get('mrr', float('nan')):.3f} | {ma.get('mrr', float('nan')):.3f} |"
    )
    print()
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
