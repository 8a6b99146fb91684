"""The README's main job: every stage of the workflow, in order, on the sample world.

Generate the sample world, validate it against the data contracts, print its summary,
then run each configured stage (its own YAML under pipelines/configs/) with the same
code a cluster runs, in Ray's local mode.
"""

from __future__ import annotations

import importlib
import os
import shutil
import time

from umair.config import DemoConfig, load_config
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
    print(f"\n== {name} ==", flush=True)
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
    for k, v in summarize(world).items():
        print(f"  {k:<22} {v}")

    timings = {}
    for name, cfg in stage_settings.items():
        t = _stage(name)
        importlib.import_module(STAGES[name][0]).run(cfg)
        timings[name] = round(time.perf_counter() - t, 1)
        print(f"{name} finished in {timings[name]}s", flush=True)

    print(f"\ndemo finished in {time.perf_counter() - total:.1f}s {timings if timings else ''}")
    return 0
