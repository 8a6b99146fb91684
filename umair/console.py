"""What a job shows on the console, and where the rest goes.

A job prints its own lines on stdout (:func:`say`: what it reads and writes, one line per
epoch or chunk, a closing summary) and a progress bar on its long loops
(:func:`progress`). On a terminal the bar is a ``tqdm`` bar that disappears when its
loop ends; elsewhere (CI logs, a pipe, a file) it becomes plain lines, the first after
``UMAIR_PROGRESS_S`` seconds (default 10), then after gaps that double up to a minute
(at 10, 30, 70, 130 s, then every 60 s), and nothing for loops shorter than that.

:func:`job_log` sends everything else a run writes on stderr (the file descriptor, so
also its child processes and C++ code: Ray, Ray Data and Ray Train messages, worker
stderr that Ray forwards, PyTorch and Python warnings, Hugging Face and MLflow logging)
to one log file per run, ``<UMAIR_LOG_DIR or outputs/logs>/<job>-<time>-<pid>.log``,
and prints its path once. ``verbose=True`` (``umair JOB -v``) leaves it all on the
console. No Ray or MLflow here: the library stays usable without them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

from tqdm import tqdm

LOG_DIR_ENV = "UMAIR_LOG_DIR"
DEFAULT_LOG_DIR = os.path.join("outputs", "logs")
PROGRESS_INTERVAL_ENV = "UMAIR_PROGRESS_S"
MLFLOW_QUIET_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"  # MLflow's own variable
DEFAULT_PROGRESS_INTERVAL_S = 10.0

T = TypeVar("T")


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default: stdout) is an interactive terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def progress_interval_s() -> float:
    """Seconds between two progress lines off a terminal (``$UMAIR_PROGRESS_S``, default 10)."""
    raw = os.environ.get(PROGRESS_INTERVAL_ENV)
    try:
        return max(float(raw), 0.1) if raw else DEFAULT_PROGRESS_INTERVAL_S
    except ValueError:
        return DEFAULT_PROGRESS_INTERVAL_S


def say(message: str) -> None:
    """Print one job line on stdout, above any progress bar that is showing."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


class _Lines:
    """A file for tqdm off a terminal: each status it draws becomes one whole line;
    the carriage returns and blank clears it writes to redraw a bar in place are dropped."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, s: str) -> int:
        text = s.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


class _BackingOff(tqdm):
    """tqdm off a terminal: after each status line the gap to the next doubles, up to
    :data:`MAX_GAP_S` (or the first gap, when that is longer)."""

    first_gap_s: float = DEFAULT_PROGRESS_INTERVAL_S

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        shown = super().display(msg, pos)
        self.mininterval = min(2 * self.mininterval, max(MAX_GAP_S, self.first_gap_s))
        self.maxinterval = self.mininterval  # tqdm's monitor thread forces a line after maxinterval
        return shown


MAX_GAP_S = 60.0


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    leave: bool = False,
    interval_s: float | None = None,
) -> tqdm:
    """A progress bar over ``iterable`` (or ``total`` units, advanced with ``.update(n)``),
    on stdout. On a terminal: a tqdm bar, removed when it closes unless ``leave``.
    Elsewhere: one line (``desc: 40% 8/20 [00:12<00:18, 0.67 step/s]``) once the loop has
    run ``interval_s`` seconds (default :func:`progress_interval_s`), then after gaps that
    double up to a minute (a long loop stays a few lines), and a last line at the end
    only with ``leave``. Use it as a context
    manager or call ``.close()``; print other lines meanwhile with :func:`say`."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if is_terminal() and shutil.get_terminal_size((0, 0)).columns > 0:  # some pseudo-terminals have no width
        return tqdm(
            iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stdout, delay=0.5, dynamic_ncols=True
        )
    every = progress_interval_s() if interval_s is None else interval_s
    counts = "{n_fmt}/{total_fmt}" if total else "{n_fmt} " + unit
    rate = "{elapsed}<{remaining}, {rate_fmt}" if total else "{elapsed}, {rate_fmt}"
    bar = _BackingOff(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=leave,
        file=_Lines(sys.stdout),
        mininterval=every,
        maxinterval=every,
        delay=every,
        bar_format=("{desc}: {percentage:3.0f}% " if total else "{desc}: ") + counts + " [" + rate + "{postfix}]",
    )
    bar.first_gap_s = every
    return bar


def log_dir() -> str:
    """Where :func:`job_log` writes: ``$UMAIR_LOG_DIR``, else ``outputs/logs`` (relative to
    the working directory)."""
    return os.environ.get(LOG_DIR_ENV) or DEFAULT_LOG_DIR


@contextlib.contextmanager
def job_log(job: str, *, verbose: bool = False, directory: str | None = None) -> Iterator[str | None]:
    """While the block runs, the process's stderr (file descriptor 2, inherited by the
    processes it starts) writes to a new log file of this run, whose path is yielded and
    printed once on stdout; afterwards stderr is the console again. When the block raises,
    the path is printed once more (on the console's stderr) so the details can be found.
    ``verbose``: nothing is redirected and None is yielded. Off ``verbose``, MLflow's
    run-URL lines on stdout are turned off too (``$MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT``)."""
    if verbose:
        yield None
        return
    folder = directory or log_dir()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(2)
    os.dup2(fd, 2)
    os.close(fd)
    say(f"[umair] {job}: messages of Ray, PyTorch, Hugging Face and MLflow go to {path} (-v shows them here)")
    # MLflow writes "View run … at: URL" to stdout (not stderr) when a run on a tracking server
    # ends, once per run and per trial process; the jobs print their own MLflow line instead.
    os.environ.setdefault(MLFLOW_QUIET_ENV, "true")
    failed = False
    try:
        yield path
    except BaseException:
        failed = True
        raise
    finally:
        _flush(sys.stderr)
        os.dup2(saved, 2)
        os.close(saved)
        if failed:
            print(f"[umair] {job}: the log of this run: {path}", file=sys.stderr, flush=True)


def _flush(stream: Any) -> None:
    with contextlib.suppress(Exception):
        stream.flush()
