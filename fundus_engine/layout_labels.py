"""Lesion and anatomy masks of a public dataset as a build's labels.

A photograph of IDRiD, DDR, FGADR, e-ophtha or `images/<DATASET> + masks/<DATASET>` comes with
masks, not a labels manifest. `ingest.label_layouts` names such folders; their boxes (made from the
masks by `layouts.from_layout`, as for training) join the labels of the same photographs in the
input folder, matched by content, so the input may be the dataset's own folder or a copy. The
classes a dataset annotates count as annotated on its photographs: a box is a lesion the records
may state, with its place and size measured; a class annotated and without a box is absent; any
other class stays unassessed. A box made from a mask surrounds one or more lesions, so those
classes are `clustered_classes`: located, never counted.
"""
from __future__ import annotations

import copy
from pathlib import Path

from fundus_engine.importers import LabelledImage
from fundus_engine.layouts import from_layout
from fundus_engine.photo_files import SourceFile, sha256_file
from fundus_engine.vocabulary import CLASS_NAMES, LESIONS


def layout_items(folders: list[str], input_dir: Path, sources: list[SourceFile]) -> dict[str, list[LabelledImage]]:
    """relpath of a photograph in the input folder -> the layout items of the same bytes. A
    folder that is no known layout, or holds no annotated image, is a ValueError naming it."""
    by_content = {s.sha256: s.relpath for s in sources}
    by_path = {(input_dir / s.relpath).resolve(): s.relpath for s in sources}
    found: dict[str, list[LabelledImage]] = {}
    for folder in folders:
        try:
            items = from_layout(Path(folder))
        except (ValueError, OSError) as exc:
            raise ValueError(f"ingest.label_layouts: {folder}: {exc}") from exc
        for item in items:
            image = Path(item.image).resolve()
            relpath = by_path.get(image) or by_content.get(sha256_file(image))
            if relpath is not None:
                found.setdefault(relpath, []).append(item)
    return found


def with_layout_boxes(entry: dict | None, items: list[LabelledImage]) -> dict:
    """A labels entry (or a new one) with the items' boxes added and their classes annotated."""
    entry = copy.deepcopy(entry) if entry else {"_from": {"boxes": []}, "label_boxes": []}
    origin = entry.setdefault("_from", {"boxes": []})
    annotated, clustered = set(entry.get("labelled_classes", [])), set(entry.get("clustered_classes", []))
    for item in items:
        for n, box in enumerate(item.boxes):
            entry["label_boxes"] = [*entry.get("label_boxes", []), box]
            origin["boxes"] = [*origin.get("boxes", []), f"{item.source} box {n}"]
        annotated |= set(item.annotated_classes or CLASS_NAMES)
        clustered |= set(item.from_masks) & set(LESIONS)
    entry["labelled_classes"] = sorted(annotated)
    if clustered:
        entry["clustered_classes"] = sorted(clustered)
    sources = " + ".join(item.source for item in items)
    origin["entry"] = f"{origin['entry']} + {sources}" if origin.get("entry") else sources
    return entry
