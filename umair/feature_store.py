"""The item-feature store: where ``umair extract`` commits feature and error parts, and
how every reader sees only committed ones.

Output layout (``OUTPUT`` a local directory or an ``s3://`` prefix)::

    OUTPUT/_tmp/<run>/{features,errors}/<part>.parquet     written by pipeline tasks
    OUTPUT/features/<version-key>/<run>-<part>.parquet      committed feature parts
    OUTPUT/errors/<version-key>/<run>-<part>.parquet        committed error parts
    OUTPUT/_commits/<run>-<seq>.json                        one manifest per chunk
    OUTPUT/_runs/<run>.json                                 run status + MLflow run id

Commit protocol (every write of a manifest is atomic: a local rename or a single S3
PUT; one extraction writes to an OUTPUT at a time: a run refuses to start while
another's ``_runs`` marker says ``running`` and that run is alive, i.e. its process
exists on this host or its heartbeat, refreshed at every commit, is younger than
``stale_after_s``; two runs starting within the same instant are not caught):

1. pipeline tasks write part files under ``_tmp/<run>/`` only; readers never look there;
2. for a chunk, the driver writes ``_commits/<run>-<seq>.json`` with status ``pending``,
   listing every (temporary → final) move and the rows each file holds;
3. it moves each file to its final name (``features/…``, ``errors/…``); a move whose
   source is gone and whose target exists was already done, so step 3 is idempotent;
4. it rewrites the manifest with status ``committed``: the chunk's single commit point;
5. readers (:func:`read_features`, :func:`read_errors`, the skip list of the next run)
   use only files listed in ``committed`` manifests. A run first recovers: every
   ``pending`` manifest is rolled forward (steps 3-4) or, if a temporary file was lost,
   rolled back (its final files deleted, then the manifest); then ``_tmp/`` is emptied.

So a run killed at any point and rerun ends with every illustration exactly once: rows
of committed chunks are skipped (same encoder and text versions), rows of uncommitted
ones are processed again, and nothing outside a committed manifest is ever read. Error
rows count as done too (``retry_failed: true`` gives them another try; the errors
table then keeps only the latest error of ids that still have no features).
"""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from umair import contracts, storage
from umair import modalities as registry
from umair.errors import JobFailed
from umair.storage import move, with_retries

COMMIT_FORMAT = "umair-extract-commit/1"


def part_uri(output: str, rel: str) -> str:
    return storage.join(output, *rel.split("/"))


def write_json(uri: str, data: dict, settings: storage.StorageSettings, retry_s: float) -> None:
    body = json.dumps(data, indent=1, sort_keys=True).encode()
    with_retries(lambda: storage.write_bytes(uri, body, settings), f"write {uri}", retry_s)


def read_json(uri: str, settings: storage.StorageSettings, retry_s: float) -> dict:
    return json.loads(with_retries(lambda: storage.read_bytes(uri, settings), f"read {uri}", retry_s))


def version_key(encoder_version: str, text_version: str | None) -> str:
    """Directory name of one (image encoder, text encoder) feature set."""
    raw = encoder_version if not text_version else f"{encoder_version}__text-{text_version}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)


def _commit_uri(output: str, run_id: str, seq: int) -> str:
    return part_uri(output, f"_commits/{run_id}-{seq:06d}.json")


def begin_commit(output: str, manifest: dict, settings: storage.StorageSettings, retry_s: float) -> str:
    """Protocol step 2: the ``pending`` manifest, naming every move. Returns its URI."""
    uri = _commit_uri(output, manifest["run_id"], manifest["seq"])
    write_json(uri, {**manifest, "status": "pending"}, settings, retry_s)
    return uri


class CommitError(JobFailed):
    """A pending commit cannot be completed (a temporary file is gone)."""


def apply_moves(output: str, manifest: dict, settings: storage.StorageSettings, retry_s: float) -> None:
    """Protocol step 3, idempotent: move each temporary file not moved yet."""
    for src_rel, dst_rel in manifest["moves"]:
        src, dst = part_uri(output, src_rel), part_uri(output, dst_rel)
        if with_retries(lambda s=src: storage.exists(s, settings), f"inspect {src}", retry_s):
            with_retries(lambda s=src, d=dst: move(s, d, settings), f"move {src}", retry_s)
        elif not with_retries(lambda d=dst: storage.exists(d, settings), f"inspect {dst}", retry_s):
            raise CommitError(f"commit {manifest['run_id']}-{manifest['seq']:06d}: neither {src} nor {dst} exists")


def finish_commit(output: str, manifest: dict, settings: storage.StorageSettings, retry_s: float) -> None:
    """Protocol step 4: the manifest says ``committed``; the chunk is now visible."""
    done = {**manifest, "status": "committed", "committed_at": utc_now()}
    write_json(_commit_uri(output, manifest["run_id"], manifest["seq"]), done, settings, retry_s)


def commit_chunk(output: str, manifest: dict, settings: storage.StorageSettings, retry_s: float) -> None:
    """Steps 2-4 for one chunk."""
    begin_commit(output, manifest, settings, retry_s)
    apply_moves(output, manifest, settings, retry_s)
    finish_commit(output, manifest, settings, retry_s)


def list_manifests(output: str, settings: storage.StorageSettings | None = None, retry_s: float = 30.0) -> list[dict]:
    """Every commit manifest under ``output`` (pending and committed), oldest first."""
    settings = settings or storage.StorageSettings()
    uris = with_retries(
        lambda: storage.list_files(part_uri(output, "_commits"), settings), f"list {output}/_commits", retry_s
    )
    out = []
    for uri in uris:
        if uri.endswith(".json"):
            manifest = read_json(uri, settings, retry_s)
            if manifest.get("format") == COMMIT_FORMAT:
                out.append(manifest)
    return sorted(out, key=lambda m: (m["run_id"], m["seq"]))


def recover(output: str, settings: storage.StorageSettings, retry_s: float) -> dict[str, int]:
    """Protocol step 5, before a run writes anything: finish or undo pending commits, then
    drop the temporary files of earlier runs."""
    counts = {"rolled_forward": 0, "rolled_back": 0, "tmp_runs_removed": 0}
    for manifest in list_manifests(output, settings, retry_s):
        if manifest["status"] != "pending":
            continue
        try:
            apply_moves(output, manifest, settings, retry_s)
            finish_commit(output, manifest, settings, retry_s)
            counts["rolled_forward"] += 1
        except CommitError:
            for _, dst_rel in manifest["moves"]:
                dst = part_uri(output, dst_rel)
                if storage.exists(dst, settings):
                    fs, path = storage.resolve(dst, settings)
                    with storage.storage_errors(dst, "delete", settings):
                        fs.delete_file(path)
            uri = _commit_uri(output, manifest["run_id"], manifest["seq"])
            fs, path = storage.resolve(uri, settings)
            with storage.storage_errors(uri, "delete", settings):
                fs.delete_file(path)
            counts["rolled_back"] += 1
    tmp = part_uri(output, "_tmp")
    runs = {f[len(tmp) :].lstrip("/").split("/")[0] for f in storage.list_files(tmp, settings)}
    with_retries(lambda: storage.delete_dir(tmp, settings), f"delete {tmp}", retry_s)
    counts["tmp_runs_removed"] = len(runs)
    return counts


def _select(manifests: Iterable[dict], encoder_version: str | None, text_version: str | None) -> list[dict]:
    chosen = [
        m
        for m in manifests
        if m["status"] == "committed"
        and (encoder_version is None or m["encoder_version"] == encoder_version)
        and (text_version is None or m.get("text_version") == text_version)
    ]
    kinds = sorted({(m["encoder_version"], m.get("text_version")) for m in chosen}, key=str)
    if len(kinds) > 1:
        names = ", ".join(f"encoder_version={e!r} text_version={t!r}" for e, t in kinds)
        raise ValueError(f"several feature sets are committed here ({names}); pass encoder_version (and text_version)")
    return chosen


def _read_files(
    output: str, rels: list[str], settings: storage.StorageSettings | None, columns: list[str] | None = None
) -> list[pa.Table]:
    return [storage.read_parquet(part_uri(output, rel), settings, columns=columns) for rel in rels]


def _empty_features(manifest: dict) -> pa.Table:
    fields = [pa.field("illust_id", pa.int64())]
    for name in registry.names():
        if manifest.get(f"{name}_dim"):
            fields.append(pa.field(name, pa.list_(pa.float32(), int(manifest[f"{name}_dim"]))))
    return pa.schema(fields).empty_table()


def read_features(
    output: str,
    encoder_version: str | None = None,
    text_version: str | None = None,
    settings: storage.StorageSettings | None = None,
) -> pa.Table:
    """The committed item features under ``output`` (local or s3://), validated against
    the ``item_features`` contract (so each illust_id at most once), with the encoder
    versions and dims in the schema metadata. ``encoder_version``/``text_version`` pick
    a feature set; they may stay None when only one set is committed there."""
    chosen = _select(list_manifests(output, settings), encoder_version, text_version)
    if not chosen:
        want = f" for encoder version {encoder_version!r}" if encoder_version else ""
        raise FileNotFoundError(f"{output}: no committed item features{want}; run `umair extract` first")
    tables = _read_files(output, [f["path"] for m in chosen for f in m["features"]], settings)
    table = pa.concat_tables(tables) if tables else _empty_features(chosen[-1])
    table = table.replace_schema_metadata(chosen[-1]["metadata"])
    return contracts.validate(table, "item_features", part_uri(output, "features"))


def read_errors(
    output: str,
    encoder_version: str | None = None,
    text_version: str | None = None,
    settings: storage.StorageSettings | None = None,
) -> pa.Table:
    """The committed extraction errors (``extraction_errors`` contract plus ``reason``):
    per illust_id the latest error, leaving out ids that have features since."""
    chosen = _select(list_manifests(output, settings), encoder_version, text_version)
    tables = _read_files(output, [f["path"] for m in chosen for f in m["errors"]], settings)
    schema = pa.schema(
        [
            ("illust_id", pa.int64()),
            ("uri", pa.string()),
            ("stage", pa.string()),
            ("reason", pa.string()),
            ("error", pa.string()),
        ]
    )
    errors = pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]) if tables else schema.empty_table()
    ids = errors.column("illust_id").to_numpy()
    last = {int(i): r for r, i in enumerate(ids)}  # later manifests win
    with_features = set(committed_ids(output, chosen, settings, kinds=("features",)).tolist())
    keep = sorted(r for i, r in last.items() if i not in with_features)
    return contracts.validate(errors.take(pa.array(keep, pa.int64())), "extraction_errors", part_uri(output, "errors"))


def committed_ids(
    output: str,
    manifests: list[dict],
    settings: storage.StorageSettings | None,
    kinds: tuple[str, ...] = ("features", "errors"),
) -> np.ndarray:
    rels = [f["path"] for m in manifests for kind in kinds for f in m[kind]]
    tables = _read_files(output, rels, settings, columns=["illust_id"])
    return np.concatenate([t.column("illust_id").to_numpy() for t in tables]) if tables else np.zeros(0, np.int64)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_run_id() -> str:
    """Sorts by start time: ``20240501T020000Z-1a2b3c``."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def feature_metadata(enc: dict, text: dict | None, run_id: str) -> dict[str, str]:
    """Parquet schema metadata of every feature part file."""
    meta = {
        "umair.sem.dim": str(enc["sem_dim"]),
        "umair.sty.dim": str(enc["sty_dim"]),
        "umair.encoder.version": enc["version"],
        "umair.encoder.spec": json.dumps(enc["spec"], sort_keys=True),
        "umair.extract.run": run_id,
    }
    if text:
        meta.update({"umair.tsem.dim": str(text["dim"]), "umair.tsem.encoder": text["version"]})
    return meta


def chunk_manifest(descriptors: list[dict], run_id: str, seq: int, output_meta: dict) -> dict:
    moves, features, errors = [], [], []
    for d in descriptors:
        for kind, target in (("features", features), ("errors", errors)):
            rel = str(d[kind])
            if rel:
                dst = f"{kind}/{output_meta['key']}/{run_id}-{rel.rsplit('/', 1)[1]}"
                moves.append([rel, dst])
                target.append({"path": dst, "rows": int(d[f"{kind}_rows"])})
    return {
        "format": COMMIT_FORMAT,
        "run_id": run_id,
        "seq": seq,
        "created_at": utc_now(),
        "moves": moves,
        "features": features,
        "errors": errors,
        "rows_ok": sum(f["rows"] for f in features),
        "rows_failed": sum(f["rows"] for f in errors),
        **{k: v for k, v in output_meta.items() if k != "key"},
    }


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def writer_is_dead(marker: dict, stale_after_s: float) -> bool:
    """A run marked ``running`` is dead when it ran on this host and its process is gone,
    or when its heartbeat (refreshed at every commit) is older than ``stale_after_s``."""
    if marker.get("host") == socket.gethostname() and not pid_alive(int(marker.get("pid", -1))):
        return True
    beat = datetime.fromisoformat(marker.get("heartbeat_at") or marker["started_at"])
    return (datetime.now(UTC) - beat).total_seconds() > stale_after_s
