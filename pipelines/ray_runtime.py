"""Starting or joining Ray, and MLflow runs that survive a driver restart."""

from __future__ import annotations

import os
import sys

from umair import storage
from umair.config import Settings


MLFLOW_TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"   # MLflow's own variable
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class RayConfig(Settings):
    """address: None starts a local Ray (local mode); "auto" joins the cluster this runs on.
    num_cpus: logical CPUs of a local Ray (more than physical cores is fine: it lets data
    tasks run beside training workers)."""

    address: str | None = None
    num_cpus: int | None = 4


class MlflowConfig(Settings):
    """tracking_uri: the MLflow tracking server or store. None takes MLFLOW_TRACKING_URI
    from the environment (how cluster jobs get it: the pod env on Kubernetes, the runtime
    env of `ray job submit` elsewhere), else a local ``sqlite:///mlflow.db``."""

    tracking_uri: str | None = None
    experiment: str = "umair"

    def resolved_uri(self) -> str:
        """The config's URI, else $MLFLOW_TRACKING_URI, else ``sqlite:///mlflow.db``;
        a relative sqlite path made absolute (Ray workers run in other directories)."""
        uri = self.tracking_uri or os.environ.get(MLFLOW_TRACKING_URI_ENV) or DEFAULT_TRACKING_URI
        if not self.tracking_uri and not os.environ.get(MLFLOW_TRACKING_URI_ENV):
            _warn_default_store_once()
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            path = os.path.abspath(uri[len(prefix):])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return prefix + path
        return uri


_WARNED_DEFAULT_STORE = False


def _warn_default_store_once() -> None:
    """On a cluster a job without mlflow.tracking_uri or $MLFLOW_TRACKING_URI would log to
    a sqlite file in its temporary working directory (lost with it): say so, once."""
    global _WARNED_DEFAULT_STORE
    if not _WARNED_DEFAULT_STORE:
        _WARNED_DEFAULT_STORE = True
        print(f"[mlflow] WARNING: no mlflow.tracking_uri and no ${MLFLOW_TRACKING_URI_ENV}: logging to "
              f"{DEFAULT_TRACKING_URI} in {os.getcwd()}; on a cluster pass "
              f"--runtime-env-json '{{\"env_vars\": {{\"{MLFLOW_TRACKING_URI_ENV}\": \"http://<mlflow>:5000\"}}}}'",
              file=sys.stderr, flush=True)


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


def resumable_mlflow_run(cfg: MlflowConfig, run_dir: str, run_name: str, parent_run_id: str | None = None,
                         settings: storage.StorageSettings | None = None) -> str:
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
