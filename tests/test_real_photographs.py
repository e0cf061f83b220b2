"""A default build on real photographs (../shared/real_fundus, never copied into the project):
no record denies a lesion or calls the eye normal where the labels show disease, the disc and
fovea are found where they are, and the build says plainly that the demo detector is out of
its domain."""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from flows.build_fundusgen import build_fundusgen
from fundus_engine.config import BuildConfig
from fundus_engine.models import Anatomy, Expansion, ImageRecord, InstructionRecord, Region
from fundus_engine.tables import read_rows
from fundus_engine.vocabulary import DR_GRADES, NORMAL

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "real_fundus"
pytestmark = pytest.mark.usefixtures("prefect_local")  # ../shared/real_fundus missing is a failure, not a skip

# Words a record would use to deny a lesion or call the eye healthy.
DENIAL = re.compile(r"\bno lesion is seen\b|\babsent:|\bthe absence of\b|^no\b|normal fundus|no diabetic retinopathy",
                    re.I | re.M)


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "out"
    manifest = build_fundusgen(str(REAL / "images"), str(out), BuildConfig(shard_size=24))
    return out, manifest


def _diseased(images: list[ImageRecord]) -> set[str]:
    """IDRiD photographs are all of DR patients (with hard-exudate masks); EyePACS by grade >= 1."""
    grades = {row["image"]: int(row["dr_grade"]) for row in csv.DictReader(open(REAL / "images" / "labels.csv"))}
    return {i.sha256 for i in images if i.relpath.startswith("IDRiD/") or grades.get(i.relpath, 0) >= 1}


def test_every_real_photograph_is_accepted_and_counted_as_real(build):
    out, manifest = build
    images = read_rows(sorted((out / "stages" / "ingest").glob("*.images.parquet")), ImageRecord)
    assert len(images) == 69 and manifest["rejects"] == 0
    assert not any(i.synthetic for i in images)


def test_the_records_name_the_photographs_by_content_as_eyepacs_files_are_named_by_patient(build):
    """EyePACS names its photographs `<patient>_<side>.jpeg`, the patient number labels.csv gives:
    by default (`write.image_paths: auto`) the records name hash-named copies, not those files."""
    out, manifest = build
    assert manifest["labels"]["identifiers_in_paths"] == 8 and manifest["image_paths"] == "content"
    records = read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)
    assert {Path(r.source_image_path).parent for r in records} == {out / "images"}
    assert not any("EyePACS" in r.source_image_path or "EyePACS" in r.image_path for r in records)


def test_no_record_denies_a_lesion_or_calls_a_diseased_eye_normal(build):
    out, _ = build
    images = read_rows(sorted((out / "stages" / "ingest").glob("*.images.parquet")), ImageRecord)
    diseased = _diseased(images)
    assert len(diseased) == 24  # 20 IDRiD + 4 EyePACS with DR grade >= 1
    relpath = {i.sha256: i.relpath for i in images}  # the records name copies by content hash (below)
    records = read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)
    on_diseased = [r for r in records if r.sha256 in diseased]
    assert on_diseased
    for r in on_diseased:
        answers = "\n".join(t.value for t in r.conversations if t.from_ == "gpt")
        assert not DENIAL.search(answers), (relpath[r.sha256], r.task, answers)
        assert r.diagnosis != NORMAL and r.grade != DR_GRADES[0]
    # Without labels nothing grounds a diagnosis: the unlabelled photographs get none, and say so.
    unlabelled_idrid = [r for r in on_diseased if relpath[r.sha256].startswith("IDRiD/")]
    assert {r.task for r in unlabelled_idrid}.isdisjoint({"disease_diagnosis", "severity_grading", "finding_presence"})
    chains = [r for r in unlabelled_idrid if r.task == "cognitive_chain"]
    assert len(chains) == 20
    assert all("diagnosis: not determined from the evidence available" in r.conversations[1].value for r in chains)
    # Labelled grades still give diagnosis and grading records.
    graded = {Path(relpath[r.sha256]).name: r.conversations[1].value for r in records if r.task == "severity_grading"}
    assert graded["16_right.jpeg"].startswith(DR_GRADES[4]) and graded["10_left.jpeg"].startswith(DR_GRADES[0])


def test_the_disc_used_by_the_records_is_inside_the_idrid_disc_mask(build):
    out, _ = build
    images = {i.sha256: i for i in read_rows(sorted((out / "stages" / "ingest").glob("*.images.parquet")), ImageRecord)}
    anatomies = read_rows(sorted((out / "stages" / "crop").glob("*.anatomy.parquet")), Anatomy)
    # a disc stated on 60 of 69 (61 now): the localiser's unsure ones are left unsaid (below)
    assert sum(a.disc_centre is not None for a in anatomies) >= 60
    boxes = {r.sha256: r.xyxy for r in read_rows(sorted((out / "stages" / "crop").glob("*.regions.parquet")), Region)
             if r.label == "optic_disc"}
    inside, overlaps = 0, []
    for a in anatomies:
        relpath = images[a.sha256].relpath
        if not relpath.startswith("IDRiD/") or a.disc_centre is None:
            continue
        mask = cv2.imread(str(REAL / "masks" / "IDRiD" / f"{Path(relpath).stem}__optic_disc.png"), cv2.IMREAD_GRAYSCALE)
        inside += bool(mask[int(a.disc_centre.y), int(a.disc_centre.x)] > 127)
        ys, xs = np.nonzero(mask > 127)  # the box the records state against the mask's
        (x1, y1, x2, y2), (u1, v1, u2, v2) = boxes[a.sha256], (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        both = max(0, min(x2, u2) - max(x1, u1)) * max(0, min(y2, v2) - max(y1, v1))
        overlaps.append(both / ((x2 - x1) * (y2 - y1) + (u2 - u1) * (v2 - v1) - both))
    assert inside >= 19
    # IoU: median 0.78, two under 0.5 (IDRiD_17 and _01, centred on the pale temporal cup: README)
    assert len(overlaps) == 20 and sum(o >= 0.5 for o in overlaps) >= 18 and np.median(overlaps) >= 0.7
    assert all(a.laterality_source in ("label", "inferred", "conflict", "unknown") for a in anatomies)
    assert sum(a.laterality_source == "inferred" for a in anatomies) >= 52  # 61 unlabelled, 54 with a disc stated


def test_the_build_says_the_demo_detector_is_out_of_its_domain(build):
    out, manifest = build
    domain = manifest["detector_domain"]
    assert domain["out_of_domain"] and domain["images"] == {"real": 69}
    assert sum(domain["disc_source"]["real"].values()) == 69
    assert "Remedy: train a detector on labelled real photographs" in domain["warning"]
    assert domain["warning"] in (out / "card" / "README.md").read_text()
    assert manifest["detector"]["trusted_on"]["real"] == []


# Where the disc and fovea are on photographs the localiser got wrong, placed by eye on review: the
# disc where the vessel mask's trunks converge (DRIVE and STARE vessel masks), the fovea at the
# darkest spot of the macula with its reflex. Their localiser scores were 0.14-0.51.
REVIEWED = {
    "DRIVE/34_training.tif": {"disc": (376, 220)},
    "STARE/im0001.jpg": {"disc": (250, 1380)},
    "STARE/im0005.jpg": {"disc": (2250, 1550), "fovea": (1050, 1720)},
    "STARE/im0081.jpg": {"disc": (255, 1120)},
    "STARE/im0077.jpg": {"fovea": (1870, 1480)},
    "EyePACS/10_right.jpeg": {"fovea": (2300, 1610)},
    "DRIVE/39_training.tif": {"disc": (108, 265)},  # a pale halo drew the localiser's region up and out
}


def test_a_landmark_is_stated_where_it_is_or_not_at_all(build):
    """On the reviewed photographs, each record's disc or fovea box holds the reviewed point, or the
    records do not state that landmark (and then no eye side is inferred from it)."""
    out, _ = build
    images = {i.relpath: i.sha256 for i in read_rows(sorted((out / "stages" / "ingest").glob("*.images.parquet")),
                                                     ImageRecord)}
    anatomies = {a.sha256: a for a in read_rows(sorted((out / "stages" / "crop").glob("*.anatomy.parquet")), Anatomy)}
    boxes = {}
    for record in read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord):
        for box in record.boxes:
            boxes.setdefault((record.sha256, box.label), set()).add(tuple(box.box_999))
    for relpath, points in REVIEWED.items():
        sha256 = images[relpath]
        anat = anatomies[sha256]
        for landmark, (x, y) in points.items():
            label = {"disc": "optic_disc", "fovea": "fovea"}[landmark]
            centre = anat.disc_centre if landmark == "disc" else anat.fovea_centre
            stated = boxes.get((sha256, label), set())
            if centre is None:
                assert not stated, (relpath, landmark, stated)
                continue
            # a stated landmark within 0.3 of its disc diameter of the reviewed point (read by eye)
            assert math.dist((centre.x, centre.y), (x, y)) <= 0.3 * anat.disc_diameter_px, (relpath, landmark, centre)
        if anat.disc_centre is None:
            assert anat.laterality_source in ("label", "unknown"), relpath


def test_field_of_view_coverage_matches_the_masks_and_leaves_out_film_borders(build):
    """The coverage the records state ("a field of view covering N% of the frame"):
    within a point of DRIVE's field-of-view masks, and on STARE's scanned film (a dim green
    border, not black) the retina's 72-80%, not the 77-96% a fixed threshold gave."""
    out, _ = build
    images = read_rows(sorted((out / "stages" / "ingest").glob("*.images.parquet")), ImageRecord)
    drive = [i for i in images if i.relpath.startswith("DRIVE/")]
    assert len(drive) == 20
    for image in drive:
        mask = cv2.imread(str(REAL / "masks" / "DRIVE" / f"{Path(image.relpath).stem}__field_of_view.png"),
                          cv2.IMREAD_GRAYSCALE)
        assert image.quality.fov_coverage == pytest.approx(float((mask > 127).mean()), abs=0.01), image.relpath
    stare = {i.relpath: i.quality.fov_coverage for i in images if i.relpath.startswith("STARE/")}
    assert len(stare) == 10 and all(0.65 <= c <= 0.82 for c in stare.values()), stare


def test_a_mirrored_photograph_is_not_given_the_side_its_label_says(build):
    """EyePACS patient 16's photographs show the disc on the side opposite their OD/OS labels
    (mirrored captures, which EyePACS warns of): a record calling the picture of a right eye a
    left eye would teach the wrong side, so no record names either, and the conflict is kept."""
    out, _ = build
    images = {i.sha256: i for i in read_rows(sorted((out / "stages" / "ingest").glob("*.images.parquet")), ImageRecord)}
    anatomies = read_rows(sorted((out / "stages" / "crop").glob("*.anatomy.parquet")), Anatomy)
    mirrored = {a.sha256 for a in anatomies if a.laterality_source == "conflict"}
    assert {images[s].relpath for s in mirrored} == {"EyePACS/16_left.jpeg", "EyePACS/16_right.jpeg"}
    records = [r for r in read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)
               if r.sha256 in mirrored]
    # grade-only: their grade, diagnosis and landmark records, no report or chain to reason in
    assert len(records) >= 12
    overviews = [e.image.overview for e in read_rows(sorted((out / "stages" / "expand").glob("*.expansions.parquet")),
                                                     Expansion) if e.sha256 in mirrored]
    assert len(overviews) == 2
    for task, text in [*((r.task, " ".join(t.value for t in r.conversations)) for r in records),
                       *(("overview", o) for o in overviews)]:
        assert not re.search(r"\b(right|left) eye\b|\b(OD|OS)\b", text), (task, text[:300])


def test_no_quality_grade_is_stated_on_real_photographs(build):
    """The grade's thresholds were set on synthetic photographs; on these it called every one
    "good", the out-of-focus STARE im0004 and the hazy EyePACS 10_right included."""
    out, _ = build
    records = read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)
    said = [r.record_id for r in records if re.search(r"\b(good|usable|poor) quality\b",
                                                      " ".join(t.value for t in r.conversations))]
    assert records and said == []
