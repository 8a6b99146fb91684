"""Per-row model inputs of one time window, shared by every compared model.

The training job gathers inputs per batch from user / item lookup tables; a comparison
of many models instead gathers them once per window, so that each model reads exactly
the same tensors in the same order. A row holds, as :class:`~umair.model.fusion.UmairFPS`
names them:

=============  ==============  ============================================
user_id        [N] int64       user-id index (0 = out of vocabulary)
user_tags      [N, T] int64    u^IL interest-tag indices, 0-padded
user_fields    [N, P] int64    u^O profile-field indices
item_fields    [N, M] int64    i^O metadata indices (buckets, ids, categoricals)
user_bags[b]   [N, L] int64    each user bag field (list<string> column), 0-padded
item_bags[b]   [N, L] int64    each item bag field (genres, cast...), 0-padded; only
                               UmairFPS reads the bags
vectors[m]     [N, d_m] f32    each modality (e_SEM, e_STY, e_TSEM...), standardised like training
labels         [N] float32     1 = bookmarked
users          [N] int64       the raw user ids (GAUC, per-segment metrics)
=============  ==============  ============================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from umair import modalities as registry

ID_KEYS = ("user_id", "user_tags", "user_fields", "item_fields")


@dataclass(frozen=True, eq=False)
class RowInputs:
    """The inputs of N interaction rows (see the module docstring)."""

    user_id: Tensor
    user_tags: Tensor
    user_fields: Tensor
    item_fields: Tensor
    labels: Tensor
    users: np.ndarray
    vectors: dict[str, Tensor] = field(default_factory=dict)
    user_field_names: tuple[str, ...] = ()
    item_field_names: tuple[str, ...] = ()
    user_bags: dict[str, Tensor] = field(default_factory=dict)
    item_bags: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.labels)
        shapes = {
            "user_id": self.user_id,
            "user_tags": self.user_tags,
            "user_fields": self.user_fields,
            "item_fields": self.item_fields,
            **self.vectors,
            **{f"user_bags[{b!r}]": t for b, t in self.user_bags.items()},
            **{f"item_bags[{b!r}]": t for b, t in self.item_bags.items()},
        }
        for name, t in shapes.items():
            if t.shape[0] != n:
                raise ValueError(f"RowInputs: {name} has {t.shape[0]} rows, labels {n}")
        if len(self.users) != n:
            raise ValueError(f"RowInputs: users has {len(self.users)} rows, labels {n}")
        if self.user_fields.dim() != 2 or self.user_fields.shape[1] != len(self.user_field_names):
            raise ValueError(
                f"RowInputs: user_fields is {list(self.user_fields.shape)}, "
                f"expected [N, {len(self.user_field_names)}] for {list(self.user_field_names)}"
            )
        if self.item_fields.dim() != 2 or self.item_fields.shape[1] != len(self.item_field_names):
            raise ValueError(
                f"RowInputs: item_fields is {list(self.item_fields.shape)}, "
                f"expected [N, {len(self.item_field_names)}] for {list(self.item_field_names)}"
            )
        unknown = sorted(set(self.vectors) - set(registry.names()))
        if unknown:
            raise ValueError(f"RowInputs: unknown vector columns {unknown}; expected some of {list(registry.names())}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dims(self) -> dict[str, int]:
        """Width of each dense vector: ``{"sem": d_sem, ...}``."""
        return {m: int(v.shape[1]) for m, v in self.vectors.items()}

    def ids(self) -> dict[str, Tensor]:
        """``user_id``, ``user_tags``, ``user_fields``, ``item_fields`` of every row."""
        return {
            "user_id": self.user_id,
            "user_tags": self.user_tags,
            "user_fields": self.user_fields,
            "item_fields": self.item_fields,
        }

    @classmethod
    def from_tensors(
        cls,
        kwargs: Mapping[str, Tensor],
        vectors: Mapping[str, Tensor],
        labels: np.ndarray | Tensor,
        users: np.ndarray,
        user_field_names: Sequence[str],
        item_field_names: Sequence[str],
    ) -> RowInputs:
        """From the id tensors ``kwargs`` (``user_id``, ``user_tags``, ``user_fields``,
        ``item_fields``) and the item ``vectors`` of the rows (e.g. what the training job's
        lookup gathers); vectors become float32."""
        missing = [k for k in ID_KEYS if k not in kwargs]
        if missing:
            raise ValueError(f"RowInputs.from_kwargs: missing {missing}")
        return cls(
            user_id=torch.as_tensor(kwargs["user_id"]).long().contiguous(),
            user_tags=torch.as_tensor(kwargs["user_tags"]).long().contiguous(),
            user_fields=torch.as_tensor(kwargs["user_fields"]).long().contiguous(),
            item_fields=torch.as_tensor(kwargs["item_fields"]).long().contiguous(),
            labels=torch.as_tensor(np.asarray(labels), dtype=torch.float32),
            users=np.asarray(users),
            vectors={m: torch.as_tensor(v).float().contiguous() for m, v in vectors.items()},
            user_field_names=tuple(user_field_names),
            item_field_names=tuple(item_field_names),
            user_bags={b: torch.as_tensor(t).long().contiguous() for b, t in kwargs.get("user_bags", {}).items()},
            item_bags={b: torch.as_tensor(t).long().contiguous() for b, t in kwargs.get("item_bags", {}).items()},
        )
