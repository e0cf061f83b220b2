"""fundus_engine.write: patient-level splits, Parquet shards with an explicit schema, rejects, summary."""
from __future__ import annotations

import hashlib
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fundus_engine.config import WriteConfig
from fundus_engine.models import GroundedBox, InstructionRecord, Provenance, Reject, Turn
from fundus_engine.tables import arrow_schema, read_rows
from fundus_engine.publish import BuildLock, OutputLocked, new_build_dir, publish
from fundus_engine.write import SPLITS, assign_split, write_manifest, write_rejects
from in_memory import summarise, write_card, write_dataset

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


def test_a_build_that_fails_midway_leaves_the_previous_one_published(tmp_path):
    out = tmp_path / "out"
    before = [_record(f"{i:064d}", "disease_diagnosis", "train") for i in range(30)]
    first = new_build_dir(out, "b1")
    write_dataset(before, first, CONFIG)
    write_manifest(first, {"records": 30})
    publish(out, first)
    broken = _record("e" * 64, "report_generation", "test").model_copy(update={"record_id": 12345})  # not a string
    second = new_build_dir(out, "b2")
    with pytest.raises(pa.ArrowTypeError), pytest.warns(UserWarning, match="serializer"):
        write_dataset(before[:3] + [broken], second, CONFIG)  # train is written, then test fails
    # never published: readers still see the first build, dataset and manifest together
    assert sorted(p.name for p in (out / "dataset").iterdir()) == ["train-00000.parquet"]
    assert pq.read_metadata(out / "dataset" / "train-00000.parquet").num_rows == 30
    assert json.loads((out / "manifest.json").read_text()) == {"records": 30}
    third = new_build_dir(out, "b3")
    write_dataset(before[:3], third, CONFIG)
    write_manifest(third, {"records": 3})
    publish(out, third)
    assert pq.read_metadata(out / "dataset" / "train-00000.parquet").num_rows == 3
    assert json.loads((out / "manifest.json").read_text()) == {"records": 3}
    assert (out / "current").resolve() == third.resolve()
    assert sorted(p.name for p in (out / "builds").iterdir()) == ["b1", "b3"]  # the one before stays for readers


def test_an_output_folder_from_before_versioned_builds_is_migrated_without_a_gap(tmp_path):
    out = tmp_path / "out"
    (out / "dataset").mkdir(parents=True)
    (out / "dataset" / "train-00000.parquet").write_bytes(b"old")
    (out / "manifest.json").write_text("{}")
    build = new_build_dir(out, "b1")
    write_dataset([_record("a" * 64, "disease_diagnosis", "train")], build, CONFIG)
    publish(out, build)
    assert (out / "dataset").is_symlink() and (out / "manifest.json").is_symlink()
    assert pq.read_metadata(out / "dataset" / "train-00000.parquet").num_rows == 1
    assert (out / "builds" / "legacy" / "dataset" / "train-00000.parquet").read_bytes() == b"old"


def test_an_output_folder_takes_one_build_at_a_time_and_a_dead_holder_is_taken_over(tmp_path):
    import subprocess
    import sys

    with BuildLock(tmp_path, run="run-a"):
        with pytest.raises(OutputLocked, match=r"another build is writing here \(run run-a, pid \d+"):
            with BuildLock(tmp_path, run="run-b"):
                pass
    with BuildLock(tmp_path, run="run-c") as lock:
        assert lock.taken_over is None  # released cleanly
    # a build killed while holding the lock: the kernel drops it, the next build takes over
    script = (f"import os; from fundus_engine.publish import BuildLock; l = BuildLock({str(tmp_path)!r}, 'killed')"
              f".__enter__(); os._exit(9)")
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    with BuildLock(tmp_path, run="run-d") as lock:
        assert lock.taken_over["run"] == "killed"


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


# ------------------------------------------------------------------ near-duplicates and the card

def _image(sha: str, phash: str | None, patient: str | None = None):
    from fundus_engine.models import ImageRecord, Quality

    return ImageRecord(sha256=sha, path=f"/img/{sha[:6]}.jpg", relpath=f"{sha[:6]}.jpg", width=512, height=512,
                       patient_id=patient, phash=phash,
                       quality=Quality(sharpness=40.0, exposure=0.3, fov_coverage=0.7, grade="good"))


def test_near_duplicate_pairs_by_hamming_distance():
    from fundus_engine.write import near_duplicate_pairs

    hashes = {"a": "0" * 16, "b": "0" * 15 + "7", "c": "f" * 16, "d": "00000000ffffffff"}
    # a~b differ in 3 bits, a~d in 32, c is far from all
    assert near_duplicate_pairs(hashes, 6) == [("a", "b")]
    assert near_duplicate_pairs(hashes, 2) == [] and near_duplicate_pairs(hashes, 3) == [("a", "b")]
    assert near_duplicate_pairs(hashes, 32) == [("a", "b"), ("a", "d"), ("b", "d"), ("c", "d")]
    assert near_duplicate_pairs(hashes, 0) == []
    assert near_duplicate_pairs({"x": "1234" * 4, "y": "1234" * 4}, 0) == [("x", "y")]


def test_near_duplicates_and_patients_share_one_split(tmp_path):
    import cv2

    from fundus_engine.decoding import decode
    from fundus_engine.quality import perceptual_hash
    from fundus_engine.synth import generate
    from fundus_engine.write import split_images

    truths = generate(tmp_path, 2, seed=4)
    original = decode(tmp_path / truths[0].image)
    smaller = cv2.resize(original, (300, 300), interpolation=cv2.INTER_AREA)
    brighter = cv2.convertScaleAbs(original, alpha=1.08)
    assert perceptual_hash(original) == perceptual_hash(original.copy())
    h0, h1, h2 = perceptual_hash(original), perceptual_hash(smaller), perceptual_hash(brighter)
    other = perceptual_hash(decode(tmp_path / truths[1].image))
    bits = WriteConfig().near_duplicate_bits
    assert len(h0) == 64 and (int(h0, 16) ^ int(h1, 16)).bit_count() <= bits
    assert (int(h0, 16) ^ int(h2, 16)).bit_count() <= bits
    assert (int(h0, 16) ^ int(other, 16)).bit_count() > bits  # the other eye is not a duplicate

    # 60 images with unrelated hashes, except every 3rd: a near-duplicate (2 bits off) of its
    # predecessor; the last 20 come in pairs sharing a patient
    images = []
    for n in range(60):
        phash = hashlib.sha256(str(n).encode()).hexdigest()
        if n % 3 == 2:
            phash = f"{int(images[-1].phash, 16) ^ 0b1010110101:064x}"  # 6 bits off
        images.append(_image(f"{n:064x}", phash, patient=f"P{n // 2}" if n >= 40 else None))
    split = split_images(images, WriteConfig(val_fraction=0.3, test_fraction=0.3))
    for n in range(2, 60, 3):
        assert split[images[n].sha256] == split[images[n - 1].sha256]  # near-duplicates together
    for n in range(40, 60, 2):
        assert split[images[n].sha256] == split[images[n + 1].sha256]  # one patient, one split
    assert len(set(split.values())) == 3
    assert split == split_images(list(reversed(images)), WriteConfig(val_fraction=0.3, test_fraction=0.3))


def test_dataset_card_counts_and_plots(tmp_path):
    from fundus_engine.models import Region

    records = _dataset(patients=6)
    regions = [Region(sha256=r.sha256, region_id=f"{r.sha256[:12]}-000", label="haemorrhage", display="Haemorrhage",
                      xyxy=[10, 10, 40, 40], box_999=[20, 20, 80, 80], confidence=0.9, source="model",
                      crop_path="/c.jpg", mean_rgb=[120, 20, 20], colour="dark red", size_dd=0.3)
               for r in records if r.task == "disease_diagnosis"]
    about = {"engine_version": "9.9", "created_at": "now", "config": {"shard_size": 64},
             "detector": {"weights": "demo.pt", "sha256": "ab" * 32}, "expand_backend": "offline",
             "prompts": [{"id": "chain.report", "version": "1.0", "sha256": "cd" * 32}]}
    path = write_card(tmp_path, records, regions, about)
    text = path.read_text()
    assert f"{len(records)} instruction records from 12 images" in text
    assert "| haemorrhage | 12 | 0 | 12 | 0 |" in text  # boxes: all, from labels, detector, localiser
    assert "| en | 36 |" in text and "Prompt `chain.report` version 1.0" in text
    per_task = Counter(r.task for r in records)
    assert "| disease_diagnosis | " in text and f"| {per_task['disease_diagnosis']} |" in text
    for png in ("box_sizes.png", "box_positions.png"):
        assert (tmp_path / "card" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Warning" not in text

    warned = {**about, "detector": {**about["detector"], "validated_on": {"synthetic": ["drusen"], "real": []}},
              "detector_domain": {"images": {"real": 3}, "disc_source": {"real": {"localiser": 3}}, "fovea_source": {},
                                  "detector_mean_confidence": {}, "warning": "The detector is out of its domain."}}
    text = write_card(tmp_path, records, regions, warned).read_text()
    assert text.index("**Warning:** The detector is out of its domain.") < text.index("## Records per task")
    assert "Detector validated on: synthetic photographs (drusen)" in text
    assert "disc from: {'real': {'localiser': 3}}" in text
