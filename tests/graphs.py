"""Small hand-built ONNX graphs for unit tests (onnx.helper), with weights from a seeded generator."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def conv_bn_relu_gemm(
    *, channels: int = 8, classes: int = 5, size: int = 8, seed: int = 0, batch: int | str = 1, bn_bias: bool = True
) -> onnx.ModelProto:
    """x[N,3,H,W] -> Conv -> BatchNorm -> Relu -> Conv(no bias) -> BN -> Mul/Add per channel -> GAP -> Flatten -> Gemm.

    BatchNorm statistics are random and far from identity, so folding them is really exercised.
    """
    rng = np.random.default_rng(seed)
    c = channels

    def bn(prefix: str) -> list[onnx.TensorProto]:
        return [
            _init(f"{prefix}_gamma", rng.uniform(0.5, 2.0, c).astype(np.float32)),
            _init(f"{prefix}_beta", rng.normal(0, 0.5, c).astype(np.float32)),
            _init(f"{prefix}_mean", rng.normal(0, 0.5, c).astype(np.float32)),
            _init(f"{prefix}_var", rng.uniform(0.2, 3.0, c).astype(np.float32)),
        ]

    inits = [
        _init("w1", rng.normal(0, 0.3, (c, 3, 3, 3)).astype(np.float32)),
        _init("b1", rng.normal(0, 0.1, c).astype(np.float32)),
        *bn("bn1"),
        _init("w2", rng.normal(0, 0.3, (c, c, 3, 3)).astype(np.float32)),
        *bn("bn2"),
        _init("scale", rng.uniform(0.5, 1.5, (c, 1, 1)).astype(np.float32)),
        _init("shift", rng.normal(0, 0.2, (1, c, 1, 1)).astype(np.float32)),
        _init("fc_w", rng.normal(0, 0.3, (classes, c)).astype(np.float32)),
        _init("fc_b", rng.normal(0, 0.1, classes).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn1_gamma", "bn1_beta", "bn1_mean", "bn1_var"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "bn2_gamma", "bn2_beta", "bn2_mean", "bn2_var"], ["n2"], name="bn2"),
        helper.make_node("Mul", ["n2", "scale"], ["m2"], name="mul2"),
        helper.make_node("Add", ["m2", "shift"], ["a2"], name="add2"),
        helper.make_node("Identity", ["a2"], ["i2"], name="identity"),
        helper.make_node("GlobalAveragePool", ["i2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    if not bn_bias:
        nodes[0] = helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])
        inits = [i for i in inits if i.name != "b1"]
    graph = helper.make_graph(
        nodes, "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def dynamic_matmul(seq: str | int = "seq", hidden: int = 16, seed: int = 0) -> onnx.ModelProto:
    """x[batch, seq, hidden] @ W -> y: a transformer-style input with a dynamic sequence length."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, hidden])],
        [_init("w", rng.normal(0, 0.2, (hidden, hidden)).astype(np.float32))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def two_inputs(shape: Sequence[int] = (1, 4)) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"], name="add")],
        "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def cancelling_gemm_bn(*, features: int = 16, channels: int = 8, offset: float = 1e5, gamma: float = 1e-6,
                       seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """Gemm -> BatchNormalization whose outputs are ~1e-6: a Gemm bias of `offset` cancelled by a BN
    mean of about the same size. Any exact rewrite rounds differently here by ~1e-3 of the output."""
    rng = np.random.default_rng(seed)
    mean = np.full(channels, offset, np.float32) + rng.standard_normal(channels).astype(np.float32)
    inits = [
        _init("w", rng.standard_normal((features, channels)).astype(np.float32)),
        _init("b", np.full(channels, offset, np.float32)),
        _init("gamma", np.full(channels, gamma, np.float32)),
        _init("beta", np.zeros(channels, np.float32)),
        _init("mean", mean),
        _init("var", np.ones(channels, np.float32)),
    ]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], name="fc"),
             helper.make_node("BatchNormalization", ["g", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    graph = helper.make_graph(
        nodes, "cancelling", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, channels])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def padded_tokens(samples: int, real: int, *, seed: int, fill: float = 1e3, seq: int = 8, d: int = 32
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs for attention_block: x [samples, seq, d], the same with `fill` at the padded positions,
    and the attention mask (the first `real` positions 1, the rest 0). What padded positions hold
    must not change any statistic taken over real tokens."""
    x = np.random.default_rng(seed).standard_normal((samples, seq, d)).astype(np.float32)
    mask = np.ones((samples, seq), np.int64)
    mask[:, real:] = 0
    padded = x.copy()
    padded[:, real:] = fill
    return x, padded, mask


def attention_block(d: int = 32, ff: int = 64, seq: int = 8, seed: int = 0) -> onnx.ModelProto:
    """x[N, S, D], attention_mask[N, S] (int64, 0 = padding) -> LayerNorm -> q/k/v MatMuls ->
    softmax(q k^T / sqrt(D) + mask bias) v -> output MatMul -> FFN (MatMul, x * sigmoid(x),
    Gemm with transB on the flattened rows) -> y[N * S, D]: a transformer layer in miniature."""
    rng = np.random.default_rng(seed)
    arrays = {"gamma": rng.uniform(0.5, 1.5, d), "beta": rng.normal(0, 0.1, d), "scale": np.array(1 / np.sqrt(d)),
              "one": np.array(1.0), "neg": np.array(-1e4), "rows": np.array([-1, ff], np.int64)}
    for name, shape in (("wq", (d, d)), ("wk", (d, d)), ("wv", (d, d)), ("wo", (d, d)), ("w1", (d, ff)), ("w2t", (d, ff))):
        arrays[name] = rng.normal(0, 1.0 / np.sqrt(shape[0]), shape)
    arrays["b2"] = rng.normal(0, 0.1, d)
    inits = [_init(n, np.asarray(a, dtype=np.int64 if n == "rows" else np.float32)) for n, a in arrays.items()]
    n = helper.make_node
    nodes = [
        n("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1),
        n("MatMul", ["ln", "wq"], ["q"], name="q"), n("MatMul", ["ln", "wk"], ["k"], name="k"),
        n("MatMul", ["ln", "wv"], ["v"], name="v"),
        n("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        n("MatMul", ["q", "kt"], ["qk"], name="scores"),
        n("Mul", ["qk", "scale"], ["scaled"], name="scaled"),
        n("Cast", ["attention_mask"], ["maskf"], name="mask_cast", to=TensorProto.FLOAT),
        n("Sub", ["one", "maskf"], ["masked"], name="mask_invert"),
        n("Mul", ["masked", "neg"], ["bias2d"], name="mask_bias"),
        n("Unsqueeze", ["bias2d", "axis1"], ["bias3d"], name="mask_unsqueeze"),
        n("Add", ["scaled", "bias3d"], ["scores_masked"], name="mask_add"),
        n("Softmax", ["scores_masked"], ["probs"], name="softmax", axis=-1),
        n("MatMul", ["probs", "v"], ["ctx"], name="context"),
        n("MatMul", ["ctx", "wo"], ["att"], name="o"),
        n("MatMul", ["att", "w1"], ["h"], name="fc1"),
        n("Sigmoid", ["h"], ["sig"], name="sigmoid"),
        n("Mul", ["h", "sig"], ["act"], name="gate"),
        n("Reshape", ["act", "rows"], ["flat"], name="flatten"),
        n("Gemm", ["flat", "w2t", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits.append(_init("axis1", np.array([1], np.int64)))
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, d]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", seq])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
