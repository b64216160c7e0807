"""ONNX Runtime sessions for models in memory or on disk: one place that knows ORT's knobs."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from .errors import ProviderUnavailableError, VerificationError
from .model import needs_file, temporary_path, to_proto

#: Short provider names -> ORT providers in order of preference; CPU is always the last fallback.
PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


def provider_chain(provider: str) -> list[str]:
    """ORT provider list for a short name, CPU last as the fallback; a clear error when not installed."""
    if provider not in PROVIDERS:
        raise ProviderUnavailableError(f"unknown provider '{provider}'; choose one of: {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        hint = "pip install onnxcompress[gpu] (onnxruntime-gpu)"
        if provider == "tensorrt":
            hint += " with TensorRT installed"
        raise ProviderUnavailableError(
            f"provider '{provider}' ({wanted[0]}) is not available in onnxruntime {ort.__version__} "
            f"(available: {', '.join(available)}); for it: {hint}"
        )
    return [p for p in wanted if p in available]


def session_options(
    *, threads: int | None = None, spinning: bool = True, optimize: bool = True, profile_prefix: str | None = None,
    log_level: int = 4,
) -> ort.SessionOptions:
    # Fatal only by default: failures come back as exceptions that the caller reports in one line;
    # ORT's own error log would print a second, raw copy on stderr.
    opts = ort.SessionOptions()
    opts.log_severity_level = log_level
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        # Interleaved sessions on a small machine starve each other while spin-waiting.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


def session(
    model: ir.Model | str | os.PathLike,
    *,
    provider: str = "cpu",
    options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """An InferenceSession for a path or an in-memory model: serialized, or through a temporary file
    with external data when it has external tensors or more than 2 GiB of weights."""
    providers = provider_chain(provider)
    # Spinning intra-op threads keep cores busy between runs and slow the numpy work done in between.
    options = options or session_options(spinning=False)
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(Path(model)), options, providers=providers)
    if needs_file(model):
        with temporary_path(model, external_data=True) as path:
            return ort.InferenceSession(str(path), options, providers=providers)
    return ort.InferenceSession(to_proto(model).SerializeToString(), options, providers=providers)


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_TRIM = _malloc_trim()


def free_memory() -> None:
    """Hand memory freed by ended sessions back to the system. ORT frees a session's weights into
    glibc's heap, which otherwise keeps it: the next session on a large model would come on top."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)


def run(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return sess.run(None, dict(feeds))


def run_batches(
    sess: ort.InferenceSession, samples: Sequence[Mapping[str, np.ndarray]]
) -> list[list[np.ndarray]]:
    """Outputs for each feed dict in `samples` (one output list per sample)."""
    return [run(sess, feeds) for feeds in samples]


def load_check(model: ir.Model | str | os.PathLike, where: str) -> ort.InferenceSession:
    """A CPU session, or VerificationError naming `where` (a pass) and ORT's reason."""
    try:
        return session(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise VerificationError(f"{where}: the model does not load in ONNX Runtime ({first})") from None
