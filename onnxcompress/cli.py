"""Command line: `onnxcompress analyze | bench | optimize | demo | recipes`.

Every user-facing problem is one line on stderr and a non-zero exit code (see errors.py); JSON goes
to stdout alone when `--json` is given, so pipelines can parse it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .errors import OnnxCompressError

app = typer.Typer(
    name="onnxcompress",
    help="Compress ONNX models (pruning, factorization, int8) and measure them on ONNX Runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)  # progress and tables; stdout stays clean for --json
out = Console()

InputShapes = Annotated[
    Optional[list[str]],
    typer.Option("--input-shape", "-s", help="Fix a dynamic input: NAME=1x3x224x224 (repeatable)."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def _version(value: bool) -> None:
    if value:
        print(f"onnxcompress {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Compress ONNX models and measure them on ONNX Runtime."""


@app.command()
def analyze(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    input_shape: InputShapes = None,
    top: Annotated[int, typer.Option(help="How many layers to list by MACs.")] = 10,
    fold: Annotated[bool, typer.Option(help="Fold constant subgraphs first (weights stored as nodes count as weights).")] = True,
    channels: Annotated[bool, typer.Option(help="Show the coupled channel groups and what blocks pruning.")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Ops, parameters, MACs/FLOPs, sizes, inputs/outputs and the heaviest layers of a model."""
    from .analysis.cost import analyze_cost
    from .model import load, parse_input_shapes, resolve_input_shapes
    from .render import analysis_dict, render_analysis

    shapes = parse_input_shapes(input_shape)
    m = load(model)
    resolved = resolve_input_shapes(m, shapes)
    if fold:
        from .passes.cleanup import FoldConstants
        from .pipeline import PassContext

        FoldConstants().run(m, PassContext(model=m))
    cost = analyze_cost(m, resolved)
    data = analysis_dict(m, cost, resolved, file_bytes=model.stat().st_size, top=top)
    if channels:
        from .analysis.channels import ChannelGraph, prepare
        from .render import channel_groups_dict

        data["channel_groups"] = channel_groups_dict(ChannelGraph.build(prepare(m), resolved))
    if json_out:
        out.print_json(json.dumps(data))
    else:
        render_analysis(console, str(model), data)


@app.command()
def bench(
    models: Annotated[list[Path], typer.Argument(help="ONNX models; the first is the baseline for ratios.")],
    ep: Annotated[str, typer.Option("--ep", help="Execution provider: cpu, cuda or tensorrt.")] = "cpu",
    batch: Annotated[str, typer.Option(help="Batch sizes, comma separated, e.g. 1,16.")] = "1",
    runs: Annotated[int, typer.Option(help="Timed runs per model and batch (at least 20).")] = 50,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs.")] = 5,
    threads: Annotated[Optional[int], typer.Option(help="Intra-op threads (default: physical cores).")] = None,
    profile: Annotated[bool, typer.Option(help="Per-layer times from ORT profiling.")] = False,
    input_shape: InputShapes = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG of theoretical vs measured speedup.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Latency on ONNX Runtime, models interleaved; theoretical (MAC) vs measured speedup."""
    from .bench import BenchOptions, benchmark, progress_bar, render
    from .model import parse_input_shapes

    options = BenchOptions(
        provider=ep, batch_sizes=_parse_batches(batch), runs=runs, warmup=warmup, threads=threads,
        input_shapes=parse_input_shapes(input_shape), profile=profile,
    )
    with progress_bar(console) as progress:
        report = benchmark([str(m) for m in models], options, progress=progress)
    if plot:
        from .plots import plot_speedups

        plot_speedups(report, plot)
    if json_out:
        out.print_json(report.to_json())
    else:
        for table in render(report):
            console.print(table)
        if plot:
            console.print(f"plot written to {escape(str(plot))}")


@app.command()
def optimize(
    model: Annotated[Path, typer.Argument(help="ONNX model file (never modified).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the optimized model.")],
    recipe: Annotated[str, typer.Option(help="Recipe YAML file or built-in name (see `onnxcompress recipes`).")] = "cleanup",
    calib: Annotated[Optional[Path], typer.Option(help="Calibration data (.npy or .npz named by input).")] = None,
    input_shape: InputShapes = None,
    report: Annotated[Optional[Path], typer.Option(help="Write the run report as JSON here.")] = None,
    verify: Annotated[bool, typer.Option(help="Check, load and compare the model after every pass.")] = True,
    prune: Annotated[Optional[float], typer.Option(help="Prune this fraction of every channel group (adds prune-channels).")] = None,
    importance: Annotated[Optional[str], typer.Option(help="Channel importance: l2, l1, bn, activation, apoz (the last two need --calib) or random.")] = None,
    target_macs: Annotated[Optional[float], typer.Option(help="Prune until this fraction of the MACs is left, e.g. 0.5.")] = None,
    round_to: Annotated[Optional[int], typer.Option(help="Kept channel counts are multiples of this (default 8).")] = None,
    factorize: Annotated[Optional[float], typer.Option(help="Low-rank factorize Gemm/MatMul/Conv, keeping this fraction of each rank.")] = None,
    factorize_energy: Annotated[Optional[float], typer.Option(help="Low-rank factorize, keeping this share of the singular values' energy.")] = None,
    quantize: Annotated[Optional[str], typer.Option(help="Quantize: int8 (static QDQ, needs --calib) or dynamic (int8 weights, no calibration).")] = None,
    calib_method: Annotated[Optional[str], typer.Option(help="Activation ranges: minmax, percentile, entropy or mse.")] = None,
    preset: Annotated[Optional[str], typer.Option(help="int8 target: cpu (uint8 activations) or tensorrt (symmetric int8).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Run a recipe of passes over MODEL and write the result to OUTPUT.

    Without --recipe the exact cleanup recipe runs; --prune/--target-macs add channel pruning."""
    from .calibration import Calibration
    from .errors import ModelLoadError
    from .model import load, parse_input_shapes, save
    from .pipeline import Pipeline
    from .render import render_run
    from .verify import VerifyOptions

    if output.resolve() == model.resolve():
        raise ModelLoadError(f"{output}: output would overwrite the input model; choose another path")
    pipeline = Pipeline.from_recipe(recipe)
    prune_options = {k: v for k, v in {"ratio": prune, "importance": importance, "target_macs": target_macs,
                                       "round_to": round_to}.items() if v is not None}
    if prune_options:
        _set_pass(pipeline, "prune-channels", prune_options, where="--prune options", before="quantize-int8")
    factorize_options = {k: v for k, v in {"rank_ratio": factorize, "energy": factorize_energy}.items() if v is not None}
    if factorize_options:
        _set_pass(pipeline, "factorize", factorize_options, where="--factorize options", before="quantize-int8")
    if quantize == "dynamic":
        if calib_method is not None or preset is not None:
            raise OnnxCompressError("--calib-method and --preset apply to --quantize int8, not dynamic")
        _set_pass(pipeline, "quantize-dynamic", {}, where="--quantize options")
    elif quantize is not None or calib_method is not None or preset is not None:
        if quantize not in (None, "int8"):
            raise OnnxCompressError(f"--quantize {quantize}: choose int8 (static, needs --calib) or dynamic")
        options = {k: v for k, v in {"method": calib_method, "preset": preset}.items() if v is not None}
        _set_pass(pipeline, "quantize-int8", options, where="--quantize options")
    if not verify:
        pipeline.verify = VerifyOptions(enabled=False)
    shapes = parse_input_shapes(input_shape)
    source = load(model)
    calibration = Calibration.from_path(source, calib) if calib else None

    def run(progress):
        return pipeline.run(source, calibration=calibration, input_shapes=shapes, on_pass=lambda name: progress(name))

    result = _with_progress("optimizing", run, steps=len(pipeline.passes))
    save(result.model, output)
    run_report = result.report.with_files(model, output)
    if report:
        _write_text_atomic(report, run_report.to_json())
    if json_out:
        out.print_json(run_report.to_json())
    else:
        render_run(console, run_report)


@app.command()
def demo(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where to write the compressed model.")] = Path("onnxcompress-demo"),
    recipe: Annotated[str, typer.Option(help="Recipe to run (see `onnxcompress recipes`).")] = "demo",
    runs: Annotated[int, typer.Option(help="Timed runs per model and batch.")] = 30,
    json_out: JsonFlag = False,
) -> None:
    """Compress the bundled digits CNN and show accuracy, MACs, size and latency before and after."""
    from .bench import progress_bar
    from .demo import run_demo
    from .render import render_demo

    console.print("compressing the bundled CNN (trained on scikit-learn's digits) ...")
    with progress_bar(console) as progress:
        result = run_demo(output_dir, recipe=recipe, runs=runs,
                          on_pass=lambda name: console.print(f"  running {name}"), progress=progress)
    if json_out:
        out.print_json(json.dumps(result.to_dict()))
    else:
        render_demo(console, result)


@app.command()
def recipes() -> None:
    """List the built-in recipes."""
    from .pipeline import RECIPES_DIR, load_recipe, recipe_names

    for name in recipe_names():
        spec = load_recipe(RECIPES_DIR / f"{name}.yaml")
        steps = " -> ".join(p["type"] if isinstance(p, dict) else str(p) for p in spec["passes"])
        console.print(f"[bold]{name}[/bold]: {steps}\n  {spec.get('description', '')}")


def _set_pass(pipeline, name: str, options: dict, *, where: str, before: str | None = None) -> None:
    """Add pass `name` with `options` (merged into the recipe's own, if it has one) at the recipe's
    place for it, else at the end (or before pass `before`: pruning goes before quantization)."""
    from .pipeline import build_pass

    names = [p.name for p in pipeline.passes]
    existing = pipeline.passes[names.index(name)].options() if name in names else {}
    new = build_pass({**existing, **options, "type": name}, where=where)
    if name in names:
        pipeline.passes[names.index(name)] = new
    elif before in names:
        pipeline.passes.insert(names.index(before), new)
    else:
        pipeline.passes.append(new)


def _parse_batches(text: str) -> tuple[int, ...]:
    from .errors import OnnxCompressError

    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(s <= 0 for s in sizes):
        raise OnnxCompressError(f"bad --batch '{text}': expected positive integers separated by commas, e.g. 1,16")
    return sizes


def _with_progress(label: str, work, steps: int | None = None):
    """Run `work(progress)` under a rich progress bar; `progress(description)` advances it one step."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(label, total=steps)

        def progress(description: str | None = None, total: int | None = None) -> None:
            if total is not None:
                bar.update(task, total=total)
                return
            bar.update(task, advance=1, description=f"{label}: {description}" if description else label)

        return work(progress)


def _write_text_atomic(path: Path, text: str) -> None:
    import os
    import tempfile

    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxCompressError(f"{folder}: report folder does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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
    try:
        app(args=argv, standalone_mode=False)
    except OnnxCompressError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        return 130
    except _USAGE_ERRORS as exc:  # unknown option, bad value: the parser's one-line message
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if message.strip():  # the help screen for a bare `onnxcompress` comes with an empty message
            console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
        return getattr(exc, "exit_code", 2)
    except Exception as exc:  # anything unexpected: still one line, the traceback only on request
        import os

        if os.environ.get("ONNXCOMPRESS_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        console.print(f"[red]internal error:[/red] {type(exc).__name__}: {escape(first)} "
                      "(please report it; set ONNXCOMPRESS_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
