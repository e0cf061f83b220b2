"""Inspect a build: per-stage counts, sample rows, and overlay PNGs of the boxes."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import cv2
import pyarrow.dataset as ds

from fundus_engine.crop import mark
from fundus_engine.ingest import decode

STAGE_DIRS = ("ingest", "detect", "crop", "expand", "chain")


def stage_counts(out: Path) -> dict[str, dict[str, int]]:
    """Rows per table of each stage, read from the shard files the last build kept."""
    counts: dict[str, dict[str, int]] = {}
    for stage in STAGE_DIRS:
        tables: dict[str, int] = defaultdict(int)
        for path in sorted((out / "stages" / stage).glob("*.parquet")):
            tables[path.name.split(".")[-2]] += ds.dataset(path).count_rows()
        counts[stage] = dict(tables)
    return counts


def sample_rows(out: Path, stage: str, n: int = 3, table: str = "*") -> list[dict]:
    """The first n rows of a stage's table, or of the dataset for stage 'dataset'."""
    folder = out / "dataset" if stage == "dataset" else out / "stages" / stage
    files = sorted(folder.glob(f"*.{table}.parquet" if stage != "dataset" else "*.parquet"))
    if not files:
        return []
    return ds.dataset(files).head(n).to_pylist()


def write_overlays(out: Path, n: int = 4) -> list[Path]:
    """Draw every region of the first n images on a copy of the photograph."""
    images = {r["sha256"]: r for r in sample_rows(out, "ingest", 10_000)}
    by_image: dict[str, list[dict]] = defaultdict(list)
    for r in sample_rows(out, "crop", 1_000_000, table="regions"):
        by_image[r["sha256"]].append(r)
    written = []
    target = out / "inspect"
    target.mkdir(exist_ok=True)
    for sha in sorted(images)[:n]:
        rgb = decode(Path(images[sha]["path"]))
        for r in by_image.get(sha, []):
            rgb = mark(rgb, r["xyxy"])
            x1, y1 = int(r["xyxy"][0]), int(r["xyxy"][1])
            cv2.putText(rgb, f"{r['label']} {r['confidence']:.2f}", (x1, max(10, y1 - 3)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
        path = target / f"{sha[:16]}.overlay.png"
        cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        written.append(path)
    return written


def manifest(out: Path) -> dict:
    path = out / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {out} the output folder of a build?")
    return json.loads(path.read_text())
