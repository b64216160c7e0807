"""all-mpnet-base-v2 widened k times: a synthetic >= 1B-parameter encoder that computes the real model's function.

The graph is MPNet's forward as transformers computes it (embeddings with position ids from the
padding mask, relative position bias in 32 log buckets added to every layer's attention scores,
post-LayerNorm blocks, erf GELU, mean pooling over the attention mask and L2 normalisation), built
op by op with onnx_ir, opset 17, at hidden 768k, 12k heads of 64, FFN 3072k and the real 12 layers.

Weights come tensor by tensor from the real model (the corpus's all-mpnet-base-v2 safetensors),
widened the Net2WiderNet way, so the widened model computes the real embeddings:
- channel j of a widened axis stands for real channel j mod 768 (hidden; head g reads real head
  g mod 12) or j mod 3072 (FFN); biases, LayerNorm scales and offsets, the relative-bias table and
  the embedding tables are the real values at those channels (vectors that repeat k times);
- a MatMul weight W [768k or 3072k, ...] is W_real[i mod K, j mod N] / k + d[i, j]: the k rows
  that read copies of one input channel sum to the real row, whatever d is, as long as d sums to
  zero over them. d is drawn so the widened weight looks like a trained weight of its size: its
  entries are the real tensor's normalized entries resampled (their own tails), times the real
  RMS of the input row and output column (outlier channels keep their scale), centred over the k
  copies and scaled by 1/sqrt(k), so every entry has variance var(W_real) / k (the fan-in scaling
  of a k times wider layer) and each layer's int4 rounding error relative to its output is about
  the real layer's.
Each weight is an `ir.LazyTensor`: saving the model draws, writes and drops one tensor at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

REAL_HIDDEN, REAL_HEADS, REAL_FFN, REAL_LAYERS, HEAD_DIM = 768, 12, 3072, 12, 64
VOCAB, POSITIONS, BUCKETS, PAD_ID = 30527, 514, 32, 1
OPSET = 17
#: Rows drawn per chunk: bounds the memory of drawing one weight (indices and values of a chunk).
CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class Config:
    width: int = 4  # k: hidden 768k, FFN 3072k, 12k heads; 1 is the real model itself
    seed: int = 0

    @property
    def hidden(self) -> int:
        return REAL_HIDDEN * self.width

    @property
    def heads(self) -> int:
        return REAL_HEADS * self.width

    @property
    def intermediate(self) -> int:
        return REAL_FFN * self.width

    @property
    def layers(self) -> int:
        return REAL_LAYERS

    def params(self) -> int:
        h, f = self.hidden, self.intermediate
        layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # q k v o (+bias), FFN (+bias), 2 LayerNorms
        return (VOCAB + POSITIONS) * h + 2 * h + BUCKETS * self.heads + self.layers * layer


class RealWeights:
    """The real model's tensors by name (float32), read one at a time from its safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="numpy") as f:
            return np.asarray(f.get_tensor(name), dtype=np.float32)


def widen(real: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """A [K k, N k] float32 weight from `real` [K, N] (MatMul layout) that gives the real outputs on
    inputs repeated k times, each output repeated k times (see the module docstring)."""
    if k == 1:
        return np.ascontiguousarray(real)
    rows, cols = real.shape
    r = np.sqrt(np.mean(np.square(real, dtype=np.float64), axis=1))
    scaled = np.divide(real, r[:, None], out=np.zeros(real.shape), where=r[:, None] > 0)
    c = np.sqrt(np.mean(scaled**2, axis=0))
    z = np.divide(scaled, c[None, :], out=np.zeros_like(scaled), where=c[None, :] > 0).astype(np.float32).ravel()
    col_scale = np.tile(c.astype(np.float32), k) / np.float32(math.sqrt(k))
    base = np.tile(real / np.float32(k), (1, k))
    out = np.empty((rows * k, cols * k), np.float32)
    step = max(1, CHUNK_ELEMENTS // (k * cols * k))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        d = z[rng.integers(0, z.size, (k, stop - start, cols * k))]
        d -= d.mean(axis=0, keepdims=True)  # zero over the k copies of each input channel: the sum is exact
        d *= r[start:stop, None].astype(np.float32) * col_scale[None, :]
        d += base[start:stop]
        for copy in range(k):
            out[copy * rows + start:copy * rows + stop] = d[copy]
    return out


class _Builder:
    """Nodes, small constants and lazily drawn weights added to one graph, with unique names."""

    def __init__(self, graph: ir.Graph, real: RealWeights, config: Config) -> None:
        self.graph, self.real, self.config, self.count = graph, real, config, 0

    def op(self, op_type: str, *inputs: ir.Value | None, **attributes) -> ir.Value:
        self.count += 1
        node = ir.node(op_type, list(inputs), attributes=attributes, name=f"{op_type}_{self.count}")
        node.outputs[0].name = f"{op_type.lower()}_{self.count}"
        self.graph.append(node)
        return node.outputs[0]

    def const(self, name: str, array) -> ir.Value:
        tensor = ir.tensor(np.asarray(array), name=name)
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def weight(self, name: str, shape: tuple[int, ...], make) -> ir.Value:
        index = len(self.graph.initializers)
        seed = self.config.seed

        def draw() -> ir.Tensor:
            return ir.Tensor(make(np.random.default_rng([seed, index])), name=name)

        tensor = ir.LazyTensor(draw, dtype=ir.DataType.FLOAT, shape=ir.Shape(shape), name=name)
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def linear(self, name: str, real_name: str) -> ir.Value:
        """A MatMul weight [in, out] from the real torch Linear weight [out, in], widened."""
        k = self.config.width
        out_features, in_features = self.real(real_name).shape
        return self.weight(name, (in_features * k, out_features * k),
                           lambda rng: widen(self.real(real_name).T, k, rng))

    def repeated(self, name: str, real_name: str, shape: tuple[int, ...]) -> ir.Value:
        """A real tensor repeated along its last axis (vectors, embedding tables, the relative-bias table)."""
        k = self.config.width
        return self.weight(name, (*shape[:-1], shape[-1] * k),
                           lambda rng: np.tile(self.real(real_name), (1,) * (len(shape) - 1) + (k,)))


def build(real_path: Path, config: Config) -> ir.Model:
    """The synthetic encoder with lazily drawn weights (nothing is drawn until it is saved or read)."""
    ids = ir.Value(name="input_ids", shape=ir.Shape(["batch", "sequence"]), type=ir.TensorType(ir.DataType.INT64))
    mask = ir.Value(name="attention_mask", shape=ir.Shape(["batch", "sequence"]), type=ir.TensorType(ir.DataType.INT64))
    graph = ir.Graph([ids, mask], [], nodes=[], name="synthetic_mpnet", opset_imports={"": OPSET})
    b = _Builder(graph, RealWeights(real_path), config)
    x = _embeddings(b, ids)
    bias = _attention_bias(b, ids, mask)
    for layer in range(config.layers):
        x = _layer(b, x, bias, layer)
    out = _pool(b, x, mask)
    out.name = "embedding"
    out.shape, out.type = ir.Shape(["batch", config.hidden]), ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(out)
    return ir.Model(graph, ir_version=8, producer_name="benchmarks/real/synthetic_mpnet.py")


def _layernorm(b: _Builder, x: ir.Value, prefix: str, real_prefix: str) -> ir.Value:
    gamma = b.repeated(f"{prefix}.weight", f"{real_prefix}.weight", (REAL_HIDDEN,))
    beta = b.repeated(f"{prefix}.bias", f"{real_prefix}.bias", (REAL_HIDDEN,))
    return b.op("LayerNormalization", x, gamma, beta, axis=-1, epsilon=1e-5)


def _embeddings(b: _Builder, ids: ir.Value) -> ir.Value:
    # transformers' create_position_ids_from_input_ids: cumulative count of non-padding tokens + padding_idx
    not_pad = b.op("Cast", b.op("Not", b.op("Equal", ids, b.const("pad_id", np.int64(PAD_ID)))), to=ir.DataType.INT64)
    positions = b.op("Add", b.op("Mul", b.op("CumSum", not_pad, b.const("seq_axis", np.int64(1))), not_pad),
                     b.const("pad_offset", np.int64(PAD_ID)))
    name = "embeddings.word_embeddings.weight"
    words = b.op("Gather", b.repeated(name, name, (VOCAB, REAL_HIDDEN)), ids)
    name = "embeddings.position_embeddings.weight"
    where = b.op("Gather", b.repeated(name, name, (POSITIONS, REAL_HIDDEN)), positions)
    return _layernorm(b, b.op("Add", words, where), "embeddings.LayerNorm", "embeddings.LayerNorm")


def _attention_bias(b: _Builder, ids: ir.Value, mask: ir.Value) -> ir.Value:
    """MPNet's relative position bias [1, heads, S, S] plus the padding mask [B, 1, 1, S], once for all layers."""
    length = b.op("Squeeze", b.op("Shape", ids, start=1, end=2), b.const("axis0", np.array([0], np.int64)))
    steps = b.op("Range", b.const("zero", np.int64(0)), length, b.const("one", np.int64(1)))
    relative = b.op("Sub", b.op("Unsqueeze", steps, b.const("axes_0", np.array([0], np.int64))),
                    b.op("Unsqueeze", steps, b.const("axes_1", np.array([1], np.int64))))
    n = b.op("Neg", relative)  # relative_position_bucket(num_buckets=32, max_distance=128), bidirectional
    half, exact = BUCKETS // 2, BUCKETS // 4
    sign = b.op("Mul", b.op("Cast", b.op("Less", n, b.const("zero_i", np.int64(0))), to=ir.DataType.INT64),
                b.const("half", np.int64(half)))
    n = b.op("Abs", n)
    ratio = b.op("Div", b.op("Cast", b.op("Max", n, b.const("one_i", np.int64(1))), to=ir.DataType.FLOAT),
                 b.const("max_exact", np.float32(exact)))
    log_scale = np.float32((half - exact) / math.log(128 / exact))
    large = b.op("Add", b.const("exact_i", np.int64(exact)),
                 b.op("Cast", b.op("Mul", b.op("Log", ratio), b.const("log_scale", log_scale)), to=ir.DataType.INT64))
    large = b.op("Min", large, b.const("last_bucket", np.int64(half - 1)))
    bucket = b.op("Add", sign, b.op("Where", b.op("Less", n, b.const("exact_n", np.int64(exact))), n, large))
    name = "encoder.relative_attention_bias.weight"
    table = b.repeated(name, name, (BUCKETS, REAL_HEADS))
    position = b.op("Unsqueeze", b.op("Transpose", b.op("Gather", table, bucket), perm=[2, 0, 1]),
                    b.const("axes_0b", np.array([0], np.int64)))
    keep = b.op("Unsqueeze", b.op("Cast", mask, to=ir.DataType.FLOAT), b.const("axes_12", np.array([1, 2], np.int64)))
    padding = b.op("Mul", b.op("Sub", b.const("one_f", np.float32(1)), keep),
                   b.const("min_f", np.float32(np.finfo(np.float32).min)))
    return b.op("Add", position, padding)


def _heads(b: _Builder, x: ir.Value, perm: list[int]) -> ir.Value:
    split = b.const(f"heads_shape_{b.count}", np.array([0, 0, b.config.heads, HEAD_DIM], np.int64))
    return b.op("Transpose", b.op("Reshape", x, split), perm=perm)


def _dense(b: _Builder, x: ir.Value, name: str, real: str, outputs: int) -> ir.Value:
    y = b.op("MatMul", x, b.linear(f"{name}.weight", f"{real}.weight"))
    return b.op("Add", y, b.repeated(f"{name}.bias", f"{real}.bias", (outputs,)))


def _layer(b: _Builder, x: ir.Value, bias: ir.Value, layer: int) -> ir.Value:
    p = r = f"encoder.layer.{layer}"
    h, f = REAL_HIDDEN, REAL_FFN
    q = _heads(b, _dense(b, x, f"{p}.attention.attn.q", f"{r}.attention.attn.q", h), [0, 2, 1, 3])
    k = _heads(b, _dense(b, x, f"{p}.attention.attn.k", f"{r}.attention.attn.k", h), [0, 2, 3, 1])
    v = _heads(b, _dense(b, x, f"{p}.attention.attn.v", f"{r}.attention.attn.v", h), [0, 2, 1, 3])
    scores = b.op("Add", b.op("Mul", b.op("MatMul", q, k), b.const(f"{p}.scale", np.float32(HEAD_DIM**-0.5))), bias)
    context = b.op("Transpose", b.op("MatMul", b.op("Softmax", scores, axis=-1), v), perm=[0, 2, 1, 3])
    context = b.op("Reshape", context, b.const(f"{p}.merge", np.array([0, 0, b.config.hidden], np.int64)))
    attended = b.op("Add", _dense(b, context, f"{p}.attention.attn.o", f"{r}.attention.attn.o", h), x)
    a = _layernorm(b, attended, f"{p}.attention.LayerNorm", f"{r}.attention.LayerNorm")
    up = _dense(b, a, f"{p}.intermediate.dense", f"{r}.intermediate.dense", f)
    gelu = b.op("Mul", b.op("Mul", up, b.const(f"{p}.half", np.float32(0.5))),
                b.op("Add", b.op("Erf", b.op("Div", up, b.const(f"{p}.sqrt2", np.float32(math.sqrt(2))))),
                     b.const(f"{p}.one", np.float32(1))))
    down = b.op("Add", _dense(b, gelu, f"{p}.output.dense", f"{r}.output.dense", h), a)
    return _layernorm(b, down, f"{p}.output.LayerNorm", f"{r}.output.LayerNorm")


def _pool(b: _Builder, x: ir.Value, mask: ir.Value) -> ir.Value:
    """sentence-transformers' mean pooling over the attention mask, then L2 normalisation."""
    keep = b.op("Unsqueeze", b.op("Cast", mask, to=ir.DataType.FLOAT), b.const("axes_2", np.array([2], np.int64)))
    axis = b.const("axis_1", np.array([1], np.int64))
    total = b.op("ReduceSum", b.op("Mul", x, keep), axis, keepdims=0)
    count = b.op("Max", b.op("ReduceSum", keep, axis, keepdims=0), b.const("min_count", np.float32(1e-9)))
    mean = b.op("Div", total, count)
    norm = b.op("Max", b.op("ReduceL2", mean, axes=[1], keepdims=1), b.const("min_norm", np.float32(1e-12)))
    return b.op("Div", mean, norm)
