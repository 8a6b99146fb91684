"""The fusion model trained in this process (no Ray): the training job's inputs
(:func:`umair.training.inputs.prepare`), lookup tables, user history and epoch step
(:func:`umair.training.step.train_epoch`), with seeded per-epoch shuffles instead of Ray
Data's. Used where starting Ray Train costs more than the training: the demo's ablation
rows (``w/o STY``, DCN-V2-only), ``bench/style_effect.py`` and the slow style-effect test.
With a validation window (``prepared.val_rows``) it follows ``umair train``'s protocol:
``val_auc`` after every epoch, the best epoch's weights kept, ``patience`` early stop.

    prepared = prepare(TrainConfig(world=..., item_features=...))
    fitted = fit_local(prepared, prepared.model_config, LocalRecipe(epochs=8))
    u, i, y, ts = rows_of_window(prepared.test_rows)
    scores = score_rows(fitted.model, fitted.lookup, u, i, ts=ts)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from umair.model.settings import ModelConfig
from umair.training.inputs import Prepared
from umair.training.lookup import Lookup, load_lookup
from umair.training.scoring import collapse_warning, window_scores
from umair.training.step import EpochSelection, StepSettings, train_epoch

log = logging.getLogger("umair")


@dataclass(frozen=True)
class LocalRecipe:
    """Epochs, rows per step, Adam lr, L2 on the embeddings, seed, torch threads, and
    ``patience`` (epochs without a better ``val_auc`` before stopping; None: all epochs)."""

    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    l2_emb: float = 1e-3
    seed: int = 0
    threads: int = 1
    patience: int | None = None


@dataclass
class Fitted:
    """A model trained by :func:`fit_local` (the best-``val_auc`` epoch's weights with a
    validation window, else the last epoch's), its lookup tables, per-epoch mean BCE, and
    per epoch ``{"epoch", "train_loss", "val_auc", "val_logloss", ...}`` in ``history``."""

    model: Any
    lookup: Lookup
    epoch_loss: list[float]
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    val_auc: float | None = None


def rows_of_window(rows: Any) -> tuple[Any, Any, np.ndarray, Any]:
    """``(user_row, item_row)`` int64 tensors, the labels and the ``ts`` int64 tensor (where
    a user history is cut) of a window's rows table."""
    import torch

    def col(name: str) -> Any:
        return torch.as_tensor(rows.column(name).to_numpy().astype(np.int64))

    return col("user_row"), col("item_row"), rows.column("label").to_numpy().astype(np.float32), col("ts")


def fit_local(
    prepared: Prepared,
    config: ModelConfig,
    recipe: LocalRecipe,
    lookup: Lookup | None = None,
) -> Fitted:
    """Train :class:`UmairFPS` (``config``: the prepared one or a Table-4 / DCN-V2-only
    change of it) on ``prepared.train_rows`` (a user history, if any, reads the interactions
    before each row, :mod:`umair.model.history`). With ``prepared.val_rows`` every epoch is scored on the validation
    window and the best one's weights are returned (early stop after ``recipe.patience``
    epochs without improvement). ``lookup``: reuse the tables of an earlier call (same
    ``prepared``)."""
    import copy

    import torch

    from umair.model.fusion import UmairFPS

    torch.set_num_threads(recipe.threads)
    if lookup is None:
        lookup, _, _ = load_lookup(prepared.space, prepared.inputs, prepared.modalities, "cpu")
    torch.manual_seed(recipe.seed)
    model = UmairFPS(config)
    u, i, y, ts = rows_of_window(prepared.train_rows)
    labels = torch.as_tensor(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    gen = torch.Generator().manual_seed(recipe.seed)
    step = StepSettings(lr=recipe.lr, l2_emb=recipe.l2_emb)
    val = prepared.val_rows
    val_cols = [val.column(c).to_numpy() for c in ("user_row", "item_row", "label")] if val is not None else None
    val_ts = val.column("ts").to_numpy() if val is not None else None
    selection = EpochSelection(recipe.patience if val is not None else None)
    losses: list[float] = []
    history: list[dict[str, float]] = []
    best_state = None
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(u), generator=gen).split(recipe.batch_size)
        batches = ({"user_row": u[b], "item_row": i[b], "ts": ts[b], "label": labels[b]} for b in order)
        sums = train_epoch(model, model, optimizer, batches, lookup, step, epoch)
        losses.append(float(sums[0] / max(float(sums[1]), 1.0)))
        metrics = {"epoch": float(epoch), "train_loss": losses[-1]}
        if val_cols is not None:
            metrics.update(window_scores(model, lookup, *val_cols, "val", ts=val_ts))
            if warning := collapse_warning(metrics, "val"):
                log.warning("epoch %d: %s", epoch, warning)
            if selection.update(epoch, metrics["val_auc"]):
                best_state = copy.deepcopy(model.state_dict())
        history.append(metrics)
        if selection.stop:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    best = selection.best_epoch if val_cols is not None else len(losses) - 1
    return Fitted(model, lookup, losses, history, best, selection.best_auc if val_cols is not None else None)
