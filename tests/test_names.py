"""One name allocator for every pass: a new name never collides with anything already in the graph."""

from __future__ import annotations

from onnxcompress import model as M
from onnxcompress.names import NameAllocator, fresh_name
from tests.graphs import conv_bn_relu_gemm


def test_new_names_avoid_values_initializers_inputs_and_node_names():
    model = M.load(conv_bn_relu_gemm())
    names = NameAllocator(model)
    assert names.fresh("x") == "x_1"  # a graph input
    assert names.fresh("w1") == "w1_1"  # an initializer
    assert names.fresh("conv1") == "conv1_1"  # a node name
    assert names.fresh("c1") == "c1_1"  # a node output
    assert names("new") == "new" and names("new") == "new_1"  # handed out names are taken
    assert NameAllocator(["a", "a_1"]).fresh("a") == "a_2"
    assert fresh_name(model, "relu1") == "relu1_1"
