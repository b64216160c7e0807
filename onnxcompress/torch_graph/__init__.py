"""ONNX graphs as trainable torch modules, and trained weights written back into the ONNX graph.

Why not onnx2torch: it imports torchvision unconditionally (for NMS and RoIAlign), which only exists
here as a multi-GB CUDA build, and its modules do not keep the link from a parameter back to the
initializer it came from, which writing weights back needs. This executor is small on purpose: it
evaluates the nodes in graph (topological) order with torch functions that follow the ONNX operator
specification, so autograd reaches every initializer.

Float32 initializers that feed a weight or bias slot (Conv, ConvTranspose, Gemm, MatMul, the
affine parameters of normalizations, PRelu slopes, and the constant operand of an Add right after a
MatMul/Conv/Gemm: a bias kept outside the layer) become `nn.Parameter`s; every other initializer is
a buffer. BatchNormalization uses its stored statistics unless the module was built with
`norm_training=True` and is in training mode (then batch statistics, with the running statistics
updated as torch does). `write_back` changes only initializer values: names, nodes and graph inputs
and outputs stay as they were.


The op translations live by family in `layers.py`, `elementwise.py` and `data_movement.py` (each a
table of handler(attrs, inputs, opset, n_outputs)); `executor.py` merges them into `OPS` and runs
them. Importing this package without torch raises TorchUnavailableError, naming the extra to install.
"""

from __future__ import annotations

from .errors import TorchUnavailableError, UnsupportedGraphError

try:  # before any module that imports torch at its top, so a missing torch is one line
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - exercised only without torch
    raise TorchUnavailableError(
        "training (distillation) needs PyTorch: pip install onnxcompress[torch]"
    ) from None

from .executor import OPS, GraphModule, opset_version, to_torch, unsupported_ops, weight_initializers  # noqa: E402

__all__ = [
    "GraphModule", "OPS", "TorchUnavailableError", "UnsupportedGraphError", "opset_version", "to_torch",
    "unsupported_ops", "weight_initializers",
]
