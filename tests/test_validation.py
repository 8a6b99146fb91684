"""Any site's tables validate with only the required columns; the model reads them too.

A catalogue like MovieLens (ids, poster URIs, some missing; users with ids only;
timestamped ratings, some before the item's created_at) must validate with counts, and
the feature space / negative sampling must accept tables without the optional columns.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from umair import contracts
from umair.contracts import Checks, ContractError
from umair.model.features import FeatureSpace
from umair.model.interactions import ItemPool, NegativeSettings, sample_negatives
from umair.sample.world import summarize
from umair.validation import validate_tables, validate_world

T0 = datetime(2021, 1, 1, tzinfo=UTC)
T1 = datetime(2021, 2, 1, tzinfo=UTC)
T2 = datetime(2021, 3, 1, tzinfo=UTC)


def write_site(tmp_path, created_at=True, label=None, user_id=None):
    """Illustrations (illust_id, image_uri with NULLs, optionally created_at), users with
    user_id only, and int64-labelled ratings; item 3 is rated before its created_at."""
    poster = tmp_path / "p1.jpg"
    poster.write_bytes(b"jpeg")
    ill = {
        "illust_id": pa.array([1, 2, 3, 4], pa.int32()),
        "image_uri": [str(poster), None, str(tmp_path / "gone.jpg"), None],
    }
    if created_at:
        ill["created_at"] = pa.array([T0, None, T2, T0], pa.timestamp("ms"))
    paths = {k: str(tmp_path / f"{k}.parquet") for k in ("illustrations", "users", "interactions")}
    pq.write_table(pa.table(ill), paths["illustrations"])
    pq.write_table(pa.table({"user_id": pa.array([7, 8, 9], pa.int64())}), paths["users"])
    inter = {
        "user_id": user_id or [7, 8, 7, 9, 8],
        "illust_id": [1, 2, 3, 3, 4],
        "ts": pa.array([T1, T0, T1, T1, T2], pa.timestamp("s")),
        "label": label or [1, 0, 1, 1, 0],
    }
    pq.write_table(pa.table(inter), paths["interactions"])
    return paths


def test_real_tables_validate_with_counts(tmp_path, caplog):
    paths = write_site(tmp_path)
    with caplog.at_level("WARNING", logger="umair"):
        report = validate_tables(**paths, check_images=True)
    ill, users, inter = (report.summary[f"{k} ({p})"] for k, p in paths.items())
    assert ill == {
        "rows": 4,
        "distinct_illust_ids": 4,
        "optional_columns": ["created_at"],
        "without_image_uri": 2,
        "image_uris_checked": 2,
        "image_uris_missing": 1,
        "first_missing": [str(tmp_path / "gone.jpg")],
    }
    assert users == {"rows": 3, "distinct_user_ids": 3, "optional_columns": []}
    assert inter["rows"] == 5 and inter["distinct_user_ids"] == 3 and inter["distinct_illust_ids"] == 4
    assert inter["time_range"] == [T0.isoformat(), T2.isoformat()]
    assert inter["label_rate"] == 0.6
    assert inter["before_created_at"] == 2  # rows 2 and 3 rate item 3 (created T2) at T1
    assert len(report.warnings) == 2
    assert "2 interaction(s) before the illustration's created_at" in report.warnings[0]
    assert "first: row 2: user_id 7, illust_id 3" in report.warnings[0]
    assert "1 image_uri(s) do not exist" in report.warnings[1]
    assert sum("before the illustration's created_at" in r.getMessage() for r in caplog.records) == 1
    lines = report.lines()
    assert lines[0].endswith(": valid (2 warning(s))")
    assert "    without_image_uri    2" in lines
    off = validate_tables(**paths, checks=Checks(before_created_at="off"))
    assert off.warnings == [] and off.summary[f"interactions ({paths['interactions']})"]["before_created_at"] == (
        "not checked (off)"
    )
    with pytest.raises(ContractError, match=r"column 'ts' \(row 2\).*2 such row\(s\)"):
        validate_tables(**paths, checks=Checks(before_created_at="error"))


def test_tables_without_created_at_have_no_rule_to_break(tmp_path):
    paths = write_site(tmp_path, created_at=False)
    report = validate_tables(**paths, checks=Checks(before_created_at="error"))
    assert report.summary[f"interactions ({paths['interactions']})"]["before_created_at"] == 0
    assert report.warnings == []


def test_bad_tables_name_file_column_and_row(tmp_path):
    paths = write_site(tmp_path, label=[1, 0, 5, 1, 0])
    with pytest.raises(ContractError) as info:
        validate_tables(**paths)
    assert str(info.value) == f"{paths['interactions']}: column 'label' (row 2): expected labels in {{0, 1}}, found 5"
    paths = write_site(tmp_path, user_id=[7, 8, 7, 42, 8])
    with pytest.raises(ContractError) as info:
        validate_tables(**paths)
    assert str(info.value) == (
        f"{paths['interactions']}: column 'user_id' (row 3): expected an id present in users, found unknown id 42"
    )


def test_item_features_summary(tmp_path):
    paths = write_site(tmp_path)
    vec = pa.array([[0.5] * 4, [0.25] * 4], pa.list_(pa.float32(), 4))
    feats = pa.table({"illust_id": pa.array([1, 3], pa.int64()), "sem": vec, "sty": vec})
    pq.write_table(feats, tmp_path / "features.parquet")
    report = validate_tables(**paths, item_features=str(tmp_path / "features.parquet"))
    summary = report.summary[f"item_features ({tmp_path / 'features.parquet'})"]
    assert summary == {
        "rows": 2,
        "modalities": {"sem": {"width": 4, "rows": 2}, "sty": {"width": 4, "rows": 2}},
        "interacted_items_without_features": 2,
    }
    assert "2 of 4 interacted illustrations have no item-features row (first: illust_id 2)" in report.warnings


def test_feature_space_and_negatives_without_optional_columns(tmp_path):
    paths = write_site(tmp_path, created_at=False)
    ill = contracts.read_table(paths["illustrations"], "illustrations")
    users = contracts.read_table(paths["users"], "users")
    inter = contracts.read_table(paths["interactions"], "interactions")
    train = inter.filter(pa.array(inter.column("ts").cast(pa.int64()).to_numpy() < int(T2.timestamp() * 1e6)))
    space = FeatureSpace.fit(ill, users, train, T2)
    assert list(space.item_fields) == ["illust_id"]  # no created_at / width / height / page_count to bucket
    assert len(space.user_tags) == 1  # only the padding slot
    table = space.encode_users(users)
    assert table.tags.shape == (3, space.settings.max_user_tags) and not table.tags.any()
    assert space.encode_items(ill, np.array([1, 2, 99])).shape == (3, 1)
    # Items without created_at are available from the start: negatives for a rating at T0 exist.
    pool = ItemPool.build(ill, np.array([1, 2, 3, 4]), NegativeSettings())
    positives = pa.table(
        {
            "user_id": pa.array([7], pa.int64()),
            "illust_id": pa.array([1], pa.int64()),
            "ts": pa.array([T0], contracts.TIMESTAMP),
            "label": pa.array([1], pa.int8()),
        }
    )
    negatives, record = sample_negatives(positives, pool, NegativeSettings(ratio=3))
    assert negatives.num_rows == 3 and record["dropped_no_candidate"] == 0
    assert 1 not in negatives.column("illust_id").to_pylist()
    # A NULL created_at in a present column also means "from the start".
    with_nulls = ill.append_column("created_at", pa.array([T2, None, None, None], contracts.TIMESTAMP))
    pool = ItemPool.build(with_nulls, np.array([1, 2, 3, 4]), NegativeSettings())
    negatives, _ = sample_negatives(positives, pool, NegativeSettings(ratio=5))
    assert set(negatives.column("illust_id").to_pylist()) <= {2, 3, 4} and negatives.num_rows == 5


def test_world_with_foreign_tags_validates_without_images(tiny_world, tmp_path):
    """A world whose tags are not the sample vocabulary (real tables dropped into a
    world) used to crash summarize with KeyError: None after printing 'valid'."""
    root = tmp_path / "world"
    shutil.copytree(tiny_world.root, root)
    ill = pq.read_table(root / "illustrations.parquet")
    tags = pa.array([["Comedy", "Drama"]] * (ill.num_rows - 1) + [None], contracts.TAGS)
    pq.write_table(ill.set_column(ill.schema.get_field_index("tags"), "tags", tags), root / "illustrations.parquet")
    report = validate_world(str(root), check_images=False)
    counts = report.summary["world"]
    assert counts["tags_by_language"]["other"] == 2 * (ill.num_rows - 1)
    assert counts["distinct_tags"] == 2
    assert report.lines()[0] == f"{root}: valid"
    world = tiny_world
    assert "other" not in summarize(world)["tags_by_language"]
