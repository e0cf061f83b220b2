"""Write: the validated instruction dataset, its rejects table and the run manifest.

Splits are decided by hashing the patient (or, failing that, the image), so one image or one
patient never lands in two splits, and adding images never moves existing ones.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

from fundus_engine.config import WriteConfig
from fundus_engine.models import ImageRecord, InstructionRecord, Reject
from fundus_engine.tables import write_rows

SPLITS = ("train", "val", "test")


def split_position(group_key: str) -> float:
    """Where a patient (or image) falls on [0, 1]: test below test_fraction, then val, then train."""
    return int(hashlib.sha256(group_key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def assign_split(group_key: str, config: WriteConfig) -> str:
    position = split_position(group_key)
    if position < config.test_fraction:
        return "test"
    if position < config.test_fraction + config.val_fraction:
        return "val"
    return "train"


def near_duplicate_pairs(hashes: dict[str, str], max_bits: int) -> list[tuple[str, str]]:
    """Pairs of images whose hashes (hex) differ in at most max_bits bits.

    Pigeonhole: cut each hash into max_bits + 1 bands; two hashes within max_bits bits agree
    on at least one whole band, so only images sharing a (band, value) bucket are compared:
    near-linear for the tens of thousands of images a build holds, where all pairs would be
    quadratic.
    """
    if not hashes:
        return []
    width = max(len(h) for h in hashes.values()) * 4
    bands = min(max_bits + 1, width)
    edges = [width * i // bands for i in range(bands + 1)]
    values = {key: int(h, 16) for key, h in hashes.items()}
    buckets: dict[tuple[int, int], list[str]] = {}
    for key, v in values.items():
        for band in range(bands):
            lo, hi = edges[band], edges[band + 1]
            buckets.setdefault((band, (v >> lo) & ((1 << (hi - lo)) - 1)), []).append(key)
    pairs = set()
    for members in buckets.values():
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                if (values[a] ^ values[b]).bit_count() <= max_bits:
                    pairs.add((a, b) if a < b else (b, a))
    return sorted(pairs)


def split_images(images: list[ImageRecord], config: WriteConfig) -> dict[str, str]:
    """Image sha256 -> split. Images of one patient and near-duplicate images form one group
    (union-find), and a group goes to the split its smallest key hashes to, so no patient and
    no photograph in two copies straddles train and test."""
    parent = {i.sha256: i.sha256 for i in images}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first_of_patient: dict[str, str] = {}
    for image in images:
        if image.patient_id:
            union(image.sha256, first_of_patient.setdefault(image.patient_id, image.sha256))
    for a, b in near_duplicate_pairs({i.sha256: i.phash for i in images if i.phash}, config.near_duplicate_bits):
        union(a, b)
    key = {}  # a group's split key: its smallest patient id, else its smallest image hash
    for image in sorted(images, key=lambda i: (i.patient_id is None, i.patient_id or "", i.sha256)):
        key.setdefault(root(image.sha256), image.patient_id or image.sha256)
    return {i.sha256: assign_split(key[root(i.sha256)], config) for i in images}


def write_dataset(records: list[InstructionRecord], build_dir: Path, config: WriteConfig) -> dict[str, list[str]]:
    """Write `dataset/{split}-NNNNN.parquet` into a build's own folder (`fundus_engine.publish`
    makes it visible in one step once everything of the build is written)."""
    dataset = Path(build_dir) / "dataset"
    shutil.rmtree(dataset, ignore_errors=True)
    dataset.mkdir(parents=True)
    files: dict[str, list[str]] = {}
    for split in SPLITS:
        rows = sorted((r for r in records if r.split == split), key=lambda r: (r.sha256, r.task, r.record_id))
        for n, start in enumerate(range(0, len(rows), config.rows_per_file)):
            name = f"{split}-{n:05d}.parquet"
            write_rows(dataset / name, rows[start:start + config.rows_per_file], InstructionRecord)
            files.setdefault(split, []).append(f"dataset/{name}")
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
