"""The README's main job: every stage of the workflow, in order, on the sample world.

Generate the sample world, validate it against the data contracts, print its summary,
then run each configured stage (its own YAML under pipelines/configs/) with the same
code a cluster runs, in Ray's local mode. After ``train`` and ``evaluate`` it closes with
the planted-taste table (:mod:`umair.training.planted`): AUC and ᾱ per planted taste of
the trained model beside its ``w/o STY`` and DCN-V2-only ablations (trained in this
process on the same inputs with the same recipe), one line per planted effect saying
whether it was recovered, written to ``<train output>/../planted.{md,json}``. After
``extract`` it draws the neighbour sheets of one illustration by style and by semantic
(the paper's Fig. 5, ``umair similar``) under ``<root>/similar/``. It ends by writing
``<root>/demo.json`` (each stage's YAML and time, the world's summary) and the run's
self-contained HTML page ``<root>/report.html`` (``umair report``), and prints its path;
``<root>`` is ``clean_dir``, else the directory holding the world.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import time
from typing import Any

import yaml

from pipelines.report import ReportConfig
from pipelines.report import run as write_report
from umair import storage as st
from umair.config import DemoConfig, load_config
from umair.reports import demo_summary
from umair.sample.world import load_world, summarize, write_world

# stage name -> (module, settings class name); each module has run(settings)
STAGES = {
    "pretrain-image": ("pipelines.pretrain_image", "PretrainImageConfig"),
    "finetune-text": ("pipelines.finetune_text", "FinetuneTextConfig"),
    "extract": ("pipelines.extract", "ExtractConfig"),
    "train": ("pipelines.train", "TrainConfig"),
    "evaluate": ("pipelines.evaluate", "EvaluateConfig"),
    "recommend": ("pipelines.recommend", "RecommendConfig"),
    "tune": ("pipelines.tune", "TuneConfig"),
}


def _stage(name: str) -> float:
    print(f"== {name} ==", flush=True)
    return time.perf_counter()


def run_demo(settings: DemoConfig) -> int:
    unknown = [s for s in settings.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"demo config: stages: unknown stage(s) {unknown}; expected some of {list(STAGES)}")
    stage_settings = {}
    for name, path in settings.stages.items():  # validate every stage's settings before any work
        module, cls = STAGES[name]
        stage_settings[name] = load_config(path, getattr(importlib.import_module(module), cls))
    storage = settings.storage.to_settings()
    root = settings.clean_dir or st.parent(settings.world.out)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    total = time.perf_counter()
    if settings.clean_dir and os.path.isdir(settings.clean_dir):
        print(f"removing the previous demo outputs in {settings.clean_dir}")
        shutil.rmtree(settings.clean_dir)

    t = _stage("sample world")
    w = settings.world
    write_world(w.out, w.size, w.seed, w.overwrite, storage)
    print(f"wrote {w.size} world (seed {w.seed}) to {w.out} in {time.perf_counter() - t:.1f}s")

    t = _stage("validate against the data contracts")
    world = load_world(w.out, storage)
    print(f"all tables valid, every image present ({time.perf_counter() - t:.1f}s)")
    world_summary = summarize(world)
    shown = [(k, v) for k, v in world_summary.items() if k != "root"]
    for part in (shown[: len(shown) // 2], shown[len(shown) // 2 :]):  # two lines, not one per figure
        print("  " + ", ".join(f"{k} {v}" for k, v in part))

    timings = {}
    for name, cfg in stage_settings.items():
        t = _stage(name)
        importlib.import_module(STAGES[name][0]).run(cfg)
        timings[name] = round(time.perf_counter() - t, 1)
        print(f"{name} finished in {timings[name]}s", flush=True)

    planted = None
    if "train" in stage_settings and "evaluate" in stage_settings:
        t = _stage("planted tastes: the model vs its w/o STY and DCN-V2-only ablations")
        planted = planted_section(stage_settings["train"], stage_settings["evaluate"], storage)
        timings["planted"] = round(time.perf_counter() - t, 1)

    if "extract" in stage_settings:
        t = _stage("neighbour sheets: one illustration by style and by semantic (paper Fig. 5)")
        neighbour_sheets(stage_settings["extract"].output, w.out, root, settings.storage)
        timings["similar"] = round(time.perf_counter() - t, 1)

    t = _stage("report")
    record = {
        "format": "umair-demo-run/1",
        "started_at": started,
        "wall_s": round(time.perf_counter() - total, 1),
        "demo_yaml": yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False),
        "stages": {
            name: {"config": path, "yaml": _text(path), "seconds": timings.get(name)}
            for name, path in settings.stages.items()
        },
        "steps_s": timings,
        "world": world_summary,
    }
    st.write_bytes(st.join(root, "demo.json"), json.dumps(record, indent=2, default=str).encode(), storage)
    result = write_report(ReportConfig(run_dir=root, storage=settings.storage))
    timings["report"] = round(time.perf_counter() - t, 1)
    print("\n".join(_summary(stage_settings, timings, time.perf_counter() - total, root, planted, result.out, storage)))
    return 0


def _summary(
    stage_settings: dict[str, Any],
    timings: dict[str, float],
    wall_s: float,
    root: str,
    planted: dict[str, Any] | None,
    report_path: str,
    storage: st.StorageSettings,
) -> list[str]:
    """The final screen (:func:`umair.reports.demo_summary`) from what the stages wrote."""
    outputs = {"all under": root}
    ranking = None
    if "train" in stage_settings:
        outputs["model"] = stage_settings["train"].output
    if "recommend" in stage_settings:
        rec = stage_settings["recommend"].output
        outputs["top-K lists"] = rec
        ranking = json.loads(st.read_bytes(st.join(rec, "metrics.json"), storage))["metrics"]
    mlflow_cfg = next((getattr(c, "mlflow", None) for c in stage_settings.values() if getattr(c, "mlflow", None)), None)
    mlflow_uri = (mlflow_cfg.tracking_uri or mlflow_cfg.resolved_uri()) if mlflow_cfg is not None else None
    return demo_summary(timings, wall_s, outputs, planted, ranking, report_path, mlflow_uri)


def _text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def neighbour_sheets(features: str, world: str, root: str, storage: Any) -> list[str]:
    """Contact sheets of the first illustration's nearest neighbours by style (e_STY) and by
    semantic (e_SEM): ``<root>/similar/<id>-style.png`` and ``<id>-semantic.png``."""
    from pipelines.similar import SimilarConfig
    from pipelines.similar import run as similar
    from umair import contracts

    ids = contracts.read_table(st.join(world, "illustrations.parquet"), "illustrations", storage.to_settings())
    query = int(min(ids.column("illust_id").to_pylist()))
    outs = []
    for by in ("style", "semantic"):
        out = st.join(root, "similar", f"{query}-{by}.png")
        found = similar(
            SimilarConfig(item_features=features, world=world, by=by, k=8, out=out, storage=storage), query, table=False
        )
        shares = ", ".join(f"{k.replace('_', ' ')} {v:.0%}" for k, v in found["shares"].items())
        print(f"[similar] {found['space']} neighbours of {query}: {shares} of {len(found['neighbours'])} -> {out}")
        outs.append(out)
    return outs


def planted_section(train_cfg: Any, eval_cfg: Any, settings: Any) -> dict[str, Any]:
    """The closing table: the evaluated model's row (its ``evaluation.json``) and the
    ``w/o STY`` / DCN-V2-only rows trained here; printed with one verdict per effect."""
    from umair import contracts
    from umair import storage as st
    from umair.config import usable_cores
    from umair.training.inputs import prepare
    from umair.training.local import LocalRecipe
    from umair.training.planted import ablation_rows, evaluated_row, planted_markdown, planted_verdicts
    from umair.training.scoring import segment_map

    report = json.loads(st.read_bytes(eval_cfg.output or st.join(eval_cfg.model, "evaluation.json"), settings))
    full = evaluated_row(report)
    prepared = prepare(train_cfg)
    segments = segment_map(report["segments_source"], report.get("segment_column") or "taste", settings)
    user_ids = contracts.read_table(prepared.inputs.users, "users", settings).column("user_id").to_numpy()
    recipe = LocalRecipe(  # the training job's recipe; this process has the machine to itself now
        train_cfg.epochs,
        train_cfg.batch_size * train_cfg.num_workers,
        train_cfg.lr,
        train_cfg.l2_emb,
        train_cfg.seed,
        threads=usable_cores(),
    )
    rows = [full, *ablation_rows(prepared, recipe, segments, user_ids)]
    table = planted_markdown(rows)
    verdicts = planted_verdicts(full, rows[1], rows[2])
    out = st.join(st.parent(train_cfg.output), "planted")  # the final screen shows it; the full table is here
    st.write_bytes(out + ".md", (table + "\n\n" + "\n".join(f"- {v}" for v in verdicts) + "\n").encode(), settings)
    result = {"rows": rows, "verdicts": verdicts}
    st.write_bytes(out + ".json", json.dumps(result, indent=2, default=str).encode(), settings)
    print(f"planted-taste table: {out}.md ({out}.json)")
    return result
