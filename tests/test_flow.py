"""The build-fundusgen flow end to end in Prefect's local mode: real detector, real stages,
bad inputs, and the cross-run cache behaviour users rely on when they edit prompts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.build_fundusgen import build_fundusgen
from fundus_engine.config import BuildConfig
from fundus_engine.labels import patient_pseudonym
from fundus_engine.models import BenchmarkQuestion, InstructionRecord, Region, Reject
from fundus_engine.prompts import PROMPTS_DIR
from fundus_engine.synth import generate
from fundus_engine.tables import read_rows
from fundus_engine.write import split_position

STAGES = ("ingest", "detect", "crop", "expand", "chain")


pytestmark = pytest.mark.usefixtures("prefect_local")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("input")
    generate(root, 6, seed=11)
    bad = root / "images"
    (bad / "notes.jpg").write_text("this is not an image")
    gray = cv2.cvtColor(cv2.imread(str(next(bad.glob("synth_*.jpg")))), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(bad / "gray.png"), gray)
    cv2.imwrite(str(bad / "tiny.png"), np.full((64, 64, 3), (40, 80, 200), np.uint8))
    shutil.copy(next(bad.glob("synth_*.jpg")), bad / "copy_of_first.jpg")
    return root


def _stages(manifest: dict) -> dict[str, tuple[int, int]]:
    return {s: (manifest["stages"][s]["computed"], manifest["stages"][s]["cached"]) for s in STAGES}


def test_build_writes_dataset_and_rejects_bad_files(source, tmp_path):
    out = tmp_path / "out"
    manifest = build_fundusgen(str(source), str(out), BuildConfig(shard_size=5))

    rejects = read_rows(out / "rejects.parquet", Reject)
    reasons = {Path(r.item).name: r.reason for r in rejects}
    assert set(reasons) == {"notes.jpg", "gray.png", "tiny.png", "copy_of_first.jpg"}
    assert "cannot decode" in reasons["notes.jpg"]
    assert "grayscale" in reasons["gray.png"]
    assert "too small: 64x64" in reasons["tiny.png"]
    assert reasons["copy_of_first.jpg"].startswith("duplicate: same bytes as images/synth_s11_")

    assert manifest["images"] == 6
    assert manifest["rejects"] == 4
    assert manifest["stages"]["ingest"]["shards"] == 2  # 9 distinct files (6 good, 3 bad) in shards of 5
    records = read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)
    assert len(records) == manifest["records"]
    assert {r.task for r in records} >= {"disease_diagnosis", "report_generation", "grounded_report"}
    assert sum(manifest["records_per_task"].values()) == len(records)
    splits_of_image: dict[str, set] = {}
    for r in records:
        splits_of_image.setdefault(r.sha256, set()).add(r.split)
    assert all(len(s) == 1 for s in splits_of_image.values())
    # The real demo detector ran on these images: their boxes come from the model.
    detections = pq.read_table(sorted((out / "stages" / "detect").glob("*.parquet"))[0]).to_pylist()
    assert detections and {d["source"] for d in detections} == {"model"}
    assert manifest["detector"]["sha256"] and manifest["expand_backend"] == "offline"
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["records"] == manifest["records"]


def test_rerun_and_prompt_edits_recompute_only_what_changed(source, tmp_path):
    prompts = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR, prompts)
    out = tmp_path / "out"
    config = BuildConfig(shard_size=5, prompts_dir=str(prompts))

    first = build_fundusgen(str(source), str(out), config)
    assert _stages(first) == {s: (2, 0) for s in STAGES}

    again = build_fundusgen(str(source), str(out), config)
    assert _stages(again) == {s: (0, 2) for s in STAGES}
    assert again["records"] == first["records"]

    report = prompts / "chain" / "report.j2"
    report.write_text(report.read_text().replace("Conclusion:", "Impression:"))
    edited = build_fundusgen(str(source), str(out), config)
    assert _stages(edited) == {**{s: (0, 2) for s in STAGES[:4]}, "chain": (2, 0)}
    reports = [r for r in read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)
               if r.task == "report_generation"]
    assert reports and all("Impression:" in r.conversations[1].value for r in reports)

    offline = prompts / "expand" / "offline.j2"
    offline.write_text(offline.read_text().replace("A colour fundus photograph", "A colour fundus image"))
    reexpanded = build_fundusgen(str(source), str(out), config)
    assert _stages(reexpanded) == {**{s: (0, 2) for s in STAGES[:3]}, "expand": (2, 0), "chain": (2, 0)}

    reseeded = build_fundusgen(str(source), str(out), config.model_copy(update={"chain": config.chain.model_copy(update={"seed": 5})}))
    assert _stages(reseeded) == {**{s: (0, 2) for s in STAGES[:4]}, "chain": (2, 0)}


def test_deleted_stage_files_are_rebuilt_not_served_from_a_stale_cache(source, tmp_path):
    out = tmp_path / "out"
    config = BuildConfig(shard_size=5)
    build_fundusgen(str(source), str(out), config)
    for path in (out / "stages" / "crop").glob("00000-*"):
        path.unlink()
    manifest = build_fundusgen(str(source), str(out), config)
    crop = manifest["stages"]["crop"]
    assert (crop["shards"], crop["computed"], crop["cached"]) == (2, 1, 1) and crop["seconds"] > 0
    assert len(list((out / "stages" / "crop").glob("00000-*"))) == 3  # anatomy, regions and the record rebuilt

    shutil.rmtree(out / "crops")  # the crop images live outside the stage's Parquet
    manifest = build_fundusgen(str(source), str(out), config)
    crop = manifest["stages"]["crop"]
    assert (crop["shards"], crop["computed"], crop["cached"]) == (2, 2, 0)
    regions = read_rows(sorted((out / "stages" / "crop").glob("*.regions.parquet")), Region)
    assert regions and all(Path(r.crop_path).is_file() for r in regions)


def test_bad_config_and_missing_input_fail_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="input folder does not exist"):
        build_fundusgen(str(tmp_path / "nowhere"), str(tmp_path / "out"), BuildConfig())
    bad = tmp_path / "config.yaml"
    bad.write_text("detect:\n  confidence: 3\n")
    with pytest.raises(ValueError, match=str(bad)):
        BuildConfig.load(bad)


def test_benchmark_comes_from_held_out_images_only_and_the_card_describes_the_build(source, tmp_path):
    out = tmp_path / "out"
    # hold out exactly the patient whose key hashes lowest; the other two train
    patients = sorted({patient_pseudonym(e["patient_id"]) for e in json.loads((source / "labels.json").read_text())["images"]},
                      key=split_position)
    cut = (split_position(patients[0]) + split_position(patients[1])) / 2
    config = BuildConfig.model_validate({"write": {"test_fraction": cut, "val_fraction": 0.0}})
    manifest = build_fundusgen(str(source), str(out), config)
    records = read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)
    test_images = {r.sha256 for r in records if r.split == "test"}
    train_images = {r.sha256 for r in records if r.split == "train"}
    assert test_images and train_images
    questions = read_rows(out / "benchmark" / "test.parquet", BenchmarkQuestion)
    assert questions and {q.sha256 for q in questions} <= test_images
    assert not {q.sha256 for q in questions} & train_images
    assert manifest["benchmark"]["questions"] == len(questions)
    assert (out / "benchmark" / "test.tsv").read_text().splitlines()[0].startswith("index\tquestion\tA\tB")
    card = (out / "card" / "README.md").read_text()
    assert f"{manifest['records']} instruction records from {manifest['images']} images" in card
    assert (out / "card" / "box_positions.png").is_file()
    # lesion classes the demo detector finds with held-out mAP50 >= 0.5
    # (measured on synthetic images only: it is trusted on nothing on a real photograph)
    assert manifest["detector"]["trusted_on"] == {"synthetic": ["drusen", "fovea", "haemorrhage", "optic_disc",
                                                                 "soft_exudate"], "real": []}
    assert "synthetic photographs: drusen, haemorrhage, soft_exudate; real photographs: no class" in card
    assert manifest["detector_domain"]["images"] == {"synthetic": 6} and not manifest["detector_domain"]["warning"]
