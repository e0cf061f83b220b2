"""The labels manifest (`labels.json` or `labels.csv` in the input folder, or `ingest.labels`):
read into label fields per image key, normalised onto ImageRecord's fields (one spelling per
diagnosis and laterality, DR grades, boxes and points), matched to the photographs by relative
path, file name or bare id, and checked against each decoded image (`fit_labels`).

A bad entry, row or field is rejected alone (a Reject of the ingest stage naming the manifest
entry and field); the entry keeps its other fields.
"""
from __future__ import annotations

import csv
import hashlib
import hmac
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

from fundus_engine.boxes import TOLERANCE, clipped, fit_box, outside
from fundus_engine.config import IngestConfig
from fundus_engine.models import LabelBox, Point, Reject
from fundus_engine.photo_files import shown
from fundus_engine.vocabulary import DR, DR_GRADES, canonical_class, canonical_diagnosis

STAGE = "ingest"  # the stage whose rejects these are
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


MIN_PATIENT_KEY = 16  # characters: a shorter secret could be found by trying keys with candidate identifiers


def patient_key(config: IngestConfig) -> bytes | None:
    """The secret that keys patient pseudonyms, from the environment variable the config names
    (the config itself, which provenance and the manifest repeat, never holds it); None when unset.
    Surrounding whitespace is not part of it (a key read from a file ends in a newline). ValueError,
    naming the variable and never its value, for a key too short to be a random secret."""
    value = os.environ.get(config.patient_key_env, "").strip()
    if not value:
        return None
    if len(value) < MIN_PATIENT_KEY:
        raise ValueError(f"{config.patient_key_env}: a patient key must be a random secret of at least "
                         f"{MIN_PATIENT_KEY} characters (e.g. `openssl rand -hex 32`)")
    return value.encode()


def patient_key_id(key: bytes) -> str:
    """Names a key (not its value: an HMAC tag), so builds that share pseudonyms, and splits, can be
    told from those that do not."""
    return hmac.new(key, b"fundus-engine patient key id", hashlib.sha256).hexdigest()[:12]


def patient_pseudonym(patient_id: str, key: bytes | None = None) -> str:
    """What a build keeps of a patient identifier, never the identifier itself, which therefore
    reaches no Parquet, export or log; the same in every build with the same key (so a patient's
    photographs share a split, and the splits are reproducible). Keyed (`pk-`, HMAC-SHA256 with the
    secret `patient_key`), an identifier from a small space (a record number) cannot be confirmed by
    hashing candidates; unkeyed (`pt-`, a plain digest) it can, and the build warns."""
    if key is not None:
        return "pk-" + hmac.new(key, patient_id.encode(), hashlib.sha256).hexdigest()[:24]
    return "pt-" + hashlib.sha256(f"fundus-engine patient {patient_id}".encode()).hexdigest()[:24]


ID_WORDS = 4  # an identifier in a path is looked for as a run of at most this many words


def identifier_in_path(path: str, pseudonym: str, key: bytes | None = None) -> bool:
    """True when the path holds the identifier this pseudonym stands for, as a run of whole
    words (letters and digits, and what lies between them): `EyePACS/10_left.jpeg` of patient
    `10`, `MRN-5530120/OD.jpg` of `MRN-5530120`; not `P101.jpg` of `10`. Found by pseudonymising
    every such run, so no identifier need be kept to look for it."""
    words = [m.span() for m in re.finditer(r"[A-Za-z0-9]+", path)]
    return any(patient_pseudonym(path[start:end], key) == pseudonym
               for i, (start, _) in enumerate(words) for _, end in words[i:i + ID_WORDS])


def _label_entry(raw: dict, secret: bytes | None) -> tuple[dict, list[tuple[str, str]], set[str | None]]:
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
    if "patient_id" in entry:
        entry["patient_id"] = patient_pseudonym(entry["patient_id"], secret)
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
    secret = patient_key(config)  # before reading: a bad key stops the build, not only the labels
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
        labels[key], problems, unread[key] = _label_entry(raw, secret)
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


def fit_labels(labels: dict, width: int, height: int, item: str) -> tuple[dict, list[Reject]]:
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
        xs, ys = clipped([p.x], width, TOLERANCE), clipped([p.y], height, TOLERANCE)
        if xs is None or ys is None:
            problems.append((point, str(outside([p.x, p.y], width, height))))
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


def _short_keys(relpath: str) -> tuple[str, ...]:
    """The other names of an image's relative path: its path from each folder below the input's
    top (a manifest beside the images, read as `ingest.labels: images/labels.csv`, names
    `EyePACS/16_left.jpeg` of `images/EyePACS/16_left.jpeg`), its file name and its bare id."""
    parts = relpath.split("/")
    name = parts[-1]
    return (*("/".join(parts[n:]) for n in range(1, len(parts) - 1)), name, name.rsplit(".", 1)[0])


def labels_for(relpath: str, labels: dict[str, dict], ambiguous: frozenset[str] = frozenset()) -> dict | None:
    """Manifests name images by relative path (from the input folder or one below it), file name,
    or bare id (APTOS id_code); a name or id shared by several images in the folder identifies
    none of them."""
    if relpath in labels:
        return labels[relpath]
    for key in _short_keys(relpath):
        if key in labels and key not in ambiguous:
            return labels[key]
    return None


def ambiguous_keys(relpaths: list[str], labels: dict[str, dict]) -> frozenset[str]:
    """Label keys that are the file name or id of more than one image (clinicA/001.jpg, clinicB/001.jpg)."""
    seen = Counter(key for rel in relpaths for key in set(_short_keys(rel)))
    full = set(relpaths)
    # one image's whole path names that image alone, never another whose path ends with it
    return frozenset(key for key in labels if seen[key] > 1 and key not in full or seen[key] and key in full)
