"""Ingest: each photograph of a shard checked, measured and labelled into an ImageRecord.

Finding and hashing the photographs is `photo_files`, the labels manifest `labels`, decoding
`decoding`, the measurements `quality` and `fundus_check`. Every measurement is made on one
decode, at reduced scale for a large JPEG (`decoding.decode_for_measures`): quality on its 512 px
copy, the fundus check on that copy's 256 px one, the perceptual hash on the decode. Bad files
never stop a run: each becomes a Reject naming the file and the reason.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2

from fundus_engine import dicom
from fundus_engine.config import IngestConfig
from fundus_engine.decoding import decode_for_measures, in_colour, over_limit, too_large
from fundus_engine.fundus_check import not_a_fundus_photograph
from fundus_engine.handoff import PixelHandoff
from fundus_engine.labels import fit_labels, labels_for
from fundus_engine.models import ImageRecord, Reject
from fundus_engine.photo_files import SourceFile, shown, utf8_path
from fundus_engine.quality import QUALITY_SIDE, downscaled, grade_quality, perceptual_hash
from fundus_engine.synth import is_synthetic

STAGE = "ingest"
THREADS = min(4, os.cpu_count() or 1)  # photographs measured at once (OpenCV and NumPy release the GIL)


def ingest_image(root: Path, source: SourceFile, labels: dict | None, config: IngestConfig,
                 rejects: list[Reject] | None = None, renditions: Path | None = None,
                 handoff: PixelHandoff | None = None) -> ImageRecord | Reject:
    """One photograph checked, measured and labelled. Label boxes and points that do not fit it
    are left out, and listed in `rejects` when given. A DICOM photograph is rendered to a PNG
    under `renditions`, which the record names and later stages read; the eye side it states
    stands where the labels give none. Pixels decoded at full scale go to `handoff` for detect."""
    path = Path(root) / source.relpath
    item = shown(path)
    try:
        # a DICOM file's size and side from its header (its pixel data's own size checked against it)
        photo = dicom.Photograph(path) if dicom.is_dicom(path) else None
        oversized = (over_limit(photo.width, photo.height, config.max_pixels) if photo
                     else too_large(path, config.max_pixels))
        if oversized is not None:
            return Reject(stage=STAGE, item=item, reason=oversized)
        if photo is None:
            bgr, width, height = decode_for_measures(path)
            opened = utf8_path(path.resolve())
        else:  # decoded whole: pydicom has no reduced decode
            bgr = in_colour(cv2.cvtColor(photo.pixels(), cv2.COLOR_RGB2BGR))
            (height, width), opened = bgr.shape[:2], None
    except (ValueError, OSError) as exc:
        return Reject(stage=STAGE, item=item, reason=str(exc))
    if min(height, width) < config.min_side:
        return Reject(stage=STAGE, item=item,
                      reason=f"too small: {width}x{height}, shorter side must be >= {config.min_side} px")
    small = downscaled(bgr, QUALITY_SIDE)
    quality = grade_quality(small, config, channels="BGR")
    if quality.fov_coverage < config.min_fov_coverage:
        return Reject(stage=STAGE, item=item,
                      reason=f"no retina visible: field of view covers {quality.fov_coverage:.0%} of the frame")
    # on the quality copy: the check measures a 256 px copy, which this makes as well as the photograph
    if (not_fundus := not_a_fundus_photograph(cv2.cvtColor(small, cv2.COLOR_BGR2RGB))) is not None:
        return Reject(stage=STAGE, item=item, reason=not_fundus)
    fields, label_rejects = fit_labels(labels or {}, width, height, item)
    if rejects is not None:
        rejects += label_rejects
    if photo is not None:
        if renditions is None:
            raise ValueError("a DICOM photograph needs a folder for its rendition")
        try:
            opened = dicom.render(bgr, Path(renditions) / f"{source.sha256}.png")
        except OSError as exc:
            return Reject(stage=STAGE, item=item, reason=f"cannot write its PNG rendition: {exc}")
        if photo.laterality and fields.get("laterality", "unknown") == "unknown":
            fields["laterality"] = photo.laterality
    record = ImageRecord(sha256=source.sha256, path=str(opened), relpath=shown(source.relpath),
                         width=width, height=height, quality=quality, phash=perceptual_hash(bgr, channels="BGR"),
                         synthetic=photo is None and is_synthetic(path), **fields)
    if handoff is not None and bgr.shape[:2] == (height, width):  # a reduced decode is no use to detect
        handoff.keep(record.path, record.sha256, bgr)
    return record


def ingest(root: Path, sources: list[SourceFile], labels: dict[str, dict], config: IngestConfig,
           renditions: Path | None = None, handoff: PixelHandoff | None = None
           ) -> tuple[list[ImageRecord], list[Reject]]:
    def one(source: SourceFile) -> tuple[ImageRecord | Reject, list[Reject]]:
        label_rejects: list[Reject] = []
        return (ingest_image(root, source, labels_for(source.relpath, labels), config, label_rejects, renditions,
                             handoff), label_rejects)

    records, rejects = [], []
    with ThreadPoolExecutor(THREADS, thread_name_prefix="ingest") as pool:
        for result, label_rejects in pool.map(one, sources):  # in order: the same rows whatever the threads
            rejects += label_rejects
            (rejects if isinstance(result, Reject) else records).append(result)
    return records, rejects
