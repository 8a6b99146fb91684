"""Object storage: local paths and s3:// behave the same; failures are explained."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from umair import storage
from umair.storage import StorageError, StorageSettings


def _roundtrip(base: str, settings: StorageSettings | None) -> None:
    table = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    storage.write_parquet(table, storage.join(base, "t", "table.parquet"), settings)
    storage.write_bytes(storage.join(base, "t", "blob.bin"), b"\x00\x01hello", settings)
    assert storage.read_parquet(storage.join(base, "t", "table.parquet"), settings).equals(table)
    assert storage.read_bytes(storage.join(base, "t", "blob.bin"), settings) == b"\x00\x01hello"
    assert storage.exists(storage.join(base, "t", "blob.bin"), settings)
    assert not storage.exists(storage.join(base, "t", "nope.bin"), settings)
    files = storage.list_files(storage.join(base, "t"), settings)
    assert [os.path.basename(f) for f in files] == ["blob.bin", "table.parquet"]
    storage.delete_dir(storage.join(base, "t"), settings)
    assert storage.list_files(storage.join(base, "t"), settings) == []


def test_local_roundtrip_leaves_no_temp_files(tmp_path):
    _roundtrip(str(tmp_path), None)
    storage.write_bytes(str(tmp_path / "x.bin"), b"1")
    storage.write_bytes(str(tmp_path / "x.bin"), b"2")
    assert os.listdir(tmp_path) == ["x.bin"]
    assert storage.read_bytes(str(tmp_path / "x.bin")) == b"2"


def test_s3_roundtrip(s3_server):
    _roundtrip(s3_server.uri("roundtrip"), s3_server.settings)


def test_s3_endpoint_from_environment(s3_server, monkeypatch):
    monkeypatch.setenv("UMAIR_S3_ENDPOINT", s3_server.endpoint)
    uri = s3_server.uri("env", "blob.bin")
    storage.write_bytes(uri, b"from env")
    assert storage.read_bytes(uri) == b"from env"


def test_wrong_credentials_fail_clearly_without_leaking_the_secret(s3_server, monkeypatch):
    uri = s3_server.uri("secret", "blob.bin")
    storage.write_bytes(uri, b"data", s3_server.settings)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    settings = StorageSettings(endpoint=s3_server.endpoint, region="us-east-1", retries=1)
    with pytest.raises(StorageError) as info:
        storage.read_bytes(uri, settings)
    msg = str(info.value)
    assert msg.startswith(f"cannot read {uri} at endpoint {s3_server.endpoint}: the server rejected the credentials")
    assert "AWS_SECRET_ACCESS_KEY" in msg
    assert "definitely-wrong-secret" not in msg
    with pytest.raises(StorageError, match="rejected the credentials"):
        storage.write_bytes(s3_server.uri("secret", "other.bin"), b"x", settings)


def test_unreachable_endpoint_fails_clearly():
    settings = StorageSettings(
        endpoint="http://127.0.0.1:9", region="us-east-1", retries=1, connect_timeout_s=1, request_timeout_s=2
    )
    with pytest.raises(StorageError, match=r"cannot read s3://nobucket/key at endpoint http://127.0.0.1:9: "):
        storage.read_bytes("s3://nobucket/key", settings)


def test_missing_object_and_bad_scheme(s3_server, tmp_path):
    with pytest.raises(StorageError, match=r"cannot read .*nope.bin.*no such file or object"):
        storage.read_bytes(s3_server.uri("nope.bin"), s3_server.settings)
    with pytest.raises(StorageError, match=r"cannot read .*missing.bin: no such file or object"):
        storage.read_bytes(str(tmp_path / "missing.bin"))
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.resolve("gs://bucket/key")


def test_a_run_directory_on_s3_keeps_its_mlflow_run_across_restarts(s3_server, tmp_path, monkeypatch):
    """The marker that lets a rerun continue its MLflow run lives beside the job's
    checkpoints, on s3:// too, reached through the job's own storage settings."""
    import mlflow

    from pipelines.runtime import resumable_mlflow_run
    from umair.config import MlflowConfig

    monkeypatch.delenv("UMAIR_S3_ENDPOINT", raising=False)  # the endpoint comes only from the settings
    cfg = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="t-resume")
    run_dir = s3_server.uri("runs", "job-1")
    first = resumable_mlflow_run(cfg, run_dir, "job-1", settings=s3_server.settings)
    assert storage.read_bytes(storage.join(run_dir, "mlflow_run_id"), s3_server.settings).decode() == first
    mlflow.MlflowClient(cfg.resolved_uri()).set_terminated(first, status="FAILED")  # the job died
    again = resumable_mlflow_run(cfg, run_dir, "job-1", settings=s3_server.settings)
    assert again == first
    assert mlflow.MlflowClient(cfg.resolved_uri()).get_run(first).info.status == "RUNNING"
    other = resumable_mlflow_run(
        cfg, s3_server.uri("runs", "job-2"), "job-2", parent_run_id=first, settings=s3_server.settings
    )
    assert other != first
    assert mlflow.MlflowClient(cfg.resolved_uri()).get_run(other).data.tags["mlflow.parentRunId"] == first
