"""Ranking candidates for users with a trained model (no Ray): the :class:`RankingTables`
(lookup tables, candidate index, histories: numpy arrays built once per job), the
per-process :class:`Context` over them (plus the model) and :func:`rank_users`, the top-K
of a batch of users. ``umair recommend`` puts the tables in the Ray object store once and
runs :func:`rank_users` on a Ray Data actor pool; ``umair explain`` and the benchmarks
call :func:`load_context` directly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from umair import contracts, storage
from umair.errors import FeatureError
from umair.model.features import UserTable
from umair.model.interactions import created_at_us, parse_time, window
from umair.model.item_features import check_dims
from umair.neighbors import CandidateGenerator, CandidateSettings, FeatureIndex, UnknownIdError, UserHistories
from umair.ranking import bookmark_counts
from umair.training.inputs import Inputs, check_encoders, inspect_features, read_inputs, read_item_features
from umair.training.lookup import Lookup, SharedTables, load_tables, log_arrays
from umair.training.model_io import SavedModel, load_model
from umair.training.scoring import score_rows

SCHEMA = pa.schema([("user_id", pa.int64()), ("rank", pa.int32()), ("illust_id", pa.int64()), ("score", pa.float32())])


@dataclass(frozen=True, eq=False)
class RankingTables:
    """What every ranking actor reads, built once (:func:`ranking_tables`) and put in the
    Ray object store by ``umair recommend``: numpy arrays only, so each actor of a node maps
    them read-only without a copy (its :class:`Lookup` tensors wrap the same memory).

    ``tables``: users, items (float16 standardised vectors, fields, bags) and the
    interaction log of a model with a user history; ``generator``: the candidate index
    (float16 unit vectors per space, IVF lists above ``ivf_above`` items); ``histories``:
    each user's bookmarks and impressions before the as-of time; ``exposure`` [I]: each
    item row's impressions before it."""

    tables: SharedTables
    generator: CandidateGenerator
    histories: UserHistories
    exposure: np.ndarray


@dataclass
class Context:
    """A model with its lookup tables, the candidate index and the users' histories
    before the as-of time: everything needed to rank for any user. ``interactions``: the
    whole table, on the process that measures (None in a ranking actor)."""

    saved: SavedModel
    inputs: Inputs
    lookup: Lookup
    shared: RankingTables
    interactions: pa.Table | None = None

    @classmethod
    def of(
        cls, saved: SavedModel, inputs: Inputs, shared: RankingTables, interactions: pa.Table | None = None
    ) -> Context:
        """The context over ``shared`` (e.g. ``ray.get`` of the object store's copy: no copy made)."""
        lookup = shared.tables.lookup(saved.modalities, "cpu")
        return cls(saved, inputs, lookup, shared, interactions)

    @property
    def settings(self) -> CandidateSettings:
        return self.shared.generator.settings

    @property
    def user_table(self) -> UserTable:
        return self.shared.tables.users

    @property
    def index(self) -> FeatureIndex:
        return self.shared.generator.index

    @property
    def generator(self) -> CandidateGenerator:
        return self.shared.generator

    @property
    def eligible(self) -> np.ndarray:
        return self.shared.generator.eligible

    @property
    def exposure(self) -> np.ndarray:
        return self.shared.exposure

    def shared_arrays(self) -> list[np.ndarray]:
        """Every numpy array of the :class:`RankingTables` (what a node holds once)."""
        return arrays_of(self.shared)

    def user_row(self, user_id: int) -> int:
        """The user's row in the users table, or :class:`UnknownIdError` naming the file."""
        r = int(self.user_table.rows(np.array([user_id]))[0])
        if r < 0:
            trained_on = self.saved.meta.get("data", {}).get("users")
            raise UnknownIdError(
                f"user {user_id} is not in the users table {self.inputs.users}"
                + (f" (the model was trained with {trained_on})" if trained_on else "")
            )
        return r

    def is_cold(self, user_row: int) -> bool:
        """True when the model never saw the user in training (id embedding = OOV slot 0)."""
        return int(self.user_table.uid[user_row]) == 0

    def excluded(self, user_id: int) -> np.ndarray:
        bookmarked, seen = self.shared.histories.of(int(user_id))
        return {"bookmarked": bookmarked, "seen": seen, "none": np.zeros(0, np.int64)}[self.settings.exclude]

    def candidates(self, user_id: int):
        """:class:`umair.neighbors.Candidates` of one user."""
        bookmarked, _ = self.shared.histories.of(int(user_id))
        return self.generator.for_user(bookmarked, self.excluded(user_id))


def arrays_of(obj: Any) -> list[np.ndarray]:
    """The numpy arrays inside ``obj`` (umair's own objects, dicts, lists, tuples), each once."""
    out: dict[int, np.ndarray] = {}

    def walk(o: Any) -> None:
        if isinstance(o, np.ndarray):
            out.setdefault(id(o), o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, list | tuple):
            for v in o:
                walk(v)
        elif type(o).__module__.startswith("umair.") and hasattr(o, "__dict__"):
            for v in vars(o).values():
                walk(v)

    walk(obj)
    return list(out.values())


def as_of_us(when: str) -> int:
    """``when`` (ISO time) as the int64 of the interactions' timestamp type: where a user
    history is cut for recommending "as of" it (:mod:`umair.model.history`)."""
    return int(pa.scalar(parse_time(when), contracts.TIMESTAMP).cast(pa.int64()).as_py())


def ranking_tables(
    saved: SavedModel, inputs: Inputs, cand: CandidateSettings, settings: storage.StorageSettings | None
) -> tuple[RankingTables, pa.Table]:
    """Read and check the inputs of ``saved``, build the :class:`RankingTables` (once per
    job) and return them with the interactions table."""
    info, _ = inspect_features(inputs, settings)
    check_dims(info, {m: saved.config.vectors[m] for m in saved.modalities})
    check_encoders(info, saved)
    ill, _, inter = read_inputs(inputs, settings)
    user_table, item_table = load_tables(saved.space, inputs, saved.modalities, settings, info.fingerprint)
    log = log_arrays(inter, user_table.user_ids, item_table.illust_ids) if saved.config.user_history else None
    features = read_item_features(inputs, settings, columns=["illust_id", *cand.spaces])
    index = FeatureIndex.from_table(features, cand.spaces, inputs.item_features, cand.center)
    del features
    if not np.array_equal(index.illust_ids, item_table.illust_ids):
        raise FeatureError(
            f"{inputs.item_features}: the item features changed while loading (rows differ between reads)"
        )
    # Eligibility and recency: in the catalogue and created before T.
    split_us = as_of_us(inputs.split)
    cat_ids = ill.column("illust_id").to_numpy().astype(np.int64)
    created = created_at_us(ill)  # no created_at (column or value): eligible from the start
    pos = index.rows(cat_ids)
    created_s = np.full(len(index), np.inf)
    created_s[pos[pos >= 0]] = created[pos >= 0] / 1e6
    eligible = created_s < split_us / 1e6
    history = window(inter, end=inputs.split)
    item_rows = index.rows(history.column("illust_id").to_numpy())
    labels = history.column("label").to_numpy()
    histories = UserHistories.of_window(
        history.column("user_id").to_numpy(), item_rows, labels, history.column("ts").to_numpy()
    )
    counts = bookmark_counts(index.illust_ids, history.column("illust_id").to_numpy()[labels == 1])
    exposure = bookmark_counts(index.illust_ids, history.column("illust_id").to_numpy())
    generator = CandidateGenerator(index, eligible, np.where(np.isfinite(created_s), created_s, -np.inf), counts, cand)
    return RankingTables(SharedTables(user_table, item_table, log), generator, histories, exposure), inter


def load_context(
    model: str, inputs: Inputs, cand: CandidateSettings, settings: storage.StorageSettings | None
) -> Context:
    """The model and its :func:`ranking_tables` in this process (one process's own copy)."""
    saved = load_model(model, settings)
    shared, inter = ranking_tables(saved, inputs, cand, settings)
    return Context.of(saved, inputs, shared, inter)


def rank_users(
    ctx: Context, user_ids: np.ndarray, k: int, score_batch: int = 8192, exposure_power: float = 1.0
) -> tuple[pa.Table, dict[str, int]]:
    """Top-``k`` rows (user_id, rank, illust_id, score) of the given users, and counts
    of candidates per source (summed over the users).

    ``score = ŷ · x_i^γ`` with ``ŷ = σ(logit)`` the model's bookmark probability of a
    shown item, ``x_i = (n_i + 1) / (max_j n_j + 1)`` the item's share of exposure
    (``n_i`` its impressions before the as-of time) and ``γ = exposure_power``: ``γ = 0``
    ranks by ``ŷ`` alone, ``γ = 1`` by the expected bookmarks ``P(shown) · P(bookmark | shown)``
    under exposure proportional to past impressions."""
    import torch

    u_rows, i_rows, owners = [], [], []
    sources: dict[str, int] = {"cold_start_users": 0}
    for uid in np.asarray(user_ids, np.int64):
        r = ctx.user_row(int(uid))
        sources["cold_start_users"] += int(ctx.is_cold(r))
        cands = ctx.candidates(int(uid))
        for name, n in cands.sources.items():
            sources[name] = sources.get(name, 0) + n
        sources["candidates"] = sources.get("candidates", 0) + len(cands.rows)
        u_rows.append(np.full(len(cands.rows), r, np.int64))
        i_rows.append(cands.rows)
        owners.append(np.full(len(cands.rows), uid, np.int64))
    if not u_rows or not sum(len(x) for x in u_rows):
        return SCHEMA.empty_table(), sources
    ur, ir, owner = np.concatenate(u_rows), np.concatenate(i_rows), np.concatenate(owners)
    as_of = torch.full((len(ur),), as_of_us(ctx.inputs.split), dtype=torch.int64)  # the history known at the split
    probs = score_rows(ctx.saved.model, ctx.lookup, torch.as_tensor(ur), torch.as_tensor(ir), score_batch, as_of).probs
    if exposure_power:
        share = (ctx.exposure[ir] + 1.0) / (float(ctx.exposure.max(initial=0)) + 1.0)
        probs = (probs * share**exposure_power).astype(np.float32)
    ids = ctx.index.illust_ids[ir]
    order = np.lexsort((ids, -probs, owner))  # per user: best score first, ties by id
    owner, ids, probs = owner[order], ids[order], probs[order]
    starts = np.r_[0, np.flatnonzero(np.diff(owner)) + 1]
    rank = np.arange(len(owner)) - np.repeat(starts, np.diff(np.r_[starts, len(owner)])) + 1
    keep = rank <= k
    table = pa.table(
        {
            "user_id": pa.array(owner[keep], pa.int64()),
            "rank": pa.array(rank[keep], pa.int32()),
            "illust_id": pa.array(ids[keep], pa.int64()),
            "score": pa.array(probs[keep], pa.float32()),
        }
    )
    return table, sources


def relevant_items(test: pa.Table) -> dict[int, set[int]]:
    """user_id -> their bookmarked illust_ids in a window."""
    pos = test.filter(pa.array(test.column("label").to_numpy() == 1))
    out: dict[int, set[int]] = {}
    for u, i in zip(pos.column("user_id").to_numpy().tolist(), pos.column("illust_id").to_numpy().tolist()):
        out.setdefault(int(u), set()).add(int(i))
    return out


def popularity_rankings(ctx: Context, user_ids: np.ndarray, k: int) -> dict[int, list[int]]:
    """The baseline: per user, the most bookmarked eligible items of the training window
    (the candidate generator's popularity order, extended by recency for items never
    bookmarked), minus the same exclusions as the model's lists."""
    from umair.ranking import popularity_ranking

    rest = ctx.generator.recent_rows[~np.isin(ctx.generator.recent_rows, ctx.generator.popular_rows)]
    order = ctx.index.illust_ids[np.concatenate([ctx.generator.popular_rows, rest])]
    return {int(u): popularity_ranking(order, k, ctx.index.illust_ids[ctx.excluded(int(u))]) for u in user_ids}


def ranking_metrics(
    ctx: Context, topk: pa.Table, user_ids: np.ndarray, end: str | None, ks: list[int]
) -> dict[str, Any]:
    """Recall@K / NDCG@K of the model's lists and of the popularity baseline on ``[T, end)``."""
    from umair.ranking import evaluate_rankings

    test = window(ctx.interactions, start=ctx.inputs.split, end=end)
    relevant = relevant_items(test)
    relevant = {u: r for u, r in relevant.items() if u in set(int(x) for x in user_ids)}
    model_lists: dict[int, list[int]] = {}
    for u, i in zip(topk.column("user_id").to_numpy().tolist(), topk.column("illust_id").to_numpy().tolist()):
        model_lists.setdefault(int(u), []).append(int(i))
    pop_lists = popularity_rankings(ctx, np.array(sorted(relevant), np.int64), max(ks))
    model = evaluate_rankings(model_lists, relevant, ks, users=user_ids)
    pop = evaluate_rankings(pop_lists, relevant, ks, users=user_ids)
    n_rel = sum(len(r) for r in relevant.values())
    eligible_ids = set(ctx.index.illust_ids[ctx.eligible].tolist())
    reachable = sum(len(r & eligible_ids) for r in relevant.values())
    return {"model": model, "popularity": pop, "relevant": n_rel, "reachable": reachable, "test_rows": test.num_rows}
