"""The pruning exactness invariant, shared by the tests: pruned == original with removed channels masked."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcompress import model as M
from onnxcompress.analysis.channels import ChannelGraph
from onnxcompress.verify import check_model, compare, outputs, random_feeds

# Pruned and masked models compute the same sums with the removed terms absent instead of times zero.
EXACT_RTOL = 1e-4


def assert_prune_is_exact(graph: ChannelGraph, removed, *, seed: int = 3) -> ir.Model:
    """Prune `removed` from `graph.model` (in place) and check it against the masked original:
    full checker, same output shapes, max |pruned - masked| <= EXACT_RTOL * max |masked| per output.
    Also checks the masked reference differs from the original, so the comparison is not vacuous."""
    original = M.load(graph.model)
    masked = graph.mask(removed)
    pruned = graph.prune(removed)
    feeds = random_feeds(original, M.resolve_input_shapes(original), count=2, seed=seed)
    with M.temporary_path(pruned, external_data=True) as path:
        check_model(path, "pruned")
        got = outputs(path, feeds, "pruned")
    ref = outputs(masked, feeds, "masked")
    for r_sample, g_sample in zip(ref, got):
        for r, p in zip(r_sample, g_sample):
            assert r.shape == p.shape
            np.testing.assert_allclose(p, r, rtol=0, atol=EXACT_RTOL * float(np.max(np.abs(r))))
    if len(removed):
        assert compare(outputs(original, feeds, "original"), got, "random").max_rel_error > EXACT_RTOL
    return pruned
