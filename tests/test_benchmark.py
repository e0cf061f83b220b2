"""The evaluation benchmark: held-out MCQ questions (fundus_engine.mcq), VLMEvalKit-style answer
parsing and scoring (mcq_scoring), clinical consistency of reports (report_scoring), and the
benchmark/answers files."""
from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from fundus_engine.mcq import (BOX_MIN_CONFIDENCE, COUNTING_QUESTION, GRADING_QUESTION, LETTERS, QUADRANTS,
                               RECOGNITION_QUESTION, build_benchmark, options_of,
                               read_benchmark, truth_counts, write_benchmark)
from fundus_engine.mcq_scoring import extract_letter, read_answers, score
from fundus_engine.report_scoring import (REPORT_FINDINGS, report_consistency, score_reports, statements,
                                          truth_findings)
from fundus_engine.config import ChainConfig, ExpandConfig
from fundus_engine.crop import box_999, region_facts
from fundus_engine.models import Anatomy, BenchmarkQuestion, ImageRecord, LabelBox, Point, Quality, Region
from fundus_engine.vocabulary import (AMD, BY_NAME, CLASSES, DIAGNOSES, DR, DR_GRADES, GLAUCOMA, LESIONS,
                                      canonical_diagnosis)

QUALITY = Quality(sharpness=40.0, exposure=0.3, fov_coverage=0.69, grade="good")
DISPLAYS = {c.display for c in CLASSES}
A, B, C, D, E = ("aa" * 32, "bb" * 32, "cc" * 32, "dd" * 32, "ee" * 32)


def _image(sha, laterality="OD", lesions=(), source="model", label_boxes=(), **labels):
    """A 400x400 image with disc, cup and fovea regions plus `lesions` (label, xyxy, confidence).
    The first region of each class gets a marked copy, as the crop stage does."""
    record = ImageRecord(sha256=sha, path=f"/data/{sha[:4]}.jpg", relpath=f"{sha[:4]}.jpg", width=400, height=400,
                         laterality=laterality, quality=QUALITY,
                         label_boxes=[LabelBox(label=lab, xyxy=list(xy)) for lab, xy in label_boxes], **labels)
    nasal = 1 if laterality == "OD" else -1
    disc_x, fovea_x = 200 + nasal * 150, 200 - nasal * 100  # OS flips; unknown is drawn like OS
    source_of_eye = "label" if laterality != "unknown" else "unknown"
    # an unknown eye is one whose disc was not located (a located disc tells the side, and which way is nasal)
    anat = Anatomy(sha256=sha, laterality=laterality, laterality_source=source_of_eye,
                   disc_centre=Point(x=disc_x, y=250) if laterality != "unknown" else None, disc_diameter_px=100.0,
                   fovea_centre=Point(x=fovea_x, y=250))
    boxes = [("optic_disc", [disc_x - 50, 200, disc_x + 50, 300], 0.95),
             ("optic_cup", [disc_x - 17, 233, disc_x + 18, 268], 0.9),
             ("fovea", [fovea_x - 25, 225, fovea_x + 25, 275], 0.85), *lesions]
    regions, marked = [], set()
    for n, (label, xyxy, conf) in enumerate(boxes):
        regions.append(Region(
            sha256=sha, region_id=f"{sha[:12]}-{n:03d}", label=label, display=BY_NAME[label].display, xyxy=list(xyxy),
            box_999=box_999(xyxy, 400, 400), confidence=conf, source=source, crop_path=f"/crops/{sha[:4]}-{n}.jpg",
            marked_path=None if label in marked else f"/crops/{sha[:4]}-{n}.marked.jpg", mean_rgb=[150, 30, 20],
            colour="red", **region_facts(list(xyxy), anat)))
        marked.add(label)
    return record, anat, regions


def _rows(images):
    return [r for r, _, _ in images], [a for _, a, _ in images], [x for _, _, rs in images for x in rs]


@pytest.fixture(scope="module")
def images():
    """A: labelled DR with label boxes (3 hard exudates, 2 microaneurysms) and ground-truth regions, OD,
    fovea at x=100: the exudate (x 150-170, y 300-312) is inferonasal, the microaneurysm superonasal.
    B: AMD, model regions only: a confident drusen (clear of the fovea lines), a microaneurysm that
    straddles the fovea's horizontal line, and a weak haemorrhage below BOX_MIN_CONFIDENCE.
    C: no labels, unknown eye. D: fully labelled but not held out."""
    he = [("hard_exudate", [150, 300, 170, 312]), ("hard_exudate", [180, 320, 190, 330]),
          ("hard_exudate", [200, 330, 210, 340])]
    ma = [("microaneurysm", [130, 170, 140, 180]), ("microaneurysm", [60, 330, 66, 336])]
    a = _image(A, "OD", diagnosis=DR, grade=DR_GRADES[2], dr_grade=2, source="ground_truth",
               label_boxes=he + ma, lesions=[(lab, xy, 1.0) for lab, xy in he + ma])
    b = _image(B, "OD", diagnosis=AMD, lesions=[("drusen", [60, 160, 70, 170], 0.6),
                                                ("microaneurysm", [120, 245, 126, 255], 0.8),
                                                ("haemorrhage", [40, 300, 60, 320], BOX_MIN_CONFIDENCE / 2)])
    c = _image(C, "unknown", lesions=[("drusen", [60, 160, 70, 170], 0.7)])
    d = _image(D, "OS", diagnosis=DR, grade=DR_GRADES[4], dr_grade=4, source="ground_truth",
               label_boxes=he, lesions=[(lab, xy, 1.0) for lab, xy in he])
    return {"A": a, "B": b, "C": c, "D": d}


@pytest.fixture(scope="module")
def bench(images):
    return build_benchmark(*_rows(images.values()), held_out={A, B, C})


def _of(questions, task, sha=None):
    return [q for q in questions if q.clinical_task == task and (sha is None or q.sha256 == sha)]


# ------------------------------------------------------------------ which images and how many questions

def test_only_held_out_images_are_used(images, bench):
    assert {q.sha256 for q in bench} == {A, B, C}
    assert not any(q.image_path.startswith("/data/dddd") or "/dddd-" in q.image_path for q in bench)
    only_d = build_benchmark(*_rows(images.values()), held_out={D})
    assert {q.sha256 for q in only_d} == {D}
    assert build_benchmark(*_rows(images.values()), held_out=set()) == []
    # Rows of held-out images alone give exactly the same questions: others are never consulted.
    assert build_benchmark(*_rows([images["A"], images["B"], images["C"]]), held_out={A, B, C}) == bench


def _recognition(questions):
    """"What is the marked part": Organ Recognition for anatomy, box-level Disease Diagnosis for lesions."""
    return [q for q in questions if q.question == RECOGNITION_QUESTION]


def test_question_counts_per_task(bench):
    recognition = _recognition(bench)
    tasks = Counter(q.clinical_task for q in bench if q not in recognition)
    assert tasks == {"Disease Diagnosis": 2, "Severity Grading": 1, "Counting": 2, "Attribute Recognition": 3}
    assert len(recognition) == 6  # 2 each: A of 5 marked boxes, B of 5 trusted (not the weak one), C of 4
    assert {q.clinical_task for q in recognition} <= {"Organ Recognition", "Disease Diagnosis"}
    assert Counter(q.sha256 for q in bench) == {A: 1 + 1 + 2 + 2 + 2, B: 1 + 2 + 1, C: 2}
    assert [q.index for q in bench] == list(range(len(bench)))
    assert [q.sha256 for q in bench] == sorted(q.sha256 for q in bench)


def test_max_box_questions_bounds_box_questions(images):
    rows = _rows(images.values())
    none = build_benchmark(*rows, held_out={A, B, C}, max_box_questions=0)
    assert [q for q in none if q.granularity == "Box level"] == []
    many = build_benchmark(*rows, held_out={A}, max_box_questions=10)
    assert len(_recognition(many)) == 5  # every marked box once
    assert len(_of(many, "Attribute Recognition")) == 2


def test_diagnosis_and_grading(bench):
    (dx_a,) = _of(bench, "Disease Diagnosis", A)
    assert dx_a.category == DR and set(options_of(dx_a).values()) == set(DIAGNOSES)
    assert dx_a.question == "What is the condition demonstrated in this fundus image?"
    assert dx_a.granularity == "Image level" and dx_a.image_path == "/data/aaaa.jpg"
    assert _of(bench, "Disease Diagnosis", B)[0].category == AMD
    (grading,) = _of(bench, "Severity Grading")
    assert grading.sha256 == A and grading.question == GRADING_QUESTION
    assert grading.category == DR_GRADES[2] and set(options_of(grading).values()) == set(DR_GRADES)


@pytest.mark.parametrize("label,expected", [
    ("diabetic retinopathy", DR), ("DR", DR), ("glaucoma", GLAUCOMA), ("Proliferative diabetic retinopathy", DR),
    ("No diabetic retinopathy", None), ("", None), (None, None), ("Cataract", "Cataract"),
])
def test_canonical_diagnosis(label, expected):
    assert canonical_diagnosis(label) == expected


def test_diagnosis_outside_the_vocabulary_avoids_overlapping_distractors():
    cataract = _image("c1" * 32, diagnosis="Cataract")
    hypertensive = _image("c2" * 32, diagnosis="Hypertensive retinopathy")
    grade_only = _image("c3" * 32, grade=DR_GRADES[0], dr_grade=0)
    qs = build_benchmark(*_rows([cataract, hypertensive, grade_only]), {"c1" * 32, "c2" * 32, "c3" * 32})
    by_sha = {q.sha256: q for q in _of(qs, "Disease Diagnosis")}
    assert set(options_of(by_sha["c1" * 32]).values()) == {"Cataract", *DIAGNOSES}  # five choices
    assert set(options_of(by_sha["c2" * 32]).values()) == {"Hypertensive retinopathy", *DIAGNOSES} - {DR}
    assert "c3" * 32 not in by_sha  # a DR grade of 0 is not a diagnosis...
    assert _of(qs, "Severity Grading", "c3" * 32)[0].category == DR_GRADES[0]  # ...but it is a grade


def test_counting_from_labelled_boxes_only(images, bench):
    counting = {q.question: q for q in _of(bench, "Counting")}
    assert set(counting) == {COUNTING_QUESTION.format(noun="hard exudates"),
                             COUNTING_QUESTION.format(noun="microaneurysms")}
    he = counting[COUNTING_QUESTION.format(noun="hard exudates")]
    ma = counting[COUNTING_QUESTION.format(noun="microaneurysms")]
    assert (getattr(he, he.answer), getattr(ma, ma.answer)) == ("3", "2")
    assert (he.category, ma.category) == ("Hard exudate", "Microaneurysm")  # the label counted
    for q in (he, ma):
        values = sorted(int(v) for v in options_of(q).values())
        assert len(values) == 5 and values == list(range(values[0], values[0] + 5)) and values[0] >= 0
    # B has only model detections: no counting question is asked about it.
    assert _of(bench, "Counting", B) == []
    # Ground-truth regions count when an image has no label boxes; label boxes are never added to them.
    record, _, regions = images["A"]
    assert truth_counts(record, regions) == {"hard_exudate": 3, "microaneurysm": 2}
    assert truth_counts(record.model_copy(update={"label_boxes": []}), regions)["hard_exudate"] == 3
    many = _image("c4" * 32, label_boxes=[("microaneurysm", [10 + 5 * i, 10, 14 + 5 * i, 14]) for i in range(11)])
    assert _of(build_benchmark(*_rows([many]), {"c4" * 32}), "Counting") == []  # 11 > MAX_COUNT


def test_box_level_questions_use_the_marked_image(images, bench):
    marked = {r.marked_path: r for _, _, rs in images.values() for r in rs if r.marked_path}
    boxes = [q for q in bench if q.granularity == "Box level"]
    assert boxes and all(q.image_path in marked for q in boxes)
    for q in _recognition(bench):
        region = marked[q.image_path]
        assert q.category == region.display and q.granularity == "Box level"
        assert q.clinical_task == ("Disease Diagnosis" if region.label not in ("optic_disc", "optic_cup", "fovea")
                                   else "Organ Recognition")
        assert set(options_of(q).values()) <= DISPLAYS and len(options_of(q)) == 5
        if q.clinical_task == "Organ Recognition":  # the other anatomy names come first as distractors,
            # but not the cup for a disc box nor the disc for a cup box: the box holds part of both
            nested = {"Optic disc": "Optic cup", "Optic cup": "Optic disc"}.get(q.category)
            assert {"Optic disc", "Optic cup", "Fovea"} - {nested} <= set(options_of(q).values())
            assert nested not in set(options_of(q).values())
    weak = next(r for r in images["B"][2] if r.label == "haemorrhage")
    assert all(q.image_path != weak.marked_path for q in bench)  # below BOX_MIN_CONFIDENCE


def test_quadrant_questions_only_where_the_quadrant_is_clear(images, bench):
    attrs = {q.sha256: [] for q in bench}
    for q in _of(bench, "Attribute Recognition"):
        attrs[q.sha256].append(q)
        assert set(options_of(q).values()) == {x.capitalize() for x in QUADRANTS}
    assert sorted(getattr(q, q.answer) for q in attrs[A]) == ["Inferonasal", "Superonasal"]
    (drusen_q,) = attrs[B]  # the straddling microaneurysm and the weak haemorrhage are left out
    assert getattr(drusen_q, drusen_q.answer) == "Superotemporal"  # up and toward the viewer's left in a right eye
    assert drusen_q.category == "Drusen"  # the label placed
    assert drusen_q.image_path == next(r.marked_path for r in images["B"][2] if r.label == "drusen")
    assert attrs[C] == []  # unknown eye: no quadrant


def test_a_quadrant_is_asked_only_of_a_box_a_quarter_disc_diameter_clear_of_the_lines_through_the_fovea():
    """Fovea at (100, 250), 100-px disc: a microaneurysm 10 px (0.1 DD) above the horizontal line
    is superonasal only as long as the fovea is placed within 0.1 DD; one 25 px above is asked."""
    near = _image(A, "OD", lesions=[("microaneurysm", [130, 230, 140, 240], 0.9)])
    clear = _image(B, "OD", lesions=[("microaneurysm", [130, 215, 140, 225], 0.9)])
    assert (near[2][-1].quadrant, clear[2][-1].quadrant) == (None, "superonasal")  # no record states it either
    asked = _of(build_benchmark(*_rows([near, clear]), held_out={A, B}), "Attribute Recognition")
    assert [(q.sha256, getattr(q, q.answer)) for q in asked] == [(B, "Superonasal")]


def test_options_unique_answer_is_category_and_letters_valid(bench):
    for q in bench:
        options = list(options_of(q).values())
        assert 4 <= len(options) <= 5
        assert len({o.casefold() for o in options}) == len(options)
        assert list(options_of(q)) == list(LETTERS[:len(options)])  # no gaps: C..E only after A, B
        if q.clinical_task not in ("Counting", "Attribute Recognition"):  # those are about a lesion label
            assert getattr(q, q.answer) == q.category


def test_seeded_reproducibility(images):
    rows = _rows(images.values())
    first = build_benchmark(*rows, held_out={A, B, C}, seed=7)
    assert first == build_benchmark(*rows, held_out={A, B, C}, seed=7)
    assert first != build_benchmark(*rows, held_out={A, B, C}, seed=8)
    assert [q.category for q in first if q.granularity == "Image level"] == \
        [q.category for q in build_benchmark(*rows, held_out={A, B, C}, seed=8) if q.granularity == "Image level"]


def test_correct_letters_are_spread():
    images = [_image(f"{n:064x}", diagnosis=DIAGNOSES[n % 4], grade=DR_GRADES[n % 5], dr_grade=n % 5,
                     lesions=[("hard_exudate", [150, 300, 170, 312], 0.9)]) for n in range(40)]
    qs = build_benchmark(*_rows(images), {r.sha256 for r, _, _ in images})
    letters = Counter(q.answer for q in qs)
    assert set(letters) == set(LETTERS)
    assert max(letters.values()) < 0.4 * len(qs)
    for task in ("Disease Diagnosis", "Severity Grading"):
        assert len({q.answer for q in _of(qs, task)}) >= 4


# ------------------------------------------------------------------ answer parsing

def _mcq(answer="B", category="Hard exudate", task="Lesion Recognition", granularity="Box level", index=0,
         options=("Drusen", "Hard exudate", "Microaneurysm", "Haemorrhage")):
    return BenchmarkQuestion(index=index, question="q", **dict(zip(LETTERS, options)), answer=answer,
                             category=category, clinical_task=task, granularity=granularity, image_path="/x.jpg",
                             sha256="x")


@pytest.mark.parametrize("reply,letter", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("[C]", "C"), ("Answer: B", "B"), ("answer: b", "B"),
    ("The answer is B.", "B"), ("The correct answer is (D)", "D"), ("B. Hard exudate", "B"), ("B) Hard exudate", "B"),
    ("**B**", "B"), ("b", "B"), ("  C\n", "C"), ("B\nBecause the lesion is yellow.", "B"), ("B Hard exudate", "B"),
    ("A", "A"), ("D: Haemorrhage", "D"), ("Option C", "C"),
    ("Hard exudate", "B"), ("hard exudate.", "B"), ("The marked part is a hard exudate.", "B"),
    ("A hard exudate", "B"),  # "A" here is an article
    ("a drusen", "A"),
    ("E", None), ("Drusen or haemorrhage", None), ("I don't know", None), ("", None), (None, None),
    ("Bilateral changes", None), ("Cotton-wool spot", None),
])
def test_extract_letter(reply, letter):
    assert extract_letter(reply, _mcq()) == letter


@pytest.mark.parametrize("reply,grade", [
    ("Proliferative diabetic retinopathy", 4), ("Moderate non-proliferative diabetic retinopathy", 2),
    ("This is moderate non-proliferative diabetic retinopathy.", 2), ("no diabetic retinopathy", 0),
    ("Either mild non-proliferative diabetic retinopathy or moderate non-proliferative diabetic retinopathy", None),
])
def test_extract_letter_nested_option_texts(reply, grade):
    q = _mcq(answer="A", options=DR_GRADES, category=DR_GRADES[0], task="Severity Grading")
    assert extract_letter(reply, q) == (None if grade is None else LETTERS[grade])


def test_extract_letter_counting_options():
    q = _mcq(answer="C", category="3", task="Counting", options=("1", "2", "3", "4", "5"))
    assert extract_letter("3", q) == "C"
    assert extract_letter("There are 3 hard exudates.", q) == "C"
    assert extract_letter("C. 3", q) == "C"
    assert extract_letter("Between 2 and 3", q) is None


# ------------------------------------------------------------------ scoring

@pytest.fixture()
def four():
    return [_mcq(answer="A", category=DR, task="Disease Diagnosis", granularity="Image level", index=0,
                 options=(DR, AMD, GLAUCOMA, "Normal fundus")),
            _mcq(answer="B", category=DR_GRADES[1], task="Severity Grading", granularity="Image level", index=1,
                 options=(DR_GRADES[0], DR_GRADES[1], DR_GRADES[2], DR_GRADES[3], DR_GRADES[4])),
            _mcq(answer="B", index=2),
            _mcq(answer="D", category="Haemorrhage", index=3)]


def test_score_three_of_four(four):
    result = score(four, {0: "A", 1: "B. Mild non-proliferative diabetic retinopathy", 2: "Hard exudate", 3: "C"})
    assert (result["questions"], result["correct"], result["accuracy"]) == (4, 3, 0.75)
    assert (result["answered"], result["unanswered"], result["unparseable"]) == (4, 0, 0)
    assert result["per_granularity"] == {"Box level": {"questions": 2, "correct": 1, "accuracy": 0.5},
                                         "Image level": {"questions": 2, "correct": 2, "accuracy": 1.0}}
    assert result["per_task"]["Lesion Recognition"] == {"questions": 2, "correct": 1, "accuracy": 0.5}
    assert result["per_category"] == {
        DR: {"questions": 1, "correct": 1, "accuracy": 1.0},
        DR_GRADES[1]: {"questions": 1, "correct": 1, "accuracy": 1.0},
        "Hard exudate": {"questions": 1, "correct": 1, "accuracy": 1.0},
        "Haemorrhage": {"questions": 1, "correct": 0, "accuracy": 0.0}}


def test_score_unanswered_and_unparseable_count_wrong(four):
    result = score(four, {0: "A", 1: "I cannot tell", 2: "(B)", 9: "A"})
    assert (result["correct"], result["accuracy"]) == (2, 0.5)
    assert (result["answered"], result["unanswered"], result["unparseable"]) == (3, 1, 1)
    assert result["unknown_indices"] == [9]
    assert score([], {})["accuracy"] == 0.0


# ------------------------------------------------------------------ report consistency

TRUTH = {"microaneurysm", "intraretinal haemorrhage"}
GOOD = "Microaneurysms and a blot haemorrhage are present. No hard exudates or drusen."
POOR = "Hard exudates are seen near the fovea. Microaneurysms are not seen. Cotton-wool spots: none."
TEMPLATE = ("Findings: present: 2 microaneurysms, the nearest 1.5 disc diameters from the fovea; 1 haemorrhage. "
            "Absent: hard exudate, cotton-wool spot, drusen, neovascularisation of the disc.")


@pytest.mark.parametrize("report,expected", [
    (GOOD, {"microaneurysm": True, "intraretinal haemorrhage": True, "hard exudate": False, "drusen": False}),
    ("There are microaneurysms without haemorrhage.", {"microaneurysm": True, "intraretinal haemorrhage": False}),
    ("Absent: microaneurysm, drusen", {"microaneurysm": False, "drusen": False}),
    ("Present: microaneurysms, Absent: drusen", {"microaneurysm": True, "drusen": False}),
    ("Haemorrhages absent, microaneurysms present.", {"microaneurysm": True, "intraretinal haemorrhage": False}),
    ("No haemorrhage is seen and microaneurysms are present.",
     {"microaneurysm": True, "intraretinal haemorrhage": False}),
    ("Scattered microaneurysms, but no haemorrhages.", {"microaneurysm": True, "intraretinal haemorrhage": False}),
    ("There is no evidence of neovascularisation.", {"neovascularisation of the disc": False}),
    ("Neovascularization at the optic disc.", {"neovascularisation of the disc": True}),
    ("Soft exudates and a preretinal haemorrhage.", {"cotton-wool spot": True}),  # not hard exudate/intraretinal
    ("Moderate non-proliferative diabetic retinopathy.", {}),
    ("A normal fundus. No lesion is seen.", {}),
    (TEMPLATE, {t: t in TRUTH for t in REPORT_FINDINGS}),
])
def test_statements_read_presence_and_negation(report, expected):
    assert {term: True in said for term, said in statements(report).items() if term in REPORT_FINDINGS} == expected


def test_report_consistency_known_scores():
    good = report_consistency(GOOD, TRUTH)
    assert (good["score"], good["total"], good["ratio"]) == (4, 4, 1.0)
    assert good["correct_present"] == ["microaneurysm", "intraretinal haemorrhage"]
    assert good["correct_absent"] == ["hard exudate", "drusen"]

    poor = report_consistency(POOR, TRUTH)  # MA negated, haemorrhage missing, HE false, CWS correctly absent
    assert (poor["score"], poor["total"], poor["ratio"]) == (1, 4, 0.25)
    assert poor["negated_positive"] == ["microaneurysm"] and poor["missed"] == ["intraretinal haemorrhage"]
    assert poor["false_present"] == ["hard exudate"] and poor["correct_absent"] == ["cotton-wool spot"]

    full = report_consistency(TEMPLATE, TRUTH)
    assert (full["score"], full["total"]) == (6, 6)

    silent = report_consistency("Microaneurysms are seen.", TRUTH)  # unmentioned absent findings cost nothing
    assert (silent["score"], silent["total"]) == (1, 2)

    both = report_consistency("Microaneurysms present. No microaneurysms. Drusen present. No drusen.", TRUTH)
    assert (both["score"], both["total"]) == (0, 3) and both["contradicted"] == ["microaneurysm", "drusen"]

    assert report_consistency("Normal fundus.", set())["ratio"] is None  # nothing to judge
    assert report_consistency(GOOD, {"microaneurysm", "haemorrhage"})["score"] == 4  # class names accepted
    narrowed = report_consistency(POOR, TRUTH, terms=("hard exudate", "microaneurysm"))
    assert (narrowed["score"], narrowed["total"]) == (0, 2)


def test_score_reports_aggregates():
    result = score_reports([(GOOD, TRUTH), (POOR, TRUTH), (TEMPLATE, TRUTH), ("Normal fundus.", set())])
    assert (result["reports"], result["score"], result["total"]) == (4, 11, 14)
    assert result["ratio"] == round(11 / 14, 4) and result["mean_ratio"] == 0.75
    assert result["per_finding"]["microaneurysm"] == {"correct_present": 2, "negated_positive": 1}
    assert result["per_finding"]["hard exudate"] == {"correct_absent": 2, "false_present": 1}


def test_truth_findings(images):
    record, _, regions = images["A"]
    assert truth_findings(record, regions) == {"hard exudate", "microaneurysm"}


def test_engine_reports_are_fully_consistent(images):
    """The engine's own report_generation answer, parsed back, agrees with the lesions it was built from."""
    from fundus_engine.chain import chain
    from fundus_engine.expand import OfflineExpander, expand

    every = list(LESIONS)  # the labels annotate every lesion class: absent boxes are absent lesions
    dr = _image("f1" * 32, diagnosis=DR, grade=DR_GRADES[2], dr_grade=2, labelled_classes=every, lesions=[
        ("microaneurysm", [130, 170, 150, 190], 0.7), ("haemorrhage", [20, 260, 80, 300], 0.6),
        ("hard_exudate", [150, 300, 170, 312], 0.5)])
    normal = _image("f2" * 32, diagnosis="Normal fundus", labelled_classes=every)
    records, anatomies, regions = _rows([dr, normal])
    expansions = expand(OfflineExpander(ExpandConfig()), records, anatomies, regions).expansions
    out, _ = chain(records, anatomies, regions, expansions, ChainConfig())
    for sha, truth in (("f1" * 32, {"microaneurysm", "intraretinal haemorrhage", "hard exudate"}), ("f2" * 32, set())):
        (report,) = [r.conversations[1].value for r in out if r.sha256 == sha and r.task == "report_generation"]
        result = report_consistency(report, truth)
        assert (result["score"], result["total"]) == (6, 6), (report, result)

    # Unlabelled and an untrusted detector: the report states only what was found, no absences.
    blind = [r.model_copy(update={"labelled_classes": []}) for r in records]
    expansions = expand(OfflineExpander(ExpandConfig()), blind, anatomies, regions).expansions
    out, _ = chain(blind, anatomies, regions, expansions, ChainConfig())
    (report,) = [r.conversations[1].value for r in out if r.sha256 == "f1" * 32 and r.task == "report_generation"]
    result = report_consistency(report, {"microaneurysm", "intraretinal haemorrhage", "hard exudate"})
    assert (result["score"], result["total"], result["correct_absent"]) == (3, 3, []), report


# ------------------------------------------------------------------ files

def test_write_and_read_benchmark(bench, tmp_path):
    path = write_benchmark(bench, tmp_path / "benchmark" / "test.parquet")
    assert read_benchmark(path) == bench
    # the VLMEvalKit TSV of a benchmark is tested with real images in tests/test_export.py


def test_read_answers_jsonl(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"index": 0, "prediction": "A"}\n\n{"index": "1", "prediction": "B. Hard exudate"}\n'
                    + json.dumps({"index": 2, "prediction": "line one\nline two"}) + "\n")
    assert read_answers(path) == {0: "A", 1: "B. Hard exudate", 2: "line one\nline two"}
    path.write_text('{"index": 0, "prediction": "A"}\n{"index": 0, "prediction": "B"}\n')
    with pytest.raises(ValueError, match="twice"):
        read_answers(path)
    path.write_text('{"index": 0}\n')
    with pytest.raises(ValueError, match="prediction"):
        read_answers(path)


@pytest.mark.parametrize("suffix,delimiter", [(".tsv", "\t"), (".csv", ",")])
def test_read_answers_table(tmp_path, suffix, delimiter):
    path = tmp_path / f"model_GMAI{suffix}"
    with path.open("w", newline="") as f:  # VLMEvalKit's shape: question columns plus prediction
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["index", "question", "A", "B", "answer", "prediction"])
        writer.writerow([0, "q", "Drusen", "Hard exudate", "B", "B"])
        writer.writerow([1, "q", "Drusen", "Hard exudate", "A", "It is drusen,\tclearly\n"])
        writer.writerow([2, "q", "Drusen", "Hard exudate", "A", ""])
    assert read_answers(path) == {0: "B", 1: "It is drusen,\tclearly\n", 2: ""}
    bad = tmp_path / f"bad{suffix}"
    bad.write_text(f"index{delimiter}answer\n0{delimiter}B\n")
    with pytest.raises(ValueError, match="prediction"):
        read_answers(bad)


def test_a_marked_box_is_never_offered_a_distractor_that_may_be_inside_it():
    """A class with a box overlapping the marked one may be what is marked: never a distractor.
    A box made from a mask (clustered) may hold anything not annotated: its distractors are only
    located structures and annotated lesion classes with no box overlapping it."""
    lesions = [("hard_exudate", [60, 100, 200, 240], 1.0), ("haemorrhage", [150, 150, 170, 170], 1.0),
               ("microaneurysm", [20, 20, 26, 26], 1.0)]
    annotated = ["optic_disc", "hard_exudate", "haemorrhage", "microaneurysm", "soft_exudate"]
    for clustered in ([], ["hard_exudate"]):
        record, anat, regions = _image(A, lesions=lesions, source="ground_truth", labelled_classes=annotated,
                                       clustered_classes=clustered)
        questions = [q for q in build_benchmark([record], [anat], regions, held_out={A}, max_box_questions=10)
                     if q.question == RECOGNITION_QUESTION and q.category == "Hard exudate"]
        assert len(questions) == 1
        offered = set(options_of(questions[0]).values()) - {"Hard exudate"}
        assert "Haemorrhage" not in offered  # its box lies inside the exudates' box
        if clustered:  # only what is known not to be inside: not drusen, never annotated here
            assert offered <= {"Optic disc", "Optic cup", "Fovea", "Microaneurysm", "Cotton-wool spot"}
            assert "Fovea" not in offered and "Microaneurysm" in offered  # the fovea box overlaps; the MA is apart
        else:
            assert len(offered) == 4
    # annotated for the disc and exudates only (IDRiD's masks): structures alone would give it away
    apart = [("hard_exudate", [150, 40, 250, 120], 1.0)]  # overlapping no structure: 3 of them to offer
    record, anat, regions = _image(A, lesions=apart, source="ground_truth",
                                   labelled_classes=["optic_disc", "hard_exudate"], clustered_classes=["hard_exudate"])
    assert not [q for q in build_benchmark([record], [anat], regions, held_out={A}, max_box_questions=10)
                if q.question == RECOGNITION_QUESTION and q.category == "Hard exudate"]


def test_boxes_made_from_masks_are_never_counted_in_the_benchmark():
    lesions = [("hard_exudate", [60, 100, 120, 160], 1.0), ("hard_exudate", [300, 40, 330, 70], 1.0)]
    boxes = [(label, xyxy) for label, xyxy, _ in lesions]
    for clustered, counted in (([], 1), (["hard_exudate"], 0)):
        record, anat, regions = _image(A, lesions=lesions, source="ground_truth", label_boxes=boxes,
                                       labelled_classes=["hard_exudate"], clustered_classes=clustered)
        questions = build_benchmark([record], [anat], regions, held_out={A})
        assert sum(q.question == COUNTING_QUESTION.format(noun="hard exudates") for q in questions) == counted
