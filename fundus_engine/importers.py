"""Importers for the public fundus lesion datasets' label formats, and a YOLO dataset writer.

Public datasets label lesions three ways: YOLO text files, COCO JSON, and per-class binary
masks (IDRiD, DDR, e-ophtha, DiaretDB1). Every importer here returns the same in-memory form,
`LabelledImage`, with class names already mapped onto the one vocabulary, so that datasets
can be merged and written as a single ultralytics training set.

Masks become boxes the way FundusExpert's localiser did: connected pixels -> components,
specks dropped, nearby fragments clustered (single linkage, as DBSCAN with min_samples=1)
and each cluster -> its enclosing box.

Conventions: boxes are `[x1, y1, x2, y2]` in pixels with exclusive right/bottom edges
(a one-pixel blob at (x, y) is `[x, y, x + 1, y + 1]`); `source` says which importer and
which original file a label came from, for tracing a bad box back to its file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image

from fundus_engine.models import LabelBox
from fundus_engine.vocabulary import CLASS_NAMES, canonical_class

log = logging.getLogger(__name__)

# What ultralytics will train on (ultralytics.data.utils.IMG_FORMATS, minus video-ish gif).
IMAGE_SUFFIXES = frozenset({".avif", ".bmp", ".dng", ".heic", ".heif", ".jp2", ".jpeg", ".jpg", ".mpo",
                            ".png", ".tif", ".tiff", ".webp"})
MASK_FILE_SUFFIXES = frozenset({".tif", ".tiff", ".png", ".jpg", ".jpeg", ".gif", ".bmp"})
# Suffixes datasets put after the image stem in a mask's name (IDRiD: IDRiD_01_EX.tif).
# Matched case-insensitively; a mask whose stem equals the image stem always matches.
DEFAULT_MASK_SUFFIXES: tuple[str, ...] = (
    "_EX", "_HE", "_MA", "_SE", "_OD", "_OC", "_NV", "_SRC",
    "_mask", "-mask", "_gt", "_label", "_seg",
)
_TOL = 1e-6  # slack for normalised coordinates printed with limited precision


@dataclass
class LabelledImage:
    """One image with its boxes in pixels, whatever format they came from."""

    image: Path
    width: int
    height: int
    boxes: list[LabelBox] = field(default_factory=list)
    source: str = ""  # "<importer>:<original file>", several joined by " + " after merge()


# --------------------------------------------------------------------------------------------
# small helpers


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise ValueError(f"{path}: image file not found") from None
    except Exception as exc:  # PIL raises several types for unreadable files
        raise ValueError(f"{path}: cannot read image ({exc})") from None


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _class_lookup(names: list[str] | Mapping[int, str], where: str):
    """id -> canonical class, mapped lazily so unused odd names in a dataset do no harm."""
    table = dict(enumerate(names)) if isinstance(names, (list, tuple)) else {int(k): v for k, v in names.items()}
    cache: dict[int, str] = {}

    def lookup(class_id: int, context: str) -> str:
        if class_id not in cache:
            if class_id not in table:
                raise ValueError(f"{context}: class id {class_id} not in the names of {where} "
                                 f"(ids {sorted(table)})")
            try:
                cache[class_id] = canonical_class(str(table[class_id]))
            except ValueError as exc:
                raise ValueError(f"{context}: {exc}") from None
        return cache[class_id]

    return lookup


# --------------------------------------------------------------------------------------------
# YOLO


def _yolo_label_path(image: Path) -> Path:
    """ultralytics' rule: replace the last /images/ directory with /labels/ and the suffix with .txt."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(os.fspath(image).rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


def _find_yaml(folder: Path) -> Path | None:
    if folder.is_file():
        return folder
    for name in ("dataset.yaml", "data.yaml", "dataset.yml", "data.yml"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
    return found[0] if len(found) == 1 else None


def dataset_images(yaml_path: Path) -> tuple[list[Path], object]:
    """Every image a YOLO dataset yaml names (train, val and test), and its class names."""
    data = yaml.safe_load(yaml_path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{yaml_path}: not a YOLO dataset yaml (expected a mapping)")
    root = Path(data.get("path") or yaml_path.parent)
    if not root.is_absolute():
        root = (yaml_path.parent / root).resolve()
    images: list[Path] = []
    for split in ("train", "val", "test"):
        entries = data.get(split)
        if not entries:
            continue
        for entry in entries if isinstance(entries, list) else [entries]:
            p = root / entry
            if p.is_dir():
                images += _list_images(p)
            elif p.is_file() and p.suffix == ".txt":  # a list of image paths, as ultralytics allows
                for line in p.read_text().splitlines():
                    line = line.strip()
                    if line:
                        images.append(p.parent / line[2:] if line.startswith("./") else root / line)
            else:
                raise ValueError(f"{yaml_path}: {split} entry {entry!r} not found at {p}")
    return images, data.get("names")


def from_yolo(folder: Path, names: list[str] | dict[int, str] | None = None) -> list[LabelledImage]:
    """Read an ultralytics-style dataset: a dataset.yaml (or a folder holding one), or a folder
    with images/ and labels/ side by side. `names` overrides the yaml's class names.

    Segment rows (class + polygon) become their enclosing box, as ultralytics does for detection.
    An image with no label file has no boxes; a bad line is an error with file:line.
    """
    folder = Path(folder)
    yaml_path = _find_yaml(folder) if folder.exists() else None
    if yaml_path is not None:
        images, yaml_names = dataset_images(yaml_path)
        names = names if names is not None else yaml_names
        where = str(yaml_path)
    elif (folder / "images").is_dir():
        images, where = _list_images(folder / "images"), str(folder)
    else:
        raise ValueError(f"{folder}: no dataset yaml and no images/ folder; not a YOLO dataset")
    if not names:
        raise ValueError(f"{where}: no class names; pass names= or give the dataset a yaml with names")
    lookup = _class_lookup(names, where)

    out: list[LabelledImage] = []
    seen: set[Path] = set()
    for image in images:
        resolved = image.resolve()
        if resolved in seen:  # train and val may list the same images
            continue
        seen.add(resolved)
        width, height = _image_size(image)
        label_file = _yolo_label_path(image)
        boxes = _read_yolo_labels(label_file, width, height, lookup) if label_file.is_file() else []
        source = label_file if label_file.is_file() else image
        out.append(LabelledImage(image, width, height, boxes, f"yolo:{source}"))
    return out


def _read_yolo_labels(label_file: Path, width: int, height: int, lookup) -> list[LabelBox]:
    boxes = []
    for number, line in enumerate(label_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label_file}:{number}"
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            raise ValueError(f"{where}: expected 'class cx cy w h' (5 fields) or 'class x1 y1 x2 y2 x3 y3 ...', "
                             f"got {len(fields)} fields: {line.strip()!r}")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise ValueError(f"{where}: non-numeric field in {line.strip()!r}") from None
        class_id = values[0]
        if class_id < 0 or not class_id.is_integer():
            raise ValueError(f"{where}: class id must be a non-negative integer, got {fields[0]!r}")
        coords = values[1:]
        if any(not (-_TOL <= v <= 1 + _TOL) for v in coords):
            raise ValueError(f"{where}: normalised coordinates must lie in [0, 1], got {line.strip()!r}")
        coords = [min(max(v, 0.0), 1.0) for v in coords]
        if len(coords) == 4:
            cx, cy, w, h = coords
            x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        else:
            xs, ys = coords[0::2], coords[1::2]
            x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
        boxes.append(LabelBox(label=lookup(int(class_id), where),
                              xyxy=[x1 * width, y1 * height, x2 * width, y2 * height]))
    return boxes


# --------------------------------------------------------------------------------------------
# COCO


def from_coco(json_path: Path, images_dir: Path | None = None) -> list[LabelledImage]:
    """Read a COCO detection file. `file_name`s are relative to `images_dir` (default: the
    JSON's folder). Crowd annotations are kept as ordinary boxes; images without annotations
    are images without boxes."""
    json_path = Path(json_path)
    images_dir = Path(images_dir) if images_dir is not None else json_path.parent
    try:
        coco = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{json_path}: not valid JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"{json_path}: missing {key!r} list; not a COCO detection file")

    categories = {c["id"]: c["name"] for c in coco["categories"]}
    lookup = _class_lookup(categories, str(json_path))
    items: dict[object, LabelledImage] = {}
    for entry in coco["images"]:
        image_id = entry.get("id")
        if image_id in items:
            raise ValueError(f"{json_path}: duplicate image id {image_id}")
        path = Path(entry["file_name"])
        path = path if path.is_absolute() else images_dir / path
        if not path.is_file():
            raise ValueError(f"{json_path}: image id {image_id} file {path} not found")
        if entry.get("width") and entry.get("height"):
            width, height = int(entry["width"]), int(entry["height"])
        else:
            width, height = _image_size(path)
        items[image_id] = LabelledImage(path, width, height, [], f"coco:{json_path}")

    for ann in coco["annotations"]:
        ann_id = ann.get("id")
        if ann.get("image_id") not in items:
            raise ValueError(f"{json_path}: annotation id {ann_id} refers to image id {ann.get('image_id')}, "
                             f"which is not in 'images'")
        if ann.get("category_id") not in categories:
            raise ValueError(f"{json_path}: annotation id {ann_id} refers to category id {ann.get('category_id')}, "
                             f"which is not in 'categories' (ids {sorted(categories)})")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise ValueError(f"{json_path}: annotation id {ann_id} has no [x, y, w, h] bbox")
        x, y, w, h = (float(v) for v in bbox)
        label = lookup(ann["category_id"], f"{json_path}: annotation id {ann_id}")
        items[ann["image_id"]].boxes.append(LabelBox(label=label, xyxy=[x, y, x + w, y + h]))
    return list(items.values())


# --------------------------------------------------------------------------------------------
# masks


def mask_to_boxes(mask: np.ndarray, min_area: int = 4, merge_distance: float | None = None,
                  max_boxes: int | None = None) -> list[list[float]]:
    """Boxes of the lesions in a binary mask: 8-connected components of pixels > 0 (in any
    channel), components smaller than `min_area` pixels dropped as specks, then, with
    `merge_distance`, fragments whose boxes are at most that many pixels apart (edge to edge,
    0 when overlapping) clustered by single linkage and each cluster replaced by its
    enclosing box; with `max_boxes`, only the largest boxes are kept (FundusExpert keeps the
    largest N). Boxes are [x1, y1, x2, y2] with exclusive x2/y2, in scan order."""
    mask = np.asarray(mask)
    binary = (mask > 0).any(axis=2) if mask.ndim == 3 else mask > 0
    if binary.ndim != 2:
        raise ValueError(f"mask must be 2-D (or 2-D with channels), got shape {mask.shape}")
    if not binary.any():
        return []
    _, _, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    stats = stats[1:]  # row 0 is the background
    stats = stats[stats[:, cv2.CC_STAT_AREA] >= min_area]
    boxes = np.stack([stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP],
                      stats[:, cv2.CC_STAT_LEFT] + stats[:, cv2.CC_STAT_WIDTH],
                      stats[:, cv2.CC_STAT_TOP] + stats[:, cv2.CC_STAT_HEIGHT]], 1).astype(np.float64)
    if merge_distance is not None and len(boxes) > 1:
        boxes = _merge_close_boxes(boxes, float(merge_distance))
    if max_boxes is not None and len(boxes) > max_boxes:
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = np.sort(np.argsort(-areas, kind="stable")[:max_boxes])  # the largest, still in scan order
        boxes = boxes[keep]
    return [[float(v) for v in b] for b in boxes]


def _box_gaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance between every box in a and every box in b (0 where they overlap)."""
    dx = np.maximum(0, np.maximum(a[:, None, 0], b[None, :, 0]) - np.minimum(a[:, None, 2], b[None, :, 2]))
    dy = np.maximum(0, np.maximum(a[:, None, 1], b[None, :, 1]) - np.minimum(a[:, None, 3], b[None, :, 3]))
    return np.hypot(dx, dy)


def _merge_close_boxes(boxes: np.ndarray, eps: float) -> np.ndarray:
    """Single-linkage clusters of boxes (union-find over pairs within eps) -> enclosing boxes."""
    n = len(boxes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    chunk = 512  # bounds memory to chunk x n distances for masks with thousands of fragments
    for start in range(0, n, chunk):
        close = _box_gaps(boxes[start:start + chunk], boxes) <= eps
        for i, j in zip(*np.nonzero(close)):
            i, j = find(int(i) + start), find(int(j))
            if i != j:
                parent[max(i, j)] = min(i, j)
    roots = [find(i) for i in range(n)]
    merged = []
    for root in dict.fromkeys(roots):  # first-seen order keeps scan order
        members = boxes[[r == root for r in roots]]
        merged.append([members[:, 0].min(), members[:, 1].min(), members[:, 2].max(), members[:, 3].max()])
    return np.array(merged)


def _read_mask(path: Path) -> np.ndarray:
    """A mask as an array: cv2 first, PIL for what this cv2 build cannot read (gif in older builds)."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        try:
            with Image.open(path) as im:
                if im.mode in ("P", "PA"):  # palette indices are not intensities
                    im = im.convert("RGBA" if im.mode == "PA" else "RGB")
                mask = np.asarray(im)
        except Exception as exc:
            raise ValueError(f"{path}: cannot read mask ({exc})") from None
    if mask.ndim == 3 and mask.shape[2] in (2, 4):  # alpha is opacity, not the label, unless it is all there is
        colour = mask[..., :-1]
        mask = colour if colour.any() else mask[..., -1]
    return mask


def _image_index(images_dir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for image in _list_images(images_dir):
        key = image.stem.lower()
        if key in index:
            raise ValueError(f"{images_dir}: two images share the stem {image.stem!r}: {index[key]} and {image}; "
                             "masks could not tell them apart")
        index[key] = image
    return index


def _match_masks(index: dict[str, Path], mask_dir: Path, suffixes: Iterable[str]):
    """(image -> its mask files, mask files matching no image) for one class folder."""
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise ValueError(f"{mask_dir}: mask folder not found")
    ordered = sorted((s.lower() for s in suffixes), key=len, reverse=True)
    matched: dict[Path, list[Path]] = {}
    unmatched: list[Path] = []
    for mask in sorted(mask_dir.rglob("*")):
        if mask.suffix.lower() not in MASK_FILE_SUFFIXES or not mask.is_file():
            continue
        stem = mask.stem.lower()
        image = index.get(stem) or next(
            (index[stem[:-len(s)]] for s in ordered if s and stem.endswith(s) and stem[:-len(s)] in index), None)
        if image is None:
            unmatched.append(mask)
        else:
            matched.setdefault(image, []).append(mask)
    return matched, unmatched


def unmatched_masks(images_dir: Path, masks: dict[str, Path],
                    mask_suffixes: Iterable[str] = DEFAULT_MASK_SUFFIXES) -> list[Path]:
    """Mask files that `from_masks` would skip because no image has their stem; worth
    checking before training, since a silent skip looks exactly like a lesion-free image."""
    index = _image_index(Path(images_dir))
    return [m for folder in masks.values() for m in _match_masks(index, folder, mask_suffixes)[1]]


def _foreground(mask: np.ndarray, values: Iterable[int] | None, path: Path) -> np.ndarray:
    """Binary foreground: any non-zero pixel, or, with `values`, pixels at exactly those levels
    (multi-level masks such as REFUGE's 0 = cup, 128 = disc rim, 255 = background)."""
    if values is None:
        return (mask > 0).any(axis=2) if mask.ndim == 3 else mask > 0
    if mask.ndim == 3:
        if not (mask == mask[..., :1]).all():
            raise ValueError(f"{path}: mask levels need a grey mask, this one has colour")
        mask = mask[..., 0]
    return np.isin(mask, list(values))


def from_masks(images_dir: Path, masks: dict[str, Path], min_area: int = 4, merge_distance: float | None = None,
               mask_suffixes: Iterable[str] = DEFAULT_MASK_SUFFIXES,
               levels: Mapping[str, Iterable[int]] | None = None, max_boxes: int | None = None
               ) -> list[LabelledImage]:
    """Boxes from per-class binary masks (IDRiD, DDR, e-ophtha, DiaretDB1 layout).

    `masks` maps a class name or alias ("EX", "HE", "MA", "SE", "OD", ...) to a folder of masks.
    A mask belongs to the image with the same stem, optionally followed by one of
    `mask_suffixes` (IDRiD_01_EX.tif -> IDRiD_01.jpg); folders are searched recursively.
    Every image in `images_dir` is returned: datasets ship no mask for an absent lesion, so an
    image without a mask in a class folder has no boxes of that class. Mask files matching no
    image are skipped with a logged warning; `unmatched_masks()` lists them.
    `levels` maps a key of `masks` to the pixel values that mark its class, for masks that
    hold several classes in one file; REFUGE: masks {"optic_disc": d, "optic_cup": d} with
    levels {"optic_disc": [0, 128], "optic_cup": [0]}.
    """
    images_dir = Path(images_dir)
    levels = dict(levels or {})
    if unknown := sorted(set(levels) - set(masks)):
        raise ValueError(f"mask levels given for {unknown}, which are not among the mask classes {sorted(masks)}")
    index = _image_index(images_dir)
    if not index:
        raise ValueError(f"{images_dir}: no images found")
    classes = [(canonical_class(name), Path(folder), levels.get(name)) for name, folder in masks.items()]
    boxes: dict[Path, list[LabelBox]] = {image: [] for image in index.values()}
    sources: dict[Path, list[str]] = {image: [] for image in index.values()}
    sizes = {image: _image_size(image) for image in index.values()}
    for label, folder, values in classes:
        matched, unmatched = _match_masks(index, folder, mask_suffixes)
        for mask_path in unmatched:
            log.warning("mask %s matches no image in %s; skipped", mask_path, images_dir)
        for image, mask_paths in matched.items():
            width, height = sizes[image]
            combined = None
            for mask_path in mask_paths:  # several files for one image and class are one mask
                mask = _read_mask(mask_path)
                if mask.shape[:2] != (height, width):
                    raise ValueError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image} is "
                                     f"{width}x{height}; a mask must match its image pixel for pixel")
                binary = _foreground(mask, values, mask_path)
                combined = binary if combined is None else combined | binary
                sources[image].append(str(mask_path))
            boxes[image] += [LabelBox(label=label, xyxy=b)
                             for b in mask_to_boxes(combined, min_area, merge_distance, max_boxes)]
    return [LabelledImage(image, *sizes[image], boxes[image],
                          "masks:" + (", ".join(sources[image]) if sources[image] else str(image)))
            for image in index.values()]


# --------------------------------------------------------------------------------------------
# combining and writing


def merge(*sources: list[LabelledImage]) -> list[LabelledImage]:
    """One entry per image (by resolved path) with the boxes of every source, e.g. one mask
    import per class, or masks plus a COCO file for the same photographs. Boxes are kept as
    they are; first-seen order is kept."""
    merged: dict[Path, LabelledImage] = {}
    for items in sources:
        for item in items:
            key = Path(item.image).resolve()
            if key not in merged:
                merged[key] = LabelledImage(item.image, item.width, item.height, list(item.boxes), item.source)
                continue
            into = merged[key]
            if (into.width, into.height) != (item.width, item.height):
                raise ValueError(f"{item.image}: {into.source} says {into.width}x{into.height} but "
                                 f"{item.source} says {item.width}x{item.height}")
            into.boxes += item.boxes
            if item.source not in into.source.split(" + "):
                into.source += " + " + item.source
    return list(merged.values())


def _split_score(content: bytes, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:".encode() + content).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(items: list[LabelledImage], val_fraction: float, seed: int = 0
          ) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """(train, val) by a hash of each image's bytes with the seed, so an image keeps its split
    however the dataset grows and duplicates never straddle the two; if that leaves val empty
    (tiny datasets) the lowest-scoring image goes to val so there is something to validate on."""
    scored = [(_split_score(Path(i.image).read_bytes(), seed), n, i) for n, i in enumerate(items)]
    val = [(score, n, i) for score, n, i in scored if score < val_fraction]
    if val_fraction > 0 and len(scored) > 1 and not val:
        val = [min(scored, key=lambda e: e[0])]
    val_ids = {n for _, n, _ in val}
    return [i for _, n, i in scored if n not in val_ids], [i for _, n, i in scored if n in val_ids]


def _yolo_line(box: LabelBox, width: int, height: int) -> str | None:
    x1, y1, x2, y2 = box.xyxy
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    class_id = CLASS_NAMES.index(canonical_class(box.label))
    return (f"{class_id} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
            f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")


def write_yolo_dataset(items: list[LabelledImage], out: Path, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write an ultralytics detection dataset and return its dataset.yaml.

    Images are copied to out/images/{train,val} with labels in out/labels/{train,val}; class
    ids are indices into the vocabulary's CLASS_NAMES. The split hashes each image's bytes
    with the seed, so an image keeps its split however the dataset grows and duplicates never
    straddle train and val; if that leaves val empty (tiny datasets) the lowest-scoring image
    goes to val so ultralytics has something to validate on. Boxes are clipped to the image
    and boxes with no area dropped. The yaml uses an absolute path and no download key, so
    training stays offline.
    """
    if not 0 <= val_fraction <= 1:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    out = Path(out).resolve()
    for sub in ("images", "labels"):
        if (out / sub).is_dir() and any((out / sub).iterdir()):
            raise FileExistsError(f"{out / sub} is not empty; write the dataset to a new folder")
    items = merge(items)
    for item in items:
        path = Path(item.image)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{path}: ultralytics cannot train on {path.suffix} images; convert it first")
        if not path.is_file():
            raise ValueError(f"{path}: image file not found ({item.source})")
    train, val = split(items, val_fraction, seed)
    planned = [(item, Path(item.image).read_bytes(), name,
                [line for b in item.boxes if (line := _yolo_line(b, item.width, item.height))])
               for name, part in (("train", train), ("val", val)) for item in part]

    for part in ("train", "val"):
        (out / "images" / part).mkdir(parents=True, exist_ok=True)
        (out / "labels" / part).mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for item, content, part, lines in planned:
        path = Path(item.image)
        name = path.name
        if path.stem.lower() in used:  # same stem from different folders; labels are named by stem
            name = f"{path.stem}__{hashlib.sha256(content).hexdigest()[:10]}{path.suffix}"
            counter = 1
            while Path(name).stem.lower() in used:
                name = f"{path.stem}__{counter}{path.suffix}"
                counter += 1
        used.add(Path(name).stem.lower())
        (out / "images" / part / name).write_bytes(content)
        (out / "labels" / part / (Path(name).stem + ".txt")).write_text("".join(f"{line}\n" for line in lines))

    dataset_yaml = out / "dataset.yaml"
    dataset_yaml.write_text(yaml.safe_dump({
        "path": str(out),
        "train": "images/train",
        "val": "images/val" if val_fraction > 0 else "images/train",
        "names": dict(enumerate(CLASS_NAMES)),
    }, sort_keys=False))
    return dataset_yaml
