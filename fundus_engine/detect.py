"""Detect: localise anatomy and lesions with an ultralytics YOLO model.

The model is loaded once per process and shared by every shard that process handles; boxes
that the labels manifest already gives are preferred over predictions (and say so). What runs it
is `detect.backend` (PyTorch, or ONNX Runtime or OpenVINO on a cached export: `backends.py`);
`weights_path` stays the `.pt` (its JSON metadata beside it is the detector's evidence), and the
file the backend loads is resolved here, at load.
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np

from fundus_engine import backends
from fundus_engine.config import DetectConfig
from fundus_engine.evidence import image_domain, validated_classes
from fundus_engine.boxes import fit_box
from fundus_engine.decoding import decode_bgr
from fundus_engine.handoff import PixelHandoff
from fundus_engine.photo_files import cached_sha256, file_version
from fundus_engine.models import Detection, ImageRecord, Reject
from fundus_engine.vocabulary import ANATOMY, CLASS_NAMES, canonical_class

STAGE = "detect"
LANDMARKS = {"optic_disc", "fovea"}
DEMO_WEIGHTS = Path(__file__).parent / "weights" / "demo_detector.pt"
_predict_lock = threading.Lock()  # a YOLO predictor is not safe to call from two threads at once
DECODE_THREADS = min(4, os.cpu_count() or 1)  # photographs decoded at once, ahead of the model
PREFETCH_PIXELS = 120_000_000  # decoded pixels of this chunk and the next, at most (~360 MB at 3 bytes each)
_load_lock = threading.Lock()  # one load (and export) at a time: the threads of a worker share the model


def weights_path(config: DetectConfig) -> Path:
    path = Path(config.weights) if config.weights else DEMO_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: detector weights not found")
    return path.resolve()


def weights_sha256(path: Path) -> str:
    return cached_sha256(path)


def covered_by_labels(record: ImageRecord) -> set[str]:
    """Classes an image's labels settle: those annotated exhaustively, and any it has a box of."""
    return set(record.labelled_classes) | {b.label for b in record.label_boxes}


def weights_backend(path: Path) -> str | None:
    """The backend weights that are not `.pt` are already for (an ONNX file runs on ONNX Runtime)."""
    return {".pt": None, ".onnx": "onnx"}.get(Path(path).suffix.lower(), "torch")


def resolve_backend(config: DetectConfig, device: str | None = None) -> str:
    """What `detect.backend` means here: `auto` differs between machines (what is installed)
    and devices, so this, not the configured value, belongs in the detect stage's cache key."""
    device = resolve_device(config.device) if device is None else device
    own = weights_backend(Path(config.weights)) if config.weights else None
    if own is not None:  # an exported file runs on its own runtime; it cannot be re-exported
        if config.backend not in ("auto", own):
            raise ValueError(f"detect.backend {config.backend} cannot run {config.weights}: use the .pt weights")
        return own
    return backends.resolve_backend(config.backend, device)


def cache_identity(config: DetectConfig) -> dict:
    """The resolved device and backend: part of what the detect stage's output depends on."""
    device = resolve_device(config.device)
    return {"device": device, "backend": resolve_backend(config, device)}


def load_model(path: Path, backend: str = "torch", imgsz: int = 512, device: str = "cpu"):
    """Loaded once per process and per version of the weights file (retrained in place, reloaded);
    for onnx and openvino, the export of those weights (made and cached on first use), set up
    for `device` (a predict on another device sets ultralytics' predictor up again)."""
    path = Path(path)
    with _load_lock:
        if weights_backend(path) is None:  # .pt: the backend's own file
            path = backends.model_file(path, backend, imgsz, weights_sha256(path))
        return _load_model(path, file_version(backends.version_file(path)), imgsz, device)


@functools.lru_cache(maxsize=4)
def _load_model(path: Path, version: tuple[int, int], imgsz: int, device: str):
    model = backends.load(path, imgsz, device)
    unknown = [n for n in model.names.values() if _canonical_or_none(n) is None]
    if unknown:
        raise ValueError(f"{path}: detector classes {unknown} are not in the vocabulary {CLASS_NAMES}")
    return model


def _canonical_or_none(name: str) -> str | None:
    try:
        return canonical_class(name)
    except ValueError:
        return None


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _one_per_image(detections: list[Detection]) -> list[Detection]:
    """An eye has one disc, one cup and one fovea: keep the most confident of each."""
    kept, seen = [], set()
    for d in sorted(detections, key=lambda d: -d.confidence):
        if d.label in ANATOMY:
            if d.label in seen:
                continue
            seen.add(d.label)
        kept.append(d)
    return kept


def _numbered(sha256: str, detections: list[Detection]) -> list[Detection]:
    order = sorted(detections, key=lambda d: (CLASS_NAMES.index(d.label), -d.confidence, d.xyxy))
    return [d.model_copy(update={"region_id": f"{sha256[:12]}-{i:03d}"}) for i, d in enumerate(order)]


def _from_result(sha256: str, result) -> list[Detection]:
    """Predicted boxes clipped to the image; a box with no area in it (or not finite) is dropped."""
    names = result.names
    boxes = result.boxes
    height, width = result.orig_shape[:2]
    found = []
    for xyxy, c, p in zip(boxes.xyxy.tolist(), boxes.cls.tolist(), boxes.conf.tolist()):
        try:
            inside = fit_box([round(float(v), 1) for v in xyxy], width, height, tolerance=None)
        except ValueError:
            continue
        found.append(Detection(sha256=sha256, region_id="", label=canonical_class(names[int(c)]),
                               xyxy=inside, confidence=round(float(p), 4), source="model"))
    return _numbered(sha256, _one_per_image(found))


def from_labels(record: ImageRecord) -> list[Detection]:
    found = [Detection(sha256=record.sha256, region_id="", label=b.label, xyxy=b.xyxy, confidence=1.0,
                       source="ground_truth", masks=b.masks) for b in record.label_boxes]
    return _numbered(record.sha256, found)


def in_domain(predicted: list[Detection], validated: Iterable[str], config: DetectConfig) -> list[Detection]:
    """A detector speaks for a photograph only in classes it was validated on for that kind of
    photograph; disc and fovea boxes stay, because crop checks them against the localiser."""
    if config.out_of_domain == "keep":
        return predicted
    allowed = set(validated) | LANDMARKS
    return [d for d in predicted if d.label in allowed]


def _opened(record: ImageRecord, handoff: PixelHandoff | None) -> np.ndarray:
    """A photograph's pixels as every stage reads them (`decoding.decode_bgr`: BGR, which
    ultralytics takes an array to be, turned upright by the EXIF orientation; 16-bit scaled to
    8), handed over by ingest or decoded here, on worker threads (OpenCV releases the GIL), ahead
    of the model."""
    held = handoff.take(record.path, record.sha256) if handoff is not None else None
    return held if held is not None else decode_bgr(Path(record.path))


def _decode(pool: ThreadPoolExecutor, records: list[ImageRecord], handoff: PixelHandoff | None) -> list[Future]:
    return [pool.submit(_opened, r, handoff) for r in records]


def _result_or_error(future: Future):
    try:
        return future.result()
    except Exception as exc:
        return exc


def _pixels(records: list[ImageRecord]) -> int:
    return sum(r.width * r.height for r in records)


def detect(records: list[ImageRecord], config: DetectConfig, handoff: PixelHandoff | None = None
           ) -> tuple[list[Detection], list[Reject]]:
    """Predicted boxes; with `ground_truth: prefer`, an image's labelled boxes replace the
    predictions of the classes its labels cover, and predictions fill the others (lesion-only
    datasets such as IDRiD still get a disc and fovea to measure from; anatomy-only ones such
    as REFUGE still get their lesions). The model is skipped only for images whose labels
    cover every class. Pixels come from `handoff` where ingest kept them, and go to it for crop."""
    detections: list[Detection] = []
    rejects: list[Reject] = []
    to_predict = []
    for record in records:
        covered = covered_by_labels(record) if config.ground_truth == "prefer" else set()
        if covered >= set(CLASS_NAMES):  # nothing left for the model to add
            detections.extend(from_labels(record))
        else:
            to_predict.append(record)
    if not to_predict:
        return detections, rejects
    weights = weights_path(config)
    validated = validated_classes(weights)  # per domain: the classes the detector may speak for
    device = resolve_device(config.device)
    model = load_model(weights, resolve_backend(config, device), config.imgsz, device)
    options = dict(imgsz=config.imgsz, conf=config.confidence, iou=config.iou, device=device,
                   half=device.startswith("cuda"), batch=config.batch, verbose=False)
    chunks = [to_predict[start:start + config.batch] for start in range(0, len(to_predict), config.batch)]
    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="detect-decode") as pool:
        pending = _decode(pool, chunks[0], handoff)
        for n, batch in enumerate(chunks):
            opened = [_result_or_error(f) for f in pending]
            following = chunks[n + 1] if n + 1 < len(chunks) else None
            # the next chunk decodes while this one is predicted, when both fit the memory bound
            ahead = following is not None and _pixels(batch) + _pixels(following) <= PREFETCH_PIXELS
            pending = _decode(pool, following, handoff) if ahead else None
            for record, image in zip(batch, opened):
                if isinstance(image, Exception):
                    rejects.append(Reject(stage=STAGE, item=record.path, reason=f"detector failed: {image}"))
            batch = [record for record, image in zip(batch, opened) if not isinstance(image, Exception)]
            images = [image for image in opened if not isinstance(image, Exception)]
            try:
                with _predict_lock:
                    results = model.predict(images, **options) if images else []
            except Exception:  # one image the model cannot take must not sink the batch: one by one
                results = []
                for record, image in zip(batch, images):
                    try:
                        with _predict_lock:
                            results.extend(model.predict(image, **options))
                    except Exception as exc:
                        rejects.append(Reject(stage=STAGE, item=record.path, reason=f"detector failed: {exc}"))
                        results.append(None)
            if handoff is not None:  # predicted from, never changed: crop reads the same pixels
                for record, image in zip(batch, images):
                    handoff.keep(record.path, record.sha256, image)
            del images, opened
            if following is not None and pending is None:
                pending = _decode(pool, following, handoff)
            for record, result in zip(batch, results):
                if result is None:
                    continue
                predicted = _numbered(record.sha256, in_domain(_from_result(record.sha256, result),
                                                               validated[image_domain(record)], config))
                if config.ground_truth == "prefer":
                    covered = covered_by_labels(record)
                    predicted = _numbered(record.sha256, from_labels(record)
                                          + [d for d in predicted if d.label not in covered])
                detections.extend(predicted)
    return detections, rejects
