"""The README's main job: every stage of the workflow, in order, on the sample world.

Today: generate the sample world, validate it against the data contracts, print its
summary. Later stages (pretext training, text fine-tuning, extraction, training,
tuning, evaluation) join here as they are built.
"""

from __future__ import annotations

import time

from umair.config import DemoConfig
from umair.sample.world import load_world, summarize, write_world


def _stage(name: str) -> float:
    print(f"\n== {name} ==", flush=True)
    return time.perf_counter()


def run_demo(settings: DemoConfig) -> int:
    storage = settings.storage.to_settings()
    total = time.perf_counter()

    t = _stage("1. sample world")
    w = settings.world
    write_world(w.out, w.size, w.seed, w.overwrite, storage)
    print(f"wrote {w.size} world (seed {w.seed}) to {w.out} in {time.perf_counter() - t:.1f}s")

    t = _stage("2. validate against the data contracts")
    world = load_world(w.out, storage)
    print(f"all tables valid, every image present ({time.perf_counter() - t:.1f}s)")

    _stage("3. summary")
    for k, v in summarize(world).items():
        print(f"  {k:<22} {v}")

    print(f"\ndemo finished in {time.perf_counter() - total:.1f}s")
    return 0
