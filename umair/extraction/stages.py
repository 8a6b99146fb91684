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
from umair.extraction.text_stage import EmbedTags  # noqa: F401  (the e_TSEM stage, re-exported for the job)
from umair.feature_store import part_uri
from umair.storage import with_retries

NO_IMAGE = "no_image"  # the catalogue's image_uri is NULL: no e_SEM / e_STY, and no error row


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
    :class:`umair.image.preprocess.DecodeError`). A NULL ``image_uri`` (None, NaN: the item
    has no image) is reason :data:`NO_IMAGE`, not an error (an empty string stays
    ``bad_uri``). Only storage failures every row would share (transient ones past
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
            stage[i], reason[i], error[i] = "read", NO_IMAGE, f"{NO_IMAGE}: the catalogue has no image_uri"
            continue
        if isinstance(raw, bytes):
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
    # Only what later stages read: the text columns are done with (e_TSEM is in the batch),
    # and every column keeps one type across blocks (a block whose image_uri values are all
    # NULL would otherwise not unify with the others in Ray Data).
    keep = ("illust_id", *registry.names(), *(f"{m}_given" for m in registry.names()))
    out = {k: batch[k] for k in keep if k in batch}
    out["image_uri"] = np.array([u if isinstance(u, str) else "" for u in batch["image_uri"]], dtype=object)
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
    """Ray Data actor: the dual image encoder, loaded once; rows without a decoded image
    pass through with zero vectors, which the writer stores as NULL e_SEM / e_STY.

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


def _vectors(values: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    arr = np.stack(values) if values.dtype == object else values
    return pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(arr, np.float32).reshape(-1), pa.float32()), dim
    )


def mark_non_finite(
    batch: dict[str, np.ndarray], ok: np.ndarray
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(batch, present): ``present[m]`` [n] bool per modality in the batch. e_SEM / e_STY
    (image modalities) are present where the image was encoded (``ok``), e_TSEM wherever
    the text encoder ran; a vector holding NaN or infinity is absent and its row gets an
    error (stage ``encode``, reason ``non_finite``; appended to an earlier error of the row)."""
    out = dict(batch)
    out["stage"], out["reason"], out["error"] = (np.array(batch[k], dtype=object) for k in ("stage", "reason", "error"))
    image = registry.of_encoder("image")
    present, bad = {}, {}
    for name in (m for m in registry.names() if m in batch):
        values = batch[name]
        if not len(ok):
            present[name] = bad[name] = np.zeros(0, bool)
            continue
        arr = np.stack(values) if values.dtype == object else values
        # an absent vector (no text for e_TSEM) arrives as zeros beside a mask: text_stage.dense_vectors
        given = np.asarray(batch.get(f"{name}_given", np.ones(len(ok), bool)), bool)
        finite = np.isfinite(np.asarray(arr, np.float64).reshape(len(ok), -1)).all(axis=1)
        ran = (ok if name in image else np.ones(len(ok), bool)) & given
        bad[name], present[name] = ran & ~finite, ran & finite
    for r in np.flatnonzero(np.any(list(bad.values()), axis=0)) if bad else ():
        note = f"the encoder produced NaN or infinite values ({', '.join(m for m in bad if bad[m][r])})"
        if out["stage"][r]:
            out["error"][r] = f"{out['error'][r]}; {note}"
        else:
            out["stage"][r], out["reason"][r], out["error"][r] = "encode", "non_finite", note
    return out, present


def _write_part(table: pa.Table, rel: str, output: str, settings, retry_s: float) -> dict[str, Any]:
    uri, data = part_uri(output, rel), storage.parquet_bytes(table)
    with_retries(lambda: storage.write_bytes(uri, data, settings), f"write {uri}", retry_s)
    return {"path": rel, "rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_parts(
    batch: dict[str, np.ndarray],
    output: str,
    run_id: str,
    meta: dict[str, str],
    storage_config: StorageConfig,
    retry_s: float,
) -> dict[str, np.ndarray]:
    """Ray Data UDF (tasks): write a batch's rows as temporary part files; return one
    descriptor row for the driver to commit.

    Every row gets a feature row: ``features`` holds the rows with every modality;
    ``partial`` (JSON list of parts) the rows missing some (no image, an image that could
    not be read or decoded, a NaN / infinite vector: :func:`mark_non_finite`), one part per
    set of modalities present, without the absent columns (readers fill them with NULL;
    parquet cannot round-trip NULL fixed-size lists, apache/arrow#35692). ``errors`` holds
    a row per failure, none for a NULL ``image_uri`` (reason :data:`NO_IMAGE`, counted in
    ``no_image``). ``modality_rows`` (JSON): feature rows with each modality present."""
    settings = storage_config.to_settings()
    ok = batch["ok"].astype(bool)
    batch, present = mark_non_finite(batch, ok)
    no_image = np.array([r == NO_IMAGE for r in batch["reason"]], bool)
    part, names = uuid.uuid4().hex[:16], list(present)
    desc: dict[str, Any] = {"no_image": int(no_image.sum()), "reasons": "{}"}
    desc["modality_rows"] = json.dumps({m: int(p.sum()) for m, p in present.items()})
    pattern = np.stack([present[m] for m in names], axis=1) if names else np.ones((len(ok), 0), bool)
    complete, partial = pattern.all(axis=1), []
    desc.update(features="", features_rows=0, features_bytes=0, features_sha256="")
    for k, has in enumerate([np.ones(len(names), bool)] + list(np.unique(pattern[~complete], axis=0))):
        rows = (pattern == has).all(axis=1)
        if not rows.any():
            continue
        columns = {"illust_id": pa.array(batch["illust_id"][rows].astype(np.int64), pa.int64())}
        for name in (n for n, h in zip(names, has) if h):
            columns[name] = _vectors(batch[name][rows], int(meta[f"umair.{name}.dim"]))
        table = pa.table(columns).replace_schema_metadata(meta)
        entry = _write_part(
            table, f"_tmp/{run_id}/features/{part}{f'-p{k}' if k else ''}.parquet", output, settings, retry_s
        )
        if k:
            partial.append(entry)
        else:
            desc.update(features=entry["path"], **{f"features_{x}": entry[x] for x in ("rows", "bytes", "sha256")})
    desc.update(partial=json.dumps(partial), partial_rows=sum(e["rows"] for e in partial))
    bad = (batch["stage"] != "") & ~no_image
    desc.update(errors="", errors_rows=0, errors_bytes=0, errors_sha256="")
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
        entry = _write_part(table, rel, output, settings, retry_s)
        desc.update(errors=entry["path"], **{f"errors_{x}": entry[x] for x in ("rows", "bytes", "sha256")})
        reasons = Counter(f"{s}:{r}" for s, r in zip(batch["stage"][bad], batch["reason"][bad]))
        desc["reasons"] = json.dumps(dict(reasons))
    return {k: np.array([v]) for k, v in desc.items()}
