"""Paper scale (issue #18): the training data path holds item vectors as float16, one
read-only copy per node shared by its workers through the Ray object store; the
extraction's commit manifests are compacted without ever double counting a row."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from umair import storage
from umair.config import MlflowConfig, RayConfig, StorageConfig
from umair.errors import FeatureError
from umair.model.features import ItemTable, VectorStats
from umair.model.history import SortedLog
from umair.model.item_features import BLOCK_ROWS, standardised
from umair.training.inputs import prepare
from umair.training.local import LocalRecipe, fit_local
from umair.training.lookup import Lookup, SharedTables, load_lookup, shared_tables
from umair.training.memory import residency, worker_report
from umair.training.settings import TrainConfig

# --------------------------------------------------------------------------- float16 item vectors


def _tiny_cfg(tiny_world, tiny_features, root: Path, **kw) -> TrainConfig:
    return TrainConfig(
        world=tiny_world.root,
        item_features=tiny_features,
        num_workers=2,
        seed=0,
        checkpoint_dir=str(root / "ray_results"),
        output=str(root / "model"),
        mlflow=MlflowConfig(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", experiment="t-scale"),
        ray=RayConfig(num_cpus=4),
        **kw,
    )


def test_float16_item_table_round_trips_the_float32_standardisation(tiny_world, tiny_features, tmp_path):
    p = prepare(_tiny_cfg(tiny_world, tiny_features, tmp_path))
    lookup16, _, items16 = load_lookup(p.space, p.inputs, p.modalities, "cpu", None, p.info.fingerprint)
    _, _, items32 = load_lookup(p.space, p.inputs, p.modalities, "cpu", None, p.info.fingerprint, dtype=np.float32)
    assert p.modalities == ["tsem", "sem", "sty"]
    for m in p.modalities:
        x16, x32 = items16.vectors[m], items32.vectors[m]
        assert x16.dtype == np.float16 and x32.dtype == np.float32 and x16.shape == x32.shape
        assert x16.nbytes * 2 == x32.nbytes
        # float16 keeps 11 significant bits: relative error <= 2^-11 on standardised values
        np.testing.assert_allclose(x16.astype(np.float32), x32, rtol=2**-10, atol=1e-3)
        assert abs(float(x32.mean())) < 0.2  # standardised with the training items' statistics
    rows = torch.arange(len(items16.illust_ids))
    got = lookup16.item_vectors(rows)
    for m in p.modalities:  # the model still reads float32, converted per batch
        assert got[m].dtype == torch.float32 and lookup16.vectors[m].dtype == torch.float16
        np.testing.assert_allclose(got[m].numpy(), items32.vectors[m], rtol=2**-10, atol=1e-3)


def test_standardisation_runs_in_float32_blocks_and_refuses_values_float16_cannot_hold():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(BLOCK_ROWS + 7, 3)) * 50 + 1000).astype(np.float32)
    present = np.ones(len(x), bool)
    present[[3, BLOCK_ROWS + 2]] = False
    stats = VectorStats(x.mean(0).astype(np.float32), x.std(0).astype(np.float32))
    out = standardised(x, present, stats, np.float16)
    ref = ((x - stats.mean) / stats.std).astype(np.float32)  # what float32 training used to read
    ref[~present] = 0
    assert out.dtype == np.float16 and (out[~present] == 0).all()
    np.testing.assert_allclose(out.astype(np.float32), ref, rtol=2**-10, atol=2**-12)
    raw = np.full((4, 2), 70000.0, np.float32)  # unstandardised and over float16's 65504
    with pytest.raises(FeatureError, match=r"features.parquet: column 'sem': row 0 does not fit float16"):
        standardised(raw, np.ones(4, bool), None, np.float16, "features.parquet: column 'sem'")
    assert standardised(raw, np.ones(4, bool), None, np.float32).dtype == np.float32


def test_a_model_trained_on_the_float16_table_still_learns(tiny_world, tiny_features, tmp_path):
    p = prepare(_tiny_cfg(tiny_world, tiny_features, tmp_path, variant="w/o TSEM"))
    fitted = fit_local(p, p.model_config, LocalRecipe(epochs=3, batch_size=32, lr=3e-3))
    assert fitted.lookup.vectors["sem"].dtype == torch.float16
    assert all(np.isfinite(fitted.epoch_loss)) and fitted.epoch_loss[-1] < fitted.epoch_loss[0]


# --------------------------------------------------------------------------- one copy per node


def _tables(n: int = 2000) -> SharedTables:
    from umair.model.features import UserTable

    rng = np.random.default_rng(0)
    ids = np.arange(n, dtype=np.int64)
    items = ItemTable(
        ids,
        np.zeros((n, 2), np.int64),
        {"sem": rng.normal(size=(n, 256)).astype(np.float16), "sty": rng.normal(size=(n, 32)).astype(np.float16)},
        {},
    )
    users = UserTable(
        np.arange(5, dtype=np.int64), np.arange(5), np.zeros((5, 2), np.int64), np.zeros((5, 1), np.int64)
    )
    m = 30_000  # the interaction log the user history reads, sorted once on the driver
    log = SortedLog.build(
        rng.integers(5, size=m), rng.integers(10**6, size=m), rng.integers(n, size=m), rng.random(m) < 0.3
    )
    return SharedTables(users, items, log)


def _log_bytes(log: SortedLog) -> int:
    return sum(a.nbytes for a in (log.times, log.liked_keys, log.liked_items, log.passed_keys, log.passed_items))


def test_a_private_copy_of_the_tables_is_reported_as_private():
    shared = _tables()
    lookup = Lookup(shared.users, shared.items, ["sem", "sty"], "cpu")
    report = worker_report(lookup.item_tensors())
    assert report["items_shared_mb"] == 0 and report["items_private_mb"] > 1.0
    assert report["peak_rss_mb"] >= report["uss_mb"] > 0
    assert residency([]) == {"shared_mb": 0.0, "private_mb": 0.0}


def test_every_worker_maps_the_one_object_store_copy_without_copying(ray_local):
    import ray

    shared = _tables()
    ref = ray.put(shared)
    nbytes = sum(v.nbytes for v in shared.items.vectors.values()) + shared.items.fields.nbytes + _log_bytes(shared.log)
    mine = ray.get(ref)
    assert not mine.items.vectors["sem"].flags.writeable  # a read-only view of the store
    driver = residency([(mine.items.vectors["sem"].__array_interface__["data"][0], mine.items.vectors["sem"].nbytes)])

    @ray.remote(num_cpus=0.1)
    def worker(refs: list) -> tuple[bool, bool, dict]:
        import os

        tables = ray.get(refs[0])
        lookup = tables.lookup(["sem", "sty"], "cpu")
        arr = tables.items.vectors["sem"]
        same = lookup.vectors["sem"].data_ptr() == arr.__array_interface__["data"][0]  # torch wrapped, not copied
        return not arr.flags.writeable and same, os.getpid(), worker_report(lookup.shared_tensors())

    (ro0, pid0, w0), (ro1, pid1, w1) = ray.get([worker.remote([ref]), worker.remote([ref])])
    assert pid0 != pid1 and pid0 != os.getpid()
    assert ro0 and ro1
    for w in (w0, w1):
        assert w["items_private_mb"] == 0, w
        assert w["items_shared_mb"] == pytest.approx(nbytes / 2**20)
        # the same bytes of the same /dev/shm file as the driver's view: one copy on the node
        assert (w["items_shm_inode"], w["items_shm_offset"]) == (driver["shm_inode"], driver["shm_offset"])


@pytest.mark.slow
def test_two_worker_training_reads_one_shared_float16_table(ray_local, tiny_world, tiny_features, tmp_path):
    from pipelines import train

    cfg = _tiny_cfg(
        tiny_world, tiny_features, tmp_path, epochs=1, batch_size=64, run_name="t-shared", model={"user_history": True}
    )
    summary = train.run(cfg)
    assert 0.0 <= summary["test_auc"] <= 1.0
    p = prepare(cfg)
    shared = shared_tables(p)
    items = shared.items
    assert shared.log is not None  # a model with the user's history: its sorted log is shared too
    table_mb = (sum(a.nbytes for a in (*items.vectors.values(), items.fields)) + _log_bytes(shared.log)) / 2**20
    history = json.loads((tmp_path / "model" / "model.json").read_text())["training"]["history"]
    mem = history[0]
    for w in ("w0", "w1"):
        assert mem[f"mem.{w}.items_private_mb"] == 0, mem
        assert mem[f"mem.{w}.items_shared_mb"] == pytest.approx(table_mb, rel=0.01)
        assert mem[f"mem.{w}.peak_rss_mb"] > 0
    assert mem["mem.w0.items_shm_inode"] == mem["mem.w1.items_shm_inode"]
    assert mem["mem.w0.items_shm_offset"] == mem["mem.w1.items_shm_offset"]


# --------------------------------------------------------------------------- helpers kept for the store tests


# --------------------------------------------------------------------------- compacted commit manifests

ENC = {"version": "enc-v1", "sem_dim": 4, "sty_dim": 2, "spec": {}, "image_size": 32}


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> tuple[str, storage.StorageSettings | None, StorageConfig]:
    """An empty extraction output on the local filesystem or on the S3 fixture."""
    if request.param == "local":
        return str(tmp_path / "out"), None, StorageConfig()
    s3 = request.getfixturevalue("s3_server")
    cfg = StorageConfig(endpoint=s3.endpoint, region="us-east-1", retries=3)
    return s3.uri("scale", tmp_path.name), s3.settings, cfg


def _commit(store, run_id: str, seq: int, ids: list[int]) -> dict:
    """A committed chunk of real part files (every 5th id: an unreadable image, so a
    partial feature row and an error row), as the writer tasks and the driver make them."""
    from umair.extraction.stages import write_parts
    from umair.feature_store import chunk_manifest, commit_chunk, output_meta

    output, settings, config = store
    n, bad = len(ids), np.array([i % 5 == 0 for i in ids])
    batch = {
        "illust_id": np.array(ids),
        "image_uri": np.array([f"x/{i}.jpg" for i in ids], dtype=object),
        "ok": ~bad,
        "stage": np.where(bad, "decode", "").astype(object),
        "reason": np.where(bad, "corrupt", "").astype(object),
        "error": np.where(bad, "corrupt: x", "").astype(object),
        "sem": np.arange(n * 4, dtype=np.float32).reshape(n, 4) + seq,
        "sty": np.ones((n, 2), np.float32),
    }
    meta = output_meta(ENC, None, run_id, "none")
    desc = write_parts(batch, output, run_id, meta["metadata"], config, 5.0)
    manifest = chunk_manifest([{k: v[0] for k, v in desc.items()}], run_id, seq, meta)
    commit_chunk(output, manifest, settings or storage.StorageSettings(), 5.0)
    return manifest


def _view(store) -> dict:
    """What every reader of the output sees: feature rows, error ids, the skip list."""
    from umair.feature_store import done_ids, list_manifests, read_errors, read_features

    output, settings, _ = store
    features = read_features(output, settings=settings)  # refuses an id committed twice
    manifests = [m for m in list_manifests(output, settings) if m["status"] == "committed"]
    by_id = dict(zip(features.column("illust_id").to_pylist(), features.column("sem").to_pylist(), strict=True))
    return {
        "features": by_id,
        "errors": sorted(read_errors(output, settings=settings).column("illust_id").to_pylist()),
        "done": done_ids(output, manifests, settings).tolist(),
        "complete": sorted(committed(output, manifests, settings, partial=False)),
    }


def committed(output, manifests, settings, partial):
    from umair.feature_store import committed_ids

    return committed_ids(output, manifests, settings, kinds=("features",), partial=partial).tolist()


def _files(store, folder: str) -> list[str]:
    output, settings, _ = store
    return [u.rsplit("/", 1)[1] for u in storage.list_files(storage.join(output, folder), settings)]


def test_compaction_folds_each_run_into_one_manifest_and_readers_see_the_same_rows(store):
    from umair.commit_log import compact, list_manifests

    output, settings, _ = store
    for seq in range(3):
        _commit(store, "run-a", seq, list(range(1 + 10 * seq, 11 + 10 * seq)))
    _commit(store, "run-b", 0, list(range(31, 41)))
    before = _view(store)
    assert len(before["features"]) == 40 and before["done"] == list(range(1, 41)) and len(before["errors"]) == 8
    assert len(_files(store, "_commits")) == 4

    assert compact(output, settings, 5.0) == {"runs_compacted": 2, "manifests_removed": 4, "indexes_removed": 0}
    assert sorted(_files(store, "_commits")) == ["run-a.json", "run-b.json"]
    assert len(_files(store, "_index")) == 2
    manifests = list_manifests(output, settings)
    assert [(m["run_id"], m["seqs"], m["rows_ok"], m["rows_partial"]) for m in manifests] == [
        ("run-a", [0, 1, 2], 24, 6),
        ("run-b", [0], 8, 2),
    ]
    assert _view(store) == before  # each id once, the same vectors, errors and skip list
    assert compact(output, settings, 5.0) == {"runs_compacted": 0, "manifests_removed": 0, "indexes_removed": 0}


def test_a_compaction_stopped_after_any_step_counts_every_row_once_and_the_next_one_finishes_it(store):
    from umair.commit_log import all_manifests, compact, fold_run, index_run, list_manifests

    output, settings, _ = store
    s = settings or storage.StorageSettings()
    chunks = [_commit(store, "run-a", seq, list(range(1 + 10 * seq, 11 + 10 * seq))) for seq in range(3)]
    chunks = all_manifests(output, settings)  # as committed (status, committed_at)
    before = _view(store)

    index = index_run(output, chunks, s, 5.0)  # stopped after step 1: an index nothing lists
    assert len(_files(store, "_index")) == 1 and len(list_manifests(output, settings)) == 3
    assert _view(store) == before

    fold_run(output, chunks, index, s, 5.0)  # stopped after step 2: the chunks' manifests are still there
    assert len(_files(store, "_commits")) == 4
    assert [m.get("compacted", False) for m in list_manifests(output, settings)] == [True]
    assert _view(store) == before  # the folded chunks are not counted again

    # the next compaction drops the leftovers; a later chunk of the same run is folded in too
    assert compact(output, settings, 5.0) == {"runs_compacted": 0, "manifests_removed": 3, "indexes_removed": 0}
    _commit(store, "run-a", 3, [41, 42])
    assert [m.get("seqs") for m in list_manifests(output, settings)] == [[0, 1, 2], None]
    grown = _view(store)
    assert sorted(grown["features"]) == list(range(1, 31)) + [41, 42]
    assert compact(output, settings, 5.0) == {"runs_compacted": 1, "manifests_removed": 1, "indexes_removed": 0}
    assert _files(store, "_commits") == ["run-a.json"] and len(_files(store, "_index")) == 1
    assert _view(store) == grown

    # an index whose run manifest was never written is removed
    stray = index_run(output, [_commit(store, "run-z", 0, [99])], s, 5.0)
    assert compact(output, settings, 5.0) == {"runs_compacted": 1, "manifests_removed": 1, "indexes_removed": 1}
    assert stray["path"].rsplit("/", 1)[1] not in _files(store, "_index")


def test_repaired_duplicates_across_folded_runs_are_read_from_the_parts_until_reindexed(tmp_path):
    from umair.commit_log import compact, list_manifests
    from umair.feature_store import read_features, repair

    store = (str(tmp_path / "out"), None, StorageConfig())
    output = store[0]
    _commit(store, "run-a", 0, [1, 2, 3, 4])
    _commit(store, "run-b", 0, [3, 4, 6])  # a second writer redid 3 and 4
    compact(output, None, 5.0)
    with pytest.raises(FeatureError, match=r"e\.g\. 3 in manifests run-a, run-b under"):
        read_features(output)
    assert repair(output) == {"manifests_rewritten": 1, "parts_rewritten": 1, "rows_dropped": 2}
    assert [bool(m.get("index")) for m in list_manifests(output)] == [True, False]
    assert _view(store)["done"] == [1, 2, 3, 4, 6]
    assert compact(output, None, 5.0)["runs_compacted"] == 1  # re-indexed
    assert [bool(m.get("index")) for m in list_manifests(output)] == [True, True]
    assert _view(store)["done"] == [1, 2, 3, 4, 6] and sorted(_view(store)["features"]) == [1, 2, 3, 4, 6]


def test_the_skip_list_and_catalogue_are_read_columnar(tmp_path):
    from datetime import UTC, datetime

    import pyarrow.parquet as pq

    from umair.extraction.plan import select_rows
    from umair.extraction.settings import ExtractConfig

    n = 5000
    created = pa.array(
        [datetime(2023, 1 + (i % 2) * 5, 1) for i in range(n)], pa.timestamp("ms")
    )  # naive milliseconds: the contract reads them as UTC
    table = pa.table(
        {
            "illust_id": pa.array(np.arange(n) * 3, pa.int32()),
            "image_uri": pa.array([f"x/{i}.jpg" for i in range(n)]),
            "created_at": created,
            "caption": pa.array(["big text column never read"] * n),
        }
    )
    uri = str(tmp_path / "catalogue.parquet")
    pq.write_table(table, uri, row_group_size=500)
    done = np.arange(0, 3 * n, 6, dtype=np.int64)  # every even row is committed
    cfg = ExtractConfig(catalogue=uri, output=str(tmp_path / "o"), since=datetime(2023, 3, 1, tzinfo=UTC))
    todo, counts = select_rows(cfg, storage.StorageSettings(), done)
    assert counts == {"catalogue_rows": n, "selected_rows": n // 2, "already_done": 0, "to_process": n // 2}
    assert todo.column_names == ["illust_id", "image_uri"] and todo.schema.field("illust_id").type == pa.int64()
    assert (todo.column("illust_id").to_numpy() % 6 == 3).all()
    todo, counts = select_rows(cfg.model_copy(update={"since": None}), storage.StorageSettings(), done)
    assert counts["already_done"] == n // 2 and counts["to_process"] == n // 2
