"""The torch executor's errors, importable without torch (the package raises the first when it is missing)."""

from __future__ import annotations

from ..errors import OnnxCompressError


class TorchUnavailableError(OnnxCompressError):
    """PyTorch is needed (the [torch] extra) and is not installed."""


class UnsupportedGraphError(OnnxCompressError):
    """The graph holds an operator (or form of one) the torch executor does not implement."""
