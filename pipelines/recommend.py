"""Recommend job: top-K illustrations per user from a trained model (Ray Data batch job).

For every user (or the ``users`` given), as of time ``T`` (the model's split unless a
later one is given):

1. candidates (:class:`umair.neighbors.CandidateGenerator`): the newest and the most
   bookmarked illustrations existing before ``T``, plus the nearest neighbours of the
   user's recent training-window bookmarks in e_SEM and e_STY space, minus what the
   user already bookmarked (a setting);
2. scoring: ``ŷ = σ(logit)`` of the UMAIR-FPS model for every (user, candidate) pair, on
   a Ray Data actor pool: the driver builds the ranking tables once (users, float16 item
   tables, interaction log, candidate index, histories: :class:`umair.recommender.RankingTables`)
   and puts them in the object store once; each actor loads the model and maps the tables
   without a copy, and reports its memory (printed, ``metrics.json`` ``actor_memory``);
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
metrics, a sample of the top-K lists as artifact), with ``OUTPUT/topk_strips.png``: a few
users' lists as image strips (:func:`umair.plots_runs.topk_strips`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from pipelines.runtime import ensure_experiment, init_ray
from umair import contracts, storage
from umair.config import MlflowConfig, RayConfig, Settings, StorageConfig
from umair.errors import FeatureError
from umair.model.interactions import IsoTime
from umair.neighbors import CandidateSettings, UnknownIdError
from umair.recommender import SCHEMA, Context, RankingTables, rank_users, ranking_metrics, ranking_tables
from umair.training.inputs import Inputs, eval_inputs_of
from umair.training.memory import memory_line, worker_report
from umair.training.model_io import load_model

TAG = "[recommend]"
FORMAT = "umair-recommendations/1"
MANIFEST = "manifest.json"


class RecommendConfig(Settings):
    """Settings of ``umair recommend`` (see pipelines/configs/recommend.yaml)."""

    model: str = Field("outputs/demo/model", description="a model directory written by umair train")
    world: str | None = Field(
        "outputs/demo/world", description="a sample world: its tables (else the model's training data)"
    )
    illustrations: str | None = None
    users: str | None = None
    interactions: str | None = None
    item_features: str | None = Field(None, description="default: the features the model was trained on")
    split: IsoTime | None = Field(
        None,
        description="as-of time T (candidates exist before it; the test window starts here); default: the model's split",
    )
    end: IsoTime | None = Field(None, description="end of the test window (exclusive); default: open")
    k: int = Field(20, ge=1, description="recommendations per user")
    cutoffs: tuple[int, ...] = Field(
        (5, 10, 20), description="K of Recall@K / NDCG@K (those above k are dropped; k itself is always included)"
    )
    candidates: CandidateSettings = CandidateSettings()
    exposure_power: float = Field(
        1.0,
        ge=0,
        description="γ: rank by ŷ · exposure share^γ (1 = expected bookmarks; 0 = the model's ŷ alone; see rank_users)",
    )
    user_ids: list[int] | None = Field(None, description="only these users (default: every user of the users table)")
    users_per_batch: int = Field(32, ge=1, description="users per Ray Data batch")
    actors: int = Field(2, ge=1, description="scoring actors (one model load each)")
    threads: int = Field(1, ge=1, description="torch threads per actor")
    score_batch: int = Field(8192, ge=1, description="(user, candidate) pairs per forward pass")
    output: str = "outputs/demo/recommendations"
    sample_users: int = Field(20, ge=0, description="users whose lists go to MLflow as an artifact")
    picture_users: int = Field(
        4, ge=0, description="users whose lists are drawn as image strips (OUTPUT/topk_strips.png); 0 = none"
    )
    picture_k: int = Field(8, ge=1, description="items per user in topk_strips.png")
    run_name: str = "recommend"
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig(tracking_uri="sqlite:///outputs/mlflow.db", experiment="umair-train")
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _cutoffs(self) -> RecommendConfig:
        bad = [c for c in self.cutoffs if c < 1]
        if bad:
            raise ValueError(f"cutoffs {bad} must be >= 1")
        return self

    @property
    def ks(self) -> list[int]:
        return sorted({*(c for c in self.cutoffs if c <= self.k), self.k})


class Recommender:
    """Ray Data actor: maps the job's :class:`RankingTables` from the object store (no
    copy), loads the model once, ranks batches of users. After each batch it writes its
    memory (:func:`umair.training.memory.worker_report`: peak RSS, USS, where its tables
    live) to ``<reports>/<pid>.json``."""

    def __init__(
        self,
        model: str,
        inputs: Inputs,
        tables: list[Any],
        storage_config: StorageConfig,
        k: int,
        threads: int,
        score_batch: int,
        reports: str,
        exposure_power: float = 1.0,
    ) -> None:
        import ray
        import torch

        torch.set_num_threads(threads)
        self.k, self.score_batch, self.exposure_power = k, score_batch, exposure_power
        self.settings = storage_config.to_settings()
        shared: RankingTables = ray.get(tables[0])  # read-only views of the node's object store
        self.ctx = Context.of(load_model(model, self.settings), inputs, shared)
        self.report_uri = storage.join(reports, f"{os.getpid()}.json")

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        table, _ = rank_users(self.ctx, batch["user_id"], self.k, self.score_batch, self.exposure_power)
        report = worker_report(self.ctx.shared_arrays())
        storage.write_bytes(self.report_uri, json.dumps(report).encode(), self.settings)
        return table


# --------------------------------------------------------------------------- output: all-or-nothing commit


def read_recommendations(output: str, settings: storage.StorageSettings | None = None) -> pa.Table:
    """The committed top-K table of ``output`` (user_id, rank, illust_id, score), sorted by user and rank."""
    uri = storage.join(output, MANIFEST)
    manifest = storage.read_manifest(
        uri, FORMAT, settings, missing=f"{output}: no {MANIFEST}; no committed recommendations (run `umair recommend`)"
    )
    parts = [storage.read_parquet(storage.join(output, f), settings) for f in manifest["files"]]
    table = pa.concat_tables([p.select(SCHEMA.names).cast(SCHEMA) for p in parts]) if parts else SCHEMA.empty_table()
    if table.num_rows != manifest["rows"]:
        raise FeatureError(f"{uri}: lists {manifest['rows']} rows but its files hold {table.num_rows}")
    return table.sort_by([("user_id", "ascending"), ("rank", "ascending")])


def commit(output: str, run_id: str, meta: dict[str, Any], settings: storage.StorageSettings | None) -> dict[str, Any]:
    """Publish ``OUTPUT/runs/<run_id>`` by writing the manifest (last), then delete other run directories."""
    run_dir = storage.join(output, "runs", run_id)
    files = sorted(f for f in storage.list_files(run_dir, settings) if f.endswith(".parquet"))
    rel = [
        f[len(storage.join(output, "")) :]
        if f.startswith(storage.join(output, ""))
        else storage.join("runs", run_id, os.path.basename(f))
        for f in files
    ]
    rows = sum(storage.read_parquet(f, settings, columns=["user_id"]).num_rows for f in files)
    manifest = {"format": FORMAT, "run_id": run_id, "files": rel, "rows": rows, **meta}
    storage.write_bytes(storage.join(output, MANIFEST), json.dumps(manifest, indent=2, default=str).encode(), settings)
    runs = storage.join(output, "runs")
    for d in _run_dirs(runs, settings):
        if d != run_id:
            storage.delete_dir(storage.join(runs, d), settings)
    return manifest


def _actor_reports(reports: str, settings: storage.StorageSettings | None) -> dict[str, dict[str, float]]:
    """The actors' last memory reports (``a0``, ``a1``... by pid order), then the reports deleted."""
    if not storage.exists(reports, settings):
        return {}
    files = sorted(f for f in storage.list_files(reports, settings) if f.endswith(".json"))
    out = {f"a{j}": json.loads(storage.read_bytes(f, settings)) for j, f in enumerate(files)}
    storage.delete_dir(reports, settings)
    return out


def _run_dirs(runs: str, settings: storage.StorageSettings | None) -> list[str]:
    if not storage.exists(runs, settings):
        return []
    prefix = storage.join(runs, "")
    return sorted(
        {f[len(prefix) :].split("/", 1)[0] for f in storage.list_files(runs, settings) if f.startswith(prefix)}
    )


# --------------------------------------------------------------------------- metrics


# --------------------------------------------------------------------------- the driver


def _strips(
    cfg: RecommendConfig, inputs: Inputs, segments_uri: str | None, topk: pa.Table, settings: Any
) -> bytes | None:
    """``OUTPUT/topk_strips.png``: the lists of ``picture_users`` users (one per planted
    taste in turn, on a sample world) as image strips with each item's true style / content."""
    from umair.plots_runs import pick_users, strips_from_topk, topk_strips
    from umair.training.scoring import segment_map

    if not cfg.picture_users or topk.num_rows == 0:
        return None
    tastes = segment_map(segments_uri, "taste", settings) if segments_uri else {}
    users = pick_users(np.unique(topk.column("user_id").to_numpy()).tolist(), tastes, cfg.picture_users)
    shown = topk.filter(pa.array(np.isin(topk.column("user_id").to_numpy(), users)))
    wanted = set(shown.column("illust_id").to_pylist())
    cat = contracts.read_table(inputs.illustrations, "illustrations", settings)
    images = {
        int(i): u
        for i, u in zip(cat.column("illust_id").to_pylist(), cat.column("image_uri").to_pylist())
        if int(i) in wanted
    }
    labels: dict[int, dict[str, str]] = {}
    truth = storage.join(cfg.world, "truth", "items.parquet") if cfg.world else None
    if truth and storage.exists(truth, settings):
        t = storage.read_parquet(truth, settings)
        cols = [c for c in ("style_name", "content_name") if c in t.column_names]
        values = {c: t.column(c).to_pylist() for c in cols}
        for r, i in enumerate(t.column("illust_id").to_pylist()):
            if int(i) in wanted:
                labels[int(i)] = {c.removesuffix("_name"): str(values[c][r]) for c in cols}
    notes = {u: f"{tastes[u]}-driven" for u in users if u in tastes}
    strips = strips_from_topk(shown, users, images, cfg.picture_k, labels, notes)
    title = f"top-{min(cfg.k, cfg.picture_k)} of {len(strips)} users as of {inputs.split} (score: ŷ · exposure^γ, γ={cfg.exposure_power:g})"
    return topk_strips(strips, storage.join(cfg.output, "topk_strips.png"), settings, title=title)


def _mlflow_log(
    cfg: RecommendConfig, summary: dict[str, Any], sample: pa.Table, params: dict[str, Any], strips: bytes | None
) -> str:
    import mlflow

    ensure_experiment(cfg.mlflow)
    client = mlflow.MlflowClient(cfg.mlflow.resolved_uri())
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    tags = {"umair.job": "recommend", "umair.model": cfg.model}
    if summary.get("train_run_id"):
        tags["umair.train_run_id"] = summary["train_run_id"]
    rid = client.create_run(exp.experiment_id, run_name=cfg.run_name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    metrics = {
        **summary["metrics"]["model"],
        **{f"popularity_{k}": v for k, v in summary["metrics"]["popularity"].items()},
        "users_evaluated": summary["users_evaluated"],
        "users_skipped": summary["users_skipped"],
        "relevant": summary["relevant"],
        "relevant_reachable": summary["relevant_reachable"],
        "rows": summary["rows"],
        "wall_s": summary["wall_s"],
    }
    client.log_batch(
        rid,
        metrics=[
            mlflow.entities.Metric(k, float(v), now, 0)
            for k, v in metrics.items()
            if v is not None and np.isfinite(float(v))
        ],
        params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()],
    )
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "recommend_summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        sample.to_pandas().to_csv(os.path.join(d, "topk_sample.csv"), index=False)
        if strips is not None:
            with open(os.path.join(d, "topk_strips.png"), "wb") as f:
                f.write(strips)
        client.log_artifacts(rid, d)
    client.set_terminated(rid, "FINISHED")
    return rid


def run(cfg: RecommendConfig) -> dict[str, Any]:
    """Rank for every user with Ray Data, commit the top-K parquet, measure and log; return the summary."""
    import ray.data

    t0 = time.perf_counter()
    settings = cfg.storage.to_settings()
    saved = load_model(cfg.model, settings)
    inputs, segments_uri = eval_inputs_of(cfg, saved, settings)
    users = contracts.read_table(inputs.users, "users", settings)
    all_ids = users.column("user_id").to_numpy().astype(np.int64)
    if cfg.user_ids is not None:
        unknown = sorted(set(cfg.user_ids) - set(all_ids.tolist()))
        if unknown:
            raise UnknownIdError(
                f"user {unknown[0]} is not in the users table {inputs.users}"
                + (f" ({len(unknown)} unknown user ids)" if len(unknown) > 1 else "")
            )
        user_ids = np.array(sorted(set(cfg.user_ids)), np.int64)
    else:
        user_ids = np.sort(all_ids)
    print(
        f"{TAG} model {cfg.model} ({saved.meta.get('variant', 'full')}), {len(user_ids)} users, k={cfg.k}, "
        f"as of {inputs.split}; candidates: {cfg.candidates.model_dump(mode='json')}",
        flush=True,
    )

    # Built once here (every input checked before Ray starts), put in the object store once,
    # mapped by every actor of the node; the driver's context over the same tables serves the metrics.
    t_tables = time.perf_counter()
    shared, interactions = ranking_tables(saved, inputs, cfg.candidates, settings)
    tables_s = time.perf_counter() - t_tables
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    staging = storage.join(cfg.output, "runs", run_id)
    reports = storage.join(staging, "_reports")  # the actors' memory (not part of the commit: not parquet)
    init_ray(cfg.ray)
    tables_ref = ray.put(shared)
    del shared  # from here the driver too reads the object store's copy (no second copy in this process)
    ctx = Context.of(saved, inputs, ray.get(tables_ref), interactions)
    n_blocks = max(1, min(len(user_ids) // cfg.users_per_batch, 4 * cfg.actors))
    ds = ray.data.from_arrow(
        [pa.table({"user_id": pa.array(part, pa.int64())}) for part in np.array_split(user_ids, n_blocks) if len(part)]
    )
    ds = ds.map_batches(
        Recommender,
        fn_constructor_kwargs={
            "model": cfg.model,
            "inputs": inputs,
            "tables": [tables_ref],  # in a list: the actor resolves it (ray.get) itself
            "storage_config": cfg.storage,
            "k": cfg.k,
            "threads": cfg.threads,
            "score_batch": cfg.score_batch,
            "reports": reports,
            "exposure_power": cfg.exposure_power,
        },
        batch_size=cfg.users_per_batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_cpus=1,
    )
    fs, path = storage.resolve(staging, settings)
    t_rank = time.perf_counter()
    ds.write_parquet(path, filesystem=fs)
    rank_s = time.perf_counter() - t_rank
    manifest = commit(
        cfg.output,
        run_id,
        {
            "model": cfg.model,
            "k": cfg.k,
            "as_of": inputs.split,
            "users": int(len(user_ids)),
            "candidates": cfg.candidates.model_dump(mode="json"),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        settings,
    )
    topk = read_recommendations(cfg.output, settings)
    actors = _actor_reports(reports, settings)
    print(
        f"{TAG} ranked {len(user_ids)} users in {rank_s:.1f}s ({cfg.actors} actors, "
        f"{len(user_ids) / max(rank_s, 1e-9):.1f} users/s; tables built in {tables_s:.1f}s); "
        f"committed {manifest['rows']} rows to {cfg.output} (run {run_id})",
        flush=True,
    )
    if actors:
        metrics = {f"mem.{name}.{k}": v for name, r in actors.items() for k, v in r.items()}
        print(f"{TAG} memory: " + "; ".join(memory_line(name, metrics) for name in actors), flush=True)

    m = ranking_metrics(ctx, topk, user_ids, cfg.end, cfg.ks)
    model_m, pop_m = m["model"], m["popularity"]
    sample_users = set(user_ids[: cfg.sample_users].tolist())
    sample = topk.filter(pa.array(np.isin(topk.column("user_id").to_numpy(), list(sample_users))))
    _, sources = rank_users(ctx, user_ids[: min(len(user_ids), 50)], cfg.k, cfg.score_batch, cfg.exposure_power)
    summary: dict[str, Any] = {
        "output": cfg.output,
        "run_id": run_id,
        "model": cfg.model,
        "variant": saved.meta.get("variant", "full"),
        "as_of": inputs.split,
        "test_end": cfg.end,
        "k": cfg.k,
        "users": int(len(user_ids)),
        "rows": manifest["rows"],
        "users_evaluated": model_m.users,
        "users_skipped": model_m.skipped,
        "relevant": m["relevant"],
        "relevant_reachable": m["reachable"],
        "metrics": {"model": model_m.flat(), "popularity": pop_m.flat()},
        "candidate_sources_first_50_users": sources,
        "rank_s": round(rank_s, 2),
        "tables_s": round(tables_s, 2),
        "users_per_s": round(len(user_ids) / max(rank_s, 1e-9), 2),
        "shared_tables_mb": round(sum(a.nbytes for a in ctx.shared_arrays()) / 2**20, 3),
        "actor_memory": actors,
        "train_run_id": saved.meta.get("mlflow_run_id"),
    }
    print(
        f"{TAG} test window from {inputs.split}: {model_m.users} users with bookmarks ({model_m.skipped} without, skipped), "
        f"{m['relevant']} relevant items ({m['reachable']} existed before the as-of time)"
    )
    print(f"  {'ranking':<11}" + "".join(f" {'Recall@' + str(k):>10} {'NDCG@' + str(k):>8}" for k in cfg.ks))
    for name, r in (("model", model_m), ("popularity", pop_m)):
        print(f"  {name:<11}" + "".join(f" {r.recall[k]:>10.4f} {r.ndcg[k]:>8.4f}" for k in cfg.ks))
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    params = {
        "model": cfg.model,
        "k": cfg.k,
        "exposure_power": cfg.exposure_power,
        "as_of": inputs.split,
        "test_end": cfg.end,
        "users": len(user_ids),
        "actors": cfg.actors,
        "output": cfg.output,
        "run_id": run_id,
        **{f"candidates.{k}": v for k, v in cfg.candidates.model_dump(mode="json").items()},
    }
    strips = _strips(cfg, inputs, segments_uri, topk, settings)
    summary["pictures"] = [storage.join(cfg.output, "topk_strips.png")] if strips is not None else []
    summary["mlflow_run_id"] = _mlflow_log(cfg, summary, sample, params, strips)
    storage.write_bytes(
        storage.join(cfg.output, "metrics.json"), json.dumps(summary, indent=2, default=str).encode(), settings
    )
    print(
        f"{TAG} done in {summary['wall_s']}s; metrics in {storage.join(cfg.output, 'metrics.json')}, MLflow run {summary['mlflow_run_id']}",
        flush=True,
    )
    return summary


def register(sub: Any) -> None:
    """Add ``umair recommend`` to the CLI."""
    from umair.config import load_with_flags

    def handler(args: Any) -> int:
        cfg = load_with_flags(
            args.config, RecommendConfig, args, ("model", "world", "item_features", "output", "k", "actors")
        )
        if args.user:
            cfg = cfg.model_copy(update={"user_ids": list(args.user)})
        run(cfg)
        return 0

    p = sub.add_parser(
        "recommend", help="top-K illustrations per user (Ray Data batch job), Recall@K / NDCG@K vs popularity"
    )
    p.add_argument(
        "--config",
        default="pipelines/configs/recommend.yaml",
        help="settings YAML (see pipelines/configs/recommend.yaml)",
    )
    p.add_argument("--model", help="model directory written by umair train (overrides the config)")
    p.add_argument("--world", help="sample world whose tables to use (overrides the config)")
    p.add_argument("--item-features", help="item-features table (overrides the config)")
    p.add_argument("--output", help="output directory of the top-K parquet (overrides the config)")
    p.add_argument("-k", "--k", type=int, help="recommendations per user")
    p.add_argument("--actors", type=int, help="scoring actors")
    p.add_argument("--user", type=int, action="append", help="only this user (repeatable)")
    p.set_defaults(func=handler)
