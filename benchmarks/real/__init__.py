"""Real trained models (ONNX) and real inputs for benchmarks: build with `python benchmarks/real/build.py`, read with `corpus`."""
