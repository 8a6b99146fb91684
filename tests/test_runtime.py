"""What every Ray job shares (pipelines/runtime.py): MLflow runs end FINISHED, FAILED or
KILLED on every way out, SIGTERM included; run directories are tied to their settings."""

from __future__ import annotations

import os
import signal

import mlflow
import pytest

from pipelines.runtime import Terminated, claim_run_dir, ended_run
from umair.config import ConfigError


@pytest.fixture
def client(tmp_path):
    c = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return c, c.create_experiment("runtime-test")


def _status(c, run_id: str) -> str:
    return c.get_run(run_id).info.status


def test_a_run_ends_finished_failed_or_killed(client):
    c, exp = client
    ok, bad, stopped, termed = (c.create_run(exp).info.run_id for _ in range(4))
    with ended_run(c, ok):
        pass
    with pytest.raises(ValueError, match="boom"), ended_run(c, bad):
        raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt), ended_run(c, stopped):
        raise KeyboardInterrupt
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated, match="signal 15"), ended_run(c, termed):
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()  # the handler raises as soon as the signal lands
    assert [_status(c, r) for r in (ok, bad, stopped, termed)] == ["FINISHED", "FAILED", "KILLED", "KILLED"]
    assert c.get_run(bad).data.tags["umair.error"] == "ValueError: boom"
    assert c.get_run(termed).data.tags["umair.error"] == "Terminated: received signal 15"
    assert "umair.error" not in c.get_run(ok).data.tags
    assert signal.getsignal(signal.SIGTERM) is previous, "the job's SIGTERM handler is removed afterwards"


def test_a_run_directory_refuses_other_settings(tmp_path):
    d = str(tmp_path / "run")
    assert claim_run_dir(d, "abc", "train", None) is False
    assert claim_run_dir(d, "abc", "train", None) is True, "same settings: resume"
    with pytest.raises(
        ConfigError, match=r"this train run was started with other settings or data \(fingerprint abc, now xyz\)"
    ):
        claim_run_dir(d, "xyz", "train", None)
