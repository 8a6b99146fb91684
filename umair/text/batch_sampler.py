"""Training batches in which no text and no group appears twice.

The contrastive loss treats every other pair of a batch as a negative; a text or a
group (one entity: a title and its translations) repeated in a batch would be a false
negative. :class:`GroupedNoDuplicatesBatchSampler` builds batches that avoid both.
"""

from __future__ import annotations

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


class GroupedNoDuplicatesBatchSampler(DefaultBatchSampler):
    """Batches of row indices where no key (:func:`batch_keys`) repeats. Shuffled per
    epoch from ``seed + epoch``.

    ``SentenceTransformerTrainer`` calls it like its own samplers (``dataset,
    batch_size=, drop_last=, valid_label_columns=, generator=, seed=``) and
    ``set_epoch``; ``keys`` (one tuple of strings per row) comes bound by
    :func:`functools.partial`, so the dataset itself is used only for its length.
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
        self._cache: tuple[int, list[list[int]]] | None = None

    def _batches(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.keys)).tolist()
        batches: list[list[int]] = []
        while order:
            batch: list[int] = []
            seen: set[str] = set()
            rest: list[int] = []
            for pos, i in enumerate(order):
                if len(batch) == self.batch_size:
                    rest.extend(order[pos:])
                    break
                if seen.isdisjoint(self.keys[i]):
                    batch.append(i)
                    seen.update(self.keys[i])
                else:
                    rest.append(i)
            if len(batch) == self.batch_size or not self.drop_last:
                batches.append(batch)
            order = rest
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())
