"""onnxcompress: deployment-time compression of ONNX models, measured on ONNX Runtime."""

__version__ = "0.1.0"

from . import passes
from .calibration import Calibration
from .errors import OnnxCompressError
from .model import load, save, to_graphsurgeon, to_proto
from .optimize import OptimizeOptions, OptimizeResult, optimize
from .pack import pack_model, unpack_model
from .pipeline import Pass, PassContext, PassResult, Pipeline, RunResult
from .report import ModelStats, PassRecord, RunReport
from .search import SearchOptions, SearchResult, search
from .tolerance import Tolerance
from . import verify
from .verify import VerifyOptions

__all__ = [
    "Calibration", "ModelStats", "OnnxCompressError", "OptimizeOptions", "OptimizeResult", "Pass", "PassContext", "PassRecord", "PassResult",
    "Pipeline", "RunReport", "RunResult", "SearchOptions", "SearchResult", "Tolerance", "VerifyOptions", "load",
    "optimize", "pack_model", "passes", "save", "search", "to_graphsurgeon", "to_proto", "unpack_model", "verify",
]
