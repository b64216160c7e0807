"""Ray as the engine (the `ray` extra), on a local Ray of 4 CPUs started once for the module:
calibration statistics on Ray Data shards give bit-identical int8 models, a model with external data
goes to the workers by path with the same statistics, a reducer that cannot merge runs in-process, a
killed worker is retried with the same result, and optimize-many on Ray writes the same files as a
serial run."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest

ray = pytest.importorskip("ray")

from onnxcompress.analysis.activations import collect  # noqa: E402
from onnxcompress.analysis.histograms import Histograms, collect_histograms  # noqa: E402
from onnxcompress.analysis.streaming import reduce_values  # noqa: E402
from onnxcompress.calibration import Calibration  # noqa: E402
from onnxcompress.cli import main  # noqa: E402
from onnxcompress import distributed  # noqa: E402
from onnxcompress.distributed import RayEngine, RayUnavailableError, connect  # noqa: E402
from onnxcompress.errors import ExitCode  # noqa: E402
from onnxcompress.fleet import Job, JobResult, plan_jobs, run_job, run_ray, settings_from  # noqa: E402
from onnxcompress.model import external_tensors, load, save, to_proto  # noqa: E402
from onnxcompress.passes.quantize import QuantizeQDQ  # noqa: E402
from onnxcompress.pipeline import Pipeline  # noqa: E402
from tests.graphs import conv_bn_relu_gemm  # noqa: E402

WORKERS = 4
#: 1 opening sample + 127 in runs of 16: 4 shards of 2 runs, so shard merges add float sums across runs.
SAMPLES = 128


@pytest.fixture(scope="module")
def local_ray():
    connect(None, WORKERS)  # what --ray local does: workers import this checkout's onnxcompress
    yield
    ray.shutdown()


@dataclass(frozen=True)
class CountingEngine(RayEngine):
    """A RayEngine that records which statistics went through it (so a test cannot pass in-process)."""

    calls: list = field(default_factory=list, compare=False)

    def reduce(self, model, names, calibration, reducer, **kwargs):
        self.calls.append(type(reducer).__name__)
        return super().reduce(model, names, calibration, reducer, **kwargs)


@dataclass
class CrashOnce(Histograms):
    """Histograms whose shards kill their worker process on the first add of the first shard to
    claim `marker` (so exactly one worker dies once); the driver's own reducer never crashes."""

    marker: str = ""
    armed: bool = False

    def fresh(self) -> CrashOnce:
        return CrashOnce(self.bins, marker=self.marker, armed=True)

    def add(self, count, values, mask=None) -> None:
        if self.armed:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        super().add(count, values, mask)


def crash_once_then_run(job: Job) -> JobResult:
    """An optimize-many job whose first try, of the first job to claim the marker, kills its worker."""
    try:
        os.close(os.open(Path(job.output).parent / "crashed-once", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return run_job(job)
    os._exit(1)


def _setup():
    model = load(conv_bn_relu_gemm(batch="N"))
    data = np.random.default_rng(0).normal(1.0, 1.0, size=(SAMPLES, 3, 8, 8)).astype(np.float32)
    return model, Calibration.from_arrays(model, data, "normal(1, 1)")


def _initializers(model) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in to_proto(model, with_data=True).graph.initializer}


def test_ray_calibration_gives_bit_identical_int8_initializers(local_ray):
    model, calibration = _setup()
    engine = CountingEngine(workers=WORKERS)
    here = Pipeline([QuantizeQDQ()]).run(model, calibration=calibration).model
    there = Pipeline([QuantizeQDQ()]).run(model, calibration=dataclasses.replace(calibration, engine=engine)).model
    assert {"Histograms", "ActivationStats"} <= set(engine.calls)  # ranges and bias-correction means on Ray
    a, b = _initializers(here), _initializers(there)
    assert a.keys() == b.keys() and any(v.dtype in (np.int8, np.uint8) for v in a.values())
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def test_ray_channel_sums_are_bit_identical(local_ray):
    """Float sums across shards: each shard's run sums are added in sample order, not shard totals."""
    model, _ = _setup()
    # Magnitudes over 12 decades: float64 sums of these float32 values round, so their order shows.
    rng = np.random.default_rng(1)
    data = (rng.normal(size=(SAMPLES, 3, 8, 8)) * 10.0 ** rng.uniform(-8, 4, (SAMPLES, 3, 8, 8))).astype(np.float32)
    calibration = Calibration.from_arrays(model, data, "wide")
    axes = {"x": 1, **{v.name: 1 for node in model.graph for v in node.outputs if len(v.shape or ()) >= 2}}
    here = collect(model, axes, calibration)
    there = collect(model, axes, dataclasses.replace(calibration, engine=RayEngine(workers=WORKERS)))
    assert there.samples == here.samples == SAMPLES and there.values.keys() == here.values.keys() == axes.keys()
    for name, stats in here.values.items():
        for part in ("total", "total_abs", "total_sq", "zeros", "minimum", "maximum"):
            assert np.array_equal(getattr(stats, part), getattr(there.values[name], part)), (name, part)
        assert stats.count == there.values[name].count


@dataclass(frozen=True)
class ShippingEngine(RayEngine):
    """A RayEngine that records how each model went to the workers: "bytes" or "path"."""

    shipped: list = field(default_factory=list, compare=False)

    @contextlib.contextmanager
    def _shipped(self, model):
        with super()._shipped(model) as sent:
            self.shipped.append("path" if sent["path"] else "bytes")
            yield sent


def _assert_same_histograms(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, hist in expected.items():
        assert (got[name].count, got[name].minimum, got[name].maximum, got[name].width_exp, got[name].start) == \
            (hist.count, hist.minimum, hist.maximum, hist.width_exp, hist.start), name
        assert np.array_equal(got[name].counts, hist.counts), name


def test_a_model_with_external_data_goes_to_the_workers_by_path(local_ray, tmp_path):
    model, calibration = _setup()
    on_disk = load(save(model, tmp_path / "model.onnx", external_data=True))
    assert external_tensors(on_disk)  # its weights are in model.onnx.data, not in the graph
    names = [v.name for node in model.graph for v in node.outputs]
    expected, samples = collect_histograms(model, names, calibration)
    engine = ShippingEngine(workers=WORKERS)
    got, got_samples = collect_histograms(on_disk, names, dataclasses.replace(calibration, engine=engine))
    assert engine.shipped == ["path"] and got_samples == samples == SAMPLES
    _assert_same_histograms(got, expected)
    # The same model in memory goes as bytes, unless it is over protobuf's limit (here: made tiny).
    engine.shipped.clear()
    collect_histograms(model, names, dataclasses.replace(calibration, engine=engine))
    assert engine.shipped == ["bytes"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distributed, "MAX_MODEL_BYTES", 1024)
        got, _ = collect_histograms(model, names, dataclasses.replace(calibration, engine=engine))
    assert engine.shipped == ["bytes", "path"]
    _assert_same_histograms(got, expected)


def test_a_cluster_without_a_shared_folder_refuses_a_model_that_must_go_by_path(local_ray, tmp_path):
    model, calibration = _setup()
    on_disk = load(save(model, tmp_path / "model.onnx", external_data=True))
    names = [v.name for node in model.graph for v in node.outputs]
    remote = RayEngine(address="10.0.0.1:6379", workers=WORKERS)  # Ray is already up: only the shipping decides
    with pytest.raises(RayUnavailableError, match=r"^the model has external data .* give RayEngine a shared_dir, "
                                                  r"or calibrate without --ray$"):
        collect_histograms(on_disk, names, dataclasses.replace(calibration, engine=remote))
    shared = ShippingEngine(address="10.0.0.1:6379", workers=WORKERS, shared_dir=str(tmp_path))
    got, _ = collect_histograms(on_disk, names, dataclasses.replace(calibration, engine=shared))
    assert shared.shipped == ["path"] and not list(tmp_path.glob("onnxcompress-ray-*"))  # saved there, then removed
    _assert_same_histograms(got, collect_histograms(model, names, calibration)[0])


@dataclass
class SampleCount:
    """A reducer without merge or fresh: it cannot be cut into shards."""

    samples: int = 0

    def add(self, count, values, mask) -> None:
        self.samples += count


def test_a_reducer_that_cannot_merge_runs_in_process_and_says_why(local_ray, caplog):
    model, calibration = _setup()
    names = [v.name for node in model.graph for v in node.outputs]
    engine = ShippingEngine(workers=WORKERS)
    with caplog.at_level(logging.WARNING, logger="onnxcompress.distributed"):
        counted = reduce_values(model, names, dataclasses.replace(calibration, engine=engine), SampleCount())
    assert counted.samples == SAMPLES and engine.shipped == []  # every sample, and no Ray job
    assert [r.getMessage() for r in caplog.records] == [
        "SampleCount is reduced in this process, not on Ray: it has no merge or fresh, so shard results could not be merged"]


def test_a_killed_worker_is_retried_and_the_statistics_are_unchanged(local_ray, tmp_path):
    model, calibration = _setup()
    names = [v.name for node in model.graph for v in node.outputs]
    expected, samples = collect_histograms(model, names, calibration)
    marker = tmp_path / "killed"
    distributed = dataclasses.replace(calibration, engine=RayEngine(workers=WORKERS, max_retries=0))
    with pytest.raises(RayUnavailableError, match="failed after 0 retries"):  # without retries the crash is fatal
        reduce_values(model, names, distributed, CrashOnce(marker=str(marker)))
    marker.unlink()
    distributed = dataclasses.replace(calibration, engine=RayEngine(workers=WORKERS, max_retries=2))
    merged = reduce_values(model, names, distributed, CrashOnce(marker=str(marker)))
    assert marker.exists()  # a worker did die
    assert merged.samples == samples == SAMPLES and merged.values.keys() == expected.keys()
    for name, hist in expected.items():
        got = merged.values[name]
        assert (got.count, got.minimum, got.maximum, got.width_exp, got.start) == \
            (hist.count, hist.minimum, hist.maximum, hist.width_exp, hist.start), name
        assert np.array_equal(got.counts, hist.counts), name


def _fleet(tmp_path: Path) -> tuple[list[Path], Path]:
    models = []
    for name, seed in (("a", 0), ("b", 1)):
        models.append(tmp_path / f"{name}.onnx")
        onnx.save(conv_bn_relu_gemm(batch="N", seed=seed), models[-1])
    models.append(tmp_path / "broken.onnx")
    models[-1].write_bytes(b"not an onnx model")
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32))
    return models, calib


def test_optimize_many_on_ray_writes_what_a_serial_run_writes(local_ray, tmp_path, capsys):
    models, calib = _fleet(tmp_path)
    common = ["--common", f"--calib {calib} --bench-runs 0", "--setting", "--quantize int8", "--setting", "--prune 0.5"]
    runs = {}
    for engine, extra in (("serial", []), ("ray", ["--ray", "local", "--workers", str(WORKERS)])):
        out = tmp_path / engine
        code = main(["optimize-many", *map(str, models), "-o", str(out), *common, *extra, "--json"])
        runs[engine] = json.loads(capsys.readouterr().out)
        assert code == ExitCode.JOBS_FAILED == runs[engine]["exit_code"]
        codes = {(Path(j["model"]).stem, j["setting"]): j["exit_code"] for j in runs[engine]["jobs"]}
        assert codes == {("a", "s1"): 0, ("a", "s2"): 0, ("b", "s1"): 0, ("b", "s2"): 0,
                         ("broken", "s1"): ExitCode.BAD_INPUT, ("broken", "s2"): ExitCode.BAD_INPUT}
    written = sorted(p.name for p in (tmp_path / "serial").glob("*.onnx"))
    assert written == ["a.s1.onnx", "a.s2.onnx", "b.s1.onnx", "b.s2.onnx"]
    assert sorted(p.name for p in (tmp_path / "ray").glob("*.onnx")) == written
    for name in written:
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    # A worker killed in the middle of the fleet: its job is retried and writes the same file.
    retried = tmp_path / "retried"
    retried.mkdir()
    jobs = plan_jobs(models[:2], settings_from(["--quantize int8"], None), retried, ["--calib", str(calib), "--bench-runs", "0"])
    results = run_ray(jobs, lambda *_: None, run=crash_once_then_run)
    assert (retried / "crashed-once").exists() and [r.exit_code for r in results] == [0, 0]
    for job in jobs:
        assert Path(job.output).read_bytes() == (tmp_path / "serial" / f"{Path(job.model).stem}.s1.onnx").read_bytes()
