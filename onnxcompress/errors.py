"""Errors a user can act on. The CLI prints them as one line and exits with `exit_code`."""

from __future__ import annotations


class OnnxCompressError(Exception):
    """Base class: a clear, one-line problem with the user's input or environment."""

    exit_code = 2


class ModelLoadError(OnnxCompressError):
    """The model file is missing, unreadable, not ONNX, truncated, or its external data is missing."""


class InputShapeError(OnnxCompressError):
    """An input shape is malformed, unknown, or a needed dynamic dimension was not given."""


class RecipeError(OnnxCompressError):
    """A recipe (YAML or mapping) is malformed or names an unknown pass or option."""


class VerificationError(OnnxCompressError):
    """A pass produced a model that fails the checker, does not load in ORT, or changed outputs too much."""

    exit_code = 3


class ProviderUnavailableError(OnnxCompressError):
    """The requested ONNX Runtime execution provider is not available in this installation."""
