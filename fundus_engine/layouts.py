"""The public fundus lesion datasets as they unpack, recognised by their folder and file naming.

`detect_layout(folder)` says which layout a folder is; `from_layout(folder)` reads it into
`LabelledImage`s (boxes from the masks, as `importers.from_masks` makes them), each saying which
classes its dataset annotates (`annotated_classes`) and which dataset it is from:

| layout | what is recognised | classes annotated |
|---|---|---|
| `idrid` | IDRiD segmentation: mask folders `1. Microaneurysms` ... `5. Optic Disc`, files `IDRiD_01_MA.tif`, `_HE`, `_EX`, `_SE`, `_OD` | the five, where their folder exists |
| `ddr` | DDR: `lesion_segmentation/{train,valid,test}/{image,label/{EX,HE,MA,SE}}`, and the VOC xml boxes of `lesion_detection/` for images not in the segmentation set | EX, HE, MA, SE |
| `fgadr` | FGADR: `Seg-set/Original_Images` with `Microaneurysms_Masks`, `Hemohedge_Masks`, `HardExudate_Masks`, `SoftExudate_Masks`, `Neovascularization_Masks` (IRMA: not in the vocabulary, skipped) | those five |
| `e-ophtha` | `e_optha_EX/{EX,healthy}/<patient>/*.jpg` with `Annotation_EX/<patient>/*_EX.png`, `e_optha_MA` likewise | EX or MA, per subset |
| `real_fundus` | `images/<DATASET>/<id>.<ext>` with `masks/<DATASET>/<id>__<class>.png` (`__` + a vocabulary class name; others such as vessels skipped) | per dataset, the classes it has masks of |
| `yolo` | a YOLO folder (dataset yaml, or images/ + labels/) | the yaml's class names |

Only images annotated for at least one class are returned: an image of a dataset with no masks
in the vocabulary (DRIVE's vessels) would teach every class as background.

Mask to box, tuned for training a detector at 512-640 px on photographs of 1-4 k pixels:
lesion fragments closer than `merge_fraction` of the image width are one box (single linkage,
FundusExpert's clustering), specks under `min_area` pixels (default 4 px per 1000-px width,
squared) are dropped; anatomy (disc, cup, fovea) gets one box, its largest component.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from pathlib import Path

from fundus_engine import importers, mask_boxes
from fundus_engine.importers import IMAGE_SUFFIXES, MASK_FILE_SUFFIXES, LabelledImage
from fundus_engine.models import LabelBox
from fundus_engine.user_cache import user_cache_dir
from fundus_engine.vocabulary import ANATOMY, CLASS_NAMES, canonical_class

log = logging.getLogger(__name__)

# where `from_layout` lists the images it leaves out (None: it raises)
_SKIPPED: ContextVar[list[tuple[Path, str]] | None] = ContextVar("skipped", default=None)

LAYOUTS = ("idrid", "ddr", "fgadr", "e-ophtha", "real_fundus", "yolo")
DATASET_NAMES = {"idrid": "IDRiD", "ddr": "DDR", "fgadr": "FGADR", "e-ophtha": "e-ophtha"}

IDRID_FOLDERS = {"microaneurysms": "microaneurysm", "haemorrhages": "haemorrhage", "hemorrhages": "haemorrhage",
                 "hard exudates": "hard_exudate", "soft exudates": "soft_exudate", "optic disc": "optic_disc"}
IDRID_SUFFIXES = ("_MA", "_HE", "_EX", "_SE", "_OD")
DDR_LESIONS = {"EX": "hard_exudate", "HE": "haemorrhage", "MA": "microaneurysm", "SE": "soft_exudate"}
FGADR_FOLDERS = {"microaneurysms_masks": "microaneurysm", "hemohedge_masks": "haemorrhage",
                 "hemorrhage_masks": "haemorrhage", "hardexudate_masks": "hard_exudate",
                 "softexudate_masks": "soft_exudate", "neovascularization_masks": "neovascularisation"}
EOPHTHA_SUBSETS = {"e_optha_ex": ("EX", "hard_exudate"), "e_optha_ma": ("MA", "microaneurysm")}

_IDRID_FOLDER = re.compile(r"^\s*\d+\s*\.\s*(.+?)\s*$")
_MAX_DEPTH = 6  # how deep detect_layout looks for a layout's marker folders


# --------------------------------------------------------------------------------------------
# recognising a layout


def _dirs(root: Path, depth: int = _MAX_DEPTH) -> Iterable[Path]:
    """Sub-folders of root, breadth first, to `depth` levels."""
    level = [root]
    for _ in range(depth):
        nxt = []
        for folder in level:
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            yield from children
            nxt += children
        level = nxt


def _idrid_class(folder: Path) -> str | None:
    match = _IDRID_FOLDER.match(folder.name)
    return IDRID_FOLDERS.get(match.group(1).lower()) if match else None


def _is_real_fundus(root: Path) -> bool:
    images, masks = root / "images", root / "masks"
    if not (images.is_dir() and masks.is_dir()):
        return False
    return any(sub.is_dir() and (images / sub.name).is_dir() and any("__" in f.stem for f in sub.glob("*.png"))
               for sub in masks.iterdir())


def detect_layout(folder: Path) -> str:
    """Which public layout a folder is (one of LAYOUTS), by its naming; a ValueError saying
    what was looked for if none."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    if _is_real_fundus(root):
        return "real_fundus"
    names = {d.name.lower(): d for d in [root, *_dirs(root)]}
    if any(n in names for n in EOPHTHA_SUBSETS):
        return "e-ophtha"
    if "lesion_segmentation" in names or "lesion_detection" in names:
        return "ddr"
    if "seg-set" in names or ("original_images" in names and any(n in FGADR_FOLDERS for n in names)):
        return "fgadr"
    if any(_idrid_class(d) for d in names.values()):
        return "idrid"
    if importers._find_yaml(root) is not None or ((root / "images").is_dir() and (root / "labels").is_dir()):
        return "yolo"
    raise ValueError(
        f"{root}: not a layout this engine knows. Looked for: IDRiD mask folders ('1. Microaneurysms' ... "
        f"'5. Optic Disc'), DDR 'lesion_segmentation'/'lesion_detection', FGADR 'Seg-set'/'Original_Images' "
        f"with '*_Masks', e-ophtha 'e_optha_EX'/'e_optha_MA', images/<DATASET> + masks/<DATASET>/<id>__<class>.png, "
        f"or a YOLO folder; give the masks explicitly with a `masks:` entry instead")


def label_folders(folder: Path, layout: str | None = None) -> list[Path]:
    """The folders of a layout that hold its labels (masks, annotations), not photographs: a
    build reading the layout's photographs from inside it leaves these out of its scan."""
    root = Path(folder)
    layout = layout or detect_layout(root)
    found = [root, *_dirs(root)]
    if layout == "real_fundus":
        return [root / "masks"]
    if layout == "idrid":
        return [d for d in found if _idrid_class(d)]
    if layout == "ddr":
        return [d for d in found if d.name.lower() in ("label", "labels") and "lesion_segmentation"
                in (p.name.lower() for p in d.parents)]
    if layout == "fgadr":
        return [d for d in found if d.name.lower().endswith("_masks")]
    if layout == "e-ophtha":
        return [d for d in found if d.name.lower().startswith("annotation_")]
    return []  # yolo: its labels are text files


def from_layout(folder: Path, layout: str | None = None, merge_fraction: float | None = 0.01,
                min_area: int | None = None, skipped: list[tuple[Path, str]] | None = None) -> list[LabelledImage]:
    """Read a folder in one of the public layouts (recognised by `detect_layout` unless given).
    With `skipped`, an image whose masks cannot be used (unreadable, another size than the image)
    is left out and listed there as (image, reason), instead of stopping the whole import."""
    token = _SKIPPED.set(skipped)
    try:
        return _from_layout(Path(folder), layout, merge_fraction, min_area)
    finally:
        _SKIPPED.reset(token)


def _skip(image: Path, error: Exception) -> bool:
    """List an image whose labels cannot be read, where `from_layout` was asked to; else False."""
    if (skipped := _SKIPPED.get()) is None:
        return False
    skipped.append((image, str(error)))
    return True


def _from_layout(folder: Path, layout: str | None, merge_fraction: float | None, min_area: int | None
                 ) -> list[LabelledImage]:
    layout = layout or detect_layout(folder)
    readers: dict[str, Callable[..., list[LabelledImage]]] = {
        "idrid": from_idrid, "ddr": from_ddr, "fgadr": from_fgadr, "e-ophtha": from_eophtha,
        "real_fundus": from_real_fundus}
    if layout == "yolo":
        items = importers.from_yolo(folder)
    elif layout in readers:
        items = readers[layout](folder, merge_fraction=merge_fraction, min_area=min_area)
    else:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    if not items and not _SKIPPED.get():
        raise ValueError(f"{folder}: {layout} layout recognised but no annotated images found")
    log.info("%s (%s): %d images, %d boxes", folder, layout, len(items), sum(len(i.boxes) for i in items))
    return items


# --------------------------------------------------------------------------------------------
# masks -> items


class _MaskBoxes:
    """Mask files -> boxes with the layout's size-relative settings, kept in the user's cache by
    the masks' bytes, the settings and this code (reading and labelling a 12-megapixel mask takes
    about 0.1 s, and a build reads its layouts' masks every time it is planned)."""

    CODE = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (importers, mask_boxes))).hexdigest()

    def __init__(self, merge_fraction: float | None, min_area: int | None):
        self.merge_fraction, self.min_area = merge_fraction, min_area

    def __call__(self, image: Path, size: tuple[int, int], label: str, masks: list[Path]) -> list[LabelBox]:
        width = size[0]
        min_area = self.min_area if self.min_area is not None else max(4, round(4 * (width / 1000) ** 2))
        merge, most = (None, 1) if label in ANATOMY else (self.merge_fraction * width if self.merge_fraction else None,
                                                          None)  # one disc per eye: its largest component
        key = hashlib.sha256(json.dumps([self.CODE, list(size), label, min_area, merge, most]).encode())
        for mask in masks:
            key.update(hashlib.sha256(Path(mask).read_bytes()).digest())
        kept = user_cache_dir("mask-boxes") / f"{key.hexdigest()[:32]}.json"
        with contextlib.suppress(OSError, ValueError):
            named = [str(m) for m in masks]
            return [LabelBox(label=label, xyxy=xyxy, masks=named) for xyxy in json.loads(kept.read_text())]
        boxes = importers.mask_files_to_boxes(image, size, label, masks, min_area, merge, max_boxes=most)
        with contextlib.suppress(OSError):  # a read-only cache: computed again next time
            kept.parent.mkdir(parents=True, exist_ok=True)
            tmp = kept.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps([b.xyxy for b in boxes]))
            os.replace(tmp, kept)
        return boxes


def _items(pairs: dict[Path, dict[str, list[Path]]], annotated: dict[Path, Iterable[str]], dataset: str | dict,
           to_boxes: _MaskBoxes, layout: str) -> list[LabelledImage]:
    """One item per image from {image: {class: mask files}}; `annotated` gives each image's classes."""
    out = []
    for image in sorted(annotated):
        masks = pairs.get(image, {})
        try:
            size = importers._image_size(image)
            boxes = [box for label in CLASS_NAMES if label in masks for box in to_boxes(image, size, label, masks[label])]
        except (ValueError, OSError) as exc:
            if not _skip(image, exc):
                raise
            continue
        files = [str(m) for label in CLASS_NAMES for m in masks.get(label, [])]
        name = dataset[image] if isinstance(dataset, dict) else dataset
        out.append(LabelledImage(image, *size, boxes, f"{layout}:" + (", ".join(files) if files else str(image)),
                                 tuple(annotated[image]), name, from_masks=tuple(annotated[image])))
    return out


def _image_files(folder: Path, exclude: Iterable[Path] = ()) -> list[Path]:
    excluded = [e.resolve() for e in exclude]
    return [p for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            and not any(e == p.resolve() or e in p.resolve().parents for e in excluded)]


def _mask_files(folder: Path) -> list[Path]:
    return [p for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.suffix.lower() in MASK_FILE_SUFFIXES]


def _match(image_index: dict, mask: Path, key: Callable[[Path, str], object], suffixes: Iterable[str]) -> Path | None:
    stem = mask.stem.lower()
    for candidate in [stem, *(stem[:-len(s)] for s in suffixes if s and stem.endswith(s.lower()))]:
        found = image_index.get(key(mask, candidate))
        if found is not None:
            return found
    return None


def _stem_index(images: list[Path], where: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for image in images:
        if image.stem.lower() in index:
            raise ValueError(f"{where}: two images share the stem {image.stem!r}: {index[image.stem.lower()]} and "
                             f"{image}; masks could not tell them apart")
        index[image.stem.lower()] = image
    return index


# --------------------------------------------------------------------------------------------
# the layouts


def from_idrid(root: Path, merge_fraction: float | None = 0.01, min_area: int | None = None) -> list[LabelledImage]:
    """IDRiD segmentation: every image with at least one mask, annotated for the classes whose
    folder is there (IDRiD ships no soft-exudate mask for an image without any: absent)."""
    root = Path(root)
    class_dirs = [(d, _idrid_class(d)) for d in _dirs(root)]
    class_dirs = [(d, c) for d, c in class_dirs if c]
    if not class_dirs:
        raise ValueError(f"{root}: no IDRiD mask folders ('1. Microaneurysms' ... '5. Optic Disc')")
    index = _stem_index(_image_files(root, [d for d, _ in class_dirs]), root)
    pairs: dict[Path, dict[str, list[Path]]] = {}
    for folder, label in class_dirs:
        for mask in _mask_files(folder):
            image = _match(index, mask, lambda m, stem: stem, IDRID_SUFFIXES)
            if image is None:
                log.warning("IDRiD mask %s matches no image; skipped", mask)
                continue
            pairs.setdefault(image, {}).setdefault(label, []).append(mask)
    annotated_all = {label for _, label in class_dirs}
    return _items(pairs, {image: annotated_all for image in pairs}, DATASET_NAMES["idrid"],
                  _MaskBoxes(merge_fraction, min_area), "idrid")


def from_ddr(root: Path, merge_fraction: float | None = 0.01, min_area: int | None = None) -> list[LabelledImage]:
    """DDR: the lesion segmentation set (masks with the image's stem, .tif), plus the lesion
    detection set's VOC boxes for images that are not in the segmentation set."""
    root = Path(root)
    found = {d.name.lower(): d for d in [root, *_dirs(root, 3)]}
    to_boxes = _MaskBoxes(merge_fraction, min_area)
    items: list[LabelledImage] = []
    seg = found.get("lesion_segmentation")
    if seg is not None:
        for image_dir in sorted(d for d in seg.rglob("*") if d.is_dir() and d.name.lower() in ("image", "images")):
            label_dir = next((image_dir.parent / n for n in ("label", "labels") if (image_dir.parent / n).is_dir()),
                             None)
            if label_dir is None:
                log.warning("DDR %s has no label/ folder beside it; skipped", image_dir)
                continue
            index = _stem_index(_image_files(image_dir), image_dir)
            lesion_dirs = {DDR_LESIONS[d.name.upper()]: d for d in label_dir.iterdir()
                           if d.is_dir() and d.name.upper() in DDR_LESIONS}
            pairs: dict[Path, dict[str, list[Path]]] = {}
            for label, folder in lesion_dirs.items():
                for mask in _mask_files(folder):
                    image = _match(index, mask, lambda m, stem: stem, ("_" + k for k in DDR_LESIONS))
                    if image is None:
                        log.warning("DDR mask %s matches no image in %s; skipped", mask, image_dir)
                        continue
                    pairs.setdefault(image, {}).setdefault(label, []).append(mask)
            items += _items(pairs, {image: tuple(lesion_dirs) for image in index.values()}, DATASET_NAMES["ddr"],
                            to_boxes, "ddr")
    det = found.get("lesion_detection")
    if det is not None:
        seen = {Path(i.image).stem.lower() for i in items}
        xmls = {p.stem.lower(): p for p in sorted(det.rglob("*.xml"))}
        for image in _image_files(det):
            xml = xmls.get(image.stem.lower())
            if xml is None or image.stem.lower() in seen:
                continue
            seen.add(image.stem.lower())
            try:
                width, height = importers._image_size(image)
                boxes = _voc_boxes(xml)
            except (ValueError, OSError) as exc:
                if not _skip(image, exc):
                    raise
                continue
            items.append(LabelledImage(image, width, height, boxes, f"ddr:{xml}",
                                       tuple(DDR_LESIONS.values()), DATASET_NAMES["ddr"]))
    if not items and not _SKIPPED.get():
        raise ValueError(f"{root}: DDR layout without lesion_segmentation/*/image or lesion_detection xml files")
    return items


def _voc_boxes(xml: Path) -> list[LabelBox]:
    """Pascal VOC boxes (xmin/ymin/xmax/ymax, 1-based inclusive as VOC writes them: taken as
    pixel edges, at most one pixel off)."""
    try:
        tree = ET.parse(xml)
    except ET.ParseError as exc:
        raise ValueError(f"{xml}: not valid VOC xml ({exc})") from None
    boxes = []
    for n, obj in enumerate(tree.getroot().iter("object"), 1):
        name, box = obj.findtext("name"), obj.find("bndbox")
        if not name or box is None:
            raise ValueError(f"{xml}: object {n} has no name or bndbox")
        try:
            label = canonical_class(name)
            x1, y1, x2, y2 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{xml}: object {n}: {exc}") from None
        boxes.append(LabelBox(label=label, xyxy=[x1, y1, x2, y2]))
    return boxes


def from_fgadr(root: Path, merge_fraction: float | None = 0.01, min_area: int | None = None) -> list[LabelledImage]:
    """FGADR's segmentation set: masks named as their image in one folder per lesion."""
    root = Path(root)
    found = {d.name.lower(): d for d in [root, *_dirs(root, 3)]}
    originals = found.get("original_images")
    if originals is None:
        raise ValueError(f"{root}: FGADR layout without an Original_Images folder")
    seg = originals.parent
    index = _stem_index(_image_files(originals), originals)
    pairs: dict[Path, dict[str, list[Path]]] = {}
    annotated = set()
    for folder in sorted(d for d in seg.iterdir() if d.is_dir() and d.name.lower().endswith("_masks")):
        label = FGADR_FOLDERS.get(folder.name.lower())
        if label is None:
            log.info("FGADR %s: %s is not in the vocabulary; skipped", folder, folder.name.removesuffix("_Masks"))
            continue
        annotated.add(label)
        for mask in _mask_files(folder):
            image = _match(index, mask, lambda m, stem: stem, ())
            if image is None:
                log.warning("FGADR mask %s matches no image in %s; skipped", mask, originals)
                continue
            pairs.setdefault(image, {}).setdefault(label, []).append(mask)
    if not annotated:
        raise ValueError(f"{seg}: no FGADR mask folders ({', '.join(sorted(FGADR_FOLDERS))})")
    return _items(pairs, {image: annotated for image in index.values()}, DATASET_NAMES["fgadr"],
                  _MaskBoxes(merge_fraction, min_area), "fgadr")


def from_eophtha(root: Path, merge_fraction: float | None = 0.01, min_area: int | None = None) -> list[LabelledImage]:
    """e-ophtha EX and MA: images of `<subset>/<KIND>/<patient>/` and `<subset>/healthy/...`
    (annotated for that one lesion, the healthy ones without any), masks in
    `<subset>/Annotation_<KIND>/<patient>/` named as the image, optionally + `_EX`/`_MA`."""
    root = Path(root)
    subsets = [d for d in [root, *_dirs(root, 3)] if d.name.lower() in EOPHTHA_SUBSETS]
    if not subsets:
        raise ValueError(f"{root}: no e_optha_EX or e_optha_MA folder")
    to_boxes = _MaskBoxes(merge_fraction, min_area)
    items: list[LabelledImage] = []
    for subset in subsets:
        kind, label = EOPHTHA_SUBSETS[subset.name.lower()]
        annotations = [d for d in subset.iterdir() if d.is_dir() and d.name.lower() == f"annotation_{kind.lower()}"]
        images = _image_files(subset, annotations)
        # Matched by patient folder and stem: e-ophtha's file names are unique only per patient.
        index = {(image.parent.name.lower(), image.stem.lower()): image for image in images}
        pairs: dict[Path, dict[str, list[Path]]] = {}
        for folder in annotations:
            for mask in _mask_files(folder):
                image = _match(index, mask, lambda m, stem: (m.parent.name.lower(), stem), (f"_{kind}",))
                if image is None:
                    log.warning("e-ophtha mask %s matches no image in %s; skipped", mask, subset)
                    continue
                pairs.setdefault(image, {}).setdefault(label, []).append(mask)
        items += _items(pairs, {image: (label,) for image in images}, DATASET_NAMES["e-ophtha"], to_boxes, "e-ophtha")
    return items


def from_real_fundus(root: Path, merge_fraction: float | None = 0.01, min_area: int | None = None
                     ) -> list[LabelledImage]:
    """`images/<DATASET>/<id>.<ext>` with `masks/<DATASET>/<id>__<class>.png`. A dataset is
    annotated for the vocabulary classes it has masks of (a missing mask for one of them:
    absent); datasets with none (vessels, field of view) are skipped."""
    root = Path(root)
    items: list[LabelledImage] = []
    for mask_dir in sorted(d for d in (root / "masks").iterdir() if d.is_dir()):
        image_dir = root / "images" / mask_dir.name
        if not image_dir.is_dir():
            log.warning("%s has no images folder %s; skipped", mask_dir, image_dir)
            continue
        index = _stem_index(_image_files(image_dir), image_dir)
        pairs: dict[Path, dict[str, list[Path]]] = {}
        skipped: set[str] = set()
        for mask in _mask_files(mask_dir):
            if "__" not in mask.stem:
                log.warning("%s: not <id>__<class>; skipped", mask)
                continue
            stem, name = mask.stem.rsplit("__", 1)
            try:
                label = canonical_class(name)
            except ValueError:
                skipped.add(name)
                continue
            image = index.get(stem.lower())
            if image is None:
                log.warning("%s matches no image in %s; skipped", mask, image_dir)
                continue
            pairs.setdefault(image, {}).setdefault(label, []).append(mask)
        if skipped:
            log.info("%s: masks of %s are not in the vocabulary; skipped", mask_dir, ", ".join(sorted(skipped)))
        annotated = {label for masks in pairs.values() for label in masks}
        if not annotated:
            log.info("%s: no masks of a vocabulary class; its images are not imported", mask_dir)
            continue
        items += _items(pairs, {image: annotated for image in index.values()}, mask_dir.name,
                        _MaskBoxes(merge_fraction, min_area), "real_fundus")
    return items
