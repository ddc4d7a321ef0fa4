"""What the node has and uses: CPU, RAM, disks, GPUs, and a process tree's resident memory.

The parsers are pure (text in, numbers out) so they are tested on fixtures;
:func:`collect` does the reading, and blocks (files, ``nvidia-smi``): the agent
calls it in a thread. Sizes are bytes; GPU utilisation is a percentage as
``nvidia-smi`` gives it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterable

from .config import Thresholds

NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=name,memory.total,memory.used,utilization.gpu",
                    "--format=csv,noheader,nounits"]  # fmt: skip
_MIB = 1024 * 1024
_SMI_TIMEOUT = 10.0


def parse_meminfo(text: str) -> tuple[int, int]:
    """(total, used) bytes from /proc/meminfo; used is what is not available (MemAvailable), as `free` says."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) * 1024  # the kernel's "kB" is KiB
    total = values.get("MemTotal", 0)
    available = values.get("MemAvailable", values.get("MemFree", 0))
    return total, max(0, total - available)


def parse_loadavg(text: str) -> float:
    return float(text.split()[0])


def _number(raw: str) -> float | None:
    raw = raw.strip()
    try:
        return float(raw)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def parse_nvidia_smi(text: str) -> list[dict]:
    """One dict per GPU from ``--query-gpu=name,memory.total,memory.used,utilization.gpu`` csv output."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        # The name may hold commas ("NVIDIA H100 80GB HBM3, PCIe"): the three numbers are the last fields.
        fields = line.rsplit(",", 3)
        if len(fields) != 4:
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        name, total, used, util = fields
        total_mib, used_mib = _number(total), _number(used)
        gpus.append({
            "name": name.strip(),
            "memory_total_bytes": None if total_mib is None else int(total_mib * _MIB),
            "memory_used_bytes": None if used_mib is None else int(used_mib * _MIB),
            "utilization": _number(util),
        })  # fmt: skip
    return gpus


def read_gpus(run: Callable[[list[str]], str] | None = None) -> tuple[list[dict], str | None]:
    """GPUs from nvidia-smi, and why there are none ("no GPU": no nvidia-smi on PATH)."""
    if run is None:
        if shutil.which("nvidia-smi") is None:
            return [], "no GPU (nvidia-smi not found)"
        run = _run_smi
    try:
        return parse_nvidia_smi(run(NVIDIA_SMI_QUERY)), None
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return [], f"nvidia-smi failed: {exc}"


def _run_smi(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=_SMI_TIMEOUT, check=True)
    return done.stdout


def disks(paths: Iterable[str]) -> list[dict]:
    out, seen = [], set()
    for path in paths:
        if path in seen:
            continue
        seen.add(path)
        usage = shutil.disk_usage(path)
        out.append({"path": path, "total_bytes": usage.total, "free_bytes": usage.free})
    return out


def tree_rss(pid: int, proc: str = "/proc") -> int:
    """Resident bytes of ``pid`` and every process in its process group (a runtime's workers too)."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        entries = os.listdir(proc)
    except OSError:
        return 0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # Fields after the command (which may hold spaces and parentheses): state ppid pgrp ...; rss is 24th.
        rest = stat.rpartition(")")[2].split()
        if len(rest) > 21 and (int(entry) == pid or int(rest[2]) == pid):
            total += int(rest[21]) * page
    return total


def collect(paths: Iterable[str], smi: Callable[[list[str]], str] | None = None, proc: str = "/proc") -> dict:
    """The ``hardware`` object of GET /admin/nodes/{name}. Blocking."""
    with open(f"{proc}/meminfo", encoding="ascii") as f:
        total, used = parse_meminfo(f.read())
    with open(f"{proc}/loadavg", encoding="ascii") as f:
        load = parse_loadavg(f.read())
    gpus, gpu_note = read_gpus(smi)
    return {
        "cpu_count": os.cpu_count() or 0,
        "load_1m": load,
        "memory_total_bytes": total,
        "memory_used_bytes": used,
        "disks": disks(paths),
        "gpus": gpus,
        "gpu_note": gpu_note,
    }


def gpu_memory_gb(hardware: dict) -> float | None:
    """The largest GPU's memory in GB (10^9 bytes), the figure distribution.tiers compares; None without a GPU."""
    sizes = [g["memory_total_bytes"] for g in hardware.get("gpus", []) if g.get("memory_total_bytes")]
    return round(max(sizes) / 1e9, 1) if sizes else None


def _share(used: float, total: float) -> float:
    return round(100.0 * used / total, 1) if total else 0.0


def alerts(hardware: dict, thresholds: Thresholds, runtime: dict | None = None) -> list[dict]:
    """One alert per figure above its threshold (percent), and for a runtime that is not running."""
    out = []
    ram = _share(hardware["memory_used_bytes"], hardware["memory_total_bytes"])
    if ram > thresholds.memory_percent:
        out.append({"kind": "memory", "message": f"RAM {ram:g}% used (threshold {thresholds.memory_percent:g}%)",
                    "value": ram, "threshold": thresholds.memory_percent})  # fmt: skip
    for i, gpu in enumerate(hardware.get("gpus", [])):
        if not gpu.get("memory_total_bytes") or gpu.get("memory_used_bytes") is None:
            continue
        vram = _share(gpu["memory_used_bytes"], gpu["memory_total_bytes"])
        if vram > thresholds.gpu_memory_percent:
            out.append({"kind": "gpu_memory",
                        "message": f"GPU {i} ({gpu['name']}) memory {vram:g}% used "
                                   f"(threshold {thresholds.gpu_memory_percent:g}%)",
                        "value": vram, "threshold": thresholds.gpu_memory_percent})  # fmt: skip
    for disk in hardware.get("disks", []):
        used = _share(disk["total_bytes"] - disk["free_bytes"], disk["total_bytes"])
        if used > thresholds.disk_percent:
            out.append({"kind": "disk", "message": f"disk {disk['path']} {used:g}% used "
                                                   f"(threshold {thresholds.disk_percent:g}%)",
                        "value": used, "threshold": thresholds.disk_percent})  # fmt: skip
    if runtime is not None and runtime.get("state") not in ("running", None):
        out.append({"kind": "runtime", "message": f"runtime {runtime.get('kind')} is {runtime['state']}",
                    "value": runtime.get("restarts", 0), "threshold": None})  # fmt: skip
    return out
