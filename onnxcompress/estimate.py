"""The fidelity estimate a report gives: the result against its input, on samples no pass fitted to.

Passes that fit to calibration data (int8 ranges, recovery's refit, factorization's moments,
distillation) look good on the samples they fitted. The estimate is measured on other samples:
the user's evaluation data (`--eval`), or calibration samples held out from every pass (whole
sources, where the samples name them). It carries a bootstrap interval over those samples and says
how many samples from how many sources it rests on, and what that means for other data (`CAVEATS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .calibration import Calibration, fed_sources, model_batches
from .interval import bootstrap_interval, pessimistic
from .report import Fidelity
from .tolerance import Tolerance, default_tolerance
from .verify import compare, outputs, reference_outputs

#: The share of calibration samples a fixed recipe holds out from its passes for the estimate, the
#: same share recovery holds out (pipeline.FITTING_HOLDOUT) so the search and recipes agree.
ESTIMATE_HOLDOUT = 0.2
#: Below this many calibration samples every sample goes to the passes (a held-out handful would
#: say little) and the estimate says it is measured on samples the passes fitted.
MIN_SPLIT_SAMPLES = 20


#: What an estimate rests on, and what that means for other data.
CAVEATS = {
    "evaluation data": "",
    "held-out sources": "",
    "one held-out source": "all from one source, whose views move together: other sources can differ by more "
                           "than the interval (give more sources, or --eval)",
    "held-out samples": "samples of the fitted sources: other photos or texts may fare worse "
                        "(name each sample's source with __source__, or give --eval)",
    "fitted samples": "the passes fitted these samples: not an estimate for other data",
}


@dataclass(frozen=True)
class Estimate:
    """One metric of the result against its input, with the interval a different draw would give."""

    metric: str  # the tolerance's metric: top1, cosine, mse (drops) or sqnr (dB)
    value: float
    interval: tuple[float, float] | None  # 80% bootstrap interval over the samples (None: one sample)
    pessimistic: float  # the interval's worse end (the value when there is no interval)
    samples: int
    sources: int | None  # distinct sources of the samples (None: not labelled)
    measured_on: str
    basis: str  # a key of CAVEATS

    @classmethod
    def of(cls, tolerance: Tolerance, value: float, interval: tuple[float, float] | None, data: Calibration,
           basis: str) -> Estimate:
        """The estimate of `tolerance`'s metric measured on `data`."""
        return cls(metric=tolerance.metric, value=value, interval=interval,
                   pessimistic=value if interval is None else pessimistic(tolerance, interval),
                   samples=data.num_samples, sources=data.source_count, measured_on=data.source,
                   basis="fitted samples" if data.is_random else basis)

    def describe(self) -> str:
        unit = " dB" if self.metric == "sqnr" else ""
        what = "SQNR" if self.metric == "sqnr" else f"{self.metric} drop"
        spread = "" if self.interval is None else f" (80% interval {self.interval[0]:.4g} to {self.interval[1]:.4g})"
        origin = f"{self.samples} samples" + (f" of {self.sources} source{'s' if self.sources != 1 else ''}" if self.sources else "")
        caveat = CAVEATS.get(self.basis, "")
        return f"{what} {self.value:.4g}{unit}{spread} on {origin}, {self.measured_on}" + (f"; {caveat}" if caveat else "")


def split_for_estimate(calibration: Calibration) -> tuple[Calibration, Calibration | None]:
    """(data for the passes, held-out data for the estimate); no held-out part for small sets."""
    if calibration.is_random or calibration.num_samples < MIN_SPLIT_SAMPLES:
        return calibration, None
    return calibration.split(ESTIMATE_HOLDOUT)


def basis_of(held: Calibration, fitted: Calibration | None) -> str:
    """The CAVEATS key for `held` against the samples the passes `fitted` (None: `held` is the
    user's evaluation data)."""
    if fitted is None:
        return "evaluation data"
    if held.sources is not None and fitted.sources is not None and set(held.sources).isdisjoint(fitted.sources):
        return "held-out sources" if held.source_count >= 2 else "one held-out source"
    return "held-out samples"


def measure(original: ir.Model, result: ir.Model, data: Calibration, tolerance: Tolerance | None,
            basis: str) -> tuple[Fidelity, Estimate]:
    """`result` against `original` on every sample of `data`, with the estimate of `tolerance`'s
    metric (the default tolerance's when None)."""
    feeds = model_batches(original, data)
    reference = reference_outputs(original, feeds, data.source)
    got = outputs(result, feeds, "the result")
    fidelity = compare(reference, got, f"{data.source}, {data.num_samples} samples")  # as the search's judge
    return fidelity, estimate_from(reference, got, fidelity, data, tolerance, basis, fed_sources(data, feeds))


def estimate_from(reference: Sequence[Sequence[np.ndarray]], got: Sequence[Sequence[np.ndarray]], fidelity: Fidelity,
                  data: Calibration, tolerance: Tolerance | None, basis: str,
                  sources: Sequence[object] | None = None) -> Estimate:
    """The estimate from outputs already computed; `sources` per row resamples whole sources."""
    # the search's default metric where no tolerance was given (top-1 would read embeddings as classes)
    tolerance = default_tolerance(reference) if tolerance is None else tolerance.resolved(reference)
    interval = bootstrap_interval(tolerance, reference, got, sources=sources)
    return Estimate.of(tolerance, tolerance.value(fidelity), interval, data, basis)
