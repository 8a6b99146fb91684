"""One way to reach files: local paths and ``s3://`` URIs alike, through ``pyarrow.fs``.

Every job opens its inputs and outputs with :func:`resolve`, so a path on a laptop
and an object in a bucket behave the same. S3 settings come from
:class:`StorageSettings` (endpoint override, region) and credentials always come from
the standard AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile,
or an instance profile). Credentials are never stored here and never logged.

Writes are all-or-nothing: a reader sees the old object or the complete new one,
never a half-written file (local: temp file + ``os.replace``; S3: the body is built
in memory and sent in one request, which S3 applies atomically).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import io
import json
import os
import posixpath
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from umair.errors import FeatureError, UmairError

T = TypeVar("T")

ENDPOINT_ENV_VARS = ("UMAIR_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_ENV_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")


class StorageError(UmairError, OSError):
    """A storage operation failed; the message names the URI and what to check."""


@dataclass(frozen=True)
class StorageSettings:
    """How to reach object storage. ``None`` fields fall back to the environment.

    endpoint: an S3-compatible endpoint such as ``http://127.0.0.1:8333`` (MinIO,
        SeaweedFS, ...); ``None`` means AWS itself.
    region: the bucket region; ``None`` lets the AWS chain decide (default us-east-1).
    retries: attempts per request before an error is raised (network blips, 5xx).
    """

    endpoint: str | None = None
    region: str | None = None
    retries: int = 5
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 60.0

    @classmethod
    def from_env(cls) -> StorageSettings:
        endpoint = next((os.environ[v] for v in ENDPOINT_ENV_VARS if os.environ.get(v)), None)
        region = next((os.environ[v] for v in REGION_ENV_VARS if os.environ.get(v)), None)
        return cls(endpoint=endpoint, region=region)

    def merged_with_env(self) -> StorageSettings:
        env = StorageSettings.from_env()
        return StorageSettings(
            endpoint=self.endpoint or env.endpoint,
            region=self.region or env.region,
            retries=self.retries,
            connect_timeout_s=self.connect_timeout_s,
            request_timeout_s=self.request_timeout_s,
        )


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path parts under ``base`` (a local path or an s3:// URI)."""
    if is_s3(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def parent(uri: str) -> str:
    return posixpath.dirname(uri.rstrip("/")) if is_s3(uri) else os.path.dirname(os.path.abspath(uri))


def _credential_fingerprint() -> str:
    """Changes when the credentials in the environment change (kept in memory only)."""
    raw = "|".join(
        os.environ.get(k, "")
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    )
    return hashlib.sha256(raw.encode()).hexdigest()


@lru_cache(maxsize=16)
def _s3_filesystem(settings: StorageSettings, _credentials: str) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": settings.region or "us-east-1",
        "connect_timeout": settings.connect_timeout_s,
        "request_timeout": settings.request_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=settings.retries),
        "allow_bucket_creation": False,
    }
    if settings.endpoint:
        parsed = urlparse(settings.endpoint if "://" in settings.endpoint else f"https://{settings.endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    # No access_key/secret_key: pyarrow uses the default AWS credential chain.
    return pafs.S3FileSystem(**kwargs)


def _drop_s3_filesystems() -> None:
    """At exit, drop the cached S3 filesystems before pyarrow's own exit hook finalizes
    its AWS SDK: a filesystem that outlives ``FinalizeS3`` can abort the process as it
    ends ("Mutex corrupt", "Fatal Python error: Aborted" in Ray worker logs of runs that
    otherwise succeeded; apache/arrow#41087, #50188). ``atexit`` runs this hook first,
    since this module registers it after ``pyarrow.fs`` was imported."""
    _s3_filesystem.cache_clear()
    gc.collect()


atexit.register(_drop_s3_filesystems)


def resolve(uri: str, settings: StorageSettings | None = None) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path or an s3:// URI."""
    if is_s3(uri):
        s = (settings or StorageSettings()).merged_with_env()
        return _s3_filesystem(s, _credential_fingerprint()), uri[len("s3://") :].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported URI scheme (expected a local path or s3://bucket/key)")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _explain(uri: str, op: str, err: BaseException, settings: StorageSettings | None) -> StorageError:
    text = str(err)
    where = ""
    if is_s3(uri):
        endpoint = (settings or StorageSettings()).merged_with_env().endpoint or "AWS S3"
        where = f" at endpoint {endpoint}"
    upper = text.upper().replace("_", "")
    if any(k in upper for k in ("ACCESSDENIED", "SIGNATUREDOESNOTMATCH", "INVALIDACCESSKEYID", "FORBIDDEN")):
        hint = (
            "the server rejected the credentials. Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE / the instance profile) and that they may "
            f"{op} this prefix"
        )
    elif any(
        k in upper
        for k in ("COULDN'T CONNECT", "CONNECTION REFUSED", "NETWORKCONNECTION", "COULD NOT CONNECT", "TIMED OUT")
    ):
        hint = "the storage endpoint could not be reached; is it running and is the endpoint right?"
    elif "NOSUCHBUCKET" in upper or ("BUCKET" in upper and "NOT FOUND" in upper):
        hint = "the bucket does not exist"
    elif isinstance(err, FileNotFoundError):
        hint = "no such file or object"
    else:
        hint = text
    return StorageError(f"cannot {op} {uri}{where}: {hint}")


@contextlib.contextmanager
def storage_errors(uri: str, op: str, settings: StorageSettings | None = None) -> Iterator[None]:
    """Turn low-level filesystem errors into a :class:`StorageError` naming ``uri``."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as err:
        raise _explain(uri, op, err, settings) from err


def exists(uri: str, settings: StorageSettings | None = None) -> bool:
    fs, path = resolve(uri, settings)
    with storage_errors(uri, "inspect", settings):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, settings: StorageSettings | None = None) -> bytes:
    fs, path = resolve(uri, settings)
    with storage_errors(uri, "read", settings):
        with fs.open_input_stream(path) as f:
            return f.read()


def write_bytes(uri: str, data: bytes, settings: StorageSettings | None = None) -> None:
    """Write ``data`` to ``uri`` all-or-nothing."""
    fs, path = resolve(uri, settings)
    with storage_errors(uri, "write", settings):
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)


def list_files(uri: str, settings: StorageSettings | None = None) -> list[str]:
    """All files under ``uri`` (recursive), as URIs of the same kind as ``uri``."""
    fs, path = resolve(uri, settings)
    with storage_errors(uri, "list", settings):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File)


def delete_dir(uri: str, settings: StorageSettings | None = None) -> None:
    """Delete everything under ``uri`` (no error if absent)."""
    fs, path = resolve(uri, settings)
    with storage_errors(uri, "delete", settings):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return
        if isinstance(fs, pafs.LocalFileSystem):
            fs.delete_dir(path)
        else:
            fs.delete_dir_contents(path, missing_dir_ok=True)
            with contextlib.suppress(OSError):
                fs.delete_dir(path)


def move_dir(src: str, dst: str, settings: StorageSettings | None = None) -> None:
    """Rename a local directory (atomic on one filesystem). Local paths only."""
    if is_s3(src) or is_s3(dst):
        raise StorageError("move_dir is for local directories; object stores commit with a manifest")
    os.replace(os.path.abspath(src), os.path.abspath(dst))


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as the bytes of one zstd-compressed parquet file."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_parquet(table: pa.Table, uri: str, settings: StorageSettings | None = None) -> None:
    """Write ``table`` as one parquet file, all-or-nothing."""
    write_bytes(uri, parquet_bytes(table), settings)


def read_parquet(uri: str, settings: StorageSettings | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read a parquet file or a directory of parquet files."""
    fs, path = resolve(uri, settings)
    with storage_errors(uri, "read", settings):
        return pq.read_table(path, filesystem=fs, columns=columns)


def read_manifest(uri: str, fmt: str, settings: StorageSettings | None = None, *, missing: str) -> dict:
    """The JSON document at ``uri``, whose ``format`` must be ``fmt``; :class:`FeatureError`
    with ``missing`` when there is none, naming the file when its format differs."""
    if not exists(uri, settings):
        raise FeatureError(missing)
    data = json.loads(read_bytes(uri, settings))
    if data.get("format") != fmt:
        raise FeatureError(f"{uri}: format {data.get('format')!r}, expected {fmt!r}")
    return data


def _is_permanent(err: BaseException) -> bool:
    """Errors that retrying cannot fix: missing objects or buckets, paths that are not
    files (directories, S3 buckets or prefixes) or not valid paths, permission denied,
    rejected credentials, and full or read-only storage (ENOSPC / EROFS / EDQUOT).

    Looks at ``err`` and the errors it was raised from (a :class:`StorageError` wraps
    the filesystem's own error); anything else (connection refused, timeouts, 5xx,
    throttling) is transient."""
    import errno

    permanent_errnos = {
        errno.ENOENT,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.EACCES,
        errno.EPERM,
        errno.ENOSPC,
        errno.EROFS,
        errno.EDQUOT,
    }
    markers = (
        "rejected the credentials",
        "the bucket does not exist",
        "is a directory",
        "not a regular file",
        "nosuchbucket",
        "accessdenied",
        "signaturedoesnotmatch",
        "invalidaccesskeyid",
        "no space left on device",
        "read-only file system",
        "quota exceeded",
    )
    seen: BaseException | None = err
    for _ in range(8):  # err, its cause, the cause's cause...
        if seen is None:
            break
        if isinstance(
            seen,
            (
                FileNotFoundError,
                IsADirectoryError,
                NotADirectoryError,
                PermissionError,
                pa.ArrowInvalid,
                pa.ArrowTypeError,
                pa.ArrowNotImplementedError,
            ),
        ):
            return True
        if isinstance(seen, OSError) and seen.errno in permanent_errnos:
            return True
        text = str(seen).lower().replace("_", "")
        if any(m.replace("_", "") in text for m in markers):
            return True
        seen = seen.__cause__
    return False


_last_retry_note = 0.0


def _note_retry(what: str, err: BaseException, deadline_s: float, elapsed_s: float = 0.0) -> None:
    """Say (at most every 5 s per process) that storage calls are being retried."""
    global _last_retry_note
    if time.monotonic() - _last_retry_note > 5.0:
        _last_retry_note = time.monotonic()
        print(
            f"[storage] transient storage error, retrying ({elapsed_s:.0f}s of up to {deadline_s:.0f}s): {what}: {err}",
            file=sys.stderr,
            flush=True,
        )


def with_retries(op: Callable[[], T], what: str, deadline_s: float) -> T:
    """Run ``op`` (a storage call); retry transient failures (connection refused, timeouts,
    5xx) with backoff for ``deadline_s`` seconds, then raise :class:`StorageError`.

    Not retried, raised at once as a :class:`StorageError` naming ``what``:

    - full or read-only storage (errno ENOSPC, EROFS, EDQUOT, or their messages): the
      message says which, e.g. ``write /data/x.parquet: no space left on device (ENOSPC),
      not retried; ...``;
    - other permanent failures (missing object or bucket, a directory, a bad path,
      permission denied, rejected credentials): a :class:`StorageError` as it came (it
      already names the URI and the cause), anything else wrapped in one.
    """
    import errno

    full = {
        errno.ENOSPC: ("no space left on device", "ENOSPC", "free space or point the output elsewhere"),
        errno.EROFS: ("read-only file system", "EROFS", "make it writable or point the output elsewhere"),
        errno.EDQUOT: ("disk quota exceeded", "EDQUOT", "free space, raise the quota or point the output elsewhere"),
    }
    texts = {
        "no space left on device": errno.ENOSPC,
        "read-only file system": errno.EROFS,
        "quota exceeded": errno.EDQUOT,
    }
    start, delay = time.monotonic(), 0.25
    while True:
        try:
            return op()
        except (OSError, pa.ArrowException) as err:
            condition, seen = None, err
            for _ in range(8):  # err and the errors it was raised from
                if seen is None or condition is not None:
                    break
                if isinstance(seen, OSError) and seen.errno in full:
                    condition = seen.errno
                else:
                    condition = next((code for text, code in texts.items() if text in str(seen).lower()), None)
                seen = seen.__cause__
            if condition is not None:
                label, name, advice = full[condition]
                raise StorageError(f"{what}: {label} ({name}), not retried; {advice} ({err})") from err
            if _is_permanent(err):
                if isinstance(err, StorageError):
                    raise
                raise StorageError(f"{what}: {err}") from err
            elapsed = time.monotonic() - start
            if elapsed + delay > deadline_s:
                raise StorageError(f"{what}: gave up after {deadline_s:.0f}s of retries: {err}") from err
            _note_retry(what, err, deadline_s, elapsed)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def move(src: str, dst: str, settings: StorageSettings | None = None) -> None:
    """Rename one file (local: atomic rename; S3: server-side copy, then delete)."""
    fs, src_path = resolve(src, settings)
    _, dst_path = resolve(dst, settings)
    with storage_errors(src, "move", settings):
        if not is_s3(src):
            os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        fs.move(src_path, dst_path)
