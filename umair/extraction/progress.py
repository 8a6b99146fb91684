"""Counts and rates of an extraction run: a progress bar of the rows streamed so far
(:func:`umair.console.progress`) and one console line per committed chunk.

Every processed catalogue row becomes one feature row: ``rows_ok`` with every modality,
``rows_partial`` with some NULL (no image, an image that failed, a NaN vector);
``rows_by_modality`` counts feature rows per modality present (e_SEM ``sem``, e_STY
``sty``, e_TSEM ``tsem``). ``rows_failed`` counts error rows (an image that could not be
read or decoded, a non-finite vector; such a row is also a partial feature row), and
``rows_no_image`` the rows whose ``image_uri`` is NULL (partial rows, no error row)."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from umair.console import progress, say

LOG = "[extract]"
CHUNK_LOG_POINTS = 500  # commits kept in a summary's chunk_log


class Progress:
    """Counts of a run so far; one line per commit (:meth:`line`), and a bar of the rows
    the pipeline has delivered (:meth:`advance`, committed or not yet), opened at the first
    and closed by :meth:`summary` or :meth:`close`. ``rate`` counts from the pipeline's
    start (actor start-up and model loads included); ``steady_rate`` from the first commit
    on, once the pipeline is full."""

    def __init__(self, total: int):
        self.total, self.ok, self.failed, self.chunks = total, 0, 0, 0
        self.partial, self.no_image = 0, 0
        self.reasons: Counter[str] = Counter()
        self.modalities: Counter[str] = Counter()
        self.start = time.perf_counter()
        self.first_commit: tuple[float, int] | None = None  # (time, rows done) at the first commit
        self.last_commit = self.start
        self.commits: list[tuple[float, int]] = []  # (seconds since start, rows done) at each commit
        self.bar: Any = None

    def advance(self, rows: int) -> None:
        """``rows`` more catalogue rows came out of the pipeline (not committed yet)."""
        if self.bar is None:
            self.bar = progress(total=self.total, desc=f"{LOG} rows", unit="row")
        self.bar.update(rows)

    def close(self) -> None:
        """Remove the bar (the run ended or failed)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def add(self, descriptors: list[dict]) -> None:
        for d in descriptors:
            self.ok += int(d["features_rows"])
            self.partial += int(d.get("partial_rows", 0))
            self.failed += int(d["errors_rows"])
            self.no_image += int(d.get("no_image", 0))
            self.reasons.update(json.loads(d["reasons"]))
            self.modalities.update(json.loads(d.get("modality_rows", "{}")))
        self.chunks += 1
        self.last_commit = time.perf_counter()
        if self.first_commit is None:
            self.first_commit = (self.last_commit, self.done)
        self.commits.append((self.last_commit - self.start, self.done))

    @property
    def done(self) -> int:
        """Catalogue rows processed: each is one feature row, complete or partial."""
        return self.ok + self.partial

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def steady_rate(self) -> float | None:
        if self.first_commit is None or self.chunks < 2:
            return None
        t, rows = self.first_commit
        return (self.done - rows) / max(self.last_commit - t, 1e-9)

    def summary(self, head: dict, pipeline_s: float, wall_s: float, recovered: dict, mlflow_run_id: str) -> dict:
        """The run's summary: ``head`` (run id, output, versions, catalogue counts), then the
        outcome, the rates, timings, recovery counts and the MLflow run id. Closes the bar."""
        self.close()
        steady = self.steady_rate()
        return {
            **head,
            "rows_ok": self.ok,
            "rows_partial": self.partial,
            "rows_by_modality": dict(sorted(self.modalities.items())),
            "rows_failed": self.failed,
            "rows_no_image": self.no_image,
            "failed_by_reason": dict(sorted(self.reasons.items())),
            "chunks": self.chunks,
            "images_per_s": round(self.done / pipeline_s, 2) if self.done else 0.0,
            "steady_images_per_s": round(steady, 2) if steady is not None else None,
            "first_commit_s": round(self.first_commit[0] - self.start, 2) if self.first_commit else None,
            "pipeline_s": round(pipeline_s, 2),
            "wall_s": round(wall_s, 2),
            "recovered": recovered,
            "mlflow_run_id": mlflow_run_id,
            "chunk_log": self.chunk_log(),
        }

    def chunk_log(self, points: int = CHUNK_LOG_POINTS) -> list[dict[str, float]]:
        """``[{"chunk", "t_s", "rows_done"}, ...]`` at the commits, for the images/s-over-time
        picture: every commit of a short run; at most ``points`` evenly spread ones (and the
        last) of a long one, so a 50,000-chunk summary stays small."""
        step = max(1, -(-len(self.commits) // points))
        keep = list(range(step - 1, len(self.commits), step))
        if self.commits and keep[-1] != len(self.commits) - 1:
            keep.append(len(self.commits) - 1)
        return [{"chunk": i + 1, "t_s": round(self.commits[i][0], 3), "rows_done": self.commits[i][1]} for i in keep]

    def line(self, chunk_rows: int) -> str:
        pct = 100.0 * self.done / max(self.total, 1)
        steady = self.steady_rate()
        steady_note = f" ({steady:.1f} since the first commit)" if steady is not None else ""
        return (
            f"{LOG} chunk {self.chunks}: committed {chunk_rows} rows; {self.done}/{self.total} done ({pct:.1f}%), "
            f"{self.ok} ok, {self.partial} missing a modality ({self.failed} errors, {self.no_image} without image), "
            f"{self.rate():.1f} images/s{steady_note}"
        )


def print_summary(summary: dict) -> None:
    """The end-of-run lines a person reads."""
    reasons = ", ".join(f"{r} {n}" for r, n in summary["failed_by_reason"].items()) or "none"
    per = ", ".join(f"{m} {n}" for m, n in summary["rows_by_modality"].items()) or "no vectors"
    say(
        f"{LOG} done: {summary['rows_ok'] + summary['rows_partial']} feature rows ({per}): "
        f"{summary['rows_ok']} with every modality, {summary['rows_partial']} missing one; "
        f"{summary['rows_failed']} errors ({reasons}), {summary['rows_no_image']} without image_uri; "
        f"{summary['to_process']} processed, {summary['already_done']} skipped as already extracted; "
        f"{summary['images_per_s']} images/s; wall {summary['wall_s']}s; {summary['chunks']} chunks committed"
    )
    brief = {k: v for k, v in summary.items() if k != "chunk_log"}  # the picture shows it
    say(f"{LOG} summary: {json.dumps(brief, sort_keys=True)}")


SUMMARY_METRICS = (
    "catalogue_rows", "selected_rows", "already_done", "to_process", "rows_ok", "rows_partial", "rows_failed",
    "rows_no_image", "chunks",
    "images_per_s", "steady_images_per_s", "first_commit_s", "pipeline_s", "wall_s",
)  # fmt: skip


def summary_metrics(summary: dict) -> dict[str, float]:
    """The MLflow metrics of a run's summary: its counts, rates and timings, and the error
    rows per ``stage:reason`` as ``failed.<stage>.<reason>``, the feature rows per modality
    present as ``rows_with.<modality>``."""
    out = {k: float(summary[k]) for k in SUMMARY_METRICS if summary.get(k) is not None}
    out.update({f"rows_with.{m}": float(n) for m, n in summary.get("rows_by_modality", {}).items()})
    out.update({f"failed.{r.replace(':', '.')}": float(n) for r, n in summary["failed_by_reason"].items()})
    return out
