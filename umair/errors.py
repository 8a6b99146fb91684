"""The errors a user of umair sees, and how a failure is reduced to its cause.

Every error the library or a job raises on purpose derives from :class:`UmairError`.
The ``umair`` command line maps them to exit codes in one place (``pipelines/cli.py``):
``exit_code`` 2 for bad input (a config key, a table, a file the user named), 1 for a
job that started and then failed (:class:`JobFailed`). Errors raised inside Ray tasks,
actors or Ray Train workers reach the driver wrapped by Ray; :func:`find_cause` and
:func:`root_cause` unwrap them so the console, the run record and MLflow show the real
message rather than Ray's generic one.
"""

from __future__ import annotations

from typing import TypeVar


class UmairError(Exception):
    """Base of umair's own errors; ``exit_code`` is what ``umair`` exits with."""

    exit_code: int = 2


class JobFailed(UmairError):
    """A job started and stopped before finishing (what was committed is kept)."""

    exit_code = 1


class FeatureError(UmairError, ValueError):
    """The inputs cannot train or score the model (an empty training window, item features
    missing for referenced items, a vector width that disagrees with the model config);
    raised before any training starts."""


E = TypeVar("E", bound=BaseException)


def exception_chain(err: BaseException) -> list[BaseException]:
    """``err`` and every error it wraps: ``__cause__``, Ray's ``.cause`` (task and actor
    errors) and the per-rank ``worker_failures`` of a failed Ray Train worker group."""
    seen: list[BaseException] = []
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(failures[r] for r in sorted(failures))
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            todo.append(cause)
        todo.append(e.__cause__)  # type: ignore[arg-type]
    return seen


def find_cause(err: BaseException, kind: type[E]) -> E | None:
    """The first error of type ``kind`` in ``err``'s chain (:func:`exception_chain`);
    Ray's wrappers that also derive from the user's class are skipped for what they wrap."""
    return next((e for e in exception_chain(err) if isinstance(e, kind) and not _is_ray_wrapper(e)), None)


def _is_ray_wrapper(e: BaseException) -> bool:
    return type(e).__module__.startswith("ray")


def root_cause(err: BaseException) -> str:
    """The most telling ``Type: message`` of an exception chain: an :class:`UmairError`
    first, then an ``OSError`` / ``ValueError`` raised outside Ray, then the innermost error."""
    chain = exception_chain(err)
    for kinds in ((UmairError,), (OSError, ValueError)):
        for e in chain:
            if isinstance(e, kinds) and not _is_ray_wrapper(e):
                return f"{type(e).__name__}: {e}"
    last = chain[-1]
    text = str(last).strip()
    return f"{type(last).__name__}: {text.splitlines()[-1] if text else ''}"
