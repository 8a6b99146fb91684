"""Ray Tune callbacks of ``umair tune``, run on the search's driver: one frees a stopped
trial's Ray Train reservation, one prints the search's console lines."""

from __future__ import annotations

import json
from typing import Any

from umair.training.scoring import collapse_warning
from umair.tuning import METRIC

TAG = "[tune]"


def release_callback() -> Any:
    """A Tune callback that frees a finished or stopped trial's Ray Train reservation.

    When ASHA stops a trial, Tune kills the trial process; its Ray Train controller dies
    with it before removing the worker group's placement group (Ray's own cleaner needs
    the dashboard's state API, which a local Ray started by these jobs does not run). The
    workers report that group's id (``placement_group``); removing it here keeps the
    freed CPUs/GPUs available to the next trials instead of starving them."""
    from ray.tune import Callback

    class ReleaseTrainResources(Callback):
        def _release(self, trial: Any) -> None:
            from ray._raylet import PlacementGroupID
            from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

            pg_hex = (trial.last_result or {}).get("placement_group")
            if not pg_hex:
                return
            state = placement_group_table().get(pg_hex, {}).get("state")
            if state in (None, "REMOVED"):
                return
            try:
                remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex))))
            except Exception as err:  # noqa: BLE001 - best effort; Ray may have removed it meanwhile
                print(f"{TAG} could not release placement group {pg_hex} of trial {trial.trial_id}: {err}", flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._release(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._release(trial)

    return ReleaseTrainResources()


def console_callback() -> Any:
    """A Tune callback that prints, on the driver, one line when a trial starts and one when
    it ends (its best val_auc, or that it failed): the search's console in place of Tune's
    status tables (``verbose=0``) and the trials' own training lines."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(f"{TAG} trial {trial.trial_id} started: {json.dumps(trial.config or {}, default=str)}", flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            r = trial.last_result or {}
            best = r.get("best_val_auc", r.get(METRIC))
            shown = f"best val_auc {best:.4f}" if isinstance(best, float) else "no val_auc"
            if warning := collapse_warning(r, "val"):
                shown += f"; its last epoch: {warning}"
            print(f"{TAG} trial {trial.trial_id} ended after epoch {r.get('epoch', '?')}: {shown}", flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(f"{TAG} trial {trial.trial_id} failed (its error is in the results table)", flush=True)

    return TrialLines()
