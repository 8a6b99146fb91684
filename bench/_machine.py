"""The machine a benchmark ran on, printed beside its figures.

    from _machine import machine_info, print_machine   # inside bench/ scripts
    print_machine()     # one block: date, CPU model, cores, RAM, load, python, torch, ray

Imported by every script in bench/ (they put bench/ on sys.path by running from it).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from importlib import metadata
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    """Date (UTC), CPU model, logical CPUs (and those this process may use), RAM, load
    average, Python, torch (+ its threads and CUDA), ray, deepctr-torch versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "ram_gib": _ram_gib(),
        "load_avg": tuple(round(x, 2) for x in os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "torch": _version("torch"),
        "ray": _version("ray"),
        "deepctr_torch": _version("deepctr-torch"),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:
        pass
    return info


def machine_line() -> str:
    """:func:`machine_info` as one line."""
    i = machine_info()
    return (
        f"{i['date']}; {i['cpu']}, {i['cpus']} CPUs ({i['cpus_usable']} usable), {i['ram_gib']} GiB RAM, "
        f"load avg {i['load_avg']}; {i['platform']}; python {i['python']}, torch {i['torch']} "
        f"({i.get('torch_threads')} threads, GPU {i.get('cuda')}), ray {i['ray']}, deepctr-torch {i['deepctr_torch']}"
    )


def print_machine(command: list[str] | None = None) -> None:
    """Print the machine and the command line (default: this process's)."""
    print(f"machine: {machine_line()}")
    argv = command if command is not None else [os.path.basename(sys.executable), *sys.argv]
    print(f"command: {' '.join(argv)}", flush=True)
