"""Vocabularies and quantile buckets: index 0 for unknown/missing, monotone buckets,
round trips through JSON."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest

from umair.model.vocab import Buckets, Vocabulary


def test_vocabulary_orders_by_count_and_maps_unknown_to_zero() -> None:
    vocab = Vocabulary.fit(["b", "a", "b", "c", "a", "b", None])
    assert vocab.tokens.to_pylist() == ["b", "a", "c"]  # count desc, then value
    assert len(vocab) == 4
    np.testing.assert_array_equal(vocab.encode(["a", "b", "c", "zzz", None]), [2, 1, 3, 0, 0])
    assert vocab.encode(["a"]).dtype == np.int64
    assert vocab.decode([1, 0, 3]) == ["b", None, "c"]


def test_min_count_drops_rare_values() -> None:
    vocab = Vocabulary.fit(["x", "x", "y", "z", "z"], min_count=2)
    assert vocab.tokens.to_pylist() == ["x", "z"]
    np.testing.assert_array_equal(vocab.encode(["y", "z"]), [0, 2])
    with pytest.raises(ValueError):
        Vocabulary.fit(["x"], min_count=0)


def test_integer_ids_and_arrow_inputs() -> None:
    ids = np.array([10, 30, 30, 20], dtype=np.int64)
    vocab = Vocabulary.fit(ids)
    np.testing.assert_array_equal(vocab.encode(pa.array([30, 10, 99], pa.int32())), [1, 2, 0])
    np.testing.assert_array_equal(vocab.encode(pa.chunked_array([[20], [30]])), [3, 1])
    assert len(vocab.encode([])) == 0
    with pytest.raises(TypeError):
        vocab.encode(["not an id"])


def test_empty_vocabulary_maps_everything_to_zero() -> None:
    vocab = Vocabulary.fit(pa.array([], pa.string()))
    assert len(vocab) == 1
    np.testing.assert_array_equal(vocab.encode(["a", "b"]), [0, 0])


def test_encode_padded_lists() -> None:
    vocab = Vocabulary.fit(["cat", "moon", "cat", "sword"])
    out = vocab.encode_padded([["moon", "unknown", "cat"], [], None, ["sword", "cat", "moon"]])
    np.testing.assert_array_equal(out, [[2, 1, 0], [0, 0, 0], [0, 0, 0], [3, 1, 2]])
    assert vocab.encode_padded([["moon", "cat", "sword"]], max_len=2).tolist() == [[2, 1]]
    assert vocab.encode_padded([[], []]).shape == (2, 0)


@pytest.mark.parametrize("values", [["b", "a", "b", "c"], [5, 7, 7, 1], [True, False, True]])
def test_vocabulary_round_trip(values: list[object]) -> None:
    vocab = Vocabulary.fit(values)
    back = Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert back.tokens.equals(vocab.tokens)
    np.testing.assert_array_equal(back.encode(values), vocab.encode(values))
    with pytest.raises(ValueError):
        Vocabulary.from_dict({"kind": "buckets", "edges": []})


def test_buckets_are_quantiles_and_monotone() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=10_000)
    b = Buckets.fit(x, 10)
    assert len(b.edges) == 9 and len(b) == 11
    codes = b.encode(x)
    assert codes.min() == 1 and codes.max() == 10
    counts = np.bincount(codes)[1:]
    assert counts.min() > 900 and counts.max() < 1100  # roughly equal mass per bucket
    grid = np.linspace(-10, 10, 1001)
    assert (np.diff(b.encode(grid)) >= 0).all()
    # outside the fitted range: first / last bucket, never the missing index
    np.testing.assert_array_equal(b.encode([-1e9, 1e9]), [1, 10])


def test_buckets_missing_and_repeated_values() -> None:
    b = Buckets.fit([1, 1, 1, 1, 2, 3, None, float("nan")], 4)
    assert len(b.edges) == len(np.unique(b.edges))
    codes = b.encode(pa.array([1.0, 3.0, None]))
    assert codes[2] == 0 and 1 <= codes[0] <= codes[1]
    np.testing.assert_array_equal(b.encode(np.array([np.nan])), [0])
    assert len(Buckets.fit([], 5)) == 2 and Buckets.fit([], 5).encode([1.0]).tolist() == [1]
    with pytest.raises(ValueError):
        Buckets.fit([1.0], 0)


def test_buckets_on_timestamps() -> None:
    start = datetime(2021, 1, 1, tzinfo=UTC)
    times = [start + timedelta(days=i) for i in range(365)]
    arrow = pa.array(times, pa.timestamp("us", tz="UTC"))
    b = Buckets.fit(arrow, 12)
    codes = b.encode(arrow)
    assert (np.diff(codes) >= 0).all() and codes[0] == 1 and codes[-1] == 12
    as_numpy = np.array([np.datetime64(t.replace(tzinfo=None), "us") for t in times] + [np.datetime64("NaT")])
    np.testing.assert_array_equal(b.encode(as_numpy), np.append(codes, 0))
    later = pa.array([start + timedelta(days=500)], pa.timestamp("ms", tz="UTC"))
    assert b.encode(later).tolist() == [12]


def test_buckets_round_trip() -> None:
    b = Buckets.fit(np.arange(100, dtype=float), 5)
    back = Buckets.from_dict(json.loads(json.dumps(b.to_dict())))
    np.testing.assert_array_equal(back.edges, b.edges)
    np.testing.assert_array_equal(back.encode(np.arange(100)), b.encode(np.arange(100)))
    with pytest.raises(ValueError):
        Buckets.from_dict({"kind": "vocabulary", "tokens": [], "type": "string"})
