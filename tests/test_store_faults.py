"""Faults of the feature store and its writers: two writers on one output, ids committed
twice, a committed file changed in place, NaN / inf vectors. Each test asserts exact
counts and the exact message a user sees."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from umair import storage
from umair.config import StorageConfig
from umair.contracts import ContractError, validate
from umair.errors import FeatureError
from umair.extraction.stages import mark_non_finite, write_parts
from umair.feature_store import (
    chunk_manifest,
    commit_chunk,
    list_manifests,
    manifest_uri,
    output_meta,
    part_uri,
    read_errors,
    read_features,
    repair,
)
from umair.lease import LEASE, Lease, LeaseHeld, LeaseLost

ROOT = Path(__file__).resolve().parents[1]
ENC = {"version": "enc-v1", "sem_dim": 4, "sty_dim": 2, "spec": {}, "image_size": 32}
OUT_META = output_meta(ENC, None, "run-x", "none")
META = OUT_META["metadata"]


# --------------------------------------------------------------------------- the lease


def _stale_lease(output: str, **holder: object) -> None:
    data = {"run_id": "r-old", "host": "another-host", "pid": 1, "started_at": "2024-01-01T00:00:00+00:00"}
    data.update({"heartbeat_at": "2024-01-01T00:00:00+00:00", **holder})
    storage.write_bytes(storage.join(output, LEASE), json.dumps(data).encode())


def test_a_second_writer_is_refused_naming_the_live_holder(tmp_path):
    output = str(tmp_path / "out")
    with Lease.acquire(output, "r-1", heartbeat_s=60) as first:
        with pytest.raises(LeaseHeld) as err:
            Lease.acquire(output, "r-2")
        msg = str(err.value)
        assert re.match(
            rf"{re.escape(output)}: run r-1 \(host {re.escape(socket.gethostname())}, pid {os.getpid()}, started \S+, "
            r"last heartbeat \S+\) is writing here; one writer per output at a time\. If it is dead, rerun after "
            r"stale_after_s=1800s from that heartbeat, or delete \S+_lease\.json\.$",
            msg,
        ), msg
        first.check()  # still held
    assert not os.path.exists(os.path.join(output, LEASE)), "released at the end"
    Lease.acquire(output, "r-3", heartbeat_s=60).release()


def test_a_stale_lease_is_taken_over_and_its_old_holder_can_no_longer_commit(tmp_path):
    output = str(tmp_path / "out")
    _stale_lease(output)  # another host, silent since 2024
    with Lease.acquire(output, "r-new", heartbeat_s=60) as lease:
        assert json.loads(storage.read_bytes(os.path.join(output, LEASE)))["run_id"] == "r-new"
        _stale_lease(output, run_id="r-thief", heartbeat_at=datetime.now(UTC).isoformat())  # someone else's now
        with pytest.raises(
            LeaseLost, match=r"run r-new lost its lease \(the lease is now held by run r-thief \(host another-host"
        ):
            lease.check()


def test_a_lease_whose_process_is_gone_on_this_host_is_taken_over_at_once(tmp_path):
    output = str(tmp_path / "out")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _stale_lease(output, host=socket.gethostname(), pid=gone.pid, heartbeat_at=datetime.now(UTC).isoformat())
    with Lease.acquire(output, "r-next", heartbeat_s=60):
        pass


def test_the_heartbeat_renews_the_lease_on_its_own_clock(tmp_path):
    output = str(tmp_path / "out")
    with Lease.acquire(output, "r-1", heartbeat_s=0.2) as lease:
        first = json.loads(storage.read_bytes(os.path.join(output, LEASE)))["heartbeat_at"]
        time.sleep(0.9)  # no commit in between: the thread alone renews
        later = json.loads(storage.read_bytes(os.path.join(output, LEASE)))["heartbeat_at"]
        assert later > first
        lease.check()


@contextlib.contextmanager
def _store_down(path: str):
    """The local lease store cannot be read or written while the block runs (a directory
    where the lease file was); afterwards the file is back as it was (a local version is
    the content's hash, so the same version)."""
    saved = storage.read_bytes(path)
    os.remove(path)
    os.mkdir(path)
    try:
        yield saved
    finally:
        os.rmdir(path)
        storage.write_bytes(path, saved)


def test_a_store_outage_shorter_than_half_the_stale_time_keeps_the_lease(tmp_path):
    output = str(tmp_path / "out")
    path = os.path.join(output, LEASE)
    with Lease.acquire(output, "r-1", heartbeat_s=0.1, stale_after_s=2.0) as lease:
        with _store_down(path) as saved:
            time.sleep(0.5)  # every renewal fails meanwhile
        time.sleep(0.3)
        lease.check()  # the beats failed while it was away; it is still this run's
        assert json.loads(storage.read_bytes(path))["heartbeat_at"] > json.loads(saved)["heartbeat_at"]
    assert not os.path.exists(path)


def test_no_heartbeat_through_for_half_the_stale_time_stops_commits(tmp_path):
    output = str(tmp_path / "out")
    path = os.path.join(output, LEASE)
    with Lease.acquire(output, "r-1", heartbeat_s=0.1, stale_after_s=1.0) as lease:
        with _store_down(path):
            time.sleep(0.8)  # past half of stale_after_s: another run may take it over soon
            with pytest.raises(LeaseLost, match=r"run r-1 lost its lease \(no heartbeat got through for \ds: "):
                lease.check()
        with pytest.raises(LeaseLost):
            lease.check()  # lost stays lost: this run commits nothing more


def test_a_lease_left_by_an_earlier_run_of_this_process_is_taken_over(tmp_path):
    # A run that failed while the store was down could not delete its lease; the rerun in
    # the same process (a notebook, a retrying driver) must not wait out stale_after_s.
    output = str(tmp_path / "out")
    now = datetime.now(UTC).isoformat()
    _stale_lease(output, run_id="r-earlier", host=socket.gethostname(), pid=os.getpid(), heartbeat_at=now)
    with Lease.acquire(output, "r-rerun", heartbeat_s=60) as lease:
        assert json.loads(storage.read_bytes(os.path.join(output, LEASE)))["run_id"] == "r-rerun"
        lease.check()


def test_the_lease_on_s3_uses_conditional_writes(s3_server):
    output = s3_server.uri("lease", "out")
    with Lease.acquire(output, "s3-1", s3_server.settings, heartbeat_s=0.3) as lease:
        with pytest.raises(LeaseHeld, match=r"run s3-1 \(host .*\) is writing here"):
            Lease.acquire(output, "s3-2", s3_server.settings)
        time.sleep(0.8)
        lease.check()  # renewed by If-Match, still ours
    assert not storage.exists(storage.join(output, LEASE), s3_server.settings)
    storage.write_bytes(
        storage.join(output, LEASE),
        json.dumps(
            {
                "run_id": "s3-old",
                "host": "elsewhere",
                "pid": 1,
                "started_at": "2024-01-01T00:00:00+00:00",
                "heartbeat_at": "2024-01-01T00:00:00+00:00",
            }
        ).encode(),
        s3_server.settings,
    )
    with Lease.acquire(output, "s3-3", s3_server.settings, heartbeat_s=60):
        held = json.loads(storage.read_bytes(storage.join(output, LEASE), s3_server.settings))
        assert held["run_id"] == "s3-3"


# --------------------------------------------------------------------------- committed parts


def _commit(output: str, run_id: str, seq: int, ids: list[int], offset: float = 0.0) -> dict:
    """A committed chunk of real part files, as the pipeline's writer tasks and driver make them."""
    n = len(ids)
    batch = {
        "illust_id": np.array(ids),
        "image_uri": np.array([f"x/{i}.jpg" for i in ids], dtype=object),
        "ok": np.ones(n, bool),
        "stage": np.array([""] * n, dtype=object),
        "reason": np.array([""] * n, dtype=object),
        "error": np.array([""] * n, dtype=object),
        "sem": np.arange(n * 4, dtype=np.float32).reshape(n, 4) + offset,
        "sty": np.ones((n, 2), np.float32),
    }
    desc = write_parts(batch, output, run_id, META, StorageConfig(), 5.0)
    manifest = chunk_manifest([{k: v[0] for k, v in desc.items()}], run_id, seq, OUT_META)
    commit_chunk(output, manifest, None, 5.0)
    return manifest


def test_ids_committed_twice_are_refused_naming_the_manifests_and_repaired(tmp_path):
    output = str(tmp_path / "out")
    _commit(output, "run-a", 0, [1, 2, 3, 4])
    _commit(output, "run-b", 0, [3, 4, 5], offset=100.0)  # a second writer redid 3 and 4
    _commit(output, "run-b", 1, [6])
    with pytest.raises(FeatureError) as err:
        read_features(output)
    assert str(err.value) == (
        f"{output}: 2 illust_id(s) are committed more than once (e.g. 3 in manifests run-a-000000, run-b-000000 "
        f"under {os.path.join(output, '_commits')}); run `umair extract --repair` on this output"
    )
    assert repair(output) == {"manifests_rewritten": 1, "parts_rewritten": 1, "rows_dropped": 2}
    features = read_features(output)
    ids = features.column("illust_id").to_pylist()
    assert sorted(ids) == [1, 2, 3, 4, 5, 6] and len(ids) == 6
    sem = dict(zip(ids, features.column("sem").to_pylist(), strict=True))
    assert sem[3][0] == 8.0 and sem[5][0] == 108.0, "the first committed copy of 3 is kept; 5 is untouched"
    assert repair(output) == {"manifests_rewritten": 0, "parts_rewritten": 0, "rows_dropped": 0}, "idempotent"
    assert sum(m["rows_ok"] for m in list_manifests(output)) == 6


def test_a_committed_part_changed_in_place_is_refused_naming_it(tmp_path):
    output = str(tmp_path / "out")
    manifest = _commit(output, "run-a", 0, list(range(1, 41)))
    part = part_uri(output, manifest["features"][0]["path"])
    data = bytearray(Path(part).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])  # same size, bytes flipped
    Path(part).write_bytes(bytes(data))
    with pytest.raises(FeatureError) as err:
        read_features(output)
    msg = str(err.value)
    assert msg.startswith(
        f"{part}: the file changed after it was committed (manifest {manifest_uri(output, manifest)} lists "
    )
    assert f"{len(data)} bytes, sha256 " in msg and "restore it from a copy" in msg
    with pytest.raises(storage.StorageError, match=re.escape(part)):  # its id column is unreadable too
        read_errors(output)


def test_non_finite_vectors_are_error_rows_at_extraction_and_refused_on_read(tmp_path):
    n = 4
    batch = {
        "illust_id": np.arange(1, n + 1),
        "ok": np.array([True, True, True, False]),
        "stage": np.array(["", "", "", "decode"], dtype=object),
        "reason": np.array(["", "", "", "corrupt"], dtype=object),
        "error": np.array(["", "", "", "x"], dtype=object),
        "sem": np.array([[0.0, 1.0], [np.nan, 0.0], [0.0, 0.0], [0.0, 0.0]], np.float32),
        "sty": np.array([[1.0], [1.0], [np.inf], [1.0]], np.float32),
    }
    out, present = mark_non_finite(batch, batch["ok"].copy())
    assert present["sem"].tolist() == [True, False, True, False]  # absent: NULL, never a NaN posing as a vector
    assert present["sty"].tolist() == [True, True, False, False]
    assert out["stage"].tolist() == ["", "encode", "encode", "decode"]
    assert out["reason"].tolist() == ["", "non_finite", "non_finite", "corrupt"]
    assert out["error"][1] == "the encoder produced NaN or infinite values (sem)"
    assert out["error"][2] == "the encoder produced NaN or infinite values (sty)"

    vectors = pa.FixedSizeListArray.from_arrays(pa.array([0.0, 1.0, float("nan"), 2.0], pa.float32()), 2)
    table = pa.table({"illust_id": pa.array([7, 8], pa.int64()), "sem": vectors})
    with pytest.raises(ContractError) as err:
        validate(table, "item_features", "features.parquet")
    assert str(err.value) == (
        "features.parquet: column 'sem' (row 1): expected finite values in every vector, found illust_id 8: NaN or infinity"
    )


# --------------------------------------------------------------------------- two real writers


WRITER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from pipelines.extract import run
    from umair.config import load_config
    from umair.extraction.settings import ExtractConfig

    barrier, me = Path(sys.argv[2]), sys.argv[3]
    (barrier / me).touch()
    while len(list(barrier.iterdir())) < 2:  # both processes are up: start together
        time.sleep(0.01)
    try:
        summary = run(load_config(sys.argv[1], ExtractConfig))
        print("RESULT " + json.dumps({"ok": True, **{k: summary[k] for k in ("rows_ok", "rows_partial", "rows_failed")}}))
    except Exception as err:
        print("RESULT " + json.dumps({"ok": False, "type": type(err).__name__, "error": str(err)}))
    """
)


@pytest.mark.slow
def test_two_extractions_started_together_on_one_output_extract_every_id_once(tmp_path):
    import yaml

    from umair.sample.world import write_world

    world = write_world(str(tmp_path / "world"), "tiny", seed=3, progress=False)
    output = str(tmp_path / "out")
    config = tmp_path / "extract.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "catalogue": os.path.join(world.root, "illustrations.parquet"),
                "output": output,
                "encoder": {"source": None, "spec": {"backbone": "resnet18", "image_size": 32}},
                "chunk_rows": 32,
                "batch_size": 16,
                "decode_batch_size": 16,
                "ray": {"num_cpus": 2},
                "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "two-writers"},
            }
        )
    )
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(config), str(barrier), name],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("a", "b")
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=400)
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        assert lines, out[-3000:]
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    winners = [r for r in results if r["ok"]]
    losers = [r for r in results if not r["ok"]]
    assert len(winners) == 1 and len(losers) == 1, results
    assert losers[0]["type"] == "LeaseHeld"
    assert re.match(rf"{re.escape(output)}: run \S+ \(host \S+, pid \d+, started ", losers[0]["error"]), losers[0]
    features, errors = read_features(output), read_errors(output)
    ids = features.column("illust_id").to_pylist()
    assert len(ids) == len(set(ids)), "every id once"
    catalogue = world.illustrations.num_rows
    assert winners[0]["rows_ok"] + winners[0]["rows_partial"] == catalogue
    assert len(ids) == catalogue and errors.num_rows == winners[0]["rows_failed"]


# --------------------------------------------------------------------------- manifests rewritten in place


def test_manifests_read_while_rewritten_on_s3_are_never_torn(s3_server):
    """A chunk manifest is rewritten in place (pending -> committed, a longer body) while
    other processes list the output. S3 reads size the object before fetching it, so a
    read overlapping a rewrite returns the new body cut at the old size (CI saw a
    JSONDecodeError from this): every read a reader makes must give one whole version."""
    import threading

    from umair.commit_log import read_json

    uri = s3_server.uri("torn", "_commits", "r-000001.json")
    settings = s3_server.settings
    versions = [{"status": "pending", "seq": 1}, {"status": "committed", "seq": 1, "parts": ["p" * 40] * 60}]
    bodies = [json.dumps(v).encode() for v in versions]
    storage.write_bytes(uri, bodies[0], settings)
    stop = threading.Event()

    def rewrite() -> None:
        i = 0
        while not stop.is_set():
            storage.write_bytes(uri, bodies[i % 2], settings)
            i += 1

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        seen = [read_json(uri, settings, retry_s=10) for _ in range(300)]
    finally:
        stop.set()
        writer.join()
    assert all(m in versions for m in seen)


def test_a_damaged_manifest_is_an_error_naming_the_file(tmp_path):
    from umair.commit_log import all_manifests

    output = str(tmp_path / "out")
    storage.write_bytes(storage.join(output, "_commits", "r-000001.json"), b'{"status": "comm')
    with pytest.raises(FeatureError, match=r"_commits/r-000001\.json: not a JSON document .* restore it"):
        all_manifests(output, retry_s=0.2)
