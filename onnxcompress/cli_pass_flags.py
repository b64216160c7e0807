"""`optimize`'s pass flags: short aliases of pass fields, `--quantize`/`--distill`, and `--set`.

Every pass option is reachable as `--set PASS.OPTION=VALUE`: VALUE is read as a YAML value and
checked by the code that checks recipes (pipeline.coerce_option). The short flags users know
(`--prune 0.3` is prune-channels.ratio) are ALIASES of pass fields: their type and help text come
from the field; the checks each always had are in `_check_flags`. `--quantize` and `--distill`
choose a pass (and its bits or budget) rather than set one field.

How they combine (`pass_specs`): each pass asked for becomes one spec, which `optimize` merges into
the recipe's pass of that type (overriding the recipe's options) or inserts where the pipeline order
puts it; in the search, these specs close (int8) or recover (distill) its candidates.
prune-channels options without a ratio shape whatever prunes instead: the search, --target-macs,
or a recipe's prune-channels pass. One option given twice (a flag and --set, or two --set) is an
error rather than a silent choice between them.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

import typer

from .errors import OnnxCompressError, RecipeError


@dataclass(frozen=True)
class Alias:
    """A short flag for one pass field; `note` is what the flag adds to the field's own help."""

    flag: str
    target: str  # PASS.FIELD
    note: str = ""

    @property
    def pass_name(self) -> str:
        return self.target.split(".", 1)[0]

    @property
    def field(self) -> str:
        return self.target.split(".", 1)[1]

    @property
    def param(self) -> str:
        """The command function's keyword for this flag."""
        return self.flag.removeprefix("--").replace("-", "_")


ALIASES: tuple[Alias, ...] = (
    Alias("--prune", "prune-channels.ratio", "a fixed recipe: no search"),
    Alias("--importance", "prune-channels.importance"),
    Alias("--round-to", "prune-channels.round_to"),
    Alias("--factorize", "factorize.rank_ratio"),
    Alias("--factorize-energy", "factorize.energy"),
    Alias("--factorize-budget", "factorize.mac_budget"),
    Alias("--latency-aware", "factorize.latency_aware", "timed on the --target provider; with a factorize option"),
    Alias("--block-size", "quantize-weight-only.block_size", "with --quantize int4 or int8-weight"),
    Alias("--calib-method", "quantize-int8.method"),
    Alias("--preset", "quantize-int8.preset", "default tensorrt with --target tensorrt"),
    Alias("--smooth", "quantize-int8.smooth_alpha"),
)

#: --quantize values -> the pass each one runs; weight-only values also fix its bits.
QUANTIZE = {"int8": "quantize-int8", "dynamic": "quantize-dynamic", "int4": "quantize-weight-only",
            "int8-weight": "quantize-weight-only"}
WEIGHT_ONLY = {"int4": 4, "int8-weight": 8}
#: How each quantize pass is asked for, for messages.
QUANTIZE_FLAG = {"quantize-int8": "--quantize int8", "quantize-dynamic": "--quantize dynamic",
                 "quantize-weight-only": "weight-only quantization (--quantize int4 or int8-weight)"}
FACTORIZE_MODES = ("rank_ratio", "energy", "mac_budget")

QUANTIZE_HELP = ("Quantize: int8 (static QDQ, needs --calib), dynamic (int8 weights, no calibration), or weight-only int4 / "
                 "int8-weight (MatMul/Gemm weights in blocks; GPTQ with --calib, else round-to-nearest; smaller files for "
                 "transformer models; --target tensorrt writes DequantizeLinear instead of MatMulNBits).")
DISTILL_HELP = ("Distill the compressed model from the original on the calibration data: steps (500) or time (2m, 90s); "
                "needs the torch extra.")
SET_HELP = ("Set any option of any pass: PASS.OPTION=VALUE, e.g. quantize-int8.weight_rounding=learned (repeatable; "
            "VALUE read as in a YAML recipe). It overrides that option of the recipe's pass, or adds "
            "the pass where the pipeline order puts it; prune-channels options without a ratio shape the search's "
            "pruning. An option set twice (here and by its short flag) is an error. `onnxcompress passes` lists them all.")


# ------------------------------------------------------------------------------- the typer parameters


def cli_type(hint: Any) -> type | None:
    """The command-line type of a field's type hint (Optional and a Literal of one type unwrapped);
    None for a field no single flag value can hold (tuples, mappings)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            return None
        hint = args[0]
    if typing.get_origin(hint) is Literal:
        kinds = {type(a) for a in typing.get_args(hint)}
        return kinds.pop() if len(kinds) == 1 else None
    return hint if hint in (bool, int, float, str) else None


def alias_help(alias: Alias) -> str:
    """The field's own help, the flag's note, and which field it sets with the pass's default."""
    from .pipeline import option_help, pass_class

    cls = pass_class(alias.pass_name)
    default = next(f.default for f in cls.__dataclass_fields__.values() if f.name == alias.field)
    text = option_help(cls, alias.field).rstrip(".")
    if alias.note:
        text += f"; {alias.note}"
    shown = "" if default is None or isinstance(default, bool) else f", pass default {default}"
    return f"{text}. ({alias.target}{shown})"


def parameters() -> list[inspect.Parameter]:
    """The pass flags as keyword-only parameters typer reads: the aliases, --quantize, --distill, --set."""
    from .pipeline import pass_class

    def keyword(name: str, kind: Any, option: Any, default: Any = None) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option])

    params = []
    for alias in ALIASES:
        kind = cli_type(typing.get_type_hints(pass_class(alias.pass_name))[alias.field])
        option = typer.Option(alias.flag, help=alias_help(alias))
        params.append(keyword(alias.param, bool, option, False) if kind is bool else keyword(alias.param, Optional[kind], option))
    params.insert(next(i for i, a in enumerate(ALIASES) if a.pass_name.startswith("quantize")),
                  keyword("quantize", Optional[str], typer.Option("--quantize", help=QUANTIZE_HELP)))
    params.append(keyword("distill", Optional[str], typer.Option("--distill", help=DISTILL_HELP)))
    params.append(keyword("set", Optional[list[str]], typer.Option("--set", metavar="PASS.OPTION=VALUE", help=SET_HELP,
                                                                   callback=_check_settings)))
    return params


def with_pass_flags(command: Callable) -> Callable:
    """`command(..., **pass_flags)` declared to typer with the pass flags as its last options."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = signature.replace(parameters=[*own, *parameters()])
    return command


# ------------------------------------------------------------------------------ `onnxcompress passes`


def describe_passes(names: list[str] | None = None) -> list[str]:
    """Per pass its summary, then one line per option: name, type, default, help, short flag."""
    from .pipeline import option_help, option_names, pass_class, pass_names

    flags = {alias.target: alias.flag for alias in ALIASES}
    lines: list[str] = []
    for name in names or pass_names():
        cls = pass_class(name, "onnxcompress passes")
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        lines.append(f"{name}: {summary}")
        hints = typing.get_type_hints(cls)
        for field in option_names(cls, python_only=False):
            default = cls.__dataclass_fields__[field].default
            shown = "" if default is dataclasses.MISSING else f" = {_yaml_text(default)}"
            flag = f" ({flags[f'{name}.{field}']})" if f"{name}.{field}" in flags else ""
            text = option_help(cls, field)
            lines.append(f"  {field}: {_type_text(hints[field])}{shown}{flag}" + (f"  {text}" if text else ""))
    return lines


def _type_text(hint: Any) -> str:
    """A type hint as a recipe writer reads it: `float`, `a|b`, `list of str`, `int or null`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        text = " or ".join(_type_text(a) for a in rest)
        return f"{text} or null" if len(rest) < len(args) else text
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (tuple, list):
        return f"list of {_type_text(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def _yaml_text(value: Any) -> str:
    """A default as YAML writes it (null, true, [a, b])."""
    import yaml

    return yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True).strip().removesuffix("\n...").strip()


# ---------------------------------------------------------------------------------------------- --set


@dataclass(frozen=True)
class Setting:
    pass_name: str
    field: str
    value: Any


def parse_setting(text: str, where: str | None = None) -> Setting:
    """`PASS.OPTION=VALUE` checked against the pass registry; RecipeError names what is valid."""
    from .pipeline import option_names, pass_class, pass_names

    where = f"--set {text}" if where is None else where
    target, sep, raw = text.partition("=")
    pass_name, dot, name = target.strip().partition(".")
    if not sep or not dot or not pass_name or not name:
        raise RecipeError(f"{where}: expected PASS.OPTION=VALUE, e.g. prune-channels.seed=3 "
                          f"(passes: {', '.join(pass_names())})")
    cls = pass_class(pass_name, where)
    options = option_names(cls, python_only=False)
    if name not in options:
        listed = ", ".join(options) or "none"
        why = "Python-only option" if name in option_names(cls) else "unknown option"
        raise RecipeError(f"{where}: {why} '{name}' of {pass_name} (options: {listed})")
    return Setting(pass_name, name, _value(cls, name, raw, where))


def _value(cls: type, name: str, raw: str, where: str) -> Any:
    """`raw` read as YAML and checked as a recipe value. YAML 1.1 reads `off` and `no` as booleans:
    where that reading fails, the text itself is tried (`quantize-int8.outliers=off`)."""
    import yaml

    from .pipeline import coerce_option

    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError:
        parsed = raw
    try:
        return coerce_option(cls, name, parsed, where)
    except RecipeError:
        if parsed == raw:
            raise
    try:
        return coerce_option(cls, name, raw, where)
    except RecipeError:
        return coerce_option(cls, name, parsed, where)  # the error of the YAML reading


def _check_settings(value: Optional[list[str]]) -> Optional[list[str]]:
    """Every --set checked while the command line is parsed: a usage error, before any work."""
    for text in value or ():
        try:
            parse_setting(text, where=text)  # the parser's message names --set already
        except RecipeError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


# ------------------------------------------------------------------------------------- the pass specs


def pass_specs(flags: Mapping[str, Any], target: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(pass specs, prune-channels options for whatever prunes) from the pass flags of `optimize`."""
    requested, sources = _requested(flags)
    _check_flags(requested, sources, flags.get("quantize"))
    prune = requested.pop("prune-channels", {})
    specs = [{"type": "prune-channels", **prune}] if "ratio" in prune else []
    specs += [{"type": kind, **options, **_target_defaults(kind, options, target)} for kind, options in requested.items()]
    return specs, {k: v for k, v in prune.items() if k != "ratio"}


def _requested(flags: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """{pass: {option: value}} for every pass the flags ask for, and {PASS.OPTION: the flag that set it}."""
    requested: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}

    def put(kind: str, name: str, value: Any, source: str) -> None:
        key = f"{kind}.{name}"
        if key in sources:
            raise OnnxCompressError(f"{source} and {sources[key]} both set {key}: give it once")
        sources[key] = source
        requested.setdefault(kind, {})[name] = value

    for alias in ALIASES:
        value = flags.get(alias.param)
        if value is not None and value is not False:  # a flag left out
            put(alias.pass_name, alias.field, value, alias.flag)
    quantize = flags.get("quantize")
    if quantize is not None:
        if quantize not in QUANTIZE:
            raise OnnxCompressError(f"--quantize {quantize}: choose int8 (static, needs --calib), dynamic, int4 or int8-weight")
        requested.setdefault(QUANTIZE[quantize], {})
        if quantize in WEIGHT_ONLY:
            put(QUANTIZE[quantize], "bits", WEIGHT_ONLY[quantize], f"--quantize {quantize}")
    if flags.get("distill") is not None:
        from .passes.distill import parse_budget

        for name, value in parse_budget(flags["distill"]).items():
            put("distill", name, value, "--distill")
    for text in flags.get("set") or ():
        setting = parse_setting(text)
        put(setting.pass_name, setting.field, setting.value, f"--set {setting.pass_name}.{setting.field}")
    return requested, sources


def _check_flags(requested: Mapping[str, Mapping[str, Any]], sources: Mapping[str, str], quantize: str | None) -> None:
    """The checks the short flags always had: each asks for something the other flags must allow."""
    chosen = QUANTIZE.get(quantize)
    if sources.get("quantize-weight-only.block_size") == "--block-size" and chosen != "quantize-weight-only":
        raise OnnxCompressError("--block-size applies to weight-only quantization: add --quantize int4 or int8-weight")
    factorize = requested.get("factorize", {})
    if factorize.get("latency_aware") and not any(factorize.get(mode) is not None for mode in FACTORIZE_MODES):
        raise OnnxCompressError(f"{sources['factorize.latency_aware']} applies to factorization: add --factorize, "
                                "--factorize-energy or --factorize-budget")
    for kind, options in requested.items():
        if kind in QUANTIZE_FLAG and chosen not in (None, kind):  # --quantize picks one quantization
            given = [sources[f"{kind}.{name}"] for name in options]
            verb = "applies" if len(given) == 1 else "apply"
            raise OnnxCompressError(f"{' and '.join(given)} {verb} to {QUANTIZE_FLAG[kind]}, not --quantize {quantize}")


def _target_defaults(kind: str, options: Mapping[str, Any], target: str) -> dict[str, Any]:
    """What --target decides for a pass, unless its options say otherwise."""
    from .optimize import CPU_TARGETS, int8_kernels, provider_for

    defaults: dict[str, Any] = {}
    if kind == "factorize" and options.get("latency_aware"):
        defaults["provider"] = provider_for(target)
    elif kind == "quantize-int8":
        if target == "tensorrt":
            defaults["preset"] = "tensorrt"
        if target in CPU_TARGETS:
            defaults["kernels"] = int8_kernels(target)
    elif kind == "quantize-weight-only" and target == "tensorrt":  # no com.microsoft MatMulNBits there
        defaults["form"] = "dequantize-linear"
    return {k: v for k, v in defaults.items() if k not in options}
