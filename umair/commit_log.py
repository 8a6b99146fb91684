"""The commit log of an extraction output: its ``_commits/`` manifests, how readers list
them, and their compaction (one manifest per finished run, with an index of its ids).

Layout (beside the parts, :mod:`umair.feature_store`)::

    OUTPUT/_commits/<run>-<seq>.json   one manifest per committed chunk, while a run goes on
    OUTPUT/_commits/<run>.json         one per finished run: its chunks folded ("compacted")
    OUTPUT/_index/<run>-<token>.parquet   that run's ids: illust_id, kind (:data:`KINDS`)

A nightly run commits a manifest every ``chunk_rows`` rows; without compaction every
later run would list and read all of them, and read every part file's ``illust_id`` for
its skip list. :func:`compact` (run by ``umair extract`` holding the output's lease,
after recovery and after its last commit) folds each run's committed chunk manifests
into one, in three steps, each safe to stop after:

1. :func:`index_run`: the ids of every part the run's manifests list go to one new
   ``_index/`` file (nothing lists it yet: a crash leaves an unread file);
2. :func:`fold_run`: ``_commits/<run>.json`` is written in one atomic write (a local
   rename or a single S3 PUT): the run's parts in commit order, the chunks it replaces
   (``seqs``) and the index with its size and SHA-256. This is the commit point;
3. :func:`drop_folded`: the folded chunk manifests (and a replaced index) are deleted.

Readers (:func:`list_manifests`) take a run's folded manifest and ignore every chunk
manifest whose ``seq`` it lists, so between steps 2 and 3 nothing is counted twice, and
before step 2 the chunk manifests still count: a row is never counted twice nor lost.
The next :func:`compact` finishes whatever a crash left (leftover chunk manifests are
deleted, unreferenced index files removed). Listing then costs one manifest per run and
the skip list one small index file per run, whatever the number of chunks.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from umair import storage
from umair.errors import FeatureError
from umair.storage import with_retries

COMMIT_FORMAT = "umair-extract-commit/1"
KINDS = {"features": 0, "partial": 1, "errors": 2}
"""``kind`` codes of an index row: a complete feature row, a partial one (some modality
NULL), an error row."""


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def part_uri(output: str, rel: str) -> str:
    return storage.join(output, *rel.split("/"))


def write_json(uri: str, data: dict, settings: storage.StorageSettings, retry_s: float) -> None:
    body = json.dumps(data, indent=1, sort_keys=True).encode()
    with_retries(lambda: storage.write_bytes(uri, body, settings), f"write {uri}", retry_s)


def read_json(uri: str, settings: storage.StorageSettings, retry_s: float) -> dict:
    """The JSON object at ``uri``.

    Manifests and run markers are rewritten in place (``pending`` -> ``committed``, a
    heartbeat). On S3 a read sizes the object first and then fetches it, so a read that
    overlaps a rewrite by a longer body returns the new body cut at the old size: a torn
    read, which never parses. It is read again (with backoff, for ``retry_s``); a body
    that still does not parse is a :class:`FeatureError` naming the file and the place.
    """
    start, delay = time.monotonic(), 0.05
    while True:
        body = with_retries(lambda: storage.read_bytes(uri, settings), f"read {uri}", retry_s)
        try:
            return json.loads(body)
        except ValueError as err:
            if time.monotonic() - start >= retry_s:
                raise FeatureError(
                    f"{uri}: not a JSON document ({err}; {len(body)} bytes), read again for {retry_s:g} s; "
                    "a commit manifest is written whole, so this one was damaged after it was written: "
                    "restore it or remove its run's parts and extract again"
                ) from err
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def commit_uri(output: str, run_id: str, seq: int) -> str:
    """Where chunk ``seq`` of run ``run_id`` commits its manifest."""
    return part_uri(output, f"_commits/{run_id}-{seq:06d}.json")


def manifest_uri(output: str, manifest: dict) -> str:
    """Where a commit manifest lives (a chunk's, or a run's folded one)."""
    if manifest.get("compacted"):
        return part_uri(output, f"_commits/{manifest['run_id']}.json")
    return commit_uri(output, manifest["run_id"], manifest["seq"])


def manifest_name(manifest: dict) -> str:
    """``run-seq`` of a chunk's manifest, ``run`` of a run's folded one (as messages name them)."""
    return manifest["run_id"] if manifest.get("compacted") else f"{manifest['run_id']}-{manifest['seq']:06d}"


def _delete(uri: str, settings: storage.StorageSettings, retry_s: float) -> bool:
    """Delete one file if it is there; True if it was."""

    def go() -> bool:
        if not storage.exists(uri, settings):
            return False
        fs, path = storage.resolve(uri, settings)
        with storage.storage_errors(uri, "delete", settings):
            fs.delete_file(path)
        return True

    return with_retries(go, f"delete {uri}", retry_s)


def all_manifests(output: str, settings: storage.StorageSettings | None = None, retry_s: float = 30.0) -> list[dict]:
    """Every manifest file under ``_commits/`` as it is (folded chunks included), oldest first."""
    settings = settings or storage.StorageSettings()
    uris = with_retries(
        lambda: storage.list_files(part_uri(output, "_commits"), settings), f"list {output}/_commits", retry_s
    )
    out = [read_json(uri, settings, retry_s) for uri in uris if uri.endswith(".json")]
    return sorted((m for m in out if m.get("format") == COMMIT_FORMAT), key=_order)


def _order(m: dict) -> tuple[str, int, int]:
    return m["run_id"], int(m["seq"]), 0 if m.get("compacted") else 1


def _folded(manifests: Iterable[dict]) -> dict[str, set[int]]:
    return {m["run_id"]: set(m["seqs"]) for m in manifests if m.get("compacted")}


def list_manifests(output: str, settings: storage.StorageSettings | None = None, retry_s: float = 30.0) -> list[dict]:
    """The commit manifests readers count (pending and committed), oldest first: each
    run's folded manifest, and the chunk manifests no folded one replaces."""
    every = all_manifests(output, settings, retry_s)
    folded = _folded(every)
    return [m for m in every if m.get("compacted") or int(m["seq"]) not in folded.get(m["run_id"], ())]


def read_listed(
    output: str, manifest: dict, entry: dict, settings: storage.StorageSettings | None, remedy: str
) -> pa.Table:
    """The parquet file ``entry`` of ``manifest`` (``path``, ``bytes``, ``sha256``), its size
    and SHA-256 checked when the entry records them (:class:`FeatureError` naming the file,
    the manifest and ``remedy`` on a mismatch)."""
    uri = part_uri(output, entry["path"])
    data = storage.read_bytes(uri, settings)
    if "sha256" in entry:
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != entry["bytes"] or digest != entry["sha256"]:
            raise FeatureError(
                f"{uri}: the file changed after it was committed (manifest {manifest_uri(output, manifest)} lists "
                f"{entry['bytes']} bytes, sha256 {entry['sha256'][:16]}…; found {len(data)} bytes, sha256 {digest[:16]}…); "
                + remedy
            )
    return pq.read_table(pa.BufferReader(data))


def read_index(output: str, manifest: dict, settings: storage.StorageSettings | None) -> pa.Table:
    """The id index (``illust_id``, ``kind``) of a folded manifest, its size and SHA-256 checked."""
    return read_listed(
        output,
        manifest,
        manifest["index"],
        settings,
        "delete the 'index' entry of that manifest to read the ids from the parts instead",
    )


def index_of(
    output: str, manifest: dict, settings: storage.StorageSettings | None, parts: Iterable[str] = ("features", "errors")
) -> pa.Table:
    """(``illust_id``, ``kind``) of every row a manifest's parts hold: from its index if
    it has one (every kind), else from the ``illust_id`` column of each of its ``parts``
    (``features`` and / or ``errors``) parts."""
    if manifest.get("index"):
        return read_index(output, manifest, settings)
    ids, kinds = [], []
    for kind in [k for k in ("features", "errors") if k in parts]:
        for f in manifest[kind]:
            t = storage.read_parquet(part_uri(output, f["path"]), settings, columns=["illust_id"])
            ids.append(t.column("illust_id").to_numpy().astype(np.int64))
            code = KINDS["errors"] if kind == "errors" else KINDS["partial" if f.get("partial") else "features"]
            kinds.append(np.full(t.num_rows, code, np.int8))
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    return pa.table({"illust_id": pa.array(cat(ids, np.int64)), "kind": pa.array(cat(kinds, np.int8))})


def index_run(output: str, manifests: list[dict], settings: storage.StorageSettings, retry_s: float) -> dict:
    """Step 1: one new ``_index/`` file with the ids of every part ``manifests`` (one run's,
    in commit order) list; returns its entry (path, rows, bytes, sha256)."""
    table = pa.concat_tables([index_of(output, m, settings) for m in manifests])
    data = storage.parquet_bytes(table)
    rel = f"_index/{manifests[0]['run_id']}-{uuid.uuid4().hex[:8]}.parquet"
    with_retries(lambda: storage.write_bytes(part_uri(output, rel), data, settings), f"write {rel}", retry_s)
    return {"path": rel, "rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def fold_run(
    output: str, manifests: list[dict], index: dict, settings: storage.StorageSettings, retry_s: float
) -> dict:
    """Step 2, the commit point: ``_commits/<run>.json`` listing every part of
    ``manifests`` (one run's committed manifests in commit order: chunks, and its folded
    one if there is one already) and the ``index`` of :func:`index_run`. Returns it."""
    first, last = manifests[0], manifests[-1]
    seqs = sorted({s for m in manifests for s in (m["seqs"] if m.get("compacted") else [int(m["seq"])])})
    features = [f for m in manifests for f in m["features"]]
    errors = [f for m in manifests for f in m["errors"]]
    run = {
        "format": COMMIT_FORMAT,
        "run_id": first["run_id"],
        "seq": seqs[0],
        "compacted": True,
        "seqs": seqs,
        "status": "committed",
        "created_at": first["created_at"],
        "committed_at": last.get("committed_at", utc_now()),
        "compacted_at": utc_now(),
        "moves": [],
        "features": features,
        "errors": errors,
        "rows_ok": sum(f["rows"] for f in features if not f.get("partial")),
        "rows_partial": sum(f["rows"] for f in features if f.get("partial")),
        "rows_failed": sum(f["rows"] for f in errors),
        "index": index,
        **{k: last[k] for k in ("versions", "dims", "metadata", "mlflow_run_id") if k in last},
    }
    write_json(manifest_uri(output, run), run, settings, retry_s)
    return run


def drop_folded(
    output: str,
    chunks: Iterable[dict],
    settings: storage.StorageSettings,
    retry_s: float,
    replaced_index: str | None = None,
) -> int:
    """Step 3: delete the chunk manifests ``chunks`` a folded manifest replaces (and an
    index it replaced); returns how many manifests were there."""
    gone = sum(_delete(commit_uri(output, m["run_id"], int(m["seq"])), settings, retry_s) for m in chunks)
    if replaced_index:
        _delete(part_uri(output, replaced_index), settings, retry_s)
    return gone


def compact(
    output: str, settings: storage.StorageSettings | None = None, retry_s: float = 30.0, skip: Iterable[str] = ()
) -> dict[str, int]:
    """Fold every run's committed chunk manifests into its one manifest (steps 1-3), and
    finish what an interrupted compaction left. Runs with a pending chunk (recover them
    first) and the runs in ``skip`` (one still writing) are left as they are. Hold the
    output's lease while calling. Returns counts of runs folded and files removed."""
    settings = settings or storage.StorageSettings()
    every = all_manifests(output, settings, retry_s)
    counts = {"runs_compacted": 0, "manifests_removed": 0, "indexes_removed": 0}
    runs: dict[str, list[dict]] = {}
    for m in every:
        runs.setdefault(m["run_id"], []).append(m)
    referenced: set[str] = set()
    for run_id, group in runs.items():
        folded = next((m for m in group if m.get("compacted")), None)
        done = set(folded["seqs"]) if folded else set()
        chunks = [m for m in group if not m.get("compacted")]
        fresh = [m for m in chunks if int(m["seq"]) not in done]
        leftovers = [m for m in chunks if int(m["seq"]) in done]
        if run_id in set(skip) or any(m["status"] != "committed" for m in fresh):
            referenced.update(m["index"]["path"] for m in group if m.get("index"))
            continue
        if fresh or (folded is not None and not folded.get("index")):
            chain = ([folded] if folded else []) + fresh
            old = folded["index"]["path"] if folded and folded.get("index") else None
            folded = fold_run(output, chain, index_run(output, chain, settings, retry_s), settings, retry_s)
            counts["runs_compacted"] += 1
            counts["manifests_removed"] += drop_folded(output, fresh + leftovers, settings, retry_s, old)
        elif leftovers:  # a compaction stopped after its commit point: drop what it replaced
            counts["manifests_removed"] += drop_folded(output, leftovers, settings, retry_s)
        if folded is not None:
            referenced.add(folded["index"]["path"])
    prefix = part_uri(output, "_index")
    for uri in storage.list_files(prefix, settings):
        rel = "_index/" + uri[len(prefix) :].lstrip("/")
        if rel not in referenced and _delete(uri, settings, retry_s):
            counts["indexes_removed"] += 1
    return counts
