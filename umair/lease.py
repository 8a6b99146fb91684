"""One writer per output: a lease object taken before a job touches the output.

``OUTPUT/_lease.json`` names its holder (run id, host, pid, start, last heartbeat). It is
created only if absent, renewed and released only by compare-and-swap on the version
the holder last wrote, so two runs can never both believe they hold it:

- on S3 (or any S3-compatible store that checks preconditions): ``PUT If-None-Match: *``
  to create, ``PUT If-Match: <etag>`` to renew or take over, ``DELETE If-Match`` to release;
- on a local path: the same three operations under an exclusive ``flock`` of
  ``OUTPUT/_lease.lock`` (local outputs are on one host), versions being content hashes.

A lease is stale when its heartbeat is older than ``stale_after_s``, when its holder ran
on this host and its process is gone, or when its holder is this very process and no
longer holds it (a run that failed while the store was down and could not delete its
lease); a new run may then take it over (still by compare-and-swap: of two runs racing
for a stale lease, one wins). While a run holds the lease, a daemon thread renews it
every ``heartbeat_s`` seconds, whatever the run is doing; a renewal the store cannot take
(it is down) is retried at the next beat. :meth:`Lease.check` (called before every
commit) raises :class:`LeaseLost` when the stored lease is no longer this run's, or when
no renewal got through for ``stale_after_s / 2`` (another run may soon take it over).
Releasing deletes the lease by compare-and-swap too, so it is always safe to try.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from umair import storage
from umair.errors import JobFailed

LEASE = "_lease.json"

# run ids of the leases this process holds now (a lease naming this process and not in
# here was left behind by one of its earlier runs)
_HELD: set[str] = set()


class LeaseHeld(JobFailed):
    """Another live run holds the output's lease."""


class LeaseLost(JobFailed):
    """This run's lease was taken over or could not be renewed; it must not commit."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease."""

    run_id: str
    host: str
    pid: int
    started_at: str
    heartbeat_at: str

    def describe(self) -> str:
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, started {self.started_at}, last heartbeat {self.heartbeat_at})"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists on this host and is not a zombie."""
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


def is_stale(holder: Holder, stale_after_s: float) -> bool:
    """The holder ran on this host and its process is gone (or is this process, which no
    longer holds it), or its heartbeat is too old."""
    if holder.host == socket.gethostname():
        if holder.pid == os.getpid() and holder.run_id not in _HELD:
            return True
        if not pid_alive(holder.pid):
            return True
    beat = datetime.fromisoformat(holder.heartbeat_at)
    return (datetime.now(UTC) - beat).total_seconds() > stale_after_s


class _Store(ABC):
    """Create / read / compare-and-swap / delete of one small JSON object."""

    def __init__(self, uri: str, settings: storage.StorageSettings | None):
        self.uri, self.settings = uri, settings

    @abstractmethod
    def read(self) -> tuple[dict[str, Any], str] | None:
        """The object and its version, or None when there is none."""

    @abstractmethod
    def create(self, data: dict[str, Any]) -> str | None:
        """The new version, or None when the object exists already."""

    @abstractmethod
    def swap(self, data: dict[str, Any], version: str) -> str | None:
        """Replace the object if it is still at ``version``; the new version, or None."""

    @abstractmethod
    def delete(self, version: str) -> bool:
        """Delete the object if it is still at ``version``; False otherwise."""


def _body(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode()


class _LocalStore(_Store):
    def __init__(self, uri: str, settings: storage.StorageSettings | None):
        super().__init__(uri, settings)
        os.makedirs(os.path.dirname(uri), exist_ok=True)
        self.lock_path = os.path.join(os.path.dirname(uri), "_lease.lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read(self) -> tuple[dict[str, Any], str] | None:
        try:
            with open(self.uri, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        return json.loads(raw), hashlib.sha256(raw).hexdigest()

    def _write(self, data: dict[str, Any]) -> str:
        raw = _body(data)
        tmp = f"{self.uri}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.uri)
        return hashlib.sha256(raw).hexdigest()

    def read(self) -> tuple[dict[str, Any], str] | None:
        with self._locked():
            return self._read()

    def create(self, data: dict[str, Any]) -> str | None:
        with self._locked():
            return None if os.path.exists(self.uri) else self._write(data)

    def swap(self, data: dict[str, Any], version: str) -> str | None:
        with self._locked():
            current = self._read()
            return self._write(data) if current is not None and current[1] == version else None

    def delete(self, version: str) -> bool:
        with self._locked():
            current = self._read()
            if current is None or current[1] != version:
                return False
            os.remove(self.uri)
            return True


class _S3Store(_Store):
    def __init__(self, uri: str, settings: storage.StorageSettings | None):
        import boto3
        from botocore.config import Config

        super().__init__(uri, settings)
        s = (settings or storage.StorageSettings()).merged_with_env()
        self.bucket, _, self.key = uri[len("s3://") :].partition("/")
        self.client = boto3.client(
            "s3",
            endpoint_url=s.endpoint if s.endpoint is None or "://" in s.endpoint else f"https://{s.endpoint}",
            region_name=s.region or "us-east-1",
            config=Config(retries={"max_attempts": s.retries, "mode": "standard"}, connect_timeout=s.connect_timeout_s),
        )

    @staticmethod
    def _refused(err: Exception) -> bool:
        code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    def read(self) -> tuple[dict[str, Any], str] | None:
        from botocore.exceptions import ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise storage.StorageError(f"read {self.uri}: {err}") from err
        return json.loads(got["Body"].read()), got["ETag"]

    def _put(self, data: dict[str, Any], **condition: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=_body(data), **condition)["ETag"]
        except ClientError as err:
            if self._refused(err):
                return None
            raise storage.StorageError(f"write {self.uri}: {err}") from err

    def create(self, data: dict[str, Any]) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def swap(self, data: dict[str, Any], version: str) -> str | None:
        return self._put(data, IfMatch=version)

    def delete(self, version: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)
            return True
        except ClientError as err:
            if self._refused(err):
                return False
            raise storage.StorageError(f"delete {self.uri}: {err}") from err


class Lease:
    """A held lease on ``output`` (see the module docstring). Use :meth:`acquire`."""

    def __init__(self, store: _Store, holder: Holder, version: str, heartbeat_s: float, stale_after_s: float):
        self.store, self.holder, self.version = store, holder, version
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._lost: str | None = None
        self._renewed = time.monotonic()  # the last heartbeat the store took
        self._renew_error: str | None = None  # why the latest renewal did not get through
        _HELD.add(holder.run_id)
        self._stop = threading.Event()
        self._guard = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat-{holder.run_id}", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(
        cls,
        output: str,
        run_id: str,
        settings: storage.StorageSettings | None = None,
        stale_after_s: float = 1800.0,
        heartbeat_s: float = 30.0,
    ) -> Lease:
        """Take the lease of ``output`` for ``run_id``, taking over a stale one; raises
        :class:`LeaseHeld` naming the live holder otherwise."""
        uri = storage.join(output, LEASE)
        store: _Store = _S3Store(uri, settings) if storage.is_s3(uri) else _LocalStore(uri, settings)
        now = _now()
        me = Holder(run_id, socket.gethostname(), os.getpid(), now, now)
        for _ in range(5):
            version = store.create(asdict(me))
            if version is not None:
                return cls(store, me, version, heartbeat_s, stale_after_s)
            current = store.read()
            if current is None:
                continue  # released meanwhile: try to create again
            data, seen = current
            holder = Holder(**{k: data[k] for k in Holder.__dataclass_fields__})
            if not is_stale(holder, stale_after_s):
                raise LeaseHeld(
                    f"{output}: {holder.describe()} is writing here; one writer per output at a time. If it is dead, "
                    f"rerun after stale_after_s={stale_after_s:.0f}s from that heartbeat, or delete {uri}."
                )
            version = store.swap(asdict(me), seen)
            if version is not None:
                return cls(store, me, version, heartbeat_s, stale_after_s)
        raise LeaseHeld(f"{output}: could not take the lease {uri}: other runs keep changing it")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.renew()

    def renew(self) -> None:
        """Write a fresh heartbeat (compare-and-swap). A refused swap (the object changed)
        loses the lease; a store that cannot be reached is tried again at the next beat."""
        with self._guard:
            if self._lost is not None or self._stop.is_set():
                return
            beat = Holder(**{**asdict(self.holder), "heartbeat_at": _now()})
            try:
                version = self.store.swap(asdict(beat), self.version)
            except Exception as err:  # noqa: BLE001 - transient: retried at the next beat, judged in check()
                self._renew_error = f"{type(err).__name__}: {err}"
                return
            if version is None:
                self._lost = "the lease object changed: another run took it over"
            else:
                self.holder, self.version = beat, version
                self._renewed, self._renew_error = time.monotonic(), None

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this run still holds the lease (before every commit)."""
        silent = time.monotonic() - self._renewed
        if self._lost is None and silent > self.stale_after_s / 2:
            self.renew()  # the beats have not got through for a while: one more try, now
            silent = time.monotonic() - self._renewed
            if self._lost is None and silent > self.stale_after_s / 2:
                self._lost = f"no heartbeat got through for {silent:.0f}s: {self._renew_error}"
        if self._lost is None:
            current = self.store.read()
            if current is None or current[1] != self.version:
                owner = (
                    Holder(**{k: current[0][k] for k in Holder.__dataclass_fields__}).describe()
                    if current
                    else "nobody"
                )
                self._lost = f"the lease is now held by {owner}"
        if self._lost is not None:
            raise LeaseLost(
                f"{self.store.uri}: run {self.holder.run_id} lost its lease ({self._lost}); it stops before "
                "committing anything more. What it committed is kept; run the job again to resume."
            )

    def release(self, attempts: int = 3) -> None:
        """Stop the heartbeat and delete the lease if it is still this run's (a delete on
        the version this run last wrote: never someone else's). A store that cannot be
        reached is tried ``attempts`` times; a lease left behind then is stale at once for
        a rerun in this process or, from elsewhere, once its heartbeat is old."""
        self._stop.set()
        self._thread.join(timeout=self.heartbeat_s + 5)
        with self._guard:
            _HELD.discard(self.holder.run_id)
            for attempt in range(attempts):
                try:
                    self.store.delete(self.version)
                    return
                except Exception:  # noqa: BLE001 - the store is down: wait a little and try again
                    if attempt + 1 < attempts:
                        time.sleep(2.0**attempt)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
