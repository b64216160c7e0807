"""Small helpers shared by the benchmark scripts: result files, Markdown tables, the machine, timers.

Benchmark scripts run as `python benchmarks/<name>.py` from a checkout; `repo_root_on_path()` lets
them import the test corpus builders (`tests.zoo`), which are not part of the installed package.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxcompress.bench import BenchEnvironment, BenchReport, BenchRow
from onnxcompress.report import to_jsonable

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Where the scripts write their results unless told otherwise.
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results"
#: Result files are for everyone to read.
RESULT_MODE = 0o644


def repo_root_on_path() -> None:
    """Make `tests.zoo` importable when a script is run by path (its folder is sys.path[0] then)."""
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


# ------------------------------------------------------------------------------------------ timing


class Stopwatch:
    """Wall-clock seconds of named phases, in the order they ran."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def total(self) -> float:
        return time.perf_counter() - self.started


class CpuMonitor:
    """CPU time that other processes took while this one worked (Linux: /proc/stat; None elsewhere).

    share() = (all CPUs' busy time - this process's CPU time) / (wall time x logical CPUs): the
    fraction of the machine that was not ours to use while timing.
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float | None, float, float]:
        times = os.times()
        own = times.user + times.system + times.children_user + times.children_system
        return _busy_seconds(), own, time.perf_counter()

    def share(self) -> float | None:
        busy0, own0, wall0 = self.start
        busy1, own1, wall1 = self._sample()
        if busy0 is None or busy1 is None or wall1 <= wall0:
            return None
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / ((wall1 - wall0) * cpus)


def _busy_seconds() -> float | None:
    """Non-idle CPU seconds of all CPUs since boot (user, nice, system, irq, softirq, steal)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in fields[1:9]]
    busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7]  # idle and iowait left out
    return busy / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------- writing


def _atomic_write(path: Path, data: bytes) -> Path:
    """Write through a temporary file in the same folder, so a crash never leaves half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, RESULT_MODE)  # mkstemp makes owner-only files; results are for everyone to read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Dataclasses, numpy scalars and mappings as indented JSON (project conventions via to_jsonable)."""
    text = json.dumps(to_jsonable(data), indent=2, allow_nan=True) + "\n"
    return _atomic_write(Path(path), text.encode())


def write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic_write(Path(path), text.encode())


def write_results(out: Path, name: str, data: Any, text: str) -> str:
    """A benchmark's data as `<out>/<name>.json` and its rendering as `<out>/<name>.md`; returns the text."""
    write_json(out / f"{name}.json", data)
    write_text(out / f"{name}.md", text)
    return text


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool] | None = None) -> str:
    """A GitHub Markdown table; columns right-aligned where `right` says (default: all but the first)."""
    right = list(right) if right is not None else [i > 0 for i in range(len(headers))]
    rule = ["---:" if r else ":---" for r in right]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- the machine


def machine_line(env: BenchEnvironment) -> str:
    """One line: CPU, cores, flags of interest, ORT and its provider, threads and spinning."""
    flags = ", ".join(flag for flag, present in env.cpu_flags.items() if present) or "none of interest"
    return (
        f"{env.cpu} ({env.physical_cores} physical / {env.logical_cores} logical cores; flags: {flags}); "
        f"onnxruntime {env.onnxruntime} {', '.join(env.requested_providers)}, "
        f"intra-op threads {env.threads}, inter-op {env.inter_op_threads}, "
        f"allow_spinning={env.allow_spinning}, {env.graph_optimization}; python {env.python}, onnx {env.onnx}"
    )


# ------------------------------------------------------------------------------------ ORT kernels


@dataclass(frozen=True)
class KernelShare:
    """Profiled kernels of one op type in one benchmark row."""

    op: str
    kernels: int
    macs: int
    time_ms: float

    @property
    def gmacs_per_s(self) -> float | None:
        return self.macs / (self.time_ms * 1e-3) / 1e9 if self.macs and self.time_ms > 0 else None


def kernel_shares(row: BenchRow) -> dict[str, KernelShare]:
    """Per ORT kernel op type (Conv, ReorderInput, MaxPool, ...): kernel count, MACs and median time summed.

    Needs a row benchmarked with `profile=True`; empty otherwise.
    """
    totals: dict[str, list[float]] = {}
    for layer in row.layers:
        if layer.time_ms is None:
            continue  # absorbed nodes: their time is inside another kernel
        entry = totals.setdefault(layer.op_name, [0, 0, 0.0])
        entry[0] += 1
        entry[1] += layer.macs or 0
        entry[2] += layer.time_ms
    return {op: KernelShare(op, int(n), int(macs), ms) for op, (n, macs, ms) in totals.items()}


def report_without_layers(report: BenchReport) -> dict[str, Any]:
    """The report as JSON data with per-layer profiles left out of each row (they run to thousands of lines)."""
    data = report.to_dict()
    for row in data["rows"]:
        row["layers"] = f"{len(row['layers'])} profiled kernels (summarised per op type elsewhere)"
    return data


def fmt_ratio(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def fmt_percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def script_main(parse_args: Callable[[list[str] | None], Any], run: Callable[[Any], Any],
                argv: list[str] | None = None) -> int:
    """A benchmark script's entry point: a user error is one line on stderr and its exit code."""
    from onnxcompress.errors import OnnxCompressError

    args = parse_args(argv)
    try:
        run(args)
    except OnnxCompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    return 0
