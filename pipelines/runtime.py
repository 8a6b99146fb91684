"""What every Ray job shares: starting or joining Ray, MLflow experiments and runs that
survive a driver restart, and run-directory guards."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from umair import storage
from umair.config import ConfigError, MlflowConfig, RayConfig
from umair.errors import root_cause


def init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def resumable_mlflow_run(
    cfg: MlflowConfig,
    run_dir: str,
    run_name: str,
    parent_run_id: str | None = None,
    settings: storage.StorageSettings | None = None,
) -> str:
    """The MLflow run id for a job whose state lives in ``run_dir``: a rerun after a crash
    continues the same MLflow run instead of starting a new one. A new run is created as a
    child of ``parent_run_id`` when given (MLflow's ``mlflow.parentRunId`` tag). ``settings``:
    the job's object-storage settings, for a ``run_dir`` on s3://."""
    import mlflow

    marker = storage.join(run_dir, "mlflow_run_id")
    mlflow.set_tracking_uri(cfg.resolved_uri())
    experiment = mlflow.set_experiment(cfg.experiment)
    if storage.exists(marker, settings):
        run_id = storage.read_bytes(marker, settings).decode().strip()
        client = mlflow.MlflowClient()
        try:
            client.get_run(run_id)
            client.set_terminated(run_id, status="RUNNING")
            return run_id
        except mlflow.exceptions.MlflowException:
            pass
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
    run = mlflow.MlflowClient().create_run(experiment.experiment_id, run_name=run_name, tags=tags)
    storage.write_bytes(marker, run.info.run_id.encode(), settings)
    return run.info.run_id


def ensure_experiment(cfg: MlflowConfig) -> str:
    """The experiment's id; a new one is created with its artifacts beside a local sqlite
    store (``<db dir>/mlartifacts``) rather than in the working directory."""
    import mlflow

    uri = cfg.resolved_uri()
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(cfg.experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///") :]), "mlartifacts")
    try:
        return client.create_experiment(cfg.experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        found = client.get_experiment_by_name(cfg.experiment)
        if found is None:  # not a lost race: a real error
            raise
        return found.experiment_id


def run_dir_of(root: str, name: str) -> str:
    """``root/name``; a local path made absolute (Ray workers run in other directories)."""
    if storage.is_s3(root):
        return storage.join(root, name)
    return os.path.abspath(os.path.join(root, name))


def claim_run_dir(run_dir: str, fingerprint: str, what: str, settings: storage.StorageSettings | None) -> bool:
    """Tie ``run_dir`` to the settings and data ``fingerprint`` of the job using it.

    Returns False for a new directory (the fingerprint is written), True when a run with
    the same fingerprint exists there (resume or restore it); raises
    :class:`~umair.config.ConfigError` when it was started with other settings or data."""
    marker = storage.join(run_dir, f"umair_{what}_fingerprint")
    if storage.exists(marker, settings):
        old = storage.read_bytes(marker, settings).decode().strip()
        if old != fingerprint:
            raise ConfigError(
                f"{run_dir}: this {what} run was started with other settings or data (fingerprint {old}, "
                f"now {fingerprint}); use another name or delete the directory"
            )
        return True
    storage.write_bytes(marker, fingerprint.encode(), settings)
    return False


def fingerprint(data: dict) -> str:
    """A short stable hash of JSON-able ``data``."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (a cluster stopping the job, ``kill``, Ctrl-C's cousin)."""


@contextlib.contextmanager
def ended_run(client: Any, run_id: str) -> Iterator[None]:
    """Close the MLflow run ``run_id`` on every way out of the block: FINISHED when it
    completes, KILLED on Ctrl-C or SIGTERM (a handler turns SIGTERM into :class:`Terminated`
    while the block runs, in the main thread), FAILED on any other error (re-raised). A
    failed or killed run gets the error's root cause (Ray's wrappers removed) as the tag
    ``umair.error``, so MLflow shows why."""
    handler_set = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if handler_set else None

    def on_term(signum: int, frame: Any) -> None:
        raise Terminated(f"received signal {signum}")

    if handler_set:
        signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt as err:
        client.set_tag(run_id, "umair.error", root_cause(err)[:5000])
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException as err:
        client.set_tag(run_id, "umair.error", root_cause(err)[:5000])
        client.set_terminated(run_id, "FAILED")
        raise
    else:
        client.set_terminated(run_id, "FINISHED")
    finally:
        if handler_set:
            signal.signal(signal.SIGTERM, previous)
