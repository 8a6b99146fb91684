"""One training epoch of the fusion model: BCE on the logit plus the embedding L2 term,
Adam, and the divergence checks (no Ray here: the Ray Train loop calls it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from umair.errors import JobFailed
from umair.training.lookup import Lookup


@dataclass(frozen=True)
class StepSettings:
    """Optimiser settings of :func:`train_epoch` (paper: Adam lr 1e-3, L2 1e-3)."""

    lr: float
    l2_emb: float


class TrainingDiverged(JobFailed):
    """The training loss became NaN or infinite (usually a learning rate too high)."""


def check_finite_loss(value: float, *, epoch: int, step: int, lr: float) -> None:
    """Raise :class:`TrainingDiverged` when a step's loss ``value`` is NaN or infinite."""
    if not np.isfinite(value):
        raise TrainingDiverged(
            f"training diverged: the BCE loss is {value} at epoch {epoch}, step {step} (lr {lr:g}); "
            "this step was not applied and this epoch is not checkpointed; lower the learning rate (lr)"
        )


def bce_step(
    raw: Any,
    optimizer: Any,
    out: Any,
    labels: Any,
    config: StepSettings,
    *,
    epoch: int,
    step: int,
    emits: str = "logits",
) -> float:
    """One optimizer step on a batch's model output ``out`` [B]: BCE(out, y) + l2_emb ·
    Σ‖E‖² (every embedding table E of ``raw``), then Adam. ``emits`` "logits" uses
    BCE-with-logits, "probs" plain BCE on ŷ clipped to [1e-7, 1 - 1e-7] (deepctr-torch
    models). Returns the batch's mean BCE.

    Raises :class:`TrainingDiverged` on a non-finite loss before the step updates the
    weights; the check reuses the loss value the caller needs anyway (one host sync)."""
    import torch.nn.functional as F

    from umair.model.fusion import l2_embedding_penalty

    if emits == "logits":
        bce = F.binary_cross_entropy_with_logits(out, labels)
    else:
        bce = F.binary_cross_entropy(out.clamp(1e-7, 1.0 - 1e-7), labels)
    loss = bce + config.l2_emb * l2_embedding_penalty(raw).to(bce.device) if config.l2_emb else bce
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    value = float(bce.detach())
    check_finite_loss(value, epoch=epoch, step=step, lr=config.lr)
    optimizer.step()
    return value


def check_finite_weights(raw: Any, *, epoch: int, step: int, lr: float) -> None:
    """Raise :class:`TrainingDiverged` when any weight of ``raw`` is NaN or infinite."""
    import torch

    with torch.no_grad():
        finite = bool(torch.stack([torch.isfinite(p).all() for p in raw.parameters()]).all())
    if not finite:
        raise TrainingDiverged(
            f"training diverged: weights are NaN or infinite after epoch {epoch}, step {step} (lr {lr:g}); "
            "this epoch is not checkpointed; lower the learning rate (lr)"
        )


def train_epoch(
    model: Any,
    raw: Any,
    optimizer: Any,
    batches: Any,
    lookup: Lookup,
    config: StepSettings,
    epoch: int = 0,
) -> Any:
    """One pass over this worker's batches (dicts of ``user_row``, ``item_row``, ``ts``,
    ``label`` tensors), each a :func:`bce_step` on ``model(lookup.packed(u, i),
    lookup.row_vectors(u, i, ts))`` (``model`` may be the DDP wrapper of ``raw``; a model with
    a user history reads the user's interactions strictly before ``ts``, :mod:`umair.model.history`). Returns [Σ BCE·n, n] of this worker (float64 tensor). A diverged model raises :class:`TrainingDiverged` and is never
    checkpointed (:func:`bce_step`, then :func:`check_finite_weights` at the end)."""
    import torch

    model.train()
    lookup.pack_for(raw)
    sums = torch.zeros(2, dtype=torch.float64)
    step = -1
    for step, batch in enumerate(batches):
        u, i = batch["user_row"], batch["item_row"]
        logits = model(lookup.packed(u, i), lookup.row_vectors(u, i, batch.get("ts")))
        value = bce_step(raw, optimizer, logits, batch["label"], config, epoch=epoch, step=step)
        sums += torch.tensor([value * len(logits), len(logits)], dtype=torch.float64)
    check_finite_weights(raw, epoch=epoch, step=step, lr=config.lr)
    return sums


@dataclass
class EpochSelection:
    """Best-validation-AUC epoch selection with early stopping (``umair train``, each
    ``umair tune`` trial, :func:`umair.training.local.fit_local`).

    After every epoch :meth:`update` gets that epoch's ``val_auc``; the best epoch is
    the one with the highest (the first on ties), and :attr:`stop` turns True once
    ``patience`` epochs in a row brought no improvement (never with ``patience`` None)."""

    patience: int | None = None
    best_epoch: int | None = None
    best_auc: float = float("-inf")
    last_epoch: int | None = None

    def update(self, epoch: int, val_auc: float) -> bool:
        """Record epoch ``epoch``'s validation AUC; True when it is the new best."""
        self.last_epoch = epoch
        if np.isfinite(val_auc) and val_auc > self.best_auc:
            self.best_epoch, self.best_auc = epoch, float(val_auc)
            return True
        return False

    @property
    def stop(self) -> bool:
        """True when ``patience`` epochs have passed since the best one."""
        if self.patience is None or self.last_epoch is None:
            return False
        since = self.last_epoch - (self.best_epoch if self.best_epoch is not None else -1)
        return since >= self.patience

    @classmethod
    def replay(cls, history: list[dict[str, float]], patience: int | None, key: str = "val_auc") -> EpochSelection:
        """The selection state after the epochs of ``history`` (a resumed run's checkpoint)."""
        out = cls(patience)
        for h in history:
            if key in h:
                out.update(int(h["epoch"]), float(h[key]))
        return out

    def metrics(self) -> dict[str, float]:
        """``best_epoch`` and ``best_val_auc`` so far, for the per-epoch report."""
        if self.best_epoch is None:
            return {}
        return {"best_epoch": float(self.best_epoch), "best_val_auc": self.best_auc}
