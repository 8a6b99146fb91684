"""Labels of the image pretext task: the tag vocabulary (the N most frequent tags),
multi-hot targets, and the stable train/validation split by illustration id."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np


def tag_vocabulary(tags: list[list[str]], top: int) -> list[str]:
    """The ``top`` most frequent tags (ties broken by the tag string, so it is stable)."""
    counts = Counter(t for ts in tags for t in set(ts))
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


def multi_hot(tags: list[list[str]], vocab: list[str]) -> np.ndarray:
    """[N, |vocab|] float32 targets: 1 where the row holds the tag (tags outside ``vocab`` ignored)."""
    index = {t: i for i, t in enumerate(vocab)}
    out = np.zeros((len(tags), len(vocab)), np.float32)
    for r, ts in enumerate(tags):
        for t in ts:
            if t in index:
                out[r, index[t]] = 1.0
    return out


def split_ids(ids: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """True for validation rows: a stable hash of (seed, id), so a rerun splits the same."""
    h = np.array([int(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=4).hexdigest(), 16) for i in ids])
    return (h % 10_000) < val_fraction * 10_000
