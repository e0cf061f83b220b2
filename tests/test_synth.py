"""fundus_engine.synth: reproducible synthetic fundus photographs whose labels match the pixels."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_engine.synth import generate, render
from fundus_engine.vocabulary import AMD, CLASS_NAMES, DR, DR_GRADES, GLAUCOMA, LESIONS, NORMAL

SIZE = 256
# Seed 3's first six patients are: normal, AMD, DR grade 1, DR grade 4, glaucoma, DR grade 3
# (asserted below, so a change to the generator cannot silently hollow out these tests).
SEED, N = 3, 12
# The lesion classes each DR grade may draw (synth._lesion_counts), and those it must draw.
DR_ALLOWED = {
    1: {"microaneurysm"},
    2: {"microaneurysm", "haemorrhage", "hard_exudate"},
    3: {"microaneurysm", "haemorrhage", "hard_exudate", "soft_exudate"},
    4: {"microaneurysm", "haemorrhage", "hard_exudate", "soft_exudate", "neovascularisation"},
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, N, seed=SEED, size=SIZE, full_labels=True)
    return root


@pytest.fixture(scope="module")
def entries(dataset) -> list[dict]:
    return json.loads((dataset / "labels.json").read_text())["images"]


def _radius(size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.hypot(xx - size / 2, yy - size / 2)


def test_same_seed_gives_identical_pixels_and_truth():
    a, truth_a = render(5, 0, 128)
    b, truth_b = render(5, 0, 128)
    assert a.dtype == np.uint8 and a.shape == (128, 128, 3)
    assert np.array_equal(a, b)
    assert asdict(truth_a) == asdict(truth_b)


def test_different_seed_or_index_gives_a_different_image():
    a, truth_a = render(5, 0, 128)
    other_seed, _ = render(6, 0, 128)
    other_index, _ = render(5, 2, 128)
    assert not np.array_equal(a, other_seed)
    assert not np.array_equal(a, other_index)
    # Not just noise: the anatomy moves too.
    assert render(6, 0, 128)[1].disc != truth_a.disc


def test_generate_is_byte_identical_for_the_same_seed(tmp_path):
    generate(tmp_path / "a", 2, seed=7, size=128, full_labels=True)
    generate(tmp_path / "b", 2, seed=7, size=128, full_labels=True)
    generate(tmp_path / "c", 2, seed=8, size=128, full_labels=True)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert {p.as_posix() for p in files_a} == {
        "dataset.yaml", "images/synth_s7_00000_OD.jpg", "images/synth_s7_00001_OS.jpg", "labels.json",
        "labels/synth_s7_00000_OD.txt", "labels/synth_s7_00001_OS.txt"}
    for rel in files_a:
        if rel.name != "dataset.yaml":  # the yaml names its own absolute path
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert ((tmp_path / "a" / "images" / "synth_s7_00000_OD.jpg").read_bytes()
            != (tmp_path / "c" / "images" / "synth_s8_00000_OD.jpg").read_bytes())


@pytest.mark.parametrize("seed,index", [(0, 0), (1, 1), (3, 6)])
def test_dark_border_outside_the_circular_field_of_view(seed, index):
    image, _ = render(seed, index, SIZE)
    r = _radius(SIZE)
    outside = image[r >= 0.47 * SIZE]
    inside = image[r < 0.40 * SIZE]
    # ingest.field_of_view calls a pixel retina when its brightest channel exceeds 25.
    assert outside.max() <= 25
    assert outside.mean() < 8
    assert inside.mean() > 60
    assert (inside.max(axis=1) > 25).mean() > 0.99
    for corner in (image[:10, :10], image[:10, -10:], image[-10:, :10], image[-10:, -10:]):
        assert corner.max() <= 25


@pytest.mark.parametrize("seed,index", [(0, 0), (0, 1), (1, 2), (3, 9)])
def test_labelled_disc_is_where_the_bright_disc_is_drawn(seed, index):
    image, truth = render(seed, index, SIZE)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    smooth = cv2.GaussianBlur(gray, (0, 0), truth.disc_diameter / 4)
    y, x = np.unravel_index(smooth.argmax(), smooth.shape)
    assert np.hypot(x - truth.disc[0], y - truth.disc[1]) < 0.4 * truth.disc_diameter
    disc_box = next(b.xyxy for b in truth.boxes if b.label == "optic_disc")
    assert disc_box[0] < truth.disc[0] < disc_box[2] and disc_box[1] < truth.disc[1] < disc_box[3]
    # The disc box is about one disc diameter across.
    assert 0.85 < (disc_box[2] - disc_box[0]) / truth.disc_diameter < 1.15


def test_fovea_is_about_two_and_a_half_disc_diameters_temporal_to_the_disc(entries):
    for e in entries:
        dd = e["disc_diameter"]
        dx, dy = e["disc"][0] - e["fovea"][0], e["disc"][1] - e["fovea"][1]
        assert 2.2 <= np.hypot(dx, dy) / dd <= 2.8, e["image"]
        assert 2.2 <= abs(dx) / dd <= 2.8
        assert dy < 0, "the disc sits slightly above the fovea"
        # The disc is nasal: on the viewer's right in a right eye, on the left in a left eye.
        if e["laterality"] == "OD":
            assert dx > 0 and e["disc"][0] > SIZE / 2 > e["fovea"][0] - 0.1 * SIZE
        else:
            assert dx < 0 and e["disc"][0] < SIZE / 2 < e["fovea"][0] + 0.1 * SIZE


def test_the_two_eyes_of_a_patient_are_mirror_images(entries):
    by_patient: dict[str, dict[str, dict]] = {}
    for e in entries:
        by_patient.setdefault(e["patient_id"], {})[e["laterality"]] = e
    assert len(by_patient) == N // 2
    for patient, eyes in by_patient.items():
        assert set(eyes) == {"OD", "OS"}, patient
        od, os_ = eyes["OD"], eyes["OS"]
        assert od["image"].endswith("_OD.jpg") and os_["image"].endswith("_OS.jpg")
        assert (od["diagnosis"], od["dr_grade"]) == (os_["diagnosis"], os_["dr_grade"])
        # Right eye: fovea left of the disc; left eye: fovea right of the disc.
        assert od["fovea"][0] < od["disc"][0]
        assert os_["fovea"][0] > os_["disc"][0]


def test_yolo_label_files_parse_and_match_the_boxes(dataset, entries):
    for e in entries:
        name = Path(e["image"]).name
        lines = (dataset / "labels" / name.replace(".jpg", ".txt")).read_text().splitlines()
        assert len(lines) == len(e["boxes"]) >= 3
        for line, box in zip(lines, e["boxes"]):
            fields = line.split()
            assert len(fields) == 5, line
            cls = int(fields[0])
            cx, cy, w, h = map(float, fields[1:])
            assert CLASS_NAMES[cls] == box["label"]
            assert all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)), line
            assert w > 0 and h > 0
            assert 0.0 <= cx - w / 2 and cx + w / 2 <= 1.0 + 1e-6
            x1, y1, x2, y2 = box["xyxy"]
            assert (cx - w / 2) * SIZE == pytest.approx(x1, abs=0.01)
            assert (cy - h / 2) * SIZE == pytest.approx(y1, abs=0.01)
            assert (cx + w / 2) * SIZE == pytest.approx(x2, abs=0.01)
            assert (cy + h / 2) * SIZE == pytest.approx(y2, abs=0.01)
        image = cv2.imread(str(dataset / e["image"]))
        assert image.shape == (SIZE, SIZE, 3)
    yaml_text = (dataset / "dataset.yaml").read_text()
    assert f"path: {dataset.resolve()}" in yaml_text and "download" not in yaml_text
    for i, name in enumerate(CLASS_NAMES):
        assert f"  {i}: {name}\n" in yaml_text


def test_default_labels_json_carries_image_level_labels_only(tmp_path):
    records = generate(tmp_path, 2, seed=1, size=128)
    entries = json.loads((tmp_path / "labels.json").read_text())["images"]
    assert [set(e) for e in entries] == [{"image", "patient_id", "laterality", "diagnosis", "dr_grade", "grade"}] * 2
    assert entries[0] == {"image": "images/synth_s1_00000_OD.jpg", "patient_id": "S1-P00000", "laterality": "OD",
                          "diagnosis": records[0].diagnosis, "dr_grade": records[0].dr_grade,
                          "grade": records[0].grade}
    # The returned truth still has everything, and the YOLO labels are written regardless.
    assert records[0].boxes and (tmp_path / "labels" / "synth_s1_00000_OD.txt").read_text().strip()


def test_the_seed_covers_every_condition(entries):
    conditions = {(e["diagnosis"], e["dr_grade"]) for e in entries}
    assert conditions == {(NORMAL, 0), (AMD, None), (DR, 1), (DR, 4), (GLAUCOMA, None), (DR, 3)}


def test_grades_and_diagnoses_agree_with_the_lesions_drawn(entries):
    for e in entries:
        lesions = [b for b in e["boxes"] if b["label"] in LESIONS]
        kinds = {b["label"] for b in lesions}
        anatomy = [b["label"] for b in e["boxes"] if b["label"] not in LESIONS]
        assert anatomy == ["optic_disc", "optic_cup", "fovea"], e["image"]
        assert e["grade"] == (DR_GRADES[e["dr_grade"]] if e["dr_grade"] is not None else None)
        if e["diagnosis"] == NORMAL:
            assert e["dr_grade"] == 0 and e["grade"] == "No diabetic retinopathy"
            assert lesions == []
        elif e["diagnosis"] == DR:
            grade = e["dr_grade"]
            assert 1 <= grade <= 4
            assert "microaneurysm" in kinds and kinds <= DR_ALLOWED[grade], (e["image"], kinds)
            assert ("neovascularisation" in kinds) == (grade == 4)
            if grade >= 3:
                assert sum(b["label"] == "haemorrhage" for b in lesions) >= 3
        elif e["diagnosis"] == AMD:
            assert e["dr_grade"] is None and kinds == {"drusen"} and len(lesions) >= 4
        else:
            assert e["diagnosis"] == GLAUCOMA and e["dr_grade"] is None and lesions == []


def test_glaucoma_has_a_large_cup_and_other_eyes_do_not(entries):
    for e in entries:
        box = {b["label"]: b["xyxy"] for b in e["boxes"]}
        disc_h = box["optic_disc"][3] - box["optic_disc"][1]
        cup_h = box["optic_cup"][3] - box["optic_cup"][1]
        measured = cup_h / disc_h  # what crop.anatomy will measure from these boxes
        if e["diagnosis"] == GLAUCOMA:
            assert 0.7 <= e["cup_to_disc"] <= 0.85
            assert measured >= 0.62  # above expand.GLAUCOMA_CUP_TO_DISC
        else:
            assert 0.25 <= e["cup_to_disc"] <= 0.45
            assert measured <= 0.5
        assert measured == pytest.approx(e["cup_to_disc"], abs=0.08)
        # The cup lies inside the disc.
        assert box["optic_disc"][0] <= box["optic_cup"][0] and box["optic_cup"][2] <= box["optic_disc"][2]


def test_lesions_lie_where_the_disease_puts_them(entries):
    for e in entries:
        dd = e["disc_diameter"]
        for b in e["boxes"]:
            x1, y1, x2, y2 = b["xyxy"]
            assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            if b["label"] == "drusen":  # clustered around the macula
                assert np.hypot(cx - e["fovea"][0], cy - e["fovea"][1]) < 1.9 * dd
            if b["label"] == "neovascularisation":  # new vessels at the disc
                assert np.hypot(cx - e["disc"][0], cy - e["disc"][1]) < 1.0 * dd
            if b["label"] in ("microaneurysm", "haemorrhage", "hard_exudate", "soft_exudate"):
                assert np.hypot(cx - SIZE / 2, cy - SIZE / 2) < 0.47 * SIZE  # inside the field of view
