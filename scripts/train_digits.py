"""Train the bundled demo model: a small residual CNN on scikit-learn's digits, exported to ONNX.

    python scripts/train_digits.py            # writes onnxcompress/data/digits_{cnn.onnx,test.npz,calib.npz}

Deterministic: fixed seeds, torch's deterministic algorithms, a fixed thread count. Needs torch and
scikit-learn (the `dev` and `torch` extras); the files it writes need only numpy and onnxruntime.

Images: the 8x8 digits (intensities 0..16) are scaled to [0, 1], upsampled to 32x32 (bilinear,
align_corners=False) and rounded to float16. The .npz files store exactly those float16 values; the
model's input is them cast to float32, so training, export check and `onnxcompress.demo_data`
all see the same numbers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

DATA_DIR = Path(__file__).resolve().parents[1] / "onnxcompress" / "data"
SEED = 0
IMAGE_SIZE = 32
TEST_FRACTION = 0.2
CALIBRATION_SAMPLES = 256
OPSET = 17
#: Largest |ORT logits - torch logits| accepted after export, relative to the largest logit.
EXPORT_REL_TOL = 1e-4


# ---------------------------------------------------------------------------------------------- data


def preprocess(images_8x8: np.ndarray) -> np.ndarray:
    """(N, 8, 8) intensities 0..16 -> (N, 1, 32, 32) float16 in [0, 1], the stored form."""
    x = torch.from_numpy(images_8x8.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.numpy().astype(np.float16)


def split_dataset() -> dict[str, np.ndarray]:
    digits = load_digits()
    images = preprocess(digits.images)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SEED
    )
    # Calibration: a stratified sample of the training set (never the test set).
    _, x_calib, _, _ = train_test_split(
        x_train, y_train, test_size=CALIBRATION_SAMPLES, stratify=y_train, random_state=SEED
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "x_calib": x_calib}


def shift(batch: torch.Tensor, generator: torch.Generator, max_shift: int = 3) -> torch.Tensor:
    """Random translation by up to `max_shift` pixels per image (zero fill): the only augmentation."""
    n, _, h, w = batch.shape
    padded = F.pad(batch, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


# --------------------------------------------------------------------------------------------- model


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(cin, cout, 3, stride)
        self.conv2 = ConvBN(cout, cout, 3, relu=False)
        self.shortcut = ConvBN(cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class DigitsCNN(nn.Module):
    """Stride-2 stem (32x32 -> 16x16), then residual stages of 32 (16x16), 64 (8x8), 128 (4x4) channels.

    The first stage keeps its width, so its blocks have identity shortcuts; the others open with a
    strided block and a 1x1 projection shortcut.
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), blocks: tuple[int, int, int] = (2, 2, 1)) -> None:
        super().__init__()
        self.stem = ConvBN(1, widths[0], 3, stride=2)
        layers: list[nn.Module] = []
        cin = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for i in range(count):
                layers.append(BasicBlock(cin, width, stride=2 if stage > 0 and i == 0 else 1))
                cin = width
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(image))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def conv_linear_macs(model: nn.Module) -> int:
    """Multiply-accumulates per image of the Conv2d and Linear layers, from a traced forward."""
    macs = 0

    def count(module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            macs += out[0].numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            macs += out[0].numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE))
    for hook in hooks:
        hook.remove()
    return macs


# ------------------------------------------------------------------------------------------ training


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float) -> None:
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total, correct, loss_sum = 0, 0, 0.0
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            inputs, targets = shift(x[idx], generator), y[idx]
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += len(idx)
            correct += int((logits.argmax(1) == targets).sum())
            loss_sum += loss.item() * len(idx)
        print(f"epoch {epoch + 1:2d}/{epochs}: loss {loss_sum / total:.4f}, train accuracy {correct / total:.4f}")


def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


# -------------------------------------------------------------------------------------------- export


def export(model: nn.Module, path: Path) -> None:
    model.eval()
    torch.onnx.export(
        model,
        (torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE),),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        # PRESERVE keeps BatchNormalization nodes (EVAL would fuse them into the convs), so the
        # demo pipeline's BN folding has work to do; the eval-mode module is exported as is.
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": x})[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output folder (default: the package's data folder)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads; results are reproducible for a fixed count")
    args = parser.parse_args()

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    data = split_dataset()
    x_train = torch.from_numpy(data["x_train"].astype(np.float32))
    y_train = torch.from_numpy(data["y_train"])
    x_test = data["x_test"].astype(np.float32)
    y_test = data["y_test"]

    model = DigitsCNN()
    params = sum(p.numel() for p in model.parameters())
    print(f"train {len(x_train)}, test {len(x_test)}, calibration {len(data['x_calib'])} (from train)")
    print(f"model: {params:,} parameters, {conv_linear_macs(model) / 1e6:.1f} MMACs per image")
    train(model, x_train, y_train, args.epochs, args.batch, args.lr)
    logits = torch_logits(model, x_test)
    correct = int((logits.argmax(1) == y_test).sum())

    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / "digits_cnn.onnx"
    export(model, model_path)
    onnx_logits = ort_logits(model_path, x_test)
    rel_error = float(np.abs(onnx_logits - logits).max() / np.abs(logits).max())
    onnx_correct = int((onnx_logits.argmax(1) == y_test).sum())
    if rel_error > EXPORT_REL_TOL or onnx_correct != correct:
        raise SystemExit(f"export mismatch: logits rel error {rel_error:.2e}, correct {onnx_correct} vs {correct}")

    np.savez_compressed(args.out / "digits_test.npz", image=data["x_test"], label=y_test)
    np.savez_compressed(args.out / "digits_calib.npz", image=data["x_calib"])
    print(f"test accuracy (torch and onnxruntime): {correct / len(y_test):.4f} ({correct}/{len(y_test)}); "
          f"logits rel error {rel_error:.1e}")
    for name in ("digits_cnn.onnx", "digits_test.npz", "digits_calib.npz"):
        print(f"{args.out / name}: {(args.out / name).stat().st_size:,} bytes")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
