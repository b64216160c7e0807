"""`optimize-many`: `optimize` over a fleet of models and a sweep of settings, serially or on Ray.

A job is one `onnxcompress optimize MODEL -o OUTPUT --report REPORT --json FLAGS...` run in-process
(`cli.main`), so every check, atomic write and exit code is the one `optimize` has; its stdout and
stderr are captured, the JSON report read back, and the summary built from it. Serially the jobs run
one after another here; with Ray each job is a task (`max_retries`: a worker that dies is retried,
and since the job writes atomically, a retry leaves the same files). A job that fails does not stop
the others.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ExitCode, OnnxCompressError

#: optimize options a job may not set: optimize-many names its outputs, and jobs do not nest Ray runs.
RESERVED = ("-o", "--output", "--report", "--json", "--plot", "--ray", "--workers")
#: Exit codes of a job that wrote nothing (failures).
FAILED = (ExitCode.INTERNAL_ERROR, ExitCode.BAD_INPUT, ExitCode.VERIFICATION_FAILED)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Setting:
    """One set of optimize flags; `name` goes into the output file names when there are several."""

    name: str
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Job:
    index: int
    model: str
    setting: str
    flags: tuple[str, ...]
    output: str
    report: str

    def argv(self) -> list[str]:
        return ["optimize", self.model, "-o", self.output, "--report", self.report, "--json", *self.flags]


@dataclass
class JobResult:
    index: int
    model: str
    setting: str
    exit_code: int
    seconds: float
    output: str | None = None  # None when nothing was written
    report: str | None = None
    error: str = ""  # the job's one-line error, when it failed
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def settings_from(flag_sets: Sequence[str], sweep: Path | None) -> list[Setting]:
    """The option sets: each `--setting "FLAGS"`, then each entry of a YAML/JSON sweep file (a list of
    mappings of optimize option names to values, with an optional `name`); one empty set by default."""
    settings = [Setting(f"s{i}", tuple(shlex.split(text))) for i, text in enumerate(flag_sets, start=1)]
    if sweep is not None:
        settings += [_setting(entry, f"s{len(settings) + i}", sweep) for i, entry in enumerate(_read_sweep(sweep), start=1)]
    names = [s.name for s in settings]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise OnnxCompressError(f"two settings are named {duplicated[0]!r}: outputs would collide")
    return settings or [Setting("default")]


def plan_jobs(models: Sequence[Path], settings: Sequence[Setting], output_dir: Path,
              common: Sequence[str] = ()) -> list[Job]:
    """Every model with every setting, in that order; outputs `DIR/STEM.onnx`, or `DIR/STEM.SETTING.onnx`
    with several settings, each with its `.report.json`."""
    jobs, seen = [], {}
    for model in models:
        for setting in settings:
            stem = model.stem if len(settings) == 1 else f"{model.stem}.{setting.name}"
            if stem in seen:
                raise OnnxCompressError(f"{model} and {seen[stem]} would both write {output_dir / stem}.onnx: "
                                        "give the models different file names")
            seen[stem] = model
            if (output_dir / f"{stem}.onnx").resolve() == model.resolve():
                raise OnnxCompressError(f"--output-dir {output_dir}: the output for {model} would overwrite it")
            flags = (*common, *setting.flags)
            reserved = [f for f in flags if f.split("=", 1)[0] in RESERVED]
            if reserved:
                raise OnnxCompressError(f"setting {setting.name!r}: {reserved[0]} is set by optimize-many itself")
            jobs.append(Job(len(jobs), str(model), setting.name, flags, str(output_dir / f"{stem}.onnx"),
                            str(output_dir / f"{stem}.report.json")))
    return jobs


def run_job(job: Job) -> JobResult:
    """One optimize run, its output captured: the exit code, its one-line error or the report's summary."""
    from .cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(job.argv())
    if code == ExitCode.INTERRUPTED:  # Ctrl-C stops the fleet, not just this job
        raise KeyboardInterrupt
    result = JobResult(job.index, job.model, job.setting, int(code), time.perf_counter() - start)
    if code in FAILED:
        lines = [line for line in stderr.getvalue().splitlines() if line.startswith(("error:", "internal error:"))]
        result.error = (lines[-1] if lines else f"exit code {code}").strip()
        return result
    result.output, result.report = job.output, job.report
    result.summary = summarize(json.loads(stdout.getvalue()))
    return result


def summarize(report: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of one run report the summary table shows."""
    before, after = report["before"], report["after"]
    fidelity = report.get("fidelity") or {}
    return {"mode": report.get("mode"), "params": [before["params"], after["params"]],
            "macs": [before["macs"], after["macs"]], "file_bytes": [before.get("file_bytes"), after.get("file_bytes")],
            "sqnr_db": fidelity.get("sqnr_db"), "cosine": fidelity.get("cosine"),
            "tolerance_met": (report.get("tolerance") or {}).get("met")}


OnDone = Callable[[JobResult, int, int], None]


def run_serial(jobs: Sequence[Job], on_done: OnDone, run: Callable[[Job], JobResult] = run_job) -> list[JobResult]:
    results = []
    for job in jobs:
        results.append(run(job))
        on_done(results[-1], len(results), len(jobs))
    return results


def run_ray(jobs: Sequence[Job], on_done: OnDone, *, address: str | None = None, workers: int | None = None,
            max_retries: int | None = None, run: Callable[[Job], JobResult] = run_job) -> list[JobResult]:
    """Each job a Ray task (one CPU), retried when its worker dies; results in job order."""
    from .distributed import MAX_RETRIES, connect

    ray = connect(address, workers)
    task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES if max_retries is None else max_retries)(run)
    pending = {task.remote(job): job for job in jobs}
    results: dict[int, JobResult] = {}
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ref)
        try:
            results[job.index] = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the worker died on every try
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            results[job.index] = JobResult(job.index, job.model, job.setting, int(ExitCode.INTERNAL_ERROR), 0.0,
                                           error=f"error: Ray task failed: {first}")
        on_done(results[job.index], len(results), len(jobs))
    return [results[job.index] for job in jobs]


def command(models: Sequence[Path], output_dir: Path, *, settings: Sequence[str], sweep: Path | None,
            common: str | None, address: str | None, workers: int | None, json_out: bool) -> ExitCode:
    """`onnxcompress optimize-many`: checks, then the jobs with a progress line each, then the summary."""
    from rich.markup import escape

    from .cli import console, out
    from .paths import check_output_folder
    from .progress import elapsed

    if workers is not None and (address is None or workers < 1):
        raise OnnxCompressError("--workers needs --ray and must be at least 1")
    jobs = plan_jobs(models, settings_from(settings, sweep), output_dir, shlex.split(common or ""))
    check_flags(jobs)
    check_output_folder("--output-dir", output_dir, create=True)
    if address:
        from .distributed import connect

        connect(address, workers)  # Ray missing or unreachable: said before anything is written
    output_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"optimize-many: {len(jobs)} jobs {f'on Ray ({address})' if address else 'serially'}", highlight=False)
    start = time.perf_counter()

    def done(r: JobResult, count: int, total: int) -> None:
        console.print(escape(f"[{elapsed(time.perf_counter() - start)}] {count}/{total} {r.model} {r.setting}: "
                             f"exit {r.exit_code}, {describe(r)} ({r.seconds:.1f} s)"), highlight=False, soft_wrap=True)

    results = run_ray(jobs, done, address=address, workers=workers) if address else run_serial(jobs, done)
    code = exit_code(results)
    if json_out:
        out.print_json(json.dumps({"engine": "ray" if address else "serial", "exit_code": int(code),
                                   "jobs": [r.to_dict() for r in results]}, allow_nan=True))
    else:
        render(out, results)
    return code


def check_flags(jobs: Sequence[Job]) -> None:
    """Each setting's flags parsed as `optimize` parses them, before any job runs."""
    import typer

    from .cli import _USAGE_ERRORS, app

    parser = typer.main.get_command(app).commands["optimize"]
    for job in {job.setting: job for job in reversed(jobs)}.values():
        try:
            parser.make_context("optimize", job.argv()[1:])
        except _USAGE_ERRORS as exc:
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            raise OnnxCompressError(f"setting {job.setting!r}: {message}") from None


def describe(result: JobResult) -> str:
    """What became of a job, in a few words."""
    if result.error:
        return result.error
    return {ExitCode.OUTSIDE_TOLERANCE: "written, outside the tolerance",
            ExitCode.TARGET_NOT_REACHED: "written, target not reached"}.get(result.exit_code, "written")


def render(console, results: Sequence[JobResult]) -> None:
    """One table, a row per job; the errors of failed jobs below it, one line each."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from .report import human

    table = Table(title="optimize-many (MACs: share left; SQNR in dB against the input model)", title_justify="left",
                  box=box.SIMPLE_HEAD)
    names = [Path(r.model).name for r in results]
    for column in ("#", "model", "setting", "exit", "MACs", "file", "SQNR", "s", "result"):
        left = column in ("model", "setting", "result")
        table.add_column(column, justify="left" if left else "right",
                         min_width=max(map(len, names)) if column == "model" else None)
    for r in results:
        s = r.summary
        macs = f"{s['macs'][1] / s['macs'][0]:.1%}" if s.get("macs") and s["macs"][0] else "-"
        size = human(s["file_bytes"][1], "B") if s.get("file_bytes") else "-"
        sqnr = "-" if s.get("sqnr_db") is None else f"{s['sqnr_db']:.1f}"
        table.add_row(str(r.index + 1), escape(Path(r.model).name), escape(r.setting), str(r.exit_code), macs, size,
                      sqnr, f"{r.seconds:.1f}", "failed" if r.error else escape(describe(r)))
    console.print(table)
    for r in results:
        if r.error:
            console.print(escape(f"{r.index + 1}: {r.error}"), highlight=False, soft_wrap=True)


def exit_code(results: Sequence[JobResult]) -> ExitCode:
    """JOBS_FAILED if a job wrote nothing; else the worst verdict of the written ones (4, then 5, then 0)."""
    codes = {r.exit_code for r in results}
    if codes & {int(c) for c in FAILED}:
        return ExitCode.JOBS_FAILED
    for code in (ExitCode.OUTSIDE_TOLERANCE, ExitCode.TARGET_NOT_REACHED):
        if code in codes:
            return code
    return ExitCode.OK


def _read_sweep(path: Path) -> list:
    import yaml

    if not path.is_file():
        raise OnnxCompressError(f"{path}: no such sweep file")
    try:
        entries = yaml.safe_load(path.read_text())  # JSON is YAML too
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise OnnxCompressError(f"{path}: not YAML or JSON ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise OnnxCompressError(f"{path}: a sweep is a list of option mappings, e.g. [{{quantize: int8}}, {{prune: 0.3}}]")
    return entries


def _setting(entry: Mapping[str, Any], default: str, source: Path) -> Setting:
    """A sweep entry as flags: `calib-method: mse` -> --calib-method mse, `verify: false` -> --no-verify,
    a list repeats the option."""
    name = str(entry.get("name", default))
    if not NAME.match(name):
        raise OnnxCompressError(f"{source}: setting name {name!r} must be letters, digits, '.', '_' or '-'")
    flags: list[str] = []
    for key, value in entry.items():
        if key == "name":
            continue
        option = "--" + str(key).replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            if item is True:
                flags.append(option)
            elif item is False:
                flags.append("--no-" + option[2:])
            elif item is not None:
                flags += [option, str(item)]
    return Setting(name, tuple(flags))


__all__ = ["FAILED", "RESERVED", "Job", "JobResult", "Setting", "check_flags", "command", "describe", "exit_code", "plan_jobs", "render",
           "run_job", "run_ray", "run_serial", "settings_from", "summarize"]
