"""``umair train``: fit the UMAIR-FPS fusion model with Ray Train and save it.

The driver reads and checks the inputs (:func:`umair.training.inputs.prepare`), then
:func:`pipelines.fusion_training.fit` runs a TorchTrainer over N workers, checkpoints
every epoch (a rerun with the same ``run_name`` resumes), logs to MLflow and writes the
model directory (:mod:`umair.training.model_io`).
"""

from __future__ import annotations

from typing import Any

from pipelines.fusion_training import fit
from umair.model.settings import TABLE4_VARIANTS
from umair.training.settings import TrainConfig


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train with Ray Train, save the model to ``cfg.output``; the summary is printed and in MLflow."""
    return fit(cfg)


def register(sub: Any) -> None:
    """Add ``umair train`` to the CLI."""
    from umair.config import load_with_flags

    def handler(args: Any) -> int:
        keys = ("world", "item_features", "output", "epochs", "num_workers", "run_name", "variant")
        run(load_with_flags(args.config, TrainConfig, args, keys))
        return 0

    p = sub.add_parser("train", help="train the UMAIR-FPS fusion model (Ray Train) and save it")
    p.add_argument("--config", required=True, help="settings YAML (see pipelines/configs/train.yaml)")
    p.add_argument("--world", help="sample world whose tables and split to use (overrides the config)")
    p.add_argument("--item-features", help="item-features table, the extraction output (overrides the config)")
    p.add_argument("--output", help="where the trained model goes (overrides the config)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--variant", help=f"a Table-4 variant: {', '.join(TABLE4_VARIANTS)}")
    p.add_argument("--run-name", help="a rerun with the same name resumes from its latest checkpoint")
    p.set_defaults(func=handler)
