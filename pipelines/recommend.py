"""Recommend job: top-K illustrations per user from a trained model (Ray Data batch job).

For every user (or the ``users`` given), as of time ``T`` (the model's split unless a
later one is given):

1. candidates (:class:`umair.neighbors.CandidateGenerator`): the newest and the most
   bookmarked illustrations existing before ``T``, plus the nearest neighbours of the
   user's recent training-window bookmarks in e_SEM and e_STY space, minus what the
   user already bookmarked (a setting);
2. scoring: ``ŷ = σ(logit)`` of the UMAIR-FPS model for every (user, candidate) pair, on
   a Ray Data actor pool (model, users, item features and candidate index loaded once
   per actor);
3. the ``k`` best by ``ŷ · x_i^γ`` (``x_i``: the item's share of past impressions,
   ``γ = exposure_power``, 0 = by ``ŷ`` alone; ties: smaller id) as rows ``user_id, rank (1..k),
   illust_id, score``.

Output (local or s3://), committed all-or-nothing::

    OUTPUT/runs/<run_id>/*.parquet   Ray Data's parts of one run
    OUTPUT/manifest.json             written last: the committed run, its files, rows,
                                     users, k, model; read with :func:`read_recommendations`

A run that dies before the manifest leaves the previous result in force; the next
successful run deletes stale run directories.

Then Recall@K and NDCG@K (:mod:`umair.ranking`) on the test window ``[T, end)``:
relevant = the user's bookmarks there; users with none are skipped and counted; the same
for a popularity ranking (training-window bookmark counts, same eligibility and
exclusions). Printed, written to ``OUTPUT/metrics.json`` and logged to MLflow (params,
metrics, a sample of the top-K lists as artifact).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from pipelines.ray_runtime import MlflowConfig, RayConfig, init_ray
from umair import contracts, storage
from umair.config import Settings, StorageConfig
from umair.model.features import FeatureError, parse_time, window
from umair.neighbors import CandidateGenerator, CandidateSettings, FeatureIndex, UnknownIdError, user_histories

TAG = "[recommend]"
FORMAT = "umair-recommendations/1"
MANIFEST = "manifest.json"
SCHEMA = pa.schema([("user_id", pa.int64()), ("rank", pa.int32()), ("illust_id", pa.int64()), ("score", pa.float32())])


class RecommendConfig(Settings):
    """Settings of ``umair recommend`` (see pipelines/configs/recommend.yaml)."""

    model: str = Field("outputs/demo/model", description="a model directory written by umair train")
    world: str | None = Field("outputs/demo/world", description="a sample world: its tables (else the model's training data)")
    illustrations: str | None = None
    users: str | None = None
    interactions: str | None = None
    item_features: str | None = Field(None, description="default: the features the model was trained on")
    split: str | None = Field(None, description="as-of time T (candidates exist before it; the test window starts here); default: the model's split")
    end: str | None = Field(None, description="end of the test window (exclusive); default: open")
    k: int = Field(20, ge=1, description="recommendations per user")
    cutoffs: tuple[int, ...] = Field((5, 10, 20), description="K of Recall@K / NDCG@K (those above k are dropped; k itself is always included)")
    candidates: CandidateSettings = CandidateSettings()
    exposure_power: float = Field(1.0, ge=0, description="γ: rank by ŷ · exposure share^γ (1 = expected bookmarks; 0 = the model's ŷ alone; see rank_users)")
    user_ids: list[int] | None = Field(None, description="only these users (default: every user of the users table)")
    users_per_batch: int = Field(32, ge=1, description="users per Ray Data batch")
    actors: int = Field(2, ge=1, description="scoring actors (one model load each)")
    threads: int = Field(1, ge=1, description="torch threads per actor")
    score_batch: int = Field(8192, ge=1, description="(user, candidate) pairs per forward pass")
    output: str = "outputs/demo/recommendations"
    sample_users: int = Field(20, ge=0, description="users whose lists go to MLflow as an artifact")
    run_name: str = "recommend"
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig(tracking_uri="sqlite:///outputs/mlflow.db", experiment="umair-train")
    storage: StorageConfig = StorageConfig()

    @field_validator("split", "end")
    @classmethod
    def _iso(cls, v: str | None) -> str | None:
        if v is not None:
            parse_time(v)
        return v

    @model_validator(mode="after")
    def _cutoffs(self) -> RecommendConfig:
        bad = [c for c in self.cutoffs if c < 1]
        if bad:
            raise ValueError(f"cutoffs {bad} must be >= 1")
        return self

    @property
    def ks(self) -> list[int]:
        return sorted({*(c for c in self.cutoffs if c <= self.k), self.k})


# --------------------------------------------------------------------------- what every actor loads once


@dataclass
class Context:
    """A model with its lookup tables, the candidate index and the users' histories
    before the as-of time: everything needed to rank for any user."""

    saved: Any  # pipelines.train.SavedModel
    inputs: Any  # pipelines.train.Inputs
    lookup: Any  # pipelines.train.Lookup
    user_table: Any  # umair.model.features.UserTable
    index: FeatureIndex
    generator: CandidateGenerator
    histories: dict[int, tuple[np.ndarray, np.ndarray]]
    eligible: np.ndarray
    interactions: pa.Table
    settings: CandidateSettings
    exposure: np.ndarray  # impressions of each item row before the as-of time

    def user_row(self, user_id: int) -> int:
        """The user's row in the users table, or :class:`UnknownIdError` naming the file."""
        r = int(self.user_table.rows(np.array([user_id]))[0])
        if r < 0:
            trained_on = self.saved.meta.get("data", {}).get("users")
            raise UnknownIdError(f"user {user_id} is not in the users table {self.inputs.users}"
                                 + (f" (the model was trained with {trained_on})" if trained_on else ""))
        return r

    def is_cold(self, user_row: int) -> bool:
        """True when the model never saw the user in training (id embedding = OOV slot 0)."""
        return int(self.user_table.uid[user_row]) == 0

    def excluded(self, user_id: int) -> np.ndarray:
        bookmarked, seen = self.histories.get(int(user_id), (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        return {"bookmarked": bookmarked, "seen": seen, "none": np.zeros(0, np.int64)}[self.settings.exclude]

    def candidates(self, user_id: int):
        """:class:`umair.neighbors.Candidates` of one user."""
        bookmarked, _ = self.histories.get(int(user_id), (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        return self.generator.for_user(bookmarked, self.excluded(user_id))


def resolve_inputs(model: str, saved: Any, cfg: Any, settings: storage.StorageSettings | None) -> tuple[Any, str | None]:
    """Tables and as-of time as ``umair evaluate`` resolves them (explicit > world > the
    model's training data; the feature set the model was trained on), plus the segments table."""
    from pipelines.evaluate import EvaluateConfig, resolve

    ecfg = EvaluateConfig(model=model, world=cfg.world, illustrations=cfg.illustrations, users=cfg.users,
                          interactions=cfg.interactions, item_features=cfg.item_features, split=cfg.split,
                          end=getattr(cfg, "end", None))
    return resolve(ecfg, saved, settings)


def load_context(model: str, inputs: Any, cand: CandidateSettings, settings: storage.StorageSettings | None) -> Context:
    """Load the model, its lookup tables, the candidate index and the histories (once per actor)."""
    from pipelines.evaluate import check_encoders
    from pipelines.train import inspect_features, load_lookup, load_model, read_inputs, read_item_features
    from umair.model.features import check_dims
    from umair.ranking import bookmark_counts

    saved = load_model(model, settings)
    info, _ = inspect_features(inputs, settings)
    check_dims(info, {m: getattr(saved.config, f"d_{m}") for m in saved.modalities})
    check_encoders(info, saved)
    ill, _, inter = read_inputs(inputs, settings)
    lookup, user_table, item_table = load_lookup(saved.space, inputs, saved.modalities, "cpu", settings, info.fingerprint)
    features = read_item_features(inputs, settings, columns=["illust_id", *cand.spaces])
    index = FeatureIndex.from_table(features, cand.spaces, inputs.item_features, cand.center)
    if not np.array_equal(index.illust_ids, item_table.illust_ids):
        raise FeatureError(f"{inputs.item_features}: the item features changed while loading (rows differ between reads)")
    # Eligibility and recency: in the catalogue and created before T.
    split_us = int(pa.scalar(parse_time(inputs.split), contracts.TIMESTAMP).cast(pa.int64()).as_py())
    cat_ids = ill.column("illust_id").to_numpy().astype(np.int64)
    created = ill.column("created_at").cast(pa.int64()).to_numpy()
    pos = index.rows(cat_ids)
    created_s = np.full(len(index), np.inf)
    created_s[pos[pos >= 0]] = created[pos >= 0] / 1e6
    eligible = created_s < split_us / 1e6
    history = window(inter, end=inputs.split)
    item_rows = index.rows(history.column("illust_id").to_numpy())
    labels = history.column("label").to_numpy()
    histories = user_histories(history.column("user_id").to_numpy(), item_rows, labels,
                               history.column("ts").to_numpy())
    counts = bookmark_counts(index.illust_ids, history.column("illust_id").to_numpy()[labels == 1])
    exposure = bookmark_counts(index.illust_ids, history.column("illust_id").to_numpy())
    generator = CandidateGenerator(index, eligible, np.where(np.isfinite(created_s), created_s, -np.inf), counts, cand)
    return Context(saved, inputs, lookup, user_table, index, generator, histories, eligible, inter, cand, exposure)


def rank_users(ctx: Context, user_ids: np.ndarray, k: int, score_batch: int = 8192,
               exposure_power: float = 1.0) -> tuple[pa.Table, dict[str, int]]:
    """Top-``k`` rows (user_id, rank, illust_id, score) of the given users, and counts
    of candidates per source (summed over the users).

    ``score = ŷ · x_i^γ`` with ``ŷ = σ(logit)`` the model's bookmark probability of a
    shown item, ``x_i = (n_i + 1) / (max_j n_j + 1)`` the item's share of exposure
    (``n_i`` its impressions before the as-of time) and ``γ = exposure_power``: ``γ = 0``
    ranks by ``ŷ`` alone, ``γ = 1`` by the expected bookmarks ``P(shown) · P(bookmark | shown)``
    under exposure proportional to past impressions."""
    import torch

    from pipelines.train import score_rows

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
    probs = score_rows(ctx.saved.model, ctx.lookup, torch.as_tensor(ur), torch.as_tensor(ir), score_batch).probs
    if exposure_power:
        share = (ctx.exposure[ir] + 1.0) / (float(ctx.exposure.max(initial=0)) + 1.0)
        probs = (probs * share ** exposure_power).astype(np.float32)
    ids = ctx.index.illust_ids[ir]
    order = np.lexsort((ids, -probs, owner))  # per user: best score first, ties by id
    owner, ids, probs = owner[order], ids[order], probs[order]
    starts = np.r_[0, np.flatnonzero(np.diff(owner)) + 1]
    rank = np.arange(len(owner)) - np.repeat(starts, np.diff(np.r_[starts, len(owner)])) + 1
    keep = rank <= k
    table = pa.table({"user_id": pa.array(owner[keep], pa.int64()), "rank": pa.array(rank[keep], pa.int32()),
                      "illust_id": pa.array(ids[keep], pa.int64()), "score": pa.array(probs[keep], pa.float32())})
    return table, sources


class Recommender:
    """Ray Data actor: loads the :class:`Context` once, ranks batches of users."""

    def __init__(self, model: str, inputs: dict[str, Any], candidates: dict[str, Any], storage_cfg: dict[str, Any],
                 k: int, threads: int, score_batch: int, exposure_power: float = 1.0) -> None:
        import torch

        from pipelines.train import Inputs

        torch.set_num_threads(threads)
        self.k, self.score_batch, self.exposure_power = k, score_batch, exposure_power
        self.ctx = load_context(model, Inputs(**inputs), CandidateSettings(**candidates),
                                StorageConfig(**storage_cfg).to_settings())

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        table, _ = rank_users(self.ctx, batch["user_id"], self.k, self.score_batch, self.exposure_power)
        return table


# --------------------------------------------------------------------------- output: all-or-nothing commit


def read_recommendations(output: str, settings: storage.StorageSettings | None = None) -> pa.Table:
    """The committed top-K table of ``output`` (user_id, rank, illust_id, score), sorted by user and rank."""
    uri = storage.join(output, MANIFEST)
    if not storage.exists(uri, settings):
        raise FileNotFoundError(f"{output}: no {MANIFEST}; no committed recommendations (run `umair recommend`)")
    manifest = json.loads(storage.read_bytes(uri, settings))
    if manifest.get("format") != FORMAT:
        raise FeatureError(f"{uri}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    parts = [storage.read_parquet(storage.join(output, f), settings) for f in manifest["files"]]
    table = pa.concat_tables([p.select(SCHEMA.names).cast(SCHEMA) for p in parts]) if parts else SCHEMA.empty_table()
    if table.num_rows != manifest["rows"]:
        raise FeatureError(f"{uri}: lists {manifest['rows']} rows but its files hold {table.num_rows}")
    return table.sort_by([("user_id", "ascending"), ("rank", "ascending")])


def commit(output: str, run_id: str, meta: dict[str, Any], settings: storage.StorageSettings | None) -> dict[str, Any]:
    """Publish ``OUTPUT/runs/<run_id>`` by writing the manifest (last), then delete other run directories."""
    run_dir = storage.join(output, "runs", run_id)
    files = sorted(f for f in storage.list_files(run_dir, settings) if f.endswith(".parquet"))
    rel = [f[len(storage.join(output, "")):] if f.startswith(storage.join(output, "")) else
           storage.join("runs", run_id, os.path.basename(f)) for f in files]
    rows = sum(storage.read_parquet(f, settings, columns=["user_id"]).num_rows for f in files)
    manifest = {"format": FORMAT, "run_id": run_id, "files": rel, "rows": rows, **meta}
    storage.write_bytes(storage.join(output, MANIFEST), json.dumps(manifest, indent=2, default=str).encode(), settings)
    runs = storage.join(output, "runs")
    for d in _run_dirs(runs, settings):
        if d != run_id:
            storage.delete_dir(storage.join(runs, d), settings)
    return manifest


def _run_dirs(runs: str, settings: storage.StorageSettings | None) -> list[str]:
    if not storage.exists(runs, settings):
        return []
    prefix = storage.join(runs, "")
    return sorted({f[len(prefix):].split("/", 1)[0] for f in storage.list_files(runs, settings) if f.startswith(prefix)})


# --------------------------------------------------------------------------- metrics


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


def ranking_metrics(ctx: Context, topk: pa.Table, user_ids: np.ndarray, end: str | None, ks: list[int]) -> dict[str, Any]:
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
    return {"model": model, "popularity": pop, "relevant": n_rel, "reachable": reachable,
            "test_rows": test.num_rows}


# --------------------------------------------------------------------------- the driver


def _mlflow_log(cfg: RecommendConfig, summary: dict[str, Any], sample: pa.Table, params: dict[str, Any]) -> str:
    import mlflow

    from pipelines.train import ensure_experiment

    ensure_experiment(cfg.mlflow)
    client = mlflow.MlflowClient(cfg.mlflow.resolved_uri())
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    tags = {"umair.job": "recommend", "umair.model": cfg.model}
    if summary.get("train_run_id"):
        tags["umair.train_run_id"] = summary["train_run_id"]
    rid = client.create_run(exp.experiment_id, run_name=cfg.run_name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    metrics = {**summary["metrics"]["model"], **{f"popularity_{k}": v for k, v in summary["metrics"]["popularity"].items()},
               "users_evaluated": summary["users_evaluated"], "users_skipped": summary["users_skipped"],
               "relevant": summary["relevant"], "relevant_reachable": summary["relevant_reachable"],
               "rows": summary["rows"], "wall_s": summary["wall_s"]}
    client.log_batch(rid, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items()
                                   if v is not None and np.isfinite(float(v))],
                     params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "recommend_summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        sample.to_pandas().to_csv(os.path.join(d, "topk_sample.csv"), index=False)
        client.log_artifacts(rid, d)
    client.set_terminated(rid, "FINISHED")
    return rid


def run(cfg: RecommendConfig) -> dict[str, Any]:
    """Rank for every user with Ray Data, commit the top-K parquet, measure and log; return the summary."""
    import ray.data

    from pipelines.train import load_model

    t0 = time.perf_counter()
    settings = cfg.storage.to_settings()
    saved = load_model(cfg.model, settings)
    inputs, _ = resolve_inputs(cfg.model, saved, cfg, settings)
    users = contracts.read_table(inputs.users, "users", settings)
    all_ids = users.column("user_id").to_numpy().astype(np.int64)
    if cfg.user_ids is not None:
        unknown = sorted(set(cfg.user_ids) - set(all_ids.tolist()))
        if unknown:
            raise UnknownIdError(f"user {unknown[0]} is not in the users table {inputs.users}"
                                 + (f" ({len(unknown)} unknown user ids)" if len(unknown) > 1 else ""))
        user_ids = np.array(sorted(set(cfg.user_ids)), np.int64)
    else:
        user_ids = np.sort(all_ids)
    print(f"{TAG} model {cfg.model} ({saved.meta.get('variant', 'full')}), {len(user_ids)} users, k={cfg.k}, "
          f"as of {inputs.split}; candidates: {cfg.candidates.model_dump(mode='json')}", flush=True)

    # The driver's own context: checks every input before Ray starts, and serves the metrics.
    ctx = load_context(cfg.model, inputs, cfg.candidates, settings)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    staging = storage.join(cfg.output, "runs", run_id)
    init_ray(cfg.ray)
    n_blocks = max(1, min(len(user_ids) // cfg.users_per_batch, 4 * cfg.actors))
    ds = ray.data.from_arrow([pa.table({"user_id": pa.array(part, pa.int64())})
                              for part in np.array_split(user_ids, n_blocks) if len(part)])
    ds = ds.map_batches(
        Recommender,
        fn_constructor_kwargs={"model": cfg.model, "inputs": inputs.to_dict(), "candidates": cfg.candidates.model_dump(mode="json"),
                               "storage_cfg": cfg.storage.model_dump(), "k": cfg.k, "threads": cfg.threads,
                               "score_batch": cfg.score_batch, "exposure_power": cfg.exposure_power},
        batch_size=cfg.users_per_batch, batch_format="numpy", concurrency=cfg.actors, num_cpus=1,
    )
    fs, path = storage.resolve(staging, settings)
    t_rank = time.perf_counter()
    ds.write_parquet(path, filesystem=fs)
    rank_s = time.perf_counter() - t_rank
    manifest = commit(cfg.output, run_id, {"model": cfg.model, "k": cfg.k, "as_of": inputs.split, "users": int(len(user_ids)),
                                           "candidates": cfg.candidates.model_dump(mode="json"),
                                           "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, settings)
    topk = read_recommendations(cfg.output, settings)
    print(f"{TAG} ranked {len(user_ids)} users in {rank_s:.1f}s ({cfg.actors} actors); committed {manifest['rows']} rows "
          f"to {cfg.output} (run {run_id})", flush=True)

    m = ranking_metrics(ctx, topk, user_ids, cfg.end, cfg.ks)
    model_m, pop_m = m["model"], m["popularity"]
    sample_users = set(user_ids[: cfg.sample_users].tolist())
    sample = topk.filter(pa.array(np.isin(topk.column("user_id").to_numpy(), list(sample_users))))
    _, sources = rank_users(ctx, user_ids[: min(len(user_ids), 50)], cfg.k, cfg.score_batch, cfg.exposure_power)
    summary: dict[str, Any] = {
        "output": cfg.output, "run_id": run_id, "model": cfg.model, "variant": saved.meta.get("variant", "full"),
        "as_of": inputs.split, "test_end": cfg.end, "k": cfg.k, "users": int(len(user_ids)), "rows": manifest["rows"],
        "users_evaluated": model_m.users, "users_skipped": model_m.skipped,
        "relevant": m["relevant"], "relevant_reachable": m["reachable"],
        "metrics": {"model": model_m.flat(), "popularity": pop_m.flat()},
        "candidate_sources_first_50_users": sources,
        "train_run_id": saved.meta.get("mlflow_run_id"),
    }
    print(f"{TAG} test window from {inputs.split}: {model_m.users} users with bookmarks ({model_m.skipped} without, skipped), "
          f"{m['relevant']} relevant items ({m['reachable']} existed before the as-of time)")
    print(f"  {'ranking':<11}" + "".join(f" {'Recall@' + str(k):>10} {'NDCG@' + str(k):>8}" for k in cfg.ks))
    for name, r in (("model", model_m), ("popularity", pop_m)):
        print(f"  {name:<11}" + "".join(f" {r.recall[k]:>10.4f} {r.ndcg[k]:>8.4f}" for k in cfg.ks))
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    params = {"model": cfg.model, "k": cfg.k, "exposure_power": cfg.exposure_power, "as_of": inputs.split, "test_end": cfg.end, "users": len(user_ids),
              "actors": cfg.actors, "output": cfg.output, "run_id": run_id,
              **{f"candidates.{k}": v for k, v in cfg.candidates.model_dump(mode="json").items()}}
    summary["mlflow_run_id"] = _mlflow_log(cfg, summary, sample, params)
    storage.write_bytes(storage.join(cfg.output, "metrics.json"), json.dumps(summary, indent=2, default=str).encode(), settings)
    print(f"{TAG} done in {summary['wall_s']}s; metrics in {storage.join(cfg.output, 'metrics.json')}, "
          f"MLflow run {summary['mlflow_run_id']}", flush=True)
    return summary


def register(sub: Any) -> None:
    """Add ``umair recommend`` to the CLI."""
    from umair.config import load_with_flags

    def handler(args: Any) -> int:
        cfg = load_with_flags(args.config, RecommendConfig, args, ("model", "world", "item_features", "output", "k", "actors"))
        if args.user:
            cfg = cfg.model_copy(update={"user_ids": list(args.user)})
        run(cfg)
        return 0

    p = sub.add_parser("recommend", help="top-K illustrations per user (Ray Data batch job), Recall@K / NDCG@K vs popularity")
    p.add_argument("--config", default="pipelines/configs/recommend.yaml", help="settings YAML (see pipelines/configs/recommend.yaml)")
    p.add_argument("--model", help="model directory written by umair train (overrides the config)")
    p.add_argument("--world", help="sample world whose tables to use (overrides the config)")
    p.add_argument("--item-features", help="item-features table (overrides the config)")
    p.add_argument("--output", help="output directory of the top-K parquet (overrides the config)")
    p.add_argument("-k", "--k", type=int, help="recommendations per user")
    p.add_argument("--actors", type=int, help="scoring actors")
    p.add_argument("--user", type=int, action="append", help="only this user (repeatable)")
    p.set_defaults(func=handler)
