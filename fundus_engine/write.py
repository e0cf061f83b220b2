"""Write: the validated instruction dataset, its rejects table and the run manifest.

Splits are decided by hashing the patient (or, failing that, the image), so one image or one
patient never lands in two splits, and adding images never moves existing ones.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from fundus_engine.config import WriteConfig
from fundus_engine.models import InstructionRecord, Reject
from fundus_engine.tables import write_rows

SPLITS = ("train", "val", "test")


def assign_split(group_key: str, config: WriteConfig) -> str:
    position = int(hashlib.sha256(group_key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if position < config.test_fraction:
        return "test"
    if position < config.test_fraction + config.val_fraction:
        return "val"
    return "train"


def write_dataset(records: list[InstructionRecord], out: Path, config: WriteConfig) -> dict[str, list[str]]:
    """Write `dataset/{split}-NNNNN.parquet`; files from an earlier build are replaced."""
    dataset = Path(out) / "dataset"
    dataset.mkdir(parents=True, exist_ok=True)
    for old in dataset.glob("*.parquet"):
        old.unlink()
    files: dict[str, list[str]] = {}
    for split in SPLITS:
        rows = sorted((r for r in records if r.split == split), key=lambda r: (r.sha256, r.task, r.record_id))
        for n, start in enumerate(range(0, len(rows), config.rows_per_file)):
            path = write_rows(dataset / f"{split}-{n:05d}.parquet", rows[start:start + config.rows_per_file],
                              InstructionRecord)
            files.setdefault(split, []).append(str(path.relative_to(out)))
    return files


def write_rejects(rejects: list[Reject], out: Path) -> Path:
    return write_rows(Path(out) / "rejects.parquet", rejects, Reject)


def summarise(records: list[InstructionRecord], rejects: list[Reject]) -> dict:
    return {
        "records": len(records),
        "images": len({r.sha256 for r in records}),
        "records_per_task": dict(sorted(Counter(r.task for r in records).items())),
        "records_per_split": dict(sorted(Counter(r.split for r in records).items())),
        "images_per_split": dict(sorted(Counter(s for _, s in {(r.sha256, r.split) for r in records}).items())),
        "rejects": len(rejects),
        "rejects_per_stage": dict(sorted(Counter(r.stage for r in rejects).items())),
    }


def write_manifest(out: Path, manifest: dict) -> Path:
    path = Path(out) / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False))
    tmp.replace(path)
    return path
