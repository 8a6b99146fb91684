"""``umair train``: fit the UMAIR-FPS fusion model with Ray Train and save it.

The driver reads and checks the inputs (:func:`umair.training.inputs.prepare`), then
:func:`pipelines.fusion_training.fit` runs a TorchTrainer over N workers, scores the
validation window every epoch (``val_*``), checkpoints every epoch (a rerun with the same
``run_name`` resumes), keeps the best-``val_auc`` epoch as the model, scores the test
window once with it (``test_*``), logs to MLflow and writes the model directory
(:mod:`umair.training.model_io`).
"""

from __future__ import annotations

from typing import Any

from pipelines.fusion_training import fit
from umair.model.settings import VARIANTS
from umair.training.settings import TrainConfig


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train with Ray Train, save the model to ``cfg.output``; the summary is printed and in MLflow."""
    return fit(cfg)


def register(sub: Any) -> None:
    """Add ``umair train`` to the CLI."""
    from umair.config import load_with_flags

    def handler(args: Any) -> int:
        keys = ("world", "item_features", "output", "epochs", "num_workers", "run_name", "variant")
        keys += ("validation", "validation_fraction", "patience")
        run(load_with_flags(args.config, TrainConfig, args, keys))
        return 0

    p = sub.add_parser("train", help="train the UMAIR-FPS fusion model (Ray Train) and save it")
    p.add_argument("--config", required=True, help="settings YAML (see pipelines/configs/train.yaml)")
    p.add_argument("--world", help="sample world whose tables and split to use (overrides the config)")
    p.add_argument("--item-features", help="item-features table, the extraction output (overrides the config)")
    p.add_argument("--output", help="where the trained model goes (overrides the config)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--variant", help=f"a model variant: {', '.join(VARIANTS)}")
    p.add_argument("--validation", help="start of the validation window [validation, split) (ISO time)")
    p.add_argument("--validation-fraction", type=float, help="or: the last fraction of the training window")
    p.add_argument("--patience", type=int, help="stop after this many epochs without a better val_auc")
    p.add_argument("--run-name", help="a rerun with the same name resumes from its latest checkpoint")
    p.set_defaults(func=handler)
