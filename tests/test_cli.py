"""The command line: jobs listed, settings validated with errors naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from umair.config import ConfigError, DemoConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
UMAIR = str(Path(sys.executable).parent / "umair")


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [UMAIR, *args], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300
    )


def test_help_lists_the_jobs():
    out = run("--help")
    assert out.returncode == 0
    for job in ("sample", "validate", "demo"):
        assert f"    {job}" in out.stdout


def test_library_imports_without_ray():
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import umair.contracts, umair.storage, umair.config, umair.sample.world, umair.sample.painter\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_help_of_every_job_starts_without_loading_torch_ray_or_mlflow():
    """`umair <job> --help` (and loading any job's settings) must stay quick: the settings
    modules (ModelConfig, EncoderSpec, FinetuneConfig ...) import no torch, Ray or MLflow."""
    code = (
        "import contextlib, io, sys\n"
        "from pipelines.cli import build_parser, main\n"
        "jobs = list(next(a for a in build_parser()._actions if a.dest == 'job').choices)\n"
        "for job in jobs:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main([job, '--help'])\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, job\n"
        "print(len(jobs), sorted(m for m in ('torch', 'torchvision', 'ray', 'mlflow', 'sentence_transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    n_jobs, loaded = out.stdout.split(" ", 1)
    assert int(n_jobs) >= 13 and loaded.strip() == "[]", out.stdout


def test_config_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "demo.yaml"
    bad.write_text("world:\n  out: somewhere\n  seed: abc\n  sizee: tiny\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad, DemoConfig)
    lines = str(info.value).splitlines()
    assert (
        f"{bad}: world.seed: Input should be a valid integer, unable to parse string as an integer (got 'abc')" in lines
    )
    assert f"{bad}: world.sizee: Extra inputs are not permitted (got 'tiny')" in lines
    bad.write_text("world:\n  size: huge\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad, DemoConfig)
    assert f"{bad}: world.out: Field required" in str(info.value)
    assert f"{bad}: world.size: Input should be 'tiny', 'small' or 'default' (got 'huge')" in str(info.value)
    out = run("demo", "--config", str(bad))
    assert out.returncode == 2 and "world.out: Field required" in out.stderr
    out = run("demo", "--config", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "missing.yaml: no such config file" in out.stderr


def test_shipped_config_is_valid():
    settings = load_config(ROOT / "pipelines/configs/demo.yaml", DemoConfig)
    assert settings.world.size == "default"


def test_sample_and_validate_against_object_storage(s3_server, tmp_path):
    out_uri = s3_server.uri("cli", "world")
    res = run("sample", "--out", out_uri, "--size", "tiny", "--seed", "2", "--endpoint", s3_server.endpoint)
    assert res.returncode == 0, res.stderr
    assert f"wrote sample world (tiny, seed 2) to {out_uri}" in res.stdout
    res = run("validate", out_uri, env={"UMAIR_S3_ENDPOINT": s3_server.endpoint})
    assert res.returncode == 0, res.stderr
    assert f"{out_uri}: valid" in res.stdout and "interactions" in res.stdout
    res = run("validate", out_uri, "--endpoint", s3_server.endpoint, env={"AWS_SECRET_ACCESS_KEY": "wrong"})
    assert res.returncode == 2
    assert "umair validate: error: cannot inspect" in res.stderr and "rejected the credentials" in res.stderr
    res = run("validate", str(tmp_path))
    assert res.returncode == 2 and "no world.json manifest" in res.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    conf = tmp_path / "demo.yaml"
    conf.write_text(f"world:\n  out: {tmp_path / 'world'}\n  size: tiny\n  seed: 1\n  overwrite: true\n")
    res = run("demo", "--config", str(conf))
    assert res.returncode == 0, res.stderr
    assert "all tables valid, every image present" in res.stdout
    assert "demo finished" in res.stdout
    assert (tmp_path / "world" / "world.json").exists()
