"""Training batches in which no text and no group appears twice, and never fewer than two pairs.

The contrastive loss (in-batch negatives) treats every other pair of a batch as a
negative; a text or a group (one entity: a title and its translations) repeated in a
batch would be a false negative, and a batch of one pair has no negative at all (loss 0,
gradient 0: a wasted step). :class:`GroupedNoDuplicatesBatchSampler` builds batches that
avoid all three (:func:`plan_batches`). With ``lengths`` it also groups pairs of similar
length (:func:`plan_bucketed_batches`): the collator pads each batch to its longest text,
so a batch of short titles costs less than one that mixes them with a long one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from sentence_transformers.base.sampler import DefaultBatchSampler


def batch_keys(train: pa.Table) -> list[tuple[str, ...]]:
    """One key tuple per pair of ``train``: its anchor, its positive and its group (the
    group marked so that it never equals a text)."""
    a, p, g = (train.column(c).to_pylist() for c in ("anchor", "positive", "group"))
    return [(x, y, "\x00group\x00" + z) for x, y, z in zip(a, p, g, strict=True)]


def _place(i: int, keys: Sequence[tuple[str, ...]], batches, seen, open_: list[int], start: int, size: int) -> int:
    """Put row ``i`` in the first open batch from position ``start`` (round robin) whose
    keys it does not share; return the next start, or -1 when none takes it."""
    for step in range(len(open_)):
        pos = (start + step) % len(open_)
        b = open_[pos]
        if seen[b].isdisjoint(keys[i]):
            batches[b].append(i)
            seen[b].update(keys[i])
            if len(batches[b]) == size:
                open_.pop(pos)
                return pos % len(open_) if open_ else 0
            return (pos + 1) % len(open_)
    return -1


def plan_batches(
    keys: Sequence[tuple[str, ...]], batch_size: int, rng: np.random.Generator, drop_last: bool = False
) -> tuple[list[list[int]], list[int]]:
    """(batches of row indices, rows left out) for one epoch.

    No key repeats inside a batch and every batch holds at least two rows. A key that
    occurs in F rows needs F batches (one occurrence each), so the epoch has
    ``max(ceil(n / batch_size), F)`` batches; rows go, most-repeated keys first and
    otherwise in shuffled order, round robin to the next batch that has room and shares
    none of their keys, so the repeats spread over the batches instead of piling up at
    the end as one-pair batches. With ``drop_last`` there are ``n // batch_size`` batches,
    filled one after another; those short of ``batch_size`` are left out.
    A row that still ends up alone moves into another batch with room, else takes a
    partner from a batch of three or more; a row that cannot be paired at all (its key
    repeats in more than half the rows) is left out of this epoch, since alone it trains
    nothing.
    """
    n = len(keys)
    order = rng.permutation(n).tolist()
    counts = Counter(k for ks in keys for k in set(ks))
    heaviest = {i: max((counts[k] for k in keys[i]), default=1) for i in order}
    order.sort(key=lambda i: -heaviest[i])  # stable: shuffled among equally repeated rows
    top = max(heaviest.values(), default=0)
    n_batches = max(n // batch_size, 1) if drop_last else max(-(-n // batch_size), top)
    batches: list[list[int]] = [[] for _ in range(min(n_batches, n))]
    seen: list[set[str]] = [set() for _ in batches]
    open_ = list(range(len(batches)))
    start, left_out = 0, []
    for i in order:
        nxt = _place(i, keys, batches, seen, open_, start, batch_size)
        if nxt >= 0:
            start = 0 if drop_last else nxt  # drop_last: fill batches one after another
        elif drop_last:
            left_out.append(i)
        else:  # every open batch shares a key with it: a new batch
            batches.append([i])
            seen.append(set(keys[i]))
            open_.append(len(batches) - 1)
    if not drop_last:  # (with drop_last a batch short of batch_size is dropped anyway)
        for b in range(len(batches)):
            if len(batches[b]) == 1:
                _pair_up(b, keys, batches, seen, batch_size)
    keep = [b for b, rows in enumerate(batches) if len(rows) >= 2 and (len(rows) == batch_size or not drop_last)]
    kept = set(keep)
    left_out += [i for b, rows in enumerate(batches) if b not in kept for i in rows]
    return [batches[keep[k]] for k in rng.permutation(len(keep))], sorted(left_out)


def _pair_up(
    b: int, keys: Sequence[tuple[str, ...]], batches: list[list[int]], seen: list[set[str]], size: int
) -> None:
    """Batch ``b`` holds one row: move it into another batch with room that shares none of
    its keys, else move in a partner from a batch of three or more; else leave it alone."""
    i = batches[b][0]
    home = next(
        (c for c, rows in enumerate(batches) if c != b and 1 <= len(rows) < size and seen[c].isdisjoint(keys[i])),
        None,
    )
    if home is not None:
        batches[home].append(i)
        seen[home].update(keys[i])
        batches[b], seen[b] = [], set()
        return
    for c, rows in enumerate(batches):
        if len(rows) < 3:
            continue
        j = next((j for j in rows if seen[b].isdisjoint(keys[j])), None)
        if j is not None:
            rows.remove(j)
            seen[c].difference_update(keys[j])
            batches[b].append(j)
            seen[b].update(keys[j])
            return


def plan_bucketed_batches(
    keys: Sequence[tuple[str, ...]],
    lengths: Sequence[int],
    batch_size: int,
    rng: np.random.Generator,
    drop_last: bool = False,
    bucket_batches: int = 16,
) -> tuple[list[list[int]], list[int]]:
    """:func:`plan_batches` within length buckets: rows sorted by ``lengths`` (random among
    equal lengths) are cut into buckets of ``bucket_batches * batch_size`` rows (a short
    last bucket joins the one before), each bucket is planned on its own, and the batches
    of all buckets are shuffled together. Every guarantee of :func:`plan_batches` holds per
    batch; a key repeated in many rows of one bucket only makes that bucket's batches more."""
    n = len(keys)
    if len(lengths) != n:
        raise ValueError(f"{len(lengths)} lengths for {n} rows")
    order = sorted(rng.permutation(n).tolist(), key=lambda i: lengths[i])
    size = max(bucket_batches, 1) * batch_size
    cuts = list(range(0, n, size))
    if len(cuts) > 1 and n - cuts[-1] < size // 2:
        cuts.pop()
    batches: list[list[int]] = []
    left_out: list[int] = []
    for k, lo in enumerate(cuts):
        rows = order[lo : cuts[k + 1] if k + 1 < len(cuts) else n]
        sub, out = plan_batches([keys[i] for i in rows], batch_size, rng, drop_last)
        batches += [[rows[j] for j in b] for b in sub]
        left_out += [rows[j] for j in out]
    return [batches[k] for k in rng.permutation(len(batches))], sorted(left_out)


class GroupedNoDuplicatesBatchSampler(DefaultBatchSampler):
    """Batches of row indices where no key (:func:`batch_keys`) repeats and every batch holds
    at least two pairs (:func:`plan_batches`). Shuffled per epoch from ``seed + epoch``;
    ``left_out`` lists the rows the current epoch could not place.

    ``SentenceTransformerTrainer`` calls it like its own samplers (``dataset,
    batch_size=, drop_last=, valid_label_columns=, generator=, seed=``) and
    ``set_epoch``; ``keys`` (one tuple of strings per row) comes bound by
    :func:`functools.partial`, so the dataset itself is used only for its length. With
    ``lengths`` (one per row) the batches are length-bucketed (:func:`plan_bucketed_batches`).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        drop_last: bool = False,
        valid_label_columns: list[str] | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
        *,
        keys: Sequence[tuple[str, ...]],
        lengths: Sequence[int] | None = None,
        bucket_batches: int = 16,
    ) -> None:
        if len(keys) != len(dataset):
            raise ValueError(f"{len(keys)} key tuples for a dataset of {len(dataset)} rows")
        super().__init__(
            dataset,
            batch_size=batch_size,
            drop_last=drop_last,
            valid_label_columns=valid_label_columns,
            generator=generator,
            seed=seed,
        )
        self.keys = list(keys)
        if lengths is not None and len(lengths) != len(keys):
            raise ValueError(f"{len(lengths)} lengths for a dataset of {len(keys)} rows")
        self.lengths = None if lengths is None else list(lengths)
        self.bucket_batches = bucket_batches
        self.left_out: list[int] = []  # rows of the current epoch that no batch could hold
        self._cache: tuple[int, list[list[int]]] | None = None

    def _batches(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = np.random.default_rng(self.seed + self.epoch)
        if self.lengths is None:
            batches, left_out = plan_batches(self.keys, self.batch_size, rng, self.drop_last)
        else:
            batches, left_out = plan_bucketed_batches(
                self.keys, self.lengths, self.batch_size, rng, self.drop_last, self.bucket_batches
            )
        self.left_out = left_out
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())
