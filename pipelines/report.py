"""``umair report RUN_DIR``: one self-contained HTML page of a run directory.

The demo's ``outputs/demo`` (or any job's output directory, local or s3://): its
settings, metrics tables and every picture, inlined, readable offline
(:mod:`umair.html_report`). Written to ``RUN_DIR/report.html`` unless ``--out``. No Ray.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from umair.config import Settings, StorageConfig
from umair.html_report import ReportResult, write_report

TAG = "[report]"


class ReportConfig(Settings):
    """Settings of ``umair report``."""

    run_dir: str = Field("outputs/demo", description="the run directory to report on (local or s3://)")
    out: str | None = Field(None, description="HTML file; default RUN_DIR/report.html")
    title: str | None = None
    storage: StorageConfig = StorageConfig()


def run(cfg: ReportConfig) -> ReportResult:
    """Write the page and print where it is; return what it holds."""
    result = write_report(cfg.run_dir, cfg.out, cfg.storage.to_settings(), cfg.title)
    print(
        f"{TAG} {result.out}: {result.blocks} settings/metrics blocks, {result.pictures} pictures, "
        f"{result.bytes / 2**20:.1f} MiB (self-contained; open it in any browser)",
        flush=True,
    )
    for line in result.skipped:
        print(f"{TAG} not shown: {line}", flush=True)
    return result


def register(sub: Any) -> None:
    """Add ``umair report`` to the CLI."""

    def handler(args: Any) -> int:
        run(
            ReportConfig(
                run_dir=args.run_dir,
                out=args.out,
                title=args.title,
                storage=StorageConfig(endpoint=args.endpoint, region=args.region),
            )
        )
        return 0

    p = sub.add_parser(
        "report", help="one self-contained HTML page of a run directory: settings, metrics tables, every picture"
    )
    p.add_argument("run_dir", help="run directory, e.g. outputs/demo (local or s3://)")
    p.add_argument("--out", help="HTML file (default: RUN_DIR/report.html)")
    p.add_argument("--title", help="page title")
    p.add_argument("--endpoint", help="S3-compatible endpoint URL for s3:// paths")
    p.add_argument("--region", help="bucket region for s3:// paths")
    p.set_defaults(func=handler)
