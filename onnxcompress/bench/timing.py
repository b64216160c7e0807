"""Sessions, warm-up and the interleaved timed runs (A B A B ...) of the prepared candidates.

Intra-op spinning is off and garbage collection paused while timing (ARCHITECTURE.md, "Measuring")."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import Any

from .candidates import Candidate, Unsupported, one_line
from .report import BenchProgress, ProgressCallback


class Tracker:
    """Counts timed runs for the progress callback; the total shrinks when a model drops out."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def ran(self, label: str, batch: int, run: int) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(BenchProgress(label, batch, run, self.done, self.total))

    def dropped(self, runs: int) -> None:
        self.total -= runs


def ort_session(source: bytes | str, providers: Sequence[str], threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    from ..runtime import session_options

    # Failures come back as exceptions and become row reasons: no stderr logs (level 4).
    so = session_options(threads=threads, spinning=False, profile_prefix=profile_prefix, log_level=4)
    return ort.InferenceSession(source, so, providers=list(providers))


def start(cand: Candidate, providers: Sequence[str], threads: int, warmup: int, batch: int) -> None:
    """Create the session and warm it up; the first run also checks the outputs carry the batch."""
    if cand.failure is not None:
        return
    try:
        cand.session = ort_session(cand.source, providers, threads)
        cand.providers = tuple(cand.session.get_providers())
        outputs = cand.session.run(None, cand.feeds)
        _check_batched_outputs(cand, outputs, batch)
        for _ in range(warmup - 1):
            cand.session.run(None, cand.feeds)
    except Unsupported as exc:
        cand.failure, cand.session = str(exc), None
    except Exception as exc:  # any ORT load or run failure makes only this row unsupported
        cand.failure, cand.session = f"ORT failed at batch {batch}: {one_line(exc)}", None


def _check_batched_outputs(cand: Candidate, outputs: Sequence[Any], batch: int) -> None:
    """A graph with a hard-coded batch (Reshape to [1, -1]) can run at another batch and compute nonsense."""
    names = [o.name for o in cand.session.get_outputs()]
    for name, value in zip(names, outputs, strict=True):
        shape = getattr(value, "shape", None)
        if name in cand.batched_outputs and shape is not None and (len(shape) == 0 or shape[0] != batch):
            raise Unsupported(
                f"output '{name}' has shape {list(shape)} at batch {batch}: the graph hard-codes its batch size"
            )


def time_interleaved(
    cands: Sequence[Candidate], runs: int, batch: int, clock: Callable[[], float], tracker: Tracker
) -> None:
    """Timed runs A B A B ...; a model that fails mid-way drops out with the reason."""
    gc_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed run would be charged to whichever model ran then
    try:
        for run in range(1, runs + 1):
            for cand in cands:
                if cand.failure is not None:
                    continue
                start = clock()
                try:
                    cand.session.run(None, cand.feeds)
                except Exception as exc:
                    cand.failure = f"ORT failed at batch {batch} during timing: {one_line(exc)}"
                    tracker.dropped(runs - run + 1)
                    continue
                cand.samples.append(clock() - start)
                tracker.ran(cand.label, batch, run)
    finally:
        if gc_enabled:
            gc.enable()
