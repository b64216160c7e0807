"""Distill: recover a compressed model's accuracy by training its float weights to match the original.

Teacher = the pipeline's untouched input model (`ctx.original`), student = the compressed model. No
labels are needed: the loss compares outputs. For outputs that look like class scores ([N, C]) it is
`alpha` x KL divergence at `temperature` (scaled by T², Hinton et al. 2015) plus (1 - alpha) x MSE;
for any other output, MSE. MSE is relative (divided by the teacher's mean square) so outputs of any
scale weigh alike. `feature_matching` adds the same relative MSE at the outputs of layers a pass
changed (Conv/Gemm/MatMul whose weights differ from the teacher's and whose output keeps its name
and shape: the consumers of pruned channels).

What the measurements behind this pass say (ARCHITECTURE.md, "Recovery"; issue 8): recovery overfits narrow
calibration data. So: the end of the calibration set is held out and never trained on; it chooses
when to stop (`patience` evaluations without a lower held-out loss) and which weights to keep (the
best held-out step, the untrained weights included, so the pass never makes held-out fidelity
worse by its own measure); image inputs are augmented (random shifted crops, horizontal flips) by
default; BatchNormalization statistics stay frozen by default (letting them update made things
worse); and the report gives fidelity on the held-out samples before and after, measured in ONNX
Runtime on the written-back model.

A fixed `seed` with a `steps` budget gives the same weights every run. A `minutes` budget stops at
a time-dependent step, so it is reproducible only up to where it stopped.

Python API: `Distill(loss_fn=..., dataset=...)` or `distill(student, teacher, data, ...)`. A
`dataset` is a mapping of arrays with samples on axis 0: the model inputs plus anything else the
loss needs (labels); `loss_fn(student_outputs, teacher_outputs, batch)` gets lists of torch tensors
(graph outputs in order) and the batch as a dict of torch tensors, and returns a scalar tensor.
Neither is a recipe option.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from .. import runtime
from ..calibration import Calibration, batch_size_for
from ..errors import OnnxCompressError
from ..model import graph_inputs, load
from ..pipeline import Pass, PassContext, PassResult, option
from ..report import to_jsonable
from ..verify import compare, outputs
from .quantize import CalibrationNeededError

#: Default budget when neither `steps` nor `minutes` is given.
DEFAULT_STEPS = 300
#: Below this many training samples the student easily overfits them: say so in the report.
SMALL_DATA = 64
#: Image inputs (4-D float) are shifted by up to this fraction of their height/width when cropping.
CROP_FRACTION = 0.125
#: Guards the relative MSE against an all-zero teacher output.
EPS = 1e-12
#: Points kept from the loss curve in the report.
CURVE_POINTS = 40
API_ONLY = {"api_only": True}  # field metadata: Python API only, not a recipe option

LossFn = Callable[[Sequence[Any], Sequence[Any], Mapping[str, Any]], Any]


@dataclass
class Distill(Pass):
    """Train the compressed model's float weights to match the original model's outputs."""

    name: ClassVar[str] = "distill"
    exact: ClassVar[bool] = False

    steps: int | None = option(None, "Optimizer steps; with `minutes`, whichever ends first (default 300 if neither).")
    minutes: float | None = option(None, "Wall-time budget.")
    lr: float = option(1e-4, "Adam learning rate.")
    temperature: float = 4.0
    alpha: float = option(0.5, "Weight of the KL term for class-score outputs; 1 - alpha goes to MSE.")
    batch_size: int = 32
    augment: Literal["auto", "none", "crop", "flip"] = option("auto", "auto: crops and flips for 4-D float inputs; or none, crop, flip.")
    holdout: float = option(0.2, "Fraction of the data, from its end, never trained on.")
    patience: int = option(5, "Held-out evaluations without improvement before stopping (0: never stop early).")
    eval_every: int = option(0, "Steps between held-out evaluations (0: about one pass over the data, 10..100).")
    seed: int = 0
    freeze_norm: bool = option(True, "BatchNormalization keeps its statistics (affine parameters still train).")
    feature_matching: bool = False
    progress: bool = option(True, "A progress bar on stderr when it is a terminal.")
    threads: int = option(0, "Torch intra-op threads while training (0: torch's default); 1 is fastest on a busy machine.")
    loss_fn: LossFn | None = field(default=None, repr=False, compare=False, metadata=API_ONLY)
    dataset: Mapping[str, np.ndarray] | None = field(default=None, repr=False, compare=False, metadata=API_ONLY)

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        if not self.lr > 0 or not self.temperature > 0:
            raise ValueError("lr and temperature must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.batch_size < 1 or self.patience < 0 or self.eval_every < 0 or self.threads < 0:
            raise ValueError("batch_size must be >= 1; patience, eval_every and threads >= 0")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ValueError("loss_fn must be callable (Python API only)")
        if self.dataset is not None and not isinstance(self.dataset, Mapping):
            raise ValueError("dataset must be a mapping of arrays (Python API only)")

    def options(self) -> dict[str, Any]:
        """Recipe options: the API-only fields (a callable, a dataset) are not copied or serialized."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("api_only")}

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        if ctx.original is None:
            raise OnnxCompressError(f"{self.name} needs the original model as its teacher (run it in a Pipeline)")
        data = self._data(model, ctx)
        _check_interface(model, ctx.original)
        from .. import torch_graph  # one-line error naming the [torch] extra when torch is missing

        try:
            student = torch_graph.to_torch(model, norm_training=not self.freeze_norm)
            # the teacher runs in ONNX Runtime, in torch only where its layer features are matched
            teacher = torch_graph.to_torch(ctx.original, trainable=False) if self.feature_matching else None
        except torch_graph.UnsupportedGraphError as exc:
            return self.result(model, skipped=[f"{exc} (weights left as they were)"], modified=False)
        if not student.weight_names:
            return self.result(model, skipped=["no float32 weight initializers to train"], modified=False)
        trainer = _Trainer(self, model, ctx.original, student, teacher, data)
        feeds = _feeds(trainer.heldout_inputs(), batch_size_for(model, 64))
        reference = outputs(ctx.original, feeds, "teacher")
        before = compare(reference, outputs(model, feeds, "student"), trainer.heldout_source)
        details = trainer.train()
        changed = student.write_back(model)
        after = compare(reference, outputs(model, feeds, "distilled model"), trainer.heldout_source) if changed else before
        details["heldout_fidelity"] = {"before": to_jsonable(before), "after": to_jsonable(after)}
        changes = [f"{len(changed)} weight tensors trained for {details['steps']} steps "
                   f"({details['stopped']}; best held-out loss at step {details['best_step']}); "
                   f"held-out {_summary(before)} -> {_summary(after)}"] if changed else []
        skipped = [] if changed else [f"no step improved the held-out loss in {details['steps']} steps: weights kept"]
        return self.result(model, changes=changes, skipped=skipped, details=details, modified=bool(changed))

    def _data(self, model: ir.Model, ctx: PassContext) -> Calibration:
        if self.dataset is not None:
            names = {v.name for v in graph_inputs(model)}
            inputs = Calibration.from_arrays(model, {k: v for k, v in self.dataset.items() if k in names}, "dataset")
            extra = {k: np.asarray(v) for k, v in self.dataset.items() if k not in names}
            return Calibration({**inputs.arrays, **extra}, "dataset")
        if ctx.calibration is None:
            raise CalibrationNeededError(
                f"{self.name} needs calibration data (--calib FILE.npy/.npz) to distill the original model into the compressed one"
            )
        return ctx.calibration


def distill(
    student: Any, teacher: Any, data: Calibration | Mapping[str, np.ndarray] | None = None, **options: Any
) -> PassResult:
    """Distill `teacher` into `student` (paths, protos or onnx_ir models; neither is modified).

    `data`: calibration arrays keyed by input name (or use `dataset=` for inputs plus labels);
    `options`: Distill's fields, `loss_fn` and `dataset` included. Returns the PassResult: `.model`
    is the trained student, `.record.details` the report.
    """
    student_model, teacher_model = load(student), load(teacher)
    if data is not None and not isinstance(data, Calibration):
        data = Calibration.from_arrays(teacher_model, data)
    ctx = PassContext(calibration=data, model=student_model, original=teacher_model)
    return Distill(**options).run(student_model, ctx)


def parse_budget(text: str) -> dict[str, float | int]:
    """The CLI's `--distill` value: "500" -> {"steps": 500}; "2m", "1.5min", "90s" -> {"minutes": ...}."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(m|min|minutes?|s|sec|seconds?)?\s*", str(text))
    if not match or float(match[1]) <= 0:
        raise OnnxCompressError(f"bad --distill '{text}': expected steps (e.g. 500) or a time (e.g. 2m, 90s)")
    number, unit = match[1], match[2]
    if unit is None:
        if "." in number:
            raise OnnxCompressError(f"bad --distill '{text}': steps must be a whole number (or add a unit: 2m, 90s)")
        return {"steps": int(number)}
    return {"minutes": float(number) / (60.0 if unit.startswith("s") else 1.0)}


def _check_interface(student: ir.Model, teacher: ir.Model) -> None:
    s_in, t_in = [v.name for v in graph_inputs(student)], [v.name for v in graph_inputs(teacher)]
    s_out, t_out = [v.name for v in student.graph.outputs], [v.name for v in teacher.graph.outputs]
    if s_in != t_in or s_out != t_out:
        raise OnnxCompressError(
            f"student and teacher interfaces differ (inputs {s_in} vs {t_in}, outputs {s_out} vs {t_out})"
        )


# ------------------------------------------------------------------------------------------ training


class _Trainer:
    """One distillation run: data split, augmentation, loss, Adam, held-out early stopping."""

    def __init__(self, opts: Distill, student_model: ir.Model, teacher_model: ir.Model, student, teacher,
                 data: Calibration) -> None:
        import torch

        self.torch = torch
        self.opts, self.student, self.teacher = opts, student, teacher
        self.inputs = list(student.input_names)
        self.notes: list[str] = []
        n = data.num_samples
        n_hold = int(round(n * opts.holdout)) if opts.holdout > 0 else 0
        if opts.holdout > 0 and n_hold < 1:
            n_hold = 1
        if n - n_hold < 1:
            raise CalibrationNeededError(f"{opts.name}: {n} samples leave none to train on after holding out {n_hold}")
        if n_hold:  # Calibration.split: whole sources where the samples name theirs, else the last samples
            fit, held = data.split(opts.holdout)
            self.heldout_source = f"{held.source}: {held.num_samples} samples held out from distillation"
        else:
            fit = held = data
            self.heldout_source = f"{data.source}: the training samples (holdout 0)"
            self.notes.append("holdout 0: early stopping and fidelity use the training samples themselves")
        self.fit, self.held = dict(fit.arrays), dict(held.arrays)
        cut = self.n_fit = fit.num_samples
        self.n_held = held.num_samples if n_hold else 0
        if cut < SMALL_DATA:
            self.notes.append(f"only {cut} training samples: distillation may overfit them")
        if getattr(data, "is_random", False):
            self.notes.append("distilled on random data: the student learns the teacher only near random inputs")
        self.batch = min(batch_size_for(student_model, opts.batch_size), cut)
        self.image_inputs = _image_inputs(student_model) if opts.augment != "none" else {}
        # NHWC in memory: torch's CPU convolutions (depthwise ones above all) run about 2.5x faster
        # forward and backward (EfficientNet-Lite1, batch 32, 240x240: 28 s -> 11 s a step)
        self.channels_last = {name for name, layout in _image_inputs(student_model).items() if layout == "NCHW"}
        if self.channels_last:
            for module in (student, teacher):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        self.features = _changed_features(student_model, teacher_model) if opts.feature_matching else []
        # The teacher only runs forward: ONNX Runtime does that several times faster than the torch
        # executor, which stays only where layer features are matched (ORT does not expose them).
        self.teacher_session = None if self.features else runtime.session(teacher_model)
        self.teacher_cache = self._teacher_outputs(self.held)

    # -------------------------------------------------------------- data

    def heldout_inputs(self) -> dict[str, np.ndarray]:
        return {k: self.held[k] for k in self.inputs}

    def _tensors(self, arrays: Mapping[str, np.ndarray]) -> dict:
        tensors = {k: self.torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        if self.channels_last:
            tensors = {k: t.contiguous(memory_format=self.torch.channels_last) if k in self.channels_last else t
                       for k, t in tensors.items()}
        return tensors

    def _feeds(self, batch: Mapping) -> dict:
        return {k: batch[k] for k in self.inputs}

    def _chunks(self, arrays: Mapping[str, np.ndarray]):
        """`arrays` in batches of `self.batch` samples, as arrays."""
        n = len(next(iter(arrays.values())))
        for start in range(0, n, self.batch):
            yield {k: v[start:start + self.batch] for k, v in arrays.items()}

    def _teacher_outputs(self, arrays: Mapping[str, np.ndarray]) -> list[list]:
        return [self._teacher(chunk) for chunk in self._chunks(arrays)]

    def _teacher(self, arrays: Mapping[str, np.ndarray]) -> list:
        """The teacher's outputs (and matched features) for one batch of arrays, as torch tensors."""
        if self.teacher_session is None:
            with self.torch.no_grad():
                return self.teacher(self._feeds(self._tensors(arrays)), self.features)
        got = self.teacher_session.run(None, {k: np.ascontiguousarray(arrays[k]) for k in self.inputs})
        return [self.torch.from_numpy(np.asarray(g)) for g in got]

    def _augment(self, arrays: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        mode = self.opts.augment
        for name, layout in self.image_inputs.items():
            x = arrays[name]
            if mode in ("auto", "crop"):
                x = _random_shift(x, layout, rng)
            if mode in ("auto", "flip"):
                flip = rng.random(len(x)) < 0.5
                x = x.copy()
                x[flip] = np.flip(x[flip], axis=3 if layout == "NCHW" else 2)
            arrays[name] = x
        return arrays

    # -------------------------------------------------------------- loss

    def loss(self, student_out: Sequence, teacher_out: Sequence, batch: Mapping) -> Any:
        n_out = len(self.student.output_names)
        if self.opts.loss_fn is not None:
            value = self.opts.loss_fn(list(student_out[:n_out]), list(teacher_out[:n_out]), dict(batch))
        else:
            value = _kd_loss(self.torch, student_out[:n_out], teacher_out[:n_out], self.opts.temperature, self.opts.alpha)
        matched = [(s, t) for s, t in zip(student_out[n_out:], teacher_out[n_out:]) if s.shape == t.shape]
        if matched:
            value = value + sum(_relative_mse(self.torch, s, t) for s, t in matched) / len(matched)
        return value

    def evaluate(self) -> tuple[float, float | None]:
        """(held-out loss, top-1 agreement of the first class-score output or None), without augmentation."""
        torch = self.torch
        self.student.eval()
        total, count, agree, rows = 0.0, 0, 0, 0
        with torch.no_grad():
            for batch, t_out in zip(map(self._tensors, self._chunks(self.held)), self.teacher_cache):
                s_out = self.student(self._feeds(batch), self.features)
                size = len(next(iter(batch.values())))
                total += float(self.loss(s_out, t_out, batch)) * size
                count += size
                scores = next((i for i, t in enumerate(t_out[:len(self.student.output_names)]) if _is_scores(t)), None)
                if scores is not None:
                    agree += int((s_out[scores].argmax(1) == t_out[scores].argmax(1)).sum())
                    rows += len(t_out[scores])
        self.student.train()
        return total / max(count, 1), (agree / rows if rows else None)

    # -------------------------------------------------------------- loop

    def train(self) -> dict[str, Any]:
        threads = self.torch.get_num_threads()
        if self.opts.threads:
            self.torch.set_num_threads(self.opts.threads)
        try:
            with self.torch.random.fork_rng(devices=[]):  # seed for this run only; the caller's RNG is left as it was
                return self._train()
        finally:
            self.torch.set_num_threads(threads)

    def _train(self) -> dict[str, Any]:
        torch, opts = self.torch, self.opts
        torch.manual_seed(opts.seed)
        rng = np.random.default_rng(opts.seed)
        steps = opts.steps if opts.steps is not None or opts.minutes is not None else DEFAULT_STEPS
        deadline = time.perf_counter() + 60.0 * opts.minutes if opts.minutes is not None else math.inf
        per_epoch = max(1, math.ceil(self.n_fit / self.batch))
        eval_every = opts.eval_every or min(100, max(10, per_epoch))
        params = list(self.student.weights)
        optimizer = torch.optim.Adam(params, lr=opts.lr)
        start = time.perf_counter()
        best_loss, best_agreement = self.evaluate()
        before = (best_loss, best_agreement)
        best_state, best_step = [p.detach().clone() for p in params], 0
        curve = [(0, None, best_loss, best_agreement)]
        train_losses: list[float] = []
        stale, step, stopped = 0, 0, "step budget"
        bar = _Progress(opts.progress, steps if steps is not None else None, opts.minutes)
        self.student.train()
        order = np.empty(0, dtype=np.int64)
        while True:
            if steps is not None and step >= steps:
                stopped = "step budget"
                break
            if time.perf_counter() >= deadline:
                stopped = "time budget"
                break
            if len(order) < self.batch:
                order = np.concatenate([order, rng.permutation(self.n_fit)])
            idx, order = np.sort(order[:self.batch]), order[self.batch:]
            arrays = self._augment({k: v[idx] for k, v in self.fit.items()}, rng)
            batch = self._tensors(arrays)
            t_out = self._teacher(arrays)
            s_out = self.student(self._feeds(batch), self.features)
            loss = self.loss(s_out, t_out, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            train_losses.append(float(loss.detach()))
            if step % eval_every == 0 or step == steps:
                held_loss, agreement = self.evaluate()
                curve.append((step, float(np.mean(train_losses[-eval_every:])), held_loss, agreement))
                if held_loss < best_loss:
                    best_loss, best_agreement, best_step, stale = held_loss, agreement, step, 0
                    best_state = [p.detach().clone() for p in params]
                else:
                    stale += 1
                bar.update(step, train_losses[-1], held_loss, agreement)
                if opts.patience and stale >= opts.patience:
                    stopped = f"early stopping (held-out loss not better for {opts.patience} evaluations)"
                    break
            else:
                bar.update(step, train_losses[-1], None, None)
        bar.close()
        with torch.no_grad():
            for p, best in zip(params, best_state):
                p.copy_(best)
        seconds = time.perf_counter() - start
        return {
            "steps": step, "best_step": best_step, "stopped": stopped, "seconds": seconds,
            "lr": opts.lr, "temperature": opts.temperature, "alpha": opts.alpha, "batch_size": self.batch,
            "augment": {k: f"{opts.augment} ({layout})" for k, layout in self.image_inputs.items()} or "none",
            "freeze_norm": opts.freeze_norm, "seed": opts.seed, "threads": torch.get_num_threads(),
            "fit_samples": self.n_fit, "heldout_samples": self.n_held, "trainable_tensors": len(params),
            "trainable_parameters": int(sum(p.numel() for p in params)),
            "features_matched": list(self.features), "custom_loss": opts.loss_fn is not None,
            "heldout_loss": {"before": before[0], "after": best_loss},
            "heldout_top1_agreement_torch": {"before": before[1], "after": best_agreement},
            "train_loss": {"first": train_losses[0] if train_losses else None,
                           "last": train_losses[-1] if train_losses else None,
                           "min": min(train_losses) if train_losses else None},
            "loss_curve": [{"step": s, "train_loss": t, "heldout_loss": h, "heldout_top1_agreement": a}
                           for s, t, h, a in _thin(curve, CURVE_POINTS)],
            "notes": self.notes,
        }


def _feeds(arrays: Mapping[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(arrays.values())))
    return [{k: v[s:s + size] for k, v in arrays.items()} for s in range(0, n, size)]


def _summary(fidelity) -> str:
    if fidelity.top1_agreement is not None:
        return f"top-1 agreement {100 * fidelity.top1_agreement:.1f}%"
    return f"SQNR {fidelity.sqnr_db:.1f} dB"


def _kd_loss(torch, student_out: Sequence, teacher_out: Sequence, temperature: float, alpha: float):
    import torch.nn.functional as F

    terms = []
    for s, t in zip(student_out, teacher_out):
        if not t.is_floating_point():
            continue
        mse = _relative_mse(torch, s, t)
        if _is_scores(t):
            log_t = _log_probs(torch, t, temperature)
            log_s = _log_probs(torch, s, temperature)
            kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2
            terms.append(alpha * kl + (1.0 - alpha) * mse)
        else:
            terms.append(mse)
    if not terms:
        raise OnnxCompressError("distill: the model has no floating-point outputs to match (pass a loss_fn)")
    return sum(terms) / len(terms)


def _log_probs(torch, x, temperature: float):
    """log-softmax of logits at `temperature`; outputs that already are probabilities are treated as softmax(logits)."""
    if bool((x >= 0).all()) and bool(torch.allclose(x.sum(1), torch.ones_like(x[:, 0]), atol=1e-3)):
        x = torch.log(x.clamp_min(1e-12))
    return torch.log_softmax(x / temperature, dim=1)


def _relative_mse(torch, s, t):
    return ((s - t) ** 2).mean() / ((t.detach() ** 2).mean() + EPS)


def _is_scores(t) -> bool:
    return t.dim() == 2 and t.shape[1] > 1 and t.is_floating_point()


def _thin(points: list, keep: int) -> list:
    if len(points) <= keep:
        return points
    idx = sorted(set(np.linspace(0, len(points) - 1, keep).round().astype(int).tolist()))
    return [points[i] for i in idx]


def _image_inputs(model: ir.Model) -> dict[str, str]:
    """Input name -> "NCHW" or "NHWC" for 4-D float inputs that look like images (at least 8x8)."""
    found = {}
    for value in graph_inputs(model):
        dims = list(value.shape.dims) if value.shape is not None else []
        if len(dims) != 4 or value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
            continue
        c1, h, w, c3 = dims[1], dims[2], dims[3], dims[3]
        if isinstance(c1, int) and c1 <= 4 and isinstance(h, int) and isinstance(w, int) and min(h, w) >= 8:
            found[value.name] = "NCHW"
        elif isinstance(c3, int) and c3 <= 4 and isinstance(dims[1], int) and isinstance(dims[2], int) and min(dims[1], dims[2]) >= 8:
            found[value.name] = "NHWC"
    return found


def _random_shift(x: np.ndarray, layout: str, rng: np.random.Generator) -> np.ndarray:
    """Random crops of the edge-padded images at the original size (shifts of up to CROP_FRACTION)."""
    h_axis, w_axis = (2, 3) if layout == "NCHW" else (1, 2)
    h, w = x.shape[h_axis], x.shape[w_axis]
    ph, pw = max(1, int(h * CROP_FRACTION)), max(1, int(w * CROP_FRACTION))
    pad = [(0, 0)] * 4
    pad[h_axis], pad[w_axis] = (ph, ph), (pw, pw)
    padded = np.pad(x, pad, mode="edge")
    out = np.empty_like(x)
    dy = rng.integers(0, 2 * ph + 1, size=len(x))
    dx = rng.integers(0, 2 * pw + 1, size=len(x))
    for i in range(len(x)):
        if layout == "NCHW":
            out[i] = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        else:
            out[i] = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w, :]
    return out


def _changed_features(student: ir.Model, teacher: ir.Model) -> list[str]:
    """Outputs of Conv/ConvTranspose/Gemm/MatMul nodes whose weights differ from the teacher's, present in both."""
    teacher_values = {}
    for node in teacher.graph:
        for v in node.outputs:
            teacher_values[v.name] = node
    t_inits = teacher.graph.initializers
    names = []
    graph_outputs = {v.name for v in student.graph.outputs}
    for node in student.graph:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or not node.outputs:
            continue
        out = node.outputs[0].name
        if out not in teacher_values or out in graph_outputs:
            continue
        weights = [v for v in node.inputs[1:] if v is not None and v.const_value is not None]
        changed = any(
            v.name not in t_inits or t_inits[v.name].const_value is None
            or t_inits[v.name].const_value.shape != v.const_value.shape
            or not np.array_equal(t_inits[v.name].const_value.numpy(), v.const_value.numpy())
            for v in weights
        )
        if changed:
            names.append(out)
    return names


class _Progress:
    """Training steps, loss and held-out agreement: into the command's progress reporter when one is
    open (see progress.py), else a display of its own on an interactive stderr only (API use stays quiet)."""

    def __init__(self, enabled: bool, steps: int | None, minutes: float | None) -> None:
        from .. import progress

        self.reporter, self.own, self.steps, self.held = None, None, steps, ""
        if not enabled:
            return
        self.reporter = progress.current()
        self.prefix = "distill " if self.reporter is not None else ""
        if self.reporter is None and sys.stderr.isatty():
            self.own = progress.progress("distill")
            self.reporter = self.own.__enter__()

    def update(self, step: int, loss: float, held_loss: float | None, agreement: float | None) -> None:
        if self.reporter is None:
            return
        if held_loss is not None:
            self.held = f", held-out loss {held_loss:.4g}" + (f", top-1 {100 * agreement:.1f}%" if agreement is not None else "")
        count = f"{step}/{self.steps}" if self.steps else str(step)
        self.reporter.update(f"{self.prefix}step {count}, loss {loss:.4g}{self.held}")

    def close(self) -> None:
        if self.own is not None:
            self.own.__exit__(None, None, None)


__all__ = ["Distill", "distill", "parse_budget"]
