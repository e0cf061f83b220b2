"""Ingest: find the photographs, hash them, attach their labels, check and quality-score them.

Bad files never stop a run: each becomes a Reject naming the file and the reason.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fundus_engine.config import IMAGE_EXTENSIONS, IngestConfig
from fundus_engine.fundus_check import not_a_fundus_photograph
from fundus_engine.models import ImageRecord, LabelBox, Point, Quality, Reject
from fundus_engine.synth import is_synthetic
from fundus_engine.vocabulary import DR, DR_GRADES, canonical_class, canonical_diagnosis

STAGE = "ingest"


@dataclass(frozen=True)
class SourceFile:
    relpath: str
    sha256: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_version(path: Path | str) -> tuple[int, int]:
    """(modification time, size): part of every in-process cache keyed by a path, because crops
    and weights are rewritten in place and a cache keyed by the path alone would serve the old file."""
    stat = Path(path).stat()
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4096)
def _sha256_of_version(path: str, version: tuple[int, int]) -> str:
    return sha256_file(Path(path))


def cached_sha256(path: Path | str) -> str:
    """sha256 of a file, computed once per version of it."""
    return _sha256_of_version(str(path), file_version(path))


def scan(input_dir: Path, exclude: Path | None = None, labelled=lambda relpath: False
         ) -> tuple[list[SourceFile], list[Reject]]:
    """List image files under input_dir by content hash.

    Byte-identical copies are rejected; the copy kept is the one the labels manifest names,
    else the first by path, so a stray duplicate never costs an image its labels.
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: input folder does not exist")
    copies: dict[str, list[str]] = {}
    rejects: list[Reject] = []
    for path in sorted(input_dir.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        rel = path.relative_to(input_dir).as_posix()
        if rel.startswith(".") or "/." in rel or (exclude is not None and exclude in path.parents):
            continue
        try:
            copies.setdefault(sha256_file(path), []).append(rel)
        except OSError as exc:
            rejects.append(Reject(stage=STAGE, item=str(path), reason=f"cannot read file: {exc}"))
    sources = []
    for sha, rels in copies.items():
        keep = next((r for r in rels if labelled(r)), rels[0])
        sources.append(SourceFile(keep, sha))
        rejects += [Reject(stage=STAGE, item=str(input_dir / r), reason=f"duplicate: same bytes as {keep}")
                    for r in rels if r != keep]
    return sorted(sources, key=lambda s: s.relpath), rejects


# ---------------------------------------------------------------- labels manifest

_IMAGE_KEYS = ("image", "file", "filename", "id_code", "image_id", "path")


def _label_entry(raw: dict) -> dict:
    """Normalise one manifest entry (JSON object or CSV row) onto ImageRecord's label fields."""
    entry: dict = {}
    for key in ("patient_id", "diagnosis", "grade"):
        value = raw.get(key)
        if value not in (None, ""):
            entry[key] = str(value).strip()
    dr = raw.get("dr_grade")
    # APTOS-style CSVs put the DR grade (0-4) in a column called diagnosis.
    if dr in (None, "") and str(entry.get("diagnosis", "")).isdigit():
        dr = entry.pop("diagnosis")
    if "diagnosis" in entry:  # one spelling per diagnosis across datasets ("dr", "DR" -> Diabetic retinopathy)
        given = entry.pop("diagnosis")
        grades = [g.casefold() for g in DR_GRADES]
        if given.casefold() in grades:  # a DR grade name given as the diagnosis
            grade_of = grades.index(given.casefold())
            entry.setdefault("grade", DR_GRADES[grade_of])
            if dr in (None, ""):
                dr = grade_of
        if canonical := canonical_diagnosis(given):
            entry["diagnosis"] = canonical
    if dr not in (None, ""):
        dr = int(dr)
        if not 0 <= dr <= 4:
            raise ValueError(f"dr_grade {dr} is outside 0-4")
        entry["dr_grade"] = dr
        entry.setdefault("grade", DR_GRADES[dr])
        if dr > 0:
            entry.setdefault("diagnosis", DR)
    lat = str(raw.get("laterality") or "").strip().upper()
    if lat:
        lat = {"R": "OD", "RIGHT": "OD", "L": "OS", "LEFT": "OS"}.get(lat, lat)
        if lat not in ("OD", "OS"):
            raise ValueError(f"laterality {raw.get('laterality')!r} is not OD/OS/left/right")
        entry["laterality"] = lat
    for point in ("disc", "fovea"):
        value = raw.get(point)
        if isinstance(value, str) and value.strip():
            value = json.loads(value)
        if value:
            entry[point] = Point(x=float(value[0]), y=float(value[1]))
    boxes = raw.get("boxes")
    if isinstance(boxes, str):
        boxes = json.loads(boxes) if boxes.strip() else None
    if boxes is not None:  # a boxes field, even [], says the image was annotated with boxes
        entry["labelled_classes"] = []  # filled in once the whole manifest is read
    boxes = boxes or []
    entry["label_boxes"] = [LabelBox(label=canonical_class(b["label"]), xyxy=[float(v) for v in b["xyxy"]])
                            for b in boxes]
    return entry


def load_labels(input_dir: Path, config: IngestConfig) -> tuple[dict[str, dict], list[Reject]]:
    """Read the labels manifest into {image key: label fields}; a bad entry is rejected alone."""
    input_dir = Path(input_dir)
    if config.labels:
        path = Path(config.labels)
        path = path if path.is_absolute() else input_dir / path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: labels manifest not found")
    else:
        path = next((p for p in (input_dir / "labels.json", input_dir / "labels.csv") if p.is_file()), None)
        if path is None:
            return {}, []
    try:  # utf-8-sig: spreadsheets save CSV with a byte-order mark
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            raw_entries = data.get("images") if isinstance(data, dict) else data
        else:
            with open(path, newline="", encoding="utf-8-sig") as f:
                raw_entries = list(csv.DictReader(f))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: not a readable text manifest: {exc}") from exc
    if not isinstance(raw_entries, list):
        raise ValueError(f'{path}: expected a list of entries or {{"images": [...]}}')
    labels: dict[str, dict] = {}
    rejects: list[Reject] = []
    for n, raw in enumerate(raw_entries, start=1):
        if not isinstance(raw, dict):
            rejects.append(Reject(stage=STAGE, item=f"{path} entry {n}", reason="label entry is not an object"))
            continue
        key = next((str(raw[k]).strip() for k in _IMAGE_KEYS if raw.get(k) not in (None, "")), None)
        where = f"{path} entry {n}" + (f" ({key})" if key else "")
        if key is None:
            rejects.append(Reject(stage=STAGE, item=where, reason=f"label entry names no image (one of {_IMAGE_KEYS})"))
            continue
        try:
            labels[key] = _label_entry(raw)
        except (ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError) as exc:
            rejects.append(Reject(stage=STAGE, item=where, reason=f"invalid label: {exc}"))
    annotated = config.annotated_classes
    if annotated is None:
        annotated = sorted({b.label for entry in labels.values() for b in entry["label_boxes"]})
    for entry in labels.values():
        if "labelled_classes" in entry:
            entry["labelled_classes"] = list(annotated)
    return labels, rejects


def _short_keys(relpath: str) -> tuple[str, str]:
    name = relpath.rsplit("/", 1)[-1]
    return name, name.rsplit(".", 1)[0]


def labels_for(relpath: str, labels: dict[str, dict], ambiguous: frozenset[str] = frozenset()) -> dict | None:
    """Manifests name images by relative path, file name, or bare id (APTOS id_code); a name or
    id shared by several images in the folder identifies none of them."""
    if relpath in labels:
        return labels[relpath]
    for key in _short_keys(relpath):
        if key in labels and key not in ambiguous:
            return labels[key]
    return None


def ambiguous_keys(relpaths: list[str], labels: dict[str, dict]) -> frozenset[str]:
    """Label keys that are the file name or id of more than one image (clinicA/001.jpg, clinicB/001.jpg)."""
    seen = Counter(key for rel in relpaths for key in set(_short_keys(rel)))
    return frozenset(key for key in labels if seen[key] > 1 and key not in relpaths)


# ---------------------------------------------------------------- checks and quality

def field_of_view(rgb: np.ndarray) -> np.ndarray:
    """The circular retina area: fundus cameras leave a near-black border around it."""
    return rgb.max(axis=2) > 25


def measure_quality(rgb: np.ndarray, config: IngestConfig) -> Quality:
    scale = 512 / max(rgb.shape[:2])
    small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
    fov = field_of_view(small)
    coverage = float(fov.mean())
    inner = cv2.erode(fov.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)
    sharpness = float(cv2.Laplacian(gray, cv2.CV_32F)[inner].var()) if inner.any() else 0.0
    exposure = float(gray[fov].mean() / 255) if fov.any() else 0.0
    if sharpness < config.min_sharpness or not 0.12 <= exposure <= 0.85:
        grade = "poor"
    elif sharpness < 3 * config.min_sharpness or not 0.18 <= exposure <= 0.75:
        grade = "usable"
    else:
        grade = "good"
    return Quality(sharpness=round(sharpness, 3), exposure=round(exposure, 4),
                   fov_coverage=round(coverage, 4), grade=grade)


def perceptual_hash(rgb: np.ndarray) -> str:
    """256-bit difference hash (16x16 dHash) as 64 hex digits. Resized, recompressed, blurred
    or re-exposed copies of a photograph stay within a few bits; different fundus photographs,
    which all share a dark border and a bright disc, differ in 30 or more (a 64-bit dHash
    cannot tell them apart: measured 1 bit between different synthetic eyes)."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(gray, (17, 16), interpolation=cv2.INTER_AREA).astype(np.int16)
    return np.packbits(small[:, 1:] > small[:, :-1]).tobytes().hex()


def decode(path: Path) -> np.ndarray:
    """RGB uint8 pixels, or ValueError saying why the file is unusable."""
    data = np.fromfile(path, dtype=np.uint8)
    # IMREAD_COLOR applies the EXIF orientation, as ultralytics and the model client do when they
    # read the same file, so boxes, crops and 0-999 coordinates share one frame; ANYDEPTH keeps
    # 16-bit data (scaled below); a grayscale file comes back as three equal channels.
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH) if data.size else None
    if image is None:
        raise ValueError("cannot decode: not an image or a corrupt file")
    if image.dtype != np.uint8:  # 16-bit TIFFs from some cameras
        image = cv2.convertScaleAbs(image, alpha=255.0 / max(1, int(image.max())))
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    r, g, b = (image[..., c].astype(np.int16) for c in range(3))
    if max(np.abs(r - g).max(), np.abs(g - b).max()) <= 2:
        raise ValueError("grayscale image (no colour in any channel): a colour fundus photograph is required")
    return image


def ingest_image(root: Path, source: SourceFile, labels: dict | None, config: IngestConfig) -> ImageRecord | Reject:
    path = Path(root) / source.relpath
    try:
        rgb = decode(path)
    except (ValueError, OSError) as exc:
        return Reject(stage=STAGE, item=str(path), reason=str(exc))
    height, width = rgb.shape[:2]
    if min(height, width) < config.min_side:
        return Reject(stage=STAGE, item=str(path),
                      reason=f"too small: {width}x{height}, shorter side must be >= {config.min_side} px")
    quality = measure_quality(rgb, config)
    if quality.fov_coverage < config.min_fov_coverage:
        return Reject(stage=STAGE, item=str(path),
                      reason=f"no retina visible: field of view covers {quality.fov_coverage:.0%} of the frame")
    if (not_fundus := not_a_fundus_photograph(rgb)) is not None:
        return Reject(stage=STAGE, item=str(path), reason=not_fundus)
    return ImageRecord(sha256=source.sha256, path=str(path.resolve()), relpath=source.relpath,
                       width=width, height=height, quality=quality, phash=perceptual_hash(rgb),
                       synthetic=is_synthetic(path), **(labels or {}))


def ingest(root: Path, sources: list[SourceFile], labels: dict[str, dict], config: IngestConfig
           ) -> tuple[list[ImageRecord], list[Reject]]:
    records, rejects = [], []
    for source in sources:
        result = ingest_image(root, source, labels_for(source.relpath, labels), config)
        (rejects if isinstance(result, Reject) else records).append(result)
    return records, rejects
