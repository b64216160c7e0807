"""Where the numbers are measured: the ORT provider chain asked for, and the environment record
(versions, threads, session settings, CPU) stored with every report."""

from __future__ import annotations

import platform
from collections.abc import Sequence

import numpy as np

from ..host import cpu_description, logical_cores, physical_cores
from ..runtime import provider_chain
from .report import BenchEnvironment


def environment(provider: str, requested: Sequence[str], threads: int) -> BenchEnvironment:
    """The record of this machine and session settings that goes into every BenchReport."""
    import onnx
    import onnxruntime as ort

    cpu, flags = cpu_description()
    return BenchEnvironment(
        onnxruntime=ort.__version__,
        provider=provider,
        requested_providers=tuple(requested),
        threads=threads,
        inter_op_threads=1,
        allow_spinning="0",
        graph_optimization="ORT_ENABLE_ALL",
        cpu=cpu,
        cpu_flags=flags,
        physical_cores=physical_cores(),
        logical_cores=logical_cores(),
        platform=platform.platform(),
        python=platform.python_version(),
        numpy=np.__version__,
        onnx=onnx.__version__,
    )


def session_providers(provider: str) -> tuple[str, ...]:
    """The ORT provider list for `provider`, or ProviderUnavailableError saying what there is."""
    return tuple(provider_chain(provider))
