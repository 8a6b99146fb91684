"""The stages of the extraction pipeline, as plain callables that Ray Data runs
(``map_batches``) on its workers: read + decode per row (a failure marks its row only),
the dual image encoder (e_SEM, e_STY), the tag-text encoder (e_TSEM) and the part
writer. Nothing here imports Ray; settings arrive typed (:class:`StorageConfig`).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from umair import modalities as registry
from umair import storage
from umair.config import StorageConfig
from umair.feature_store import part_uri
from umair.storage import with_retries


class PermanentReadError(Exception):
    """An image that cannot be read however often one tries; becomes an error row
    (stage ``read``) with ``reason`` one of:

    - ``bad_uri``: empty or malformed ``image_uri`` (``""``, ``s3://``, ``s3://bucket``
      without a key, empty path components, a NUL character, a name too long) or an
      unsupported scheme;
    - ``not_a_file``: a directory, an S3 prefix (``s3://bucket/folder/``), not a regular file;
    - ``missing``: no such file or object;
    - ``no_bucket``: the URI's bucket does not exist;
    - ``permission_denied``: the file exists but may not be read;
    - ``too_large``: larger than ``max_image_bytes``.

    The message (the error row's ``error``) is ``"<reason>: <detail naming the URI>"``.
    """

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


def read_image_bytes(uri: str, settings: storage.StorageSettings, max_bytes: int, retry_s: float) -> bytes:
    """The bytes at ``uri``, at most ``max_bytes`` of them (a larger file is refused
    without being read whole).

    Problems of this one image raise :class:`PermanentReadError` at once, without
    retrying (malformed URIs are refused before any I/O): see its reasons. Transient
    failures (connection refused, timeouts, 5xx) are retried with backoff for
    ``retry_s``, then raise :class:`umair.storage.StorageError`, which stops the job; so
    do, at once, problems that every row would share: rejected credentials and full or
    read-only storage."""
    import errno

    import pyarrow.fs as pafs

    if not uri or not uri.strip():
        raise PermanentReadError("bad_uri", "empty image_uri")
    if "\x00" in uri:
        raise PermanentReadError("bad_uri", f"{uri!r}: NUL character in the URI")
    if storage.is_s3(uri):
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket:
            raise PermanentReadError("bad_uri", f"{uri}: no bucket (expected s3://bucket/key)")
        if not key.strip("/"):
            raise PermanentReadError("bad_uri", f"{uri}: names a bucket, not an object (expected s3://bucket/key)")
        if "//" in key.rstrip("/") or key.startswith("/"):
            raise PermanentReadError("bad_uri", f"{uri}: empty path component (expected s3://bucket/key)")
        if key.endswith("/"):
            raise PermanentReadError("not_a_file", f"{uri} names a prefix (folder), not an object")
    elif uri.startswith("file://") and not uri[len("file://") :].strip():
        raise PermanentReadError("bad_uri", f"{uri}: no path after file://")
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
        chain, seen = [], err
        while seen is not None and len(chain) < 8:
            chain.append(seen)
            seen = seen.__cause__
        text = " ".join(str(e) for e in chain).lower().replace("_", "")
        codes = {e.errno for e in chain if isinstance(e, OSError)}
        if "rejected the credentials" in text or "accessdenied" in text or "signaturedoesnotmatch" in text:
            raise  # the job's credentials: every row would fail alike
        bucket = uri[len("s3://") :].split("/")[0] if storage.is_s3(uri) else ""
        no_bucket = PermanentReadError("no_bucket", f"{uri}: the bucket {bucket} does not exist")
        if "the bucket does not exist" in text or "nosuchbucket" in text:
            raise no_bucket from err
        if any(isinstance(e, FileNotFoundError) for e in chain) or errno.ENOENT in codes:
            if bucket:  # S3 answers a missing bucket's object as not found: ask about the bucket (missing rows only)
                try:
                    gone = fs.get_file_info(bucket).type == pafs.FileType.NotFound
                except (OSError, pa.ArrowException):
                    gone = False
                if gone:
                    raise no_bucket from err
            raise PermanentReadError("missing", f"no such file or object: {uri}") from err
        if not storage.is_s3(uri) and os.path.isdir(path):
            raise PermanentReadError("not_a_file", f"{uri} is a directory, not a file") from err
        if any(isinstance(e, NotADirectoryError) for e in chain) or errno.ENOTDIR in codes:
            raise PermanentReadError("not_a_file", f"{uri}: a parent in the path is a file, not a directory") from err
        if (
            any(isinstance(e, IsADirectoryError) for e in chain)
            or errno.EISDIR in codes
            or "is a directory" in text
            or "not a regular file" in text
        ):
            raise PermanentReadError("not_a_file", f"{uri} is not a regular file") from err
        if errno.ELOOP in codes:
            raise PermanentReadError("not_a_file", f"{uri}: too many levels of symbolic links") from err
        if any(isinstance(e, PermissionError) for e in chain) or codes & {errno.EACCES, errno.EPERM}:
            raise PermanentReadError("permission_denied", f"{uri}: permission denied") from err
        if errno.ENAMETOOLONG in codes:
            raise PermanentReadError("bad_uri", f"{uri[:80]}...: file name too long") from err
        if any(isinstance(e, pa.ArrowInvalid) for e in chain):
            raise PermanentReadError("bad_uri", f"{uri}: invalid path ({chain[-1]})") from err
        raise
    if len(data) > max_bytes:
        raise PermanentReadError("too_large", f"file is larger than max_image_bytes={max_bytes}")
    return data


def decode_rows(
    batch: dict[str, np.ndarray],
    image_size: int,
    max_pixels: int,
    max_bytes: int,
    storage_config: StorageConfig,
    retry_s: float,
    resize: str = "squash",
    decode: str = "cpu",
) -> dict[str, np.ndarray]:
    """Ray Data UDF (CPU tasks): read and decode each row; a failure marks its row only
    (``stage`` read/decode, ``reason``, ``error``; see :class:`PermanentReadError` and
    :class:`umair.image.preprocess.DecodeError`). A missing ``image_uri`` (None, NaN) is
    ``bad_uri``. Only storage failures every row would share (transient ones past
    ``retry_s``, rejected credentials, full storage) raise, and stop the job.

    ``resize``: the encoder's resize mode (``decode_image``). ``decode="gpu"``: rows are
    read, not decoded; out go the file bytes (``data``) and where the encoder actor is to
    decode them (``route``: ``gpu`` for complete RGB/greyscale JPEGs,
    :func:`umair.image.preprocess.plan_decode`; else ``cpu``), no ``image`` column; read
    failures are error rows as in ``cpu`` mode."""
    from umair.image.preprocess import DecodeError, decode_image, plan_decode

    settings = storage_config.to_settings()
    n = len(batch["illust_id"])
    gpu = decode == "gpu"
    images = None if gpu else np.zeros((n, image_size, image_size, 3), np.uint8)
    data_col, route = np.full(n, b"", dtype=object), np.full(n, "", dtype=object)
    ok = np.zeros(n, bool)
    stage, reason, error = (np.full(n, "", dtype=object) for _ in range(3))
    for i, raw in enumerate(batch["image_uri"]):
        if raw is None or (isinstance(raw, float) and np.isnan(raw)):
            uri = ""
        elif isinstance(raw, bytes):
            uri = raw.decode("utf-8", "replace")
        else:
            uri = str(raw)
        try:
            data = read_image_bytes(uri, settings, max_bytes, retry_s)
        except PermanentReadError as err:
            stage[i], reason[i], error[i] = "read", err.reason, str(err)
            continue
        if gpu:
            data_col[i], route[i], ok[i] = data, plan_decode(data, max_pixels), True
            continue
        try:
            images[i] = decode_image(data, image_size, max_pixels, resize)
            ok[i] = True
        except DecodeError as err:
            stage[i], reason[i], error[i] = "decode", err.reason, str(err)
    out = {k: v for k, v in batch.items() if k not in ("created_at", "tags")}
    out.update(ok=ok, stage=stage, reason=reason, error=error)
    if gpu:
        out.update(data=data_col, route=route)
    else:
        out.update(image=images)
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
    pass through with zero vectors (the writer routes them to the errors table).

    ``decode="cpu"``: batches carry decoded pixels (``image`` [B, S, S, 3] uint8).
    ``decode="gpu"``: batches carry file bytes (``data``) and a ``route`` per row
    (:func:`decode_rows`); the ``gpu`` rows are decoded together with
    ``torchvision.io.decode_jpeg(..., device=jpeg_device)`` (default: the actor's device)
    and fitted by :func:`umair.image.preprocess.fit_tensor`; a batch the decoder refuses
    is retried row by row, and every row it refuses, like every ``cpu`` row, is decoded
    here by :func:`umair.image.preprocess.decode_image`, whose errors make error rows
    (``stage`` decode) exactly as on the CPU tasks. The resize mode and size are the
    loaded encoder's (from its manifest). ``counts`` tallies rows decoded by the JPEG
    decoder (``jpeg``), by the CPU decoder (``cpu``) and refused by both (``failed``).
    """

    def __init__(
        self,
        source: str | None,
        spec: dict,
        seed: int,
        use_gpu: bool,
        threads: int,
        storage_config: StorageConfig,
        decode: str = "cpu",
        max_pixels: int | None = None,
        jpeg_device: str | None = None,
    ):
        import torch

        from umair.image.preprocess import MAX_PIXELS
        from umair.image.spec import EncoderSpec

        if not use_gpu:
            torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        model, manifest = load_image_encoder(source, spec, seed, storage_config.to_settings())
        self.model = model.to(self.device).eval()
        if use_gpu:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.sem_dim, self.sty_dim = int(manifest["sem_dim"]), int(manifest["sty_dim"])
        fitted = EncoderSpec.from_manifest(manifest["spec"])
        self.size, self.resize = fitted.image_size, fitted.resize
        self.decode, self.max_pixels = decode, max_pixels or MAX_PIXELS
        self.jpeg_device = torch.device(jpeg_device) if jpeg_device else self.device
        self.counts = Counter()

    def _jpeg(self, datas: list[bytes]) -> list:
        """[3, S, S] uint8 tensors on the JPEG device (None where the decoder refuses the row)."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        from umair.image.preprocess import fit_tensor

        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        try:
            decoded = list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.jpeg_device))
        except RuntimeError:  # one bad file fails the batch: find it row by row
            decoded = []
            for e in encoded:
                try:
                    decoded.append(decode_jpeg(e, mode=ImageReadMode.RGB, device=self.jpeg_device))
                except RuntimeError:
                    decoded.append(None)
        return [None if d is None else fit_tensor(d, self.size, self.resize) for d in decoded]

    def _decode(self, batch: dict[str, np.ndarray], ok: np.ndarray, stage, reason, error):
        """[ok rows, 3, S, S] uint8 on the encoder's device; rows neither decoder takes are
        marked in ``ok``/``stage``/``reason``/``error`` (in place)."""
        import torch

        from umair.image.preprocess import DecodeError, decode_image

        rows = np.flatnonzero(ok)
        images: dict[int, torch.Tensor] = {}
        on_gpu = [i for i in rows if batch["route"][i] == "gpu"]
        for i, img in zip(on_gpu, self._jpeg([bytes(batch["data"][i]) for i in on_gpu]) if on_gpu else []):
            if img is not None:
                images[i] = img.to(self.device)
                self.counts["jpeg"] += 1
        for i in rows:
            if i in images:
                continue
            try:
                pixels = decode_image(bytes(batch["data"][i]), self.size, self.max_pixels, self.resize)
                images[i] = torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(self.device)
                self.counts["cpu"] += 1
            except DecodeError as err:
                ok[i], stage[i], reason[i], error[i] = False, "decode", err.reason, str(err)
                self.counts["failed"] += 1
        kept = [images[i] for i in rows if ok[i]]
        return torch.stack(kept) if kept else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from umair.image.encoder import encode

        ok = batch["ok"].astype(bool).copy()
        stage, reason, error = (np.array(batch[k], dtype=object) for k in ("stage", "reason", "error"))
        n = len(ok)
        sem = np.zeros((n, self.sem_dim), np.float32)
        sty = np.zeros((n, self.sty_dim), np.float32)
        if self.decode == "gpu":
            images = self._decode(batch, ok, stage, reason, error) if ok.any() else None
        else:
            images = (
                torch.from_numpy(np.ascontiguousarray(batch["image"][ok])).permute(0, 3, 1, 2) if ok.any() else None
            )
        if images is not None:
            s, t = encode(self.model, images, self.device)
            sem[ok], sty[ok] = s.numpy(), t.numpy()
        out = {k: v for k, v in batch.items() if k not in ("image", "data", "route")}
        out.update(ok=ok, stage=stage, reason=reason, error=error, sem=sem, sty=sty)
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
            vectors = self.model.encode(
                missing,
                batch_size=batch_size,
                normalize_embeddings=normalize_embeddings,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            if len(self.memory) + len(missing) > self.max_entries:
                self.memory.clear()
            self.memory.update(zip(missing, np.asarray(vectors, np.float32), strict=True))
        dim = self.get_embedding_dimension()
        return np.stack([self.memory[t] for t in texts]) if texts else np.zeros((0, dim), np.float32)


class EmbedTags:
    """Ray Data actor: e_TSEM of each row from its tags (umair.text.tag_embeddings)."""

    def __init__(self, path: str, mode: str, batch_size: int, use_gpu: bool, storage_config: StorageConfig):
        from umair.text.saved_encoder import load_text_encoder

        encoder = load_text_encoder(path, device="cuda" if use_gpu else "cpu", settings=storage_config.to_settings())
        self.model, self.version = _RememberingTextModel(encoder.model), encoder.version
        self.mode, self.batch_size = mode, batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        from umair.text.tag_embeddings import embed_tags

        tsem, _ = embed_tags(
            batch.select(["illust_id", "tags"]), self.model, self.version, mode=self.mode, batch_size=self.batch_size
        )
        if not tsem.column("illust_id").equals(batch.column("illust_id")):
            order = {i: r for r, i in enumerate(tsem.column("illust_id").to_pylist())}  # join by id
            tsem = tsem.take(pa.array([order[i] for i in batch.column("illust_id").to_pylist()]))
        return batch.drop_columns(["tags"]).append_column("tsem", tsem.column("tsem"))


def _vectors(values: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    arr = np.stack(values) if values.dtype == object else values
    return pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(arr, np.float32).reshape(-1), pa.float32()), dim
    )


def mark_non_finite(batch: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, np.ndarray]:
    """Flag (in place of ``ok``) rows whose e_SEM / e_STY / e_TSEM hold NaN or infinity as error rows."""
    bad = np.zeros(len(ok), bool)
    for name in registry.names():
        if name in batch and len(ok):
            values = batch[name]
            arr = np.stack(values) if values.dtype == object else values
            bad |= ~np.isfinite(np.asarray(arr, np.float64).reshape(len(ok), -1)).all(axis=1)
    bad &= ok
    if not bad.any():
        return batch
    out = dict(batch)
    out["stage"], out["reason"], out["error"] = (np.array(batch[k], dtype=object) for k in ("stage", "reason", "error"))
    names = [m for m in registry.names() if m in batch]
    out["stage"][bad], out["reason"][bad] = "encode", "non_finite"
    out["error"][bad] = f"the encoder produced NaN or infinite values ({', '.join(names)})"
    ok[bad] = False
    out["ok"] = ok
    return out


def write_parts(
    batch: dict[str, np.ndarray],
    output: str,
    run_id: str,
    meta: dict[str, str],
    storage_config: StorageConfig,
    retry_s: float,
) -> dict[str, np.ndarray]:
    """Ray Data UDF (tasks): write a batch's good rows and error rows as temporary part
    files; return one descriptor row for the driver to commit. A row whose vectors hold a
    NaN or an infinity becomes an error row (stage ``encode``, reason ``non_finite``)."""
    settings = storage_config.to_settings()
    ok = batch["ok"].astype(bool)
    batch = mark_non_finite(batch, ok)
    part = uuid.uuid4().hex[:16]
    desc: dict[str, Any] = {"features": "", "features_rows": 0, "errors": "", "errors_rows": 0, "reasons": "{}"}
    desc.update(features_bytes=0, features_sha256="", errors_bytes=0, errors_sha256="")
    if ok.any():
        columns = {"illust_id": pa.array(batch["illust_id"][ok].astype(np.int64), pa.int64())}
        for name in registry.names():
            if name in batch:
                columns[name] = _vectors(batch[name][ok], int(meta[f"umair.{name}.dim"]))
        table = pa.table(columns).replace_schema_metadata(meta)
        rel = f"_tmp/{run_id}/features/{part}.parquet"
        uri, data = part_uri(output, rel), storage.parquet_bytes(table)
        with_retries(lambda u=uri, b=data: storage.write_bytes(u, b, settings), f"write {uri}", retry_s)
        desc.update(features_bytes=len(data), features_sha256=hashlib.sha256(data).hexdigest())
        desc.update(features=rel, features_rows=int(ok.sum()))
    bad = ~ok
    if bad.any():
        table = pa.table(
            {
                "illust_id": pa.array(batch["illust_id"][bad].astype(np.int64), pa.int64()),
                "uri": pa.array([str(u) for u in batch["image_uri"][bad]], pa.string()),
                "stage": pa.array([str(s) for s in batch["stage"][bad]], pa.string()),
                "reason": pa.array([str(s) for s in batch["reason"][bad]], pa.string()),
                "error": pa.array([str(s) for s in batch["error"][bad]], pa.string()),
            }
        ).replace_schema_metadata(
            {k: v for k, v in meta.items() if k.startswith("umair.encoder") or k.startswith("umair.extract")}
        )
        rel = f"_tmp/{run_id}/errors/{part}.parquet"
        uri, data = part_uri(output, rel), storage.parquet_bytes(table)
        with_retries(lambda u=uri, b=data: storage.write_bytes(u, b, settings), f"write {uri}", retry_s)
        desc.update(errors_bytes=len(data), errors_sha256=hashlib.sha256(data).hexdigest())
        reasons = Counter(f"{s}:{r}" for s, r in zip(batch["stage"][bad], batch["reason"][bad]))
        desc.update(errors=rel, errors_rows=int(bad.sum()), reasons=json.dumps(dict(reasons)))
    return {k: np.array([v]) for k, v in desc.items()}
