"""onnxcompress: deployment-time compression of ONNX models, measured on ONNX Runtime."""

__version__ = "0.1.0"

from . import passes
from .calibration import Calibration
from .errors import OnnxCompressError
from .model import load, save, to_graphsurgeon, to_proto
from .pipeline import Pass, PassContext, PassResult, Pipeline, RunResult
from .report import ModelStats, PassRecord, RunReport
from .verify import VerifyOptions

__all__ = [
    "Calibration", "ModelStats", "OnnxCompressError", "Pass", "PassContext", "PassRecord", "PassResult",
    "Pipeline", "RunReport", "RunResult", "VerifyOptions", "load", "passes", "save", "to_graphsurgeon",
    "to_proto",
]
