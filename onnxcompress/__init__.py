"""onnxcompress: deployment-time compression of ONNX models."""
__version__ = "0.1.0"
