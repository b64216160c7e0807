"""What a benchmark is asked to do: `BenchOptions` (the CLI's `bench` options, field for field)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import OnnxCompressError
from ..runtime import PROVIDERS

#: Fewer timed runs give medians and p90s too noisy to compare models by.
MIN_RUNS = 20


@dataclass
class BenchOptions:
    """How to benchmark. The CLI's `bench` options map one to one onto these fields."""

    provider: str = "cpu"  # cpu | cuda | tensorrt
    batch_sizes: tuple[int, ...] = (1,)
    runs: int = 50  # timed runs per model and batch, at least MIN_RUNS
    warmup: int = 5  # untimed runs per model before timing (at least one is always done)
    threads: int | None = None  # intra-op threads; None: the physical cores this process may use
    input_shapes: Mapping[str, Sequence[int]] | None = None  # leading dim is replaced by each batch size
    profile: bool = False  # per-layer times from ORT's profiler
    profile_runs: int = 10  # profiled runs per model and batch (after `warmup`), when profiling
    seed: int = 0  # random inputs
    input_values: Mapping[str, Any] | None = None  # input name -> a fixed value for it (`--input sr=16000`)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Normalise and check every field; bad values raise a one-line OnnxCompressError."""
        self.provider = str(self.provider).lower()
        if self.provider not in PROVIDERS:
            raise OnnxCompressError(f"unknown provider '{self.provider}'; choose one of: {', '.join(PROVIDERS)}")
        try:
            sizes = tuple(int(b) for b in self.batch_sizes)
        except (TypeError, ValueError):
            raise OnnxCompressError(f"batch sizes must be positive integers, got {self.batch_sizes!r}") from None
        if not sizes or any(b <= 0 for b in sizes):
            raise OnnxCompressError(f"batch sizes must be positive integers, got {self.batch_sizes!r}")
        self.batch_sizes = tuple(dict.fromkeys(sizes))
        if self.runs < MIN_RUNS:
            raise OnnxCompressError(
                f"runs must be at least {MIN_RUNS} (got {self.runs}): fewer timed runs give noisy medians"
            )
        if self.warmup < 0:
            raise OnnxCompressError(f"warmup must be 0 or more, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise OnnxCompressError(f"threads must be 1 or more, got {self.threads}")
        if self.profile_runs < 1:
            raise OnnxCompressError(f"profile runs must be 1 or more, got {self.profile_runs}")


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """`"1,8"` -> (1, 8), with a one-line error for anything else."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise OnnxCompressError(f"bad batch sizes '{text}': expected positive integers such as 1,8")
    return tuple(int(p) for p in parts)
