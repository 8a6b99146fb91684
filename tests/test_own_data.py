"""The README's "Your own data" walkthrough, as written, on a tiny MovieLens-shaped site
generated here: ``bench/movielens.py convert`` (the one hand-written step), then
``umair validate`` / ``pretrain-image`` / ``extract`` / ``train`` (full and
``--variant dcn_v2_only``) / ``evaluate`` through the CLI with the configs in
``pipelines/configs/movielens/`` (only paths and sizes changed)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "pipelines" / "configs" / "movielens"
GENRES = ["Action", "Comedy", "Drama", "Horror"]


def _write_source(data: Path, seed: int = 0) -> None:
    """movies.csv, ratings.csv, tags.csv and posters/ like the real dataset: some movies
    without a poster, genre-coloured posters, users who like one genre, a time span of years."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (data / "posters").mkdir(parents=True)
    movies = []
    for m in range(1, 61):
        g = GENRES[m % 4]
        movies.append((m, f"Movie {m} ({1990 + m % 20})", g if m % 7 else f"{g}|{GENRES[(m + 1) % 4]}"))
        if m % 5:  # every fifth movie has no poster
            colour = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [20, 20, 20]][m % 4], np.uint8)
            pixels = np.clip(colour + rng.integers(-20, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(data / "posters" / f"{m}.jpg", quality=90)
    with open(data / "movies.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["movieId", "title", "genres"])
        w.writerows(movies)
    t0 = 946684800  # 2000-01-01
    ratings, tags = [], []
    for u in range(1, 25):
        liked = GENRES[u % 4]
        start = t0 + int(rng.integers(0, 15 * 365 * 86400))
        for k, m in enumerate(rng.choice(60, size=30, replace=False) + 1):
            good = liked in movies[m - 1][2]
            rating = float(np.clip(rng.normal(4.3 if good else 2.7, 0.7), 0.5, 5.0) * 2) / 2
            ratings.append((u, int(m), rating, start + k * 86400))
            if k % 10 == 0:
                tags.append((u, int(m), f"tag{m % 3}", start + k * 86400))
    for name, header, rows in (
        ("ratings.csv", ["userId", "movieId", "rating", "timestamp"], ratings),
        ("tags.csv", ["userId", "movieId", "tag", "timestamp"], tags),
    ):
        with open(data / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)


def _config(name: str, dst: Path, **updates) -> Path:
    data = yaml.safe_load((CONFIGS / name).read_text())
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    dst.write_text(yaml.safe_dump(data, sort_keys=False))
    return dst


def _umair(*args: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, f"umair {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_walkthrough_configs_are_valid_settings():
    """Every key of the walkthrough's configs is a setting of its job (unknown keys are errors)."""
    from pipelines.evaluate import EvaluateConfig
    from pipelines.pretrain_image import PretrainImageConfig
    from umair.config import load_config
    from umair.extraction.settings import ExtractConfig
    from umair.training.settings import TrainConfig

    for name, cls in (
        ("pretrain_image.yaml", PretrainImageConfig),
        ("extract.yaml", ExtractConfig),
        ("train.yaml", TrainConfig),
        ("evaluate.yaml", EvaluateConfig),
    ):
        load_config(str(CONFIGS / name), cls)


@pytest.mark.slow
def test_own_data_walkthrough(tmp_path):
    data, out = tmp_path / "source", tmp_path / "site"
    _write_source(data)
    env = {**os.environ, "UMAIR_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    convert = subprocess.run(
        [sys.executable, "bench/movielens.py", "convert", "--data", str(data), "--out", str(out / "tables")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert convert.returncode == 0, convert.stderr
    split = json.loads((out / "tables" / "split.json").read_text())
    tables = {k: str(out / "tables" / f"{k}.parquet") for k in ("illustrations", "users", "interactions")}

    proc = _umair("validate", *(f"--{k}={v}" for k, v in tables.items()), env=env)
    assert "valid" in proc.stdout
    assert "without_image_uri" in proc.stdout

    mlflow = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    runs = str(tmp_path / "ray_results")
    pre = _config(
        "pretrain_image.yaml",
        tmp_path / "pretrain.yaml",
        catalogue=tables["illustrations"],
        output=str(out / "encoder"),
        encoder={"image_size": 32},
        epochs=1,
        batch_size=16,
        checkpoint_dir=runs,
        mlflow=mlflow,
    )
    _umair("pretrain-image", "--config", str(pre), env=env)
    ext = _config(
        "extract.yaml",
        tmp_path / "extract.yaml",
        catalogue=tables["illustrations"],
        output=str(out / "features"),
        encoder={"source": str(out / "encoder")},
        chunk_rows=1000,
        mlflow=mlflow,
    )
    proc = _umair("extract", "--config", str(ext), env=env)
    assert "without image" in proc.stdout

    # the full model only: the DCN-V2-only variant (same settings path) is tests/test_protocol.py's
    model = out / "model"
    train = _config(
        "train.yaml",
        tmp_path / "train.yaml",
        **tables,
        item_features=str(out / "features"),
        validation=split["validation"],
        split=split["split"],
        epochs=2,
        batch_size=64,
        run_name="own-data",
        checkpoint_dir=runs,
        output=str(model),
        mlflow=mlflow,
    )
    _umair("train", "--config", str(train), env=env)
    ev = _config("evaluate.yaml", tmp_path / "evaluate.yaml", model=str(model), mlflow=mlflow)
    _umair("evaluate", "--config", str(ev), env=env)
    meta = json.loads((model / "model.json").read_text())
    assert meta["selected_on"] == "val_auc" and meta["val_auc"] is not None
    report = json.loads((model / "evaluation.json").read_text())
    predictions = pq.read_table(model / "predictions.parquet")
    assert {"user_id", "illust_id", "ts", "label", "prob"} <= set(predictions.column_names)
    assert predictions.num_rows == report["rows"] > 0
    assert set(report["warm_cold"]) == {"users", "items"}
    # the full model reads the text vector of every movie and the poster vectors of those with one
    coverage = report["modality_coverage"]
    assert coverage["tsem"] == coverage["items"] > coverage["sem"] > 0
