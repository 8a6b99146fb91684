"""Typed settings loaded from YAML. Errors name the file and the key.

Each job has a settings model (pydantic, unknown keys refused) so a typo in a YAML
file fails before any work starts, e.g.::

    pipelines/configs/demo.yaml: world.seed: Input should be a valid integer (got 'abc')
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from umair.errors import UmairError
from umair.storage import StorageSettings


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; elsewhere ``os.cpu_count()``)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Settings(BaseModel):
    """Base of every settings model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageConfig(Settings):
    endpoint: str | None = Field(None, description="S3-compatible endpoint URL; None = AWS or the environment")
    region: str | None = None
    retries: int = Field(5, ge=1, le=50)

    def to_settings(self) -> StorageSettings:
        return StorageSettings(endpoint=self.endpoint, region=self.region, retries=self.retries)


MLFLOW_TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own variable
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
            path = os.path.abspath(uri[len(prefix) :])
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
        print(
            f"[mlflow] WARNING: no mlflow.tracking_uri and no ${MLFLOW_TRACKING_URI_ENV}: logging to "
            f"{DEFAULT_TRACKING_URI} in {os.getcwd()}; on a cluster pass "
            f'--runtime-env-json \'{{"env_vars": {{"{MLFLOW_TRACKING_URI_ENV}": "http://<mlflow>:5000"}}}}\'',
            file=sys.stderr,
            flush=True,
        )


class SampleConfig(Settings):
    out: str = Field(..., description="local directory or s3:// prefix for the world")
    size: Literal["tiny", "small", "default"] = "tiny"
    seed: int = 0
    overwrite: bool = False


class DemoConfig(Settings):
    """The README's main job: a sample world, then each stage (job name -> its config file), in order."""

    world: SampleConfig
    storage: StorageConfig = StorageConfig()
    clean_dir: str | None = Field(None, description="local directory deleted before the run, for a fresh demo")
    stages: dict[str, str] = Field(default_factory=dict)


class ConfigError(UmairError, ValueError):
    """A settings file is unreadable or invalid; the message names the file and key."""


M = TypeVar("M", bound=BaseModel)


def parse_settings(data: dict, model: type[M], source: str = "<settings>") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "<root>"
            got = (
                f" (got {e['input']!r})"
                if e["type"] not in ("missing",) and not isinstance(e.get("input"), dict)
                else ""
            )
            lines.append(f"{source}: {key}: {e['msg']}{got}")
        raise ConfigError("\n".join(lines)) from None


def read_yaml(path: Path, what: str = "config file") -> dict:
    """The mapping of settings in the YAML file ``path``; :class:`ConfigError` naming the
    file when it is missing, not YAML, or not a mapping."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, found {type(data).__name__}")
    return data


def load_config(path: str | Path, model: type[M], overrides: dict | None = None) -> M:
    """Read YAML at ``path`` into ``model``; ``overrides`` (dotted keys) win over the file."""
    p = Path(path)
    data = read_yaml(p)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return parse_settings(data, model, str(p))


def load_with_flags(path: str | Path | None, model: type[M], args: object, keys: tuple[str, ...]) -> M:
    """:func:`load_config` with the command-line flags named in ``keys`` (``--num-workers``
    is attribute ``num_workers``) as overrides, where the user gave them; without a config
    file (``path`` None) the settings come from those flags alone."""
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if path is None:
        return parse_settings(overrides, model, "command line")
    return load_config(path, model, overrides)
