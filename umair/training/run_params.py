"""The MLflow params of a training run (``umair train``, each ``umair tune`` trial)."""

from __future__ import annotations

import json
from typing import Any

from umair.training.inputs import Prepared
from umair.training.settings import TrainConfig


def run_params(cfg: TrainConfig, prepared: Prepared) -> dict[str, Any]:
    """The MLflow params of a training run: its inputs, settings, model sizes and data."""
    mc = prepared.model_config
    params: dict[str, Any] = {
        **prepared.inputs.to_dict(),
        "variant": cfg.variant or "full",
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "l2_emb": cfg.l2_emb,
        "num_workers": cfg.num_workers,
        "use_gpu": cfg.use_gpu,
        "seed": cfg.seed,
        "emb_dim": mc.emb_dim,
        "d": mc.d,
        "umcm": mc.umcm,
        "experts": ",".join(mc.experts),
        "cross_layers": mc.cross_layers,
        "modalities": ",".join(mc.modalities) or "none",
        "train_rows": prepared.train_rows.num_rows,
        "test_rows": prepared.test_rows.num_rows,
        "validation": prepared.validation or "none",
        "val_rows": prepared.val_rows.num_rows if prepared.val_rows is not None else 0,
        "patience": cfg.patience if cfg.patience is not None else "none",
        "features_fingerprint": prepared.info.fingerprint,
        "negatives": json.dumps(prepared.negatives["train"], sort_keys=True),
    }
    params.update({f"encoder.{k}": v for k, v in prepared.info.encoder_versions().items()})
    return params
