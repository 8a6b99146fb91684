"""Every data-contract violation gives an error naming the file, column, row and expectation."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from umair import contracts
from umair.contracts import CheckReport, Checks, ContractError, check_interactions, read_table

T0 = datetime(2021, 1, 1, tzinfo=UTC)
T1 = datetime(2021, 2, 1, tzinfo=UTC)


def _ills(**over):
    cols = {
        "illust_id": pa.array([10, 11, 12], pa.int64()),
        "image_uri": ["a.jpg", "b.jpg", "c.png"],
        "tags": pa.array([["moon"], [], ["星", "cat"]], pa.list_(pa.string())),
        "created_at": pa.array([T0, T0, T1], contracts.TIMESTAMP),
        "width": pa.array([64, 64, 64], pa.int32()),
        "height": pa.array([64, 80, 64], pa.int32()),
        "page_count": pa.array([1, 2, 1], pa.int32()),
        "artist": ["a", "b", "a"],
    }
    cols.update(over)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def _users(**over):
    cols = {
        "user_id": pa.array([1, 2], pa.int64()),
        "interest_tags": pa.array([["moon"], []], pa.list_(pa.string())),
        "gender": ["f", "m"],
    }
    cols.update(over)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def _inter(**over):
    cols = {
        "user_id": pa.array([1, 2, 1], pa.int64()),
        "illust_id": pa.array([10, 11, 12], pa.int64()),
        "ts": pa.array([T1, T1, T1], contracts.TIMESTAMP),
        "label": pa.array([1, 0, 1], pa.int8()),
    }
    cols.update(over)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def _write(tmp_path, table, name="t.parquet"):
    path = str(tmp_path / name)
    pq.write_table(table, path)
    return path


def test_valid_tables_pass_and_compatible_types_are_normalised(tmp_path):
    narrow = _ills(illust_id=pa.array([10, 11, 12], pa.int32()), created_at=pa.array([T0, T0, T1], pa.timestamp("ms")))
    out = read_table(_write(tmp_path, narrow), "illustrations")
    assert out.schema.field("illust_id").type == pa.int64()
    assert out.schema.field("created_at").type == contracts.TIMESTAMP
    assert out.column("created_at")[2].as_py() == T1
    assert read_table(_write(tmp_path, _users(), "u.parquet"), "users").num_rows == 2
    inter = read_table(_write(tmp_path, _inter(label=pa.array([1, 0, 1], pa.int64())), "i.parquet"), "interactions")
    assert inter.schema.field("label").type == pa.int8()
    check_interactions(inter, _users(), _ills())


@pytest.mark.parametrize(
    "kind, table, message",
    [
        (
            "illustrations",
            _ills(image_uri=None),
            "column 'image_uri': expected a column of type string, found no such column (columns: illust_id, tags, created_at, width, height, page_count, artist)",
        ),
        (
            "illustrations",
            _ills(illust_id=pa.array(["10", "11", "12"])),
            "column 'illust_id': expected int64, found string",
        ),
        (
            "illustrations",
            _ills(tags=pa.array(["moon", "", "cat"])),
            "column 'tags': expected list<string>, found string",
        ),
        (
            "illustrations",
            _ills(created_at=pa.array(["2021-01-01"] * 3)),
            "column 'created_at': expected timestamp[us, tz=UTC], found string",
        ),
        (
            "illustrations",
            _ills(illust_id=pa.array([10, None, 12], pa.int64())),
            "column 'illust_id' (row 1): expected no nulls, found null",
        ),
        (
            "illustrations",
            _ills(illust_id=pa.array([10, 11, 10], pa.int64())),
            "column 'illust_id' (row 2): expected unique ids, found id 10 repeated",
        ),
        (
            "illustrations",
            _ills(width=pa.array([64, 0, 64], pa.int32())),
            "column 'width' (row 1): expected a positive integer or null, found 0",
        ),
        (
            "illustrations",
            _ills(artist=pa.array([b"a", b"b", b"c"], pa.binary())),
            "column 'artist': expected an extra column of type string, integer, float, bool or list, found binary",
        ),
        (
            "users",
            _users(user_id=pa.array([1, 1], pa.int64())),
            "column 'user_id' (row 1): expected unique ids, found id 1 repeated",
        ),
        (
            "users",
            _users(interest_tags=pa.array(["moon", "cat"])),
            "column 'interest_tags': expected list<string>, found string",
        ),
        (
            "illustrations",
            _ills(page_count=pa.array([1.0, 2.0, 1.0])),
            "column 'page_count': expected int32, found double",
        ),
        (
            "interactions",
            _inter(label=pa.array([1, 2, 0], pa.int8())),
            "column 'label' (row 1): expected labels in {0, 1}, found 2",
        ),
        (
            "interactions",
            _inter(label=pa.array([1, None, 0], pa.int8())),
            "column 'label' (row 1): expected no nulls, found null",
        ),
        ("interactions", _inter(label=pa.array([1.0, 0.0, 0.5])), "column 'label': expected int8, found double"),
        (
            "interactions",
            _inter(ts=pa.array([T1, None, T1], contracts.TIMESTAMP)),
            "column 'ts' (row 1): expected no nulls, found null",
        ),
        (
            "interactions",
            _inter(ts=pa.array([T1] * 3, pa.timestamp("us", tz="Asia/Tokyo"))),
            "column 'ts': expected timestamp[us, tz=UTC], found timestamp[us, tz=Asia/Tokyo]",
        ),
        (
            "extraction_errors",
            pa.table({"illust_id": pa.array([1], pa.int64()), "uri": ["x"], "stage": ["decode"]}),
            "column 'error': expected a column of type string, found no such column (columns: illust_id, uri, stage)",
        ),
    ],
)
def test_each_violation_names_file_column_row_and_expectation(tmp_path, kind, table, message):
    path = _write(tmp_path, table)
    with pytest.raises(ContractError) as info:
        read_table(path, kind)
    assert str(info.value) == f"{path}: {message}"


def _features(dim=4, **meta):
    vec = pa.array([[0.1] * dim, [0.2] * dim], pa.list_(pa.float32(), dim))
    t = pa.table({"illust_id": pa.array([1, 2], pa.int64()), "sem": vec, "sty": vec, "tsem": vec})
    return t.replace_schema_metadata({f"umair.{k}.dim": str(v) for k, v in meta.items()})


def test_item_features_vectors(tmp_path):
    assert read_table(_write(tmp_path, _features(4, sem=4, sty=4)), "item_features").num_rows == 2
    path = _write(tmp_path, _features(4, sem=8), "dim.parquet")
    with pytest.raises(ContractError) as info:
        read_table(path, "item_features")
    assert str(info.value) == f"{path}: column 'sem': expected dimension 8 (file metadata), found dimension 4"
    bad = _features().set_column(1, "sem", pa.array([[0.1, 0.2], [0.3]], pa.list_(pa.float64())))
    path = _write(tmp_path, bad, "type.parquet")
    with pytest.raises(ContractError) as info:
        read_table(path, "item_features")
    assert str(info.value) == f"{path}: column 'sem': expected fixed_size_list<float16|float32>, found list<double>"


def test_optional_columns_may_be_absent_or_null(tmp_path):
    """A catalogue with only ids and image URIs (some NULL: items without images) and a
    users table with only ids are valid; optional columns present with nulls are conformed."""
    bare = pa.table({"illust_id": pa.array([10, 11, 12], pa.int32()), "image_uri": ["a.jpg", None, None]})
    out = read_table(_write(tmp_path, bare), "illustrations")
    assert out.column_names == ["illust_id", "image_uri"]
    assert out.column("image_uri").null_count == 2
    users = read_table(_write(tmp_path, pa.table({"user_id": pa.array([1, 2], pa.int32())}), "u.parquet"), "users")
    assert users.schema == pa.schema([("user_id", pa.int64())])
    holes = _ills(
        width=pa.array([64, None, 64], pa.int64()),
        created_at=pa.array([T0, None, T1], pa.timestamp("s")),
        tags=pa.array([["moon"], None, []], pa.large_list(pa.large_string())),
    )
    out = read_table(_write(tmp_path, holes, "holes.parquet"), "illustrations")
    assert out.schema.field("width").type == pa.int32()
    assert out.schema.field("created_at").type == contracts.TIMESTAMP
    assert out.schema.field("tags").type == contracts.TAGS
    assert out.column("width").to_pylist() == [64, None, 64]
    assert out.column("created_at")[1].as_py() is None


def test_before_created_at_is_a_setting(caplog):
    early = _inter(ts=pa.array([T0, T1, T0], contracts.TIMESTAMP))  # item 12 was created at T1: row 2
    with caplog.at_level("WARNING", logger="umair"):
        report = check_interactions(early, _users(), _ills(), "inter.parquet")
    assert report.before_created_at == 1
    assert report.lines() == [
        "inter.parquet: 1 interaction(s) before the illustration's created_at (checks.before_created_at=warn); "
        "first: row 2: user_id 1, illust_id 12, ts 2021-01-01 00:00:00+00:00 before created_at 2021-02-01 00:00:00+00:00"
    ]
    assert [r.getMessage() for r in caplog.records if r.name == "umair"] == report.lines()
    off = check_interactions(early, _users(), _ills(), "inter.parquet", Checks(before_created_at="off"))
    assert off == CheckReport(file="inter.parquet") and off.lines() == []
    # No created_at column, or a NULL created_at: the item is available from the start.
    assert check_interactions(early, _users(), _ills(created_at=None)).before_created_at == 0
    nulls = _ills(created_at=pa.array([T0, T0, None], contracts.TIMESTAMP))
    assert check_interactions(early, _users(), nulls, checks=Checks(before_created_at="error")).before_created_at == 0
    with pytest.raises(Exception, match="before_created_at"):
        Checks(before_created_at="ignore")


def test_cross_table_rules():
    with pytest.raises(ContractError) as info:
        check_interactions(_inter(user_id=pa.array([1, 2, 7], pa.int64())), _users(), _ills(), "inter.parquet")
    assert (
        str(info.value)
        == "inter.parquet: column 'user_id' (row 2): expected an id present in users, found unknown id 7"
    )
    with pytest.raises(ContractError) as info:
        check_interactions(_inter(illust_id=pa.array([10, 99, 12], pa.int64())), _users(), _ills(), "inter.parquet")
    assert (
        str(info.value)
        == "inter.parquet: column 'illust_id' (row 1): expected an id present in illustrations, found unknown id 99"
    )
    early = _inter(ts=pa.array([T1, T1, T0], contracts.TIMESTAMP))  # item 12 was created at T1
    with pytest.raises(ContractError) as info:
        check_interactions(early, _users(), _ills(), "inter.parquet", Checks(before_created_at="error"))
    assert str(info.value) == (
        "inter.parquet: column 'ts' (row 2): expected a time at or after the illustration's created_at "
        "(checks.before_created_at: error; warn or off accept logs that break this), "
        "found 1 such row(s), the first: user_id 1, illust_id 12, "
        "ts 2021-01-01 00:00:00+00:00 before created_at 2021-02-01 00:00:00+00:00"
    )


def test_unknown_kind_and_missing_file(tmp_path):
    from umair.storage import StorageError

    with pytest.raises(KeyError, match="unknown table kind 'clicks'"):
        read_table(str(tmp_path / "x.parquet"), "clicks")
    with pytest.raises(StorageError, match="no such file or object"):
        read_table(str(tmp_path / "x.parquet"), "users")
