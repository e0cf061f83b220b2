"""The ingest stage and what it is made of: scanning and hashing (photo_files), duplicates, bad files
(decoding), label manifests (labels), quality (quality)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_engine.config import IngestConfig
from fundus_engine.decoding import decode
from fundus_engine.ingest import ingest, ingest_image
from fundus_engine.labels import labels_for, load_labels, patient_pseudonym
from fundus_engine.photo_files import SourceFile, scan, sha256_file
from fundus_engine.quality import QUALITY_SIDE, downscaled, field_of_view, grade_quality
from fundus_engine.models import ImageRecord, LabelBox, Point, Reject
from fundus_engine.synth import generate, render
from fundus_engine.vocabulary import DR

CONFIG = IngestConfig()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Four good synthetic photographs (two patients) with a full labels.json."""
    root = tmp_path_factory.mktemp("ingest-src")
    generate(root, 4, seed=1, size=256, full_labels=True)
    return root


@pytest.fixture
def workdir(source, tmp_path) -> Path:
    root = tmp_path / "in"
    shutil.copytree(source, root)
    return root


def _first(root: Path) -> Path:
    return sorted((root / "images").glob("synth_*.jpg"))[0]


def _fields(entry: dict) -> dict:
    """A label entry's fields, without `_from` (where in the manifest it came from)."""
    return {k: v for k, v in entry.items() if k != "_from"}


# ------------------------------------------------------------------ scan

def test_scan_lists_images_by_content_hash(workdir):
    (workdir / "notes.txt").write_text("not an image extension")
    (workdir / ".hidden").mkdir()
    shutil.copy(_first(workdir), workdir / ".hidden" / "x.jpg")
    shutil.copy(_first(workdir), workdir / "images" / ".dotfile.jpg")
    (workdir / "out").mkdir()
    cv2.imwrite(str(workdir / "out" / "written_by_a_run.png"), np.zeros((8, 8, 3), np.uint8))

    sources, rejects = scan(workdir, exclude=[workdir / "out"])
    assert rejects == []
    assert [s.relpath for s in sources] == [f"images/synth_s1_{i:05d}_{'OD' if i % 2 == 0 else 'OS'}.jpg"
                                            for i in range(4)]
    for s in sources:
        data = (workdir / s.relpath).read_bytes()
        assert s.sha256 == hashlib.sha256(data).hexdigest() == sha256_file(workdir / s.relpath)
    assert len({s.sha256 for s in sources}) == 4


def test_scan_of_a_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        scan(tmp_path / "nowhere")


def test_duplicates_are_rejected_keeping_the_labelled_copy(workdir):
    original = _first(workdir)
    shutil.copy(original, workdir / "a_copy.jpg")  # sorts before images/..., so it would win by path
    labels, _ = load_labels(workdir, CONFIG)

    sources, rejects = scan(workdir, labelled=lambda rel: labels_for(rel, labels) is not None)
    kept = "images/" + original.name
    assert kept in [s.relpath for s in sources] and "a_copy.jpg" not in [s.relpath for s in sources]
    assert len(sources) == 4
    assert rejects == [Reject(stage="ingest", item=str(workdir / "a_copy.jpg"), reason=f"duplicate: same bytes as {kept}")]


def test_duplicates_without_labels_keep_the_first_by_path(workdir):
    original = _first(workdir)
    shutil.copy(original, workdir / "a_copy.jpg")
    sources, rejects = scan(workdir)
    assert "a_copy.jpg" in [s.relpath for s in sources]
    assert [(Path(r.item).name, r.reason) for r in rejects] == [
        (original.name, "duplicate: same bytes as a_copy.jpg")]


# ------------------------------------------------------------------ bad files

def test_bad_files_are_rejected_with_name_and_reason_and_good_ones_go_on(workdir):
    images = workdir / "images"
    (images / "notes.jpg").write_text("this is not an image")
    (images / "empty.png").write_bytes(b"")
    colour = cv2.imread(str(_first(workdir)))
    cv2.imwrite(str(images / "gray.png"), cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(images / "gray3.png"), cv2.cvtColor(cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR))
    cv2.imwrite(str(images / "tiny.png"), np.full((64, 100, 3), (40, 80, 200), np.uint8))
    no_retina = np.zeros((300, 300, 3), np.uint8)
    no_retina[:60, :60] = (40, 80, 200)  # 4% of the frame is not black
    cv2.imwrite(str(images / "no_retina.png"), no_retina)

    labels, label_rejects = load_labels(workdir, CONFIG)
    sources, scan_rejects = scan(workdir)
    records, rejects = ingest(workdir, sources, labels, CONFIG)
    assert label_rejects == [] and scan_rejects == []

    reasons = {Path(r.item).name: r.reason for r in rejects}
    assert set(reasons) == {"notes.jpg", "empty.png", "gray.png", "gray3.png", "tiny.png", "no_retina.png"}
    assert all(r.stage == "ingest" and r.item == str(workdir / "images" / Path(r.item).name) for r in rejects)
    assert reasons["notes.jpg"] == "cannot decode: not an image or a corrupt file"
    assert reasons["empty.png"] == "cannot decode: not an image or a corrupt file"
    assert reasons["gray.png"].startswith("grayscale image (no colour in any channel)")
    assert reasons["gray3.png"].startswith("grayscale image (no colour in any channel)")
    assert reasons["tiny.png"] == "too small: 100x64, shorter side must be >= 256 px"
    assert reasons["no_retina.png"] == "no retina visible: field of view covers 4% of the frame"

    assert [r.relpath for r in records] == [s.relpath for s in sources if s.relpath.startswith("images/synth_")]
    first = records[0]
    assert isinstance(first, ImageRecord)
    assert (first.width, first.height) == (256, 256)
    assert first.path == str((workdir / first.relpath).resolve())
    assert first.sha256 == sha256_file(workdir / first.relpath)
    # Labels from the manifest are attached.
    assert (first.patient_id, first.laterality) == (patient_pseudonym("S1-P00000"), "OD")
    assert first.diagnosis == "Normal fundus" and first.dr_grade == 0 and first.grade == "No diabetic retinopathy"
    assert first.disc is not None and first.fovea is not None and first.disc.x > first.fovea.x
    assert [b.label for b in first.label_boxes] == ["optic_disc", "optic_cup", "fovea"]


def test_min_side_is_configurable(workdir):
    sources, _ = scan(workdir)
    result = ingest_image(workdir, sources[0], None, IngestConfig(min_side=300))
    assert isinstance(result, Reject) and result.reason == "too small: 256x256, shorter side must be >= 300 px"
    assert isinstance(ingest_image(workdir, sources[0], None, IngestConfig(min_side=256)), ImageRecord)


def test_decode_accepts_rgba_and_16_bit_images(tmp_path):
    rgb, _ = render(0, 0, 256)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(tmp_path / "rgba.png"), cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(tmp_path / "deep.png"), bgr.astype(np.uint16) * 257)
    assert np.array_equal(decode(tmp_path / "rgba.png"), rgb)
    deep = decode(tmp_path / "deep.png")
    assert deep.dtype == np.uint8 and deep.shape == rgb.shape
    assert np.abs(deep.astype(int) - rgb).max() <= 3
    # Channel order is RGB: the synthetic fundus is red.
    assert deep[..., 0].mean() > deep[..., 2].mean() * 2


# ------------------------------------------------------------------ labels manifest

def test_load_labels_from_the_synthetic_json(source):
    labels, rejects = load_labels(source, CONFIG)
    assert rejects == []
    assert list(labels) == [f"images/synth_s1_{i:05d}_{'OD' if i % 2 == 0 else 'OS'}.jpg" for i in range(4)]
    truth = json.loads((source / "labels.json").read_text())["images"]
    for entry in truth:
        got = labels[entry["image"]]
        assert got["patient_id"] == patient_pseudonym(entry["patient_id"]) and got["laterality"] == entry["laterality"]
        assert got["dr_grade"] == entry["dr_grade"] and got["grade"] == entry["grade"]
        assert got["disc"] == Point(x=entry["disc"][0], y=entry["disc"][1])
        assert got["label_boxes"] == [LabelBox(label=b["label"], xyxy=b["xyxy"]) for b in entry["boxes"]]


def test_load_labels_from_an_aptos_csv(tmp_path):
    (tmp_path / "labels.csv").write_text("id_code,diagnosis\n000c1434d8d7,2\n001639a390f0,0\n0024cdab0c1e,4\n")
    labels, rejects = load_labels(tmp_path, CONFIG)
    assert rejects == []
    assert _fields(labels["000c1434d8d7"]) == {"dr_grade": 2, "grade": "Moderate non-proliferative diabetic retinopathy",
                                      "diagnosis": DR, "label_boxes": []}
    assert _fields(labels["001639a390f0"]) == {"dr_grade": 0, "grade": "No diabetic retinopathy", "label_boxes": []}
    assert labels["0024cdab0c1e"]["grade"] == "Proliferative diabetic retinopathy"
    # APTOS names images by bare id: found from the file's path.
    assert labels_for("train_images/000c1434d8d7.png", labels)["dr_grade"] == 2
    assert labels_for("train_images/ffffffffffff.png", labels) is None


def test_load_labels_csv_with_laterality_points_and_alias_boxes(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text(
        "filename,patient_id,laterality,dr_grade,disc,boxes\n"
        'a.jpg,P1,right,1,"[10, 20]","[{""label"": ""EX"", ""xyxy"": [1, 2, 3, 4]}]"\n'
        "b.jpg,P1,L,,,\n")
    labels, rejects = load_labels(tmp_path, IngestConfig(labels="manifest.csv"))
    assert rejects == []
    assert _fields(labels["a.jpg"]) == {"patient_id": patient_pseudonym("P1"), "laterality": "OD", "dr_grade": 1, "diagnosis": DR,
                               "grade": "Mild non-proliferative diabetic retinopathy", "disc": Point(x=10, y=20),
                               "label_boxes": [LabelBox(label="hard_exudate", xyxy=[1, 2, 3, 4])],
                               "labelled_classes": ["hard_exudate"]}
    assert _fields(labels["b.jpg"]) == {"patient_id": patient_pseudonym("P1"), "laterality": "OS", "label_boxes": []}  # no boxes given


def test_boxes_field_marks_images_annotated_for_every_class_boxed_in_the_manifest(tmp_path):
    """IDRiD-like: the manifest boxes exudates and haemorrhages; an image with "boxes": [] is
    annotated and clean of both, an image with no boxes field says nothing about lesions."""
    (tmp_path / "labels.json").write_text(json.dumps([
        {"image": "a.jpg", "boxes": [{"label": "EX", "xyxy": [1, 2, 3, 4]}]},
        {"image": "b.jpg", "boxes": [{"label": "HE", "xyxy": [1, 2, 3, 4]}]},
        {"image": "clean.jpg", "boxes": []},
        {"image": "graded.jpg", "dr_grade": 2},
    ]))
    labels, rejects = load_labels(tmp_path, CONFIG)
    assert rejects == []
    assert labels["a.jpg"]["labelled_classes"] == ["haemorrhage", "hard_exudate"]
    assert labels["clean.jpg"]["labelled_classes"] == ["haemorrhage", "hard_exudate"]
    assert "labelled_classes" not in labels["graded.jpg"]
    declared, _ = load_labels(tmp_path, IngestConfig(annotated_classes=["EX", "HE", "MA", "SE", "OD"]))
    assert declared["clean.jpg"]["labelled_classes"] == ["haemorrhage", "hard_exudate", "microaneurysm",
                                                         "optic_disc", "soft_exudate"]


def test_diagnosis_names_are_mapped_onto_one_vocabulary(tmp_path):
    (tmp_path / "labels.csv").write_text(
        "image,diagnosis\na.jpg,dr\nb.jpg,ARMD\nc.jpg,macular edema\nd.jpg,Proliferative diabetic retinopathy\n"
        "e.jpg,No diabetic retinopathy\nf.jpg,Retinitis pigmentosa\n")
    labels, rejects = load_labels(tmp_path, CONFIG)
    assert rejects == []
    assert {k: v.get("diagnosis") for k, v in labels.items()} == {
        "a.jpg": DR, "b.jpg": "Age-related macular degeneration", "c.jpg": "Macular oedema", "d.jpg": DR,
        "e.jpg": None, "f.jpg": "Retinitis pigmentosa"}  # unknown names are kept as given
    assert (labels["d.jpg"]["dr_grade"], labels["d.jpg"]["grade"]) == (4, "Proliferative diabetic retinopathy")
    assert (labels["e.jpg"]["dr_grade"], labels["e.jpg"]["grade"]) == (0, "No diabetic retinopathy")


def test_bad_label_fields_are_rejected_alone_naming_file_entry_and_field(tmp_path):
    """The entry keeps its other fields (its patient above all: see tests/test_hostile_inputs.py)."""
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"images": [
        {"image": "ok.jpg", "dr_grade": 3},
        {"image": "grade.jpg", "patient_id": "P2", "dr_grade": 7},
        {"image": "eye.jpg", "laterality": "both", "dr_grade": 1},
        {"image": "box.jpg", "boxes": [{"label": "tumour", "xyxy": [0, 0, 1, 1]}], "laterality": "L"},
        {"diagnosis": "Glaucoma"},
    ]}))
    labels, rejects = load_labels(tmp_path, CONFIG)
    assert list(labels) == ["ok.jpg", "grade.jpg", "eye.jpg", "box.jpg"]
    assert labels["ok.jpg"]["grade"] == "Severe non-proliferative diabetic retinopathy"
    assert _fields(labels["grade.jpg"]) == {"patient_id": patient_pseudonym("P2"), "label_boxes": []}
    assert labels["eye.jpg"]["dr_grade"] == 1 and "laterality" not in labels["eye.jpg"]
    assert labels["box.jpg"]["label_boxes"] == [] and labels["box.jpg"]["laterality"] == "OS"
    items = [r.item for r in rejects]
    assert items == [f"{path} entry 2 (grade.jpg)", f"{path} entry 3 (eye.jpg)", f"{path} entry 4 (box.jpg)",
                     f"{path} entry 5"]
    reasons = [r.reason for r in rejects]
    assert reasons[0] == "dr_grade: 7 is outside 0-4"
    assert reasons[1] == "laterality: 'both' is not OD/OS/left/right"
    assert reasons[2].startswith("boxes[0].label: unknown class name 'tumour'")
    assert reasons[3].startswith("label entry names no image")


def test_malformed_json_manifest_is_one_reject_naming_the_file(tmp_path):
    (tmp_path / "labels.json").write_text('{"images": [ {"image": "a.jpg",, } ]')
    labels, rejects = load_labels(tmp_path, CONFIG)
    assert labels == {} and [r.item for r in rejects] == [str(tmp_path / "labels.json")]
    assert rejects[0].reason.startswith("not valid JSON: ") and rejects[0].reason.endswith("; no labels used")


def test_missing_manifest_is_an_error_naming_the_path_and_absent_default_is_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "grades.csv")):
        load_labels(tmp_path, IngestConfig(labels="grades.csv"))
    assert load_labels(tmp_path, CONFIG) == ({}, [])


@pytest.mark.parametrize("name,content", [
    ("labels.json", json.dumps({"files": []})),  # object without "images"
    ("labels.json", "null"),
    ("labels.json", json.dumps({"images": {"a.jpg": {"dr_grade": 1}}})),  # "images" is not a list
    ("labels.csv", bytes(range(256))),  # not text
], ids=["no-images-key", "null", "images-not-a-list", "binary-csv"])
def test_every_malformed_manifest_is_one_reject_naming_the_file(tmp_path, name, content):
    """The README promises bad entries are rejected, not that the run stops: the build goes on
    without labels, and the reject says why."""
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    labels, rejects = load_labels(tmp_path, CONFIG)
    assert labels == {} and [(r.stage, r.item) for r in rejects] == [("ingest", str(path))]
    assert rejects[0].reason.endswith("no labels used")


def test_an_entry_that_is_not_an_object_is_rejected_alone(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps([{"image": "a.jpg", "dr_grade": 1}, "b.jpg", 3]))
    labels, rejects = load_labels(tmp_path, CONFIG)
    assert list(labels) == ["a.jpg"]
    assert [r.item for r in rejects] == [f"{path} entry 2", f"{path} entry 3"]


def test_csv_with_a_byte_order_mark_is_read(tmp_path):
    (tmp_path / "labels.csv").write_text("\ufeffid_code,diagnosis\nabc,2\n", encoding="utf-8")
    labels, rejects = load_labels(tmp_path, CONFIG)
    assert rejects == [] and labels["abc"]["dr_grade"] == 2


# ------------------------------------------------------------------ quality

def measure_quality(rgb: np.ndarray, config: IngestConfig):
    """Quality as ingest measures it: on the photograph's QUALITY_SIDE copy."""
    return grade_quality(downscaled(rgb, QUALITY_SIDE), config)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return render(0, 0, 512)[0]


def test_synthetic_photo_is_good_with_plausible_field_of_view(photo):
    q = measure_quality(photo, CONFIG)
    assert q.grade == "good"
    # The synthetic field of view is a circle of radius 0.47 of the frame: pi * 0.47^2 = 0.694.
    assert q.fov_coverage == pytest.approx(np.pi * 0.47 ** 2, abs=0.02)
    assert 0.25 < q.exposure < 0.45
    assert q.sharpness > 3 * CONFIG.min_sharpness
    assert field_of_view(photo).mean() == pytest.approx(q.fov_coverage, abs=0.01)


def test_a_dim_scanned_film_border_is_not_counted_as_retina(photo):
    """STARE's photographs are scanned film: the border around the field is dark green, 25-45 in
    the brightest channel, not black. The coverage is the field's either way."""
    border = ~field_of_view(photo)
    film = photo.copy()
    film[border] = (14, 38, 12)  # RGB: dim green, above a fixed threshold of 25
    assert border.mean() > 0.25
    assert measure_quality(film, CONFIG).fov_coverage == pytest.approx(measure_quality(photo, CONFIG).fov_coverage,
                                                                       abs=0.01)


def test_blur_lowers_sharpness(photo):
    sharp = measure_quality(photo, CONFIG)
    soft = measure_quality(cv2.GaussianBlur(photo, (0, 0), 2), CONFIG)
    softer = measure_quality(cv2.GaussianBlur(photo, (0, 0), 4), CONFIG)
    assert softer.sharpness < soft.sharpness < sharp.sharpness / 4
    assert softer.grade == "poor" and softer.sharpness < CONFIG.min_sharpness
    assert soft.exposure == pytest.approx(sharp.exposure, abs=0.03)


def test_overexposed_and_underexposed_photos_are_flagged(photo):
    retina = field_of_view(photo)
    bright = photo.astype(int)
    bright[retina] += 180
    over = measure_quality(np.clip(bright, 0, 255).astype(np.uint8), CONFIG)
    assert over.exposure > 0.85 and over.grade == "poor"
    assert over.sharpness > 3 * CONFIG.min_sharpness  # poor for its exposure, not its focus
    assert over.fov_coverage == pytest.approx(measure_quality(photo, CONFIG).fov_coverage, abs=0.01)
    slightly = photo.astype(int)
    slightly[retina] += 120
    assert measure_quality(np.clip(slightly, 0, 255).astype(np.uint8), CONFIG).grade == "usable"
    under = measure_quality((photo * 0.3).astype(np.uint8), CONFIG)
    assert under.exposure < 0.12 and under.grade == "poor"


def test_quality_is_scale_invariant_enough(photo):
    big = cv2.resize(photo, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    q_big, q = measure_quality(big, CONFIG), measure_quality(photo, CONFIG)
    assert q_big.fov_coverage == pytest.approx(q.fov_coverage, abs=0.02)
    assert q_big.exposure == pytest.approx(q.exposure, abs=0.02)


def test_a_file_that_vanished_after_the_scan_is_a_reject_not_an_exception(tmp_path):
    result = ingest_image(tmp_path, SourceFile("gone.jpg", "0" * 64), None, CONFIG)
    assert isinstance(result, Reject) and result.item == str(tmp_path / "gone.jpg")
    assert "No such file or directory" in result.reason


def test_exif_orientation_is_applied_like_every_other_reader(tmp_path):
    """Boxes from ultralytics and crops from ingest must share one frame."""
    from PIL import Image

    wide = np.zeros((300, 500, 3), np.uint8)
    wide[..., 0], wide[40:80, 400:460] = 180, (250, 240, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    Image.fromarray(wide).save(tmp_path / "rotated.jpg", exif=exif)
    rgb = decode(tmp_path / "rotated.jpg")
    assert rgb.shape[:2] == cv2.imread(str(tmp_path / "rotated.jpg")).shape[:2] == (500, 300)


def test_a_bare_name_shared_by_two_images_labels_neither(tmp_path):
    from fundus_engine.labels import ambiguous_keys

    labels = {"001.jpg": {"diagnosis": "Glaucoma"}, "b/002.jpg": {"diagnosis": "Normal fundus"}, "003": {}}
    relpaths = ["a/001.jpg", "b/001.jpg", "b/002.jpg", "c/003.png"]
    ambiguous = ambiguous_keys(relpaths, labels)
    assert ambiguous == {"001.jpg"}
    assert labels_for("a/001.jpg", labels, ambiguous) is None and labels_for("b/001.jpg", labels, ambiguous) is None
    assert labels_for("b/002.jpg", labels, ambiguous) == {"diagnosis": "Normal fundus"}
    assert labels_for("c/003.png", labels, ambiguous) == {}


def test_a_path_from_a_folder_below_the_input_names_its_image_unless_two_share_it():
    """A manifest beside the images (`images/labels.csv`, paths from there) labels the input's
    `images/...`; a sub-path two images share labels neither."""
    from fundus_engine.labels import ambiguous_keys

    labels = {"EyePACS/16_left.jpeg": {"dr_grade": 4}, "site/x.jpg": {"dr_grade": 0}}
    relpaths = ["images/EyePACS/16_left.jpeg", "a/site/x.jpg", "b/site/x.jpg"]
    ambiguous = ambiguous_keys(relpaths, labels)
    assert ambiguous == {"site/x.jpg"}
    assert labels_for("images/EyePACS/16_left.jpeg", labels, ambiguous) == {"dr_grade": 4}
    assert labels_for("a/site/x.jpg", labels, ambiguous) is None and labels_for("b/site/x.jpg", labels, ambiguous) is None
    # the image whose whole path it is keeps it; another whose path ends with it does not take it
    relpaths = ["site/x.jpg", "backup/site/x.jpg"]
    ambiguous = ambiguous_keys(relpaths, labels)
    assert labels_for("site/x.jpg", labels, ambiguous) == {"dr_grade": 0}
    assert labels_for("backup/site/x.jpg", labels, ambiguous) is None
