"""Benchmark: how often a short training run collapses (every prediction the same), with the
output bias started at the training base rate (``ModelConfig.label_prior``, the default)
vs ``nn.Linear``'s initialisation (``label_prior: null``).

The collapse: on the demo's world, the tune search's trial {experts att, sen, att; L 2}
ended with ``val_auc`` 0.5000 (2026-12-04). In that run no unit of the deep MLP's last
ReLU layer (16 wide) was active for any row, so the logit was a constant. At the start
``ŷ`` ≈ 0.5 against a base rate of ~0.24, and the first Adam steps pull every logit
down; where they do it through the MLP, its last layer can die. Starting ``b_o`` at
``log(p / (1 - p))`` removes that pull.

Each seed trains in-process (:func:`umair.training.local.fit_local`: the training job's
``prepare``, lookup tables and step) on the training part of a ``validation_fraction``
split and scores the validation window; a run counts as collapsed when
:func:`umair.training.scoring.collapse_warning` says so (std of ŷ < 1e-3).

    make demo   # writes outputs/demo/{world,features}
    .venv/bin/python bench/mlp_collapse.py --seeds 100

Prints one line per arm: runs, collapsed runs, mean ± std val AUC of all runs and of the
runs that did not collapse.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import print_machine  # noqa: E402

# the collapsed trial of the demo's tune, as `umair train` settings (pipelines/configs/train.yaml's model plus these)
MODEL = {
    "emb_dim": 8,
    "d": 16,
    "user_history": True,
    "modality_norm": "l2",
    "umcm": "moe",
    "experts": ["att", "sen", "att"],
    "cross_layers": 2,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default=str(REPO / "outputs/demo/world"))
    ap.add_argument("--features", default=str(REPO / "outputs/demo/features"))
    ap.add_argument("--seeds", type=int, default=100, help="model seeds 0 .. N-1 per arm")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--validation-fraction", type=float, default=0.2)
    ap.add_argument("--model", default=json.dumps(MODEL), help="ModelConfig overrides as JSON")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from umair.training.inputs import prepare
    from umair.training.local import LocalRecipe, fit_local
    from umair.training.scoring import collapse_warning
    from umair.training.settings import TrainConfig

    print_machine()
    base = json.loads(args.model)
    arms = {
        "b_o = logit(base rate) (default)": base,
        "b_o from nn.Linear (label_prior: null)": {**base, "label_prior": None},
    }
    for name, model in arms.items():
        cfg = TrainConfig(
            world=args.world,
            item_features=args.features,
            model=model,
            validation_fraction=args.validation_fraction,
        )
        prepared = prepare(cfg)
        aucs, collapsed = [], []
        t0 = time.perf_counter()
        for seed in range(args.seeds):
            recipe = LocalRecipe(args.epochs, args.batch_size, seed=seed, threads=args.threads)
            last = fit_local(prepared, prepared.model_config, recipe).history[-1]
            aucs.append(last["val_auc"])
            collapsed.append(collapse_warning(last, "val") is not None)
        a, c = np.array(aucs), np.array(collapsed)
        alive = a[~c]
        print(
            f"{name}: label_prior {prepared.model_config.label_prior}; {len(a)} runs ({args.epochs} epoch(s), batch "
            f"{args.batch_size}), collapsed {int(c.sum())} (seeds {np.flatnonzero(c).tolist()}); val AUC all "
            f"{a.mean():.4f} ± {a.std():.4f}, not collapsed {alive.mean():.4f} ± {alive.std():.4f} "
            f"(min {alive.min():.4f}); {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
