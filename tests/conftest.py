"""Shared fixtures: the model-zoo architectures that ship inside the onnx wheel."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest


LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
#: light_resnet50.onnx -> "resnet50"
LIGHT_MODELS = {p.stem.removeprefix("light_"): p for p in sorted(LIGHT_DIR.glob("light_*.onnx"))}


@pytest.fixture(scope="session")
def light_model_paths() -> dict[str, Path]:
    """Name ("resnet50", "vgg19", ...) -> path of the light model (weights as ConstantOfShape nodes)."""
    assert LIGHT_MODELS, f"no light models found in {LIGHT_DIR}"
    return dict(LIGHT_MODELS)


def fold_light_model(path: Path) -> ir.Model:
    """Load a light model with its ConstantOfShape weights folded into initializers."""
    from onnxcompress.model import load
    from onnxcompress.passes.cleanup import FoldConstants
    from onnxcompress.pipeline import PassContext

    model = load(path)
    return FoldConstants().run(model, PassContext(model=model)).model


@pytest.fixture(scope="session")
def load_folded_light(light_model_paths) -> Callable[[str], ir.Model]:
    """A loader: name -> a fresh folded copy of that light model (the caller may modify it)."""
    return lambda name: fold_light_model(light_model_paths[name])


@pytest.fixture
def avx2():
    """Runs a model file on an emulated AVX2 CPU without VNNI: (path, feeds) -> outputs per feed.
    Skips where qemu-user is missing, except in CI, which installs it (.ci/run): there it fails."""
    import os

    from onnxcompress import cpu_emulation

    if not cpu_emulation.available():
        if os.environ.get("CI"):
            pytest.fail("CI must run the AVX2 kernel tests: install qemu-user (apt-get install qemu-user)")
        pytest.skip("qemu-x86_64 not installed (apt-get install qemu-user) or not x86-64 Linux")
    return cpu_emulation.run_emulated
