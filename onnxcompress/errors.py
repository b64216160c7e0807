"""Errors a user can act on, and the exit codes of the command line.

The CLI prints an OnnxCompressError as one line and exits with its `exit_code`. EXIT_CODES is the
one table of those codes: the top-level `--help` and the README render it (tests/test_cli_newcomer.py
checks that they agree).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Every exit code of `onnxcompress`, with what it means (the value's `meaning`)."""

    def __new__(cls, number: int, meaning: str) -> ExitCode:
        member = int.__new__(cls, number)
        member._value_ = number
        member.meaning = meaning
        return member

    OK = 0, "done; within the tolerance (and the target, if one was given)"
    INTERNAL_ERROR = 1, "an internal error: please report it (one line; ONNXCOMPRESS_DEBUG=1 for the traceback)"
    BAD_INPUT = 2, ("bad input: the model, its shapes, calibration data, an option or an output path "
                    "(one line on stderr, checked before work starts where possible, nothing written)")
    VERIFICATION_FAILED = 3, "a pass produced a model that failed verification (nothing written)"
    OUTSIDE_TOLERANCE = 4, "the model was written but is outside the tolerance (tolerance.met is false in the JSON)"
    TARGET_NOT_REACHED = 5, ("within the tolerance but short of --target-macs/--target-speedup: "
                             "the model written is the most compressed one within it")
    JOBS_FAILED = 6, ("optimize-many: a job failed (its own code 1, 2 or 3 in the summary, nothing written for it); "
                      "the other jobs ran and wrote their outputs")
    INTERRUPTED = 130, "interrupted (Ctrl-C)"


EXIT_CODES: tuple[ExitCode, ...] = tuple(ExitCode)


def exit_codes_help() -> str:
    """The table as help text: one paragraph per code, so every help formatter keeps the rows apart."""
    return "\n\n".join(["Exit codes:", *(f"{code.value}  {code.meaning}" for code in EXIT_CODES)])


class OnnxCompressError(Exception):
    """Base class: a clear, one-line problem with the user's input or environment."""

    exit_code = ExitCode.BAD_INPUT


class ModelLoadError(OnnxCompressError):
    """The model file is missing, unreadable, not ONNX, truncated, or its external data is missing."""


class InputShapeError(OnnxCompressError):
    """An input shape is malformed, unknown, too small or too large for the model, or a needed
    dynamic dimension was not given."""


class UnsupportedModelError(OnnxCompressError):
    """ONNX Runtime cannot run the input model (a custom op, or it fails on the inputs given)."""


class OutputPathError(OnnxCompressError):
    """An output path cannot be written: no such folder, not writable, or it is an input."""


class RecipeError(OnnxCompressError):
    """A recipe (YAML or mapping) is malformed or names an unknown pass or option."""


class VerificationError(OnnxCompressError):
    """A pass produced a model that fails the checker, does not load in ORT, or changed outputs too much."""

    exit_code = ExitCode.VERIFICATION_FAILED


class ProviderUnavailableError(OnnxCompressError):
    """The requested ONNX Runtime execution provider is not available in this installation."""
