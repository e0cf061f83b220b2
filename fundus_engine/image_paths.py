"""Where the published dataset says its photographs are (`write.image_paths`).

`auto` (the default): `content` when the path of some photograph holds its patient's identifier
as the labels give it (`EyePACS/10_left.jpeg` of patient 10), else `source`.
`source`: where the build read them. `content`: a copy named by content hash under
`OUT/images/<sha256><suffix>` (a hard link where the file system allows, else a copy), so the
dataset, benchmark and exports carry no source file name or folder: hospital exports often name
files by record number or date of birth, which the labels' `patient_id` pseudonym would not
cover. Crops and box-marked copies are already named by hash under OUT either way.

A hard link shares the photograph's storage: a source rewritten in place (rare; most tools write
a new file) would change the copy too. Copies of photographs no longer in the build are kept,
since an older build may still name them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

import pyarrow as pa

from fundus_engine import tables
from fundus_engine.models import ImageRecord

IMAGES_DIR = "images"


def published_paths(setting: str, identifiers_in_paths: int) -> str:
    """`source` or `content`: `write.image_paths`, where `auto` is `content` once a photograph's
    path holds its patient's identifier (`labels.identifier_in_path`), which its pseudonym would
    otherwise keep for nothing."""
    if setting == "auto":
        return "content" if identifiers_in_paths else "source"
    return setting


def content_addressed(source: Path, images_dir: Path, sha256: str) -> Path:
    """The photograph at `images_dir/<sha256><suffix>`, made once, under a temporary name and
    renamed into place, so a killed build never leaves half a file under the final name."""
    target = images_dir / f"{sha256}{source.suffix.lower()}"
    if target.is_file():
        return target
    images_dir.mkdir(parents=True, exist_ok=True)
    scratch = images_dir / f".{sha256}.{os.getpid()}.tmp"
    scratch.unlink(missing_ok=True)
    try:
        os.link(source, scratch)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, scratch)
    os.replace(scratch, target)
    return target


def content_paths(ingest_files: Iterable[Path], out: Path) -> dict[str, str]:
    """Source path -> content-addressed path, for every photograph the build ingested."""
    renamed = {}
    for path in ingest_files:
        images = tables.read_table(path, ImageRecord, columns=["sha256", "path"])
        for sha256, source in zip(images.column("sha256").to_pylist(), images.column("path").to_pylist()):
            renamed[source] = str(content_addressed(Path(source), Path(out) / IMAGES_DIR, sha256))
    return renamed


def renamed_paths(records: pa.Table, renamed: dict[str, str]) -> pa.Table:
    """Records (an Arrow table) whose `image_path` and `source_image_path` name a source
    photograph, naming its content-addressed copy instead."""
    for column in ("image_path", "source_image_path"):
        values = pa.array([renamed.get(v, v) for v in records.column(column).to_pylist()], pa.string())
        records = records.set_column(records.schema.get_field_index(column), records.schema.field(column), values)
    return records
