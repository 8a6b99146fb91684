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
    assert "== summary ==" in res.stdout and "ran in " in res.stdout
    assert (tmp_path / "world" / "world.json").exists()
    report = tmp_path / "report.html"  # the demo's last step: the run's self-contained page
    assert report.exists() and f"report: {report}" in res.stdout, res.stdout[-2000:]


def _site(tmp_path, label=(1, 0, 1, 1), user_id=(7, 8, 7, 8)):
    """A MovieLens-like site: illustrations with illust_id + image_uri (NULLs) + created_at,
    users with user_id only, ratings (row 2 rates item 3 before its created_at)."""
    from datetime import UTC, datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    t0, t1, t2 = (datetime(2021, m, 1, tzinfo=UTC) for m in (1, 2, 3))
    ill = pa.table(
        {
            "illust_id": [1, 2, 3],
            "image_uri": [str(tmp_path / "p1.jpg"), None, None],
            "created_at": pa.array([t0, None, t2], pa.timestamp("ms")),
        }
    )
    inter = pa.table(
        {
            "user_id": list(user_id),
            "illust_id": [1, 2, 3, 1],
            "ts": pa.array([t1, t0, t1, t2], pa.timestamp("s")),
            "label": list(label),
        }
    )
    args = []
    for name, table in (("illustrations", ill), ("users", pa.table({"user_id": [7, 8]})), ("interactions", inter)):
        pq.write_table(table, tmp_path / f"{name}.parquet")
        args += [f"--{name}", str(tmp_path / f"{name}.parquet")]
    return args


def test_validate_any_tables(tmp_path):
    (tmp_path / "p1.jpg").write_bytes(b"jpeg")
    args = _site(tmp_path)
    res = run("validate", *args, "--check-images")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].endswith("interactions.parquet: valid (1 warning(s))")
    for line in (
        "    without_image_uri    2",
        "    image_uris_missing   0",
        "    distinct_user_ids  2",
        '    time_range           ["2021-01-01T00:00:00+00:00", "2021-03-01T00:00:00+00:00"]',
        "    label_rate           0.75",
        "    unknown_user_ids     0",
        "    before_created_at    1",
    ):
        assert line in lines, res.stdout
    assert "first: row 2: user_id 7, illust_id 3" in res.stdout
    res = run("validate", *args, "--before-created-at", "error")
    assert res.returncode == 2
    assert f"{tmp_path / 'interactions.parquet'}: column 'ts' (row 2): expected a time at or after" in res.stderr
    assert run("validate", *args, "--before-created-at", "off").returncode == 0
    res = run("validate", *_site(tmp_path, label=(1, 0, 3, 1)))
    assert res.returncode == 2
    assert (
        f"umair validate: error: {tmp_path / 'interactions.parquet'}: column 'label' (row 2): "
        "expected labels in {0, 1}, found 3" in res.stderr
    )
    res = run("validate", *_site(tmp_path, user_id=(7, 8, 7, 5)))
    assert res.returncode == 2
    assert "column 'user_id' (row 3): expected an id present in users, found unknown id 5" in res.stderr
    res = run("validate", *args[:2])
    assert res.returncode == 2 and "missing --users, --interactions" in res.stderr


def test_validate_world_skip_images(tiny_world, tmp_path):
    """--skip-images on a world whose images are gone and whose tags are not the sample
    vocabulary: valid, with the summary (it used to crash with KeyError: None)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "world"
    shutil.copytree(tiny_world.root, root, ignore=shutil.ignore_patterns("images"))
    ill = pq.read_table(root / "illustrations.parquet")
    tags = pa.array([["Sci-Fi"]] * ill.num_rows, pa.list_(pa.string()))
    pq.write_table(ill.set_column(ill.schema.get_field_index("tags"), "tags", tags), root / "illustrations.parquet")
    res = run("validate", str(root), "--skip-images")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{root}: valid\n")
    assert f'"other": {ill.num_rows}' in res.stdout
    assert run("validate", str(root)).returncode == 2  # without --skip-images the missing images are errors
