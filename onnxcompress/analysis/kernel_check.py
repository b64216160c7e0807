"""Do the CPU's fused int8 kernels compute what the QDQ graph says?

ORT runs a QDQ model two ways: fused into int8 kernels (the default), or with graph optimizations
off, where every QuantizeLinear/DequantizeLinear runs as written and the int8 layers compute in
float on dequantized values: the simulation of the graph's numbers. Both are compared with the float
model; when the fused model is more than KERNEL_GAP_MAX_DB worse than the simulation, the kernels
lose what the quantizer did not (int16 pair saturation on x86 without VNNI, for instance).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from .. import runtime
from ..verify import compare

#: The fused model may trail the float simulation of the same graph by this much (dB of SQNR
#: against the float model); rounding-order differences stay far below it.
KERNEL_GAP_MAX_DB = 1.0


@dataclass(frozen=True)
class KernelCheck:
    fused_sqnr_db: float
    simulated_sqnr_db: float
    samples: int
    inputs: str

    @property
    def gap_db(self) -> float:
        if self.simulated_sqnr_db == self.fused_sqnr_db:  # both inf included
            return 0.0
        return self.simulated_sqnr_db - self.fused_sqnr_db

    @property
    def ok(self) -> bool:
        return self.gap_db <= KERNEL_GAP_MAX_DB

    def describe(self) -> str:
        verdict = "ok" if self.ok else f"the CPU's int8 kernels lose {self.gap_db:.1f} dB"
        return (f"kernel check {verdict}: fused {self.fused_sqnr_db:.1f} dB, simulated {self.simulated_sqnr_db:.1f} dB "
                f"against float on {self.samples} samples of {self.inputs}")

    def to_dict(self) -> dict[str, Any]:
        return {"fused_sqnr_db": self.fused_sqnr_db, "simulated_sqnr_db": self.simulated_sqnr_db, "gap_db": self.gap_db,
                "ok": self.ok, "max_gap_db": KERNEL_GAP_MAX_DB, "samples": self.samples, "inputs": self.inputs}


def simulated_outputs(model: ir.Model | str, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Outputs with ORT's graph optimizations off: QDQ as written, int8 layers in float."""
    sess = runtime.session(model, options=runtime.session_options(spinning=False, optimize=False))
    return runtime.run_batches(sess, feeds)


def check_kernels(
    model: ir.Model | str, feeds: Sequence[Mapping[str, np.ndarray]], reference: Sequence[Sequence[np.ndarray]],
    source: str, *, fused: Sequence[Sequence[np.ndarray]] | None = None,
) -> KernelCheck:
    """Fused and simulated outputs of `model` against the float `reference` outputs of `feeds`
    (`fused`: outputs already computed with the default session, e.g. on another CPU)."""
    if fused is None:
        fused = runtime.run_batches(runtime.session(model), feeds)
    simulated = simulated_outputs(model, feeds)
    f, s = compare(reference, fused, source), compare(reference, simulated, source)
    return KernelCheck(float(f.sqnr_db), float(s.sqnr_db), f.samples, source)


__all__ = ["KERNEL_GAP_MAX_DB", "KernelCheck", "check_kernels", "simulated_outputs"]
