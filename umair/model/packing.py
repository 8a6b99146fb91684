"""How :class:`~umair.model.fusion.UmairFPS`'s id inputs become rows of its one fused
embedding table, and how those rows are pooled into the raw features.

The fused table ``embeddings`` [Σ vocab, k] holds one block of rows per id table, in order:
user id, interest tags u^IL, each profile field u^O_f, each user bag, each item field
i^O_f, each item bag (a bag field: a list<string> column such as genres, cast or keywords,
:class:`umair.model.features.FeatureSettings` ``item_bags`` / ``user_bags``). Packed ids
[B, C] (:meth:`PackLayout.pack`; what :meth:`UmairFPS.forward` reads) hold, per row, the
row of each id in that table, columns in the order::

    user id (1) | tags (T) | profile fields (P) | user bags (L each) | item fields (M) | item bags (L each)

with ``L`` = ``ModelConfig.max_bag``. The user part comes first, the item part
(:attr:`PackLayout.item_columns` = M + L · #item bags columns) last, so user and item
tables can be packed apart and their rows concatenated (:mod:`umair.training.lookup`).
Only ``T`` varies between packings (``drop_tag_padding``); the other widths are fixed by
the config, so the layout of a packed matrix follows from its width.

Pooling (:meth:`PackLayout.embed`): the user id and each field are one-id bags of weight 1;
the tags and each bag field are mean-pooled over their non-padding ids (id 0 is padding;
an all-padding bag pools to the zero vector): raw [B, (2 + P + U + M + I) k].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from umair.model.settings import ITEM_ID_FIELD, ModelConfig


class PackLayout:
    """The fused table's blocks and the packed column layout of one :class:`ModelConfig`."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.bag_len = cfg.max_bag
        self.sizes = [
            cfg.n_users,
            cfg.n_tags,
            *cfg.user_fields.values(),
            *cfg.user_bags.values(),
            *cfg.item_fields.values(),
            *cfg.item_bags.values(),
        ]
        self.starts = [0]
        for n in self.sizes[:-1]:
            self.starts.append(self.starts[-1] + n)
        p, u, m = len(cfg.user_fields), len(cfg.user_bags), len(cfg.item_fields)
        # table index of each field / bag in the fused table's block list
        self._user_field_tables = list(range(2, 2 + p))
        self._user_bag_tables = list(range(2 + p, 2 + p + u))
        self._item_field_tables = list(range(2 + p + u, 2 + p + u + m))
        self._item_bag_tables = list(range(2 + p + u + m, len(self.sizes)))
        self.item_columns = m + len(cfg.item_bags) * self.bag_len
        self.fixed_columns = 1 + p + u * self.bag_len + self.item_columns
        self._cache: dict[tuple, Any] = {}  # per-shape index tensors

    @property
    def total_rows(self) -> int:
        return sum(self.sizes)

    def bag_blocks(self) -> list[int]:
        """First row of every bag field's block (its padding row, id 0)."""
        return [self.starts[t] for t in (*self._user_bag_tables, *self._item_bag_tables)]

    def n_tags(self, width: int) -> int:
        """T of a packed matrix ``width`` columns wide."""
        t = width - self.fixed_columns
        if t < 0:
            raise ValueError(f"packed ids: {width} columns, expected at least {self.fixed_columns} for this config")
        return t

    def segments(self, n_tags: int) -> list[tuple[int, int, int, bool]]:
        """Per pooled bag, in raw-feature order: (first column, width, table, mean-pooled)."""
        out = [(0, 1, 0, False), (1, n_tags, 1, True)]
        col = 1 + n_tags
        for tables, width, mean in (
            (self._user_field_tables, 1, False),
            (self._user_bag_tables, self.bag_len, True),
            (self._item_field_tables, 1, False),
            (self._item_bag_tables, self.bag_len, True),
        ):
            for t in tables:
                out.append((col, width, t, mean))
                col += width
        return out

    def _cached(self, key: tuple, make: Any) -> Any:
        got = self._cache.get(key)
        if got is None:
            if len(self._cache) > 16:
                self._cache.clear()
            got = self._cache[key] = make()
        return got

    def bounds(self, n_tags: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per packed column: the first row of its table and its vocabulary size, [1, C] each."""

        def make() -> tuple[Tensor, Tensor]:
            tables = [t for _, w, t, _ in self.segments(n_tags) for _ in range(w)]
            return (
                torch.tensor([[self.starts[t] for t in tables]], device=device),
                torch.tensor([[self.sizes[t] for t in tables]], device=device),
            )

        return self._cached(("bounds", n_tags, str(device)), make)

    def bag_index(self, b: int, width: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """For ``packed.view(-1)`` of a [b, width] batch: the start of every bag (per row
        the user id, the tags, then one bag per field / bag field), the bag of every id,
        and a [b, width] matrix of ones (the weights of single-id bags)."""

        def make() -> tuple[Tensor, Tensor, Tensor]:
            segs = self.segments(self.n_tags(width))
            per_row = torch.tensor([a for a, _, _, _ in segs], device=device)
            starts = (torch.arange(b, device=device).unsqueeze(1) * width + per_row).reshape(-1)
            col_bag = torch.tensor([j for j, (_, w, _, _) in enumerate(segs) for _ in range(w)], device=device)
            bag_of = (torch.arange(b, device=device).unsqueeze(1) * len(segs) + col_bag).reshape(-1)
            return starts, bag_of, torch.ones(b, width, device=device)

        return self._cached(("bags", b, width, str(device)), make)

    # ---- packing

    @staticmethod
    def _check_fields(n: int, ids: Tensor | None, what: str, batch: int, like: Tensor) -> Tensor:
        if ids is None:
            if n:
                raise ValueError(f"{what}: the config names {n} fields but no tensor was given")
            return like.new_zeros(batch, 0)
        if ids.dim() != 2 or ids.shape[1] != n:
            raise ValueError(f"{what}: expected shape [B, {n}], got {list(ids.shape)}")
        return ids

    def _check_bags(
        self, names: Mapping[str, int], bags: Mapping[str, Tensor] | None, what: str, batch: int
    ) -> list[Tensor]:
        """Each configured bag [B, L_b] (L_b <= L) right-padded with 0 to [B, L]."""
        bags = bags or {}
        missing = [n for n in names if n not in bags]
        unknown = [n for n in bags if n not in names]
        if missing or unknown:
            raise ValueError(
                f"{what}: expected bags {list(names)}, got {list(bags)} (missing {missing}, unknown {unknown})"
            )
        out = []
        for name in names:
            ids = bags[name]
            if ids.dim() != 2 or ids.shape[0] != batch or ids.shape[1] > self.bag_len:
                raise ValueError(
                    f"{what}[{name!r}]: expected shape [B={batch}, L <= {self.bag_len}], got {list(ids.shape)}"
                )
            out.append(F.pad(ids.long(), (0, self.bag_len - ids.shape[1])) if ids.shape[1] < self.bag_len else ids)
        return out

    def pack(
        self,
        user_id: Tensor,
        user_tags: Tensor,
        user_fields: Tensor | None = None,
        item_fields: Tensor | None = None,
        drop_tag_padding: bool = False,
        user_bags: Mapping[str, Tensor] | None = None,
        item_bags: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """The packed ids [B, C] (see the module docstring); what :meth:`UmairFPS.pack_ids` returns."""
        cfg = self.cfg
        b = user_id.shape[0]
        user_tags = user_tags.reshape(b, -1)
        if drop_tag_padding and user_tags.shape[1] > 1 and b:
            user_tags = compact_tags(user_tags)
        uf = self._check_fields(len(cfg.user_fields), user_fields, "user_fields", b, user_id)
        itf = self._check_fields(len(cfg.item_fields), item_fields, "item_fields", b, user_id)
        ub = self._check_bags(cfg.user_bags, user_bags, "user_bags", b)
        ib = self._check_bags(cfg.item_bags, item_bags, "item_bags", b)
        ids = torch.cat([user_id.reshape(b, 1), user_tags, uf, *ub, itf, *ib], dim=1).long()
        starts, sizes = self.bounds(user_tags.shape[1], ids.device)
        if ids.numel():
            outside = (ids < 0) | (ids >= sizes)
            if ids.device.type == "cpu":
                if bool(outside.any()):
                    row, col = outside.nonzero()[0].tolist()
                    raise IndexError(
                        f"id {int(ids[row, col])} of input column {col} is outside its vocabulary of {int(sizes[0, col])}"
                    )
            else:  # no host sync on an accelerator
                torch._assert_async(~outside.any(), "UmairFPS.pack_ids: an id is outside its vocabulary")
        return ids + starts

    # ---- id dropout

    def id_columns(self, width: int) -> list[tuple[int, int]]:
        """(packed column, its out-of-vocabulary row) of the user id and, when the config has
        the item's own id as an item field (:data:`umair.model.settings.ITEM_ID_FIELD`), of it:
        what :meth:`drop_ids` overwrites. The item part is the last ``item_columns`` columns."""
        cfg = self.cfg
        out = [(0, self.starts[0])]
        if ITEM_ID_FIELD in cfg.item_fields:
            j = list(cfg.item_fields).index(ITEM_ID_FIELD)
            out.append((width - self.item_columns + j, self.starts[self._item_field_tables[j]]))
        return out

    def drop_ids(self, packed: Tensor, p_user: float, p_item: float) -> Tensor:
        """Packed ids [B, C] with the user id of a random share ``p_user`` of the rows, and the
        item id of an independent share ``p_item``, replaced by their table's
        out-of-vocabulary row (id 0): the rows an unseen user or a cold item reads at
        scoring time. Returns ``packed`` itself when nothing is dropped."""
        columns = self.id_columns(packed.shape[1])
        if p_item and len(columns) < 2:
            raise ValueError(f"item id dropout {p_item}: the config has no {ITEM_ID_FIELD!r} item field")
        if not (p_user or p_item) or not packed.numel():
            return packed
        out = packed.clone()
        for (col, oov), p in zip(columns, (p_user, p_item)):
            if p > 0:
                out[:, col].masked_fill_(torch.rand(packed.shape[0], device=packed.device) < p, oov)
        return out

    # ---- pooling

    def embed(self, weight: Tensor, packed: Tensor) -> Tensor:
        """The raw features [B, n_bags · k] of packed ids: one weighted ``embedding_bag``
        (sum) over ``weight`` (the fused table) does every lookup; each field bag holds one
        id of weight 1, the tag bag and each bag field their ids, each of weight
        1/(number of non-padding ids) and padding of weight 0 — the masked mean."""
        b, width = packed.shape
        segs = self.segments(self.n_tags(width))
        offsets, bag_of, ones = self.bag_index(b, width, packed.device)
        weights = ones.to(weight.dtype)
        pooled = [(a, w, self.starts[t]) for a, w, t, mean in segs if mean and w]
        if pooled:
            pieces, pos = [], 0
            for a, w, pad in pooled:
                real = packed[:, a : a + w] != pad
                share = real / real.sum(dim=1, keepdim=True).clamp(min=1)
                pieces += [weights[:, pos:a], share.to(weights.dtype)]
                pos = a + w
            weights = torch.cat([*pieces, weights[:, pos:]], dim=1)
        out = _BagSum.apply(weight, packed.reshape(-1), offsets, weights.reshape(-1), bag_of)
        return out.view(b, -1)


def compact_tags(user_tags: Tensor, keep: int | None = None) -> Tensor:
    """[N, T] tag ids (0 = padding) → [N, keep]: each row's tags moved ahead of its padding
    (order kept), then only the first ``keep`` columns (default: the most tags any row
    has, at least 1). A masked mean over the result equals the one over the input when
    ``keep`` is at least that maximum."""
    pad = user_tags == 0
    order = torch.argsort(pad.to(torch.int8), dim=1, stable=True)
    if keep is None:
        keep = max(int((~pad).sum(dim=1).max()), 1) if len(user_tags) else 1
    return user_tags.gather(1, order[:, :keep])


class _BagSum(torch.autograd.Function):
    """``embedding_bag(ids, weight, offsets, mode="sum", per_sample_weights=w)`` with
    gradient ``∂weight[ids[i]] += w[i] · ∂out[bag_of[i]]`` (an ``index_add_``; the weights
    are constants). The same function and gradient as the built-in, whose dense CPU
    backward sorts the ids every step."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, ids: Tensor, offsets: Tensor, w: Tensor, bag_of: Tensor) -> Tensor:
        ctx.save_for_backward(ids, w, bag_of)
        ctx.rows = weight.shape[0]
        return F.embedding_bag(ids, weight, offsets, mode="sum", per_sample_weights=w)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        ids, w, bag_of = ctx.saved_tensors
        per_id = grad.index_select(0, bag_of) * w.unsqueeze(1)
        return grad.new_zeros(ctx.rows, grad.shape[1]).index_add_(0, ids, per_id), None, None, None, None
