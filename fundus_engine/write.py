"""Write: the validated instruction dataset, its rejects table and the run manifest.

Splits are decided by hashing the patient (or, failing that, the image), so one image or one
patient never lands in two splits, and adding images never moves existing ones.

Nothing here needs the whole dataset in memory: splits are assigned from image keys only
(`ImageKey`: hash, patient, perceptual hash), `DatasetWriter` takes records a shard at a time and
writes them in their final order through an external sort, and `RecordStats` counts them as they
pass.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from bisect import bisect_right
from collections import Counter
from pathlib import Path
from typing import Iterable, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from fundus_engine import tables
from fundus_engine.config import WriteConfig
from fundus_engine.models import ImageRecord, InstructionRecord, Reject
from fundus_engine.tables import RollingWriter, arrow_schema, write_rows

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
    pairs = set()
    for band in range(bands):  # one band's buckets at a time: memory of one band, not of all
        lo, hi = edges[band], edges[band + 1]
        mask = (1 << (hi - lo)) - 1
        buckets: dict[int, list[str]] = {}
        for key, v in values.items():
            buckets.setdefault((v >> lo) & mask, []).append(key)
        for members in buckets.values():
            for i, a in enumerate(members):
                for b in members[i + 1:]:
                    if (values[a] ^ values[b]).bit_count() <= max_bits:
                        pairs.add((a, b) if a < b else (b, a))
    return sorted(pairs)


class ImageKey(NamedTuple):
    """What a split needs of an image (and the end of a run of its kind of photograph)."""

    sha256: str
    patient_id: str | None
    phash: str | None
    synthetic: bool = False


def read_image_keys(path: Path) -> list[ImageKey]:
    """The keys of one ingest shard's images, reading only those columns."""
    table = tables.read_table(path, ImageRecord, list(ImageKey._fields))
    return [ImageKey(*row) for row in zip(*(table.column(c).to_pylist() for c in ImageKey._fields))]


def split_images(images: Iterable[ImageKey | ImageRecord], config: WriteConfig) -> dict[str, str]:
    """Image sha256 -> split, from each image's keys alone (sha256, patient_id, phash). Images of
    one patient and near-duplicate images form one group (union-find), and a group goes to the
    split its smallest key hashes to, so no patient and no photograph in two copies straddles
    train and test."""
    images = list(images)
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


SORT_KEY = [("sha256", "ascending"), ("task", "ascending"), ("record_id", "ascending")]
PARTITION_ROWS = 4096  # records per sort partition: what the writer holds at once
MAX_PARTITIONS = 256  # partition files open at once while records arrive


class DatasetWriter:
    """`dataset/{split}-NNNNN.parquet` written from records that arrive a shard at a time, each
    split's rows in (sha256, task, record_id) order and `rows_per_file` to a file, as if the whole
    dataset had been sorted in memory.

    An external sort: rows go into partitions by the leading digits of their image hash (ranges,
    so the partitions follow the sort order), appended to Arrow stream files beside the dataset;
    `close` reads one partition at a time, sorts it and appends it to each split's files. Memory:
    one shard and one partition (about `expected_rows / partitions` rows)."""

    def __init__(self, build_dir: Path, config: WriteConfig, expected_rows: int):
        """`expected_rows`: how many records will come (it sets the number of partitions)."""
        self.build_dir, self.config = Path(build_dir), config
        self.dataset = self.build_dir / "dataset"
        shutil.rmtree(self.dataset, ignore_errors=True)
        self.dataset.mkdir(parents=True)
        self.schema = arrow_schema(InstructionRecord)
        self.partitions = max(1, min(MAX_PARTITIONS, math.ceil(expected_rows / PARTITION_ROWS)))
        # lower bounds of partitions 1..P-1, as 8 hex digits: monotone in the hash's string order
        self.bounds = [f"{(i << 32) // self.partitions:08x}" for i in range(1, self.partitions)]
        self.sort_dir = self.build_dir / ".sort"
        self._streams: dict[int, tuple] = {}

    def _stream(self, partition: int):
        if partition not in self._streams:
            self.sort_dir.mkdir(parents=True, exist_ok=True)
            sink = pa.OSFile(str(self.sort_dir / f"{partition:05d}.arrows"), "wb")
            self._streams[partition] = (sink, pa.ipc.new_stream(sink, self.schema))
        return self._streams[partition][1]

    def add(self, table: pa.Table) -> None:
        """Records (InstructionRecord columns, `split` set) of one shard or any other piece."""
        if not table.num_rows:
            return
        table = table.select(self.schema.names).cast(self.schema)
        if self.partitions == 1:
            self._stream(0).write_table(table)
            return
        parts = pa.array([bisect_right(self.bounds, sha[:8]) for sha in table.column("sha256").to_pylist()],
                         pa.int32())
        for partition in sorted(set(parts.to_pylist())):
            self._stream(partition).write_table(table.filter(pc.equal(parts, partition)))

    def close(self) -> dict[str, list[str]]:
        """Sort and write each partition in turn; the split -> files written (relative paths)."""
        for sink, writer in self._streams.values():
            writer.close()
            sink.close()
        writers = {split: RollingWriter(self.dataset, split, self.schema, self.config.rows_per_file)
                   for split in SPLITS}
        try:
            for partition in sorted(self._streams):
                path = self.sort_dir / f"{partition:05d}.arrows"
                table = tables.read_ipc(path).sort_by(SORT_KEY)
                path.unlink()
                for split in SPLITS:
                    piece = table.filter(pc.equal(table.column("split"), split))
                    writers[split].write(piece)
                del table
            files = {split: [f"dataset/{p.name}" for p in w.close()] for split, w in writers.items()}
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        finally:
            self._streams = {}
            shutil.rmtree(self.sort_dir, ignore_errors=True)
        return {split: paths for split, paths in files.items() if paths}


def with_splits(table: pa.Table, split_of: dict[str, str]) -> pa.Table:
    """Records (an Arrow table) with their `split` column set from their image's split."""
    splits = pa.array([split_of[sha] for sha in table.column("sha256").to_pylist()], pa.string())
    return table.set_column(table.schema.get_field_index("split"), table.schema.field("split"), splits)


def unflagged(table: pa.Table) -> pa.Table:
    """Records whose description raised no consistency flag."""
    return table.filter(pc.equal(pc.fill_null(pc.list_value_length(table.column("flags")), 0), 0))


def write_rejects(rejects: list[Reject], out: Path) -> Path:
    return write_rows(Path(out) / "rejects.parquet", rejects, Reject)


UNDETERMINED = "not determined from the evidence available"


class RecordStats:
    """Counts over the records of a dataset, added a shard at a time: the manifest's summary and
    consistency figures and the card's tables. Holds counters and the set of image hashes (the
    images used, and the held-out ones the benchmark is built from), never records."""

    def __init__(self):
        self.records = 0
        self.images: set[str] = set()
        self.held_out: set[str] = set()  # images with records in the test split
        self.task_split: Counter = Counter()
        self.image_split: set[tuple[str, str | None]] = set()
        self.languages: Counter = Counter()
        self.diagnoses: Counter = Counter()  # per image: its English cognitive chain's conclusion
        self.flagged = 0
        self.flags: Counter = Counter()

    COLUMNS = ("sha256", "task", "split", "language", "diagnosis")

    def add_flags(self, flags: Iterable[list[str] | None]) -> None:
        """The flags of every record, kept or dropped (`expand.drop_flagged`)."""
        for record_flags in flags:
            if record_flags:
                self.flagged += 1
                self.flags.update(f.split(":")[0] for f in record_flags)

    def add_table(self, table: pa.Table) -> None:
        self.add_rows(zip(*(table.column(c).to_pylist() for c in self.COLUMNS)))

    def add_rows(self, rows: Iterable[tuple]) -> None:
        for sha, task, split, language, diagnosis in rows:
            self.records += 1
            self.images.add(sha)
            if split == "test":
                self.held_out.add(sha)
            self.task_split[task, split] += 1
            self.image_split.add((sha, split))
            self.languages[language] += 1
            if task == "cognitive_chain" and language == "en":
                self.diagnoses[diagnosis or UNDETERMINED] += 1

    def images_per_split(self) -> Counter:
        return Counter(split for _, split in self.image_split)

    def summary(self, rejects: list[Reject]) -> dict:
        per_task, per_split = Counter(), Counter()
        for (task, split), n in self.task_split.items():
            per_task[task] += n
            per_split[split] += n
        return {
            "records": self.records,
            "images": len(self.images),
            "records_per_task": dict(sorted(per_task.items())),
            "records_per_split": dict(sorted(per_split.items())),
            "images_per_split": dict(sorted(self.images_per_split().items())),
            "rejects": len(rejects),
            "rejects_per_stage": dict(sorted(Counter(r.stage for r in rejects).items())),
        }


def write_manifest(out: Path, manifest: dict) -> Path:
    path = Path(out) / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False))
    tmp.replace(path)
    return path
