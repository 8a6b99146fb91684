"""Benchmark: e_TSEM by distinct tags ("dedup") vs one joined string per illustration.

Both modes run side by side in one process on the same sample world and the same
model; prints strings encoded, wall time of each and the speed-up.

    .venv/bin/python bench/tag_dedup.py --size default --repeat 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from sentence_transformers import SentenceTransformer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_line  # noqa: E402

from umair.sample.world import SIZES, generate  # noqa: E402
from umair.text.settings import default_base_model  # noqa: E402
from umair.text.tag_embeddings import embed_tags  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="default", choices=list(SIZES))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--model", default=None, help="text encoder directory (default: the offline base model)")
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of each mode; the best is kept")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    world = generate(SIZES[args.size], args.seed, tempfile.mkdtemp())
    model = SentenceTransformer(args.model or default_base_model(), device="cpu")
    best: dict[str, object] = {}
    for _ in range(args.repeat):
        for mode in ("dedup", "joined"):  # alternate so load drift hits both
            _, stats = embed_tags(world.illustrations, model, "bench", mode=mode, batch_size=256)
            if mode not in best or stats.wall_seconds < best[mode].wall_seconds:
                best[mode] = stats
    d, j = best["dedup"], best["joined"]
    print(f"machine: {machine_line()}")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(
        f"world: {args.size} (seed {args.seed}), {d.illustrations} illustrations, {d.distinct_tags} distinct tags, "
        f"{d.illustrations_without_tags} without tags"
    )
    print(f"{'mode':<8} {'strings encoded':>16} {'wall s':>8}")
    for s in (d, j):
        print(f"{s.mode:<8} {s.encoded_strings:>16} {s.wall_seconds:>8.2f}")
    print(
        f"dedup encodes {j.encoded_strings / max(d.encoded_strings, 1):.1f}x fewer strings and is "
        f"{j.wall_seconds / d.wall_seconds:.1f}x faster (best of {args.repeat} alternating runs each)"
    )


if __name__ == "__main__":
    main()
