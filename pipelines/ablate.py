"""Ablate job: the paper's Tables 3 and 4 reproduced on one dataset and one split.

``umair ablate --config pipelines/configs/ablate.yaml`` trains and evaluates, on the same
training window and the same later test window:

- every Table-4 variant of UMAIR-FPS (:data:`~umair.model.settings.TABLE4_VARIANTS`:
  ``full`` is UMAIR-FPS itself, then w/o ALL / STY / SEM / TSEM, w/o UMCM, UMCM_ATT /
  UMCM_SEN, ATT*K / SEN*K, w/o DCN-V2);
- the Table-3 comparison models (:data:`TABLE3_MODELS`): this project's DCN-V2-only
  configuration (:func:`~umair.model.settings.dcn_v2_only`: DCN-V2's full-rank cross over
  the id and metadata embeddings; "w/o ALL" is the same with the low-rank mixture cross),
  deepctr-torch's DCN, DCN-V2 (DCN, matrix cross), DCNMix, xDeepFM, FiBiNET and DIFM
  through :mod:`umair.baselines.deepctr_adapter`, and FinalMLP
  (:mod:`umair.baselines.finalmlp`: fuxictr's layers + the paper's FS / aggregation).

Inputs are prepared once by the training job's own :func:`pipelines.train.prepare`
(contracts, training window, negatives, feature space fitted on the training window,
standardised vectors) and gathered once per window into
:class:`~umair.baselines.inputs.RowInputs`, so every model reads the same rows. Every
model is trained by the same in-process loop (:func:`umair.baselines.training.fit`: same
shuffles, batch size, epochs, Adam, BCE + L2 on embeddings; one process, ``threads``
torch threads; not Ray Train, so 20+ models fit in minutes on 2 cores) and its
throughput measured the same way (training rows / loop wall time).

Per model the table holds AUC, logloss, GAUC on the test window, AUC per user segment
(the world's planted ``taste`` from ``truth/users.parquet``; ``style`` is the
style-driven users), parameters, training samples/s and seconds. Written to ``output``::

    OUTPUT/ablate.md   ablate.csv   ablate.png   ablate.json

and logged to MLflow: one parent run (settings, the planted-effect checks, the files as
artifacts) with one child run per model.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any

import numpy as np

from umair import storage
from umair.ablation import (
    ALL_MODELS,
    AblateConfig,
    GenerateSettings,
    build_ranker,
    evaluate_model,
    planted_checks,
    source_of,
)
from umair.config import ConfigError, load_config
from umair.errors import FeatureError
from umair.model.settings import TABLE4_VARIANTS
from umair.plots import ablation_chart
from umair.reports import ablation_columns, ablation_markdown, csv_text, fmt_cell

TAG = "[ablate]"


# --------------------------------------------------------------------------- inputs


def generate_inputs(gen: GenerateSettings) -> tuple[str, str]:
    """Write (or reuse) a sample world and its in-process item features under ``gen.out``;
    returns ``(world, item_features)`` paths."""
    from umair.baselines.sample_features import fixture_item_features, pretext_encoder
    from umair.sample.world import load_world, write_world

    root = os.path.abspath(gen.out)
    world_dir = os.path.join(root, f"world-{gen.size}-{gen.seed}")
    if os.path.exists(os.path.join(world_dir, "world.json")):
        world = load_world(world_dir)
    else:
        print(f"{TAG} writing a {gen.size} sample world (seed {gen.seed}) to {world_dir}", flush=True)
        world = write_world(world_dir, gen.size, seed=gen.seed, progress=False, overwrite=True)
    name = f"features-{gen.size}-{gen.seed}-{gen.image_size}px-p{gen.pretext_epochs}-s{gen.feature_seed}-t{gen.tsem_dim}.parquet"
    features = os.path.join(root, name)
    if not os.path.exists(features):
        t0 = time.perf_counter()
        encoder, version = None, None
        if gen.pretext_epochs:
            encoder = pretext_encoder(world, gen.image_size, gen.pretext_epochs, gen.feature_seed)
            version = f"sample-resnet18-{gen.image_size}px-pretext{gen.pretext_epochs}-seed{gen.feature_seed}"
        fixture_item_features(world, features, encoder, gen.image_size, gen.tsem_dim, gen.feature_seed, version)
        print(f"{TAG} item features written to {features} in {time.perf_counter() - t0:.0f}s", flush=True)
    return world_dir, features


def train_settings(cfg: AblateConfig, world: str | None, item_features: str) -> Any:
    """The :class:`pipelines.train.TrainConfig` whose :func:`prepare` gives the rows."""
    from umair.training.settings import TrainConfig

    return TrainConfig(
        world=world,
        illustrations=cfg.illustrations,
        users=cfg.users,
        interactions=cfg.interactions,
        item_features=item_features,
        split=cfg.split,
        model=cfg.model,
        features=cfg.features,
        negatives=cfg.negatives,
        seed=cfg.seed,
        storage=cfg.storage,
    )


def window_rows(prepared: Any, settings: storage.StorageSettings | None) -> tuple[Any, Any]:
    """``(train, test)`` :class:`RowInputs` of a :class:`pipelines.train.Prepared`: the
    training job's lookup tables gathered for every row of each window."""
    import torch

    from umair.baselines.inputs import RowInputs
    from umair.training.lookup import load_lookup

    lookup, user_table, _ = load_lookup(
        prepared.space,
        prepared.inputs,
        prepared.modalities,
        "cpu",
        settings,
        prepared.info.fingerprint,
        prepared.users_fingerprint,
    )
    out = []
    for rows in (prepared.train_rows, prepared.test_rows):
        u = rows.column("user_row").to_numpy()
        i = rows.column("item_row").to_numpy()
        ids, vectors = lookup.ids(torch.tensor(u), torch.tensor(i)), lookup.item_vectors(torch.tensor(i))
        out.append(
            RowInputs.from_tensors(
                ids,
                vectors,
                rows.column("label").to_numpy().astype(np.float32),
                user_table.user_ids[u],
                list(prepared.space.user_fields),
                list(prepared.space.item_fields),
            )
        )
    return out[0], out[1]


# --------------------------------------------------------------------------- models


# --------------------------------------------------------------------------- the table


# --------------------------------------------------------------------------- mlflow


def _log_mlflow(
    cfg: AblateConfig,
    params: dict[str, Any],
    rows: list[dict[str, Any]],
    details: dict[str, dict[str, Any]],
    checks: dict[str, Any],
    files: dict[str, bytes],
) -> tuple[str, dict[str, str]]:
    import mlflow
    from mlflow.entities import Metric, Param

    from pipelines.runtime import ensure_experiment

    ensure_experiment(cfg.mlflow)
    client = mlflow.MlflowClient(cfg.mlflow.resolved_uri())
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    now = int(time.time() * 1000)
    parent = client.create_run(exp.experiment_id, run_name=cfg.run_name, tags={"umair.job": "ablate"}).info.run_id
    client.log_batch(
        parent,
        params=[Param(k, str(v)[:6000]) for k, v in params.items()],
        metrics=[
            Metric(f"check.{k.replace(' ', '_').replace('-', '_')}", float(c["value"]), now, 0)
            for k, c in checks.items()
        ],
    )
    children: dict[str, str] = {}
    for r in rows:
        tags = {
            "mlflow.parentRunId": parent,
            "umair.job": "ablate",
            "umair.model": r["model"],
            "umair.group": r["group"],
        }
        rid = client.create_run(exp.experiment_id, run_name=r["model"], tags=tags).info.run_id
        metrics = {k: r[k] for k in r if isinstance(r[k], (int, float)) and not isinstance(r[k], bool)}
        p = {"model": r["model"], "source": r["source"], "group": r["group"], **details.get(r["model"], {})}
        client.log_batch(
            rid,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(float(v))],
            params=[Param(k, str(v)[:6000]) for k, v in p.items()],
        )
        client.set_terminated(rid, "FINISHED")
        children[r["model"]] = rid
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        client.log_artifacts(parent, d)
    client.set_terminated(parent, "FINISHED")
    return parent, children


# --------------------------------------------------------------------------- the job


def run(cfg: AblateConfig) -> dict[str, Any]:
    """Train and evaluate every model of ``cfg.models``; write, print and log the table."""
    import torch

    from umair.baselines.training import fit
    from umair.training.inputs import prepare
    from umair.training.scoring import segment_map

    t_start = time.perf_counter()
    settings = cfg.storage.to_settings()
    torch.set_num_threads(cfg.threads)
    world, features = cfg.world, cfg.item_features
    if cfg.generate is not None:
        world, features = generate_inputs(cfg.generate)
    assert features is not None  # the config validator guarantees it
    if "://" not in features and not os.path.exists(features):
        raise FeatureError(
            f"{features}: no item features here; run `umair demo` (it writes outputs/demo/features), "
            "point item_features at an extraction output, or add a 'generate' section / --generate"
        )
    t0 = time.perf_counter()
    prepared = prepare(train_settings(cfg, world, features))
    train, test = window_rows(prepared, settings)
    prep_s = time.perf_counter() - t0
    base = prepared.model_config
    seg_uri = cfg.segments
    if seg_uri is None and world is not None:
        candidate = storage.join(world, "truth", "users.parquet")
        seg_uri = candidate if storage.exists(candidate, settings) else None
    segments = segment_map(seg_uri, cfg.segment_column, settings)
    segment_names = sorted(set(segments.values()))
    print(
        f"{TAG} {len(train)} training rows, {len(test)} test rows (split {prepared.inputs.split}); vectors "
        f"{train.dims}; {len(cfg.models)} models; {cfg.epochs} epochs, batch {cfg.batch_size}, Adam lr {cfg.lr}, "
        f"L2 {cfg.l2_emb}; in-process loop, {cfg.threads} torch threads (prepared in {prep_s:.0f}s)",
        flush=True,
    )

    results: dict[str, dict[str, Any]] = {}
    details: dict[str, dict[str, Any]] = {}
    for name in cfg.models:
        ranker = build_ranker(name, base, train, cfg)
        fitres = fit(ranker, train, cfg.epochs, cfg.batch_size, cfg.lr, cfg.l2_emb, cfg.seed)
        ev = evaluate_model(ranker, test, segments)
        row: dict[str, Any] = {
            "group": "Table 4" if name in TABLE4_VARIANTS else "Table 3",
            "model": name,
            "source": source_of(name),
            "auc": ev["auc"],
            "logloss": ev["logloss"],
            "gauc": ev["gauc"],
            **{f"auc_{s}": ev["segments"].get(s, {}).get("auc") for s in segment_names},
            "parameters": ranker.parameters,
            "samples_per_s": fitres.samples_per_s,
            "train_s": fitres.train_s,
            "final_train_loss": fitres.epoch_loss[-1],
        }
        results[name] = row
        cfg_detail = getattr(ranker, "config", None)
        details[name] = (
            {"model_config": cfg_detail.model_dump_json()}
            if cfg_detail is not None
            else {"hyperparameters": json.dumps(getattr(ranker, "hyperparameters", {}), default=str)}
        )
        details[name]["encode_s"] = round(fitres.encode_s, 3)
        style = row.get(f"auc_{cfg.style_segment}")
        print(
            f"{TAG} {name:<22} AUC={row['auc']:.4f} logloss={row['logloss']:.4f} GAUC={row['gauc']:.4f} "
            f"AUC({cfg.style_segment})={fmt_cell(style)} params={row['parameters']:,} "
            f"{row['samples_per_s']:.0f} samples/s ({row['train_s']:.0f}s)",
            flush=True,
        )

    rows = [results[n] for n in cfg.models if results[n]["group"] == "Table 4"] + [
        results[n] for n in cfg.models if results[n]["group"] == "Table 3"
    ]
    checks = planted_checks(results, cfg.style_segment, cfg.check_margins)
    import platform

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load avg {tuple(round(x, 2) for x in os.getloadavg())}"
    header = [
        f"Data: world `{world}`, item features `{features}`; split {prepared.inputs.split}: "
        f"{len(train):,} training rows, {len(test):,} test rows; segments from `{seg_uri}` (column `{cfg.segment_column}`).",
        f"Training: every model by the same in-process loop (`umair.baselines.training.fit`; not Ray Train), "
        f"{cfg.epochs} epochs, batch {cfg.batch_size}, Adam lr {cfg.lr}, L2 {cfg.l2_emb} on every embedding table, "
        f"seed {cfg.seed}, {cfg.threads} torch threads; external models read "
        f"{'ids, metadata and the e_SEM/e_STY/e_TSEM vectors' if cfg.baseline_vectors else 'ids and metadata only'}; "
        f"samples/s = training rows of all epochs / loop wall time.",
        f"Machine: {machine}; date {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC.",
    ]
    columns = ablation_columns(segment_names)
    md = ablation_markdown(rows, segment_names, header, checks)
    table_csv = csv_text(rows, columns)
    os.makedirs(cfg.output, exist_ok=True) if "://" not in cfg.output else None
    with tempfile.TemporaryDirectory() as d:
        png = os.path.join(d, "ablate.png")
        ablation_chart(
            rows,
            cfg.style_segment,
            png,
            f"UMAIR-FPS Tables 3-4, split {prepared.inputs.split}, {cfg.epochs} epochs, batch {cfg.batch_size}",
        )
        with open(png, "rb") as f:
            png_bytes = f.read()
    summary: dict[str, Any] = {
        "world": world,
        "item_features": features,
        "split": prepared.inputs.split,
        "train_rows": len(train),
        "test_rows": len(test),
        "segments": seg_uri,
        "settings": cfg.model_dump(
            mode="json",
            include={
                "epochs",
                "batch_size",
                "lr",
                "l2_emb",
                "seed",
                "threads",
                "baseline_vectors",
                "model",
                "baselines",
            },
        ),
        "rows": rows,
        "checks": checks,
        "machine": machine,
    }
    files = {
        "ablate.md": md.encode(),
        "ablate.csv": table_csv.encode(),
        "ablate.png": png_bytes,
        "ablate.json": json.dumps(summary, indent=2, default=str).encode(),
    }
    params = {
        "world": world,
        "item_features": features,
        "split": prepared.inputs.split,
        "models": ",".join(cfg.models),
        **summary["settings"],
        "train_rows": len(train),
        "test_rows": len(test),
        "training": "in-process loop",
    }
    parent, children = _log_mlflow(cfg, params, rows, details, checks, files)
    summary["mlflow_run_id"], summary["mlflow_child_runs"] = parent, children
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    files["ablate.json"] = json.dumps(summary, indent=2, default=str).encode()
    for name, data in files.items():
        storage.write_bytes(storage.join(cfg.output, name), data, settings)
    print(md, flush=True)
    for k, c in checks.items():
        if not c["met"]:
            print(f"{TAG} WARNING: planted effect not shown: {k}: {c['text']}", flush=True)
    print(
        f"{TAG} wrote {', '.join(storage.join(cfg.output, n) for n in files)}; MLflow run {parent} "
        f"({len(children)} child runs); wall {summary['wall_s']}s",
        flush=True,
    )
    return summary


def _generate_section(path: str) -> dict[str, Any]:
    """The config file's ``generate`` mapping ({} when absent or null), for ``--generate``."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    section = data.get("generate") if isinstance(data, dict) else None
    return dict(section) if isinstance(section, dict) else {}


def register(sub: Any) -> None:
    """Add ``umair ablate`` to the CLI."""

    def handler(args: Any) -> int:
        overrides: dict[str, Any] = {
            k: getattr(args, k)
            for k in ("world", "item_features", "output", "epochs", "batch_size", "run_name")
            if getattr(args, k, None) is not None
        }
        if args.models:
            overrides["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
        if args.generate:
            overrides["generate"] = {**_generate_section(args.config), "size": args.generate}
        cfg = load_config(args.config, AblateConfig, overrides)
        run(cfg)
        return 0

    p = sub.add_parser("ablate", help="train and evaluate every Table-4 variant and the Table-3 models on one split")
    p.add_argument(
        "--config", default="pipelines/configs/ablate.yaml", help="settings YAML (see pipelines/configs/ablate.yaml)"
    )
    p.add_argument("--world", help="sample world (overrides the config)")
    p.add_argument("--item-features", help="item-features table (overrides the config)")
    p.add_argument(
        "--generate",
        choices=["tiny", "small", "default"],
        help="generate a sample world of this size + in-process item features instead of world/item_features",
    )
    p.add_argument("--models", help=f"comma-separated model names (default: all): {', '.join(ALL_MODELS)}")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--output", help="directory of the table, chart and JSON (overrides the config)")
    p.add_argument("--run-name", help="MLflow parent run name")
    p.set_defaults(func=handler)
