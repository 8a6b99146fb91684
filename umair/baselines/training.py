"""The one training loop and scorer every compared model goes through.

For each epoch the rows are shuffled by a seeded permutation (the same for every model
given the same seed), cut into batches of ``batch_size``; each step computes

    loss = BCE(ŷ, y) + l2_emb · Σ_E ‖E‖²     (E: every ``nn.Embedding`` of the model)

and takes an Adam step (paper: Adam, lr 1e-3, L2 1e-3 on embeddings): the same
:func:`umair.training.step.bce_step` that ``umair train`` runs on its Ray Train
workers. Models that emit logits use BCE-with-logits, models that emit probabilities
(deepctr-torch) plain BCE on ŷ clipped to [1e-7, 1 - 1e-7]. Throughput is measured identically for every model: the
rows of all epochs divided by the wall time of the loop (batch gather, forward,
backward, optimizer step; the one-off :meth:`Ranker.encode` excluded).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from umair.baselines.inputs import RowInputs
from umair.baselines.rankers import Ranker
from umair.training.step import StepSettings, bce_step


@dataclass
class FitResult:
    """``rows`` trained on (all epochs), ``train_s`` loop wall time, ``samples_per_s``
    = rows / train_s, ``epoch_loss`` mean BCE per epoch, ``encode_s`` one-off encoding."""

    epochs: int
    rows: int
    train_s: float
    samples_per_s: float
    encode_s: float
    epoch_loss: list[float] = field(default_factory=list)


def fit(
    ranker: Ranker,
    rows: RowInputs,
    epochs: int = 1,
    batch_size: int = 256,
    lr: float = 1e-3,
    l2_emb: float = 1e-3,
    seed: int = 0,
    max_steps: int | None = None,
) -> FitResult:
    """Train ``ranker.module`` in place on ``rows`` (see the module docstring);
    ``max_steps`` stops early (tests)."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if len(rows) == 0:
        raise ValueError(f"{ranker.name}: no training rows")
    t0 = time.perf_counter()
    encoded = ranker.encode(rows)
    encode_s = time.perf_counter() - t0
    module = ranker.module
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    labels = rows.labels
    module.train()
    done, steps, losses = 0, 0, []
    t0 = time.perf_counter()
    step_settings = StepSettings(lr=lr, l2_emb=l2_emb)
    for epoch in range(epochs):
        total, n = 0.0, 0
        for idx in torch.randperm(len(rows), generator=gen).split(batch_size):
            out = ranker.forward(encoded, idx)
            value = bce_step(
                module, optimizer, out, labels[idx], step_settings, epoch=epoch, step=steps, emits=ranker.emits
            )
            total += value * len(idx)
            n += len(idx)
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        done += n
        losses.append(total / max(n, 1))
        if max_steps is not None and steps >= max_steps:
            break
    train_s = time.perf_counter() - t0
    return FitResult(len(losses), done, train_s, done / train_s if train_s > 0 else float("nan"), encode_s, losses)


def predict(ranker: Ranker, rows: RowInputs, batch_size: int = 4096, encoded: Any = None) -> np.ndarray:
    """ŷ ∈ [0, 1] of every row (eval mode, no gradients)."""
    encoded = ranker.encode(rows) if encoded is None else encoded
    ranker.module.eval()
    out = []
    with torch.no_grad():
        for idx in torch.arange(len(rows)).split(batch_size):
            out.append(ranker.probabilities(encoded, idx).float().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)
