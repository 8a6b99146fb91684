"""The item-feature store: where ``umair extract`` commits feature and error parts, and
how every reader sees only committed ones.

Output layout (``OUTPUT`` a local directory or an ``s3://`` prefix)::

    OUTPUT/_tmp/<run>/{features,errors}/<part>.parquet     written by pipeline tasks
    OUTPUT/features/<version-key>/<run>-<part>.parquet      committed feature parts
    OUTPUT/errors/<version-key>/<run>-<part>.parquet        committed error parts
    OUTPUT/_commits/<run>-<seq>.json                        one manifest per chunk
    OUTPUT/_commits/<run>.json, _index/<run>-*.parquet      a finished run's chunks, folded
    OUTPUT/_runs/<run>.json                                 run status + MLflow run id
    OUTPUT/_lease.json                                      the writer holding the output

Commit protocol (every write of a manifest is atomic: a local rename or a single S3
PUT). One extraction writes to an OUTPUT at a time: it holds the output's lease
(:mod:`umair.lease`: ``OUTPUT/_lease.json``, created only if absent, renewed by a
heartbeat thread, checked before every commit) from before its recovery to its end.

1. pipeline tasks write part files under ``_tmp/<run>/`` only; readers never look there;
2. for a chunk, the driver writes ``_commits/<run>-<seq>.json`` with status ``pending``,
   listing every (temporary → final) move and, per file, its rows, size and SHA-256;
3. it moves each file to its final name (``features/…``, ``errors/…``); a move whose
   source is gone and whose target exists was already done, so step 3 is idempotent;
4. it rewrites the manifest with status ``committed``: the chunk's single commit point;
5. readers (:func:`read_features`, :func:`read_errors`, the skip list of the next run)
   use only files listed in ``committed`` manifests. A run first recovers: every
   ``pending`` manifest is rolled forward (steps 3-4) or, if a temporary file was lost,
   rolled back (its final files deleted, then the manifest); then ``_tmp/`` is emptied.

Readers verify each file's size and SHA-256 against its manifest (a file changed in
place is an error naming it), and refuse ids committed by more than one manifest, naming
them (:func:`repair`, ``umair extract --repair``, drops the later copies).

After a run, its chunk manifests are folded into one manifest per run with an index of
its ids (:mod:`umair.commit_log`: :func:`~umair.commit_log.compact`), so listing and the
skip list cost one manifest and one index file per run; readers never count a folded
chunk twice.

So a run killed at any point and rerun ends with every illustration exactly once: rows
of committed chunks are skipped (same encoder and text versions), rows of uncommitted
ones are processed again, and nothing outside a committed manifest is ever read.

Items with a missing modality: every processed item gets one feature row. Rows with
every modality go to ``features`` parts, rows where some vector is NULL (no image, an
image that could not be read or decoded: e_TSEM with NULL e_SEM / e_STY) to *partial*
parts (manifest entries with ``"partial": true``); a failed image also has its error row.
A rerun skips every committed item, partial ones too. ``retry_failed: true`` processes
again every item without a complete row (partial rows and error-only rows of older
outputs), except those whose ``image_uri`` is still NULL (:func:`done_ids`); a partial row
is superseded by a later committed row of its id (readers, :func:`repair`:
:func:`superseded`), and the errors table keeps the latest error of ids that still have
no complete row.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from umair import contracts, storage
from umair import modalities as registry
from umair.commit_log import (  # noqa: F401  (COMMIT_FORMAT, read_json, compact: used through this module)
    COMMIT_FORMAT,
    KINDS,
    commit_uri,
    compact,
    index_of,
    list_manifests,
    manifest_name,
    manifest_uri,
    part_uri,
    read_json,
    read_listed,
    utc_now,
    write_json,
)
from umair.errors import FeatureError, JobFailed
from umair.storage import move, with_retries


def version_key(versions: Mapping[str, str]) -> str:
    """Directory name of one feature set: its encoders' versions (``image``, ``text``, ...)."""
    raw = "__".join(f"{encoder}-{version}" for encoder, version in sorted(versions.items()))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)


def feature_set_versions(encoder_version: str | None, text_version: str | None) -> dict[str, str]:
    """The ``versions`` mapping of the settings that name a feature set by its image and
    text encoders (``encoder_version`` / ``text_version`` of train and evaluate configs)."""
    given = {"image": encoder_version, "text": text_version}
    return {k: v for k, v in given.items() if v is not None}


def begin_commit(output: str, manifest: dict, settings: storage.StorageSettings, retry_s: float) -> str:
    """Protocol step 2: the ``pending`` manifest, naming every move. Returns its URI."""
    uri = commit_uri(output, manifest["run_id"], manifest["seq"])
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
    write_json(commit_uri(output, manifest["run_id"], manifest["seq"]), done, settings, retry_s)


def commit_chunk(output: str, manifest: dict, settings: storage.StorageSettings, retry_s: float) -> None:
    """Steps 2-4 for one chunk."""
    begin_commit(output, manifest, settings, retry_s)
    apply_moves(output, manifest, settings, retry_s)
    finish_commit(output, manifest, settings, retry_s)


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
            uri = commit_uri(output, manifest["run_id"], manifest["seq"])
            fs, path = storage.resolve(uri, settings)
            with storage.storage_errors(uri, "delete", settings):
                fs.delete_file(path)
            counts["rolled_back"] += 1
    tmp = part_uri(output, "_tmp")
    runs = {f[len(tmp) :].lstrip("/").split("/")[0] for f in storage.list_files(tmp, settings)}
    with_retries(lambda: storage.delete_dir(tmp, settings), f"delete {tmp}", retry_s)
    counts["tmp_runs_removed"] = len(runs)
    return counts


def _select(manifests: list[dict], versions: Mapping[str, str] | None) -> list[dict]:
    """The committed manifests of the one feature set whose encoder versions include
    ``versions`` (``{"image": ..., "text": ...}``; empty or None: any, if only one set)."""
    wanted = dict(versions or {})
    chosen = [
        m for m in manifests if m["status"] == "committed" and all(m["versions"].get(k) == v for k, v in wanted.items())
    ]
    kinds = sorted({tuple(sorted(m["versions"].items())) for m in chosen})
    if len(kinds) > 1:
        names = "; ".join(", ".join(f"{k}={v!r}" for k, v in kind) for kind in kinds)
        raise ValueError(
            f"several feature sets are committed here ({names}); pass encoder_version (and text_version) to pick one"
        )
    return chosen


def _read_files(
    output: str, rels: list[str], settings: storage.StorageSettings | None, columns: list[str] | None = None
) -> list[pa.Table]:
    return [storage.read_parquet(part_uri(output, rel), settings, columns=columns) for rel in rels]


def read_part(output: str, manifest: dict, entry: dict, settings: storage.StorageSettings | None) -> pa.Table:
    """One committed part file, its size and SHA-256 checked against the manifest that
    lists it (:class:`FeatureError` naming the file and the manifest on a mismatch)."""
    return read_listed(
        output,
        manifest,
        entry,
        settings,
        "restore it from a copy, or delete that manifest and rerun `umair extract` to extract its rows again",
    )


def superseded(parts: list[tuple[bool, np.ndarray]]) -> list[np.ndarray]:
    """Per part (``(partial, ids)`` in commit order), the rows a later committed copy of the
    same id replaces: only rows of partial parts are replaced (a retried item)."""
    sizes = [len(ids) for _, ids in parts]
    ids = np.concatenate([np.asarray(i, np.int64) for _, i in parts] or [np.zeros(0, np.int64)])
    partial = np.concatenate([np.full(n, p, bool) for (p, _), n in zip(parts, sizes)] or [np.zeros(0, bool)])
    _, inverse = np.unique(ids, return_inverse=True)
    last = np.full(len(ids), -1)
    np.maximum.at(last, inverse, np.arange(len(ids)))
    gone = partial & (np.arange(len(ids)) < last[inverse])
    return np.split(gone, np.cumsum(sizes)[:-1]) if parts else []


def duplicate_ids(manifests: list[dict], ids_of: dict[tuple[str, int], np.ndarray]) -> dict[int, list[str]]:
    """illust_id -> the manifests (``run-seq``, or ``run`` for a folded one) whose feature
    parts hold it, for ids held more than once (columnar: no per-id Python objects unless
    an id is duplicated)."""
    per = [np.unique(np.asarray(ids_of[(m["run_id"], m["seq"])], np.int64)) for m in manifests]
    ids = np.concatenate(per) if per else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(per)), [len(p) for p in per])
    order = np.argsort(ids, kind="stable")
    ids, owner = ids[order], owner[order]
    twice = np.zeros(len(ids), bool)
    twice[1:] = ids[1:] == ids[:-1]
    twice[:-1] |= twice[1:]
    seen: dict[int, list[str]] = {}
    for i, o in zip(ids[twice].tolist(), owner[twice].tolist()):
        seen.setdefault(int(i), []).append(manifest_name(manifests[o]))
    return seen


def _empty_features(manifest: dict) -> pa.Table:
    fields = [pa.field("illust_id", pa.int64())]
    for name in registry.names():
        if manifest["dims"].get(name):
            fields.append(pa.field(name, pa.list_(pa.float32(), int(manifest["dims"][name]))))
    return pa.schema(fields).empty_table()


def read_features(
    output: str, versions: Mapping[str, str] | None = None, settings: storage.StorageSettings | None = None
) -> pa.Table:
    """The committed item features under ``output`` (local or s3://), validated against
    the ``item_features`` contract (so each illust_id at most once), with the encoder
    versions and dims in the schema metadata. ``versions`` (encoder -> version, e.g.
    ``{"image": ...}``) picks a feature set; it may stay None when only one is committed."""
    chosen = _select(list_manifests(output, settings), versions)
    if not chosen:
        want = f" for encoder versions {dict(versions)}" if versions else ""
        raise FileNotFoundError(f"{output}: no committed item features{want}; run `umair extract` first")
    parts = [(m, f, read_part(output, m, f, settings)) for m in chosen for f in m["features"]]
    gone = superseded([(bool(f.get("partial")), t.column("illust_id").to_numpy()) for _, f, t in parts])
    tables = [t.filter(pa.array(~g)) if g.any() else t for (_, _, t), g in zip(parts, gone)]
    ids_of = {(m["run_id"], m["seq"]): [] for m in chosen}
    for (m, _, _), t in zip(parts, tables):
        ids_of[(m["run_id"], m["seq"])].append(t.column("illust_id").to_numpy())
    ids_of = {k: np.concatenate(v or [np.zeros(0, np.int64)]) for k, v in ids_of.items()}
    dups = duplicate_ids(chosen, ids_of)
    if dups:
        first = min(dups)
        raise FeatureError(
            f"{output}: {len(dups)} illust_id(s) are committed more than once (e.g. {first} in manifests "
            f"{', '.join(dups[first])} under {part_uri(output, '_commits')}); run `umair extract --repair` on this output"
        )
    schema = _empty_features(chosen[-1]).schema  # partial parts lack absent modalities' columns: NULL
    tables = [pa.table({f.name: t[f.name] if f.name in t.column_names else pa.nulls(len(t), f.type) for f in schema})
              for t in tables]  # fmt: skip
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    table = table.replace_schema_metadata(chosen[-1]["metadata"])
    return contracts.validate(table, "item_features", part_uri(output, "features"))


def read_errors(
    output: str, versions: Mapping[str, str] | None = None, settings: storage.StorageSettings | None = None
) -> pa.Table:
    """The committed extraction errors (``extraction_errors`` contract plus ``reason``):
    per illust_id the latest error, leaving out ids that have a complete feature row
    since (an id with a partial row, e.g. e_TSEM without e_SEM / e_STY, keeps its error)."""
    chosen = _select(list_manifests(output, settings), versions)
    tables = [read_part(output, m, f, settings) for m in chosen for f in m["errors"]]
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
    uniq, from_end = np.unique(ids[::-1], return_index=True)  # later manifests win
    last = len(ids) - 1 - from_end
    with_features = committed_ids(output, chosen, settings, kinds=("features",), partial=False)
    keep = np.sort(last[~np.isin(uniq, with_features)])
    return contracts.validate(errors.take(pa.array(keep, pa.int64())), "extraction_errors", part_uri(output, "errors"))


def committed_ids(
    output: str,
    manifests: list[dict],
    settings: storage.StorageSettings | None,
    kinds: tuple[str, ...] = ("features", "errors"),
    partial: bool | None = None,
) -> np.ndarray:
    """The illust_ids (int64 array) of the ``kinds`` parts of ``manifests``; ``partial``
    False / True: only complete / only partial feature parts (None: both). A folded
    manifest's ids come from its one index file, a chunk's from its parts' ``illust_id``
    columns."""
    codes = [KINDS["errors"]] if "errors" in kinds else []
    if "features" in kinds:
        codes += (
            [KINDS["features"], KINDS["partial"]] if partial is None else [KINDS["partial" if partial else "features"]]
        )
    out = []
    for m in manifests:
        index = index_of(output, m, settings, kinds)
        out.append(index.column("illust_id").to_numpy()[np.isin(index.column("kind").to_numpy(), codes)])
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def done_ids(
    output: str,
    manifests: list[dict],
    settings: storage.StorageSettings | None,
    retry_catalogue: str | None = None,
) -> np.ndarray:
    """The illust_ids a new run skips: every committed one (feature rows, partial or not,
    and error rows). ``retry_catalogue`` (the catalogue, for ``retry_failed``): only those
    with a complete feature row, plus the partial ones whose ``image_uri`` is NULL in that
    catalogue now (retrying them would only write the same row again)."""
    if retry_catalogue is None:
        return np.unique(committed_ids(output, manifests, settings, ("features", "errors")))
    complete = committed_ids(output, manifests, settings, ("features",), partial=False)
    partial = committed_ids(output, manifests, settings, ("features",), partial=True)
    uris = storage.read_parquet(retry_catalogue, settings, columns=["illust_id", "image_uri"])
    no_image = uris.filter(uris.column("image_uri").is_null()).column("illust_id").to_numpy()
    return np.unique(np.concatenate([complete, partial[np.isin(partial, no_image)]]))


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


def output_meta(enc: dict, text: dict | None, run_id: str, mlflow_run_id: str) -> dict:
    """What every manifest of one run records about its feature set: the encoders'
    ``versions`` (a mapping, one entry per encoder), the vector ``dims`` per modality, the
    part files' schema metadata and the MLflow run; ``key`` names its directories."""
    versions = {"image": enc["version"], **({"text": text["version"]} if text else {})}
    dims = {"sem": int(enc["sem_dim"]), "sty": int(enc["sty_dim"]), **({"tsem": int(text["dim"])} if text else {})}
    return {
        "key": version_key(versions),
        "versions": versions,
        "dims": dims,
        "metadata": feature_metadata(enc, text, run_id),
        "mlflow_run_id": mlflow_run_id,
    }


def chunk_manifest(descriptors: list[dict], run_id: str, seq: int, output_meta: dict) -> dict:
    moves, features, errors = [], [], []
    for d in descriptors:
        parts = [(kind, {k: d.get(f"{kind}_{k}") for k in ("rows", "bytes", "sha256")} | {"path": d[kind]})
                 for kind in ("features", "errors")]  # fmt: skip
        parts += [("partial", p) for p in json.loads(str(d.get("partial") or "[]"))]
        for kind, part in parts:
            rel = str(part["path"])
            if rel:
                folder = "errors" if kind == "errors" else "features"
                dst = f"{folder}/{output_meta['key']}/{run_id}-{rel.rsplit('/', 1)[1]}"
                moves.append([rel, dst])
                entry: dict = {"path": dst, "rows": int(part["rows"])}
                if part.get("sha256"):  # size and content hash, verified by every reader
                    entry.update(bytes=int(part["bytes"]), sha256=str(part["sha256"]))
                if kind == "partial":  # rows without some modality; a later row of the id supersedes them
                    entry["partial"] = True
                (errors if kind == "errors" else features).append(entry)
    return {
        "format": COMMIT_FORMAT,
        "run_id": run_id,
        "seq": seq,
        "created_at": utc_now(),
        "moves": moves,
        "features": features,
        "errors": errors,
        "rows_ok": sum(f["rows"] for f in features if not f.get("partial")),
        "rows_partial": sum(f["rows"] for f in features if f.get("partial")),
        "rows_failed": sum(f["rows"] for f in errors),
        **{k: v for k, v in output_meta.items() if k != "key"},
    }


def repair(output: str, settings: storage.StorageSettings | None = None, retry_s: float = 30.0) -> dict[str, int]:
    """Remove illust_ids committed more than once (e.g. by two runs that wrote the same
    output at once, before the lease existed): per feature set, in commit order, the first
    committed row of an id is kept and later ones are dropped (a partial row that a later
    row of its id supersedes, :func:`superseded`, is left as it is). Each affected part is
    rewritten without them (new file, listed with its size and SHA-256), its manifest is
    rewritten (one atomic write), then the old part is deleted; a crash in between leaves
    at most an unlisted file, which no reader sees. Hold the output's lease while calling.
    Returns counts of manifests and parts rewritten and rows dropped."""
    counts = {"manifests_rewritten": 0, "parts_rewritten": 0, "rows_dropped": 0}
    committed = [m for m in list_manifests(output, settings, retry_s) if m["status"] == "committed"]
    for key in sorted({tuple(sorted(m["versions"].items())) for m in committed}):
        seen: set[int] = set()
        group = [m for m in committed if tuple(sorted(m["versions"].items())) == key]
        listed = [e for m in group for e in m["features"]]
        heads = _read_files(output, [e["path"] for e in listed], settings, columns=["illust_id"])
        flagged = [(bool(e.get("partial")), t.column("illust_id").to_numpy()) for e, t in zip(listed, heads)]
        gone = dict(zip([e["path"] for e in listed], superseded(flagged)))
        for m in group:
            entries, stale = [], []
            for entry in m["features"]:
                table = read_part(output, m, entry, settings)
                ids = table.column("illust_id").to_numpy()
                live = ~gone[entry["path"]]
                keep = ~live  # superseded rows stay as they are: readers skip them
                _, first = np.unique(ids[live], return_index=True)
                fresh = np.flatnonzero(live)[first]
                keep[fresh] = ~np.isin(ids[fresh], np.fromiter(seen, np.int64, len(seen)))
                seen.update(ids[fresh[keep[fresh]]].tolist())
                if keep.all():
                    entries.append(entry)
                    continue
                counts["parts_rewritten"] += 1
                counts["rows_dropped"] += int((~keep).sum())
                stale.append(entry["path"])
                if keep.any():
                    kept = table.filter(pa.array(keep))
                    data, rel = (
                        storage.parquet_bytes(kept),
                        entry["path"].replace(".parquet", f"-r{uuid.uuid4().hex[:8]}.parquet"),
                    )
                    with_retries(
                        lambda r=rel, b=data: storage.write_bytes(part_uri(output, r), b, settings),
                        f"write {rel}",
                        retry_s,
                    )
                    fresh_entry = {"path": rel, "rows": kept.num_rows, "bytes": len(data)}
                    fresh_entry["sha256"] = hashlib.sha256(data).hexdigest()
                    entries.append({**fresh_entry, **({"partial": True} if entry.get("partial") else {})})
            if not stale:
                continue
            fixed = {**m, "features": entries, "repaired_at": utc_now()}
            fixed.pop("index", None)  # its ids changed: read them from the parts (compact re-indexes)
            fixed["rows_ok"] = sum(e["rows"] for e in entries if not e.get("partial"))
            fixed["rows_partial"] = sum(e["rows"] for e in entries if e.get("partial"))
            write_json(manifest_uri(output, m), fixed, settings, retry_s)
            counts["manifests_rewritten"] += 1
            for rel in stale:
                uri = part_uri(output, rel)
                fs, path = storage.resolve(uri, settings)
                with storage.storage_errors(uri, "delete", settings):
                    fs.delete_file(path)
    return counts
