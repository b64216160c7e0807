"""Command line: `onnxcompress analyze | bench | optimize | optimize-many | demo | pack | unpack | recipes | passes`.

Results (tables, summaries, or JSON alone with `--json`) go to stdout; progress and every
user-facing problem go to stderr, a problem as one line with an exit code from errors.EXIT_CODES.
Output paths are checked before any work starts, so a bad one writes nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .cli_pass_flags import with_pass_flags
from .errors import ExitCode, OnnxCompressError, exit_codes_help
from .paths import check_outputs
from .tolerance import DEFAULT_MAP_DROP, DEFAULT_VECTOR_DROP


def _plain_flags(params: list) -> list:
    """Flags take no value, so their help shows no type (typer's vendored click shows '<bool>')."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Group(typer.core.TyperGroup):
    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))


class _Command(typer.core.TyperCommand):
    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))


app = typer.Typer(
    name="onnxcompress",
    cls=_Group,
    help="Compress ONNX models (pruning, factorization, int8) and measure them on ONNX Runtime.",
    epilog=exit_codes_help(),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)  # progress and problems
out = Console()  # results: tables, summaries, JSON

InputShapes = Annotated[
    Optional[list[str]],
    typer.Option("--input-shape", "-s", metavar="NAME=DxDx..", help="Fix a dynamic input: NAME=1x3x224x224 (repeatable)."),
]
InputValues = Annotated[
    Optional[list[str]],
    typer.Option("--input", help="Fix an input's synthetic value: NAME=VALUE, broadcast to its shape, e.g. sr=16000 (repeatable)."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
ModelArg = Annotated[Path, typer.Argument(metavar="MODEL", help="ONNX model file (never modified).")]


def _version(value: bool) -> None:
    if value:
        print(f"onnxcompress {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Compress ONNX models and measure them on ONNX Runtime."""


@app.command(cls=_Command)
def analyze(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help="ONNX model file.")],
    input_shape: InputShapes = None,
    top: Annotated[int, typer.Option(help="How many layers to list by MACs.")] = 10,
    fold: Annotated[bool, typer.Option(help="Fold constant subgraphs first (weights stored as nodes count as weights).")] = True,
    channels: Annotated[bool, typer.Option(help="Show the coupled channel groups and what blocks pruning.")] = False,
    input_value: InputValues = None,
    json_out: JsonFlag = False,
) -> None:
    """Ops, parameters, MACs/FLOPs, sizes, inputs/outputs and the heaviest layers of a model."""
    from .analysis.cost import analyze_cost
    from .feeds import check_input_values, parse_input_values
    from .model import file_bytes, load, parse_input_shapes, resolve_input_shapes
    from .preflight import check_shapes
    from .render import analysis_dict, render_analysis

    shapes = parse_input_shapes(input_shape)
    m = load(model)
    resolved = resolve_input_shapes(m, shapes)
    check_shapes(m, resolved, shapes, memory=False)  # analysis allocates nothing: any size may be asked about
    values = check_input_values(m, parse_input_values(input_value))
    if fold:
        from .passes.cleanup import FoldConstants
        from .pipeline import PassContext

        FoldConstants().run(m, PassContext(model=m))
    cost = analyze_cost(m, resolved, input_values=values)
    data = analysis_dict(m, cost, resolved, file_bytes=file_bytes(model), top=top)
    if channels:
        from .analysis.channels import ChannelGraph, prepare
        from .render import channel_groups_dict

        data["channel_groups"] = channel_groups_dict(ChannelGraph.build(prepare(m), resolved))
    if json_out:
        out.print_json(json.dumps(data))
    else:
        render_analysis(out, str(model), data)


@app.command(cls=_Command)
def bench(
    models: Annotated[list[Path], typer.Argument(metavar="MODELS", help="ONNX models; the first is the baseline for ratios.")],
    ep: Annotated[str, typer.Option("--ep", help="Execution provider: cpu, cuda or tensorrt.")] = "cpu",
    batch: Annotated[str, typer.Option(help="Batch sizes, comma separated, e.g. 1,16.")] = "1",
    runs: Annotated[int, typer.Option(help="Timed runs per model and batch (at least 20).")] = 50,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs.")] = 5,
    threads: Annotated[Optional[int], typer.Option(help="Intra-op threads (default: physical cores).")] = None,
    profile: Annotated[bool, typer.Option(help="Per-layer times from ORT profiling.")] = False,
    input_shape: InputShapes = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of theoretical vs measured speedup.")] = None,
    input_value: InputValues = None,
    json_out: JsonFlag = False,
) -> None:
    """Latency on ONNX Runtime, models interleaved; theoretical (MAC) vs measured speedup."""
    from .bench import BenchOptions, benchmark, progress_bar, render
    from .errors import UnsupportedModelError
    from .feeds import parse_input_values
    from .model import parse_input_shapes

    check_outputs({"--plot": plot}, inputs=models)
    _check_plotting(plot)
    options = BenchOptions(
        provider=ep, batch_sizes=_parse_batches(batch), runs=runs, warmup=warmup, threads=threads,
        input_shapes=parse_input_shapes(input_shape), profile=profile, input_values=parse_input_values(input_value),
    )
    with progress_bar(console) as progress:
        report = benchmark([str(m) for m in models], options, progress=progress)
    if not any(row.supported for row in report.rows):  # a model that cannot run blocks only its own rows
        row = report.rows[0]
        raise UnsupportedModelError(f"nothing could be timed: {row.model}: {row.reason}")
    if plot:
        from .plots import plot_speedups

        plot_speedups(report, plot)
    if json_out:
        out.print_json(report.to_json())
    else:
        for table in render(report):
            out.print(table)
        if plot:
            out.print(f"plot written to {escape(str(plot))}")


@app.command(cls=_Command, epilog=exit_codes_help())
@with_pass_flags
def optimize(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the optimized model (.onnx, or .occ for a packed download).")],
    calib: Annotated[Optional[Path], typer.Option(help="Calibration data (.npy, .npz named by input, or a folder of images): enables the tolerance search and static int8.")] = None,
    calib_preprocess: Annotated[Optional[str], typer.Option(help="For a folder of images: imagenet, raw, or steps like 'raw,mean=0.5,std=0.5,layout=nhwc,channels=bgr'.")] = None,
    calib_samples: Annotated[Optional[int], typer.Option(help="Use the first N calibration samples (default: all of them).")] = None,
    eval: Annotated[Optional[Path], typer.Option("--eval", help="Your evaluation data (same forms as --calib), from other sources than the calibration data (other photos, other texts): candidates are judged on it and every calibration sample is used for fitting. Default: held-out calibration samples, which overstate fidelity on other data.")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="Recipe YAML file or built-in name (see `onnxcompress recipes`); default: chosen from --calib and --target.")] = None,
    target: Annotated[str, typer.Option(help="Deployment target (picks the int8 form): cpu (any x86 with AVX2 and up, or ARM: int8 codes proven exact on kernels without VNNI), vnni (x86 with VNNI/AMX only: full-range codes), host (this machine's CPU), cuda or tensorrt.")] = "cpu",
    max_drop: Annotated[Optional[float], typer.Option(help="Tolerance: the largest allowed drop of --metric against the input model. Default with --calib: "
                                                               f"cosine drop {DEFAULT_VECTOR_DROP:g} (about 20 dB) when every output is one vector per "
                                                               f"sample (class scores, embeddings), else {DEFAULT_MAP_DROP:g} (about 17 dB: maps, sequences).")] = None,
    metric: Annotated[Optional[str], typer.Option(help="Tolerance metric: top1, cosine or mse (default: top1 for class scores, else cosine).")] = None,
    min_sqnr: Annotated[Optional[float], typer.Option(help="Tolerance as a minimum output SQNR in dB (instead of --max-drop).")] = None,
    target_macs: Annotated[Optional[float], typer.Option(help="Prune until this fraction of the MACs is left, e.g. 0.5.")] = None,
    target_speedup: Annotated[Optional[float], typer.Option(help="Search until the model is measured this much faster on ORT CPU.")] = None,
    input_shape: InputShapes = None,
    report: Annotated[Optional[Path], typer.Option(help="Write the run report as JSON here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG: the search's trade-off curve, else the before/after reductions and speedup.")] = None,
    verify: Annotated[bool, typer.Option(help="Check, load and compare the model after every pass.")] = True,
    bench_runs: Annotated[int, typer.Option(help="Timed runs for the before/after latency (0 skips it).")] = 20,
    threads: Annotated[Optional[int], typer.Option(help="ORT intra-op threads for every timing, as deployed (default: the physical cores).")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Batch size for every timing, as deployed (default: the analysed shape's, usually 1).")] = None,
    input_value: InputValues = None,
    ray: Annotated[Optional[str], typer.Option("--ray", metavar="ADDRESS", help="Compute the calibration statistics (activation histograms and ranges, channel means) on Ray, bit-identical to a run without it: 'local' starts Ray on this machine, 'auto' joins the cluster this machine is part of, or a cluster's HOST:PORT or ray://HOST:PORT; needs the ray extra.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="With --ray: calibration shards, one Ray task each (default: the cluster's CPUs).")] = None,
    json_out: JsonFlag = False,
    **pass_flags: Any,
) -> None:
    """Compress MODEL and write the result to OUTPUT, with a before/after table and a verdict.

    With --calib and no recipe: int8 for the target and pruning as far as the tolerance allows,
    measured on held-out calibration samples (default: cosine drop <= 0.005 when an output is one
    vector per sample, class scores or embeddings; <= 0.01 for maps and sequences), the result
    chosen by measured speed (--threads, --batch). Without --calib: exact
    cleanup, plus dynamic int8 for MatMul-heavy models.

    The pass flags (--prune ... --distill) are short forms of pass options; --set PASS.OPTION=VALUE
    sets any other one, merged into the recipe's pass or adding the pass."""
    from .cli_pass_flags import pass_specs
    from .model import save
    from .optimize import OptimizeOptions
    from .optimize import optimize as run_optimize
    from .progress import progress

    check_outputs({"--output": output, "--report": report, "--plot": plot}, inputs=[model, *(p for p in (calib, eval) if p)])
    _check_plotting(plot)
    tolerance = _tolerance(max_drop, metric, min_sqnr)
    passes, prune = pass_specs(pass_flags, target)
    options = OptimizeOptions(
        recipe=recipe, target=target, tolerance=tolerance, target_macs=target_macs,
        target_speedup=target_speedup, passes=passes, prune=prune, verify=verify, bench_runs=bench_runs,
        threads=threads, batch=batch,
    )
    if bench_runs and bench_runs < 20:
        raise OnnxCompressError(f"--bench-runs must be 0 (skip) or at least 20, got {bench_runs}")
    inputs = _optimize_inputs(model, input_shape, input_value, calib, calib_preprocess, calib_samples, eval, ray, workers)
    with progress("optimizing", console) as reporter:
        result = run_optimize(inputs.source, calibration=inputs.calibration, options=options, input_shapes=inputs.shapes,
                              on_step=reporter.step, input_values=inputs.values, validation=inputs.validation)
    if output.suffix == ".occ":  # a compressed container for distribution (see `onnxcompress pack`)
        from .pack import pack_model

        pack_model(result.model, output)
    else:
        save(result.model, output)
    code = _report_run(result, result.report.with_files(model, output), report, plot, json_out)
    if code:
        raise typer.Exit(code)


@dataclass(frozen=True)
class _OptimizeInputs:
    source: Any  # the loaded model
    shapes: dict
    values: dict
    calibration: Any
    validation: Any


def _optimize_inputs(model, input_shape, input_value, calib, calib_preprocess, calib_samples, eval, ray, workers) -> _OptimizeInputs:
    """The model, its shapes and fixed inputs, and the calibration and evaluation data, each checked
    before any work (a bad NAME or VALUE, data without a use)."""
    from .calibration import Calibration
    from .feeds import check_input_values, parse_input_values
    from .model import load, parse_input_shapes

    if calib_samples is not None and calib is None:
        raise OnnxCompressError("--calib-samples counts --calib samples: give --calib DATA")
    shapes = parse_input_shapes(input_shape)
    source = load(model)
    values = check_input_values(source, parse_input_values(input_value))
    calibration = (Calibration.from_path(source, calib, preprocessing=calib_preprocess, input_shapes=shapes,
                                         limit=calib_samples) if calib else None)
    if calib_preprocess is not None and calib is None:
        raise OnnxCompressError("--calib-preprocess describes --calib images: give --calib FOLDER")
    if eval is not None and calib is None:
        raise OnnxCompressError("--eval judges what calibration data fits: give --calib DATA too")
    validation = (Calibration.from_path(source, eval, preprocessing=calib_preprocess, input_shapes=shapes)
                  if eval else None)
    return _OptimizeInputs(source, shapes, values, _on_ray(calibration, ray, workers), validation)


def _report_run(result, run_report, report: Path | None, plot: Path | None, json_out: bool) -> int:
    """The report file, the plot and the table or JSON of an optimize run; returns its exit code."""
    from .render import render_run

    code = (ExitCode.OUTSIDE_TOLERANCE if result.meets_tolerance is False
            else ExitCode.TARGET_NOT_REACHED if result.meets_target is False else ExitCode.OK)
    data = {**run_report.to_dict(), "mode": result.mode, "exit_code": int(code)}
    if report:
        _write_text_atomic(report, json.dumps(data, indent=2, allow_nan=True))
    if plot:
        from .plots import plot_reductions, plot_tradeoff

        if run_report.search:
            plot_tradeoff(run_report.search, plot)
        else:
            plot_reductions(run_report, plot)
    if json_out:
        out.print_json(json.dumps(data, allow_nan=True))
        return code
    render_run(out, run_report)
    if plot:
        out.print(f"plot written to {escape(str(plot))}")
    if code == ExitCode.OUTSIDE_TOLERANCE:
        out.print(f"[red]outside the tolerance[/red] ({escape(run_report.tolerance['description'])}): "
                  "the model was written but does not meet it", highlight=False)
    elif code == ExitCode.TARGET_NOT_REACHED:
        out.print("[yellow]the target was not reached within the tolerance[/yellow]: the model written "
                  "is the most compressed one that meets it", highlight=False)
    return code


@app.command("optimize-many", cls=_Command, epilog=exit_codes_help())
def optimize_many(
    models: Annotated[list[Path], typer.Argument(metavar="MODELS", help="ONNX models (never modified).")],
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Folder for every job's model and report (STEM.onnx, STEM.report.json; STEM.SETTING.* with several settings).")],
    settings: Annotated[Optional[list[str]], typer.Option("--setting", metavar="FLAGS", help="One setting: optimize flags, e.g. '--quantize int8 --calib-method mse' (repeatable: a sweep).")] = None,
    sweep: Annotated[Optional[Path], typer.Option(help="Settings from a YAML/JSON list of mappings of optimize options, e.g. [{name: q8, quantize: int8}, {prune: 0.3}].")] = None,
    common: Annotated[Optional[str], typer.Option(metavar="FLAGS", help="optimize flags for every job, e.g. '--calib data.npz --bench-runs 0'.")] = None,
    ray: Annotated[Optional[str], typer.Option("--ray", metavar="ADDRESS", help="Run the jobs as Ray tasks (a dead worker's job is retried): 'local', 'auto', HOST:PORT or ray://HOST:PORT; needs the ray extra.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="With --ray local: jobs at a time (default: the CPUs).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Run optimize on every MODEL with every setting, serially or on Ray: progress on stderr, one
    summary table (or --json), exit 6 if a job failed (the others still run)."""
    from .fleet import command

    code = command(models, output_dir, settings=settings or [], sweep=sweep, common=common, address=ray, workers=workers,
                   json_out=json_out)
    if code:
        raise typer.Exit(code)


def _tolerance(max_drop: float | None, metric: str | None, min_sqnr: float | None):
    """The tolerance the flags ask for, or None (then optimize uses its default with --calib)."""
    from .tolerance import Tolerance

    if min_sqnr is not None:
        if max_drop is not None or metric not in (None, "sqnr"):
            raise OnnxCompressError("--min-sqnr is a tolerance of its own: drop --max-drop/--metric")
        return Tolerance("sqnr", min_sqnr)
    if metric == "sqnr":
        raise OnnxCompressError("for an SQNR tolerance give --min-sqnr DB (a minimum, not a drop)")
    if max_drop is None:
        if metric is not None:
            raise OnnxCompressError("--metric needs --max-drop")
        return None
    return Tolerance(metric or "auto", max_drop)


def _on_ray(calibration, address: str | None, workers: int | None):
    """The calibration data with its statistics computed on Ray when --ray asks (Ray reached here,
    before any work), else as given."""
    if workers is not None and address is None:
        raise OnnxCompressError("--workers counts Ray calibration shards: add --ray local (or a cluster address)")
    if address is None:
        return calibration
    if calibration is None:
        raise OnnxCompressError("--ray computes calibration statistics on Ray: give --calib DATA")
    if workers is not None and workers < 1:
        raise OnnxCompressError(f"--workers must be at least 1, got {workers}")
    import dataclasses

    from .distributed import RayEngine, connect

    connect(address, workers)
    return dataclasses.replace(calibration, engine=RayEngine(address, workers))


@app.command(cls=_Command)
def demo(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where to write the compressed model.")] = Path("onnxcompress-demo"),
    recipe: Annotated[str, typer.Option(help="Recipe to run (see `onnxcompress recipes`).")] = "demo",
    runs: Annotated[int, typer.Option(help="Timed runs per model and batch.")] = 30,
    json_out: JsonFlag = False,
) -> None:
    """Compress the bundled digits CNN and show accuracy, MACs, size and latency before and after."""
    from .demo import run_demo
    from .paths import check_output_folder
    from .progress import progress
    from .render import render_demo

    check_output_folder("--output-dir", output_dir, create=True)
    console.print("compressing the bundled CNN (trained on scikit-learn's digits) ...")
    with progress("demo", console) as reporter:
        result = run_demo(output_dir, recipe=recipe, runs=runs, on_pass=lambda name: reporter.step(f"running {name}"),
                          progress=lambda e: reporter.update(f"timing {e.model} @ batch {e.batch}",
                                                             completed=e.done, total=e.total))
    if json_out:
        out.print_json(json.dumps(result.to_dict()))
    else:
        render_demo(out, result)


@app.command(cls=_Command)
def pack(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the .occ file.")],
    bits: Annotated[Optional[int], typer.Option(help="Lossy: share 2**BITS values per weight tensor (k-means), e.g. 5.")] = None,
    sparsity: Annotated[Optional[float], typer.Option(help="Lossy: zero this fraction of each tensor's smallest weights first.")] = None,
    calib: Annotated[Optional[Path], typer.Option(help="Inputs (.npy/.npz or a folder of images) for the lossy model's fidelity (else random, labelled so).")] = None,
    calib_preprocess: Annotated[Optional[str], typer.Option(help="For a folder of images: imagenet, raw, or steps (see optimize).")] = None,
    input_shape: InputShapes = None,
    level: Annotated[str, typer.Option(help="Compression effort: fast, default or best.")] = "default",
    codecs: Annotated[Optional[str], typer.Option(help="Codecs to try, comma separated (zlib,bz2,lzma,zstd); default: the standard library's zlib,bz2,lzma.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Pack MODEL into a compressed .occ file for distribution: lossless unless --bits/--sparsity."""
    from .calibration import Calibration
    from .model import load, parse_input_shapes
    from .pack import pack_model, summary_lines

    check_outputs({"--output": output}, inputs=[model, *([calib] if calib else [])])
    shapes = parse_input_shapes(input_shape)
    calibration = (Calibration.from_path(load(model), calib, preprocessing=calib_preprocess, input_shapes=shapes)
                   if calib else None)
    stats = pack_model(model, output, bits=bits, sparsity=sparsity or 0.0, calibration=calibration,
                       input_shapes=shapes, level=level, compare_gzip=True,
                       codecs=[c.strip() for c in codecs.split(",") if c.strip()] if codecs else None)
    if json_out:
        out.print_json(json.dumps(stats.to_dict(), allow_nan=True))
    else:
        for line in summary_lines(stats):
            out.print(escape(line), highlight=False, soft_wrap=True)


@app.command(cls=_Command)
def unpack(
    packed: Annotated[Path, typer.Argument(metavar="PACKED", help=".occ file written by `onnxcompress pack`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the ONNX model.")],
    json_out: JsonFlag = False,
) -> None:
    """Unpack an .occ file to an ONNX model (every checksum verified)."""
    from .pack import fidelity_text, read_index, unpack_file

    check_outputs({"--output": output}, inputs=[packed])
    unpack_file(packed, output)
    index = read_index(packed)
    info = {"output": str(output), "bytes": output.stat().st_size, "mode": index["mode"],
            "lossy": index.get("lossy")}
    if json_out:
        out.print_json(json.dumps(info, allow_nan=True))
    else:
        out.print(escape(f"wrote {output} ({info['bytes']:,} bytes, {index['mode']} .occ)"), highlight=False,
                  soft_wrap=True)
        fidelity = (index.get("lossy") or {}).get("fidelity")
        if fidelity:
            out.print(escape(f"packed with weight sharing; fidelity measured when packed: {fidelity_text(fidelity)}"),
                      highlight=False, soft_wrap=True)


@app.command(cls=_Command)
def recipes() -> None:
    """List the built-in recipes."""
    from .pipeline import RECIPES_DIR, load_recipe, recipe_names

    for name in recipe_names():
        spec = load_recipe(RECIPES_DIR / f"{name}.yaml")
        steps = " -> ".join(p["type"] if isinstance(p, dict) else str(p) for p in spec["passes"])
        out.print(f"[bold]{name}[/bold]: {steps}\n  {spec.get('description', '')}")


@app.command(cls=_Command)
def passes(
    names: Annotated[Optional[list[str]], typer.Argument(metavar="[PASS]...", help="Passes to describe (default: all).")] = None,
) -> None:
    """Every pass and its options (YAML recipe keys, Python keywords, optimize --set PASS.OPTION=VALUE)."""
    from .cli_pass_flags import describe_passes

    for line in describe_passes(names or None):
        out.print(escape(line), highlight=False, soft_wrap=True)


def _check_plotting(plot: Path | None) -> None:
    """A plot asked for needs matplotlib: say so before the work, not after it."""
    if plot:
        from .plots import check_available

        check_available()


def _parse_batches(text: str) -> tuple[int, ...]:
    from .errors import OnnxCompressError

    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(s <= 0 for s in sizes):
        raise OnnxCompressError(f"bad --batch '{text}': expected positive integers separated by commas, e.g. 1,16")
    return sizes


def _write_text_atomic(path: Path, text: str) -> None:
    from .model import write_atomic

    write_atomic(path, [text.encode()], what="report")


def _usage_errors() -> tuple[type[BaseException], ...]:
    """The parser's usage-error classes: typer's own (it vendors click since 0.20), and click's if present."""
    errors: list[type[BaseException]] = []
    if hasattr(typer, "TyperException"):
        errors.append(typer.TyperException)
    try:
        import click

        errors.append(click.exceptions.ClickException)
    except ImportError:
        pass
    return tuple(errors)


_USAGE_ERRORS = _usage_errors()


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app, turning user errors into one line on stderr and an exit code."""
    return int(_run(argv))


def _run(argv: list[str] | None) -> int:
    try:
        # Without standalone mode the parser returns typer.Exit's code instead of raising it.
        code = app(args=argv, standalone_mode=False)
    except OnnxCompressError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        return ExitCode.INTERRUPTED
    except MemoryError:  # the machine's limit, not a bug: smaller shapes or fewer samples fit
        console.print("[red]error:[/red] out of memory: try smaller --input-shape dimensions or fewer calibration "
                      "samples (--calib-samples)", highlight=False, soft_wrap=True)
        return ExitCode.BAD_INPUT
    except _USAGE_ERRORS as exc:  # unknown option, bad value: the parser's one-line message
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if message.strip():  # the help screen for a bare `onnxcompress` comes with an empty message
            console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
        return getattr(exc, "exit_code", ExitCode.BAD_INPUT)
    except Exception as exc:  # anything unexpected: still one line, the traceback only on request
        import os

        if os.environ.get("ONNXCOMPRESS_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        console.print(f"[red]internal error:[/red] {type(exc).__name__}: {escape(first)} "
                      "(please report it; set ONNXCOMPRESS_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        return ExitCode.INTERNAL_ERROR
    return code if isinstance(code, int) else ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
