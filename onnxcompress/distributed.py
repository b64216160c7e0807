"""Calibration statistics on Ray (the `ray` extra): shards of the calibration batches reduced on
Ray workers and merged, bit-identical to the in-process run.

How it stays identical: the driver runs the first batch itself (`streaming.Fetcher.probe`, which
also sizes the runs), so every shard starts on a batch boundary of the in-process run and its
workers run the very same batches through ORT. Histograms merge exactly in any order; channel sums
are float sums, so shards keep each batch's sums and the merge adds them in sample order
(`activations.ChannelStats.deferred`). Shards are the blocks of a Ray Data dataset; a worker that
dies is retried by Ray (`max_retries`), and a retried shard gives the same result.

`connect` is also how `optimize-many` reaches Ray (fleet.py). Importing this module does not import
Ray; a missing Ray is a one-line error naming the extra.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx_ir as ir

from .calibration import Calibration
from .errors import OnnxCompressError

#: What to install when Ray is missing.
INSTALL_HINT = "pip install onnxcompress[ray]"
#: Retries of a shard whose worker died (Ray's own default for Ray Data tasks is unbounded).
MAX_RETRIES = 3
#: Seconds a cluster address has to answer before Ray is asked to join it.
CONNECT_TIMEOUT_S = 5
#: protobuf's limit: the model goes to the workers serialized.
MAX_MODEL_BYTES = 2**31 - 1


class RayUnavailableError(OnnxCompressError):
    """Ray is not installed, or the cluster asked for cannot be reached."""


def require_ray() -> Any:
    """The `ray` module, or a one-line error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (the `data` part of the extra)
    except ImportError:
        raise RayUnavailableError(f"Ray is not installed: {INSTALL_HINT}") from None
    return ray


def connect(address: str | None = None, workers: int | None = None) -> Any:
    """Ray, initialised once per process: the cluster at `address` ("auto": the one this machine
    runs), or a local Ray with `workers` CPUs (default: all) when `address` is None or "local"."""
    ray = require_ray()
    if not ray.is_initialized():
        _start(ray, address, workers)
    _quiet_data(ray)
    return ray


def _start(ray: Any, address: str | None, workers: int | None) -> None:
    local = address in (None, "local")
    if not local and address != "auto":
        _check_reachable(address)
    # Workers of a local Ray import the same onnxcompress as this process (a source checkout too).
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    try:
        ray.init(address=None if local else address, num_cpus=workers if local else None, include_dashboard=False,
                 logging_level=logging.ERROR, runtime_env={"env_vars": {"PYTHONPATH": path}} if local else None)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailableError(f"cannot start or reach Ray at {address or 'local'}: {_first_line(exc)}") from None


def _check_reachable(address: str) -> None:
    """HOST:PORT (or ray://HOST:PORT) answers a TCP connection: ray.init would otherwise retry for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except ValueError:
        raise RayUnavailableError(f"--ray {address}: expected local, auto, HOST:PORT or ray://HOST:PORT") from None
    except OSError as exc:
        raise RayUnavailableError(f"cannot reach Ray at {address}: {exc.strerror or exc}") from None


def cpus(ray: Any) -> int:
    """CPUs of the Ray cluster (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


@dataclass(frozen=True)
class RayEngine:
    """A `Calibration.engine`: `streaming.reduce_values` runs on Ray workers, one shard of the
    batches each. `workers` shards (default: the cluster's CPUs); ORT runs `threads` threads in each."""

    address: str | None = None
    workers: int | None = None
    max_retries: int = MAX_RETRIES
    threads: int = 1

    def reduce(self, model: ir.Model, names: Sequence[str], calibration: Calibration, reducer, *,
               batch_size: int = 16, limit: int | None = None):
        from .analysis.streaming import FETCH_BUDGET_BYTES, Fetcher, opening

        total = calibration.num_samples if limit is None else min(limit, calibration.num_samples)
        first = opening(model, calibration, total)
        if first is None:
            return reducer
        template = reducer.fresh()
        fetcher = Fetcher(model, names)
        for count, values, mask in fetcher.probe(first):  # the first batch here: it sizes the runs
            reducer.add(count, values, mask)
        start = len(next(iter(first.values())))
        plan = fetcher.plan(start, batch_size, FETCH_BUDGET_BYTES)
        ray = connect(self.address, self.workers)
        bounds = shard_bounds(start, total, plan.batch, self.workers or cpus(ray))
        for part in self._shards(ray, model, names, calibration, plan, template, bounds):
            reducer = reducer.merge(part)
        return reducer

    def _shards(self, ray: Any, model: ir.Model, names: Sequence[str], calibration: Calibration, plan,
                template, bounds: list[tuple[int, int]]) -> list:
        """Each shard's reducer, in sample order, from one Ray Data job (a block per shard)."""
        if not bounds:
            return []
        from .model import to_proto

        blob = to_proto(model, with_data=True).SerializeToString()
        if len(blob) > MAX_MODEL_BYTES:
            raise RayUnavailableError("models over 2 GiB cannot be sent to Ray workers yet: calibrate without --ray")
        rows = [{"shard": i, "data": pickle.dumps(replace(calibration.samples(a, b), engine=None))}
                for i, (a, b) in enumerate(bounds)]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        with warnings.catch_warnings():
            # max_retries has no named parameter in Ray Data's map yet; Ray Data's own default is unbounded.
            warnings.simplefilter("ignore", DeprecationWarning)
            mapped = dataset.map(_reduce_shard, fn_kwargs={"model": blob, "names": list(names), "plan": plan,
                                                           "template": template, "threads": self.threads},
                                 compute=ray.data.TaskPoolStrategy(size=len(rows)), num_cpus=self.threads,
                                 max_retries=self.max_retries)
            try:
                done = mapped.take_all()
            except ray.exceptions.RayError as exc:
                if isinstance(exc, ray.exceptions.RayTaskError):
                    raise  # the shard's own code failed: not a worker lost, and retrying would not help
                raise RayUnavailableError(f"Ray calibration shards failed after {self.max_retries} retries: "
                                          f"{_first_line(exc)}") from None
        return [pickle.loads(r["state"]) for r in sorted(done, key=lambda r: r["shard"])]


def shard_bounds(start: int, stop: int, batch: int, shards: int) -> list[tuple[int, int]]:
    """Samples `start` .. `stop` cut into up to `shards` contiguous parts on multiples of `batch`."""
    batches = -(-(stop - start) // batch) if stop > start else 0
    shards = min(shards, batches)
    cuts = [start + min(stop - start, (i * batches // shards) * batch) for i in range(shards + 1)] if shards else []
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _reduce_shard(row: dict, *, model: bytes, names: list[str], plan, template, threads: int) -> dict:
    """On a worker: one shard's batches through ORT into a fresh reducer."""
    import onnx

    from .analysis.streaming import Fetcher
    from .model import load

    calibration = pickle.loads(row["data"])
    part = template.fresh()
    for count, values, mask in Fetcher(load(onnx.load_from_string(model)), names, threads=threads).stream(calibration, plan):
        part.add(count, values, mask)
    return {"shard": row["shard"], "state": pickle.dumps(part)}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _quiet_data(ray: Any) -> None:
    """No progress bars or per-dataset log lines: the run's own progress goes to stderr."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if hasattr(context, "print_on_execution_start"):
        context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


__all__ = ["INSTALL_HINT", "MAX_RETRIES", "RayEngine", "RayUnavailableError", "connect", "cpus", "require_ray",
           "shard_bounds"]
