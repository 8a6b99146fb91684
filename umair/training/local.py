"""The fusion model trained in this process (no Ray): the training job's inputs
(:func:`umair.training.inputs.prepare`), lookup tables, user history and epoch step
(:func:`umair.training.step.train_epoch`), with seeded per-epoch shuffles instead of Ray
Data's. Used where starting Ray Train costs more than the training: the demo's ablation
rows (``w/o STY``, DCN-V2-only), ``bench/style_effect.py`` and the slow style-effect test.

    prepared = prepare(TrainConfig(world=..., item_features=...))
    fitted = fit_local(prepared, prepared.model_config, LocalRecipe(epochs=8))
    scores = score_rows(fitted.model, fitted.lookup, *rows_of_window(prepared.test_rows))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from umair.model.settings import ModelConfig
from umair.training.inputs import Prepared
from umair.training.lookup import Lookup, fit_history, load_lookup
from umair.training.step import StepSettings, train_epoch


@dataclass(frozen=True)
class LocalRecipe:
    """Epochs, rows per step, Adam lr, L2 on the embeddings, seed, torch threads."""

    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    l2_emb: float = 1e-3
    seed: int = 0
    threads: int = 1


@dataclass
class Fitted:
    """A model trained by :func:`fit_local`, its lookup tables and per-epoch mean BCE."""

    model: Any
    lookup: Lookup
    epoch_loss: list[float]


def rows_of_window(rows: Any) -> tuple[Any, Any, np.ndarray]:
    """``(user_row, item_row)`` int64 tensors and the labels of a window's rows table."""
    import torch

    u = torch.as_tensor(rows.column("user_row").to_numpy().astype(np.int64))
    i = torch.as_tensor(rows.column("item_row").to_numpy().astype(np.int64))
    return u, i, rows.column("label").to_numpy().astype(np.float32)


def fit_local(
    prepared: Prepared,
    config: ModelConfig,
    recipe: LocalRecipe,
    lookup: Lookup | None = None,
    leave_one_out: bool = True,
) -> Fitted:
    """Train :class:`UmairFPS` (``config``: the prepared one or a Table-4 / DCN-V2-only
    change of it) on ``prepared.train_rows``; its user history, if any, is fitted on the
    same rows first. ``lookup``: reuse the tables of an earlier call (same ``prepared``)."""
    import torch

    from umair.model.fusion import UmairFPS

    torch.set_num_threads(recipe.threads)
    if lookup is None:
        lookup, _, _ = load_lookup(prepared.space, prepared.inputs, prepared.modalities, "cpu")
    torch.manual_seed(recipe.seed)
    model = UmairFPS(config)
    u, i, y = rows_of_window(prepared.train_rows)
    fit_history(model, lookup, u, i, y)
    labels = torch.as_tensor(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    gen = torch.Generator().manual_seed(recipe.seed)
    step = StepSettings(lr=recipe.lr, l2_emb=recipe.l2_emb)
    losses = []
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(u), generator=gen).split(recipe.batch_size)
        batches = ({"user_row": u[b], "item_row": i[b], "label": labels[b]} for b in order)
        sums = train_epoch(model, model, optimizer, batches, lookup, step, epoch, leave_one_out)
        losses.append(float(sums[0] / max(float(sums[1]), 1.0)))
    model.eval()
    return Fitted(model, lookup, losses)
