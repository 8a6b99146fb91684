"""The user and item tables as tensors on one device, gathered by row per batch."""

from __future__ import annotations

from typing import Any

import numpy as np

from umair import contracts, storage
from umair.model.features import (
    FeatureError,
    FeatureSpace,
    ItemTable,
    UserTable,
    build_item_table,
    ids_fingerprint,
)
from umair.training.inputs import Inputs, read_item_features


class Lookup:
    """The user and item tables as tensors on one device; gathers model inputs by row."""

    def __init__(self, users: UserTable, items: ItemTable, modalities: list[str], device: Any):
        import torch

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(a), device=device)

        self.uid, self.tags, self.ufields = t(users.uid), t(users.tags), t(users.fields)
        self.ifields = t(items.fields)
        self.vectors = {m: t(items.vectors[m]) for m in modalities}

    def inputs(self, user_row: Any, item_row: Any) -> dict[str, Any]:
        """Keyword arguments of :meth:`UmairFPS.forward` for the given rows."""
        out = {
            "user_id": self.uid[user_row],
            "user_tags": self.tags[user_row],
            "user_fields": self.ufields[user_row],
            "item_fields": self.ifields[item_row],
        }
        out.update({m: v[item_row] for m, v in self.vectors.items()})
        return out


def load_lookup(
    space: FeatureSpace,
    inputs: Inputs,
    modalities: list[str],
    device: Any,
    settings: storage.StorageSettings | None = None,
    features_fingerprint: str | None = None,
    users_fingerprint: str | None = None,
) -> tuple[Lookup, UserTable, ItemTable]:
    """Read users, illustrations and the item features and encode them (once per worker)."""
    users = contracts.read_table(inputs.users, "users", settings)
    if users_fingerprint is not None and ids_fingerprint(users.column("user_id").to_numpy()) != users_fingerprint:
        raise FeatureError(f"{inputs.users}: the users table changed since this run was prepared")
    ill = contracts.read_table(inputs.illustrations, "illustrations", settings)
    features = read_item_features(inputs, settings, columns=["illust_id", *modalities])
    user_table = space.encode_users(users)
    item_table = build_item_table(features, ill, space, modalities, features_fingerprint, inputs.item_features)
    return Lookup(user_table, item_table, modalities, device), user_table, item_table
