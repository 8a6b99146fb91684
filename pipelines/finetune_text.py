"""Text job: build multi-perspective pairs and fine-tune the text encoder E_text.

``umair finetune-text --config ...`` reads the pair sources named in the config
(multilingual name tables, relation tables, term explanations; TSV/JSONL/parquet,
local or s3://), reports bad rows with their line numbers, writes the pairs parquet,
fine-tunes a Sentence-Transformers model with in-batch negatives, evaluates retrieval
(R@1, MRR) on held-out pairs before and after, logs to MLflow and saves the model with
its manifest. The saved model's version string keys the e_TSEM tag cache.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from pydantic import Field

from umair.config import MlflowConfig, Settings, StorageConfig
from umair.console import say
from umair.text.pairs import PairSource, build_pairs, write_pairs
from umair.text.settings import FinetuneConfig

MLFLOW_PARAM_CHARS = 500  # longer param values are cut: MLflow stores at most this many characters


class SourceConfig(Settings):
    uri: str
    kind: str = Field(..., pattern="^(names|pairs|relations|explanations)$")


class FinetuneTextConfig(Settings):
    sources: list[SourceConfig]
    pairs_out: str | None = None  # where the built pairs parquet goes (optional)
    strict: bool = False  # True: any bad row stops the job; False: bad rows are reported and skipped
    finetune: FinetuneConfig
    mlflow: MlflowConfig = MlflowConfig(experiment="umair-text-finetune")
    storage: StorageConfig = StorageConfig()


class MlflowRunLogger:
    """Logs what :func:`umair.text.finetune.finetune` reports (its ``RunLogger``) into the
    MLflow run ``run_id`` of the current tracking URI. Param values become strings cut
    to :data:`MLFLOW_PARAM_CHARS`; None and NaN metrics are left out."""

    def __init__(self, run_id: str) -> None:
        import mlflow

        self.client = mlflow.MlflowClient()
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Log ``params`` as run params (values as strings)."""
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:MLFLOW_PARAM_CHARS]) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None:
        """Log ``metrics`` at ``step`` (0 when None), leaving out None and NaN values."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        kept = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if v is not None and not math.isnan(float(v))
        ]
        self.client.log_batch(self.run_id, metrics=kept)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        """Store ``data`` as the JSON artifact ``name``."""
        self.client.log_dict(self.run_id, data, name)


def run(cfg: FinetuneTextConfig) -> dict:
    """Build the pairs, fine-tune and save the encoder, all logged to one MLflow run
    (ended FAILED when anything raises); returns the summary it prints."""
    import mlflow

    from umair.text.finetune import finetune

    t0 = time.perf_counter()
    settings = cfg.storage.to_settings()
    pairs_note = f", the pairs to {cfg.pairs_out}" if cfg.pairs_out else ""
    say(
        f"[finetune-text] reads {', '.join(f'{s.uri} ({s.kind})' for s in cfg.sources)}; writes the encoder to "
        f"{cfg.finetune.output_dir}{pairs_note}, MLflow experiment {cfg.mlflow.experiment} ({cfg.mlflow.resolved_uri()})"
    )
    built = build_pairs([PairSource(s.uri, s.kind) for s in cfg.sources], strict=cfg.strict, settings=settings)
    for bad in built.bad_rows[:20]:
        say(f"[finetune-text] skipped {bad.file}:{bad.line}: {bad.reason}")
    if len(built.bad_rows) > 20:
        say(f"[finetune-text] ... and {len(built.bad_rows) - 20} more bad rows")
    say(
        f"[finetune-text] {built.table.num_rows} pairs from {len(cfg.sources)} source(s); {len(built.bad_rows)} bad rows skipped"
    )
    if cfg.pairs_out:
        write_pairs(built.table, cfg.pairs_out, settings)
    mlflow.set_tracking_uri(cfg.mlflow.resolved_uri())
    mlflow.set_experiment(cfg.mlflow.experiment)
    with mlflow.start_run(run_name="finetune-text") as active:
        mlflow.log_metric("pairs", built.table.num_rows)
        mlflow.log_metric("bad_rows", len(built.bad_rows))
        result = finetune(built.table, cfg.finetune, logger=MlflowRunLogger(active.info.run_id), settings=settings)
    summary = {
        "model": result.output_dir,
        "version": result.version,
        "train_pairs": result.train_pairs,
        "eval_pairs": result.eval_pairs.num_rows,
        "added_tokens": len(result.added_tokens),
        "before": result.metrics_before,
        "after": result.metrics_after,
        "bad_rows": len(built.bad_rows),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    say("[finetune-text] done: " + json.dumps(summary, ensure_ascii=False))
    return summary


def register(sub) -> None:
    """Add ``umair finetune-text`` to the CLI."""
    from umair.config import load_config

    def handler(args) -> int:
        overrides = {"finetune.output_dir": args.output} if args.output else {}
        run(load_config(args.config, FinetuneTextConfig, overrides))
        return 0

    p = sub.add_parser(
        "finetune-text", help="build anime text pairs and fine-tune the text encoder (Sentence-Transformers)"
    )
    p.add_argument("--config", required=True, help="settings YAML (see pipelines/configs/finetune_text.yaml)")
    p.add_argument("--output", help="model output directory (overrides finetune.output_dir)")
    p.set_defaults(func=handler)
