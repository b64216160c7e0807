"""The machine: physical and logical cores this process may use, CPU model and the flags that decide
which int8/fp32 kernels ONNX Runtime can pick. Recorded with every latency (bench/environment.py) and
used to size thread pools (analysis/layer_timing.py)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: CPU features that decide which int8/fp32 kernels ORT can use.
CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if allowed is not None:
        cores = set()
        for cpu in allowed:
            topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            try:
                cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
            except OSError:
                return len(allowed)
        return len(cores)
    return os.cpu_count() or 1


def logical_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_description() -> tuple[str, dict[str, bool]]:
    """CPU model name and the flags of interest (from /proc/cpuinfo on Linux; name only elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine() or "unknown", {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    name = fields.get("model name") or fields.get("Hardware") or platform.processor() or platform.machine()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return name or "unknown", {flag: flag in flags for flag in CPU_FLAGS_OF_INTEREST} if flags else {}
