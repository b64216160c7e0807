"""The default `optimize --calib` on the real-model corpus, run as a user runs it (issue 18).

    python benchmarks/real/default_path.py [--models a,b] [--calib N] [--eval N] [--threads N] [--batch N]
                                           [--runs N] [--timeout-min M] [--extra "ARGS"] [--out DIR]

For every corpus model (default: DEFAULT_MODELS, the CNNs and minilm):

1. The first --calib samples of the corpus calibration split, stacked on axis 0 (text right-padded
   with attention mask 0, as compare_int8 feeds every quantizer), go to a temporary CALIB.npz keyed
   by input name, with `__source__` naming each sample's photo or page where the corpus records it
   (so the tool holds out whole sources; a sentence's source is its Python documentation topic).
2. `python -m onnxcompress optimize MODEL -o OUT.onnx --calib CALIB.npz --json --report REPORT.json
   [--extra ARGS]` runs as a subprocess, stdout and stderr redirected to files (stderr is a file, as
   the issue asks: the progress lines are the non-TTY ones). Recorded: wall time, exit code, and the
   largest gap between progress lines, twice: from the `[m:ss]` stamps the lines print (1 s
   resolution) and from the moment each line appeared in the file (this script polls it every
   POLL_S; start-to-first-line and last-line-to-exit count as gaps too). Past --timeout-min the
   process group is killed and the row says so.
3. From REPORT.json: the passes kept (modified passes of the result), the search's notes, the
   tool's own latency (`bench`: original_ms, optimized_ms, measured_speedup, theoretical_speedup).
4. Fidelity on the first --eval samples of the evaluation split (sources never used for
   calibration), float input model against the output model, both in ONNX Runtime at one intra-op
   thread, one sample per run: compare_int8's Meter (top-1 agreement for classifiers, mean / min
   cosine for text encoders, SQNR in dB always, the worst output's).
5. Latency of both models by this script: onnxcompress.bench.benchmark (interleaved, spinning off) at
   --batch and --threads, shapes as compare_int8 times them (an evaluation sample's shape; text at
   the median evaluation sentence length).

Writes default_path.json and default_path.md to --out after every model (complete=false until the
last). A model whose run fails or times out is a row with the failure. Progress goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent.parent
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # run by path: make `common` and `real.*` importable

import numpy as np  # noqa: E402
from common import CpuMonitor, markdown_table, write_results as write_files  # noqa: E402

from real import corpus  # noqa: E402
from real.compare_int8 import DEFAULT_COUNTS, TEXT, TOP1_KINDS, binary_suffix, fmt_db, latency_shapes, measure, one_line, run_native  # noqa: E402

NAME = "default_path"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
CNN_KINDS = ("image-classifier", "binary-classifier", "ocr-det", "ocr-rec", "ocr-cls", "layout")
DEFAULT_MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "ppocr_cls", "ppocr_rec",
                  "ppocr_det", "layout", "opennsfw", "minilm")
#: Issue 18's "done when" numbers.
SPEEDUP_MODELS = ("efficientnet_lite1", "efficientnet_lite2")
MIN_SPEEDUP = 1.6
MIN_TOP1 = 0.90
MIN_REALIZATION = 0.7
MAX_WALL_S = 600.0
MAX_GAP_S = 30.0
POLL_S = 0.1
STAMP = re.compile(r"^\[(?:(\d+):)?(\d+):(\d{2})\]")
REPO = BENCHMARKS.parent


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------- the command


def stamp_seconds(line: str) -> int | None:
    """Seconds of a progress line's `[m:ss]` / `[h:mm:ss]` stamp; None when the line has none."""
    m = STAMP.match(line)
    if not m:
        return None
    h, mm, ss = m.groups()
    return int(h or 0) * 3600 + int(mm) * 60 + int(ss)


def run_command(cmd: list[str], stdout_path: Path, stderr_path: Path, timeout_s: float) -> dict[str, Any]:
    """Run `cmd` with stdout/stderr redirected to files; wall time, exit code, progress-line gaps."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    arrivals: list[float] = []
    lines: list[str] = []
    pending = ""
    timed_out = False
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err, open(stderr_path, "rb") as tail:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=str(REPO),
                                start_new_session=True)

        def drain() -> None:
            nonlocal pending
            chunk = tail.read()
            if not chunk:
                return
            now = time.monotonic() - start
            pending += chunk.decode("utf-8", "replace")
            *complete, pending = pending.split("\n")
            for line in complete:
                lines.append(line)
                arrivals.append(now)

        while proc.poll() is None:
            drain()
            if time.monotonic() - start > timeout_s:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # the process group this script started
                proc.wait()
                break
            time.sleep(POLL_S)
        wall = time.monotonic() - start
        drain()
        if pending:
            lines.append(pending)
            arrivals.append(wall)
    points = [0.0] + arrivals + [wall]
    arrival_gap = max(b - a for a, b in zip(points, points[1:], strict=False))
    stamps = [s for s in (stamp_seconds(line) for line in lines) if s is not None]
    stamp_gap = max((b - a for a, b in zip(stamps, stamps[1:], strict=False)), default=None)
    return {"wall_s": wall, "exit_code": None if timed_out else proc.returncode, "timed_out": timed_out,
            "stderr_lines": len(lines), "stamped_lines": len(stamps), "max_gap_stamps_s": stamp_gap,
            "max_gap_arrival_s": arrival_gap, "stderr_tail": lines[-8:]}


def read_report(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if not path.exists():
        return None, "no report written"
    try:
        return json.loads(path.read_text()), None
    except ValueError as exc:
        return None, f"report is not JSON: {one_line(exc)}"


def summarize_report(report: dict[str, Any]) -> dict[str, Any]:
    """What this benchmark takes from the tool's JSON report."""
    passes = report.get("passes") or []
    bench = report.get("bench") or {}
    before, after = report.get("before") or {}, report.get("after") or {}
    macs_ratio = (before["macs"] / after["macs"]) if before.get("macs") and after.get("macs") else None
    search = report.get("search") or {}
    return {
        "stages_kept": [p["name"] for p in passes if p.get("modified")],
        "stages_unchanged": [p["name"] for p in passes if not p.get("modified")],
        "int8": any(p["name"].startswith("quantize") and p.get("modified") for p in passes),
        "notes": report.get("notes") or [],
        "mode": report.get("mode"),
        "tolerance": report.get("tolerance"),
        "search_points": [{k: v for k, v in p.items() if k != "fidelity"} for p in search.get("points") or []],
        "closing": search.get("closing"),  # int8 alone on the unpruned model: kept, softened or dropped (why)
        "recovery": search.get("recovery"),  # distillation's metric before and after, when it ran
        "report_exit_code": report.get("exit_code"),
        "macs_before": before.get("macs"), "macs_after": after.get("macs"), "macs_ratio": macs_ratio,
        "bench": bench,
        "report_fidelity": report.get("fidelity"),
        "estimate": report.get("estimate"),  # the tool's estimate: metric, interval, samples, sources, basis
    }


# ------------------------------------------------------------------------------------- measuring


def eval_fidelity(entry: corpus.Entry, feeds: list[dict[str, np.ndarray]], output: Path) -> dict[str, Any]:
    """Float input vs output model on the evaluation feeds, one intra-op thread, one sample per run."""
    try:
        reference = run_native(entry.path, feeds, threads=1)
    except Exception as exc:  # noqa: BLE001
        return {"error": f"float model: {one_line(exc)}"}
    return measure(entry.kind, reference, lambda: (run_native(output, [f], threads=1)[0] for f in feeds))


def own_latency(entry: corpus.Entry, output: Path, shapes: dict[str, tuple[int, ...]], args) -> dict[str, Any]:
    from onnxcompress.bench import BenchOptions, benchmark

    monitor = CpuMonitor()
    try:
        report = benchmark([("input", str(entry.path)), ("output", str(output))],
                           BenchOptions(batch_sizes=(args.batch,), runs=args.runs, threads=args.threads,
                                        input_shapes=shapes))
    except Exception as exc:  # noqa: BLE001
        return {"error": one_line(exc), "others_cpu_share": monitor.share()}
    rows = {row.model: row for row in report.rows}
    out: dict[str, Any] = {"others_cpu_share": monitor.share(), "batch": args.batch, "threads": args.threads,
                           "runs": args.runs, "shapes": shapes}
    for key in ("input", "output"):
        row = rows.get(key)
        out[f"{key}_ms"] = row.timing.median_ms if row is not None and row.timing else None
        if row is not None and not row.timing:
            out[f"{key}_error"] = row.reason
    out_row = rows.get("output")
    out["measured_speedup"] = out_row.measured_speedup if out_row is not None else None
    out["theoretical_speedup"] = out_row.theoretical_speedup if out_row is not None else None
    return out


def eval_sources(entry: corpus.Entry, n: int) -> list[str]:
    """The distinct sources of the first n evaluation samples (rendered pages counted as one source;
    sentences have no per-sample source: the split's is scikit-learn's docstrings, README.md)."""
    found = set()
    for p in corpus.provenance(entry.name, "evaluation", n):
        source = p.get("source")
        if source is None:
            source = "scikit-learn docstrings" if entry.kind == TEXT else "?"
        elif source.startswith("rendered page"):
            source = "rendered evaluation pages (DejaVu Serif / STIX General)"
        found.add(source)
    return sorted(found)


def run_model(entry: corpus.Entry, args: argparse.Namespace) -> dict[str, Any]:
    n_calib = min(args.calib or DEFAULT_COUNTS.get(entry.kind, (64, 300))[0], entry.counts["calibration"])
    n_eval = min(args.eval or DEFAULT_COUNTS.get(entry.kind, (64, 300))[1], entry.counts["evaluation"])
    row: dict[str, Any] = {"name": entry.name, "kind": entry.kind, "onnx": str(entry.path),
                           "samples": {"calibration": n_calib, "evaluation": n_eval},
                           "eval_sources": eval_sources(entry, n_eval)}
    with tempfile.TemporaryDirectory(prefix=f"default-path-{entry.name}-") as tmp:
        folder = Path(tmp)
        calib = folder / "calib.npz"
        arrays = corpus.stack(corpus.calibration(entry.name, n_calib), corpus.pad_id(entry.name))
        labels = [p.get("source") for p in corpus.provenance(entry.name, "calibration", n_calib)]
        if all(labels):  # the photo or page each sample was cut from: the tool holds out whole sources
            arrays["__source__"] = np.array(labels)
        np.savez(calib, **arrays)
        output, report_path = folder / "out.onnx", folder / "report.json"
        cmd = [sys.executable, "-m", "onnxcompress", "optimize", str(entry.path), "-o", str(output),
               "--calib", str(calib), "--json", "--report", str(report_path), *args.extra]
        row["command"] = "python -m onnxcompress optimize MODEL -o OUT.onnx --calib CALIB.npz --json --report REPORT.json" \
            + ("" if not args.extra else " " + shlex.join(args.extra))
        log(f"{entry.name} ({entry.kind}): {n_calib} calibration samples; running the default command "
            f"(timeout {args.timeout_min:g} min)")
        monitor = CpuMonitor()
        run = run_command(cmd, folder / "stdout.json", folder / "stderr.txt", args.timeout_min * 60)
        run["others_cpu_share"] = monitor.share()  # other processes' share of the CPUs while the command ran
        row["run"] = run
        log(f"  exit {run['exit_code']}{' (timed out)' if run['timed_out'] else ''} after {run['wall_s']:.0f} s; "
            f"max progress gap {run['max_gap_arrival_s']:.1f} s (stamps: {run['max_gap_stamps_s']})")
        report, error = read_report(report_path)
        row["report"] = summarize_report(report) if report else {"error": error}
        if not output.exists():
            row["error"] = "timed out" if run["timed_out"] else f"no output model (exit {run['exit_code']})"
            return row
        feeds = corpus.evaluation(entry.name, n_eval)
        log(f"  fidelity on {n_eval} evaluation samples (1 thread)")
        row["fidelity"] = eval_fidelity(entry, feeds, output)
        shapes = latency_shapes(entry.kind, feeds)
        log(f"  latency at batch {args.batch}, {args.threads} threads, {args.runs} runs (interleaved)")
        row["latency"] = own_latency(entry, output, shapes, args)
    return row


# --------------------------------------------------------------------------------------- results


def realization(measured: float | None, theoretical: float | None) -> float | None:
    return measured / theoretical if measured and theoretical else None


def derived(m: dict[str, Any]) -> dict[str, Any]:
    rep, lat = m.get("report") or {}, m.get("latency") or {}
    bench = rep.get("bench") or {}
    theoretical = rep.get("macs_ratio")
    return {
        "theoretical": theoretical,
        "report_measured": bench.get("measured_speedup"),
        "own_measured": lat.get("measured_speedup"),
        "report_realization": realization(bench.get("measured_speedup"), bench.get("theoretical_speedup") or theoretical),
        "own_realization": realization(lat.get("measured_speedup"), theoretical),
    }


def fx(value: float | None, digits: int = 2, suffix: str = "x") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def fidelity_text(kind: str, fid: dict[str, Any] | None) -> tuple[str, str]:
    if not fid:
        return "-", "-"
    if fid.get("error"):
        return "error", fid["error"]
    if kind in TOP1_KINDS:
        main = f"top-1 {fid['top1_agreement']:.1%}" + binary_suffix(fid)
    elif kind == TEXT:
        main = f"cosine {fid['cosine_mean']:.4f} (min {fid['cosine_min']:.4f})"
    else:
        main = "SQNR only"
    return main, f"{fmt_db(fid.get('sqnr_db'))} dB"


HEADERS = ["model", "wall s", "exit", "max progress gap s (seen / stamps)", "stages kept", "int8",
           "theoretical (MACs)", "measured (report)", "measured (own)", "realization (report / own)",
           "fidelity", "SQNR", "eval samples / sources"]


def table_rows(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in data["models"]:
        run, rep = m.get("run") or {}, m.get("report") or {}
        d = derived(m)
        exit_text = "timeout" if run.get("timed_out") else str(run.get("exit_code"))
        gap = f"{run['max_gap_arrival_s']:.1f} / {run['max_gap_stamps_s'] if run.get('max_gap_stamps_s') is not None else '-'}" \
            if run else "-"
        stages = ", ".join(rep.get("stages_kept") or []) or ("-" if rep.get("error") is None else rep["error"])
        main, sqnr = fidelity_text(m["kind"], m.get("fidelity"))
        if m.get("error"):
            main = m["error"]
        lat = m.get("latency") or {}
        own = fx(d["own_measured"]) if not lat.get("error") else f"error: {lat['error']}"
        rows.append([
            m["name"], f"{run.get('wall_s', 0):.0f}", exit_text, gap, stages, "yes" if rep.get("int8") else "no",
            fx(d["theoretical"]), fx(d["report_measured"]), own,
            f"{fx(d['report_realization'], suffix='')} / {fx(d['own_realization'], suffix='')}",
            main, sqnr, f"{m['samples']['evaluation']} / {len(m.get('eval_sources') or [])}",
        ])
    return rows


def acceptance(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(check, pass | fail | not measured, detail) for each of issue 18's 'done when' lines this script measures."""
    models = {m["name"]: m for m in data["models"]}
    args = data["args"]
    out = []
    # 1. Lite1 / Lite2: >= 1.6x measured at batch 1 on 2 threads, >= 90 % top-1
    details, verdicts = [], []
    for name in SPEEDUP_MODELS:
        m = models.get(name)
        if m is None:
            details.append(f"{name} not run")
            verdicts.append(None)
            continue
        speed = derived(m)["own_measured"]
        top1 = (m.get("fidelity") or {}).get("top1_agreement")
        ok = speed is not None and top1 is not None and speed >= MIN_SPEEDUP and top1 >= MIN_TOP1
        details.append(f"{name} {fx(speed)}, top-1 {'-' if top1 is None else f'{top1:.1%}'}")
        verdicts.append(ok)
    shape_ok = args["batch"] == 1 and args["threads"] == 2
    out.append((f"Lite1/Lite2 >= {MIN_SPEEDUP}x measured at batch 1 on 2 threads with >= {MIN_TOP1:.0%} top-1",
                _verdict(verdicts, shape_ok), "; ".join(details)
                + ("" if shape_ok else f" (measured at batch {args['batch']}, {args['threads']} threads)")))
    # 2. realization >= 0.7 on every corpus CNN
    cnns = [e.name for e in corpus.models() if e.kind in CNN_KINDS]
    details, verdicts = [], []
    for name in cnns:
        m = models.get(name)
        r = derived(m)["own_realization"] if m else None
        verdicts.append(None if m is None else (r is not None and r >= MIN_REALIZATION))
        if m is not None:
            details.append(f"{name} {fx(r, suffix='')}")
    out.append((f"realization (own measured / MAC ratio) >= {MIN_REALIZATION} on every corpus CNN",
                _verdict(verdicts), "; ".join(details) + _missing(cnns, models)))
    # 3. wall time <= 10 min on every corpus model; 4. progress gap <= 30 s
    everyone = [e.name for e in corpus.models()]
    for label, key, limit in (("wall time <= 10 min on every corpus model", "wall_s", MAX_WALL_S),
                              (f"progress lines at least every {MAX_GAP_S:.0f} s (stderr a file)", "max_gap_arrival_s", MAX_GAP_S)):
        verdicts, details = [], []
        for name in everyone:
            m = models.get(name)
            if m is None:
                verdicts.append(None)
                continue
            value = (m.get("run") or {}).get(key)
            verdicts.append(value is not None and value <= limit and not m["run"].get("timed_out"))
            details.append(f"{name} -" if value is None else f"{name} {value:.0f} s" if key == "wall_s" else f"{name} {value:.1f} s")
        out.append((label, _verdict(verdicts), "; ".join(details) + _missing(everyone, models)))
    return out


def _verdict(verdicts: list[bool | None], shape_ok: bool = True) -> str:
    measured = [v for v in verdicts if v is not None]
    if not measured:
        return "not measured"
    if any(v is False for v in measured) and shape_ok:
        return "FAIL"
    if not shape_ok:
        return "not measured (other batch/threads)"
    if len(measured) < len(verdicts):
        return f"pass on the {len(measured)} measured, {len(verdicts) - len(measured)} not run"
    return "pass"


def _missing(names: list[str], models: dict[str, Any]) -> str:
    left = [n for n in names if n not in models]
    return f" (not run: {', '.join(left)})" if left else ""


def machine() -> dict[str, Any]:
    import onnxruntime

    from onnxcompress.bench import cpu_description, logical_cores, physical_cores

    cpu, flags = cpu_description()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "onnxcompress"],
                                capture_output=True, text=True).stdout.strip())
    return {"cpu": cpu, "cpu_flags": flags, "physical_cores": physical_cores(), "logical_cores": logical_cores(),
            "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0],
            "onnxcompress_commit": commit, "onnxcompress_dirty": dirty}


def render(data: dict[str, Any]) -> str:
    mc = data["machine"]
    flags = mc["cpu_flags"]
    flag_text = ", ".join(f"{k} {'yes' if flags.get(k) else 'no'}" for k in ("avx2", "avx512f", "avx512_vnni", "avx_vnni"))
    status = "" if data["complete"] else " (partial: still running or stopped early)"
    left = [name for name in DEFAULT_MODELS if name not in {m["name"] for m in data["models"]}]
    if left:
        status += f" (partial table: {len(data['models'])} models run; not run: {', '.join(left)})"
    args = data["args"]
    checks = acceptance(data)
    lines = [
        f"## The default `optimize --calib` on the real-model corpus (issue 18){status}", "",
        f"CPU: {mc['cpu']} ({mc['physical_cores']} physical / {mc['logical_cores']} logical cores; {flag_text}). "
        f"onnxruntime {mc['onnxruntime']}, python {mc['python']}; onnxcompress at commit "
        f"{mc['onnxcompress_commit']}{' with uncommitted changes under onnxcompress/' if mc['onnxcompress_dirty'] else ''}.", "",
        f"Benchmark: `{data['command']}`.", "",
        f"Command run per model: `{data['default_command']}` (stdout and stderr redirected to files).", "",
        markdown_table(HEADERS, table_rows(data), right=[False, True, True, True, False, False] + [True] * 7), "",
        "### Issue 18 acceptance checks", "",
        *[f"- **{verdict}** — {label}: {detail}" for label, verdict, detail in checks], "",
        "### Notes", "",
        *[f"- {line}" for line in notes(data)], "",
    ]
    return "\n".join(lines) + "\n"


def notes(data: dict[str, Any]) -> list[str]:
    args = data["args"]
    out = [
        "max progress gap: seen = the longest time, by this script's clock, between two new lines in the stderr file "
        "(start to first line and last line to exit included); stamps = the longest difference between the `[m:ss]` "
        "stamps of consecutive stamped lines.",
        "theoretical: the input model's MACs / the output's (the report's `before.macs` / `after.macs`; int8 does not "
        "change MACs, so an int8 result's realization can exceed 1). measured (report): `bench.measured_speedup`, "
        "the tool's own interleaved timing (at the report's `bench.batch` and `bench.threads`). measured (own): "
        f"onnxcompress.bench.benchmark run by this script at batch {args['batch']}, {args['threads']} intra-op "
        f"threads, {args['runs']} runs, interleaved, spinning off. realization = measured / theoretical.",
        "fidelity: the float input model against the output on the evaluation split (sources never used for "
        "calibration), ONNX Runtime at 1 intra-op thread, one sample per run: top-1 agreement (classifiers; for 2-class "
        "outputs also the correlation of the positive class's log-odds and its largest probability change), mean "
        "(min) cosine of the embeddings (text encoders), SQNR of the worst output (all; det/rec/layout have only it).",
        "stages kept: the passes of the result that changed the model, from the report's `passes`.",
    ]
    for label, part in (("while the optimize command ran (its wall time and the tool's own timing)", "run"),
                        ("during this script's latency check", "latency")):
        busy = {m["name"]: (m.get(part) or {}).get("others_cpu_share") for m in data["models"]}
        busy = {k: v for k, v in busy.items() if v is not None and v > 0.05}
        if busy:
            out.append(f"Other processes took CPU {label}: " + ", ".join(f"{k} {v:.0%}" for k, v in busy.items())
                       + " of the machine; those numbers are noisy.")
    for m in data["models"]:
        rep = m.get("report") or {}
        if rep.get("notes"):
            out.append(f"{m['name']}, the tool's notes: " + "; ".join(rep["notes"]))
        points = rep.get("search_points") or []
        if points:
            bound = (rep.get("tolerance") or {}).get("description", "?")
            shown = "; ".join(f"level {p['level']:.3f}{' (' + p['note'] + ')' if p.get('note') else ''}: "
                              f"{p['value']:.4g} {'accepted' if p.get('accepted') else 'rejected'}" for p in points)
            out.append(f"{m['name']}, the search's candidates against `{bound}` (held-out calibration samples): {shown}.")
        closing = rep.get("closing") or {}
        if closing.get("passes"):
            speed = closing.get("speedup_over_float")
            out.append(f"{m['name']}, {', '.join(closing['passes'])} alone: {closing['outcome']} (metric value "
                       f"{closing['value']:.4g}" + (f", {speed:.2f}x the float model's speed" if speed else "") + ").")
        if rep.get("recovery"):
            r = rep["recovery"]
            out.append(f"{m['name']}, recovery at level {r['level']:.3f}: " + (f"failed: {r['error']}" if r.get("error") else
                       f"metric value {r['before']:.4g} -> {r['after']:.4g}") + ".")
        if m.get("error") or (m.get("run") or {}).get("exit_code") not in (0, None):
            out.append(f"{m['name']}: exit {m['run'].get('exit_code')}; stderr ends: "
                       + " | ".join((m["run"].get("stderr_tail") or [])[-3:]))
    return out


def write_results(data: dict[str, Any], out: Path) -> str:
    return write_files(out, NAME, data, render(data))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated corpus model names")
    parser.add_argument("--calib", type=int, default=None, help="calibration samples (default per kind, as compare_int8: "
                        + ", ".join(f"{k} {v[0]}" for k, v in DEFAULT_COUNTS.items()) + ")")
    parser.add_argument("--eval", type=int, default=None, help="evaluation samples (default per kind: "
                        + ", ".join(f"{k} {v[1]}" for k, v in DEFAULT_COUNTS.items()) + ")")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for this script's latency check")
    parser.add_argument("--batch", type=int, default=1, help="batch size for this script's latency check")
    parser.add_argument("--runs", type=int, default=40, help="timed runs per model in this script's latency check")
    parser.add_argument("--timeout-min", type=float, default=15.0, help="kill the optimize command after this long")
    parser.add_argument("--extra", default="", help="arguments appended to the optimize command (one string)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for default_path.{md,json}")
    parser.add_argument("--render", type=Path, default=None, help="only write default_path.md again from this JSON")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.extra = shlex.split(args.extra)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        print(write_results(json.loads(args.render.read_text()), args.out))
        return 0
    try:
        entries = [corpus.model(name) for name in args.models]
    except (corpus.CorpusMissing, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    info = machine()
    started = time.monotonic()
    data: dict[str, Any] = {
        "command": "python benchmarks/real/default_path.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "default_command": "python -m onnxcompress optimize MODEL -o OUT.onnx --calib CALIB.npz --json --report REPORT.json"
                           + (" " + shlex.join(args.extra) if args.extra else ""),
        "machine": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "models": [], "complete": False, "total_seconds": 0.0,
    }
    log(f"CPU {info['cpu']}; onnxcompress {info['onnxcompress_commit']}; models: {', '.join(args.models)}")
    for entry in entries:
        try:
            row = run_model(entry, args)
        except Exception as exc:  # noqa: BLE001 - one model's failure is its row, not the end of the run
            row = {"name": entry.name, "kind": entry.kind, "samples": {"calibration": 0, "evaluation": 0},
                   "error": f"benchmark failed: {one_line(exc)}"}
        data["models"].append(row)
        data["total_seconds"] = time.monotonic() - started
        write_results(data, args.out)
        d = derived(row)
        log(f"{entry.name} done: theoretical {fx(d['theoretical'])}, measured report {fx(d['report_measured'])} / "
            f"own {fx(d['own_measured'])}; fidelity {fidelity_text(entry.kind, row.get('fidelity'))}")
    data["complete"] = True
    data["total_seconds"] = time.monotonic() - started
    print(write_results(data, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
