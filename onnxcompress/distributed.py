"""Calibration statistics on Ray (the `ray` extra): shards of the calibration batches reduced on
Ray workers and merged, bit-identical to the in-process run.

How it stays identical: the driver runs the first batch itself (`streaming.Fetcher.probe`, which
also sizes the runs), so every shard starts on a batch boundary of the in-process run and its
workers run the very same batches through ORT. Histograms merge exactly in any order; channel sums
are float sums, so shards keep each batch's sums and the merge adds them in sample order
(`activations.ChannelStats.deferred`). Shards are the blocks of a Ray Data dataset; a worker that
dies is retried by Ray (`max_retries`), and a retried shard gives the same result.

The model goes to the workers serialized, or by path when it has external data or is over
protobuf's 2 GiB: saved once with external data in a folder every worker reads (a temporary one on a
local Ray; on a cluster, `RayEngine.shared_dir`, or a one-line error saying why not). A reducer
without `merge` and `fresh` cannot be cut into shards: it runs in this process, with the reason logged.

`connect` is also how `optimize-many` reaches Ray (fleet.py). Importing this module does not import
Ray; a missing Ray is a one-line error naming the extra.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import tempfile
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
#: protobuf's limit: a larger model goes to the workers by path.
MAX_MODEL_BYTES = 2**31 - 1

_log = logging.getLogger(__name__)


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
    batches each. `workers` shards (default: the cluster's CPUs); ORT runs `threads` threads in each.
    `shared_dir`: a folder every worker can read, where a model that goes by path is saved (default:
    a temporary folder, which only the workers of a local Ray are sure to see)."""

    address: str | None = None
    workers: int | None = None
    max_retries: int = MAX_RETRIES
    threads: int = 1
    shared_dir: str | None = None

    def reduce(self, model: ir.Model, names: Sequence[str], calibration: Calibration, reducer, *,
               batch_size: int = 16, limit: int | None = None):
        from .analysis.streaming import FETCH_BUDGET_BYTES, Fetcher, opening, reduce_values

        if (reason := unmergeable(reducer)) is not None:
            _log.warning("%s is reduced in this process, not on Ray: %s", type(reducer).__name__, reason)
            here = replace(calibration, engine=None)
            return reduce_values(model, names, here, reducer, batch_size=batch_size, limit=limit)
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
        for part in self._shards(ray, fetcher.model, names, calibration, plan, template, bounds):
            reducer = reducer.merge(part)
        return reducer

    def _shards(self, ray: Any, model: ir.Model, names: Sequence[str], calibration: Calibration, plan,
                template, bounds: list[tuple[int, int]]) -> list:
        """Each shard's reducer, in sample order, from one Ray Data job (a block per shard); `model`
        already outputs every fetched value."""
        if not bounds:
            return []
        rows = [{"shard": i, "data": pickle.dumps(replace(calibration.samples(a, b), engine=None))}
                for i, (a, b) in enumerate(bounds)]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        with warnings.catch_warnings(), self._shipped(model) as shipped:
            # max_retries has no named parameter in Ray Data's map yet; Ray Data's own default is unbounded.
            warnings.simplefilter("ignore", DeprecationWarning)
            mapped = dataset.map(_reduce_shard, fn_kwargs={**shipped, "names": list(names), "plan": plan,
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

    @contextlib.contextmanager
    def _shipped(self, model: ir.Model):
        """How `model` reaches the workers: {"model": its bytes, "path": None}, or, with external data
        or over protobuf's 2 GiB, {"model": None, "path": a file saved with external data}, kept while
        the shards run. By path without `shared_dir` on a local Ray only, whose workers see our files."""
        from .model import needs_file, save, to_proto

        if not needs_file(model):
            blob = to_proto(model).SerializeToString()
            if len(blob) <= MAX_MODEL_BYTES:
                yield {"model": blob, "path": None}
                return
        if self.shared_dir is None and self.address not in (None, "local"):
            raise RayUnavailableError(
                f"the model has external data or over 2 GiB, so Ray workers must read it from a file, and those "
                f"of the cluster at {self.address} may not see this machine's: give RayEngine a shared_dir, "
                "or calibrate without --ray")
        with tempfile.TemporaryDirectory(prefix="onnxcompress-ray-", dir=self.shared_dir) as folder:
            yield {"model": None, "path": str(save(model, Path(folder) / "model.onnx", external_data=True))}


def unmergeable(reducer) -> str | None:
    """Why `reducer` cannot be cut into shards (None if it can): shards need `fresh` for their empty
    reducers and `merge` to put their results back together in sample order."""
    missing = [m for m in ("merge", "fresh") if not callable(getattr(reducer, m, None))]
    return f"it has no {' or '.join(missing)}, so shard results could not be merged" if missing else None


def shard_bounds(start: int, stop: int, batch: int, shards: int) -> list[tuple[int, int]]:
    """Samples `start` .. `stop` cut into up to `shards` contiguous parts on multiples of `batch`."""
    batches = -(-(stop - start) // batch) if stop > start else 0
    shards = min(shards, batches)
    cuts = [start + min(stop - start, (i * batches // shards) * batch) for i in range(shards + 1)] if shards else []
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _reduce_shard(row: dict, *, model: bytes | None, path: str | None, names: list[str], plan, template,
                  threads: int) -> dict:
    """On a worker: one shard's batches through ORT into a fresh reducer; the model from its bytes or,
    when it came by path, run from that file (it already outputs every fetched value)."""
    import onnx

    from .analysis.streaming import Fetcher
    from .model import load

    calibration = pickle.loads(row["data"])
    part = template.fresh()
    source = path if path is not None else load(onnx.load_from_string(model))
    for count, values, mask in Fetcher(source, names, threads=threads).stream(calibration, plan):
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
           "shard_bounds", "unmergeable"]
