"""What a process holds in memory, and where a buffer lives (Linux ``/proc``).

A training worker reports, per epoch, its peak resident set (``peak_rss_mb``), its
private memory now (``uss_mb``: pages only it maps) and its proportional share
(``pss_mb``: shared pages divided among the processes mapping them), plus where its item
vector tables live (:func:`residency`): in a shared file mapping (the Ray object store's
``/dev/shm/plasma…`` file, one copy per node) or in private memory (a copy per worker).
Outside Linux the figures are absent (empty dicts).
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterable
from dataclasses import dataclass

MB = 2**20


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/self/maps``: ``[start, end)`` mapped from ``path`` at ``offset``."""

    start: int
    end: int
    shared: bool  # 's' in the permissions: a MAP_SHARED mapping
    offset: int
    inode: int
    path: str

    def file_offset(self, address: int) -> int:
        """Offset in the backing file of ``address`` (inside this mapping)."""
        return address - self.start + self.offset


def mappings() -> list[Mapping]:
    """The memory mappings of this process (empty outside Linux)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        path = parts[5] if len(parts) > 5 else ""
        out.append(Mapping(lo, hi, parts[1][3] == "s", int(parts[2], 16), int(parts[4]), path))
    return out


def home(address: int, maps: list[Mapping] | None = None) -> Mapping | None:
    """The mapping that holds ``address`` (None if none does, or outside Linux)."""
    for m in maps if maps is not None else mappings():
        if m.start <= address < m.end:
            return m
    return None


def residency(buffers: Iterable[tuple[int, int]]) -> dict[str, float]:
    """Where buffers (``(address, nbytes)``, e.g. a tensor's ``data_ptr()`` and size) live:
    ``shared_mb`` in shared file mappings (``/dev/shm``: the Ray object store),
    ``private_mb`` elsewhere (this process's own copy), and ``shm_inode`` /
    ``shm_offset`` of the first shared one (the same in every process that maps the same
    buffer: the node's one copy). Empty outside Linux."""
    maps = mappings()
    if not maps:
        return {}
    shared = private = 0
    first: tuple[int, int] | None = None
    for address, nbytes in buffers:
        m = home(address, maps)
        if m is not None and m.shared and m.path.startswith("/dev/shm/"):
            shared += nbytes
            if first is None:
                first = (m.inode, m.file_offset(address))
        else:
            private += nbytes
    out = {"shared_mb": shared / MB, "private_mb": private / MB}
    if first is not None:
        out.update(shm_inode=float(first[0]), shm_offset=float(first[1]))
    return out


def peak_rss_mb() -> float:
    """The peak resident set of this process so far, in MiB: ``VmHWM`` of
    ``/proc/self/status`` (reset by ``exec``; ``getrusage``'s ``ru_maxrss`` is not on
    Linux: a child keeps its parent's peak at the fork), else ``getrusage``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (MB if sys.platform == "darwin" else 1024)


def usage_mb() -> dict[str, float]:
    """``rss_mb``, ``pss_mb`` and ``uss_mb`` (private clean + dirty) of this process now,
    from ``/proc/self/smaps_rollup``; empty outside Linux."""
    try:
        with open(f"/proc/{os.getpid()}/smaps_rollup") as f:
            fields = {
                k: int(v.split()[0])
                for k, v in (line.split(":", 1) for line in f.read().splitlines()[1:] if ":" in line)
            }
    except OSError:
        return {}
    kb = 1024 / MB
    return {
        "rss_mb": fields.get("Rss", 0) * kb,
        "pss_mb": fields.get("Pss", 0) * kb,
        "uss_mb": (fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)) * kb,
    }


def worker_report(tables: Iterable[object]) -> dict[str, float]:
    """This process's memory (:func:`peak_rss_mb`, :func:`usage_mb`) and where its item
    tables (torch tensors or numpy arrays) live: ``items_shared_mb`` / ``items_private_mb``
    / ``items_shm_*`` (:func:`residency`) for CPU ones, ``items_device_mb`` for tensors on
    an accelerator."""
    cpu, device = [], 0
    for t in tables:
        if hasattr(t, "__array_interface__"):  # numpy
            cpu.append((int(t.__array_interface__["data"][0]), int(t.nbytes)))  # type: ignore[attr-defined]
            continue
        nbytes = int(t.numel()) * int(t.element_size())  # type: ignore[attr-defined]
        if t.device.type == "cpu":  # type: ignore[attr-defined]
            cpu.append((int(t.data_ptr()), nbytes))  # type: ignore[attr-defined]
        else:
            device += nbytes
    out = {"peak_rss_mb": peak_rss_mb(), **usage_mb()}
    out.update({f"items_{k}": v for k, v in residency(cpu).items()})
    if device:
        out["items_device_mb"] = device / MB
    return out


def gather_reports(tables: Iterable[object], rank: int, world: int) -> dict[str, float]:
    """Every worker's :func:`worker_report` of its item ``tables``, gathered with
    ``torch.distributed`` when ``world > 1``: on rank 0 as ``mem.w<rank>.<name>``, empty elsewhere."""
    import torch.distributed as dist

    mine = worker_report(tables)
    every: list[object] = [None] * world
    if world > 1:
        dist.all_gather_object(every, mine)
    else:
        every = [mine]
    return {f"mem.w{r}.{k}": float(v) for r, m in enumerate(every) for k, v in m.items()} if rank == 0 else {}


def memory_line(worker: str, metrics: dict[str, float]) -> str:
    """One worker's memory (``mem.<worker>.*`` of :func:`gather_reports`) as a console phrase."""

    def get(k: str) -> float:
        return metrics.get(f"mem.{worker}.{k}", float("nan"))

    where = f"tables {get('items_shared_mb'):.0f} MiB shared / {get('items_private_mb'):.0f} MiB private"
    if f"mem.{worker}.items_device_mb" in metrics:
        where = f"tables {get('items_device_mb'):.0f} MiB on the device"
    return f"{worker} peak RSS {get('peak_rss_mb'):.0f} MiB, USS {get('uss_mb'):.0f} MiB, {where}"
