"""Cosine search at catalogue scale (umair/ivf.py): the exact search in row blocks over
float16, the IVF index's answers against the exact ones, banned rows, and the candidate
generator's and user histories' flat tables (what recommend puts in the object store)."""

from __future__ import annotations

import numpy as np
import pytest

from umair import ivf
from umair.ivf import IVFIndex, cosine_topk
from umair.neighbors import CandidateGenerator, CandidateSettings, FeatureIndex, UserHistories, unit_rows


def clustered(n: int, d: int, centres: int, seed: int = 0, noise: float = 0.35) -> np.ndarray:
    """Unit rows around ``centres`` random directions (catalogues cluster by subject and hand)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    x = c[rng.integers(centres, size=n)] + noise * rng.standard_normal((n, d))
    return unit_rows(x, center=False)


def test_exact_search_in_blocks_over_float16_equals_one_float32_product(monkeypatch):
    x = clustered(5000, 32, 40)
    q = x[[3, 77, 4000]]
    banned = np.zeros(len(x), bool)
    banned[[3, 77, 4000, 10, 11]] = True
    want_rows, want_sims = cosine_topk(q, x, 25, banned)  # one block (5000 < BLOCK_ROWS)
    monkeypatch.setattr(ivf, "BLOCK_ROWS", 333)  # 16 blocks, float16 converted one at a time
    rows, sims = cosine_topk(q, x.astype(np.float16), 25, banned)
    assert rows.shape == (3, 25) and not np.isin(rows, [3, 77, 4000, 10, 11]).any()
    assert (np.diff(sims, axis=1) <= 0).all()
    # float16 rows move cosines by < 1e-3: the same neighbours up to near-ties at the cut
    overlap = np.mean([len(set(a) & set(b)) / 25 for a, b in zip(rows.tolist(), want_rows.tolist())])
    assert overlap >= 0.96 and np.abs(sims - want_sims).max() < 2e-3


def test_ivf_probing_every_list_is_the_exact_search_and_banned_rows_never_come_back():
    x = clustered(3000, 16, 30, seed=1)
    rows = np.arange(len(x))
    index = IVFIndex.build(x, rows, lists=20, probe=20)
    assert index.lists == 20 and len(index) == 3000 and sorted(index.rows.tolist()) == rows.tolist()
    banned = np.zeros(len(x), bool)
    banned[::7] = True
    q = x[[5, 500, 2999]]
    got_rows, got_sims = index.search(x, q, 15, banned)
    want_rows, want_sims = cosine_topk(q, x, 15, banned)
    assert got_rows.tolist() == want_rows.tolist()
    np.testing.assert_allclose(got_sims, want_sims, atol=1e-6)


def test_ivf_finds_most_true_neighbours_while_ranking_a_fraction_of_the_catalogue():
    n = 20_000
    x = clustered(n, 32, 200, seed=2).astype(np.float16)
    index = IVFIndex.build(x, np.arange(n), probe=16)  # 4√n = 566 lists of ~35 rows
    assert index.lists == round(4 * np.sqrt(n))
    sizes = np.diff(index.offsets)
    scanned = np.sort(sizes)[-16:].sum()  # at most the 16 largest lists are ranked per query
    assert scanned < 0.15 * n
    rng = np.random.default_rng(0)
    q = np.asarray(x[rng.choice(n, 200, replace=False)], np.float32)
    got, _ = index.search(x, q, 10)
    want, _ = cosine_topk(q, x, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), want.tolist())])
    assert recall >= 0.9, recall


def test_ivf_widens_the_probe_when_the_probed_lists_hold_too_few_allowed_rows():
    x = clustered(2000, 16, 10, seed=3)
    index = IVFIndex.build(x, np.arange(2000), lists=40, probe=1)
    banned = np.zeros(len(x), bool)
    q = x[[0]]
    first = int(np.argmax(x @ index.centroids.T, axis=1)[0])
    banned[index.rows[index.offsets[first] : index.offsets[first + 1]]] = True  # the query's own list
    rows, _ = index.search(x, q, 30, banned)
    assert rows.shape == (1, 30) and not banned[rows].any()
    # fewer allowed rows than k in the whole index: every one of them, as the exact search
    only = np.ones(len(x), bool)
    only[[4, 8, 15]] = False
    rows, _ = index.search(x, q, 30, only)
    assert sorted(rows[0].tolist()) == [4, 8, 15]


def _generator(x: np.ndarray, search: str, **kw) -> CandidateGenerator:
    import pyarrow as pa

    n = len(x)
    table = pa.table(
        {
            "illust_id": pa.array(100 + np.arange(n), pa.int64()),
            "sem": pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), x.shape[1]),
        }
    )
    index = FeatureIndex.from_table(table, ["sem"], "f.parquet", center=False)
    eligible = np.arange(n) % 10 != 0  # every tenth item not yet published
    settings = CandidateSettings(recent=2, popular=2, neighbors=12, seeds=3, spaces=("sem",), search=search, **kw)
    return CandidateGenerator(index, eligible, np.arange(n, dtype=float), np.arange(n) % 5, settings)


def test_candidate_generator_indexes_only_eligible_items_and_its_ivf_answers_like_exact_search():
    x = clustered(1500, 16, 20, seed=4)
    exact = _generator(x, "exact")
    approx = _generator(x, "ivf", ivf_lists=12, ivf_probe=12)  # every list probed: exact answers
    assert not exact.ivf and set(approx.ivf) == {"sem"}
    assert not np.isin(approx.ivf["sem"].rows, np.flatnonzero(~approx.eligible)).any()
    seeds, excluded = np.array([5, 6, 7]), np.array([5, 6, 7, 8, 9])
    a, b = exact.for_user(seeds, excluded), approx.for_user(seeds, excluded)
    assert a.rows.tolist() == b.rows.tolist() and a.sources == b.sources
    auto = _generator(x, "auto", ivf_above=1000)  # 1,350 eligible items > 1,000: IVF
    assert set(auto.ivf) == {"sem"} and not _generator(x, "auto").ivf  # default threshold 20,000


def test_user_histories_are_newest_first_bookmarks_and_unique_impressions_in_flat_arrays():
    user = np.array([7, 3, 7, 7, 3, 9, 7])
    rows = np.array([10, 11, 12, 10, -1, 13, 14])  # -1: an item without features
    label = np.array([1, 0, 1, 0, 1, 0, 1])
    ts = np.array([1, 2, 5, 3, 4, 6, 4]).astype("datetime64[s]")
    h = UserHistories.of_window(user, rows, label, ts)
    assert h.user_ids.tolist() == [3, 7, 9] and len(h) == 3
    bm, seen = h.of(7)
    assert bm.tolist() == [12, 14, 10] and seen.tolist() == [10, 12, 14]  # bookmarks newest first
    assert [a.tolist() for a in h.of(3)] == [[], [11]]  # its bookmark of an unknown item is dropped
    assert [a.tolist() for a in h.of(9)] == [[], [13]]
    assert [a.tolist() for a in h.of(4)] == [[], []]


@pytest.mark.parametrize("bad", [0, -1])
def test_settings_refuse_a_probe_below_one(bad):
    with pytest.raises(ValueError):
        CandidateSettings(ivf_probe=bad)


def test_the_index_is_built_in_blocks_as_float16_unit_rows_centred_over_the_items_with_a_vector(monkeypatch):
    import pyarrow as pa

    from umair import neighbors

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 16)).astype(np.float32) + 3.0  # all-positive-ish: centring matters
    has = np.ones(3000, bool)
    has[::13] = False  # no vector (no image)
    col = pa.array([v.tolist() if h else None for v, h in zip(x, has)], pa.list_(pa.float32(), 16))
    table = pa.table({"illust_id": pa.array(np.arange(3000, dtype=np.int64)), "sem": col})
    monkeypatch.setattr(neighbors, "BLOCK_ROWS", 333)  # 10 blocks
    index = FeatureIndex.from_table(table, ["sem"])
    want = unit_rows(np.where(has[:, None], x - x[has].mean(axis=0), 0.0), center=False)
    got = index.space("sem")
    assert got.dtype == np.float16 and (got[~has] == 0).all() and index.has("sem").tolist() == has.tolist()
    np.testing.assert_allclose(got.astype(np.float32), want, atol=1e-3)
