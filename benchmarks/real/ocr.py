"""PP-OCR and layout pre/post-processing, reimplemented in numpy + Pillow after rapidocr 3.10 / rapid-layout 1.2.1.

The originals (rapidocr/ch_ppocr_{det,rec,cls}, rapid_layout/model_handler/pp) use OpenCV, pyclipper
and shapely; these are small equivalents, good enough to prove the weights work and to cut line
crops from pages, not a replacement for the libraries:

- det: BGR, resize so the shorter side is at least 736 and both sides are multiples of 32,
  x/255, mean 0.5, std 0.5, NCHW. Boxes: probability map > 0.3, connected components (axis-aligned,
  no polygon unclip), mean score > 0.5, grown by DB's unclip distance (area x 1.6 / perimeter).
- rec: BGR, height 48, width by aspect ratio, x/255 then (x - 0.5) / 0.5, padded with 0 to the batch
  width (320 at least); CTC greedy decode with the dictionary in the model's `character` metadata
  (index 0 blank, a space appended at the end).
- cls: as rec at 48 x 192, labels ["0", "180"].
- layout: BGR, resize to 800 x 608 (H x W), x/255, ImageNet mean/std, NCHW; PicoDet heads at strides
  8/16/32/64 (scores, then 4 x 8 distribution bins), score > 0.4, per-class NMS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

DET_MEAN, DET_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
LAYOUT_MEAN, LAYOUT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LAYOUT_HW = (800, 608)
REC_H, REC_W, CLS_W = 48, 320, 192


def normalise(rgb: np.ndarray, mean, std, bgr: bool) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW; with bgr the channels are reversed first and mean/std apply in
    that order, as rapidocr and rapid-layout do to OpenCV's BGR image (mean[0] goes to blue)."""
    x = rgb.astype(np.float32) / 255.0
    if bgr:
        x = x[:, :, ::-1]
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


# --------------------------------------------------------------------------------------- detection


def det_resize(image: Image.Image, limit_side_len: int = 736) -> Image.Image:
    """rapidocr's DetPreProcess.resize with limit_type "min"."""
    w, h = image.size
    ratio = limit_side_len / min(h, w) if min(h, w) < limit_side_len else 1.0
    rh, rw = int(h * ratio), int(w * ratio)
    rh, rw = max(32, int(round(rh / 32) * 32)), max(32, int(round(rw / 32) * 32))
    return image.resize((rw, rh), Image.BILINEAR)


def det_input(image: Image.Image) -> np.ndarray:
    return normalise(np.asarray(image.convert("RGB")), DET_MEAN, DET_STD, bgr=True)[None]


def det_boxes(prob: np.ndarray, scale_xy: tuple[float, float] = (1.0, 1.0), thresh: float = 0.3,
              box_thresh: float = 0.5, unclip_ratio: float = 1.6, min_size: int = 3) -> list[tuple[float, float, float, float, float]]:
    """Axis-aligned text boxes (x0, y0, x1, y1, score) from a DB probability map, in the input image's pixels."""
    from scipy import ndimage

    labels, _ = ndimage.label(prob > thresh)
    boxes = []
    for index, region in enumerate(ndimage.find_objects(labels)):
        if region is None:
            continue
        ys, xs = region
        mask = labels[region] == index + 1
        score = float(prob[region][mask].mean())
        w, h = xs.stop - xs.start, ys.stop - ys.start
        if score < box_thresh or min(w, h) < min_size:
            continue
        d = w * h * unclip_ratio / (2 * (w + h))
        sx, sy = scale_xy
        boxes.append(((xs.start - d) * sx, (ys.start - d) * sy, (xs.stop + d) * sx, (ys.stop + d) * sy, score))
    boxes.sort(key=lambda b: (b[1], b[0]))
    # reading order: group boxes whose tops are within half a line, then left to right
    lines: list[list] = []
    for box in boxes:
        if lines and abs(box[1] - lines[-1][0][1]) < 0.5 * (box[3] - box[1]):
            lines[-1].append(box)
        else:
            lines.append([box])
    return [b for line in lines for b in sorted(line, key=lambda b: b[0])]


def run_det(session, image: Image.Image) -> tuple[np.ndarray, list]:
    """(probability map, boxes in the original image's pixels)."""
    resized = det_resize(image)
    prob = session.run(None, {session.get_inputs()[0].name: det_input(resized)})[0][0, 0]
    scale = (image.size[0] / resized.size[0], image.size[1] / resized.size[1])
    return prob, det_boxes(prob, scale)


# ------------------------------------------------------------------------------------- recognition


def line_input(crop: Image.Image, height: int, min_width: int, max_width: int | None = None) -> tuple[np.ndarray, int]:
    """A crop resized to `height` keeping its aspect (capped at max_width), padded to min_width: (uint8 HWC RGB, valid width)."""
    w, h = crop.size
    width = int(math.ceil(height * w / h))
    if max_width is not None:
        width = min(width, max_width)
    width = max(1, width)
    out = np.zeros((height, max(min_width, width), 3), np.uint8)
    out[:, :width] = np.asarray(crop.convert("RGB").resize((width, height), Image.BILINEAR))
    return out, width


def padded_input(rgb: np.ndarray, valid_width: int) -> np.ndarray:
    """rec/cls normalisation: BGR, (x/255 - 0.5)/0.5, zero past the valid width (rapidocr pads after normalising)."""
    x = normalise(rgb, DET_MEAN, DET_STD, bgr=True)
    x[:, :, valid_width:] = 0.0
    return x


def ctc_decode(logits: np.ndarray, characters: list[str]) -> tuple[str, float]:
    """Greedy CTC on one (T, C) output; characters[0] is the blank."""
    index = logits.argmax(axis=1)
    prob = logits.max(axis=1)
    keep = np.ones(len(index), bool)
    keep[1:] = index[1:] != index[:-1]
    keep &= index != 0
    text = "".join(characters[i] for i in index[keep])
    return text, float(prob[keep].mean()) if keep.any() else 0.0


def rec_characters(session) -> list[str]:
    meta = session.get_modelmeta().custom_metadata_map
    return ["blank", *meta["character"].splitlines(), " "]


def run_rec(session, crop: Image.Image, characters: list[str]) -> tuple[str, float]:
    """rapidocr-style recognition of one line at its own width (at least 320)."""
    rgb, width = line_input(crop, REC_H, REC_W)
    x = padded_input(rgb, width)[None]
    return ctc_decode(session.run(None, {session.get_inputs()[0].name: x})[0][0], characters)


# --------------------------------------------------------------------------------- word segmentation


def split_words(crop: Image.Image, min_gap: float = 0.15) -> list[tuple[int, int]]:
    """Column spans of ink separated by gaps wider than min_gap x height: the words of a detected line.

    Only the middle band of the box (30-70 % of its height) is looked at, since DB boxes of
    neighbouring lines overlap; ink is darker than the paper by half the paper-to-ink contrast."""
    g = np.asarray(crop.convert("L"), np.float32)
    h = g.shape[0]
    band = g[int(0.3 * h):int(0.7 * h) + 1]
    background, dark = np.percentile(g, 90), np.percentile(g, 5)
    ink = (band < background - 0.5 * max(1.0, background - dark)).sum(axis=0) > 0
    spans, start, gap, end = [], None, 0, 0
    for x, on in enumerate(ink):
        if on:
            if start is None:
                start = x
            gap, end = 0, x + 1
        elif start is not None:
            gap += 1
            if gap >= min_gap * h:
                spans.append((start, end))
                start = None
    if start is not None:
        spans.append((start, end))
    return spans


# ----------------------------------------------------------------------------------------- layout


def layout_input(image: Image.Image) -> np.ndarray:
    h, w = LAYOUT_HW
    return normalise(np.asarray(image.convert("RGB").resize((w, h), Image.BILINEAR)), LAYOUT_MEAN, LAYOUT_STD, bgr=True)[None]


@dataclass
class Detection:
    label: str
    score: float
    box: tuple[float, float, float, float]  # in the 608 x 800 input's pixels


def layout_decode(outputs: list[np.ndarray], labels: list[str], conf: float = 0.4, iou: float = 0.5) -> list[Detection]:
    """PicoDet head decode (rapid_layout PPPostProcess) for batch item 0, boxes in input pixels."""
    h, w = LAYOUT_HW
    heads = len(outputs) // 2
    boxes, scores = [], []
    for k, stride in enumerate([8, 16, 32, 64][:heads]):
        score, dist = outputs[k][0], outputs[k + heads][0]
        fh, fw = math.ceil(h / stride), math.ceil(w / stride)
        yy, xx = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        cx, cy = (xx.ravel() + 0.5) * stride, (yy.ravel() + 0.5) * stride
        bins = dist.shape[-1] // 4
        d = dist.reshape(-1, 4, bins)
        e = np.exp(d - d.max(-1, keepdims=True))
        e /= e.sum(-1, keepdims=True)
        d = (e * np.arange(bins)).sum(-1) * stride
        boxes.append(np.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], 1))
        scores.append(score)
    boxes_all, scores_all = np.concatenate(boxes), np.concatenate(scores)
    found = []
    for c in range(scores_all.shape[1]):
        keep = np.where(scores_all[:, c] > conf)[0]
        keep = keep[np.argsort(-scores_all[keep, c])]
        while len(keep):
            i = keep[0]
            found.append(Detection(labels[c], float(scores_all[i, c]), tuple(float(v) for v in boxes_all[i])))
            keep = np.array([j for j in keep[1:] if box_iou(boxes_all[i], boxes_all[j]) <= iou], dtype=int)
    return sorted(found, key=lambda d: -d.score)


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def run_layout(session, image: Image.Image, labels: list[str]) -> list[Detection]:
    outputs = session.run(None, {session.get_inputs()[0].name: layout_input(image)})
    return layout_decode(outputs, labels)
