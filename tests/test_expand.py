"""fundus_engine.expand: the offline knowledge-grounded expander and the diagnosis rules."""
from __future__ import annotations

import hashlib
import re
import shutil
from collections import Counter

import pytest

import fundus_engine
from fundus_engine.config import ExpandConfig
from fundus_engine.crop import box_999, region_facts
from fundus_engine.evidence import DOMAINS, DetectorEvidence
from fundus_engine.expand import (GLAUCOMA_CUP_TO_DISC, OfflineExpander, expand, infer_diagnosis,
                                  make_expander)
from fundus_engine.models import Anatomy, Expansion, ImageRecord, Point, Quality, Region
from fundus_engine.prompts import PROMPTS_DIR
from fundus_engine.vocabulary import AMD, BY_NAME, CLASS_NAMES, DR, DR_GRADES, GLAUCOMA, LESIONS, NORMAL

SHA = "ab" * 32
QUALITY = Quality(sharpness=40.0, exposure=0.3, fov_coverage=0.69, grade="good")
# A right eye, 400 x 400 px: disc of 100 px diameter at (350, 250), fovea at (100, 250).
ANATOMY = Anatomy(sha256=SHA, laterality="OD", laterality_source="label", disc_centre=Point(x=350, y=250),
                  disc_diameter_px=100.0, fovea_centre=Point(x=100, y=250), cup_to_disc=0.35)

# How the findings text names each lesion (the test's own oracle).
MENTIONS = {
    "microaneurysm": r"micro-?aneurysm",
    "haemorrhage": r"ha?emorrhag",
    "hard_exudate": r"hard exudat",
    "soft_exudate": r"cotton[- ]wool|soft exudat",
    "drusen": r"\bdrus(?:en|e)\b",
    "neovascularisation": r"neovasculari[sz]ation|new vessels",
}


def trusting(lesions) -> DetectorEvidence:
    """A detector validated on every class for both kinds of photograph, trusted on `lesions`."""
    return DetectorEvidence(validated={d: list(CLASS_NAMES) for d in DOMAINS},
                            trusted={d: list(lesions) for d in DOMAINS})



def _record(**kw) -> ImageRecord:
    base = dict(sha256=SHA, path="/data/x.jpg", relpath="x.jpg", width=400, height=400, laterality="OD",
                quality=QUALITY)
    return ImageRecord(**{**base, **kw})


def _region(n: int, label: str, xyxy: list[float], anat: Anatomy = ANATOMY,
            colour: str | None = "darker and redder") -> Region:
    return Region(sha256=anat.sha256, region_id=f"{anat.sha256[:12]}-{n:03d}", label=label,
                  display=BY_NAME[label].display, xyxy=xyxy, box_999=box_999(xyxy, 400, 400), confidence=0.9,
                  source="model", crop_path=f"/crops/{n}.jpg", marked_path=None, mean_rgb=[150, 30, 20],
                  colour=colour, **region_facts(xyxy, anat))


def _anatomy_regions() -> list[Region]:
    return [_region(0, "optic_disc", [300, 200, 400, 300], colour="pale yellow"),
            _region(1, "optic_cup", [332, 232, 367, 267], colour="white"),
            _region(2, "fovea", [75, 225, 125, 275])]


def _lesions() -> list[Region]:
    return [_region(3, "microaneurysm", [130, 170, 150, 190]),  # 0.81 DD from the fovea at 1 o'clock
            _region(4, "microaneurysm", [40, 330, 46, 336]),
            _region(5, "haemorrhage", [20, 260, 80, 300], colour="darker")]


@pytest.fixture(scope="module")
def expander() -> OfflineExpander:
    """As with a detector whose held-out mAP50 makes it trusted on every lesion class."""
    return OfflineExpander(ExpandConfig(), evidence=trusting(LESIONS))


# ------------------------------------------------------------------ infer_diagnosis

@pytest.mark.parametrize("counts,cdr,expected", [
    ({}, None, (NORMAL, None, [])),  # the expander adds the lesions assessed absent
    ({}, 0.59, (NORMAL, None, [])),
    ({"microaneurysm": 3}, None, (DR, DR_GRADES[1], ["3 microaneurysms"])),
    ({"microaneurysm": 1}, None, (DR, DR_GRADES[1], ["1 microaneurysm"])),
    ({"haemorrhage": 2, "microaneurysm": 1}, None, (DR, DR_GRADES[2], ["2 haemorrhages", "1 microaneurysm"])),
    ({"hard_exudate": 1}, None, (DR, DR_GRADES[2], ["1 hard exudate"])),
    ({"soft_exudate": 1, "haemorrhage": 3}, None, (DR, DR_GRADES[2], ["3 haemorrhages", "1 cotton-wool spot"])),
    ({"soft_exudate": 2, "haemorrhage": 4}, None, (DR, DR_GRADES[3], ["4 haemorrhages", "2 cotton-wool spots"])),
    ({"haemorrhage": 8}, None, (DR, DR_GRADES[3], ["8 haemorrhages"])),
    ({"neovascularisation": 1, "microaneurysm": 5, "haemorrhage": 9}, None,
     (DR, DR_GRADES[4], ["1 neovascularisation at the disc"])),
    ({"drusen": 5}, None, (AMD, None, ["5 drusen around the macula"])),
    ({"drusen": 2}, 0.8, (AMD, None, ["2 drusen around the macula"])),  # drusen outrank the cup
    ({"drusen": 2, "microaneurysm": 1}, None, (DR, DR_GRADES[1], ["1 microaneurysm"])),  # DR outranks drusen
    ({}, GLAUCOMA_CUP_TO_DISC, (GLAUCOMA, None, ["an enlarged cup-to-disc ratio of 0.60"])),
    ({}, 0.78, (GLAUCOMA, None, ["an enlarged cup-to-disc ratio of 0.78"])),
])
def test_infer_diagnosis_rules(counts, cdr, expected):
    assert infer_diagnosis(Counter(counts), cdr) == expected


# ------------------------------------------------------------------ the offline expander

def test_offline_expansion_validates_and_states_what_was_detected(expander):
    regions = _anatomy_regions() + _lesions()
    exp = expander.expand(_record(), ANATOMY, regions)
    assert Expansion.model_validate_json(exp.model_dump_json()) == exp
    assert exp.sha256 == SHA and exp.flags == []
    image = exp.image
    # a real photograph: its quality grade is stated nowhere (calibrated on synthetic ones only)
    assert image.overview == ("A colour fundus photograph of the right eye (OD), 400x400 pixels, "
                              "with a field of view covering 69% of the frame.")
    synthetic = expander.expand(_record(synthetic=True), ANATOMY, regions).image.overview
    assert synthetic == ("A colour fundus photograph of the right eye (OD), 400x400 pixels, of good quality, "
                         "with a field of view covering 69% of the frame.")
    assert "cup-to-disc ratio of 0.35." in image.anatomy and "The fovea is visible at the centre of the macula." in image.anatomy
    assert image.positive_findings == ["2 microaneurysms, the nearest 0.7 disc diameters from the fovea",
                                       "1 haemorrhage, 0.2 disc diameters from the fovea"]
    assert image.negative_findings == ["hard exudate", "cotton-wool spot", "drusen", "neovascularisation of the disc"]
    assert (image.diagnosis, image.grade, image.diagnosis_source) == (DR, DR_GRADES[2], "inferred")
    assert image.evidence == ["1 haemorrhage", "2 microaneurysms"]


def test_findings_mention_the_lesions_present_and_not_those_absent(expander):
    exp = expander.expand(_record(), ANATOMY, _anatomy_regions() + _lesions())
    positive = " ".join(exp.image.positive_findings)
    negative = " ".join(exp.image.negative_findings)
    for label in LESIONS:
        present = label in ("microaneurysm", "haemorrhage")
        assert bool(re.search(MENTIONS[label], positive, re.I)) == present, label
        assert bool(re.search(MENTIONS[label], negative, re.I)) == (not present), label


def test_region_descriptions_carry_the_measured_facts(expander):
    regions = _anatomy_regions() + _lesions()
    exp = expander.expand(_record(), ANATOMY, regions)
    assert [d.region_id for d in exp.regions] == [r.region_id for r in regions]
    assert [d.label for d in exp.regions] == [r.label for r in regions]
    text = {d.label + str(i): d.description for i, d in enumerate(exp.regions)}
    assert text["microaneurysm3"] == (
        "A microaneurysm, about 0.20 disc diameters across, 0.7 disc diameters from the fovea at 1 o'clock, "
        "in the superonasal quadrant, darker and redder than the retina around it. Microaneurysms typically "
        "appear as tiny, sharply outlined round red dots.")  # the knowledge table's, as what is typical
    assert text["haemorrhage5"].startswith(
        "A haemorrhage, about 0.60 disc diameters across, 0.2 disc diameters from the fovea at 8 o'clock, "
        "darker than the retina around it.")  # 0.1 DD below the horizontal through the fovea: no quadrant
    # a lesion too like its surroundings to state a colour: nothing is said of it
    faint = expander.expand(_record(), ANATOMY, [_region(3, "microaneurysm", [130, 170, 150, 190], colour=None)])
    assert "than the retina" not in faint.regions[0].description
    assert faint.regions[0].description.startswith("A microaneurysm, about 0.20 disc diameters across, 0.7 disc")
    assert text["optic_disc0"] == ("The optic disc: a round, yellow-pink structure where the vessels enter the eye; "
                                   "here pale yellow and about 1.00 disc diameters across.")
    assert all(d.significance == BY_NAME[d.label].significance for d in exp.regions)


def test_without_disc_or_fovea_the_text_says_so(expander):
    bare = Anatomy(sha256=SHA, laterality="unknown", laterality_source="unknown")
    regions = [_region(3, "microaneurysm", [130, 170, 150, 190], anat=bare)]
    exp = expander.expand(_record(laterality="unknown"), bare, regions)
    assert "eye of undetermined laterality" in exp.image.overview
    assert "The optic disc was not located." in exp.image.anatomy and "The fovea was not located." in exp.image.anatomy
    assert exp.image.positive_findings == ["1 microaneurysm"]
    assert "of unmeasured size (disc not located)" in exp.regions[0].description
    assert "at an undetermined position (fovea not located)" in exp.regions[0].description


def test_no_lesions_gives_normal_with_every_finding_negative(expander):
    exp = expander.expand(_record(), ANATOMY, _anatomy_regions())
    assert (exp.image.diagnosis, exp.image.grade, exp.image.diagnosis_source) == (NORMAL, None, "inferred")
    assert exp.image.positive_findings == []
    assert exp.image.negative_findings == [BY_NAME[label].report_finding for label in LESIONS]
    assert exp.image.evidence == ["the absence of microaneurysm, intraretinal haemorrhage, hard exudate, "
                                  "cotton-wool spot, drusen and neovascularisation of the disc"]
    assert exp.assessed_lesions == list(LESIONS)


def test_disc_position_laterality_is_stated(expander):
    anat = ANATOMY.model_copy(update={"laterality": "OS", "laterality_source": "inferred"})
    exp = expander.expand(_record(laterality="unknown"), anat, [])
    assert exp.image.overview.startswith(
        "A colour fundus photograph of the left eye (OS), judged from the position of the optic disc, ")


def test_labelled_diagnosis_wins_and_is_supported_by_relevant_findings(expander):
    glaucoma = expander.expand(_record(diagnosis=GLAUCOMA), ANATOMY.model_copy(update={"cup_to_disc": 0.75}),
                               _anatomy_regions())
    assert (glaucoma.image.diagnosis, glaucoma.image.grade, glaucoma.image.diagnosis_source) == (
        GLAUCOMA, None, "label")
    assert glaucoma.image.evidence == ["a cup-to-disc ratio of 0.75"]
    assert glaucoma.image.positive_findings == ["an enlarged cup-to-disc ratio of 0.75"]  # step 4 lists it too

    amd_without_drusen = expander.expand(_record(diagnosis=AMD), ANATOMY, _anatomy_regions() + _lesions())
    assert amd_without_drusen.image.diagnosis == AMD
    assert amd_without_drusen.image.evidence == []  # the label stands alone: no invented support
    # The detections are still reported even though they do not support the label.
    assert len(amd_without_drusen.image.positive_findings) == 2

    # APTOS grade 0: a grade but no diagnosis column.
    aptos0 = expander.expand(_record(grade=DR_GRADES[0], dr_grade=0), ANATOMY, _anatomy_regions())
    assert (aptos0.image.diagnosis, aptos0.image.grade, aptos0.image.diagnosis_source) == (
        NORMAL, DR_GRADES[0], "label")
    assert aptos0.image.evidence[0].startswith("the absence of microaneurysm, ")
    # Without a detector trusted on every lesion class, a DR grade 0 is "no DR", never "normal".
    unassessed = OfflineExpander(ExpandConfig()).expand(_record(grade=DR_GRADES[0], dr_grade=0), ANATOMY,
                                                        _anatomy_regions())
    assert (unassessed.image.diagnosis, unassessed.image.grade, unassessed.image.evidence) == (
        DR_GRADES[0], DR_GRADES[0], [])


def test_a_weak_detector_states_no_absence_and_labels_do(expander):
    """Only classes the detector finds reliably (or the labels annotate) are stated absent, and a
    lesion the labelled diagnosis implies is never stated absent."""
    weak = OfflineExpander(ExpandConfig(), evidence=trusting(["haemorrhage", "drusen"]))
    exp = weak.expand(_record(), ANATOMY, _anatomy_regions())
    assert exp.assessed_lesions == ["haemorrhage", "drusen"]
    assert exp.image.negative_findings == ["intraretinal haemorrhage", "drusen"]
    assert exp.image.evidence == ["the absence of intraretinal haemorrhage and drusen"]
    blind = OfflineExpander(ExpandConfig()).expand(_record(), ANATOMY, _anatomy_regions())
    assert blind.image.negative_findings == [] and blind.assessed_lesions == []
    # a detector trusted on nothing grounds no diagnosis either: never "normal" from silence
    assert (blind.image.diagnosis, blind.image.diagnosis_source, blind.image.evidence) == (None, "undetermined", [])

    labelled = _record(labelled_classes=["hard_exudate", "microaneurysm", "optic_disc"])
    assert OfflineExpander(ExpandConfig()).expand(labelled, ANATOMY, []).assessed_lesions == \
        ["microaneurysm", "hard_exudate"]
    pdr = _record(diagnosis=DR, grade=DR_GRADES[4], dr_grade=4)
    assert expander.expand(pdr, ANATOMY, []).assessed_lesions == ["hard_exudate", "soft_exudate", "drusen"]
    amd = _record(diagnosis=AMD)
    assert "drusen" not in expander.expand(amd, ANATOMY, []).image.negative_findings


def test_provenance_names_the_offline_backend_and_its_prompt(expander):
    exp = expander.expand(_record(), ANATOMY, [])
    p = exp.provenance
    assert (p.backend, p.model, p.prompt_id, p.prompt_version) == ("offline", "knowledge-table", "expand.offline", "1.10")
    assert p.prompt_sha256 == hashlib.sha256((PROMPTS_DIR / "expand" / "offline.j2").read_bytes()).hexdigest()
    assert p.engine_version == fundus_engine.__version__
    assert make_expander(ExpandConfig()).name == "offline"
    assert isinstance(make_expander(ExpandConfig()), OfflineExpander)


def test_an_edited_template_changes_text_and_provenance(tmp_path, expander):
    prompts = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR, prompts)
    path = prompts / "expand" / "offline.j2"
    path.write_text(path.read_text().replace("A colour fundus photograph", "A colour fundus image"))
    edited = OfflineExpander(ExpandConfig(), prompts_dir=str(prompts), evidence=trusting(LESIONS)).expand(_record(), ANATOMY, [])
    assert edited.image.overview.startswith("A colour fundus image of the right eye")
    assert edited.provenance.prompt_sha256 != expander.provenance().prompt_sha256


def test_expand_pairs_images_with_their_regions_and_isolates_failures(expander):
    other = "cd" * 32
    good = _record()
    broken = _record(sha256=other, path="/data/y.jpg", relpath="y.jpg")
    orphan = _record(sha256="ef" * 32, path="/data/z.jpg", relpath="z.jpg")  # no anatomy: rejected upstream
    bad_region = _region(0, "microaneurysm", [130, 170, 150, 190]).model_copy(
        update={"sha256": other, "label": "not_a_class"})
    result = expand(expander, [good, broken, orphan],
                    [ANATOMY, ANATOMY.model_copy(update={"sha256": other})], _lesions() + [bad_region])
    assert [e.sha256 for e in result.expansions] == [SHA]
    assert len(result.expansions[0].regions) == 3
    assert [(r.stage, r.item) for r in result.rejects] == [("expand", other)]
    assert result.rejects[0].reason.startswith("offline expander failed:")
    assert result.complete is True


def test_anatomy_sentences_are_separated_by_a_space(expander):
    exp = expander.expand(_record(), ANATOMY, _anatomy_regions())
    assert "0.35. The fovea" in exp.image.anatomy


def test_labelled_evidence_is_pluralised(expander):
    exp = expander.expand(_record(diagnosis=DR, grade=DR_GRADES[2], dr_grade=2), ANATOMY, _lesions())
    assert exp.image.evidence == ["1 haemorrhage", "2 microaneurysms"]


def test_boxes_made_from_masks_are_stated_as_areas_never_as_a_count(expander):
    """A box made from a mask may hold several lesions (`clustered_classes`): the findings, the
    evidence and each box's description say in how many areas, and nothing is counted; the same
    boxes from a manifest (one lesion each) are counted."""
    exudates = [_region(n, "hard_exudate", xyxy, colour="brighter and yellower").model_copy(update={"source": "ground_truth"})
                for n, xyxy in ((6, [140, 100, 160, 120]), (7, [200, 300, 260, 340]))]
    regions = [*_anatomy_regions(), *exudates, *_lesions()]
    labelled = dict(diagnosis=DR, labelled_classes=["hard_exudate", "microaneurysm"])
    masks = expander.expand(_record(**labelled, clustered_classes=["hard_exudate"]), ANATOMY, regions)
    boxes = expander.expand(_record(**labelled), ANATOMY, regions)
    # `detect.ground_truth: ignore`: the detector's boxes stand, one lesion each, and are counted as such
    detected = [r.model_copy(update={"source": "model"}) for r in exudates]
    ignored = expander.expand(_record(**labelled, clustered_classes=["hard_exudate"]), ANATOMY,
                              [*_anatomy_regions(), *detected, *_lesions()])
    assert "2 hard exudates" in ignored.image.evidence
    assert "hard_exudate" not in masks.counted_lesions and "microaneurysm" in masks.counted_lesions
    assert "hard_exudate" in boxes.counted_lesions
    assert [f for f in masks.image.positive_findings if "exudat" in f] == [
        "hard exudates in 2 areas, the nearest 1.1 disc diameters from the fovea"]
    assert [f for f in boxes.image.positive_findings if "exudat" in f] == [
        "2 hard exudates, the nearest 1.1 disc diameters from the fovea"]
    assert "hard exudates in 2 areas" in masks.image.evidence and "2 hard exudates" in boxes.image.evidence
    assert "2 microaneurysms" in masks.image.evidence  # other classes are still counted
    described = {d.region_id: d.description for d in masks.regions}
    assert described[exudates[0].region_id].startswith("An area of hard exudates, about 0.20 disc diameters")
    assert {d.region_id: d.description for d in boxes.regions}[exudates[0].region_id].startswith(
        "A hard exudate, about 0.20 disc diameters")
