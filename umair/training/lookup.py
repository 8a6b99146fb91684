"""The user and item tables as tensors on one device, gathered by row per batch.

Item vectors (e_SEM, e_STY, e_TSEM) are held as float16 (standardised in float32 first,
:func:`umair.model.item_features.build_item_table`) and become float32 only per batch
(:meth:`Lookup.item_vectors`). A training job builds the tables once on its driver
(:func:`shared_tables`) and puts them in the Ray object store; every worker of a node
then reads the same read-only buffers, wrapped as tensors without a copy (on a GPU
worker: one device copy each)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from umair import contracts, storage
from umair.errors import FeatureError
from umair.model.features import FeatureSpace, ItemTable, UserTable
from umair.model.interactions import rows_of
from umair.model.item_features import build_item_table, ids_fingerprint
from umair.training.inputs import Inputs, Prepared, read_item_features

if TYPE_CHECKING:
    from umair.model.history import SortedLog


class ItemVectors(dict):
    """``vectors[m]`` [B, d_m] of a batch of items (a plain mapping, what
    :class:`~umair.model.fusion.UmairFPS` reads), plus ``present[m]`` [B] bool for each
    modality some item lacks (no image: no e_SEM / e_STY; its vector row holds zeros).
    A modality without an entry in ``present`` is present in every row; UMCM gives an
    absent modality α = 0."""

    def __init__(self, vectors: dict[str, Any], present: dict[str, Any] | None = None):
        super().__init__(vectors)
        self.present: dict[str, Any] = dict(present or {})


class Lookup:
    """The user and item tables as tensors on one device.

    The model reads ids packed into rows of its fused embedding table
    (:meth:`UmairFPS.pack_ids`): :meth:`pack_for` packs every user's ids ([U, 1 + T + P +
    U_b·L]: id, tags with their padding dropped, profile fields, user bags) and every item's
    ([I, M + I_b·L]: fields, item bags such as genres) once, so a training or scoring step
    only gathers two row blocks (:meth:`packed`) and the item vectors (:meth:`item_vectors`).
    :meth:`ids` gives the unpacked id tensors of some rows (the comparison models of
    ``umair ablate`` read those)."""

    def __init__(
        self, users: UserTable, items: ItemTable, modalities: list[str], device: Any, log: SortedLog | None = None
    ):
        """``users`` / ``items`` arrays may be read-only (views of the Ray object store's
        buffer, shared by the workers of a node): on the CPU the tensors share their
        memory, so no tensor of a Lookup is ever written in place. ``log``: the real
        interactions the user history reads (:mod:`umair.model.history`; None: no history)."""
        import torch

        from umair.model.history import InteractionLog, shared_tensor

        def t(a: np.ndarray) -> torch.Tensor:
            return shared_tensor(a, device)

        self.device = torch.device(device) if isinstance(device, str) else device
        self.uid, self.tags, self.ufields = t(users.uid), t(users.tags), t(users.fields)
        self.ifields = t(items.fields)
        self.ubags = {name: t(a) for name, a in users.bags.items()}  # [U, L] each
        self.ibags = {name: t(a) for name, a in items.bags.items()}  # [I, L] each
        self.vectors = {m: t(items.vectors[m]) for m in modalities}
        # masks only for modalities some item lacks: with every vector present nothing changes
        self.present = {m: t(items.presence(m)) for m in modalities if not items.presence(m).all()}
        self.log = InteractionLog(log, self.device) if log is not None else None
        self._history_len = 0  # K of the packed model's history (0: it reads none)
        self._packed_for: int | None = None
        self._user_packed: Any = None
        self._item_packed: Any = None

    def ids(self, user_row: Any, item_row: Any) -> dict[str, Any]:
        """``user_id`` [B], ``user_tags`` [B, T], ``user_fields`` [B, P], ``item_fields`` [B, M],
        ``user_bags[name]`` / ``item_bags[name]`` [B, L] of the rows (the keywords of
        :meth:`UmairFPS.pack_ids`)."""
        return {
            "user_id": self.uid[user_row],
            "user_tags": self.tags[user_row],
            "user_fields": self.ufields[user_row],
            "item_fields": self.ifields[item_row],
            "user_bags": {name: b[user_row] for name, b in self.ubags.items()},
            "item_bags": {name: b[item_row] for name, b in self.ibags.items()},
        }

    def pack_for(self, model: Any) -> None:
        """Pack the user and item tables' ids for ``model`` (an :class:`UmairFPS`), once per model."""
        import torch

        if self._packed_for == id(model):
            return
        n_users, n_items, m = len(self.uid), len(self.ifields), self.ifields.shape[1]
        cfg = model.cfg
        for side, names, got in (("user", cfg.user_bags, self.ubags), ("item", cfg.item_bags, self.ibags)):
            missing = [name for name in names if name not in got]
            if missing:
                raise FeatureError(
                    f"the model embeds {side} bag(s) {missing} but the {side} table carries only {list(got)}; "
                    f"encode the table with the model's feature space"
                )

        def zeros(n: int, width: int) -> torch.Tensor:
            return torch.zeros(n, width, dtype=torch.long, device=self.device)

        cols = model.layout.item_columns  # M + item bags · L: the item part of a packed row
        with torch.no_grad():
            up = model.pack_ids(
                self.uid,
                self.tags,
                self.ufields,
                zeros(n_users, m),
                drop_tag_padding=n_users > 0,
                user_bags={name: self.ubags[name] for name in cfg.user_bags},
                item_bags={name: zeros(n_users, 1) for name in cfg.item_bags},
            )
            ip = model.pack_ids(
                zeros(n_items, 1).view(-1),
                zeros(n_items, 1),
                zeros(n_items, self.ufields.shape[1]),
                self.ifields,
                user_bags={name: zeros(n_items, 1) for name in cfg.user_bags},
                item_bags={name: self.ibags[name] for name in cfg.item_bags},
            )
        self._user_packed, self._item_packed = up[:, : up.shape[1] - cols], ip[:, ip.shape[1] - cols :]
        self._history_len = cfg.history_len if cfg.user_history else 0
        if self._history_len and self.log is None:
            raise FeatureError(
                "the model reads the user's history (user_history) but no interactions were loaded for it"
            )
        self._packed_for = id(model)

    def packed(self, user_row: Any, item_row: Any) -> Any:
        """The packed ids [B, 1 + T + P + U_b·L + M + I_b·L] of the rows (after :meth:`pack_for`)."""
        import torch

        if self._user_packed is None:
            raise RuntimeError("Lookup.packed: call pack_for(model) first")
        return torch.cat([self._user_packed[user_row], self._item_packed[item_row]], dim=1)

    def item_vectors(self, item_row: Any) -> ItemVectors:
        """``vectors[m]`` [B, d_m] float32 of the items (gathered from the float16 table,
        then converted on its device), for every modality loaded, with the presence masks
        ``.present[m]`` [B] bool of the modalities some item lacks."""
        return ItemVectors(
            {m: v[item_row].float() for m, v in self.vectors.items()}, {m: p[item_row] for m, p in self.present.items()}
        )

    def row_vectors(self, user_row: Any, item_row: Any, ts: Any = None) -> ItemVectors:
        """:meth:`item_vectors` of the rows' items plus, for a packed model with a user history,
        ``.history``: each row's h⁺_m / h⁻_m from the interactions strictly before ``ts`` [B]
        int64 (the log's unit; None: the whole log, "now"), :func:`umair.model.history.history_means`."""
        from umair.model.history import history_means

        out = self.item_vectors(item_row)
        if self._history_len and self.log is not None:
            out.history = history_means(self.log, self.vectors, self.present, user_row, ts, self._history_len)
        return out

    def item_tensors(self) -> list[Any]:
        """Every item-side table (vectors, presence masks, fields, bags): what grows with the catalogue."""
        return [*self.vectors.values(), *self.present.values(), self.ifields, *self.ibags.values()]

    def shared_tensors(self) -> list[Any]:
        """:meth:`item_tensors` and the interaction log's (what grows with the interactions):
        every tensor a worker maps from the node's one copy."""
        return [*self.item_tensors(), *(self.log.tensors() if self.log is not None else [])]


def log_arrays(interactions: Any, user_ids: np.ndarray, item_ids: np.ndarray) -> SortedLog:
    """The :class:`~umair.model.history.SortedLog` of an interactions table (``user_id``,
    ``illust_id``, ``ts``, ``label``) against the user and item tables' ids; rows of users
    or items the tables lack are left out (a history only averages items the model has
    vectors for)."""
    import pyarrow as pa

    from umair.model.history import SortedLog

    u = rows_of(np.asarray(user_ids, np.int64), interactions.column("user_id").to_numpy())
    i = rows_of(np.asarray(item_ids, np.int64), interactions.column("illust_id").to_numpy())
    keep = (u >= 0) & (i >= 0)
    ts = interactions.column("ts").cast(pa.int64()).to_numpy()
    label = interactions.column("label").to_numpy().astype(np.float32)
    return SortedLog.build(u[keep], ts[keep], i[keep], label[keep])


def read_log(
    uri: str, users: UserTable, items: ItemTable, settings: storage.StorageSettings | None = None
) -> SortedLog:
    """:func:`log_arrays` of the interactions table at ``uri`` (checked against its contract)."""
    table = contracts.read_table(uri, "interactions", settings)
    return log_arrays(table.select(["user_id", "illust_id", "ts", "label"]), users.user_ids, items.illust_ids)


@dataclass(frozen=True, eq=False)
class SharedTables:
    """What every training worker reads, built once by the driver and put in the Ray
    object store: the encoded users, the items (float16 standardised vectors, fields,
    bags, presence masks) and the interaction log of the user history (None without one).
    Plain numpy arrays, so a worker's ``ray.get`` maps them read-only without a copy."""

    users: UserTable
    items: ItemTable
    log: SortedLog | None = None

    def lookup(self, modalities: list[str], device: Any) -> Lookup:
        return Lookup(self.users, self.items, modalities, device, self.log)


def load_tables(
    space: FeatureSpace,
    inputs: Inputs,
    modalities: list[str],
    settings: storage.StorageSettings | None = None,
    features_fingerprint: str | None = None,
    users_fingerprint: str | None = None,
    dtype: np.dtype | type = np.float16,
) -> tuple[UserTable, ItemTable]:
    """Read users, illustrations and the item features and encode them: the user table
    and the item table (vectors standardised, stored as ``dtype``)."""
    users = contracts.read_table(inputs.users, "users", settings)
    if users_fingerprint is not None and ids_fingerprint(users.column("user_id").to_numpy()) != users_fingerprint:
        raise FeatureError(f"{inputs.users}: the users table changed since this run was prepared")
    ill = contracts.read_table(inputs.illustrations, "illustrations", settings)
    features = read_item_features(inputs, settings, columns=["illust_id", *modalities])
    user_table = space.encode_users(users)
    item_table = build_item_table(features, ill, space, modalities, features_fingerprint, inputs.item_features, dtype)
    del features
    if space.item_bags and not item_table.bags:  # the item bags (genres...) in item-row order
        item_table = replace(item_table, bags=space.encode_item_bags(ill, item_table.illust_ids))
    return user_table, item_table


def load_lookup(
    space: FeatureSpace,
    inputs: Inputs,
    modalities: list[str],
    device: Any,
    settings: storage.StorageSettings | None = None,
    features_fingerprint: str | None = None,
    users_fingerprint: str | None = None,
    dtype: np.dtype | type = np.float16,
    with_log: bool = True,
    interactions: Any = None,
) -> tuple[Lookup, UserTable, ItemTable]:
    """:func:`load_tables` and their :class:`Lookup` on ``device`` (one process's own copy),
    with the interaction log (unless ``with_log`` is False) of ``interactions`` (the table
    the caller already read) or else of ``inputs.interactions`` (:func:`read_log`)."""
    user_table, item_table = load_tables(
        space, inputs, modalities, settings, features_fingerprint, users_fingerprint, dtype
    )
    log = None
    if with_log and interactions is not None:
        log = log_arrays(interactions, user_table.user_ids, item_table.illust_ids)
    elif with_log:
        log = read_log(inputs.interactions, user_table, item_table, settings)
    return Lookup(user_table, item_table, modalities, device, log), user_table, item_table


def shared_tables(prepared: Prepared, settings: storage.StorageSettings | None = None) -> SharedTables:
    """The :class:`SharedTables` of a prepared training run (read and encoded once, on the
    driver): users, items (float16 vectors standardised with the training window's
    statistics) and, for a model with a user history, the interaction log (every window:
    a row only ever reads the interactions strictly before it)."""
    users, items = load_tables(
        prepared.space,
        prepared.inputs,
        prepared.modalities,
        settings,
        prepared.info.fingerprint,
        prepared.users_fingerprint,
    )
    mc = prepared.model_config
    log = read_log(prepared.inputs.interactions, users, items, settings) if mc.user_history else None
    return SharedTables(users, items, log)
