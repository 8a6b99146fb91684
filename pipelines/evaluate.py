"""Evaluate job: score a trained model on the later window and explain it.

Loads a model written by ``umair train`` (weights, ModelConfig, FeatureSpace), scores the
interactions with ``ts >= split`` (the model's own training split unless a later one is
given; an earlier one is refused), and reports

- AUC, logloss (BCE of ŷ = σ(logit)) and GAUC (per-user AUC weighted by the user's
  impressions; users with one class are skipped and counted);
- the same per user segment, and the mean effective modality weight
  ``ᾱ_j = Σ_k β_k α_{k,j}`` per modality per segment (each user's impressions averaged,
  then users averaged). Segments come from a table with ``user_id`` and a segment
  column (default: a sample world's ``truth/users.parquet``, column ``taste``); without
  one every user is in ``"all"``;
- how user-aware ᾱ is (``alpha_spread``, :func:`umair.metrics.alpha_spread`): per segment
  the std over users of each user's mean ᾱ_j, and the share of users whose largest ᾱ is
  the modality of their planted taste (sample world: style -> STY, content -> SEM, tag
  -> TSEM);
- AUC / logloss / GAUC of warm vs cold users and warm vs cold items (``warm_cold``):
  warm = the id occurs in the model's training window (interactions with ``ts <`` the
  ``train_end`` its ``model.json`` records: the validation start, else the split).

The report is printed, written as JSON (``MODEL/evaluation.json`` by default) and logged
to MLflow (its own run, tagged with the training run's id) with two pictures beside it
(:mod:`umair.plots_runs`): ``alpha_by_segment.png`` (mean ᾱ per modality per segment) and
``training_curves.png`` (loss and AUC per epoch from the model's saved history); the
per-row predictions go beside it as ``predictions.parquet``: user_id, illust_id, ts, label, prob, user_warm,
item_warm and ``alpha_<modality>`` (ᾱ_j of that row) per modality. Scoring runs in this process
in batches: the test window of one evaluation fits in memory.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipelines.runtime import ensure_experiment
from umair import contracts, storage
from umair.config import MlflowConfig, Settings, StorageConfig
from umair.errors import FeatureError
from umair.metrics import alpha_spread
from umair.model.interactions import IsoTime, ItemPool, NegativeSettings, require_both_labels, window, with_negatives
from umair.model.item_features import attach_rows, check_dims, modality_coverage
from umair.training.inputs import check_encoders, eval_inputs_of, inspect_features, read_checked
from umair.training.lookup import load_lookup
from umair.training.model_io import load_model
from umair.training.scoring import score_rows, seen_before, segment_map, segment_report, warm_cold_report

TAG = "[evaluate]"


class EvaluateConfig(Settings):
    """Settings of ``umair evaluate`` (see pipelines/configs/evaluate.yaml)."""

    model: str = Field(..., description="a model directory written by umair train")
    world: str | None = Field(None, description="a sample world: its tables and truth/users.parquet segments")
    illustrations: str | None = Field(None, description="default: the world's, else the table the model was trained on")
    users: str | None = None
    interactions: str | None = None
    item_features: str | None = Field(None, description="default: the features the model was trained on")
    split: IsoTime | None = Field(None, description="start of the test window; default: the model's training split")
    end: IsoTime | None = Field(None, description="end of the test window (exclusive); default: open")
    segments: str | None = Field(
        None, description="table with user_id and segment_column; default: WORLD/truth/users.parquet"
    )
    segment_column: str = "taste"
    negatives: NegativeSettings = NegativeSettings(seed=1)
    batch_size: int = Field(4096, ge=1)
    warm_cold: bool = Field(True, description="also report warm vs cold users and items (seen in training or not)")
    checks: contracts.Checks = contracts.Checks()
    output: str | None = Field(
        None, description="JSON report; default: MODEL/evaluation.json (predictions.parquet goes beside it)"
    )
    run_name: str = "evaluate"
    mlflow: MlflowConfig = MlflowConfig(experiment="umair-train")
    storage: StorageConfig = StorageConfig()


def _print(report: dict[str, Any]) -> None:
    print(
        f"{TAG} {report['model']} ({report['variant']}) on {report['rows']} rows from {report['window']['start']}: "
        f"AUC={report['auc']:.4f} logloss={report['logloss']:.4f} GAUC={report['gauc']:.4f} "
        f"({report['gauc_users']} users with both classes)",
        flush=True,
    )
    mods = report["modalities"]
    head = f"  {'segment':<12} {'rows':>6} {'users':>5} {'AUC':>7} {'logloss':>8} {'GAUC':>7}" + "".join(
        f" {'α ' + m:>8}" for m in mods
    )
    print(head)
    for name, s in report["segments"].items():
        alpha = "".join(f" {s['alpha'].get(m, float('nan')):>8.3f}" for m in mods)
        print(
            f"  {name:<12} {s['rows']:>6} {s['users']:>5} {s['auc']:>7.4f} {s['logloss']:>8.4f} {s['gauc']:>7.4f}{alpha}"
        )
    for kind, sides in (report.get("warm_cold") or {}).items():
        for side, s in sides.items():
            print(
                f"  {side + ' ' + kind:<12} {s['rows']:>6} {s['users']:>5} {s['auc']:>7.4f} {s['logloss']:>8.4f} {s['gauc']:>7.4f}"
            )
    spread = report.get("alpha_spread") or {}
    for name, s in spread.items():
        std = ", ".join(f"{m} {v:.3f}" for m, v in s["std"].items())
        share = s["share_planted_top"]
        top = "" if share is None else f"; largest ᾱ = planted modality for {share:.0%} of its users"
        print(f"  ᾱ spread {name:<12} std over users: {std}{top}")


def _pictures(
    report: dict[str, Any], meta: dict[str, Any], out_dir: str, settings: storage.StorageSettings | None
) -> dict[str, bytes]:
    """``alpha_by_segment.png`` (mean ᾱ per modality per segment; a model with UMCM) and
    ``training_curves.png`` (the model's saved per-epoch history) in ``out_dir``; name -> PNG."""
    from umair.plots_runs import alpha_by_segment, training_curves

    pictures: dict[str, bytes] = {}
    if any(s.get("alpha") for s in report["segments"].values()):
        name = "alpha_by_segment.png"
        title = f"mean modality attention ᾱ per user segment: {report['variant']}, test window from {report['window']['start']}"
        pictures[name] = alpha_by_segment(report["segments"], storage.join(out_dir, name), settings, title=title)
    history = (meta.get("training") or {}).get("history")
    if history:
        name = "training_curves.png"
        title = f"{report['model']} ({report['variant']}): selected on {meta.get('selected_on', 'val_auc')}"
        pictures[name] = training_curves(history, storage.join(out_dir, name), settings, meta.get("best_epoch"), title)
    return pictures


def _log(cfg: EvaluateConfig, report: dict[str, Any], pictures: dict[str, bytes] | None = None) -> str:
    import mlflow

    ensure_experiment(cfg.mlflow)
    client = mlflow.MlflowClient(cfg.mlflow.resolved_uri())
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    tags = {"umair.job": "evaluate", "umair.model": cfg.model}
    if report.get("train_run_id"):
        tags["umair.train_run_id"] = report["train_run_id"]
    run = client.create_run(exp.experiment_id, run_name=cfg.run_name, tags=tags)
    rid = run.info.run_id
    params = {
        "model": cfg.model,
        "variant": report["variant"],
        "window_start": report["window"]["start"],
        "window_end": report["window"]["end"],
        "segments": report["segments_source"] or "none",
        "negatives": json.dumps(report["negatives"], sort_keys=True),
    }
    now = int(time.time() * 1000)
    metrics = [mlflow.entities.Metric(f"test_{k}", float(report[k]), now, 0) for k in ("auc", "logloss", "gauc")]
    for name, s in report["segments"].items():
        for k in ("auc", "logloss", "gauc"):
            metrics.append(mlflow.entities.Metric(f"{name}.{k}", float(s[k]), now, 0))
        for m, v in s["alpha"].items():
            metrics.append(mlflow.entities.Metric(f"{name}.alpha_{m}", float(v), now, 0))
    for kind, sides in (report.get("warm_cold") or {}).items():
        for side, s in sides.items():
            for k in ("auc", "logloss", "gauc"):
                metrics.append(mlflow.entities.Metric(f"{side}_{kind}.{k}", float(s[k]), now, 0))
    client.log_batch(
        rid,
        metrics=[m for m in metrics if np.isfinite(m.value)],
        params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()],
    )
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "evaluation.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=2, default=str)
        for name, data in (pictures or {}).items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        client.log_artifacts(rid, d)
    client.set_terminated(rid, "FINISHED")
    return rid


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score the test window; print, save and log the report; return it."""
    import torch

    t0 = time.perf_counter()
    settings = cfg.storage.to_settings()
    saved = load_model(cfg.model, settings)
    inputs, segments_uri = eval_inputs_of(cfg, saved, settings)
    ill, users, inter, checked = read_checked(inputs, settings, cfg.checks)
    for line in checked.lines():
        print(f"{TAG} warning: {line}", flush=True)
    test = window(inter, start=inputs.split, end=cfg.end)
    if test.num_rows == 0:
        raise FeatureError(
            f"{inputs.interactions}: the test window (ts >= {inputs.split}{f', < {cfg.end}' if cfg.end else ''}) is empty"
        )
    info, _ = inspect_features(inputs, settings)
    check_dims(info, {m: saved.config.vectors[m] for m in saved.modalities})
    check_encoders(info, saved)
    train_end = saved.meta.get("train_end") or saved.meta["split"]  # models before validation windows: the split
    trained_on = window(inter, end=train_end)
    pool = ItemPool.build(ill, info.illust_ids, cfg.negatives, trained_on)
    test, negatives = with_negatives(test, pool, cfg.negatives, inputs.interactions)
    require_both_labels(test, f"{inputs.interactions}: test window")
    rows = attach_rows(
        test,
        users.column("user_id").to_numpy(),
        info.illust_ids,
        inputs.item_features,
        f"{inputs.interactions} (test window)",
    )
    lookup, user_table, items = load_lookup(
        saved.space,
        inputs,
        saved.modalities,
        "cpu",
        settings,
        info.fingerprint,
        with_log=saved.config.user_history,
        interactions=inter,
    )
    user_rows = rows.column("user_row").to_numpy()
    scores = score_rows(
        saved.model,
        lookup,
        torch.as_tensor(user_rows),
        torch.as_tensor(rows.column("item_row").to_numpy()),
        cfg.batch_size,
        torch.as_tensor(rows.column("ts").to_numpy()),
    )
    user_ids = user_table.user_ids[user_rows]
    labels = rows.column("label").to_numpy()
    seg = segment_map(segments_uri, cfg.segment_column, settings)
    modalities = list(saved.config.modalities)
    per_segment = segment_report(user_ids, labels, scores.probs, scores.weights, modalities, seg)
    overall = per_segment["all"]
    report: dict[str, Any] = {
        "model": cfg.model,
        "variant": saved.meta.get("variant", "full"),
        "window": {"start": inputs.split, "end": cfg.end},
        "rows": int(len(labels)),
        "positives": int(labels.sum()),
        "users": overall["users"],
        "auc": overall["auc"],
        "logloss": overall["logloss"],
        "gauc": overall["gauc"],
        "gauc_users": overall["gauc_users"],
        "gauc_skipped": overall["gauc_skipped"],
        "gauc_weighting": "impressions",
        "modality_coverage": modality_coverage(items, rows.column("item_row").to_numpy()),
        "modalities": modalities,
        "segments_source": segments_uri,
        "segment_column": cfg.segment_column if seg else None,
        "segments": per_segment,
        "negatives": negatives,
        "train_run_id": saved.meta.get("mlflow_run_id"),
    }
    if scores.weights is not None and seg:
        report["alpha_spread"] = alpha_spread(user_ids, scores.weights, modalities, seg)
    warm = {
        "users": seen_before(test.column("user_id").to_numpy(), trained_on.column("user_id").to_numpy()),
        "items": seen_before(test.column("illust_id").to_numpy(), trained_on.column("illust_id").to_numpy()),
    }
    if cfg.warm_cold:
        report["warm_cold"] = warm_cold_report(user_ids, labels, scores.probs, warm)
        report["warm_before"] = train_end
    _print(report)
    out = cfg.output or storage.join(cfg.model, "evaluation.json")
    report["output"] = out
    report["predictions"] = storage.join(storage.parent(out), "predictions.parquet")
    storage.write_parquet(_predictions(test, labels, scores, modalities, warm), report["predictions"], settings)
    pictures = _pictures(report, saved.meta, storage.parent(out), settings)
    report["pictures"] = [storage.join(storage.parent(out), name) for name in pictures]
    report["mlflow_run_id"] = _log(cfg, report, pictures)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    storage.write_bytes(out, json.dumps(report, indent=2, default=str).encode(), settings)
    return report


def _predictions(
    test: pa.Table, labels: np.ndarray, scores: Any, modalities: list[str], warm: dict[str, np.ndarray]
) -> pa.Table:
    """One row per scored interaction: user_id, illust_id, ts, label, prob, user_warm,
    item_warm, and ``alpha_<m>`` = ᾱ_m of the row for every modality (none without UMCM)."""
    cols: dict[str, Any] = {
        "user_id": test.column("user_id"),
        "illust_id": test.column("illust_id"),
        "ts": test.column("ts"),
        "label": pa.array(labels.astype(np.int8), pa.int8()),
        "prob": pa.array(scores.probs.astype(np.float32), pa.float32()),
        "user_warm": pa.array(warm["users"], pa.bool_()),
        "item_warm": pa.array(warm["items"], pa.bool_()),
    }
    if scores.weights is not None:
        for j, m in enumerate(modalities):
            cols[f"alpha_{m}"] = pa.array(scores.weights[:, j].astype(np.float32), pa.float32())
    return pa.table(cols)


def register(sub: Any) -> None:
    """Add ``umair evaluate`` to the CLI."""
    from umair.config import load_with_flags

    def handler(args: Any) -> int:
        run(load_with_flags(args.config, EvaluateConfig, args, ("model", "world", "item_features", "output")))
        return 0

    p = sub.add_parser(
        "evaluate", help="AUC, logloss, GAUC and modality attention of a trained model on the later window"
    )
    p.add_argument("--config", required=True, help="settings YAML (see pipelines/configs/evaluate.yaml)")
    p.add_argument("--model", help="model directory written by umair train (overrides the config)")
    p.add_argument("--world", help="sample world: tables and truth segments (overrides the config)")
    p.add_argument("--item-features", help="item-features table (overrides the config)")
    p.add_argument("--output", help="JSON report path (overrides the config)")
    p.set_defaults(func=handler)
