"""The pass contract and the pipeline that runs passes, verifies each one and reports what changed.

A pass is a small dataclass: a `name`, its options as fields, and one `run(model, ctx)` method.
The same dataclass fields are the YAML recipe keys, the Python keyword arguments and the CLI's
`--set PASS.OPTION=VALUE` (cli_pass_flags.py), so the CLI, the API and recipes cannot drift apart.
A field's help text lives with it (`option(default, "help")`, read back by `option_help`); a field
with `metadata={"api_only": True}` is a Python-only keyword, not a recipe or CLI option.
"""

from __future__ import annotations

import dataclasses
import re
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import onnx_ir as ir
import yaml

from .calibration import Calibration, batch_size_for
from .errors import RecipeError
from .model import ModelLike, load, resolve_input_shapes
from .report import Fidelity, ModelStats, PassRecord, RunReport
from .verify import PassVerifier, VerifyOptions, random_feeds, reference_outputs

if TYPE_CHECKING:
    from .analysis.statistics import Statistics

A = TypeVar("A")
Analysis = Callable[[ir.Model, "PassContext"], Any]
RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass(frozen=True)
class PassResult:
    model: ir.Model
    modified: bool
    record: PassRecord
    preserved: frozenset = frozenset()  # analyses still valid after this pass


@dataclass
class PassContext:
    """What passes share: calibration data, input shapes, and lazily computed, cached analyses."""

    calibration: Calibration | None = None
    input_shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    input_values: Mapping[str, np.ndarray] = field(default_factory=dict)  # fixed synthetic inputs (--input sr=16000)
    model: ir.Model | None = None
    original: ir.Model | None = None  # the pipeline's input, untouched: the reference (teacher) for passes that fit to it
    # Calibration statistics per model state (analysis/statistics.py): one run of the model per state,
    # kept across passes, and across pipelines that share it (a search's candidates).
    statistics: Statistics = field(default_factory=lambda: _statistics(), repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def get(self, analysis: Callable[[ir.Model, PassContext], A]) -> A:
        """The result of `analysis(model, ctx)` for the current model, computed once until invalidated."""
        if analysis not in self._cache:
            self._cache[analysis] = analysis(self.model, self)
        return self._cache[analysis]

    def invalidate(self, preserved: frozenset = frozenset()) -> None:
        self._cache = {k: v for k, v in self._cache.items() if k in preserved}


def _statistics() -> Statistics:
    from .analysis.statistics import Statistics

    return Statistics()


def cost_analysis(model: ir.Model, ctx: PassContext):
    """Per-node and total costs of the current model (a PassContext analysis)."""
    from .analysis.cost import analyze_cost

    return analyze_cost(model, ctx.input_shapes)


class Pass:
    """Base of all passes. Subclasses are dataclasses with a `name` and a `run` method."""

    name: ClassVar[str]
    exact: ClassVar[bool] = True  # outputs must not change beyond VerifyOptions.rtol
    registry: ClassVar[dict[str, type[Pass]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            Pass.registry[cls.name] = cls

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def result(
        self,
        model: ir.Model,
        *,
        changes: Sequence[str] = (),
        skipped: Sequence[str] = (),
        details: Mapping[str, Any] | None = None,
        modified: bool | None = None,
        preserved: frozenset = frozenset(),
    ) -> PassResult:
        modified = bool(changes) if modified is None else modified
        record = PassRecord(
            name=self.name, modified=modified, seconds=0.0, changes=tuple(changes), skipped=tuple(skipped),
            details=dict(details or {}),
        )
        return PassResult(model, modified, record, preserved)

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


@dataclass(frozen=True)
class RunResult:
    model: ir.Model
    report: RunReport


class Pipeline:
    def __init__(self, passes: Sequence[Pass], *, verify: VerifyOptions | None = VerifyOptions()):
        self.passes = list(passes)
        self.verify = verify or VerifyOptions(enabled=False)

    @classmethod
    def from_recipe(cls, source: str | Path | Mapping | Sequence) -> Pipeline:
        """From a YAML file, a built-in recipe name, a mapping `{passes: [...], verify: {...}}` or a list of passes."""
        spec = load_recipe(source)
        passes = [build_pass(p, where=f"pass {i + 1}") for i, p in enumerate(spec["passes"])]
        verify = _build_options(VerifyOptions, spec.get("verify") or {}, "verify")
        return cls(passes, verify=verify)

    def run(
        self,
        model: ModelLike,
        *,
        calibration: Calibration | Mapping[str, np.ndarray] | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        on_pass: Callable[[str], None] | None = None,
        input_values: Mapping[str, Any] | None = None,
        teacher: ModelLike | None = None,
        statistics: Statistics | None = None,
    ) -> RunResult:
        """`input_values` fixes inputs of the synthetic verification feeds (name -> a value broadcast
        to the input's shape); calibration data, when given, is fed as it is. `teacher` is the model
        recovery passes (distill) match, when this run's input is already a compressed one (the
        search's candidates); default: the input. Verification always compares with the input.
        `statistics`: calibration statistics kept from other runs on the same data (a search's)."""
        from .feeds import check_input_values

        source = str(model) if isinstance(model, (str, Path)) else type(model).__name__
        original = load(model)
        if calibration is not None and not isinstance(calibration, Calibration):
            calibration = Calibration.from_arrays(original, calibration)
        given = {**(calibration.sample_shapes(original) if calibration else {}), **(input_shapes or {})}
        shapes = resolve_input_shapes(original, given)
        values = check_input_values(original, input_values)
        ctx = PassContext(calibration=calibration, input_shapes=shapes, input_values=values, model=original)
        if statistics is not None:
            ctx.statistics = statistics
        before_cost = ctx.get(cost_analysis)
        before = before_cost.stats

        feeds, feed_source = self._verification_feeds(original, ctx)
        verifier = None
        if self.verify.enabled:
            # From the input's own file where there is one: a model loaded from a path is not copied to run it.
            path = Path(model) if isinstance(model, (str, Path)) else None
            reference = reference_outputs(original if path is None else path, feeds, feed_source)
            verifier = PassVerifier(self.verify, feeds, feed_source, reference, original, path)

        current = load(original)  # passes work on a copy; the original stays the reference
        notes = list(before_cost.notes)  # how If/Loop/Scan bodies were counted, where it is an estimate
        if _fill_output_shapes(current):
            notes.append("graph output shapes were missing and have been inferred (the full checker requires them)")
        ctx.model, ctx.original, ctx._cache = current, (original if teacher is None else load(teacher)), {}
        records: list[PassRecord] = []
        fidelity: Fidelity | None = None
        for p in self.passes:
            if on_pass:
                on_pass(p.name)
            stats_before = ctx.get(cost_analysis).stats
            if verifier:
                verifier.before(p.name, p.exact, current)
            start = time.perf_counter()
            result = p.run(current, ctx)
            seconds = time.perf_counter() - start
            current = result.model
            ctx.model = current
            ctx.invalidate(result.preserved if result.modified else frozenset(ctx._cache))
            unverified = None
            if verifier:
                fidelity, unverified = verifier.after(p.name, p.exact, result.modified, current)
            records.append(
                dataclasses.replace(
                    result.record, seconds=seconds, before=stats_before, after=ctx.get(cost_analysis).stats,
                    fidelity=fidelity, verification_skipped=unverified,
                )
            )
        after: ModelStats = ctx.get(cost_analysis).stats
        if self.verify.enabled and calibration is None:
            notes.append(f"verified on {feed_source} inputs: pass --calib for fidelity on real data")
        report = RunReport(
            input=source, output=None, before=before, after=after, passes=tuple(records),
            fidelity=fidelity, verified=self.verify.enabled, notes=tuple(notes),
        )
        return RunResult(current, report)

    def _verification_feeds(self, model: ir.Model, ctx: PassContext) -> tuple[list[dict[str, np.ndarray]], str]:
        n = self.verify.samples
        if ctx.calibration is not None:
            # The last samples: passes that fit to calibration data (recovery) hold out the end of it,
            # or, where the samples name their sources, whole sources.
            calib = ctx.calibration
            if (calib.source_count or 0) >= 2:
                calib = calib.split(FITTING_HOLDOUT)[1]
            size = batch_size_for(model, 1)
            count = min(calib.num_samples, max(n, size) // size * size)
            tail = calib.samples(calib.num_samples - count)
            feeds = [f for f in tail.batches(size) if len(next(iter(f.values()))) == size]
            return feeds, f"{calib.source} (last {count} samples)"
        from .feeds import describe_source

        seed = self.verify.seed
        feeds = random_feeds(model, ctx.input_shapes, count=n, seed=seed, values=ctx.input_values)
        return feeds, describe_source(seed, ctx.input_values)


#: The share of the calibration samples recovery holds out (passes/recover/ HOLDOUT): verification
#: feeds come from it, so the reported fidelity is not measured on samples a pass fitted to.
FITTING_HOLDOUT = 0.2


def _fill_output_shapes(model: ir.Model) -> bool:
    """Infer the shapes of graph outputs that declare none (symbolic dims stay symbolic)."""
    if all(v.shape is not None for v in model.graph.outputs):
        return False
    import onnx_ir.passes.common as common

    try:
        common.ShapeInferencePass(strict_mode=False)(model)
    except Exception:  # verification will report what is wrong, with the pass name
        return False
    return all(v.shape is not None for v in model.graph.outputs)


# ---------------------------------------------------------------------------- recipes


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(source: str | Path | Mapping | Sequence) -> dict[str, Any]:
    """A recipe as `{"passes": [...], "verify": {...}}`, from a file, a built-in name or data."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.suffix and (RECIPES_DIR / f"{source}.yaml").is_file():
            path = RECIPES_DIR / f"{source}.yaml"
        if not path.is_file():
            raise RecipeError(f"recipe '{source}' not found (built-in recipes: {', '.join(recipe_names())})")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise RecipeError(f"{path}: invalid YAML{where}") from None
        name = str(path)
    else:
        data, name = source, "recipe"
    if isinstance(data, Sequence) and not isinstance(data, str):
        data = {"passes": list(data)}
    if not isinstance(data, Mapping) or not isinstance(data.get("passes"), list) or not data["passes"]:
        raise RecipeError(f"{name}: a recipe needs a non-empty 'passes' list")
    extra = set(data) - {"passes", "verify", "description"}
    if extra:
        raise RecipeError(f"{name}: unknown top-level key '{sorted(extra)[0]}' (allowed: passes, verify, description)")
    return dict(data)


def build_pass(spec: Mapping[str, Any] | str, *, where: str = "pass") -> Pass:
    """`{"type": "fuse-batchnorm", ...options}` (or just the type name) -> a Pass instance."""
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise RecipeError(f"{where}: each pass needs a 'type' (one of: {', '.join(pass_names())})")
    kind = spec["type"]
    cls = pass_class(kind, where)
    options = {k: v for k, v in spec.items() if k != "type"}
    return _build_options(cls, options, f"{where} ({kind})")


def pass_names() -> list[str]:
    """Every registered pass type, sorted."""
    _register_builtin_passes()
    return sorted(Pass.registry)


def pass_class(kind: str, where: str = "pass") -> type[Pass]:
    _register_builtin_passes()
    cls = Pass.registry.get(kind)
    if cls is None:
        raise RecipeError(f"{where}: unknown pass type '{kind}' (known: {', '.join(pass_names())})")
    return cls


def option(default: Any, help: str) -> Any:
    """A pass field with its help text, which the CLI shows for the field (short flag or --set)."""
    return field(default=default, metadata={"help": help})


def option_help(cls: type, name: str) -> str:
    """The help text a pass field was declared with (`option`), or "" for a field without one."""
    return next((f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name), "")


def option_names(cls: type, *, python_only: bool = True) -> list[str]:
    """A pass's option names in declaration order; `python_only=False` leaves out the keywords marked
    `api_only` (functions, arrays: no recipe or command line can give them)."""
    return [f.name for f in dataclasses.fields(cls) if f.init and (python_only or not f.metadata.get("api_only"))]


def coerce_option(cls: type, name: str, value: Any, where: str) -> Any:
    """`value` checked (and gently converted) as option `name` of `cls`, exactly as in a recipe."""
    names = option_names(cls)
    if name not in names:
        raise RecipeError(f"{where}: unknown option '{name}' (options: {', '.join(names) or 'none'})")
    return _coerce(value, typing.get_type_hints(cls)[name], f"{where}: option '{name}'")


def _register_builtin_passes() -> None:
    from . import passes  # noqa: F401  (importing registers them)


def _build_options(cls: type, options: Mapping[str, Any], where: str):
    kwargs = {key: coerce_option(cls, key, value, where) for key, value in options.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{where}: {exc}") from None


#: A number in exponent notation without a decimal point, which YAML 1.1 leaves a string (5e-05).
_EXPONENT_NUMBER = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check (and gently convert) a recipe value against a dataclass field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise RecipeError(f"{where}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (tuple, list, Sequence) or hint in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, where) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):  # YAML 1.1 reads 1e-3 as text
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: must be a string, got {value!r}")
        return value
    return value
