"""Streaming feature extraction: ``umair extract --config pipelines/configs/extract.yaml``.

Illustrations (a catalogue table, images in object storage or on disk) become item
features: e_SEM and e_STY from the dual image encoder and, when ``text_model`` is set,
e_TSEM from the tag-text encoder. One Ray Data pipeline streams the catalogue rows
still to do through four stages, so they overlap and memory stays bounded:

    [tags → e_TSEM actors]  → read bytes + decode (CPU tasks, per row)
    → encode (actor pool, one model load per actor; bf16 + channels_last on a GPU)
    → write part files (tasks)  → the driver commits chunks of rows.

A row that cannot be read (missing object, file over ``max_image_bytes``) or decoded
(zero bytes, truncated, not an image, absurd header dimensions) becomes an error row
(``illust_id, uri, stage, reason, error``); the other rows of its batch carry on.
Transient storage failures (endpoint down, 5xx) are retried for ``io_retry_s``; after
that the job stops with a message naming the object, and a rerun resumes.

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
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import date, datetime, timezone
from typing import Any, Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, ValidationError, field_validator

from pipelines.ray_runtime import MlflowConfig, RayConfig, init_ray
from umair import contracts, storage
from umair.config import Settings, StorageConfig
from umair.image.preprocess import MAX_PIXELS

T = TypeVar("T")
COMMIT_FORMAT = "umair-extract-commit/1"
LOG = "[extract]"


# --------------------------------------------------------------------------- settings


class EncoderSource(Settings):
    """Which image encoder. ``source``: an exported encoder directory (local or s3://),
    ``torchvision:<WEIGHTS>`` (production, needs the internet) or ``None`` for random
    weights drawn with ``seed`` (tests, benchmarks). ``spec`` (the keys of
    :class:`umair.image.encoder.EncoderSpec`) applies only when the source is not an
    exported directory, whose own manifest defines backbone and image size.

    ``spec`` is held as a validated dict so that importing this module does not import
    torch: the read/decode and write workers import it, and torch would cost each of
    them seconds and hundreds of MiB."""

    source: str | None = None
    spec: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    seed: int = 0

    @field_validator("spec")
    @classmethod
    def _valid_spec(cls, value: dict[str, Any]) -> dict[str, Any]:
        from umair.image.spec import EncoderSpec

        try:
            return EncoderSpec(**value).model_dump(mode="json")
        except ValidationError as err:
            raise ValueError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())) from None


class ExtractConfig(Settings):
    """Settings of ``umair extract`` (unknown keys are errors)."""

    catalogue: str = Field(..., description="illustrations table: parquet file or directory, local or s3://")
    output: str = Field(..., description="item-features prefix: local directory or s3://bucket/prefix")
    encoder: EncoderSource = Field(default_factory=EncoderSource)
    text_model: str | None = Field(None, description="fine-tuned text encoder directory (umair finetune-text); None = no e_TSEM")
    text_mode: Literal["dedup", "joined"] = "dedup"
    text_batch_size: int = Field(256, ge=1, description="strings per text-encoder forward pass")
    text_concurrency: int = Field(1, ge=1, description="text-encoder actors")
    text_num_gpus: float = Field(0.0, ge=0, description="GPU share per text actor (0 = CPU)")
    since: datetime | None = Field(None, description="only illustrations with created_at >= since (ISO date or time, UTC)")
    batch_size: int = Field(64, ge=1, description="images per encoder forward pass")
    decode_batch_size: int = Field(32, ge=1, description="rows per read+decode batch (and per input block)")
    encode_concurrency: int = Field(1, ge=1, description="encoder actors (one model load each)")
    encode_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per encoder actor (torch threads on CPU)")
    decode_num_cpus: float = Field(1.0, gt=0, description="CPUs per read+decode task")
    use_gpu: bool = False
    chunk_rows: int = Field(10_000, ge=1, description="rows per commit: a killed run keeps every committed chunk")
    write_batch_rows: int = Field(2048, ge=1, description="rows per part file (at most)")
    max_image_bytes: int = Field(64 * 2**20, ge=1, description="larger files are error rows (stage read)")
    max_image_pixels: int = Field(MAX_PIXELS, ge=1, description="larger images (from the header) are error rows")
    io_retry_s: float = Field(120.0, ge=0, description="how long transient storage errors are retried before the job stops")
    retry_failed: bool = Field(False, description="try again ids whose committed record is an error")
    stale_after_s: float = Field(1800.0, gt=0, description="a run on another host without a heartbeat for this long is dead")
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig(experiment="umair-extract")
    storage: StorageConfig = StorageConfig()

    @field_validator("encoder", mode="before")
    @classmethod
    def _encoder_shorthand(cls, value: Any) -> Any:
        """``encoder: some/dir`` (or ``encoder: null``) is short for ``encoder: {source: some/dir}``."""
        return {"source": value} if value is None or isinstance(value, str) else value

    @field_validator("since", mode="before")
    @classmethod
    def _since_utc(cls, value: Any) -> Any:
        """A date means its midnight UTC; a time without a zone is UTC."""
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if isinstance(value, date) and not isinstance(value, datetime):
            value = datetime(value.year, value.month, value.day)
        if isinstance(value, datetime) and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class ExtractError(RuntimeError):
    """The extraction stopped; committed chunks are kept and a rerun resumes."""


# --------------------------------------------------------------------------- storage helpers


def _is_permanent(err: BaseException) -> bool:
    """Errors that retrying cannot fix: missing objects and rejected credentials."""
    cause = err.__cause__ if isinstance(err, storage.StorageError) and err.__cause__ is not None else err
    if isinstance(cause, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return True
    return "rejected the credentials" in str(err)


_last_retry_note = 0.0


def _note_retry(what: str, err: BaseException, deadline_s: float) -> None:
    """Say (at most every 5 s per process) that storage calls are being retried."""
    global _last_retry_note
    if time.monotonic() - _last_retry_note > 5.0:
        _last_retry_note = time.monotonic()
        print(f"{LOG} storage error, retrying for up to {deadline_s:.0f}s: {what}: {err}", file=sys.stderr, flush=True)


def with_retries(op: Callable[[], T], what: str, deadline_s: float) -> T:
    """Run ``op`` (a storage call); retry transient failures with backoff for ``deadline_s``."""
    start, delay = time.monotonic(), 0.25
    while True:
        try:
            return op()
        except (OSError, pa.ArrowException) as err:
            if _is_permanent(err):
                raise
            if time.monotonic() - start + delay > deadline_s:
                raise storage.StorageError(f"{what}: gave up after {deadline_s:.0f}s of retries: {err}") from err
            _note_retry(what, err, deadline_s)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _uri(output: str, rel: str) -> str:
    return storage.join(output, *rel.split("/"))


def _write_json(uri: str, data: dict, settings: storage.StorageSettings, retry_s: float) -> None:
    body = json.dumps(data, indent=1, sort_keys=True).encode()
    with_retries(lambda: storage.write_bytes(uri, body, settings), f"write {uri}", retry_s)


def _read_json(uri: str, settings: storage.StorageSettings, retry_s: float) -> dict:
    return json.loads(with_retries(lambda: storage.read_bytes(uri, settings), f"read {uri}", retry_s))


def _move(src: str, dst: str, settings: storage.StorageSettings) -> None:
    """Rename one file (local: atomic rename; S3: server-side copy, then delete)."""
    fs, src_path = storage.resolve(src, settings)
    _, dst_path = storage.resolve(dst, settings)
    with storage.storage_errors(src, "move", settings):
        if not storage.is_s3(src):
            os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        fs.move(src_path, dst_path)


class PermanentReadError(Exception):
    """An image that cannot be read however often one tries; becomes an error row."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


def read_image_bytes(uri: str, settings: storage.StorageSettings, max_bytes: int, retry_s: float) -> bytes:
    """The bytes at ``uri``, at most ``max_bytes`` of them (a larger file is refused
    without being read whole). Missing objects raise :class:`PermanentReadError`; other
    failures are retried for ``retry_s``, then raise :class:`umair.storage.StorageError`."""
    try:
        fs, path = storage.resolve(uri, settings)
    except storage.StorageError as err:
        raise PermanentReadError("bad_uri", str(err)) from err

    def read() -> bytes:
        with storage.storage_errors(uri, "read", settings):
            with fs.open_input_stream(path) as f:
                return f.read(max_bytes + 1)

    try:
        data = with_retries(read, f"read {uri}", retry_s)
    except storage.StorageError as err:
        if isinstance(err.__cause__, FileNotFoundError):
            raise PermanentReadError("missing", f"no such file or object: {uri}") from err
        if isinstance(err.__cause__, (IsADirectoryError, NotADirectoryError)):
            raise PermanentReadError("not_a_file", f"{uri} is not a file") from err
        raise
    if len(data) > max_bytes:
        raise PermanentReadError("too_large", f"file is larger than max_image_bytes={max_bytes}")
    return data


# --------------------------------------------------------------------------- pipeline stages (run on Ray workers)


def decode_rows(batch: dict[str, np.ndarray], image_size: int, max_pixels: int, max_bytes: int,
                storage_cfg: dict, retry_s: float) -> dict[str, np.ndarray]:
    """Ray Data UDF (CPU tasks): read and decode each row; a failure marks its row only."""
    from umair.image.preprocess import DecodeError, decode_image

    settings = StorageConfig(**storage_cfg).to_settings()
    n = len(batch["illust_id"])
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    ok = np.zeros(n, bool)
    stage, reason, error = (np.full(n, "", dtype=object) for _ in range(3))
    for i, uri in enumerate(batch["image_uri"]):
        uri = str(uri)
        try:
            data = read_image_bytes(uri, settings, max_bytes, retry_s)
        except PermanentReadError as err:
            stage[i], reason[i], error[i] = "read", err.reason, str(err)
            continue
        try:
            images[i] = decode_image(data, image_size, max_pixels)
            ok[i] = True
        except DecodeError as err:
            stage[i], reason[i], error[i] = "decode", err.reason, str(err)
    out = {k: v for k, v in batch.items() if k not in ("created_at", "tags")}
    out.update(image=images, ok=ok, stage=stage, reason=reason, error=error)
    return out


def load_image_encoder(source: str | None, spec: dict, seed: int, settings: storage.StorageSettings | None = None):
    """(model, manifest) for an :class:`EncoderSource`; random weights are seeded, so every
    actor (and every run) with the same seed holds the same weights, and the seed is part
    of the version."""
    import torch

    from umair.image.checkpoint import load_encoder
    from umair.image.spec import EncoderSpec

    if source is None or source.startswith("torchvision:"):
        torch.manual_seed(seed)
        model, manifest = load_encoder(source, EncoderSpec(**spec))
        if source is None:
            manifest["version"] = f"{manifest['version']}-seed{seed}"
        return model, manifest
    if settings is not None and storage.is_s3(source):
        return _load_exported(source, settings)  # load_encoder would use the environment's endpoint
    return load_encoder(source)


def _load_exported(source: str, settings: storage.StorageSettings):
    """load_encoder for an s3:// directory on a non-default endpoint: copy it locally first."""
    import tempfile

    from umair.image.checkpoint import MANIFEST, WEIGHTS, load_encoder

    with tempfile.TemporaryDirectory() as tmp:
        for name in (MANIFEST, WEIGHTS):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(storage.read_bytes(storage.join(source, name), settings))
        model, manifest = load_encoder(tmp)
    return model, manifest


class EncodeImages:
    """Ray Data actor: the dual image encoder, loaded once; rows that failed upstream
    pass through with zero vectors (the writer routes them to the errors table)."""

    def __init__(self, source: str | None, spec: dict, seed: int, use_gpu: bool, threads: int, storage_cfg: dict):
        import torch

        if not use_gpu:
            torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        model, manifest = load_image_encoder(source, spec, seed, StorageConfig(**storage_cfg).to_settings())
        self.model = model.to(self.device).eval()
        if use_gpu:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.sem_dim, self.sty_dim = int(manifest["sem_dim"]), int(manifest["sty_dim"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from umair.image.encoder import encode

        ok = batch["ok"].astype(bool)
        n = len(ok)
        sem = np.zeros((n, self.sem_dim), np.float32)
        sty = np.zeros((n, self.sty_dim), np.float32)
        if ok.any():
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][ok])).permute(0, 3, 1, 2)
            s, t = encode(self.model, images, self.device)
            sem[ok], sty[ok] = s.numpy(), t.numpy()
        out = {k: v for k, v in batch.items() if k != "image"}
        out.update(sem=sem, sty=sty)
        return out


class _RememberingTextModel:
    """Wraps a Sentence-Transformers model so every string is encoded once per actor
    (dedup mode sends each batch's distinct tags; most were seen in earlier batches)."""

    def __init__(self, model: Any, max_entries: int = 1_000_000):
        self.model, self.max_entries = model, max_entries
        self.memory: dict[str, np.ndarray] = {}

    def get_embedding_dimension(self) -> int:
        fn = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(fn())

    def encode(self, texts: list[str], batch_size: int = 32, normalize_embeddings: bool = True, **_: Any) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.memory]
        if missing:
            vectors = self.model.encode(missing, batch_size=batch_size, normalize_embeddings=normalize_embeddings,
                                        convert_to_numpy=True, show_progress_bar=False)
            if len(self.memory) + len(missing) > self.max_entries:
                self.memory.clear()
            self.memory.update(zip(missing, np.asarray(vectors, np.float32), strict=True))
        dim = self.get_embedding_dimension()
        return np.stack([self.memory[t] for t in texts]) if texts else np.zeros((0, dim), np.float32)


class EmbedTags:
    """Ray Data actor: e_TSEM of each row from its tags (umair.text.tag_embeddings)."""

    def __init__(self, path: str, mode: str, batch_size: int, use_gpu: bool, storage_cfg: dict):
        from umair.text.finetune import load_text_encoder

        encoder = load_text_encoder(path, device="cuda" if use_gpu else "cpu", settings=StorageConfig(**storage_cfg).to_settings())
        self.model, self.version = _RememberingTextModel(encoder.model), encoder.version
        self.mode, self.batch_size = mode, batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        from umair.text.tag_embeddings import embed_tags

        tsem, _ = embed_tags(batch.select(["illust_id", "tags"]), self.model, self.version, mode=self.mode, batch_size=self.batch_size)
        if not tsem.column("illust_id").equals(batch.column("illust_id")):
            order = {i: r for r, i in enumerate(tsem.column("illust_id").to_pylist())}  # join by id
            tsem = tsem.take(pa.array([order[i] for i in batch.column("illust_id").to_pylist()]))
        return batch.drop_columns(["tags"]).append_column("tsem", tsem.column("tsem"))


def _vectors(values: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    arr = np.stack(values) if values.dtype == object else values
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(arr, np.float32).reshape(-1), pa.float32()), dim)


def write_parts(batch: dict[str, np.ndarray], output: str, run_id: str, meta: dict[str, str],
                storage_cfg: dict, retry_s: float) -> dict[str, np.ndarray]:
    """Ray Data UDF (tasks): write a batch's good rows and error rows as temporary part
    files; return one descriptor row for the driver to commit."""
    settings = StorageConfig(**storage_cfg).to_settings()
    ok = batch["ok"].astype(bool)
    part = uuid.uuid4().hex[:16]
    desc: dict[str, Any] = {"features": "", "features_rows": 0, "errors": "", "errors_rows": 0, "reasons": "{}"}
    if ok.any():
        columns = {"illust_id": pa.array(batch["illust_id"][ok].astype(np.int64), pa.int64())}
        for name in ("sem", "sty", "tsem"):
            if name in batch:
                columns[name] = _vectors(batch[name][ok], int(meta[f"umair.{name}.dim"]))
        table = pa.table(columns).replace_schema_metadata(meta)
        rel = f"_tmp/{run_id}/features/{part}.parquet"
        uri = _uri(output, rel)
        with_retries(lambda: storage.write_parquet(table, uri, settings), f"write {uri}", retry_s)
        desc.update(features=rel, features_rows=int(ok.sum()))
    bad = ~ok
    if bad.any():
        table = pa.table({
            "illust_id": pa.array(batch["illust_id"][bad].astype(np.int64), pa.int64()),
            "uri": pa.array([str(u) for u in batch["image_uri"][bad]], pa.string()),
            "stage": pa.array([str(s) for s in batch["stage"][bad]], pa.string()),
            "reason": pa.array([str(s) for s in batch["reason"][bad]], pa.string()),
            "error": pa.array([str(s) for s in batch["error"][bad]], pa.string()),
        }).replace_schema_metadata({k: v for k, v in meta.items() if k.startswith("umair.encoder") or k.startswith("umair.extract")})
        rel = f"_tmp/{run_id}/errors/{part}.parquet"
        uri = _uri(output, rel)
        with_retries(lambda: storage.write_parquet(table, uri, settings), f"write {uri}", retry_s)
        reasons = Counter(f"{s}:{r}" for s, r in zip(batch["stage"][bad], batch["reason"][bad]))
        desc.update(errors=rel, errors_rows=int(bad.sum()), reasons=json.dumps(dict(reasons)))
    return {k: np.array([v]) for k, v in desc.items()}


# --------------------------------------------------------------------------- commits


def version_key(encoder_version: str, text_version: str | None) -> str:
    """Directory name of one (image encoder, text encoder) feature set."""
    raw = encoder_version if not text_version else f"{encoder_version}__text-{text_version}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)


def _commit_uri(output: str, run_id: str, seq: int) -> str:
    return _uri(output, f"_commits/{run_id}-{seq:06d}.json")


def begin_commit(output: str, manifest: dict, settings: storage.StorageSettings, retry_s: float) -> str:
    """Protocol step 2: the ``pending`` manifest, naming every move. Returns its URI."""
    uri = _commit_uri(output, manifest["run_id"], manifest["seq"])
    _write_json(uri, {**manifest, "status": "pending"}, settings, retry_s)
    return uri


class CommitError(RuntimeError):
    """A pending commit cannot be completed (a temporary file is gone)."""


def apply_moves(output: str, manifest: dict, settings: storage.StorageSettings, retry_s: float) -> None:
    """Protocol step 3, idempotent: move each temporary file not moved yet."""
    for src_rel, dst_rel in manifest["moves"]:
        src, dst = _uri(output, src_rel), _uri(output, dst_rel)
        if with_retries(lambda: storage.exists(src, settings), f"inspect {src}", retry_s):
            with_retries(lambda: _move(src, dst, settings), f"move {src}", retry_s)
        elif not with_retries(lambda: storage.exists(dst, settings), f"inspect {dst}", retry_s):
            raise CommitError(f"commit {manifest['run_id']}-{manifest['seq']:06d}: neither {src} nor {dst} exists")


def finish_commit(output: str, manifest: dict, settings: storage.StorageSettings, retry_s: float) -> None:
    """Protocol step 4: the manifest says ``committed``; the chunk is now visible."""
    done = {**manifest, "status": "committed", "committed_at": _now()}
    _write_json(_commit_uri(output, manifest["run_id"], manifest["seq"]), done, settings, retry_s)


def commit_chunk(output: str, manifest: dict, settings: storage.StorageSettings, retry_s: float) -> None:
    """Steps 2-4 for one chunk."""
    begin_commit(output, manifest, settings, retry_s)
    apply_moves(output, manifest, settings, retry_s)
    finish_commit(output, manifest, settings, retry_s)


def list_manifests(output: str, settings: storage.StorageSettings | None = None, retry_s: float = 30.0) -> list[dict]:
    """Every commit manifest under ``output`` (pending and committed), oldest first."""
    settings = settings or storage.StorageSettings()
    uris = with_retries(lambda: storage.list_files(_uri(output, "_commits"), settings), f"list {output}/_commits", retry_s)
    out = []
    for uri in uris:
        if uri.endswith(".json"):
            manifest = _read_json(uri, settings, retry_s)
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
                dst = _uri(output, dst_rel)
                if storage.exists(dst, settings):
                    fs, path = storage.resolve(dst, settings)
                    with storage.storage_errors(dst, "delete", settings):
                        fs.delete_file(path)
            uri = _commit_uri(output, manifest["run_id"], manifest["seq"])
            fs, path = storage.resolve(uri, settings)
            with storage.storage_errors(uri, "delete", settings):
                fs.delete_file(path)
            counts["rolled_back"] += 1
    tmp = _uri(output, "_tmp")
    runs = {f[len(tmp):].lstrip("/").split("/")[0] for f in storage.list_files(tmp, settings)}
    with_retries(lambda: storage.delete_dir(tmp, settings), f"delete {tmp}", retry_s)
    counts["tmp_runs_removed"] = len(runs)
    return counts


# --------------------------------------------------------------------------- readers


def _select(manifests: Iterable[dict], encoder_version: str | None, text_version: str | None) -> list[dict]:
    chosen = [m for m in manifests if m["status"] == "committed"
              and (encoder_version is None or m["encoder_version"] == encoder_version)
              and (text_version is None or m.get("text_version") == text_version)]
    kinds = sorted({(m["encoder_version"], m.get("text_version")) for m in chosen}, key=str)
    if len(kinds) > 1:
        names = ", ".join(f"encoder_version={e!r} text_version={t!r}" for e, t in kinds)
        raise ValueError(f"several feature sets are committed here ({names}); pass encoder_version (and text_version)")
    return chosen


def _read_files(output: str, rels: list[str], settings: storage.StorageSettings | None, columns: list[str] | None = None) -> list[pa.Table]:
    return [storage.read_parquet(_uri(output, rel), settings, columns=columns) for rel in rels]


def _empty_features(manifest: dict) -> pa.Table:
    fields = [pa.field("illust_id", pa.int64())]
    for name in ("sem", "sty", "tsem"):
        if manifest.get(f"{name}_dim"):
            fields.append(pa.field(name, pa.list_(pa.float32(), int(manifest[f"{name}_dim"]))))
    return pa.schema(fields).empty_table()


def read_features(output: str, encoder_version: str | None = None, text_version: str | None = None,
                  settings: storage.StorageSettings | None = None) -> pa.Table:
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
    return contracts.validate(table, "item_features", _uri(output, "features"))


def read_errors(output: str, encoder_version: str | None = None, text_version: str | None = None,
                settings: storage.StorageSettings | None = None) -> pa.Table:
    """The committed extraction errors (``extraction_errors`` contract plus ``reason``):
    per illust_id the latest error, leaving out ids that have features since."""
    chosen = _select(list_manifests(output, settings), encoder_version, text_version)
    tables = _read_files(output, [f["path"] for m in chosen for f in m["errors"]], settings)
    schema = pa.schema([("illust_id", pa.int64()), ("uri", pa.string()), ("stage", pa.string()),
                        ("reason", pa.string()), ("error", pa.string())])
    errors = pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]) if tables else schema.empty_table()
    ids = errors.column("illust_id").to_numpy()
    last = {int(i): r for r, i in enumerate(ids)}  # later manifests win
    with_features = set(_committed_ids(output, chosen, settings, kinds=("features",)).tolist())
    keep = sorted(r for i, r in last.items() if i not in with_features)
    return contracts.validate(errors.take(pa.array(keep, pa.int64())), "extraction_errors", _uri(output, "errors"))


def _committed_ids(output: str, manifests: list[dict], settings: storage.StorageSettings | None,
                   kinds: tuple[str, ...] = ("features", "errors")) -> np.ndarray:
    rels = [f["path"] for m in manifests for kind in kinds for f in m[kind]]
    tables = _read_files(output, rels, settings, columns=["illust_id"])
    return np.concatenate([t.column("illust_id").to_numpy() for t in tables]) if tables else np.zeros(0, np.int64)


# --------------------------------------------------------------------------- driver


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    """Sorts by start time: ``20240501T020000Z-1a2b3c``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def encoder_info(cfg: ExtractConfig, settings: storage.StorageSettings) -> dict:
    """Version, dims and spec of the configured image encoder (exported: manifest only)."""
    from umair.image.checkpoint import MANIFEST
    from umair.image.spec import EncoderSpec

    source = cfg.encoder.source
    if source is not None and not source.startswith("torchvision:"):
        manifest = _read_json(storage.join(source, MANIFEST), settings, cfg.io_retry_s)
    else:
        _, manifest = load_image_encoder(source, dict(cfg.encoder.spec), cfg.encoder.seed)
    spec = EncoderSpec(**manifest["spec"])
    return {"version": manifest["version"], "sem_dim": int(manifest["sem_dim"]), "sty_dim": int(manifest["sty_dim"]),
            "spec": spec.model_dump(mode="json"), "image_size": spec.image_size}


def text_info(cfg: ExtractConfig, settings: storage.StorageSettings) -> dict | None:
    """Version and dim of the configured text encoder (from its manifest), or None."""
    if not cfg.text_model:
        return None
    from umair.text.finetune import read_manifest

    manifest = read_manifest(cfg.text_model, settings)
    return {"version": str(manifest["version"]), "dim": int(manifest["embedding_dim"])}


def select_rows(cfg: ExtractConfig, settings: storage.StorageSettings, done: np.ndarray) -> tuple[pa.Table, dict[str, int]]:
    """The catalogue rows to process: created on/after ``since`` and not committed yet."""
    catalogue = contracts.read_table(cfg.catalogue, "illustrations", settings)
    columns = ["illust_id", "image_uri"] + (["tags"] if cfg.text_model else [])
    selected = catalogue
    if cfg.since is not None:
        selected = selected.filter(pc.greater_equal(selected.column("created_at"), pa.scalar(cfg.since, contracts.TIMESTAMP)))
    todo = selected.filter(pc.invert(pc.is_in(selected.column("illust_id"), value_set=pa.array(done, pa.int64()))))
    counts = {"catalogue_rows": catalogue.num_rows, "selected_rows": selected.num_rows,
              "already_done": selected.num_rows - todo.num_rows, "to_process": todo.num_rows}
    return todo.select(columns).combine_chunks(), counts


def feature_metadata(enc: dict, text: dict | None, run_id: str) -> dict[str, str]:
    """Parquet schema metadata of every feature part file."""
    meta = {"umair.sem.dim": str(enc["sem_dim"]), "umair.sty.dim": str(enc["sty_dim"]),
            "umair.encoder.version": enc["version"], "umair.encoder.spec": json.dumps(enc["spec"], sort_keys=True),
            "umair.extract.run": run_id}
    if text:
        meta.update({"umair.tsem.dim": str(text["dim"]), "umair.tsem.encoder": text["version"]})
    return meta


def decode_task_memory(cfg: ExtractConfig, image_size: int) -> int:
    """Bytes a read+decode task holds at peak: a worker's own footprint (Python, pyarrow,
    Pillow), its output batch, and one file with its decoded pixels at the largest size
    allowed (RGBA, 4 bytes a pixel)."""
    worker = 384 * 2**20
    largest = min(cfg.max_image_pixels * 4, 2**30) + min(cfg.max_image_bytes, 2**30)
    return worker + cfg.decode_batch_size * image_size * image_size * 3 + largest


def build_pipeline(todo: pa.Table, cfg: ExtractConfig, enc: dict, text: dict | None, run_id: str, meta: dict[str, str]):
    """The Ray Data plan: [e_TSEM] → read+decode → encode → write parts (descriptor rows out)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    storage_cfg = cfg.storage.model_dump()
    step = cfg.decode_batch_size
    ds = ray.data.from_arrow([todo.slice(i, step) for i in range(0, todo.num_rows, step)])
    if text:
        ds = ds.map_batches(EmbedTags, batch_format="pyarrow", batch_size=step, compute=ActorPoolStrategy(size=cfg.text_concurrency),
                            num_gpus=cfg.text_num_gpus, num_cpus=1,
                            fn_constructor_kwargs={"path": cfg.text_model, "mode": cfg.text_mode, "batch_size": cfg.text_batch_size,
                                                   "use_gpu": cfg.text_num_gpus > 0, "storage_cfg": storage_cfg})
    # Decode tasks reserve the memory they hold at peak. That also keeps them a stage of their
    # own: Ray Data fuses a task stage into a following actor stage only when their remote
    # args match, and decode fused into the encoder actors would not overlap with encoding
    # (tests/test_extract.py checks the physical plan).
    ds = ds.map_batches(decode_rows, batch_format="numpy", batch_size=step, num_cpus=cfg.decode_num_cpus,
                        memory=decode_task_memory(cfg, enc["image_size"]),
                        fn_kwargs={"image_size": enc["image_size"], "max_pixels": cfg.max_image_pixels,
                                   "max_bytes": cfg.max_image_bytes, "storage_cfg": storage_cfg, "retry_s": cfg.io_retry_s})
    ds = ds.map_batches(EncodeImages, batch_format="numpy", batch_size=cfg.batch_size, compute=ActorPoolStrategy(size=cfg.encode_concurrency),
                        num_gpus=1 if cfg.use_gpu else 0, num_cpus=cfg.encode_num_cpus,
                        fn_constructor_kwargs={"source": cfg.encoder.source, "spec": dict(cfg.encoder.spec),
                                               "seed": cfg.encoder.seed, "use_gpu": cfg.use_gpu,
                                               "threads": int(cfg.encode_num_cpus), "storage_cfg": storage_cfg})
    return ds.map_batches(write_parts, batch_format="numpy", batch_size=cfg.write_batch_rows, num_cpus=0.5,
                          fn_kwargs={"output": cfg.output, "run_id": run_id, "meta": meta,
                                     "storage_cfg": storage_cfg, "retry_s": cfg.io_retry_s})


class Progress:
    """Counts of a run so far; prints one line per commit. ``rate`` counts from the
    pipeline's start (actor start-up and model loads included); ``steady_rate`` from the
    first commit on, once the pipeline is full."""

    def __init__(self, total: int):
        self.total, self.ok, self.failed, self.chunks = total, 0, 0, 0
        self.reasons: Counter[str] = Counter()
        self.start = time.perf_counter()
        self.first_commit: tuple[float, int] | None = None  # (time, rows done) at the first commit
        self.last_commit = self.start

    def add(self, descriptors: list[dict]) -> None:
        for d in descriptors:
            self.ok += int(d["features_rows"])
            self.failed += int(d["errors_rows"])
            self.reasons.update(json.loads(d["reasons"]))
        self.chunks += 1
        self.last_commit = time.perf_counter()
        if self.first_commit is None:
            self.first_commit = (self.last_commit, self.done)

    @property
    def done(self) -> int:
        return self.ok + self.failed

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def steady_rate(self) -> float | None:
        if self.first_commit is None or self.chunks < 2:
            return None
        t, rows = self.first_commit
        return (self.done - rows) / max(self.last_commit - t, 1e-9)

    def line(self, chunk_rows: int) -> str:
        pct = 100.0 * self.done / max(self.total, 1)
        steady = self.steady_rate()
        steady_note = f" ({steady:.1f} since the first commit)" if steady is not None else ""
        return (f"{LOG} chunk {self.chunks}: committed {chunk_rows} rows; {self.done}/{self.total} done ({pct:.1f}%), "
                f"{self.ok} ok, {self.failed} failed, {self.rate():.1f} images/s{steady_note}")


def _chunk_manifest(descriptors: list[dict], run_id: str, seq: int, output_meta: dict) -> dict:
    moves, features, errors = [], [], []
    for d in descriptors:
        for kind, target in (("features", features), ("errors", errors)):
            rel = str(d[kind])
            if rel:
                dst = f"{kind}/{output_meta['key']}/{run_id}-{rel.rsplit('/', 1)[1]}"
                moves.append([rel, dst])
                target.append({"path": dst, "rows": int(d[f"{kind}_rows"])})
    return {"format": COMMIT_FORMAT, "run_id": run_id, "seq": seq, "created_at": _now(), "moves": moves,
            "features": features, "errors": errors, "rows_ok": sum(f["rows"] for f in features),
            "rows_failed": sum(f["rows"] for f in errors), **{k: v for k, v in output_meta.items() if k != "key"}}


def stream_and_commit(ds, cfg: ExtractConfig, run_id: str, output_meta: dict, progress: Progress,
                      settings: storage.StorageSettings, on_commit: Callable[[Progress], None]) -> None:
    """Consume the pipeline's descriptor rows; commit every ``chunk_rows`` rows."""
    pending: list[dict] = []
    rows = 0

    def commit() -> None:
        nonlocal pending, rows
        manifest = _chunk_manifest(pending, run_id, progress.chunks, output_meta)
        commit_chunk(cfg.output, manifest, settings, cfg.io_retry_s)
        progress.add(pending)
        print(progress.line(rows), flush=True)
        on_commit(progress)
        pending, rows = [], 0

    for d in ds.iter_rows():
        pending.append(d)
        rows += int(d["features_rows"]) + int(d["errors_rows"])
        if rows >= cfg.chunk_rows:
            commit()
    if pending:
        commit()


# --------------------------------------------------------------------------- MLflow and run markers


def _experiment_id(client, mlflow_cfg: MlflowConfig) -> str:
    """The experiment's id; a new one keeps artifacts beside a local sqlite store."""
    found = client.get_experiment_by_name(mlflow_cfg.experiment)
    if found is not None:
        return found.experiment_id
    uri = mlflow_cfg.resolved_uri()
    location = None
    if uri.startswith("sqlite:///"):
        location = "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
    return client.create_experiment(mlflow_cfg.experiment, artifact_location=location)


def _pid_alive(pid: int) -> bool:
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


def _is_dead(marker: dict, stale_after_s: float) -> bool:
    """A run marked ``running`` is dead when it ran on this host and its process is gone,
    or when its heartbeat (refreshed at every commit) is older than ``stale_after_s``."""
    if marker.get("host") == socket.gethostname() and not _pid_alive(int(marker.get("pid", -1))):
        return True
    beat = datetime.fromisoformat(marker.get("heartbeat_at") or marker["started_at"])
    return (datetime.now(timezone.utc) - beat).total_seconds() > stale_after_s


def _close_stale_runs(cfg: ExtractConfig, client, settings: storage.StorageSettings) -> int:
    """Mark dead runs ``killed`` (and their MLflow runs KILLED); refuse to start beside a
    live one, since two writers could both extract the same rows."""
    closed = 0
    for uri in storage.list_files(_uri(cfg.output, "_runs"), settings):
        marker = _read_json(uri, settings, cfg.io_retry_s)
        if marker.get("status") != "running":
            continue
        if not _is_dead(marker, cfg.stale_after_s):
            raise ExtractError(
                f"{cfg.output}: extraction run {marker['run_id']} (host {marker.get('host')}, pid {marker.get('pid')}, "
                f"last heartbeat {marker.get('heartbeat_at') or marker.get('started_at')}) is still writing here; one "
                f"extraction per output at a time. If it is dead, rerun after stale_after_s={cfg.stale_after_s:.0f}s "
                f"from that heartbeat, or delete {uri}.")
        try:
            if client.get_run(marker["mlflow_run_id"]).info.status == "RUNNING":
                client.set_terminated(marker["mlflow_run_id"], status="KILLED")
        except Exception as err:  # another tracking store, a deleted run: the marker is still closed
            print(f"{LOG} note: could not close MLflow run {marker.get('mlflow_run_id')}: {err}", file=sys.stderr)
        _write_json(uri, {**marker, "status": "killed", "closed_at": _now()}, settings, cfg.io_retry_s)
        closed += 1
    return closed


def _params(cfg: ExtractConfig, enc: dict, text: dict | None, run_id: str) -> dict[str, str]:
    return {k: str(v) for k, v in {
        "run_id": run_id, "catalogue": cfg.catalogue, "output": cfg.output, "encoder_source": cfg.encoder.source,
        "encoder_version": enc["version"], "backbone": enc["spec"]["backbone"], "image_size": enc["image_size"],
        "text_model": cfg.text_model, "text_version": text["version"] if text else None, "text_mode": cfg.text_mode,
        "since": cfg.since.isoformat() if cfg.since else None, "batch_size": cfg.batch_size,
        "decode_batch_size": cfg.decode_batch_size, "encode_concurrency": cfg.encode_concurrency,
        "use_gpu": cfg.use_gpu, "chunk_rows": cfg.chunk_rows, "retry_failed": cfg.retry_failed}.items()}


def _root_cause(err: BaseException) -> str:
    """The most telling message in an exception chain (Ray wraps user errors twice)."""
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        err = getattr(err, "cause", None) or err.__cause__
    for e in seen:
        if isinstance(e, (storage.StorageError, ValueError)) and not type(e).__module__.startswith("ray"):
            return f"{type(e).__name__}: {e}"
    last = seen[-1]
    return f"{type(last).__name__}: {str(last).strip().splitlines()[-1] if str(last).strip() else ''}"


# --------------------------------------------------------------------------- run


def run(cfg: ExtractConfig) -> dict:
    """Extract features for every catalogue row not committed yet; return the summary
    (also printed and logged to MLflow: params, metrics, ``summary.json``)."""
    import mlflow

    t0 = time.perf_counter()
    settings = cfg.storage.to_settings()
    run_id = new_run_id()
    enc, text = encoder_info(cfg, settings), text_info(cfg, settings)
    key = version_key(enc["version"], text["version"] if text else None)
    client = mlflow.MlflowClient(cfg.mlflow.resolved_uri())
    stale_runs = _close_stale_runs(cfg, client, settings)  # first: recovery must not touch a live run's files
    recovered = {**recover(cfg.output, settings, cfg.io_retry_s), "stale_runs_closed": stale_runs}
    same_set = [m for m in list_manifests(cfg.output, settings, cfg.io_retry_s) if m["status"] == "committed"
                and m["encoder_version"] == enc["version"] and m.get("text_version") == (text["version"] if text else None)]
    done = _committed_ids(cfg.output, same_set, settings, ("features",) if cfg.retry_failed else ("features", "errors"))
    todo, counts = select_rows(cfg, settings, done)

    mlflow_run = client.create_run(_experiment_id(client, cfg.mlflow), run_name=f"extract-{run_id}")
    mlflow_id = mlflow_run.info.run_id
    client.log_batch(mlflow_id, params=[mlflow.entities.Param(k, v) for k, v in _params(cfg, enc, text, run_id).items()])
    marker = _uri(cfg.output, f"_runs/{run_id}.json")
    alive = {"run_id": run_id, "status": "running", "mlflow_run_id": mlflow_id, "host": socket.gethostname(),
             "pid": os.getpid(), "started_at": _now()}
    _write_json(marker, alive, settings, cfg.io_retry_s)
    text_note = f", text {text['version']} ({text['dim']}-d)" if text else ""
    since_note = f", {counts['selected_rows']} since {cfg.since.date().isoformat()}" if cfg.since else ""
    print(f"{LOG} run {run_id}: encoder {enc['version']} (sem {enc['sem_dim']}, sty {enc['sty_dim']}){text_note}; "
          f"catalogue {counts['catalogue_rows']} rows{since_note}, {counts['already_done']} already extracted, "
          f"{counts['to_process']} to process; output {cfg.output}", flush=True)
    if any(recovered.values()):
        print(f"{LOG} recovered an interrupted run: {json.dumps(recovered)}", flush=True)

    progress = Progress(counts["to_process"])
    output_meta = {"key": key, "encoder_version": enc["version"], "text_version": text["version"] if text else None,
                   "sem_dim": enc["sem_dim"], "sty_dim": enc["sty_dim"], "tsem_dim": text["dim"] if text else None,
                   "metadata": feature_metadata(enc, text, run_id), "mlflow_run_id": mlflow_id}

    def after_commit(p: Progress) -> None:
        client.log_metric(mlflow_id, "rows_done", p.done, step=p.chunks)
        _write_json(marker, {**alive, "heartbeat_at": _now(), "rows_done": p.done}, settings, cfg.io_retry_s)

    try:
        if counts["to_process"]:
            init_ray(cfg.ray)
            progress.start = time.perf_counter()
            ds = build_pipeline(todo, cfg, enc, text, run_id, output_meta["metadata"])
            stream_and_commit(ds, cfg, run_id, output_meta, progress, settings, after_commit)
    except BaseException as err:
        client.set_terminated(mlflow_id, status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        _write_json(marker, {"run_id": run_id, "status": "failed", "mlflow_run_id": mlflow_id, "error": _root_cause(err),
                             "ended_at": _now()}, settings, cfg.io_retry_s)
        if isinstance(err, Exception):
            raise ExtractError(f"extraction run {run_id} stopped after {progress.chunks} committed chunks "
                               f"({progress.done}/{progress.total} rows): {_root_cause(err)}. "
                               "Committed chunks are kept; run the same command again to resume.") from err
        raise
    pipeline_s = time.perf_counter() - progress.start
    tmp = _uri(cfg.output, f"_tmp/{run_id}")
    with_retries(lambda: storage.delete_dir(tmp, settings), f"delete {tmp}", cfg.io_retry_s)
    summary = {
        "run_id": run_id, "output": cfg.output, "encoder_version": enc["version"],
        "text_version": text["version"] if text else None, **counts,
        "rows_ok": progress.ok, "rows_failed": progress.failed, "failed_by_reason": dict(sorted(progress.reasons.items())),
        "chunks": progress.chunks, "images_per_s": round(progress.done / pipeline_s, 2) if progress.done else 0.0,
        "steady_images_per_s": round(progress.steady_rate(), 2) if progress.steady_rate() is not None else None,
        "first_commit_s": round(progress.first_commit[0] - progress.start, 2) if progress.first_commit else None,
        "pipeline_s": round(pipeline_s, 2), "wall_s": round(time.perf_counter() - t0, 2),
        "recovered": recovered, "mlflow_run_id": mlflow_id,
    }
    metrics = {k: float(summary[k]) for k in ("catalogue_rows", "selected_rows", "already_done", "to_process", "rows_ok",
                                              "rows_failed", "chunks", "images_per_s", "steady_images_per_s",
                                              "first_commit_s", "pipeline_s", "wall_s") if summary[k] is not None}
    metrics.update({f"failed.{r.replace(':', '.')}": float(n) for r, n in progress.reasons.items()})
    now_ms = int(time.time() * 1000)
    client.log_batch(mlflow_id, metrics=[mlflow.entities.Metric(k, v, now_ms, 0) for k, v in metrics.items()])
    client.log_text(mlflow_id, json.dumps(summary, indent=2), "summary.json")
    client.set_terminated(mlflow_id, "FINISHED")
    _write_json(marker, {"run_id": run_id, "status": "finished", "mlflow_run_id": mlflow_id, "ended_at": _now(),
                         "summary": summary}, settings, cfg.io_retry_s)
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    """The end-of-run lines a person reads."""
    reasons = ", ".join(f"{r} {n}" for r, n in summary["failed_by_reason"].items()) or "none"
    print(f"{LOG} done: {summary['rows_ok']} ok, {summary['rows_failed']} failed ({reasons}); "
          f"{summary['to_process']} processed, {summary['already_done']} skipped as already extracted; "
          f"{summary['images_per_s']} images/s; wall {summary['wall_s']}s; {summary['chunks']} chunks committed", flush=True)
    print(f"{LOG} summary: {json.dumps(summary, sort_keys=True)}", flush=True)


def register(sub) -> None:
    """Add ``umair extract`` to the CLI."""
    from umair.config import load_config

    def handler(args) -> int:
        overrides = {k: v for k, v in (("catalogue", args.catalogue), ("output", args.output), ("since", args.since),
                                       ("text_model", args.text_model), ("chunk_rows", args.chunk_rows),
                                       ("encode_concurrency", args.encode_concurrency)) if v is not None}
        if args.use_gpu:
            overrides["use_gpu"] = True
        if args.retry_failed:
            overrides["retry_failed"] = True
        if args.endpoint:
            overrides["storage.endpoint"] = args.endpoint
        cfg = load_config(args.config, ExtractConfig, overrides)
        if args.encoder is not None:
            source = None if args.encoder == "random" else args.encoder
            cfg = cfg.model_copy(update={"encoder": cfg.encoder.model_copy(update={"source": source})})
        try:
            run(cfg)
        except ExtractError as err:
            print(f"umair extract: error: {err}", file=sys.stderr)
            return 1
        return 0

    p = sub.add_parser("extract", help="streaming feature extraction: images (+ tags) → item features (Ray Data)")
    p.add_argument("--config", required=True, help="settings YAML (see pipelines/configs/extract.yaml)")
    p.add_argument("--catalogue", help="illustrations table (overrides the config)")
    p.add_argument("--output", help="item-features prefix, local or s3:// (overrides the config)")
    p.add_argument("--encoder", help="exported encoder directory, torchvision:WEIGHTS, or 'random'")
    p.add_argument("--since", help="only illustrations created on/after this ISO date (UTC)")
    p.add_argument("--text-model", help="fine-tuned text encoder directory: adds e_TSEM")
    p.add_argument("--chunk-rows", type=int, help="rows per commit")
    p.add_argument("--encode-concurrency", type=int, help="encoder actors")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per encoder actor (bf16)")
    p.add_argument("--retry-failed", action="store_true", help="try again rows whose committed record is an error")
    p.add_argument("--endpoint", help="S3-compatible endpoint URL (overrides storage.endpoint)")
    p.set_defaults(func=handler)
