"""Ablate job: the paper's Tables 3 and 4 reproduced on one dataset and one split.

``umair ablate --config pipelines/configs/ablate.yaml`` trains and evaluates, on the same
training window and the same later test window:

- every Table-4 variant of UMAIR-FPS (:data:`~umair.model.fusion.TABLE4_VARIANTS`:
  ``full`` is UMAIR-FPS itself, then w/o ALL / STY / SEM / TSEM, w/o UMCM, UMCM_ATT /
  UMCM_SEN, ATT*K / SEN*K, w/o DCN-V2);
- the Table-3 comparison models (:data:`TABLE3_MODELS`): this project's DCN-V2-only
  configuration (:func:`~umair.model.fusion.dcn_v2_only`: DCN-V2's full-rank cross over
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
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from umair.plots import ablation_chart
from umair.reports import ablation_columns, ablation_markdown, csv_text, fmt_cell
from umair.config import MlflowConfig
from umair.training.settings import ModelOverrides
from umair import storage
from umair.config import ConfigError, Settings, StorageConfig, load_config
from umair.model.features import FeatureSettings
from umair.errors import FeatureError
from umair.model.interactions import IsoTime, NegativeSettings
from umair.model.settings import TABLE4_VARIANTS, ModelConfig

TAG = "[ablate]"
DCN_V2_ONLY = "DCN-V2-only (umair)"
DEEPCTR_NAMES = {f"{m} (deepctr)": m for m in ("DCN", "xDeepFM", "FiBiNET", "DIFM", "DCN-V2", "DCNMix")}
FINALMLP = "FinalMLP"
TABLE3_MODELS: tuple[str, ...] = (
    "DCN (deepctr)", "xDeepFM (deepctr)", "FiBiNET (deepctr)", "DIFM (deepctr)", "DCN-V2 (deepctr)",
    "DCNMix (deepctr)", FINALMLP, DCN_V2_ONLY,
)
ALL_MODELS: tuple[str, ...] = (*TABLE4_VARIANTS, *TABLE3_MODELS)


class GenerateSettings(Settings):
    """A sample world plus in-process item features (:mod:`umair.baselines.sample_features`)
    written under ``out`` and reused when they exist."""

    out: str = "outputs/ablate/sample"
    size: Literal["tiny", "small", "default"] = "default"
    seed: int = 7
    image_size: int = Field(64, ge=16, description="dual-encoder input size")
    pretext_epochs: int = Field(3, ge=0, description="pretext training on the world's tags; 0 = random-weight encoder")
    feature_seed: int = 0
    tsem_dim: int = Field(32, ge=1)


class CheckMargins(Settings):
    """AUC gaps the planted-effect checks require (one seed moves AUC by about 0.01)."""

    full_vs_dcn_v2_only: float = Field(0.05, ge=0, description="full model AUC minus DCN-V2-only AUC, all users")
    sty_on_style_users: float = Field(0.02, ge=0, description="full minus w/o STY, AUC on style-driven users")


class AblateConfig(Settings):
    """Settings of ``umair ablate`` (see pipelines/configs/ablate.yaml)."""

    world: str | None = Field("outputs/demo/world", description="sample world: tables, split, truth/users.parquet segments")
    illustrations: str | None = None
    users: str | None = None
    interactions: str | None = None
    item_features: str | None = Field("outputs/demo/features", description="item features (parquet or extraction output)")
    generate: GenerateSettings | None = Field(None, description="set to generate a world + features instead")
    split: IsoTime | None = None
    models: list[str] = Field(default_factory=lambda: list(ALL_MODELS), description="names from Table 4 and Table 3")
    model: ModelOverrides = Field(default_factory=dict, description="ModelConfig overrides of the base UMAIR-FPS")
    baselines: dict[str, dict[str, Any]] = Field(default_factory=dict, description="constructor overrides per Table-3 model")
    baseline_vectors: bool = Field(True, description="external models read e_SEM/e_STY/e_TSEM too (False: ids + metadata only)")
    features: FeatureSettings = FeatureSettings()
    negatives: NegativeSettings = NegativeSettings()
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    l2_emb: float = Field(1e-3, ge=0)
    seed: int = 0
    threads: int = Field(1, ge=1, description="torch threads of this process (feature generation and training); "
                         "more than 1 on a busy shared CPU slows small-batch training many times over")
    segments: str | None = Field(None, description="table with user_id and segment_column; default WORLD/truth/users.parquet")
    segment_column: str = "taste"
    style_segment: str = Field("style", description="the segment whose AUC shows what e_STY adds")
    check_margins: CheckMargins = CheckMargins()
    output: str = "outputs/ablate"
    run_name: str = "ablate"
    mlflow: MlflowConfig = MlflowConfig(tracking_uri="sqlite:///outputs/mlflow.db", experiment="umair-ablate")
    storage: StorageConfig = StorageConfig()

    @field_validator("models")
    @classmethod
    def _known_models(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one model")
        unknown = [m for m in v if m not in ALL_MODELS]
        if unknown:
            raise ValueError(f"unknown model name(s) {unknown}; expected names from {list(ALL_MODELS)}")
        dup = sorted({m for m in v if v.count(m) > 1})
        if dup:
            raise ValueError(f"model(s) listed twice: {dup}")
        return v


    @model_validator(mode="after")
    def _check(self) -> AblateConfig:
        bad = sorted(k for k in self.baselines if k not in DEEPCTR_NAMES and k != FINALMLP)
        if bad:
            raise ValueError(f"baselines: {bad} are not external Table-3 models; expected keys from "
                             f"{[*DEEPCTR_NAMES, FINALMLP]}")
        if self.generate is None and (self.item_features is None or
                                      (self.world is None and None in (self.illustrations, self.users, self.interactions))):
            raise ValueError("give 'item_features' and 'world' (or the three tables), or a 'generate' section")
        return self


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

    return TrainConfig(world=world, illustrations=cfg.illustrations, users=cfg.users, interactions=cfg.interactions,
                       item_features=item_features, split=cfg.split, model=cfg.model, features=cfg.features,
                       negatives=cfg.negatives, seed=cfg.seed, storage=cfg.storage)


def window_rows(prepared: Any, settings: storage.StorageSettings | None) -> tuple[Any, Any]:
    """``(train, test)`` :class:`RowInputs` of a :class:`pipelines.train.Prepared`: the
    training job's lookup tables gathered for every row of each window."""
    import torch

    from umair.training.lookup import load_lookup
    from umair.baselines.inputs import RowInputs

    lookup, user_table, _ = load_lookup(prepared.space, prepared.inputs, prepared.modalities, "cpu", settings,
                                        prepared.info.fingerprint, prepared.users_fingerprint)
    out = []
    for rows in (prepared.train_rows, prepared.test_rows):
        u = rows.column("user_row").to_numpy()
        i = rows.column("item_row").to_numpy()
        ids, vectors = lookup.ids(torch.tensor(u), torch.tensor(i)), lookup.item_vectors(torch.tensor(i))
        out.append(RowInputs.from_tensors(ids, vectors, rows.column("label").to_numpy().astype(np.float32),
                                         user_table.user_ids[u], list(prepared.space.user_fields),
                                         list(prepared.space.item_fields)))
    return out[0], out[1]


# --------------------------------------------------------------------------- models


def build_ranker(name: str, base: ModelConfig, train: Any, cfg: AblateConfig) -> Any:
    """The :class:`~umair.baselines.rankers.Ranker` of a model name of :data:`ALL_MODELS`."""
    from umair.baselines.deepctr_adapter import DeepCTRRanker
    from umair.baselines.finalmlp import FinalMLPRanker
    from umair.baselines.rankers import FusionRanker
    from umair.model.settings import dcn_v2_only, table4_variant

    sizes = {"n_users": base.n_users, "n_tags": base.n_tags, "user_fields": base.user_fields,
             "item_fields": base.item_fields}
    dims = train.dims if cfg.baseline_vectors else {}
    if name in TABLE4_VARIANTS:
        return FusionRanker(name, table4_variant(base, name), cfg.seed)
    if name == DCN_V2_ONLY:
        return FusionRanker(name, dcn_v2_only(base), cfg.seed)
    if name in DEEPCTR_NAMES:
        return DeepCTRRanker(DEEPCTR_NAMES[name], sizes, int(train.user_tags.shape[1]), dims, base.emb_dim, cfg.seed,
                             cfg.baselines.get(name), name=name)
    if name == FINALMLP:
        return FinalMLPRanker(sizes, dims, base.emb_dim, cfg.seed, name=name, **cfg.baselines.get(name, {}))
    raise ValueError(f"unknown model {name!r}; expected one of {list(ALL_MODELS)}")


def source_of(name: str) -> str:
    """Which implementation a row comes from."""
    from importlib import metadata

    if name in DEEPCTR_NAMES:
        return f"deepctr-torch {metadata.version('deepctr-torch')}"
    if name == FINALMLP:
        return f"fuxictr {metadata.version('fuxictr')} layers + paper"
    return "umair"


def evaluate_model(ranker: Any, test: Any, segments: dict[int, str]) -> dict[str, Any]:
    """Test-window AUC / logloss / GAUC overall and AUC per segment."""
    from umair.training.scoring import segment_report
    from umair.baselines.training import predict

    probs = predict(ranker, test)
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
        raise FeatureError(f"{ranker.name}: predictions outside [0, 1] or not finite")
    labels = test.labels.numpy()
    seg = segment_report(test.users, labels, probs, None, [], segments)
    out: dict[str, Any] = {k: seg["all"][k] for k in ("auc", "logloss", "gauc")}
    out["segments"] = {k: {"auc": v["auc"], "rows": v["rows"], "users": v["users"]} for k, v in seg.items() if k != "all"}
    return out


# --------------------------------------------------------------------------- the table


def planted_checks(by: dict[str, dict[str, Any]], style_segment: str,
                   margins: CheckMargins | None = None) -> dict[str, dict[str, Any]]:
    """The sample world's planted effects: the full model ahead of DCN-V2-only, and e_STY
    mattering for style-driven users (full vs w/o STY on that segment's AUC). An effect is
    met when its AUC gap reaches its margin (a gap inside one seed's noise is not an effect)."""
    m = margins or CheckMargins()
    out: dict[str, dict[str, Any]] = {}
    dcn = by.get(DCN_V2_ONLY) or by.get("w/o ALL")
    if "full" in by and dcn is not None:
        d = by["full"]["auc"] - dcn["auc"]
        out["full ahead of DCN-V2-only"] = {
            "value": d, "margin": m.full_vs_dcn_v2_only, "met": bool(d >= m.full_vs_dcn_v2_only),
            "text": f"AUC {by['full']['auc']:.4f} vs {dcn['auc']:.4f} ({d:+.4f}; needs >= +{m.full_vs_dcn_v2_only:g})"}
    key = f"auc_{style_segment}"
    if "full" in by and "w/o STY" in by and by["full"].get(key) is not None and by["w/o STY"].get(key) is not None:
        d = by["full"][key] - by["w/o STY"][key]
        out["STY matters for style-driven users"] = {
            "value": d, "margin": m.sty_on_style_users, "met": bool(d >= m.sty_on_style_users),
            "text": f"AUC on {style_segment} users {by['full'][key]:.4f} (full) vs {by['w/o STY'][key]:.4f} (w/o STY) "
                    f"({d:+.4f}; needs >= +{m.sty_on_style_users:g})"}
    return out


# --------------------------------------------------------------------------- mlflow


def _log_mlflow(cfg: AblateConfig, params: dict[str, Any], rows: list[dict[str, Any]], details: dict[str, dict[str, Any]],
                checks: dict[str, Any], files: dict[str, bytes]) -> tuple[str, dict[str, str]]:
    import mlflow
    from mlflow.entities import Metric, Param

    from pipelines.runtime import ensure_experiment

    ensure_experiment(cfg.mlflow)
    client = mlflow.MlflowClient(cfg.mlflow.resolved_uri())
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    now = int(time.time() * 1000)
    parent = client.create_run(exp.experiment_id, run_name=cfg.run_name, tags={"umair.job": "ablate"}).info.run_id
    client.log_batch(parent, params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                     metrics=[Metric(f"check.{k.replace(' ', '_').replace('-', '_')}", float(c["value"]), now, 0)
                              for k, c in checks.items()])
    children: dict[str, str] = {}
    for r in rows:
        tags = {"mlflow.parentRunId": parent, "umair.job": "ablate", "umair.model": r["model"], "umair.group": r["group"]}
        rid = client.create_run(exp.experiment_id, run_name=r["model"], tags=tags).info.run_id
        metrics = {k: r[k] for k in r if isinstance(r[k], (int, float)) and not isinstance(r[k], bool)}
        p = {"model": r["model"], "source": r["source"], "group": r["group"], **details.get(r["model"], {})}
        client.log_batch(rid, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(float(v))],
                         params=[Param(k, str(v)[:6000]) for k, v in p.items()])
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

    from umair.training.scoring import segment_map
    from umair.training.inputs import prepare
    from umair.baselines.training import fit

    t_start = time.perf_counter()
    settings = cfg.storage.to_settings()
    torch.set_num_threads(cfg.threads)
    world, features = cfg.world, cfg.item_features
    if cfg.generate is not None:
        world, features = generate_inputs(cfg.generate)
    assert features is not None  # the config validator guarantees it
    if "://" not in features and not os.path.exists(features):
        raise FeatureError(f"{features}: no item features here; run `umair demo` (it writes outputs/demo/features), "
                           "point item_features at an extraction output, or add a 'generate' section / --generate")
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
    print(f"{TAG} {len(train)} training rows, {len(test)} test rows (split {prepared.inputs.split}); vectors "
          f"{train.dims}; {len(cfg.models)} models; {cfg.epochs} epochs, batch {cfg.batch_size}, Adam lr {cfg.lr}, "
          f"L2 {cfg.l2_emb}; in-process loop, {cfg.threads} torch threads (prepared in {prep_s:.0f}s)", flush=True)

    results: dict[str, dict[str, Any]] = {}
    details: dict[str, dict[str, Any]] = {}
    for name in cfg.models:
        ranker = build_ranker(name, base, train, cfg)
        fitres = fit(ranker, train, cfg.epochs, cfg.batch_size, cfg.lr, cfg.l2_emb, cfg.seed)
        ev = evaluate_model(ranker, test, segments)
        row: dict[str, Any] = {
            "group": "Table 4" if name in TABLE4_VARIANTS else "Table 3",
            "model": name, "source": source_of(name),
            "auc": ev["auc"], "logloss": ev["logloss"], "gauc": ev["gauc"],
            **{f"auc_{s}": ev["segments"].get(s, {}).get("auc") for s in segment_names},
            "parameters": ranker.parameters, "samples_per_s": fitres.samples_per_s, "train_s": fitres.train_s,
            "final_train_loss": fitres.epoch_loss[-1],
        }
        results[name] = row
        cfg_detail = getattr(ranker, "config", None)
        details[name] = ({"model_config": cfg_detail.model_dump_json()} if cfg_detail is not None else
                         {"hyperparameters": json.dumps(getattr(ranker, "hyperparameters", {}), default=str)})
        details[name]["encode_s"] = round(fitres.encode_s, 3)
        style = row.get(f"auc_{cfg.style_segment}")
        print(f"{TAG} {name:<22} AUC={row['auc']:.4f} logloss={row['logloss']:.4f} GAUC={row['gauc']:.4f} "
              f"AUC({cfg.style_segment})={fmt_cell(style)} params={row['parameters']:,} "
              f"{row['samples_per_s']:.0f} samples/s ({row['train_s']:.0f}s)", flush=True)

    rows = [results[n] for n in cfg.models if results[n]["group"] == "Table 4"] + \
           [results[n] for n in cfg.models if results[n]["group"] == "Table 3"]
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
        ablation_chart(rows, cfg.style_segment, png, f"UMAIR-FPS Tables 3-4, split {prepared.inputs.split}, "
                                                  f"{cfg.epochs} epochs, batch {cfg.batch_size}")
        with open(png, "rb") as f:
            png_bytes = f.read()
    summary: dict[str, Any] = {
        "world": world, "item_features": features, "split": prepared.inputs.split,
        "train_rows": len(train), "test_rows": len(test), "segments": seg_uri,
        "settings": cfg.model_dump(mode="json", include={"epochs", "batch_size", "lr", "l2_emb", "seed", "threads",
                                                          "baseline_vectors", "model", "baselines"}),
        "rows": rows, "checks": checks, "machine": machine,
    }
    files = {"ablate.md": md.encode(), "ablate.csv": table_csv.encode(), "ablate.png": png_bytes,
             "ablate.json": json.dumps(summary, indent=2, default=str).encode()}
    params = {"world": world, "item_features": features, "split": prepared.inputs.split, "models": ",".join(cfg.models),
              **summary["settings"], "train_rows": len(train), "test_rows": len(test), "training": "in-process loop"}
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
    print(f"{TAG} wrote {', '.join(storage.join(cfg.output, n) for n in files)}; MLflow run {parent} "
          f"({len(children)} child runs); wall {summary['wall_s']}s", flush=True)
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
        overrides: dict[str, Any] = {k: getattr(args, k) for k in ("world", "item_features", "output", "epochs",
                                                                   "batch_size", "run_name")
                                     if getattr(args, k, None) is not None}
        if args.models:
            overrides["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
        if args.generate:
            overrides["generate"] = {**_generate_section(args.config), "size": args.generate}
        cfg = load_config(args.config, AblateConfig, overrides)
        run(cfg)
        return 0

    p = sub.add_parser("ablate", help="train and evaluate every Table-4 variant and the Table-3 models on one split")
    p.add_argument("--config", default="pipelines/configs/ablate.yaml", help="settings YAML (see pipelines/configs/ablate.yaml)")
    p.add_argument("--world", help="sample world (overrides the config)")
    p.add_argument("--item-features", help="item-features table (overrides the config)")
    p.add_argument("--generate", choices=["tiny", "small", "default"],
                   help="generate a sample world of this size + in-process item features instead of world/item_features")
    p.add_argument("--models", help=f"comma-separated model names (default: all): {', '.join(ALL_MODELS)}")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--output", help="directory of the table, chart and JSON (overrides the config)")
    p.add_argument("--run-name", help="MLflow parent run name")
    p.set_defaults(func=handler)


__all__ = ["ALL_MODELS", "TABLE3_MODELS", "AblateConfig", "ConfigError", "GenerateSettings", "run", "register"]
