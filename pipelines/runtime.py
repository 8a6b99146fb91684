"""What every Ray job shares: starting or joining Ray, Ray Train's data options, the
console of a Ray Train run (progress sent from rank 0, shown by the driver), MLflow
experiments and runs that survive a driver restart, and run-directory guards."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from umair import console, storage
from umair.config import ConfigError, MlflowConfig, RayConfig
from umair.errors import root_cause


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster at ``cfg.address`` / ``$RAY_ADDRESS``, or start a local Ray of
    ``cfg.num_cpus`` CPUs. Worker output is forwarded to this process (stdout to stdout,
    stderr to stderr: :func:`umair.console.job_log` puts the latter in the run's log).
    Ray Data's own progress bars stay off: they would draw from many processes at once;
    the jobs show their progress with :func:`umair.console.progress`."""
    import ray

    if ray.is_initialized():
        return
    if not console.is_terminal(sys.stderr):  # a log file or a pipe: no colour codes around worker prefixes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    _raylet_lines_to_stderr()


def _raylet_lines_to_stderr() -> None:
    """Ray's driver prints its raylet's messages (e.g. "(raylet) WARNING: 18 PYTHON worker
    processes have been started …", when a node starts more workers than it has cores) on
    stdout, the job's console. Send them to stderr instead, which :func:`umair.console.job_log`
    puts in the run's log (``-v``: the console, as before); workers' lines keep stdout. Ray has
    no setting for this. Its lines reach ``ray._private.worker.print_to_stdstream`` two ways,
    both redirected here: the log stream through the dispatcher's "ray_print_logs" handler
    (``ray._private.ray_logging``), which holds its own reference to the function and is
    wrapped; and the raylet's error messages (the worker-pool warning among them), which
    ``listen_error_messages`` passes to the module's function by name, replaced here."""
    import functools

    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    if not isinstance(ray_worker.print_to_stdstream, functools.partial):  # not yet replaced
        ray_worker.print_to_stdstream = functools.partial(_raylet_to_stderr, ray_worker.print_to_stdstream)
    for name, handler in list(dispatcher.handlers):
        if name == "ray_print_logs" and getattr(handler, "func", None) is not _raylet_to_stderr:  # not yet wrapped
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, functools.partial(_raylet_to_stderr, handler))


def _raylet_to_stderr(handler: Any, data: dict, **kwargs: Any) -> None:
    handler({**data, "is_err": True} if data.get("pid") == "raylet" else data, **kwargs)


def ingest_options() -> Any:
    """Ray Data ``ExecutionOptions`` for a Ray Train run's datasets (``DataConfig(...,
    execution_options=ingest_options())``): Ray Train's default ingest options (this
    process's DataContext resource limits, order and verbosity) without the deprecated
    ``exclude_resources``, which Ray Train's own default sets and so warns on every run."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(
        resource_limits=current.resource_limits,
        preserve_order=current.preserve_order,
        verbose_progress=current.verbose_progress,
    )


class _ProgressRelay:
    """Ray actor: the console events of one Ray Train run, held until the driver takes them."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def put(self, *events: tuple) -> None:
        self.events.extend(events)

    def take(self) -> list[tuple]:
        out, self.events = self.events, []
        return out


class TrainReporter:
    """A Ray Train worker's console (made by :func:`train_console`, passed to the workers in
    their settings): rank 0 calls :meth:`begin_epoch`, :meth:`step` per batch and
    :meth:`say`; the driver shows a step bar per epoch and the lines, once, without Ray's
    ``(RayTrainWorker pid=...)`` prefix. The other ranks use ``TrainReporter()``, which
    shows nothing; with no relay (a run without :func:`train_console`) :meth:`say` prints."""

    SEND_EVERY_S = 0.5  # step counts are batched: one actor call per half second at most

    def __init__(self, relay: Any = None, steps_per_epoch: int | None = None, *, quiet: bool = False):
        self.relay, self.steps_per_epoch, self.quiet = relay, steps_per_epoch, quiet
        self._steps, self._sent = 0, 0.0

    def __getstate__(self) -> dict:
        return {"relay": self.relay, "steps_per_epoch": self.steps_per_epoch, "quiet": self.quiet}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["relay"], state["steps_per_epoch"], quiet=state["quiet"])

    def muted(self) -> TrainReporter:
        """The reporter of a rank other than 0: shows nothing."""
        return TrainReporter(quiet=True)

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        """Epoch ``epoch`` (0-based) of ``epochs`` starts: the driver opens its step bar."""
        if self.relay is not None and not self.quiet:
            self._flush(("begin", epoch, epochs, self.steps_per_epoch))

    def step(self, n: int = 1) -> None:
        """``n`` more batches of this epoch are done."""
        if self.relay is None or self.quiet:
            return
        self._steps += n
        if time.monotonic() - self._sent >= self.SEND_EVERY_S:
            self._flush()

    def counted(self, batches: Iterable[Any]) -> Iterator[Any]:
        """``batches``, counting a :meth:`step` for each one taken."""
        for batch in batches:
            self.step()
            yield batch

    def say(self, line: str) -> None:
        """One job line (closes the epoch's bar); delivered before this returns."""
        if self.quiet:
            return
        if self.relay is None:
            print(line, flush=True)
            return
        import ray

        ray.get(self._flush(("line", line)))

    def _flush(self, *events: tuple) -> Any:
        pending = (("step", self._steps),) if self._steps else ()
        self._steps, self._sent = 0, time.monotonic()
        return self.relay.put.remote(*pending, *events)


@contextlib.contextmanager
def train_console(tag: str, steps_per_epoch: int | None = None) -> Iterator[TrainReporter]:
    """The driver's side of :class:`TrainReporter`: while the block runs (``trainer.fit()``),
    a thread takes rank 0's events twice a second and shows them with
    :func:`umair.console.progress` (a bar of ``steps_per_epoch`` steps per epoch, labelled
    ``tag``) and :func:`umair.console.say`. Yields the reporter to pass to the workers."""
    import ray

    relay = ray.remote(num_cpus=0)(_ProgressRelay).remote()
    bar: list[Any] = []

    def close_bar() -> None:
        while bar:
            bar.pop().close()

    def show(events: list[tuple]) -> None:
        for kind, *rest in events:
            if kind == "begin":
                close_bar()
                epoch, _epochs, steps = rest
                bar.append(console.progress(total=steps, desc=f"{tag} epoch {epoch}", unit="step"))
            elif kind == "step" and bar:
                bar[0].update(rest[0])
            elif kind == "line":
                close_bar()
                console.say(rest[0])

    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.5):
            try:
                show(ray.get(relay.take.remote()))
            except Exception:  # Ray is shutting down: the driver reports the run's outcome
                return

    thread = threading.Thread(target=poll, name=f"{tag} console", daemon=True)
    thread.start()
    try:
        yield TrainReporter(relay, steps_per_epoch)
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            show(ray.get(relay.take.remote(), timeout=10))
        close_bar()
        with contextlib.suppress(Exception):
            ray.kill(relay)


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


def log_png(client: Any, run_id: str, png: bytes, name: str) -> None:
    """Log the PNG bytes ``png`` as the artifact ``name`` of the MLflow run ``run_id``."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        with open(path, "wb") as f:
            f.write(png)
        client.log_artifact(run_id, path)
