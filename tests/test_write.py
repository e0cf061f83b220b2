"""fundus_engine.write: patient-level splits, Parquet shards with an explicit schema, rejects, summary."""
from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fundus_engine.config import WriteConfig
from fundus_engine.models import GroundedBox, InstructionRecord, Provenance, Reject, Turn
from fundus_engine.tables import arrow_schema, read_rows
from fundus_engine.write import SPLITS, assign_split, summarise, write_dataset, write_manifest, write_rejects

PROVENANCE = Provenance(backend="offline", model="knowledge-table", prompt_id="expand.offline", prompt_version="1.0",
                        prompt_sha256="0" * 64, engine_version="0.0.0")
CONFIG = WriteConfig()


def _record(sha: str, task: str, split: str, n: int = 0, **kw) -> InstructionRecord:
    return InstructionRecord(
        record_id=f"{sha[:8]}-{task}-{n:03d}", sha256=sha, image_path=f"/img/{sha[:8]}.jpg",
        source_image_path=f"/img/{sha[:8]}.jpg", task=task,
        conversations=[Turn(**{"from": "human", "value": "<image>\nWhat is the condition demonstrated?"}),
                       Turn(**{"from": "gpt", "value": "Diabetic retinopathy"})],
        split=split, template_id="chain.diagnosis", template_version="1.0", provenance=PROVENANCE, **kw)


def _dataset(patients: int = 40) -> list[InstructionRecord]:
    """Two eyes per patient, three records per eye, each split by patient as the chain stage does."""
    records = []
    for p in range(patients):
        split = assign_split(f"P{p:05d}", CONFIG)
        for eye in range(2):
            sha = f"{p:04d}{eye:02d}".ljust(64, "a")
            for task in ("disease_diagnosis", "report_generation"):
                records.append(_record(sha, task, split))
            records.append(_record(sha, "region_detection", split, boxes=[
                GroundedBox(label="optic_disc", box_999=[700, 400, 820, 540]),
                GroundedBox(label="fovea", box_999=[372, 454, 492, 575])]))
    return records


# ------------------------------------------------------------------ splits

def test_assign_split_is_deterministic_and_proportional():
    keys = [f"P{i:05d}" for i in range(3000)]
    first = [assign_split(k, CONFIG) for k in keys]
    assert first == [assign_split(k, CONFIG) for k in reversed(keys)][::-1]  # independent of call order
    counts = Counter(first)
    assert set(counts) == set(SPLITS)
    assert counts["test"] / 3000 == pytest.approx(0.1, abs=0.025)
    assert counts["val"] / 3000 == pytest.approx(0.1, abs=0.025)
    assert counts["train"] / 3000 == pytest.approx(0.8, abs=0.03)


def test_split_fractions_are_respected_and_growing_test_only_takes_from_the_others():
    keys = [f"img-{i}" for i in range(2000)]
    assert {assign_split(k, WriteConfig(val_fraction=0, test_fraction=0)) for k in keys} == {"train"}
    small = {k: assign_split(k, WriteConfig(val_fraction=0.1, test_fraction=0.1)) for k in keys}
    large = {k: assign_split(k, WriteConfig(val_fraction=0.1, test_fraction=0.3)) for k in keys}
    assert all(large[k] == "test" for k in keys if small[k] == "test")
    assert sum(v == "test" for v in large.values()) / 2000 == pytest.approx(0.3, abs=0.04)
    # A different key is a different draw: the split really depends on the key.
    assert len({assign_split(f"P{i}", CONFIG) for i in range(50)}) == 3


def test_no_image_or_patient_lands_in_two_splits(tmp_path):
    records = _dataset()
    files = write_dataset(records, tmp_path, CONFIG)
    assert set(files) == set(SPLITS)  # 40 patients: every split is used
    back = read_rows(sorted((tmp_path / "dataset").glob("*.parquet")), InstructionRecord)
    assert len(back) == len(records)
    split_of_image, split_of_patient = {}, {}
    for r in back:
        split_of_image.setdefault(r.sha256, set()).add(r.split)
        split_of_patient.setdefault(r.sha256[:4], set()).add(r.split)
    assert all(len(s) == 1 for s in split_of_image.values())
    assert all(len(s) == 1 for s in split_of_patient.values())
    for split, paths in files.items():  # each file holds only its own split
        for path in paths:
            assert set(pq.read_table(tmp_path / path, columns=["split"]).column("split").to_pylist()) == {split}


# ------------------------------------------------------------------ parquet

def test_dataset_files_have_the_explicit_schema_and_read_back(tmp_path):
    records = _dataset(patients=10)
    files = write_dataset(records, tmp_path, CONFIG)
    assert all(path == f"dataset/{split}-00000.parquet" for split, paths in files.items() for path in paths)
    for split, paths in files.items():
        table = pq.read_table(tmp_path / paths[0])
        assert table.schema.equals(arrow_schema(InstructionRecord), check_metadata=False)
        assert table.schema.names == [f.alias or name for name, f in InstructionRecord.model_fields.items()]
        assert "from_" not in str(table.schema)  # the ShareGPT key, not the Python field name
        assert table.schema.field("conversations").type == pa.list_(pa.struct([
            pa.field("from", pa.string(), nullable=False), pa.field("value", pa.string(), nullable=False)]))
        assert table.schema.field("boxes").type.value_type.field("box_999").type == pa.list_(pa.int64())
        assert not table.schema.field("record_id").nullable and table.schema.field("grade").nullable
        rows = table.to_pylist()
        assert rows[0]["conversations"][0] == {"from": "human", "value": "<image>\nWhat is the condition demonstrated?"}
        # Sorted by image, then task.
        assert [(r["sha256"], r["task"]) for r in rows] == sorted((r["sha256"], r["task"]) for r in rows)
        assert len(rows) == sum(r.split == split for r in records)
    back = {r.record_id: r for r in read_rows([tmp_path / p for ps in files.values() for p in ps], InstructionRecord)}
    assert back == {r.record_id: r for r in records}
    detection = next(r for r in back.values() if r.task == "region_detection")
    assert [b.box_999 for b in detection.boxes] == [[700, 400, 820, 540], [372, 454, 492, 575]]


def test_rows_are_sharded_and_stale_files_are_removed(tmp_path):
    records = [_record(f"{i:064d}", "disease_diagnosis", "train") for i in range(250)]
    files = write_dataset(records, tmp_path, WriteConfig(rows_per_file=100))
    assert files == {"train": ["dataset/train-00000.parquet", "dataset/train-00001.parquet",
                               "dataset/train-00002.parquet"]}
    assert [pq.read_metadata(tmp_path / p).num_rows for p in files["train"]] == [100, 100, 50]
    (tmp_path / "dataset" / "val-00007.parquet").write_bytes(b"left over")

    files = write_dataset(records[:5] + [_record("f" * 64, "report_generation", "test")], tmp_path, CONFIG)
    assert files == {"train": ["dataset/train-00000.parquet"], "test": ["dataset/test-00000.parquet"]}
    assert sorted(p.name for p in (tmp_path / "dataset").iterdir()) == ["test-00000.parquet", "train-00000.parquet"]
    assert pq.read_metadata(tmp_path / "dataset" / "train-00000.parquet").num_rows == 5
    assert write_dataset([], tmp_path, CONFIG) == {} and not list((tmp_path / "dataset").iterdir())


def test_rejects_table_is_written_with_its_schema(tmp_path):
    rejects = [Reject(stage="ingest", item="/in/notes.jpg", reason="cannot decode: not an image or a corrupt file"),
               Reject(stage="expand", item="ab" * 32, reason="bad JSON", raw_output="{oops")]
    path = write_rejects(rejects, tmp_path)
    assert path == tmp_path / "rejects.parquet"
    table = pq.read_table(path)
    assert table.schema.equals(arrow_schema(Reject), check_metadata=False)
    assert table.to_pylist() == [r.model_dump() for r in rejects]
    assert read_rows(path, Reject) == rejects
    assert not list(tmp_path.glob("*.tmp"))

    empty = write_rejects([], tmp_path / "clean")
    assert pq.read_table(empty).num_rows == 0
    assert pq.read_schema(empty).equals(arrow_schema(Reject), check_metadata=False)


def test_summarise_counts(tmp_path):
    records = [_record("a" * 64, "disease_diagnosis", "train"), _record("a" * 64, "report_generation", "train"),
               _record("b" * 64, "disease_diagnosis", "test"), _record("c" * 64, "grounded_report", "train")]
    rejects = [Reject(stage="ingest", item="x", reason="r"), Reject(stage="ingest", item="y", reason="r"),
               Reject(stage="chain", item="z", reason="r")]
    assert summarise(records, rejects) == {
        "records": 4,
        "images": 3,
        "records_per_task": {"disease_diagnosis": 2, "grounded_report": 1, "report_generation": 1},
        "records_per_split": {"test": 1, "train": 3},
        "images_per_split": {"test": 1, "train": 2},
        "rejects": 3,
        "rejects_per_stage": {"chain": 1, "ingest": 2},
    }
    assert summarise([], []) == {"records": 0, "images": 0, "records_per_task": {}, "records_per_split": {},
                                 "images_per_split": {}, "rejects": 0, "rejects_per_stage": {}}


def test_manifest_is_written_atomically(tmp_path):
    manifest = {"records": 3, "stages": {"ingest": {"computed": 1}}}
    path = write_manifest(tmp_path, manifest)
    assert path == tmp_path / "manifest.json"
    assert json.loads(path.read_text()) == manifest
    write_manifest(tmp_path, {"records": 4})
    assert json.loads(path.read_text()) == {"records": 4}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
