"""One interface over every compared model: encode a window once, score rows by index.

A :class:`Ranker` wraps an ``nn.Module``. :meth:`Ranker.encode` turns a window's
:class:`~umair.baselines.inputs.RowInputs` into whatever the module reads (done once,
outside any timing, like a data loader's materialised arrays); :meth:`Ranker.forward`
scores the rows ``idx`` of that encoding and returns logits or probabilities
(:attr:`Ranker.emits`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import torch
from torch import Tensor, nn

from umair.baselines.inputs import RowInputs
from umair.model.fusion import UmairFPS, count_parameters
from umair.model.settings import ModelConfig


class Ranker(ABC):
    """A model under comparison: ``name``, its ``module`` and what it emits."""

    name: str
    module: nn.Module
    emits: Literal["logits", "probs"]

    @abstractmethod
    def encode(self, rows: RowInputs) -> Any:
        """The module's view of ``rows`` (computed once per window)."""

    @abstractmethod
    def forward(self, encoded: Any, idx: Tensor) -> Tensor:
        """Scores [B] of rows ``idx`` of ``encoded`` (logits or probabilities)."""

    def probabilities(self, encoded: Any, idx: Tensor) -> Tensor:
        """ŷ = σ(logit) of rows ``idx`` in [0, 1]."""
        out = self.forward(encoded, idx)
        return torch.sigmoid(out) if self.emits == "logits" else out

    @property
    def parameters(self) -> int:
        """Scalar parameters (every embedding row counted, like the paper's tables)."""
        return count_parameters(self.module)


def _take(kwargs: dict[str, Tensor], idx: Tensor) -> dict[str, Tensor]:
    return {k: v[idx] for k, v in kwargs.items()}


class FusionRanker(Ranker):
    """This project's :class:`UmairFPS` (any Table-4 variant); emits logits. The rows of
    ``umair ablate`` are (user, item) pairs without a time, so its variants read no user
    history (``user_history`` off: every model of the table sees the same inputs)."""

    emits = "logits"

    def __init__(self, name: str, config: ModelConfig, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.name = name
        config = config.model_copy(update={"user_history": False})
        self.config = config
        self.module = UmairFPS(config)

    def encode(self, rows: RowInputs) -> dict[str, Tensor]:
        """The ids packed once into the model's fused-table rows (:meth:`UmairFPS.pack_ids`,
        which also checks every id against its vocabulary; tag columns that are padding
        in every row of the window are dropped) plus the vectors it reads."""
        used = list(self.config.vector_names)
        missing = [m for m in used if m not in rows.vectors]
        if missing:
            raise ValueError(f"{self.name}: the rows hold no {missing} vectors, which this variant reads")
        module: UmairFPS = self.module  # type: ignore[assignment]
        with torch.no_grad():
            packed = module.pack_ids(
                rows.user_id,
                rows.user_tags,
                rows.user_fields,
                rows.item_fields,
                drop_tag_padding=True,
                user_bags=rows.user_bags,
                item_bags=rows.item_bags,
            )
        return {"packed": packed, "vectors": {m: rows.vectors[m] for m in used}}

    def forward(self, encoded: dict[str, Any], idx: Tensor) -> Tensor:
        return self.module(encoded["packed"][idx], _take(encoded["vectors"], idx))
