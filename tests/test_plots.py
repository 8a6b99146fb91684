"""The run pictures (:mod:`umair.plots_runs`) and the two jobs that draw them here:
``umair evaluate`` (ᾱ per segment, training curves from the model's saved history) and
``umair recommend`` (top-K strips of a few users, with the sample world's images)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from umair.plots_runs import (
    alpha_by_segment,
    extraction_summary_plot,
    pick_users,
    strips_from_topk,
    topk_strips,
    training_curves,
)

HISTORY = [
    {"epoch": e, "train_loss": 0.7 - 0.05 * e, "val_logloss": 0.68 - 0.02 * e, "val_auc": 0.6 + 0.04 * e}
    for e in range(5)
]
SEGMENTS = {
    "all": {"users": 24, "alpha": {"sem": 0.3, "sty": 0.3, "tsem": 0.4}},
    "style": {"users": 8, "alpha": {"sem": 0.2, "sty": 0.6, "tsem": 0.2}},
}


def _image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def test_each_picture_is_a_png_written_where_asked_and_not_blank(tmp_path):
    summary = {"rows_ok": 90, "rows_partial": 6, "rows_no_image": 4, "failed_by_reason": {"read:OSError": 2}}
    drawn = {
        "curves": training_curves(HISTORY, str(tmp_path / "curves.png")),
        "alpha": alpha_by_segment(SEGMENTS, str(tmp_path / "alpha.png")),
        "extract": extraction_summary_plot(summary, str(tmp_path / "extract.png")),
    }
    for name, data in drawn.items():
        assert (tmp_path / f"{name}.png").read_bytes() == data
        px = _image(data)
        assert px.shape[1] > 500 and px.shape[0] > 300 and px.std() > 10, (name, px.shape)


def test_the_curves_mark_the_saved_epoch_and_draw_without_a_validation_window():
    def crimson_columns(px: np.ndarray) -> np.ndarray:  # where the saved epoch's dotted line is
        r, g, b = (px[..., i].astype(int) for i in range(3))
        return np.flatnonzero(((r > 180) & (g < 80) & (b < 100) & (b > 30)).sum(axis=0) > 20)

    first = crimson_columns(_image(training_curves(HISTORY, best_epoch=0)))
    best = crimson_columns(_image(training_curves(HISTORY)))  # default: the best val_auc epoch, 4
    assert len(first) and len(best) and first.mean() < best.mean()
    no_val = [{"epoch": e, "train_loss": 0.6 - 0.1 * e} for e in range(2)]
    assert _image(training_curves(no_val, best_epoch=1)).std() > 10
    assert not len(crimson_columns(_image(training_curves(no_val))))  # no validation, no epoch given: no line
    with pytest.raises(ValueError, match="empty history"):
        training_curves([])


def test_alpha_by_segment_needs_modality_weights():
    with pytest.raises(ValueError, match="no segment has modality weights"):
        alpha_by_segment({"all": {"users": 3, "alpha": {}}})


def test_extraction_plot_draws_images_per_second_over_chunks_when_the_summary_has_them():
    summary = {"rows_ok": 90, "rows_partial": 6, "failed_by_reason": {}, "images_per_s": 40.0}
    chunks = [{"chunk": i + 1, "t_s": 2.0 + i, "rows_done": 32 * (i + 1)} for i in range(3)]
    assert (
        _image(extraction_summary_plot(summary)) != _image(extraction_summary_plot({**summary, "chunk_log": chunks}))
    ).any()


def test_users_are_picked_one_per_segment_in_turn_and_strips_follow_the_ranks():
    segments = {1: "style", 2: "style", 3: "content", 4: "tag", 5: "content"}
    assert pick_users([1, 2, 3, 4, 5, 6], segments, 4) == [6, 3, 1, 4]  # "" (no segment) sorts first
    assert pick_users([1, 2], segments, 5) == [1, 2]
    topk = pa.table(
        {
            "user_id": [7, 7, 7, 8],
            "rank": pa.array([2, 1, 3, 1], pa.int32()),
            "illust_id": [20, 10, 30, 40],
            "score": pa.array([0.5, 0.9, 0.1, 0.7], pa.float32()),
        }
    )
    strips = strips_from_topk(
        topk, [7, 8, 9], {10: "a.png"}, k=2, item_labels={10: {"style": "s1"}}, user_notes={7: "x"}
    )
    assert [s.user_id for s in strips] == [7, 8]  # 9 has no list
    assert [i.illust_id for i in strips[0].items] == [10, 20] and strips[0].note == "x"
    assert strips[0].items[0].image_uri == "a.png" and strips[0].items[1].image_uri is None
    assert strips[0].items[0].labels == {"style": "s1"} and strips[0].items[0].score == pytest.approx(0.9)
    px = _image(topk_strips(strips))  # unreadable images are placeholder tiles, not errors
    assert px.shape[0] > 300 and px.std() > 5


def test_evaluate_draws_alpha_and_the_saved_training_curves_beside_its_report(tmp_path):
    from pipelines.evaluate import _pictures

    report = {"segments": SEGMENTS, "variant": "full", "model": "m", "window": {"start": "2021-10-01"}}
    meta = {"best_epoch": 4, "selected_on": "val_auc", "training": {"history": HISTORY}}
    pictures = _pictures(report, meta, str(tmp_path), None)
    assert sorted(pictures) == ["alpha_by_segment.png", "training_curves.png"]
    for name, data in pictures.items():
        assert (tmp_path / name).read_bytes() == data
    # a DCN-V2-only model (no ᾱ) from before histories were saved: no picture, no error
    assert _pictures({**report, "segments": {"all": {"users": 3, "alpha": {}}}}, {}, str(tmp_path / "x"), None) == {}


def test_recommend_draws_a_strip_per_taste_with_the_worlds_images(tiny_world, tmp_path):
    from pipelines.recommend import RecommendConfig, _strips
    from umair import storage
    from umair.training.inputs import Inputs

    world = tiny_world.root
    ids = tiny_world.illustrations.column("illust_id").to_pylist()
    users = tiny_world.users.column("user_id").to_pylist()[:8]
    topk = pa.table(
        {
            "user_id": np.repeat(users, 3),
            "rank": pa.array(np.tile([1, 2, 3], len(users)), pa.int32()),
            "illust_id": ids[: 3 * len(users)],
            "score": pa.array(np.linspace(0.9, 0.1, 3 * len(users)), pa.float32()),
        }
    )
    cfg = RecommendConfig(world=world, output=str(tmp_path), picture_users=3, picture_k=3)
    inputs = Inputs(storage.join(world, "illustrations.parquet"), "", "", "", "2021-10-01T00:00:00+00:00")
    data = _strips(cfg, inputs, storage.join(world, "truth", "users.parquet"), topk, None)
    assert data is not None and (tmp_path / "topk_strips.png").read_bytes() == data
    px = _image(data)
    assert px.shape[0] > 3 * 150 and px.shape[1] > 3 * 100  # 3 users x 3 items
    # the tiles are the world's illustrations: far from the white of placeholder tiles
    assert (px.mean(axis=2) < 200).mean() > 0.1
    assert _strips(cfg.model_copy(update={"picture_users": 0}), inputs, None, topk, None) is None


def test_an_extraction_summary_logs_its_commits_for_the_rate_picture_and_thins_long_runs():
    from umair.extraction.progress import Progress

    descriptor = {"features_rows": 10, "errors_rows": 0, "reasons": "{}"}
    short = Progress(30)
    for _ in range(3):
        short.add([descriptor])
    log = short.summary({}, 1.0, 1.0, {}, "run")["chunk_log"]
    assert [c["chunk"] for c in log] == [1, 2, 3] and [c["rows_done"] for c in log] == [10, 20, 30]
    assert all(0 <= a["t_s"] <= b["t_s"] for a, b in zip(log, log[1:]))

    long = Progress(12_345 * 10)
    for _ in range(12_345):
        long.add([descriptor])
    thinned = long.chunk_log(points=500)
    assert len(thinned) <= 501 and thinned[-1] == {**thinned[-1], "chunk": 12_345, "rows_done": 123_450}
    steps = {b["chunk"] - a["chunk"] for a, b in zip(thinned, thinned[1:-1])}
    assert steps == {25}, "evenly spread commits"
