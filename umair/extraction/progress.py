"""Counts and rates of an extraction run, one console line per committed chunk."""

from __future__ import annotations

import json
import time
from collections import Counter

LOG = "[extract]"


class Progress:
    """Counts of a run so far; prints one line per commit. ``rate`` counts from the
    pipeline's start (actor start-up and model loads included); ``steady_rate`` from the
    first commit on, once the pipeline is full."""

    def __init__(self, total: int):
        self.total, self.ok, self.failed, self.chunks = total, 0, 0, 0
        self.reasons: Counter[str] = Counter()
        self.start = time.perf_counter()
        self.first_commit: tuple[float, int] | None = None  # (time, rows done) at the first commit
        self.last_commit = self.start

    def add(self, descriptors: list[dict]) -> None:
        for d in descriptors:
            self.ok += int(d["features_rows"])
            self.failed += int(d["errors_rows"])
            self.reasons.update(json.loads(d["reasons"]))
        self.chunks += 1
        self.last_commit = time.perf_counter()
        if self.first_commit is None:
            self.first_commit = (self.last_commit, self.done)

    @property
    def done(self) -> int:
        return self.ok + self.failed

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def steady_rate(self) -> float | None:
        if self.first_commit is None or self.chunks < 2:
            return None
        t, rows = self.first_commit
        return (self.done - rows) / max(self.last_commit - t, 1e-9)

    def line(self, chunk_rows: int) -> str:
        pct = 100.0 * self.done / max(self.total, 1)
        steady = self.steady_rate()
        steady_note = f" ({steady:.1f} since the first commit)" if steady is not None else ""
        return (f"{LOG} chunk {self.chunks}: committed {chunk_rows} rows; {self.done}/{self.total} done ({pct:.1f}%), "
                f"{self.ok} ok, {self.failed} failed, {self.rate():.1f} images/s{steady_note}")
