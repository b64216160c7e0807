"""The test corpus itself: every family exports with both torch exporters, passes the full ONNX
checker, runs in ONNX Runtime and computes what torch computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from tests import zoo  # noqa: E402  (needs torch)

#: Max |ORT - torch| over max |torch|. Float32 kernels differ in summation order only; the largest
#: error seen on this corpus is ~6e-7.
OUTPUT_REL_TOL = 1e-5
#: Outputs for two different inputs must differ by more than this fraction of the output scale;
#: less means a degenerate network (dead ReLUs, saturated BN) that would hide pruning errors.
#: Random images give similar globally pooled features, so the spread is a few percent, not more.
MIN_INPUT_DEPENDENCE = 1e-3
#: Batch and sequence length that differ from the example inputs, for the dynamic-axis checks.
OTHER_BATCH = 3
OTHER_SEQ = 7
#: Families whose dynamo export is also checked with dynamic axes: BERT (batch and sequence through
#: head reshapes and token positions) and ShuffleNet (channel-shuffle reshapes, Split), where a
#: size is most likely to be baked in; two only, as each dynamo export costs 1-3 s. The
#: TorchScript exporter is checked with dynamic axes on every family.
DYNAMO_DYNAMIC_FAMILIES = ("bert", "shufflenet_v2")

# Every (family, exporter) pair runs; a dynamo failure recorded in zoo.DYNAMO_FAILURES is a strict
# xfail, so the record is dropped as soon as the exporter handles the family.
CASES = [
    pytest.param(
        name,
        dynamo,
        id=f"{name}-{zoo.EXPORTERS[dynamo]}",
        marks=[pytest.mark.xfail(strict=True, reason=zoo.DYNAMO_FAILURES[name])]
        if dynamo and name in zoo.DYNAMO_FAILURES
        else [],
    )
    for name in zoo.FAMILIES
    for dynamo in (False, True)
]


def _has_batchnorm(name: str) -> bool:
    model, _ = zoo.FAMILIES[name]()
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


def _op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize(("name", "dynamo"), CASES)
def test_export_checks_and_matches_torch(tmp_path_factory, name: str, dynamo: bool) -> None:
    path = zoo.exported(tmp_path_factory, name, dynamo=dynamo)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    got = _session(path).run(None, zoo.numpy_inputs(name))[0]
    assert _rel_error(got, zoo.torch_output(name)) <= OUTPUT_REL_TOL
    # BN folding is only exercised if the exporters leave BatchNormalization nodes in.
    assert ("BatchNormalization" in _op_types(path)) == _has_batchnorm(name)


@pytest.mark.parametrize("dynamo", [False, True], ids=zoo.EXPORTERS)
def test_fold_batchnorm_gives_exporter_default(tmp_path_factory, dynamo: bool) -> None:
    path = zoo.exported(tmp_path_factory, "resnet_basic", dynamo=dynamo, fold_batchnorm=True)
    assert "BatchNormalization" not in _op_types(path)
    got = _session(path).run(None, zoo.numpy_inputs("resnet_basic"))[0]
    assert _rel_error(got, zoo.torch_output("resnet_basic")) <= OUTPUT_REL_TOL


def _dynamic_cases() -> list:
    cases = [pytest.param(name, False, id=f"{name}-torchscript") for name in zoo.FAMILIES]
    cases += [
        pytest.param(name, True, id=f"{name}-dynamo")
        for name in DYNAMO_DYNAMIC_FAMILIES
        if name not in zoo.DYNAMO_FAILURES
    ]
    return cases


def _other_size_inputs(name: str) -> tuple:
    (example,) = zoo.FAMILIES[name]()[1]
    generator = torch.Generator().manual_seed(1)
    if example.dtype == torch.int64:  # token ids: change batch and sequence length
        return (torch.randint(0, zoo.BERT_VOCAB, (OTHER_BATCH, OTHER_SEQ), generator=generator),)
    return (torch.randn((OTHER_BATCH, *example.shape[1:]), generator=generator),)


@pytest.mark.parametrize(("name", "dynamo"), _dynamic_cases())
def test_dynamic_batch_runs_other_sizes(tmp_path_factory, name: str, dynamo: bool) -> None:
    path = zoo.exported(tmp_path_factory, name, dynamo=dynamo, dynamic_batch=True)
    session = _session(path)
    assert all(isinstance(i.shape[0], str) for i in session.get_inputs())
    inputs = _other_size_inputs(name)
    got = session.run(None, zoo.numpy_inputs(name, inputs))[0]
    assert got.shape[0] == OTHER_BATCH
    assert _rel_error(got, zoo.torch_output(name, inputs)) <= OUTPUT_REL_TOL


@pytest.mark.parametrize("name", list(zoo.FAMILIES))
def test_builds_are_seeded_and_outputs_informative(name: str) -> None:
    state = torch.random.get_rng_state()
    first, second = zoo.torch_output(name), zoo.torch_output(name)
    assert torch.equal(torch.random.get_rng_state(), state)  # builds do not disturb the caller's RNG
    np.testing.assert_array_equal(first, second)
    assert np.isfinite(first).all()
    assert np.abs(first[0] - first[1]).max() > MIN_INPUT_DEPENDENCE * np.abs(first).max()


def test_batchnorm_statistics_are_not_identity() -> None:
    model, _ = zoo.resnet_basic()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not model.training
    for bn in norms:  # folding an identity BN would prove nothing
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))


# ResNet-50 as published (torchvision's resnet50): params and multiply-accumulates at 224x224.
RESNET50_PARAMS = 25_557_032
RESNET50_GMACS = 4.09
GMACS_REL_TOL = 0.01


def _conv_linear_macs(model: torch.nn.Module, inputs: tuple) -> int:
    """MACs of Conv2d and Linear layers per sample, counted from the shapes seen in a forward."""
    macs = 0

    def count(module: torch.nn.Module, _args: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        per_sample = out[0].numel()
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            macs += per_sample * (module.in_channels // module.groups) * kh * kw
        else:
            macs += per_sample * module.in_features

    hooks = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.no_grad():
        model(*inputs)
    for hook in hooks:
        hook.remove()
    return macs


def test_resnet50_has_published_shape() -> None:
    model, inputs = zoo.resnet50()
    assert sum(p.numel() for p in model.parameters()) == RESNET50_PARAMS
    assert abs(_conv_linear_macs(model, inputs) / 1e9 - RESNET50_GMACS) <= GMACS_REL_TOL * RESNET50_GMACS


def test_small_resnet50_exports_and_matches_torch(tmp_path) -> None:
    model, inputs = zoo.resnet50(width=8, image_size=32, num_classes=10, batch=2)
    assert sum(isinstance(m, zoo.Bottleneck) for m in model.modules()) == 3 + 4 + 6 + 3
    path = zoo.export_module(model, inputs, tmp_path / "resnet50_small.onnx", dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    got = _session(path).run(None, {"input": inputs[0].numpy()})[0]
    with torch.no_grad():
        want = model(*inputs).numpy()
    assert _rel_error(got, want) <= OUTPUT_REL_TOL
