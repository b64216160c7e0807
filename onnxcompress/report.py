"""Reports as data: ModelStats, PassRecord, RunReport. Rendering (rich table, JSON) is separate from the data.

The JSON keys are the dataclass field names, in every `--json` output.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelStats:
    """Whole-model cost totals (see analysis/cost.py for how each is counted)."""

    params: int
    macs: int
    flops: int
    weight_bytes: int
    activation_bytes: int
    op_counts: Mapping[str, int] = field(default_factory=dict)
    file_bytes: int | None = None  # size of the serialized model, when known

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)


@dataclass(frozen=True)
class Fidelity:
    """How close a model's outputs are to a reference model's on the same inputs."""

    inputs: str  # where the inputs came from: "calibration", "provided", "random (seed 0)"
    samples: int
    max_abs_error: float
    max_rel_error: float  # max |a-b| / max |a|, per output, worst output
    sqnr_db: float  # 10 log10(signal power / noise power), worst output; inf when identical
    cosine: float  # cosine similarity of flattened outputs, worst output
    top1_agreement: float | None = None  # for outputs that look like class scores [N, C]
    # 2-class outputs [N, 2]: the share of samples whose decision changed, worst output. A 2-class
    # softmax keeps a cosine near 1 whatever the model decides, so tolerances check this too.
    decisions_changed: float | None = None
    # The metric that fits each output kind (output_metrics.py), worst output; None where no output
    # is of that kind. Reporting only: tolerances decide on the fields above.
    kl_divergence: float | None = None  # class scores [N, C>2]: KL(p_ref || p_got) in nats, mean over samples
    positive_class_correlation: float | None = None  # [N, 2]: Pearson of the class-1 probability
    similarity_rank_correlation: float | None = None  # embeddings [N, D]: Spearman of pairwise cosines
    token_error_rate: float | None = None  # sequences [N, T, C]: greedy CTC decode, edits / reference tokens
    mask_iou: float | None = None  # probability maps [N, (1,) H, W]: IoU of the masks above 0.5


@dataclass(frozen=True)
class PassRecord:
    """What one pass did: changes, skips with reasons, stats before and after, verification."""

    name: str
    modified: bool
    seconds: float
    before: ModelStats | None = None
    after: ModelStats | None = None
    changes: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()  # "Conv_12: weight is not a constant"
    details: Mapping[str, Any] = field(default_factory=dict)
    fidelity: Fidelity | None = None  # against the original model, after this pass
    verification_skipped: str | None = None  # why the model was not verified again after this pass


@dataclass(frozen=True)
class RunReport:
    """A whole pipeline run: input, output, a record per pass, overall stats."""

    input: str
    output: str | None
    before: ModelStats
    after: ModelStats
    passes: tuple[PassRecord, ...]
    fidelity: Fidelity | None = None
    verified: bool = False
    notes: tuple[str, ...] = ()
    search: Mapping[str, Any] | None = None  # the tolerance search's curve and chosen point, when one ran
    tolerance: Mapping[str, Any] | None = None  # {"description", "value", "met"} when a tolerance was given
    bench: Mapping[str, Any] | None = None  # before/after median latency on ORT, when measured
    # the result against its input on samples no pass fitted to, with an interval (estimate.Estimate)
    estimate: Any = None

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    def with_files(self, input_path, output_path) -> RunReport:
        """The report naming the files it was run on, with their sizes (external data included) in
        the before/after stats."""
        from pathlib import Path

        from .model import file_bytes

        source, target = Path(input_path), Path(output_path)
        return dataclasses.replace(
            self, input=str(source), output=str(target),
            before=dataclasses.replace(self.before, file_bytes=file_bytes(source)),
            after=dataclasses.replace(self.after, file_bytes=file_bytes(target)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=True)


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, mappings and sequences into plain JSON types (keys are field names)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj


#: The per-output-kind metrics of a Fidelity (output_metrics.py): key, label, format; shown when set.
OUTPUT_METRICS = (
    ("kl_divergence", "KL divergence", "{:.3g}"),
    ("positive_class_correlation", "positive-class correlation", "{:.4f}"),
    ("similarity_rank_correlation", "similarity rank correlation", "{:.4f}"),
    ("token_error_rate", "token error rate", "{:.2%}"),
    ("mask_iou", "mask IoU", "{:.4f}"),
)


def output_metric_texts(fidelity: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, value) for each per-kind metric a Fidelity (as JSON data) has."""
    return [(label, form.format(fidelity[key])) for key, label, form in OUTPUT_METRICS
            if fidelity.get(key) is not None]


def human(n: float | int | None, unit: str = "") -> str:
    """1234567 -> '1.23 M'. Sizes in bytes use unit='B'."""
    if n is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:g} {unit}".rstrip()
