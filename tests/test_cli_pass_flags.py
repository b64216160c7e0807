"""One name per pass option: every registered pass field works alike as a YAML recipe key, a Python
keyword and `optimize --set PASS.OPTION=VALUE`; the short flags are aliases of real fields; --set
errors are one line with the valid names; flags and --set merge into recipes as documented."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import onnx
import pytest
import typer
import yaml

from onnxcompress.cli import _USAGE_ERRORS, app
from onnxcompress.cli_pass_flags import ALIASES, cli_type, describe_passes, pass_specs
from onnxcompress.errors import ExitCode, OnnxCompressError
from onnxcompress.pipeline import Pass, build_pass, option_help, option_names, pass_names
from tests.graphs import conv_bn_relu_gemm
from tests.test_cli_newcomer import assert_one_line_error, run_cli

README = Path(__file__).resolve().parents[1] / "README.md"
#: Values the generic rule below would get wrong: options whose valid values are few.
VALID = {("quantize-weight-only", "bits"): 8, ("quantize-weight-only", "accuracy_level"): 0,
         ("factorize", "provider"): "cuda", ("weight-share", "bits"): 3, ("quantize-int8", "percentile"): 99.0}
#: Options a pass needs beside the one under test, the first that leaves it out (prune-blocks: how much to
#: prune; latency-aware factorize: a rank rule).
NEEDS = {"prune-blocks": [{"max_drop": 0.1}, {"count": 1}], "factorize": [{"energy": 0.9}, {"rank_ratio": 0.5}]}


def _command():
    return typer.main.get_command(app).commands["optimize"]


def _sample(cls: type, f: dataclasses.Field, hint) -> object:
    """A valid value for field `f` that differs from its default, as YAML and JSON can write it."""
    if (cls.name, f.name) in VALID:
        return VALID[(cls.name, f.name)]
    default = f.default
    if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return next(a for a in args if a != default)
    if origin is tuple:
        inner = args[0]
        return [typing.get_args(inner)[0]] if typing.get_origin(inner) is typing.Literal else ["node_a", "node_b"]
    if origin is dict:
        return {"node_a": 0.5}
    if hint is bool:
        return not default if isinstance(default, bool) else True
    if hint is int:
        return default + 1 if isinstance(default, int) else 64  # 64: a valid block size and sample count
    if hint is float:
        return default / 2 if default else 0.5
    raise AssertionError(f"{cls.name}.{f.name}: no sample for {hint}")


def _options():
    for name in pass_names():
        cls = Pass.registry[name]
        if not cls.__module__.startswith("onnxcompress."):  # passes other tests register in this process
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in option_names(cls, python_only=False):
                yield pytest.param(cls, f.name, _sample(cls, f, hints[f.name]), id=f"{name}.{f.name}")


def _built_from_cli(argv: list[str], kind: str, target: str = "cpu") -> Pass:
    """The pass `optimize ARGV` asks for, parsed by the real command's parser."""
    ctx = _command().make_context("optimize", ["m.onnx", "-o", "o.onnx", *argv])
    specs, prune = pass_specs(ctx.params, target)
    spec = next((s for s in specs if s["type"] == kind), None)
    return build_pass(spec if spec is not None else {"type": kind, **prune})


def test_every_pass_has_options_to_walk():
    walked = {p.values[0].name for p in _options()}
    assert len(walked) >= 11 and {"prune-channels", "quantize-int8", "factorize", "distill"} <= walked


@pytest.mark.parametrize("cls, name, value", list(_options()))
def test_every_option_has_one_name_in_yaml_python_and_cli(monkeypatch, cls, name, value):
    base = next((b for b in NEEDS.get(cls.name, []) if name not in b), {})
    if (cls.name, name) == ("factorize", "provider"):  # the sample names a GPU provider this machine may lack
        monkeypatch.setattr("onnxcompress.runtime.provider_chain", lambda provider: [provider])
    python = cls(**base, **{name: tuple(value) if isinstance(value, list) else value})
    assert getattr(python, name) != getattr(cls(**base), name), "the sample must change the option"
    written = ", ".join(f"{k}: {json.dumps(v)}" for k, v in {**base, name: value}.items())
    assert build_pass(yaml.safe_load(f"{{type: {cls.name}, {written}}}")) == python
    argv = [arg for k, v in {**base, name: value}.items() for arg in ("--set", f"{cls.name}.{k}={json.dumps(v)}")]
    from_cli = _built_from_cli(argv, cls.name)
    assert type(from_cli) is cls and getattr(from_cli, name) == getattr(python, name)


@pytest.mark.parametrize("alias", ALIASES, ids=[a.flag for a in ALIASES])
def test_each_short_flag_is_a_real_field_of_its_type(alias):
    cls = Pass.registry[alias.pass_name]
    assert alias.field in option_names(cls, python_only=False)
    assert option_help(cls, alias.field), "the field carries the flag's help text"
    field = cls.__dataclass_fields__[alias.field]
    kind = cli_type(typing.get_type_hints(cls)[alias.field])
    param = next(p for p in _command().params if alias.flag in p.opts)
    assert alias.target in param.help and option_help(cls, alias.field).rstrip(".") in param.help
    parse = lambda *argv: _command().make_context("optimize", ["m.onnx", "-o", "o.onnx", *argv]).params[alias.param]  # noqa: E731
    if kind is bool:  # a flag can only turn the option on
        assert param.is_flag and field.default is False and parse(alias.flag) is True
        return
    value = _sample(cls, field, typing.get_type_hints(cls)[alias.field])
    assert type(parse(alias.flag, str(value))) is kind is type(value)
    if kind is not str:
        with pytest.raises(_USAGE_ERRORS):
            parse(alias.flag, "lots")


@pytest.mark.parametrize("flags, settings", [
    (["--prune", "0.4", "--importance", "l1", "--round-to", "4"],
     ["prune-channels.ratio=0.4", "prune-channels.importance=l1", "prune-channels.round_to=4"]),
    (["--factorize-budget", "0.7", "--latency-aware"], ["factorize.mac_budget=0.7", "factorize.latency_aware=true"]),
    (["--calib-method", "minmax", "--smooth", "0.5", "--preset", "tensorrt"],
     ["quantize-int8.method=minmax", "quantize-int8.smooth_alpha=0.5", "quantize-int8.preset=tensorrt"]),
    (["--quantize", "int4", "--block-size", "64"], ["quantize-weight-only.bits=4", "quantize-weight-only.block_size=64"]),
    (["--distill", "2m"], ["distill.minutes=2"]),
])
def test_short_flags_and_set_ask_for_the_same_passes(flags, settings):
    def specs(argv):
        ctx = _command().make_context("optimize", ["m.onnx", "-o", "o.onnx", *argv])
        return pass_specs(ctx.params, "host")

    assert specs(flags) == specs([arg for s in settings for arg in ("--set", s)])


def test_the_target_decides_what_it_always_did_unless_set():
    assert _built_from_cli(["--set", "quantize-int8.bins=1024"], "quantize-int8", "tensorrt").preset == "tensorrt"
    assert _built_from_cli(["--set", "quantize-int8.kernels=vnni"], "quantize-int8", "cpu").kernels == "vnni"
    assert _built_from_cli(["--set", "quantize-int8.bins=1024"], "quantize-int8", "vnni").kernels == "vnni"
    assert _built_from_cli(["--quantize", "int4"], "quantize-weight-only", "tensorrt").form == "dequantize-linear"
    specs, _ = pass_specs({"factorize": 0.5, "latency_aware": True}, "cuda")  # built, it would look for a GPU
    assert specs == [{"type": "factorize", "rank_ratio": 0.5, "latency_aware": True, "provider": "cuda"}]


def test_yaml_words_and_numbers_read_as_the_field_wants():
    # YAML 1.1 reads `off` as false and `1e-3` as text; the field's type decides.
    q = _built_from_cli(["--set", "quantize-int8.outliers=off", "--set", "quantize-int8.float_budget=1e-2",
                         "--set", "quantize-int8.skip_nodes=[conv1, conv2]"], "quantize-int8")
    assert (q.outliers, q.float_budget, q.skip_nodes) == ("off", 0.01, ("conv1", "conv2"))
    assert _built_from_cli(["--set", "prune-channels.protect=conv1"], "prune-channels").protect == ("conv1",)
    assert _built_from_cli(["--set", "quantize-weight-only.block_size="], "quantize-weight-only").block_size is None


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn_relu_gemm(batch="N"), path)
    return path


@pytest.mark.parametrize("setting, fragments", [
    ("no-such-pass.ratio=1", ("unknown pass type 'no-such-pass'", "prune-channels", "quantize-int8")),
    ("prune-channels.rate=0.5", ("unknown option 'rate' of prune-channels", "ratio, allocation")),
    ("distill.loss_fn=x", ("Python-only option 'loss_fn'", "steps, minutes")),
    ("prune-channels.ratio=half", ("option 'ratio': must be a number, got 'half'",)),
    ("prune-channels.importance=l7", ("must be one of l2, l1",)),
    ("prune-channels.ratio=1.5", ("ratio must be in [0, 1)",)),
    ("prune-channels", ("expected PASS.OPTION=VALUE", "prune-channels")),
])
def test_set_errors_are_one_line_with_the_valid_names(capsys, tmp_path, model, setting, fragments):
    out = tmp_path / "o.onnx"
    code, stdout, err = run_cli(capsys, "optimize", model, "-o", out, "--set", setting)
    assert_one_line_error(code, stdout, err, ExitCode.BAD_INPUT, *fragments)
    assert not out.exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--prune", "0.3", "--set", "prune-channels.ratio=0.5"], "--set prune-channels.ratio and --prune both set"),
    (["--set", "factorize.energy=0.9", "--set", "factorize.energy=0.8"], "both set factorize.energy"),
    (["--quantize", "int8-weight", "--set", "quantize-weight-only.bits=4"], "--quantize int8-weight both set"),
    (["--quantize", "dynamic", "--set", "quantize-int8.bins=1024"], "quantize-int8.bins applies to --quantize int8, not --quantize dynamic"),
    (["--quantize", "int4", "--calib-method", "mse", "--smooth", "0.5"], "--calib-method and --smooth apply to --quantize int8"),
    (["--block-size", "64"], "--block-size applies to weight-only quantization"),
    (["--set", "factorize.latency_aware=true"], "--set factorize.latency_aware applies to factorization"),
])
def test_conflicting_pass_flags_are_refused(capsys, tmp_path, model, argv, fragment):
    code, stdout, err = run_cli(capsys, "optimize", model, "-o", tmp_path / "o.onnx", *argv)
    assert_one_line_error(code, stdout, err, ExitCode.BAD_INPUT, fragment)


def test_set_is_checked_by_the_parser_before_any_work(tmp_path):
    with pytest.raises(typer.BadParameter, match="unknown option 'rate'"):
        _command().make_context("optimize", [str(tmp_path / "missing.onnx"), "-o", "o.onnx", "--set", "prune-channels.rate=1"])
    with pytest.raises(OnnxCompressError, match="both set"):  # conflicts need every flag: checked by the command
        pass_specs({"prune": 0.3, "set": ["prune-channels.ratio=0.4"]}, "cpu")


def _pruned(capsys, model: Path, out: Path, *argv: str) -> tuple[int, dict]:
    """(MACs after, the prune-channels pass's details) of an optimize run."""
    code, stdout, err = run_cli(capsys, "optimize", model, "-o", out, "--bench-runs", "0", "--json", *argv)
    assert code == 0, err
    report = json.loads(stdout)
    return report["after"]["macs"], next(p["details"] for p in report["passes"] if p["name"] == "prune-channels")


def test_set_matches_the_short_flags_and_overrides_the_recipe(capsys, tmp_path, model):
    flags = _pruned(capsys, model, tmp_path / "a.onnx", "--prune", "0.5", "--round-to", "1")
    settings = _pruned(capsys, model, tmp_path / "b.onnx", "--set", "prune-channels.ratio=0.5",
                       "--set", "prune-channels.round_to=1")
    over_recipe = _pruned(capsys, model, tmp_path / "c.onnx", "--recipe", "prune", "--round-to", "1",
                          "--set", "prune-channels.ratio=0.5")
    assert flags == settings == over_recipe and flags[1]["ratio"] == 0.5
    recipe = _pruned(capsys, model, tmp_path / "d.onnx", "--recipe", "prune")
    assert recipe[0] > flags[0] and (recipe[1]["ratio"], recipe[1]["importance"]) == (0.3, "l2")
    # without a ratio, prune-channels options go to the recipe's pruning, which keeps its own ratio
    for argv in (["--set", "prune-channels.importance=l1"], ["--importance", "l1"]):
        _, details = _pruned(capsys, model, tmp_path / "e.onnx", "--recipe", "prune", *argv)
        assert (details["ratio"], details["importance"]) == (0.3, "l1")


def test_readme_set_examples_parse():
    lines = [line for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
             for line in map(str.strip, block.splitlines()) if line.startswith("onnxcompress optimize ") and " --set " in line]
    assert lines
    for line in lines:
        ctx = _command().make_context("optimize", line.split()[2:])
        assert ctx.params["set"] and pass_specs(ctx.params, "cpu")[0]


def test_passes_lists_every_option_with_its_flag_and_help(capsys):
    code, stdout, err = run_cli(capsys, "passes")
    assert code == 0, err
    lines = stdout.splitlines()
    for name in pass_names():
        cls = Pass.registry[name]
        at = lines.index(next(line for line in lines if line.startswith(f"{name}: ")))
        listed = [line.split(":")[0].strip() for line in lines[at + 1:at + 1 + len(option_names(cls, python_only=False))]]
        assert listed == option_names(cls, python_only=False)
    assert "  ratio: float = 0.3 (--prune)  Prune this fraction" in stdout
    assert "  skip_nodes: list of str = []" in stdout and "  alphas: mapping or null = null" in stdout
    assert "loss_fn" not in stdout  # Python-only
    at = lines.index(next(line for line in lines if line.startswith("equalize: ")))
    assert describe_passes(["equalize"]) == lines[at:at + 3]  # a pass named: its lines alone
    code, stdout, err = run_cli(capsys, "passes", "prune-chanels")
    assert_one_line_error(code, stdout, err, ExitCode.BAD_INPUT, "unknown pass type 'prune-chanels'", "prune-channels")
