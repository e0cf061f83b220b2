"""Synthetic shards run through ingest, detect (ground-truth boxes, so no model) and crop:
the inputs the expand stage sees, for tests and benchmarks of the expand backends."""
from __future__ import annotations

from pathlib import Path

from fundus_engine import crop, detect, ingest
from fundus_engine.labels import labels_for, load_labels
from fundus_engine.photo_files import scan
from fundus_engine.config import BuildConfig
from fundus_engine.models import Anatomy, ImageRecord, Region
from fundus_engine.synth import generate


def prepared_shard(root: Path, out: Path, n: int, seed: int, size: int = 512
                   ) -> tuple[list[ImageRecord], list[Anatomy], list[Region]]:
    generate(root, n, seed=seed, size=size, full_labels=True)
    config = BuildConfig()
    labels, _ = load_labels(root, config.ingest)
    sources, _ = scan(root)
    records, rejects = ingest.ingest(root, sources, {s.relpath: labels_for(s.relpath, labels) for s in sources},
                                     config.ingest)
    if rejects:
        raise RuntimeError(f"synthetic images rejected: {rejects}")
    detections, _ = detect.detect(records, config.detect)
    anatomies, regions, _ = crop.crop(records, detections, out / "crops", config.crop)
    return records, anatomies, regions
