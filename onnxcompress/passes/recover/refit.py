"""Step 2 of recovery, the refit: sequential layer-wise ridge least squares, stage by stage, on normal
equations accumulated over sampled rows (inputs from the pruned network with the upstream sinks already
refit, targets from the original network), the ridge strength chosen on held-out rows."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ...calibration import Calibration
from ...feeds import feed_mask, mask_inputs, token_rows
from .layers import Layer, effective
from .stages import Stream, refit_stages
from .write import write_params

try:  # optional (comes with scikit-learn): lets the ridge solves run on one BLAS thread, see _one_blas_thread
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - BLAS keeps its default threads
    threadpool_limits = None

#: Rows gathered before they are added to X^T X: few large products instead of many small ones.
CHUNK_ROWS = 2048


@dataclass
class NormalEquations:
    """Running normal equations of one layer over rows [x, 1] -> y (rows buffered into large products)."""

    gram: np.ndarray  # [d+1, d+1]
    cross: np.ndarray  # [d+1, O]
    target_energy: float = 0.0  # sum of y**2
    rows: int = 0
    pending: list = field(default_factory=list)

    @classmethod
    def empty(cls, inputs: int, outputs: int) -> NormalEquations:
        return cls(np.zeros((inputs + 1, inputs + 1)), np.zeros((inputs + 1, outputs)))

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.pending.append((x, y))
        self.rows += len(x)
        if sum(len(p[0]) for p in self.pending) >= CHUNK_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        x = np.concatenate([p[0] for p in self.pending])
        y = np.concatenate([p[1] for p in self.pending]).astype(np.float64)
        self.pending = []
        xa = np.empty((len(x), x.shape[1] + 1))
        xa[:, :-1] = x
        xa[:, -1] = 1.0
        self.gram += xa.T @ xa
        self.cross += xa.T @ y
        self.target_energy += float(np.sum(y * y))

    def error(self, w: np.ndarray) -> float:
        """Sum of squared errors of [x, 1]·w against y over the accumulated rows."""
        self.flush()
        return float(np.sum(w * (self.gram @ w)) - 2.0 * np.sum(w * self.cross) + self.target_energy)


def refit(original: ir.Model, model: ir.Model, layers: list[Layer], fit: Calibration, held: Calibration,
           batch: int, *, seed: int, ridge: Sequence[float], positions: int, max_inputs: int,
           cache_bytes: int) -> dict:
    """Sequential ridge refit, stage by stage; returns the timing summary."""
    todo = []
    for layer in layers:
        if layer.record.get("method") != "bias":
            continue
        if layer.inputs > max_inputs:
            layer.record["refit_skipped"] = f"{layer.inputs} inputs exceed the refit limit {max_inputs}"
            continue
        if len(layer.node.inputs[1].uses()) > 1:
            layer.record["refit_skipped"] = "weight is shared with other nodes"
            continue
        todo.append(layer)
    stages = refit_stages(model, todo)
    batches = [("fit", f) for f in fit.batches(batch)] + [("held", f) for f in held.batches(batch)]
    masks = mask_inputs(model)  # token rows under an attention mask's padding are left out
    pruned = Stream(batches, [sorted({l.sink.input for l in st}) for st in stages], cache_bytes)
    targets = Stream(batches, [sorted({l.target for l in st}) for st in stages], cache_bytes)
    forward = accumulate = solve = 0.0
    rng = np.random.default_rng(seed)
    for number, stage in enumerate(stages):
        normals = {(split, l.sink.node): NormalEquations.empty(l.inputs, l.outputs) for split in ("fit", "held") for l in stage}
        t0 = time.perf_counter()
        inputs, outputs_ = pruned.stage(model, number), targets.stage(original, number)
        for split, feeds in batches:
            xs, ys = next(inputs), next(outputs_)
            t1 = time.perf_counter()
            forward += t1 - t0
            mask = feed_mask(feeds, masks)
            for l in stage:
                x, y = _rows(l, xs[l.sink.input], ys[l.target], rng, positions, mask)
                normals[split, l.sink.node].add(x, y)
            t0 = time.perf_counter()
            accumulate += t0 - t1
        forward += time.perf_counter() - t0
        for l in stage:
            t0 = time.perf_counter()
            _solve(model, l, normals["fit", l.sink.node], normals["held", l.sink.node], ridge)
            l.record["stage"] = number
            l.record["solve_seconds"] = time.perf_counter() - t0
            solve += l.record["solve_seconds"]
    return {"stages": len(stages), "refit_layers": len(todo), "forward_seconds": forward,
            "accumulate_seconds": accumulate, "solve_seconds": solve,
            "stages_over_cache_budget": pruned.over_budget + targets.over_budget,
            "nodes_run": pruned.nodes_run + targets.nodes_run}


def _rows(layer: Layer, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, positions: int,
          mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Matching rows of the pruned layer's input (im2col for Conv) and the original layer's kept outputs,
    at up to `positions` randomly chosen output positions per sample (token positions under an
    attention `mask`'s padding left out)."""
    if layer.node.op_type == "Conv":
        return _conv_rows(layer.node, x, y[:, layer.keep_out], rng, positions)
    x2 = token_rows(x, mask)
    y2 = token_rows(y, mask)[:, layer.keep_out]
    if x.ndim > 2 and len(x2) > positions * len(x):  # [batch, positions..., features]: sample positions
        pick = np.sort(rng.choice(len(x2), positions * len(x), replace=False))
        x2, y2 = x2[pick], y2[pick]
    return x2, y2


def _conv_rows(node: ir.Node, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, positions: int
               ) -> tuple[np.ndarray, np.ndarray]:
    batch, channels, in_size = x.shape[0], x.shape[1], x.shape[2:]
    out_size = y.shape[2:]
    kernel = tuple(node.inputs[1].const_value.shape[2:])
    dims = len(kernel)
    strides = tuple(node.attributes.get_ints("strides", (1,) * dims))
    dilations = tuple(node.attributes.get_ints("dilations", (1,) * dims))
    begin = _pads_begin(node, kernel, strides, dilations, in_size, out_size)
    # Zero padding at the start as the op does; at the end as much as the sampled windows reach.
    reach = [(o - 1) * s + (k - 1) * d + 1 for o, s, k, d in zip(out_size, strides, kernel, dilations)]
    end = [max(0, r - i - b) for r, i, b in zip(reach, in_size, begin)]
    xp = np.pad(x, [(0, 0), (0, 0), *zip(begin, end)])
    total = int(np.prod(out_size))
    per = min(positions, total)
    flat = np.argsort(rng.random((batch, total)), axis=1)[:, :per].ravel()
    sample = np.repeat(np.arange(batch), per)
    out = np.unravel_index(flat, out_size)
    taps = np.stack(np.meshgrid(*[np.arange(k) * d for k, d in zip(kernel, dilations)], indexing="ij"), -1)
    taps = taps.reshape(-1, dims)
    where = [out[j][:, None] * strides[j] + taps[None, :, j] for j in range(dims)]  # [rows, taps]
    patches = xp[(sample[:, None], slice(None), *where)]  # advanced dims first: [rows, taps, channels]
    rows = patches.transpose(0, 2, 1).reshape(len(flat), channels * len(taps))
    return rows, y[(sample, slice(None), *out)]


def _pads_begin(node: ir.Node, kernel, strides, dilations, in_size, out_size) -> list[int]:
    auto = node.attributes.get_string("auto_pad", "NOTSET")
    dims = len(kernel)
    if auto in ("", "NOTSET"):
        return list(node.attributes.get_ints("pads", (0,) * 2 * dims))[:dims]
    if auto == "VALID":
        return [0] * dims
    total = [max(0, (o - 1) * s + (k - 1) * d + 1 - i)
             for o, s, k, d, i in zip(out_size, strides, kernel, dilations, in_size)]
    return [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]


def _solve(model: ir.Model, layer: Layer, fit: NormalEquations, held: NormalEquations, ridge: Sequence[float]) -> None:
    """Ridge least squares toward the current (bias-compensated) weights W0:
    min |[x,1]W - y|^2 + λ|W - W0|^2, λ = r · trace(X^T X)/d for r in `ridge`, or λ = ∞ (W = W0),
    whichever has the smallest held-out error (the search stops where weaker ridges start to overfit)."""
    fit.flush()
    held.flush()
    w_now, b_now = effective(layer.node)
    start = np.vstack([w_now, b_now])
    w_orig, b_orig = effective(layer.original)
    sliced = np.vstack([w_orig[layer.keep_rows][:, layer.keep_out], b_orig[layer.keep_out]])  # no compensation
    energy = max(held.target_energy, np.finfo(float).tiny)
    best, best_error, best_ridge = start, held.error(start), None
    before = previous = best_error
    scale = float(np.trace(fit.gram)) / len(fit.gram)
    for r in sorted(ridge, reverse=True):  # from strong to weak: stop once held-out error turns up
        with _one_blas_thread():
            candidate = _ridge_solution(fit, start, r * scale)
        if candidate is None:
            continue
        error = held.error(candidate)
        if error < best_error:
            best, best_error, best_ridge = candidate, error, r
        if error > previous:
            break
        previous = error
    layer.record.update(
        method="refit" if best_ridge is not None else "bias",
        ridge=best_ridge,
        rows=fit.rows,
        heldout_rows=held.rows,
        error_pruned=held.error(sliced) / energy,
        error_before=before / energy,
        error_after=best_error / energy,
    )
    if best_ridge is not None:
        write_params(model, layer, best[:-1], best[-1])


def _ridge_solution(fit: NormalEquations, start: np.ndarray, lam: float) -> np.ndarray | None:
    gram = fit.gram + lam * np.eye(len(fit.gram))
    rhs = fit.cross + lam * start
    try:
        solution = np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        if lam > 0:
            return None
        solution = np.linalg.lstsq(gram, rhs, rcond=None)[0]  # singular: the minimum-norm least squares
    return solution if np.all(np.isfinite(solution)) else None


def _one_blas_thread():
    """Multi-threaded OpenBLAS factorizations measured 6x (d = 3241) to 200x (d = 289) slower than
    single-threaded ones on the 2 busy cores here; the products that fill X^T X keep all threads."""
    return threadpool_limits(1) if threadpool_limits is not None else contextlib.nullcontext()
