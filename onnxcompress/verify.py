"""Prove a model right: full onnx.checker, an ORT session, outputs compared with a reference model's."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from . import output_metrics, runtime
from .errors import ProviderUnavailableError, UnsupportedModelError, VerificationError
from .model import graph_inputs, input_dtype, needs_file, release, temporary_path, weight_bytes
from .report import Fidelity

Feeds = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class VerifyOptions:
    """What the pipeline checks after every pass."""

    enabled: bool = True
    full_check: bool = True  # onnx.checker with full_check (shape inference included)
    samples: int = 4  # feeds used for the output comparison
    # Exact passes (cleanup, full-rank factorization, ...) must keep max |a-b| / max |a| within this.
    rtol: float = 1e-4
    seed: int = 0


def random_feeds(
    model: ir.Model, shapes: Mapping[str, Sequence[int]], *, count: int = 1, seed: int = 0,
    values: Mapping[str, np.ndarray] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Seeded synthetic inputs of the right dtype: standard normal floats, integers read from the graph
    (token ids within their table, masks of ones, the sample rate a graph compares with, ...: see
    feeds.py), `values` where given (input name -> a value broadcast to its shape)."""
    from .feeds import synthetic_feeds

    rng = np.random.default_rng(seed)
    return [synthetic_feeds(model, shapes, rng, values) for _ in range(count)]


def check_model(path: str | Path, where: str, *, full: bool = True) -> None:
    """onnx.checker on a saved model (full check runs strict shape inference too), or VerificationError."""
    try:
        onnx.checker.check_model(str(path), full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise VerificationError(f"{where}: the model fails onnx.checker ({first})") from None


def compare(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]], source: str) -> Fidelity:
    """Fidelity of `candidate` outputs against `reference` outputs (lists per sample, then per output).

    Every metric is the worst over the model's outputs, so one broken head is not averaged away.
    A 2-class probability output is compared as the positive class's log-odds (its decisions as given).
    The metric that fits each kind of output (KL divergence, token error rate, ...) is output_metrics'.
    """
    if len(reference) != len(candidate):
        raise ValueError("reference and candidate have different sample counts")
    n_outputs = len(reference[0]) if reference else 0
    max_abs = max_rel = 0.0
    sqnr, cosine = float("inf"), 1.0
    top1: list[float] = []
    flips: list[float] = []
    per_kind: list[dict[str, float]] = []
    for k in range(n_outputs):
        ref, got = output_rows(reference, candidate, k)
        if ref.shape != got.shape:
            raise VerificationError(f"output {k} changed shape: {ref.shape} -> {got.shape}")
        if _looks_like_scores(reference[0][k]):
            top1.append(float(np.mean(np.argmax(ref, axis=1) == np.argmax(got, axis=1))))
            if ref.shape[1] == 2:
                flips.append(1.0 - top1[-1])
        per_kind.append(output_metrics.measure([s[k] for s in reference], [s[k] for s in candidate], (ref, got)))
        ref, got = as_compared(ref, got)  # decisions from the rows as given, every other metric on these
        err = got - ref
        abs_err = float(np.max(np.abs(err))) if err.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        max_abs = max(max_abs, abs_err)
        max_rel = max(max_rel, abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else float("inf")))
        signal, noise = float(np.sum(ref**2)), float(np.sum(err**2))
        out_sqnr = float("inf") if noise == 0 else (10 * np.log10(signal / noise) if signal > 0 else float("-inf"))
        sqnr = min(sqnr, out_sqnr)
        denom = float(np.linalg.norm(ref) * np.linalg.norm(got))
        cosine = min(cosine, float(np.dot(ref.ravel(), got.ravel()) / denom) if denom > 0 else float(abs_err == 0))
    return Fidelity(
        inputs=source,
        samples=sum(ref_row(s[0]) for s in reference) if n_outputs else 0,
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        sqnr_db=sqnr,
        cosine=cosine,
        top1_agreement=min(top1) if top1 else None,
        decisions_changed=max(flips) if flips else None,
        **output_metrics.worst(per_kind),
    )


def ref_row(array: np.ndarray) -> int:
    """Rows (batch items) an output contributes: its leading dim, or 1 for scalars and vectors."""
    return int(np.shape(array)[0]) if np.ndim(array) > 1 else 1


def _rows(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float64).reshape(ref_row(array), -1)


def output_rows(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]],
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Output k of every sample, reference and candidate, as float64 rows [samples, values]."""
    return tuple(np.concatenate([_rows(sample[k]) for sample in side]) for side in (reference, candidate))


def as_compared(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows every metric but top-1 compares: 2-class probabilities as log-odds, others as given."""
    return (_log_odds(ref), _log_odds(got)) if _two_class_probabilities(ref) else (ref, got)


#: Probabilities are clipped here before log-odds: a float32 softmax saturates near 1e-7 anyway.
LOG_ODDS_FLOOR = 1e-7


def _two_class_probabilities(rows: np.ndarray) -> bool:
    """[N, 2] rows of probabilities (a 2-class softmax). Compared as such, every model looks
    faithful: rows like (0.999, 0.001) keep a cosine near 1 whatever the positive class does."""
    return (rows.ndim == 2 and rows.shape[1] == 2 and output_metrics.is_probability_rows(rows)
            and float(rows.max()) <= 1.0)


def _log_odds(rows: np.ndarray) -> np.ndarray:
    """log(p1 / p0) per row, as an [N, 1] column."""
    p = np.clip(rows, LOG_ODDS_FLOOR, 1.0)
    return np.log(p[:, 1:2]) - np.log(p[:, 0:1])


def _looks_like_scores(array: np.ndarray) -> bool:
    """[N, C] floating outputs with several classes: top-1 agreement is meaningful."""
    return np.ndim(array) == 2 and np.shape(array)[1] > 1 and np.issubdtype(np.asarray(array).dtype, np.floating)


def outputs(model: ir.Model | str | Path, feeds: Sequence[Feeds], where: str) -> list[list[np.ndarray]]:
    """ORT outputs of `model` for each feed dict; VerificationError naming `where` if it fails to load or run."""
    sess = runtime.load_check(model, where)
    try:
        return runtime.run_batches(sess, feeds)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise VerificationError(f"{where}: the model fails to run in ONNX Runtime ({first})") from None
    finally:
        del sess
        runtime.free_memory()


#: An exact pass may move an output by this many times the float noise of the input model itself.
#: An exact rewrite rounds differently: where an output is tiny against the sums behind it (a bias
#: of 1e5 cancelled by a BatchNorm mean, a sigmoid map near 1e-6) that moves it by far more than
#: rtol of its largest value, so exactness is also judged against the input model's own float noise.
NOISE_FACTOR = 10.0
#: The float noise perturbs every float weight of the input model by this relative amount (one
#: float32 rounding step, random sign): what rewriting the weights (folding, reassociation) costs.
WEIGHT_ULP = 2.0**-23


def float_noise(model: ir.Model, feeds: Sequence[Feeds], reference: Sequence[Sequence[np.ndarray]],
                where: str, seed: int = 0, path: str | Path | None = None) -> list[float]:
    """Per output, the largest |difference| from `reference` (ORT, graph optimizations on) of two
    equally valid float32 evaluations of the same model: graph optimizations off (ORT's own fusions
    reassociate), and every float weight moved by one rounding step (what an exact rewrite of the
    weights moves them by). `path`: the model's own file, when `model` is what it holds unchanged
    (the first session reads it instead of a temporary copy)."""
    nudged = model.clone()  # shares the weights; the nudged ones replace them in the clone only
    for index, value in enumerate(nudged.graph.initializers.values()):
        if value.const_value is not None and value.const_value.dtype in (ir.DataType.FLOAT, ir.DataType.DOUBLE) \
                and not _sets_a_shape(value):
            value.const_value = _nudged(value.const_value, (seed, index))
    runs = [(model if path is None else path, runtime.session_options(spinning=False, optimize=False)), (nudged, None)]
    on_disk = through_file(model)
    noise = [0.0] * (len(reference[0]) if reference else 0)
    for variant, options in runs:
        try:
            got = runtime.run_batches(_session(variant, options, on_disk), feeds)
            runtime.free_memory()  # the session and its weights go before the next one loads
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise VerificationError(f"{where}: the model fails to run in ONNX Runtime ({first})") from None
        for k in range(len(noise)):
            for ref, other in zip((s[k] for s in reference), (s[k] for s in got)):
                diff = np.abs(np.asarray(ref, np.float64) - np.asarray(other, np.float64))
                noise[k] = max(noise[k], float(np.max(diff, initial=0.0)))
    return noise


def _nudged(tensor: ir.TensorProtocol, seed: tuple[int, int]) -> ir.LazyTensor:
    """`tensor` with every element moved by one float32 rounding step of random sign, computed when
    read: saving the nudged model holds one weight in memory at a time, not a second model."""

    def nudge() -> ir.Tensor:
        w = tensor.numpy()
        up = np.random.default_rng(seed).integers(0, 2, w.shape, dtype=np.uint8).astype(bool)
        nudged = np.where(up, w.dtype.type(WEIGHT_ULP), w.dtype.type(-WEIGHT_ULP))  # in w's dtype: 5 bytes a weight
        nudged *= w
        nudged += w
        del w, up
        release(tensor)  # the source weight's pages: one weight at a time in memory
        return ir.Tensor(nudged, name=tensor.name)

    return ir.LazyTensor(nudge, dtype=tensor.dtype, shape=tensor.shape, name=tensor.name)


#: Above this many bytes of weights, a model in memory reaches ORT through a temporary file with
#: external data: serialized, its weights are copied into a protobuf, its bytes and ORT's parsed
#: model (2x the weights more at the peak on a 384 MiB MLP), where ORT maps a file's weights.
FILE_SESSION_BYTES = 64 * 2**20


def through_file(model: ir.Model) -> bool:
    """Whether verification's sessions on `model` go through a file (see FILE_SESSION_BYTES)."""
    return needs_file(model) or weight_bytes(model) > FILE_SESSION_BYTES


def _session(model: ir.Model | str | Path, options, on_disk: bool):
    """A session on `model`, through a file with external data when `on_disk` (a model read from
    one, or a large one: serialized bytes would hold all its weights in memory, twice)."""
    if not on_disk or isinstance(model, (str, Path)):
        return runtime.session(model, options=options)
    with temporary_path(model, external_data=True) as path:
        return runtime.session(path, options=options)


# Float inputs that decide an output's shape, not its values: Resize's roi/scales (a scale one step
# below 2.0 makes 20 rows into 39), Upsample's scales, Range's bounds. Nudging them is not noise.
SHAPE_INPUTS = {"Resize": {1, 2}, "Upsample": {1}, "Range": {0, 1, 2}}


def _sets_a_shape(value: ir.Value) -> bool:
    return any(index in SHAPE_INPUTS.get(node.op_type, ()) and node.domain in ("", "ai.onnx")
               for node, index in value.uses())


def exactness_error(reference: Sequence[Sequence[np.ndarray]], got: Sequence[Sequence[np.ndarray]],
                    noise: Sequence[float] | None, rtol: float) -> str | None:
    """Why `got` is not the same as `reference` for an exact pass, or None: per output, the error
    must stay within rtol of the output's largest value or NOISE_FACTOR times its float noise."""
    for k in range(len(reference[0]) if reference else 0):
        ref = np.concatenate([_rows(s[k]) for s in reference])
        err = float(np.max(np.abs(np.concatenate([_rows(s[k]) for s in got]) - ref), initial=0.0))
        scale = float(np.max(np.abs(ref), initial=0.0))
        floor = NOISE_FACTOR * noise[k] if noise else 0.0
        if not (err <= rtol * scale or err <= floor):
            rel = err / scale if scale > 0 else float("inf")
            return (f"outputs changed beyond tolerance (output {k}: max relative error {rel:.3g} > {rtol:g}, "
                    f"max abs error {err:.3g} > {NOISE_FACTOR:g}x the input model's float noise {noise[k] if noise else 0.0:.3g})")
    return None


def reference_outputs(model: ir.Model | str | Path, feeds: Sequence[Feeds], source: str) -> list[list[np.ndarray]]:
    """ORT outputs of the input model, the reference every pass is compared with. When it fails, the
    input is the problem, not a pass: UnsupportedModelError (exit 2) with ORT's reason and the
    shapes fed, e.g. calibration data in NHWC layout for an NCHW model."""
    try:
        sess = _session(model, None, not isinstance(model, (str, Path)) and through_file(model))
    except ProviderUnavailableError:
        raise
    except Exception as exc:
        raise UnsupportedModelError(f"ONNX Runtime cannot load the input model ({_first_line(exc)})") from None
    try:
        return runtime.run_batches(sess, feeds)
    except Exception as exc:
        shapes = ", ".join(f"{k} {'x'.join(map(str, np.shape(v)))}" for k, v in (feeds[0] if feeds else {}).items())
        raise UnsupportedModelError(f"ONNX Runtime cannot run the input model on {source} inputs ({shapes}): "
                                    f"{_first_line(exc)}") from None
    finally:
        del sess
        runtime.free_memory()


def _first_line(exc: BaseException) -> str:
    """ORT's message without its status-code prefix ('[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ')."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)[:300]


def verify_model(
    model: ir.Model,
    where: str,
    feeds: Sequence[Feeds],
    reference: Sequence[Sequence[np.ndarray]],
    source: str,
    options: VerifyOptions,
    *,
    exact: bool,
    noise: Sequence[float] | None = None,
    before: Sequence[Sequence[np.ndarray]] | None = None,
) -> tuple[Fidelity, list[list[np.ndarray]]]:
    """Checker + ORT + comparison; the fidelity against `reference` and the model's outputs. An exact pass
    must keep the outputs of the model it started from (`before`, default `reference`) within options.rtol
    of each output's scale, or within NOISE_FACTOR times that model's float noise (`float_noise`); a
    lossy one is measured."""
    with temporary_path(model, external_data=True) as path:
        check_model(path, where, full=options.full_check)
        got = outputs(path, feeds, where)
    fidelity = compare(reference, got, source)
    if not np.isfinite(fidelity.max_abs_error):
        raise VerificationError(f"{where}: the model produces non-finite outputs")
    if exact and (problem := exactness_error(reference if before is None else before, got, noise, options.rtol)):
        raise VerificationError(f"{where}: {problem}")
    return fidelity, got


#: Why a pass that reported no change is not verified again (its PassRecord.verification_skipped).
UNCHANGED = "the pass reported no change: the model is the one already verified"


@dataclass
class PassVerifier:
    """Verification after each pass of a pipeline, and what it carries from one pass to the next.

    A pass that reports no change is not verified again: its model is the one verified before it.
    The float noise an exact pass is judged with is that of the state it starts from; while no pass
    has changed the model that state is the input, which stays untouched (and on disk, when it was
    read from a file), so its noise is measured only once an exact pass does change something."""

    options: VerifyOptions
    feeds: list[dict[str, np.ndarray]]
    source: str  # what the feeds are
    reference: list[list[np.ndarray]]  # the input's outputs
    input: ir.Model  # the pipeline's input, untouched
    input_path: Path | None = None  # the file `input` was read from, unchanged
    expected: list[list[np.ndarray]] = field(default_factory=list)  # what exact passes are held to
    noise: list[float] | None = None  # the float noise of the state `expected` came from
    fidelity: Fidelity | None = None  # the current model's, against the input
    changed: bool = False  # some pass has changed the model

    def __post_init__(self) -> None:
        self.expected = self.expected or self.reference
        # The input against itself, for the passes before the first change (what verifying it gives).
        self.fidelity = self.fidelity or compare(self.reference, self.reference, self.source)

    def before(self, name: str, exact: bool, model: ir.Model) -> None:
        """Before pass `name` runs on `model`: the noise of a state a lossy pass left, which the
        pass may change in place, is measured now."""
        if exact and self.noise is None and self.changed:
            self.noise = float_noise(model, self.feeds, self.expected, f"the model before pass '{name}'")

    def after(self, name: str, exact: bool, modified: bool, model: ir.Model) -> tuple[Fidelity, str | None]:
        """The fidelity of `model` after pass `name`, and why it was not verified again (or None)."""
        if not modified:
            return self.fidelity, UNCHANGED
        if exact and self.noise is None:  # the state before the pass is the input's
            self.noise = float_noise(self.input, self.feeds, self.expected, f"the model before pass '{name}'",
                                     path=self.input_path)
        self.fidelity, got = verify_model(model, f"pass '{name}'", self.feeds, self.reference, self.source,
                                          self.options, exact=exact, noise=self.noise, before=self.expected)
        if not exact:  # a new model state: later exact passes are held to it, with its own noise
            self.expected, self.noise = got, None
        self.changed = True
        return self.fidelity, None
