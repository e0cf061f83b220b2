"""Ingest: find the photographs, hash them, attach their labels, check and quality-score them.

Bad files never stop a run: each becomes a Reject naming the file and the reason.
"""
from __future__ import annotations

import csv
import errno
import functools
import hashlib
import json
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR, S_ISREG

import cv2
import numpy as np
from PIL import Image

from fundus_engine.config import IMAGE_EXTENSIONS, IngestConfig
from fundus_engine.fundus_check import not_a_fundus_photograph
from fundus_engine.models import ImageRecord, LabelBox, Point, Quality, Reject
from fundus_engine.synth import is_synthetic
from fundus_engine.vocabulary import DR, DR_GRADES, canonical_class, canonical_diagnosis

STAGE = "ingest"
# Label boxes and points may overshoot the frame by this fraction of its side (rounding, padded
# exports) and are clipped; further out, they belong to another image or another frame.
TOLERANCE = 0.02


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


def shown(path: Path | str) -> str:
    """A path as valid UTF-8, for rows, logs and reasons: a name that is not UTF-8 (Latin-1 from
    old Windows archives; Python holds its bytes as surrogates) shows its bytes escaped, \\xe9."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def utf8_path(path: Path) -> Path:
    """A UTF-8 path that opens the file. Parquet, the dataset's readers and the model client need
    valid UTF-8, which no spelling of a Latin-1 name is; such a file is reached through a link
    named by a hash of its path, kept in the user cache (the input folder is never written)."""
    try:
        str(path).encode("utf-8")
        return path
    except UnicodeEncodeError:
        pass
    folder = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fundus-engine" / "names").resolve()
    link = folder / (hashlib.sha256(os.fsencode(path)).hexdigest()[:32] + shown(path.suffix).lower())
    try:
        if not (link.is_symlink() and os.readlink(link) == str(path)):
            folder.mkdir(parents=True, exist_ok=True)
            tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(path)
            tmp.replace(link)  # atomic: a concurrent build never sees the link missing
    except OSError as exc:
        raise OSError(f"file name is not UTF-8 and no UTF-8 link to it could be made in {folder}: {exc}") from exc
    return link


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
    files, rejects = _walk(input_dir, exclude)
    for path in sorted(files):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        rel = path.relative_to(input_dir).as_posix()
        try:
            copies.setdefault(sha256_file(path), []).append(rel)
        except OSError as exc:
            rejects.append(Reject(stage=STAGE, item=shown(path), reason=f"cannot read file: {exc}"))
    sources = []
    for sha, rels in copies.items():
        keep = next((r for r in rels if labelled(r)), rels[0])
        sources.append(SourceFile(keep, sha))
        rejects += [Reject(stage=STAGE, item=shown(input_dir / r), reason=f"duplicate: same bytes as {shown(keep)}")
                    for r in rels if r != keep]
    return sorted(sources, key=lambda s: s.relpath), rejects


def _walk(input_dir: Path, exclude: Path | None) -> tuple[list[Path], list[Reject]]:
    """Every file under input_dir, hidden ones and the exclude folder aside. Linked folders are
    followed; a link back into its own ancestors (a loop) or to nothing is a reject, never
    skipped in silence nor followed for ever."""
    def identity(st: os.stat_result) -> tuple[int, int]:
        return st.st_dev, st.st_ino

    skip = identity(exclude.stat()) if exclude is not None and exclude.is_dir() else None
    files, rejects = [], []
    todo = [(input_dir, frozenset([identity(input_dir.stat())]))]
    while todo:
        folder, ancestors = todo.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            rejects.append(Reject(stage=STAGE, item=shown(folder), reason=f"cannot read folder: {exc}"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                st = path.stat()
            except OSError as exc:
                if not entry.is_symlink():
                    reason = f"cannot read file: {exc}"
                elif exc.errno == errno.ELOOP:
                    reason = "symlink loop"
                else:
                    reason = "broken symlink: target missing" if exc.errno == errno.ENOENT else f"broken symlink: {exc}"
                rejects.append(Reject(stage=STAGE, item=shown(path), reason=reason))
                continue
            if S_ISDIR(st.st_mode):
                if identity(st) in ancestors:
                    rejects.append(Reject(stage=STAGE, item=shown(path), reason="symlink loop"))
                elif identity(st) != skip:
                    todo.append((path, ancestors | {identity(st)}))
            elif S_ISREG(st.st_mode):
                files.append(path)
    return files, rejects


# ---------------------------------------------------------------- labels manifest

_IMAGE_KEYS = ("image", "file", "filename", "id_code", "image_id", "path")
_BAD_FIELD = (ValueError, KeyError, TypeError, IndexError)  # json.JSONDecodeError is a ValueError
_ROW_REJECTED = object()  # a CSV row the csv module could not parse, already rejected


def _numbers(value, n: int) -> list[float]:
    """n finite numbers (or their JSON text, as a CSV cell holds it), else ValueError saying why."""
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"{value!r} is not a list of {n} numbers")
    numbers = [float(v) for v in value]
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"{value!r} is not finite")
    return numbers


def _label_entry(raw: dict) -> tuple[dict, list[tuple[str, str]], set[str | None]]:
    """Normalise one manifest entry (JSON object or CSV row) onto ImageRecord's label fields.

    A bad field is left out and listed as (field, reason); the entry keeps the others, so a typo
    in one box never costs the image its patient, and the patient its split. Also returns the
    class of each box left out (None where the class itself is unreadable): on this image those
    classes are no longer annotated exhaustively. `_from` names the entry and which manifest box
    each kept one is, for the checks against the image at ingest.
    """
    entry: dict = {"_from": {"boxes": []}}
    problems: list[tuple[str, str]] = []
    for key in ("patient_id", "diagnosis", "grade"):
        value = raw.get(key)
        if value not in (None, ""):
            entry[key] = str(value).strip()
    dr, dr_field = raw.get("dr_grade"), "dr_grade"
    # APTOS-style CSVs put the DR grade (0-4) in a column called diagnosis.
    if dr in (None, "") and str(entry.get("diagnosis", "")).isdigit():
        dr, dr_field = entry.pop("diagnosis"), "diagnosis"
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
        try:
            dr = int(dr)
            if not 0 <= dr <= 4:
                raise ValueError(f"{dr} is outside 0-4")
        except _BAD_FIELD as exc:
            problems.append((dr_field, str(exc)))
        else:
            entry["dr_grade"] = dr
            entry.setdefault("grade", DR_GRADES[dr])
            if dr > 0:
                entry.setdefault("diagnosis", DR)
    lat = str(raw.get("laterality") or "").strip().upper()
    if lat:
        lat = {"R": "OD", "RIGHT": "OD", "L": "OS", "LEFT": "OS"}.get(lat, lat)
        if lat in ("OD", "OS"):
            entry["laterality"] = lat
        else:
            problems.append(("laterality", f"{raw.get('laterality')!r} is not OD/OS/left/right"))
    for point in ("disc", "fovea"):
        value = raw.get(point)
        if not value or (isinstance(value, str) and not value.strip()):
            continue
        try:
            x, y = _numbers(value, 2)
            entry[point] = Point(x=x, y=y)
        except _BAD_FIELD as exc:
            problems.append((point, str(exc)))
    boxes = raw.get("boxes")
    try:
        if isinstance(boxes, str):
            boxes = json.loads(boxes) if boxes.strip() else None
        if boxes is not None and not isinstance(boxes, list):
            raise ValueError(f"{boxes!r} is not a list of boxes")
    except _BAD_FIELD as exc:  # unreadable: nothing is known about the image's boxes
        problems.append(("boxes", str(exc)))
        boxes = None
    if boxes is not None:  # a boxes field, even [], says the image was annotated with boxes
        entry["labelled_classes"] = []  # filled in once the whole manifest is read
    entry["label_boxes"], unread = [], set()
    for i, box in enumerate(boxes or []):
        field, label = f"boxes[{i}]", None
        try:
            if not isinstance(box, dict):
                raise ValueError(f"{box!r} is not an object with label and xyxy")
            field = f"boxes[{i}].label"
            label = canonical_class(str(box.get("label", "")))
            field = f"boxes[{i}].xyxy"
            x1, y1, x2, y2 = _numbers(box.get("xyxy"), 4)
            if not (x1 < x2 and y1 < y2):
                raise ValueError(f"{box['xyxy']!r} has no area: x1 < x2 and y1 < y2 are required")
        except _BAD_FIELD as exc:
            problems.append((field, str(exc)))
            unread.add(label)
            continue
        entry["label_boxes"].append(LabelBox(label=label, xyxy=[x1, y1, x2, y2]))
        entry["_from"]["boxes"].append(i)
    return entry, problems, unread


def _csv_rows(path: Path, rejects: list[Reject]) -> list:
    """A CSV manifest's rows; a row the csv module cannot parse (a field over its size limit, a
    NUL byte) is rejected alone, naming its line, and the rows after it are still read."""
    rows: list = []
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheets write a BOM
        reader = csv.DictReader(f)
        while True:
            try:
                rows.append(next(reader))
            except StopIteration:
                return rows
            except csv.Error as exc:
                rows.append(_ROW_REJECTED)
                rejects.append(Reject(stage=STAGE, item=f"{shown(path)} entry {len(rows)} (line {reader.reader.line_num})",
                                      reason=f"unreadable row: {exc}"))


def load_labels(input_dir: Path, config: IngestConfig) -> tuple[dict[str, dict], list[Reject]]:
    """Read the labels manifest into {image key: label fields}. A bad entry, row or field is
    rejected alone; a manifest that cannot be read at all is one reject, and the build goes on
    without labels rather than stopping."""
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
    rejects: list[Reject] = []
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            raw_entries = data.get("images") if isinstance(data, dict) else data
        else:
            raw_entries = _csv_rows(path, rejects)
    except json.JSONDecodeError as exc:
        return {}, [Reject(stage=STAGE, item=shown(path), reason=f"not valid JSON: {exc}; no labels used")]
    except UnicodeDecodeError as exc:
        return {}, [Reject(stage=STAGE, item=shown(path), reason=f"not a readable text manifest: {exc}; no labels used")]
    if not isinstance(raw_entries, list):
        return {}, [Reject(stage=STAGE, item=shown(path),
                           reason='expected a list of entries or {"images": [...]}; no labels used')]
    labels: dict[str, dict] = {}
    unread: dict[str, set[str | None]] = {}
    for n, raw in enumerate(raw_entries, start=1):
        if raw is _ROW_REJECTED:
            continue
        if not isinstance(raw, dict):
            rejects.append(Reject(stage=STAGE, item=f"{shown(path)} entry {n}", reason="label entry is not an object"))
            continue
        key = next((str(raw[k]).strip() for k in _IMAGE_KEYS if raw.get(k) not in (None, "")), None)
        where = f"{shown(path)} entry {n}" + (f" ({key})" if key else "")
        if key is None:
            rejects.append(Reject(stage=STAGE, item=where, reason=f"label entry names no image (one of {_IMAGE_KEYS})"))
            continue
        labels[key], problems, unread[key] = _label_entry(raw)
        # By file and image, not position: the entry is part of the stage's cache key.
        labels[key]["_from"]["entry"] = f"{shown(path)} entry for {key}"
        rejects += [Reject(stage=STAGE, item=where, reason=f"{field}: {reason}") for field, reason in problems]
    annotated = config.annotated_classes
    if annotated is None:  # a class some box names is annotated, even where that box was unreadable
        annotated = sorted({b.label for entry in labels.values() for b in entry["label_boxes"]}
                           | {c for classes in unread.values() for c in classes if c})
    for key, entry in labels.items():
        if "labelled_classes" in entry:
            entry["labelled_classes"] = [] if None in unread[key] else [c for c in annotated if c not in unread[key]]
    return labels, rejects


def _coords(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _clipped(values, side: int, tolerance: float | None) -> list[float] | None:
    """values clipped to [0, side]; None when one is not finite or overshoots by more than
    tolerance * side (None: any overshoot is clipped)."""
    slack = math.inf if tolerance is None else tolerance * side
    if not all(math.isfinite(v) and -slack <= v <= side + slack for v in values):
        return None
    return [min(max(float(v), 0.0), float(side)) for v in values]


def _outside(values, width: int, height: int) -> ValueError:
    finite = all(math.isfinite(v) for v in values)
    return ValueError(f"{_coords(values)} " + (f"lies outside the {width}x{height} image" if finite else "is not finite"))


def fit_box(xyxy: list[float], width: int, height: int, tolerance: float | None = TOLERANCE) -> list[float]:
    """The box clipped to the image, or ValueError when it is not finite, overshoots the image by
    more than `tolerance` of its side, or has no area inside it. Every box an image's facts are
    measured from (labels and detector alike) passes here."""
    xs, ys = _clipped(xyxy[0::2], width, tolerance), _clipped(xyxy[1::2], height, tolerance)
    if xs is None or ys is None:
        raise _outside(xyxy, width, height)
    if xs[1] <= xs[0] or ys[1] <= ys[0]:
        raise ValueError(f"{_coords(xyxy)} has no area inside the {width}x{height} image")
    return [xs[0], ys[0], xs[1], ys[1]]


def _fit_labels(labels: dict, width: int, height: int, item: str) -> tuple[dict, list[Reject]]:
    """An entry's points and boxes checked against the decoded image: clipped when they overshoot
    it by less than TOLERANCE, else left out with a reject naming the manifest entry and field.
    A class that loses a box is no longer annotated exhaustively on this image."""
    fields = dict(labels)
    origin = fields.pop("_from", {})
    problems = []
    for point in ("disc", "fovea"):
        if fields.get(point) is None:
            continue
        p = Point.model_validate(fields[point])
        xs, ys = _clipped([p.x], width, TOLERANCE), _clipped([p.y], height, TOLERANCE)
        if xs is None or ys is None:
            problems.append((point, str(_outside([p.x, p.y], width, height))))
            fields[point] = None
        else:
            fields[point] = Point(x=xs[0], y=ys[0])
    boxes = [LabelBox.model_validate(b) for b in fields.get("label_boxes", [])]
    fields["label_boxes"] = []
    for i, box in zip(origin.get("boxes", range(len(boxes))), boxes):
        try:
            fields["label_boxes"].append(box.model_copy(update={"xyxy": fit_box(box.xyxy, width, height)}))
        except ValueError as exc:
            problems.append((f"boxes[{i}].xyxy", str(exc)))
            fields["labelled_classes"] = [c for c in fields.get("labelled_classes", []) if c != box.label]
    where = origin.get("entry", f"labels of {item}")
    return fields, [Reject(stage=STAGE, item=where, reason=f"{field}: {reason}") for field, reason in problems]


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


def too_large(path: Path, max_pixels: int) -> str | None:
    """Why a file is too large to decode, from its header alone (PIL reads no pixels on open), so
    a decompression bomb never reaches the decoder; None when within the limit, or when PIL
    cannot read the header (decode then says why)."""
    try:
        with warnings.catch_warnings():  # PIL warns of what is checked here, and said in the reject
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
    except Image.DecompressionBombError as exc:  # over PIL's own limit (179 MP): it gives the pixels only
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = found[1] if found else f"over {2 * Image.MAX_IMAGE_PIXELS}"
        return f"too large: {pixels} pixels, limit {max_pixels} (ingest.max_pixels)"
    except Exception:  # not an image, or a header PIL does not know
        return None
    if width * height > max_pixels:
        return f"too large: {width}x{height} = {width * height} pixels, limit {max_pixels} (ingest.max_pixels)"
    return None


def ingest_image(root: Path, source: SourceFile, labels: dict | None, config: IngestConfig,
                 rejects: list[Reject] | None = None) -> ImageRecord | Reject:
    """One photograph checked, measured and labelled. Label boxes and points that do not fit it
    are left out, and listed in `rejects` when given."""
    path = Path(root) / source.relpath
    item = shown(path)
    try:
        if (oversized := too_large(path, config.max_pixels)) is not None:
            return Reject(stage=STAGE, item=item, reason=oversized)
        rgb = decode(path)
        opened = utf8_path(path.resolve())
    except (ValueError, OSError) as exc:
        return Reject(stage=STAGE, item=item, reason=str(exc))
    height, width = rgb.shape[:2]
    if min(height, width) < config.min_side:
        return Reject(stage=STAGE, item=item,
                      reason=f"too small: {width}x{height}, shorter side must be >= {config.min_side} px")
    quality = measure_quality(rgb, config)
    if quality.fov_coverage < config.min_fov_coverage:
        return Reject(stage=STAGE, item=item,
                      reason=f"no retina visible: field of view covers {quality.fov_coverage:.0%} of the frame")
    if (not_fundus := not_a_fundus_photograph(rgb)) is not None:
        return Reject(stage=STAGE, item=item, reason=not_fundus)
    fields, label_rejects = _fit_labels(labels or {}, width, height, item)
    if rejects is not None:
        rejects += label_rejects
    return ImageRecord(sha256=source.sha256, path=str(opened), relpath=shown(source.relpath),
                       width=width, height=height, quality=quality, phash=perceptual_hash(rgb),
                       synthetic=is_synthetic(path), **fields)


def ingest(root: Path, sources: list[SourceFile], labels: dict[str, dict], config: IngestConfig
           ) -> tuple[list[ImageRecord], list[Reject]]:
    records, rejects = [], []
    for source in sources:
        result = ingest_image(root, source, labels_for(source.relpath, labels), config, rejects)
        (rejects if isinstance(result, Reject) else records).append(result)
    return records, rejects
