"""The ``umair`` command line: one subcommand per job.

Jobs take ``--config FILE.yaml`` (validated settings) and a few flags that override
keys of that file. ``umair JOB --help`` describes each. A Ray job (and the demo) prints
its own lines and progress; what Ray, PyTorch, Hugging Face and MLflow write goes to a
log file of the run whose path it prints (:func:`umair.console.job_log`); ``-v`` keeps
it all on the console.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from umair import config as cfg
from umair import console
from umair.errors import UmairError, find_cause

# Ray jobs: each module defines register(subparsers) adding its subcommand.
# Imported lazily inside their handlers is Ray itself, so `umair --help` stays fast.
JOB_MODULES = [
    "pipelines.pretrain_image",
    "pipelines.finetune_text",
    "pipelines.extract",
    "pipelines.train",
    "pipelines.evaluate",
    "pipelines.ablate",
    "pipelines.tune",
    "pipelines.recommend",
    "pipelines.similar",
    "pipelines.explain",
    "pipelines.report",
]


def _storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint", help="S3-compatible endpoint URL (default: $UMAIR_S3_ENDPOINT / $AWS_ENDPOINT_URL or AWS)"
    )
    p.add_argument("--region", help="bucket region (default: $AWS_REGION or us-east-1)")


def _storage(args: argparse.Namespace) -> cfg.StorageConfig:
    return cfg.StorageConfig(endpoint=args.endpoint, region=args.region)


def _print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        print(f"  {k:<{width}}  {json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v}")


def cmd_sample(args: argparse.Namespace) -> int:
    from umair.sample.world import summarize, write_world

    if args.config:
        overrides = {k: v for k, v in (("out", args.out), ("size", args.size), ("seed", args.seed)) if v is not None}
        if args.overwrite:
            overrides["overwrite"] = True
        settings = cfg.load_config(args.config, cfg.SampleConfig, overrides)
    else:
        if not args.out:
            raise cfg.ConfigError("umair sample: --out is required (or --config with an 'out' key)")
        settings = cfg.parse_settings(
            {"out": args.out, "size": args.size or "tiny", "seed": args.seed or 0, "overwrite": args.overwrite},
            cfg.SampleConfig,
            "command line",
        )
    t0 = time.perf_counter()
    world = write_world(settings.out, settings.size, settings.seed, settings.overwrite, _storage(args).to_settings())
    print(
        f"wrote sample world ({settings.size}, seed {settings.seed}) to {world.root} in {time.perf_counter() - t0:.1f}s"
    )
    _print_summary(summarize(world))
    return 0


TABLE_FLAGS = ("illustrations", "users", "interactions")


def cmd_validate(args: argparse.Namespace) -> int:
    """``umair validate WORLD`` or ``umair validate --illustrations P --users P --interactions P``:
    prints the report of :mod:`umair.validation`; a broken contract exits 2 (via main)."""
    from umair.contracts import Checks
    from umair.validation import validate_tables, validate_world

    tables = {k: getattr(args, k) for k in TABLE_FLAGS}
    given = [k for k, v in tables.items() if v]
    if args.world and (given or args.item_features):
        raise cfg.ConfigError("give either a WORLD or --illustrations/--users/--interactions, not both")
    if not args.world and len(given) < len(TABLE_FLAGS):
        missing = ", ".join(f"--{k}" for k in TABLE_FLAGS if k not in given)
        raise cfg.ConfigError(f"give a WORLD, or all of --illustrations, --users, --interactions (missing {missing})")
    checks = Checks(before_created_at=args.before_created_at) if args.before_created_at else None
    settings = _storage(args).to_settings()
    if args.world:
        if args.check_images:
            raise cfg.ConfigError(
                "umair validate: --check-images is for tables; a WORLD checks its images unless --skip-images"
            )
        report = validate_world(args.world, settings, check_images=not args.skip_images, checks=checks)
    else:
        report = validate_tables(
            **tables, item_features=args.item_features, checks=checks, check_images=args.check_images, settings=settings
        )
    print("\n".join(report.lines()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    settings = cfg.load_config(args.config, cfg.DemoConfig)
    return run_demo(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umair",
        description="UMAIR-FPS anime-illustration recommender: Ray jobs and tools.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="job", metavar="JOB", required=True)

    p = sub.add_parser("sample", help="write a sample illustration world with planted taste (local dir or s3://)")
    p.add_argument("--out", help="local directory or s3://bucket/prefix")
    p.add_argument(
        "--size", choices=["tiny", "small", "default"], help="tiny: unit tests; default: the demo (default: tiny)"
    )
    p.add_argument("--seed", type=int, help="random seed; the same seed gives the same world (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing world at --out")
    p.add_argument("--config", help="YAML with keys out, size, seed, overwrite (flags override it)")
    _storage_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "validate",
        help="check a sample world or any site's tables against the data contracts and print a summary",
        description="Either WORLD (a sample world) or --illustrations, --users and --interactions "
        "(any tables, local or s3://). Exit 0: valid (warnings allowed); 2: a contract is broken.",
    )
    p.add_argument("world", nargs="?", help="local directory or s3:// prefix of a sample world")
    p.add_argument(
        "--illustrations", help="illustrations parquet (illust_id, image_uri; optional tags, created_at, ...)"
    )
    p.add_argument("--users", help="users parquet (user_id; optional interest_tags, profile columns)")
    p.add_argument("--interactions", help="interactions parquet (user_id, illust_id, ts, label)")
    p.add_argument("--item-features", help="item-features parquet (illust_id and e_SEM/e_STY/e_TSEM vectors)")
    p.add_argument(
        "--before-created-at",
        choices=["error", "warn", "off"],
        help="interactions before the item's created_at: error, warn (default) or off",
    )
    p.add_argument("--check-images", action="store_true", help="tables: check that every non-null image_uri exists")
    p.add_argument("--skip-images", action="store_true", help="WORLD: do not check that every image_uri exists")
    _storage_args(p)
    p.set_defaults(func=cmd_validate)

    built_in = set(sub.choices)
    for module in JOB_MODULES:
        importlib.import_module(module).register(sub)

    p = sub.add_parser("demo", help="the main job end to end on the embedded sample world")
    p.add_argument("--config", default="pipelines/configs/demo.yaml", help="demo settings YAML")
    p.set_defaults(func=cmd_demo)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    for name, job in sub.choices.items():
        if name not in built_in:  # the Ray jobs and the demo: their library chatter goes to a log file
            job.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
            job.set_defaults(job_log=True)
    return parser


VERBOSE_HELP = "show Ray, PyTorch, Hugging Face and MLflow messages here instead of in the run's log file"


def _shutdown_ray_started_here(ray_was_running: bool) -> None:
    """Stop the local Ray this command started (its last messages then land in the run's
    log, not on the console at exit); a Ray that was already running is left alone."""
    ray = sys.modules.get("ray")
    if ray is not None and not ray_was_running and ray.is_initialized():
        ray.shutdown()


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def main(argv: list[str] | None = None) -> int:
    """Run one job; its errors become one line on stderr and an exit code, in this one place:
    an :class:`~umair.errors.UmairError` (also when Ray wrapped it, e.g. raised inside a Ray
    Train worker) exits with its ``exit_code`` (2 bad input, 1 a job that failed midway);
    ``FileExistsError`` / ``ValueError`` from other libraries' input checks exit 2; anything
    else is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        if not getattr(args, "job_log", False):
            return args.func(args)
        ray_was_running = _ray_running()
        with console.job_log(args.job, verbose=args.verbose):
            try:
                return args.func(args)
            finally:
                _shutdown_ray_started_here(ray_was_running)
    except Exception as err:
        cause = find_cause(err, UmairError)
        if cause is not None:
            print(f"umair {args.job}: error: {cause}", file=sys.stderr)
            return cause.exit_code
        if isinstance(err, (FileExistsError, ValueError)):
            print(f"umair {args.job}: error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
