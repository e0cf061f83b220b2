"""Lesion and anatomy masks of a public dataset as a build's labels.

A photograph of IDRiD, DDR, FGADR, e-ophtha or `images/<DATASET> + masks/<DATASET>` comes with
masks, not a labels manifest. `ingest.label_layouts` names such folders; their boxes (made from the
masks by `layouts.from_layout`, as for training, but keeping every annotated piece) join the labels
of the same photographs in the input folder, matched by content, so the input may be the dataset's
own folder or a copy. The classes a dataset annotates count as annotated on its photographs: a box
is a lesion the records may state, with its place and size measured; a class annotated and without
a box is absent; any other class stays unassessed. A box made from a mask surrounds one or more
lesions, so those classes are `clustered_classes`: located, never counted.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

from fundus_engine.importers import LabelledImage
from fundus_engine.layouts import from_layout, label_folders
from fundus_engine.models import Reject
from fundus_engine.photo_files import SourceFile, sha256_file
from fundus_engine.vocabulary import CLASS_NAMES, LESIONS

# Every annotated piece is a box: training drops pieces under 4 px per 1000-px width squared
# (74 px on a 4288-px photograph), but a microaneurysm is 20-50 px, and a class whose only
# pieces were dropped would read as absent.
MIN_AREA = 1


def layout_items(folders: list[str], input_dir: Path, sources: list[SourceFile]
                 ) -> tuple[dict[str, list[LabelledImage]], list[Reject]]:
    """relpath of a photograph in the input folder -> the layout items of the same bytes, and the
    rejects: an image whose masks cannot be used, a folder that matches no photograph. A relative
    folder is read from the input folder (as `ingest.labels`); one that is no known layout, or
    holds no annotated image, is a ValueError naming it."""
    by_path = {(input_dir / s.relpath).resolve(): s.relpath for s in sources}
    by_content = {s.sha256: s.relpath for s in sources}
    sizes = {os.path.getsize(path) for path in by_path}  # only a file of one of these sizes is hashed

    def in_input(image: Path) -> str | None:
        image = Path(image).resolve()
        if image in by_path:
            return by_path[image]
        return by_content.get(sha256_file(image)) if image.is_file() and os.path.getsize(image) in sizes else None

    found: dict[str, list[LabelledImage]] = {}
    rejects: list[Reject] = []
    for folder in dict.fromkeys(folders):
        root = _root(folder, input_dir)
        skipped: list[tuple[Path, str]] = []
        try:
            items = from_layout(root, min_area=MIN_AREA, skipped=skipped)
        except (ValueError, OSError) as exc:
            raise ValueError(f"ingest.label_layouts: {folder}: {exc}") from exc
        matched = 0
        for image, reason in skipped:  # only the build's own photographs are its rejects
            if (relpath := in_input(image)) is not None:
                rejects.append(Reject(stage="ingest", item=relpath,
                                      reason=f"ingest.label_layouts: its masks in {folder} are not used: {reason}"))
                matched += 1
        for item in items:
            if (relpath := in_input(item.image)) is not None:
                found.setdefault(relpath, []).append(item)
                matched += 1
        if not matched:
            rejects.append(Reject(stage="ingest", item=str(folder), reason="ingest.label_layouts: no photograph of "
                                  "the input folder is in this layout; its labels are not used"))
    return found, rejects


def _root(folder: str, input_dir: Path) -> Path:
    return Path(folder) if Path(folder).is_absolute() else input_dir / folder


def mask_folders(folders: list[str], input_dir: Path) -> list[Path]:
    """The layouts' label folders (masks, annotations): inside the input folder they are no
    photographs of the build. A folder in no known layout has none (`layout_items` names it)."""
    found = []
    for folder in dict.fromkeys(folders):
        try:
            found += label_folders(_root(folder, input_dir))
        except (ValueError, OSError):
            continue
    return found


def with_layout_boxes(entry: dict | None, items: list[LabelledImage]) -> dict:
    """A labels entry (or a new one) with the items' boxes added and their classes annotated. A
    class the entry annotates with boxes keeps them (one lesion each) and takes none from masks;
    a box given twice (the same photograph in two layouts) is kept once."""
    entry = copy.deepcopy(entry) if entry else {}
    origin = entry.setdefault("_from", {})
    boxes, named = entry.setdefault("label_boxes", []), origin.setdefault("boxes", [])
    # a class the manifest annotates exhaustively keeps its boxes (one lesion each); where it gives
    # some boxes of a class without annotating it, the masks' boxes join them, as areas
    boxed = {b.label for b in boxes} & set(entry.get("labelled_classes", []))
    seen = {(b.label, tuple(b.xyxy)) for b in boxes}
    annotated, clustered = set(entry.get("labelled_classes", [])), set(entry.get("clustered_classes", []))
    for item in items:
        for n, box in enumerate(item.boxes):
            if box.label in boxed or (box.label, tuple(box.xyxy)) in seen:
                continue
            seen.add((box.label, tuple(box.xyxy)))
            boxes.append(box)
            named.append(f"{item.source} box {n}")
        annotated |= set(CLASS_NAMES if item.annotated_classes is None else item.annotated_classes)
        clustered |= (set(item.from_masks) & set(LESIONS)) - boxed
    entry["labelled_classes"] = sorted(annotated)
    if clustered:
        entry["clustered_classes"] = sorted(clustered)
    sources = " + ".join(item.source for item in items)
    origin["entry"] = f"{origin['entry']} + {sources}" if origin.get("entry") else sources
    return entry
