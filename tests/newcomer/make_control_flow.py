"""Writes the control-flow test models next to this file (deterministic: same bytes every run).

    python tests/newcomer/make_control_flow.py

- if_vad.onnx: a voice-activity-detector-like model (issue 14). Inputs `input` float [1, 64], `state`
  float [1, 32] and `sr` an int64 scalar sample rate; Equal(sr, 16000) picks one of two If branches,
  each Tanh(input @ W + state) with its own [64, 32] weight. Both branches read the outer-scope
  `input` and `state`.
- loop_fixed.onnx: a Loop with a constant trip count of 3 whose body holds h <- Tanh(h @ W), W [32, 32].
- loop_scan.onnx: a Scan over the 5 rows of `seq` [5, 16]; the body holds s <- Tanh(s + x @ W), W [16, 16].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).parent
OPSET = 17
SAMPLE_RATE = 16000


def _weight(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.normal(0, 0.2, shape).astype(np.float32), name)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="make_control_flow")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def if_vad(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def branch(tag: str) -> onnx.GraphProto:
        return helper.make_graph(
            [
                helper.make_node("MatMul", ["input", f"w_{tag}"], [f"mm_{tag}"], name=f"matmul_{tag}"),
                helper.make_node("Add", [f"mm_{tag}", "state"], [f"add_{tag}"], name=f"add_{tag}"),
                helper.make_node("Tanh", [f"add_{tag}"], [f"out_{tag}"], name=f"tanh_{tag}"),
            ],
            f"branch_{tag}",
            [],
            [helper.make_tensor_value_info(f"out_{tag}", TensorProto.FLOAT, [1, 32])],
            initializer=[_weight(rng, f"w_{tag}", (64, 32))],
        )

    nodes = [
        helper.make_node("Equal", ["sr", "sr_16k"], ["is_16k"], name="is_16k"),
        helper.make_node("If", ["is_16k"], ["output"], name="by_rate",
                         then_branch=branch("16k"), else_branch=branch("8k")),
    ]
    graph = helper.make_graph(
        nodes, "if_vad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, 32]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 32])],
        initializer=[numpy_helper.from_array(np.array(SAMPLE_RATE, np.int64), "sr_16k")],
    )
    return _model(graph)


def loop_fixed(seed: int = 1, trips: int = 3) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            helper.make_node("MatMul", ["h_in", "w_loop"], ["h_mm"], name="matmul_step"),
            helper.make_node("Tanh", ["h_mm"], ["h_out"], name="tanh_step"),
        ],
        "loop_body",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 32])],
        initializer=[_weight(rng, "w_loop", (32, 32))],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="steps", body=body)],
        "loop_fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        initializer=[numpy_helper.from_array(np.array(trips, np.int64), "trips")],
    )
    return _model(graph)


def loop_scan(seed: int = 2, steps: int = 5) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "w_scan"], ["x_mm"], name="matmul_row"),
            helper.make_node("Add", ["s_in", "x_mm"], ["s_sum"], name="accumulate"),
            helper.make_node("Tanh", ["s_sum"], ["s_out"], name="tanh_row"),
        ],
        "scan_body",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [16]),
         helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [16])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [16])],
        initializer=[_weight(rng, "w_scan", (16, 16))],
    )
    graph = helper.make_graph(
        [helper.make_node("Scan", ["s0", "seq"], ["s_last"], name="rows", body=body, num_scan_inputs=1)],
        "loop_scan",
        [helper.make_tensor_value_info("s0", TensorProto.FLOAT, [16]),
         helper.make_tensor_value_info("seq", TensorProto.FLOAT, [steps, 16])],
        [helper.make_tensor_value_info("s_last", TensorProto.FLOAT, [16])],
    )
    return _model(graph)


MODELS = {"if_vad": if_vad, "loop_fixed": loop_fixed, "loop_scan": loop_scan}


def main() -> None:
    for name, build in MODELS.items():
        onnx.save(build(), HERE / f"{name}.onnx")
        print(f"wrote {HERE / name}.onnx")


if __name__ == "__main__":
    main()
