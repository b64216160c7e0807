"""Run a model on an emulated x86 CPU (qemu-user) to see what ORT's kernels compute there.

ONNX Runtime picks its int8 kernels from the CPU's flags at start-up. `qemu-x86_64 -cpu Haswell-v4`
runs the same Python and ORT wheel on a CPU that reports AVX2 without AVX-512 or VNNI, so MLAS
takes the path most x86 servers take (VPMADDUBSW, int16 pair sums), bit for bit. Emulation is
slow, float convolutions especially: run int8 models only, on one thread, with few inputs, and
compute float references natively. Never time anything under it.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

QEMU = "qemu-x86_64"
#: Emulated CPUs by the int8 kernel path they make ORT take. qemu's TCG has no AVX-512, so VNNI
#: kernels cannot be emulated: a VNNI CPU (or the float simulation) is the other side.
CPUS = {"avx2": "Haswell-v4"}
#: A model and its feeds in, outputs out: imports nothing but numpy and onnxruntime (start-up under
#: emulation costs seconds per module).
_CHILD = r"""
import sys, numpy as np, onnxruntime as ort
model, feeds_path, out_path = sys.argv[1:4]
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
opts.log_severity_level = 3
sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
data = np.load(feeds_path)
count = int(data["__count__"])
names = [i.name for i in sess.get_inputs()]
result = {}
for k in range(count):
    for j, array in enumerate(sess.run(None, {n: data[f"{k}/{n}"] for n in names})):
        result[f"{k}/{j}"] = array
np.savez(out_path, **result)
"""


class EmulationUnavailable(RuntimeError):
    """qemu-user is not installed, or this is not an x86-64 Linux machine."""


def available() -> bool:
    return sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64") and shutil.which(QEMU) is not None


def run_emulated(
    model: str | os.PathLike, feeds: Sequence[Mapping[str, np.ndarray]], *, cpu: str = "avx2", timeout: float = 900.0
) -> list[list[np.ndarray]]:
    """ORT CPU outputs of the model at `model` for each feed dict, computed on the emulated `cpu`
    (a key of CPUS or a qemu CPU model name)."""
    if not available():
        raise EmulationUnavailable(f"CPU emulation needs {QEMU} (Debian: apt-get install qemu-user) on x86-64 Linux")
    with tempfile.TemporaryDirectory(prefix="onnxcompress-emulate-") as tmp:
        feeds_path, out_path = Path(tmp, "feeds.npz"), Path(tmp, "outputs.npz")
        arrays = {f"{k}/{name}": np.asarray(v) for k, feed in enumerate(feeds) for name, v in feed.items()}
        np.savez(feeds_path, __count__=np.asarray(len(feeds)), **arrays)
        command = [QEMU, "-cpu", CPUS.get(cpu, cpu), sys.executable, "-c", _CHILD, str(model), str(feeds_path), str(out_path)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if "TCG doesn't support" not in line]
            raise RuntimeError(f"emulated run on {cpu} failed: {(lines or ['no message'])[-1][:300]}")
        with np.load(out_path) as out:
            width = 1 + max((int(key.split("/")[1]) for key in out.files), default=-1)
            return [[out[f"{k}/{j}"] for j in range(width)] for k in range(len(feeds))]


__all__ = ["CPUS", "EmulationUnavailable", "available", "run_emulated"]
