"""Preparing imported `LabelledImage`s for training: read the sources the training parameters
name, merge them, split (held out, k-fold, the self-training pool), write YOLO.

Separate from the readers (`fundus_engine.importers`) because it is the other side of the
import: whatever format the labels came from, these functions combine them per image, assign
images to train/val or folds by a hash of their bytes (so an image keeps its place however the
dataset grows), and write one ultralytics detection dataset with the vocabulary's class ids.
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import cv2
import numpy as np
import yaml

from fundus_engine.config import IMAGE_EXTENSIONS, TrainDetectorParams
from fundus_engine.decoding import deeper_than_8_bits, to_uint8
from fundus_engine import layouts
from fundus_engine.importers import (IMAGE_SUFFIXES, LabelledImage, _image_size, dataset_images, from_coco,
                                      from_masks, from_yolo)
from fundus_engine.models import LabelBox
from fundus_engine.photo_files import sha256_file
from fundus_engine.synth import generate, write_marked_jpeg
from fundus_engine.vocabulary import CLASS_NAMES, canonical_class


def merge(*sources: list[LabelledImage]) -> list[LabelledImage]:
    """One entry per image (by resolved path) with the boxes of every source, e.g. one mask
    import per class, or masks plus a COCO file for the same photographs. Boxes are kept as
    they are, the annotated classes are the union of the sources'; first-seen order is kept."""
    merged: dict[Path, LabelledImage] = {}
    for items in sources:
        for item in items:
            key = Path(item.image).resolve()
            if key not in merged:
                merged[key] = LabelledImage(item.image, item.width, item.height, list(item.boxes), item.source,
                                            item.annotated_classes, item.dataset, item.synthetic, item.from_masks)
                continue
            into = merged[key]
            if (into.width, into.height) != (item.width, item.height):
                raise ValueError(f"{item.image}: {into.source} says {into.width}x{into.height} but "
                                 f"{item.source} says {item.width}x{item.height}")
            into.boxes += item.boxes
            if item.source not in into.source.split(" + "):
                into.source += " + " + item.source
            into.annotated_classes = (None if into.annotated_classes is None or item.annotated_classes is None
                                      else tuple(c for c in CLASS_NAMES
                                                 if c in {*into.annotated_classes, *item.annotated_classes}))
            into.dataset = into.dataset or item.dataset
            into.from_masks = tuple(c for c in CLASS_NAMES if c in {*into.from_masks, *item.from_masks})
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


def kfold(items: list[LabelledImage], k: int, seed: int = 0) -> list[list[LabelledImage]]:
    """k folds of the images for cross-validation, by image: ordered by a hash of each image's
    bytes with the seed and dealt out in turn, so the folds differ in size by at most one, are
    the same on every run, and duplicate images (same bytes) land in the same fold."""
    if k < 2:
        raise ValueError(f"k-fold cross-validation needs k >= 2, got {k}")
    digests = [hashlib.sha256(Path(i.image).read_bytes()).digest() for i in items]
    order = sorted(set(digests), key=lambda d: _split_score(d, seed))
    if len(order) < k:
        raise ValueError(f"{k}-fold cross-validation needs at least {k} distinct images, got {len(order)}")
    fold_of = {digest: position % k for position, digest in enumerate(order)}
    folds: list[list[LabelledImage]] = [[] for _ in range(k)]
    for digest, item in zip(digests, items):
        folds[fold_of[digest]].append(item)
    return folds


def _yolo_line(box: LabelBox, width: int, height: int) -> str | None:
    x1, y1, x2, y2 = box.xyxy
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    class_id = CLASS_NAMES.index(canonical_class(box.label))
    return (f"{class_id} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
            f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}")


_ENCODABLE = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})


def _training_copy(path: Path, content: bytes, max_side: int | None, synthetic: bool) -> bytes:
    """The bytes ultralytics trains on: the image as it is, or re-encoded 8-bit when it stores
    more (ultralytics would keep the high byte, where the detect stage scales by the brightest
    value: `decoding.to_uint8`) or is longer than `max_side` (ultralytics shrinks every image to
    `imgsz` on loading anyway; a 4288-px photograph costs far more to decode each epoch than a
    640-px one). Orientation is kept as stored, as the labels were measured on the stored pixels,
    and a synthetic image keeps its mark."""
    suffix = path.suffix.lower()
    if suffix not in _ENCODABLE:  # kept as it is; ultralytics still shrinks it on loading
        return content
    deep = deeper_than_8_bits(path)
    width, height = _image_size(path)
    shrink = max_side is not None and max(width, height) > max_side
    if not deep and not shrink:
        return content
    image = cv2.imdecode(np.frombuffer(content, np.uint8),
                         cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION | cv2.IMREAD_ANYDEPTH)
    if image is None:
        raise ValueError(f"{path}: cannot decode image to re-encode it for training")
    image = to_uint8(image)
    if shrink:
        scale = max_side / max(width, height)
        image = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                           interpolation=cv2.INTER_AREA)
    if suffix in (".jpg", ".jpeg") and synthetic:
        with tempfile.TemporaryDirectory() as tmp:
            write_marked_jpeg(Path(tmp) / "small.jpg", cv2.cvtColor(image, cv2.COLOR_BGR2RGB), quality=95)
            return (Path(tmp) / "small.jpg").read_bytes()
    ok, encoded = cv2.imencode(suffix, image, [cv2.IMWRITE_JPEG_QUALITY, 95] if suffix in (".jpg", ".jpeg") else [])
    if not ok:
        raise ValueError(f"{path}: cannot re-encode the image for training")
    return encoded.tobytes()


def write_yolo_dataset(items: list[LabelledImage], out: Path, val_fraction: float = 0.2, seed: int = 0,
                       max_side: int | None = None) -> Path:
    """Write an ultralytics detection dataset and return its dataset.yaml.

    Images are copied to out/images/{train,val} with labels in out/labels/{train,val}; class
    ids are indices into the vocabulary's CLASS_NAMES. The split hashes each image's bytes
    with the seed, so an image keeps its split however the dataset grows and duplicates never
    straddle train and val; if that leaves val empty (tiny datasets) the lowest-scoring image
    goes to val so ultralytics has something to validate on. Boxes are clipped to the image
    and boxes with no area dropped. The yaml uses an absolute path and no download key, so
    training stays offline. With `max_side`, larger images are stored downscaled to that long
    side (labels are normalised, so they stay as they are); the split still hashes the originals.
    An image stored in more than 8 bits a sample is stored 8-bit, scaled as the detect stage reads it.
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
        (out / "images" / part / name).write_bytes(_training_copy(path, content, max_side, bool(item.synthetic)))
        (out / "labels" / part / (Path(name).stem + ".txt")).write_text("".join(f"{line}\n" for line in lines))

    dataset_yaml = out / "dataset.yaml"
    dataset_yaml.write_text(yaml.safe_dump({
        "path": str(out),
        "train": "images/train",
        "val": "images/val" if val_fraction > 0 else "images/train",
        "names": dict(enumerate(CLASS_NAMES)),
    }, sort_keys=False))
    return dataset_yaml


def self_training_pool(folder: Path, labelled: list[LabelledImage],
                       held_out: Path | list[LabelledImage]) -> list[Path]:
    """The unlabelled images, minus any that are labelled or in the held-out set (a dataset.yaml,
    or the held-out images) by content: a pool image that is also labelled would be
    pseudo-labelled over its truth, one that is held out trained on and then scored on; both
    inflate the metrics."""
    if isinstance(held_out, list):
        held_out_images = [Path(i.image) for i in held_out]
    else:
        held_out_images, _ = dataset_images(held_out)
    known = {sha256_file(Path(p)) for p in [i.image for i in labelled] + held_out_images}
    pool = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    return [p for p in pool if sha256_file(p) not in known]


def hold_out(items: list[LabelledImage], params: TrainDetectorParams
             ) -> tuple[list[LabelledImage], list[LabelledImage], str]:
    """(train, held out, method). Real photographs and synthetic images are split separately, so
    each domain keeps held-out images however few real ones there are; with `folds`, the real
    photographs are all trained on (cross-validation scores them) and only synthetic ones are held out."""
    if params.held_out:
        return items, from_yolo(Path(params.held_out)), "held-out set"
    train: list[LabelledImage] = []
    held: list[LabelledImage] = []
    for synthetic in (False, True):
        part = [i for i in items if bool(i.synthetic) == synthetic]
        if not part:
            continue
        if params.folds and not synthetic:
            train += part
            continue
        kept, kept_out = split(part, params.val_fraction, params.seed)
        train += kept
        held += kept_out
    return train, held, "held-out split"


def labelled_sources(params: TrainDetectorParams, work: Path) -> list[tuple[str, list[LabelledImage]]]:
    """Every labelled source the training parameters name, read, each with a name for the log:
    public layouts, YOLO folders, COCO files, mask folders, and synthetic images generated into `work`."""
    named: list[tuple[str, list[LabelledImage]]] = []
    for folder in params.datasets:
        layout = layouts.detect_layout(Path(folder))
        named.append((f"{folder} ({layout})", layouts.from_layout(Path(folder), layout)))
    named += [(f"yolo {f}", from_yolo(Path(f))) for f in params.yolo]
    named += [(f"coco {c.annotations}", from_coco(Path(c.annotations), Path(c.images) if c.images else None))
              for c in params.coco]
    named += [(f"masks {m.images}", from_masks(Path(m.images), {k: Path(v) for k, v in m.masks.items()},
                                               m.min_area, m.merge_distance, levels=m.levels,
                                               max_boxes=m.max_boxes)) for m in params.masks]
    if params.synthetic:
        synth = Path(work) / "synthetic"
        generate(synth, params.synthetic, seed=params.synthetic_seed, size=params.imgsz)
        generated = from_yolo(synth)
        for item in generated:
            item.synthetic, item.dataset = True, "synthetic"
        named.append((f"synthetic (seed {params.synthetic_seed})", generated))
    return named
