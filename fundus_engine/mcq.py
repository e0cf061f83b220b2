"""The multiple-choice questions of the evaluation benchmark (`OUT/benchmark/`): GMAI-MMBench-style,
built from the held-out split.

Only images of the test split are used, so a model trained on the build's train split is never
asked about an image it has seen. Every question's truth is a label or a measured fact, never a
model's description; questions whose truth is unknown or ambiguous are left out rather than guessed.
Choice of distractors and option order is seeded by (seed, image, task, key), so the same seed
gives the same questions and a change to one image leaves the others' questions as they were.
"""
from __future__ import annotations

import hashlib
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from fundus_engine.evidence import area_classes
from fundus_engine.models import Anatomy, BenchmarkQuestion, ImageRecord, Region
from fundus_engine.tables import read_rows, write_rows
from fundus_engine.vocabulary import ANATOMY, BY_NAME, DIAGNOSES, DR_GRADES, LESIONS, canonical_diagnosis

LETTERS = ("A", "B", "C", "D", "E")
MIN_OPTIONS = 4  # fewer choices make chance accuracy too high to compare with GMAI-MMBench

DIAGNOSIS_QUESTION = "What is the condition demonstrated in this fundus image?"
GRADING_QUESTION = "What is the grading of diabetic retinopathy in this fundus image?"
COUNTING_QUESTION = "How many {noun} are visible in this fundus image?"
RECOGNITION_QUESTION = "What is the marked part in this fundus image?"
# The cup lies inside the disc: a box on either holds part of the other, so neither is offered as a
# wrong answer for the other.
_ALSO_MARKED = {"optic_disc": "optic_cup", "optic_cup": "optic_disc"}
QUADRANT_QUESTION = "In which quadrant, relative to the fovea, is the marked lesion located?"

# Lesions worth counting, with the plural the question uses. Neovascularisation is a network, not
# a countable object, so it is left out.
COUNT_NOUNS: dict[str, str] = {
    "microaneurysm": "microaneurysms",
    "haemorrhage": "haemorrhages",
    "hard_exudate": "hard exudates",
    "soft_exudate": "cotton-wool spots",
    "drusen": "drusen",
}
MAX_COUNT = 10  # above this an exact count is not a fair question; boxes from masks (clustered) are never counted
BOX_MIN_CONFIDENCE = 0.5  # a detector box weaker than this is not trusted as a benchmark truth
QUADRANTS = ("superotemporal", "inferotemporal", "superonasal", "inferonasal")


# ------------------------------------------------------------------ building questions

def _rng(seed: int, *parts: str) -> random.Random:
    return random.Random(hashlib.sha256(":".join([str(seed), *parts]).encode()).digest())


def _unique(items: Iterable[str], exclude: str) -> list[str]:
    seen, out = {exclude.casefold()}, []
    for item in items:
        if item.casefold() not in seen:
            seen.add(item.casefold())
            out.append(item)
    return out


def _options(rng: random.Random, truth: str, *tiers: Iterable[str], n: int = 5) -> tuple[list[str], str] | None:
    """Truth plus distractors, taken from the first tier before the next; shuffled. None if too few."""
    chosen: list[str] = []
    for tier in tiers:
        pool = _unique(tier, truth)
        pool = [p for p in pool if p.casefold() not in {c.casefold() for c in chosen}]
        chosen += rng.sample(pool, min(n - 1 - len(chosen), len(pool)))
    options = [truth, *chosen]
    if len(options) < MIN_OPTIONS:
        return None
    rng.shuffle(options)
    return options, LETTERS[options.index(truth)]


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.casefold()) if len(w) > 3}


def dr_grade_name(record: ImageRecord) -> str | None:
    """The labelled DR grade as its scale name, or None where no DR grade was labelled."""
    if record.dr_grade is not None:
        return DR_GRADES[record.dr_grade]
    if record.grade:
        for g in DR_GRADES:
            if record.grade.strip().casefold() == g.casefold():
                return g
    return None


def truth_counts(record: ImageRecord, regions: list[Region]) -> Counter:
    """Boxes per class from labels only: the record's label boxes, else ground-truth regions.

    Never both, because the detect stage copies label boxes into ground-truth regions.
    """
    if record.label_boxes:
        return Counter(b.label for b in record.label_boxes)
    return Counter(r.label for r in regions if r.source == "ground_truth")


def _trusted_marked(regions: list[Region]) -> list[Region]:
    """Regions with a box-marked image whose label can serve as truth: ground truth where the image
    has any, otherwise confident detections."""
    marked = sorted((r for r in regions if r.marked_path), key=lambda r: r.region_id)
    truth = [r for r in marked if r.source == "ground_truth"]
    return truth or [r for r in marked if r.confidence >= BOX_MIN_CONFIDENCE]


def _question(question: str, options: list[str], answer: str, clinical_task: str, granularity: str,
              image_path: str, sha256: str, category: str | None = None) -> BenchmarkQuestion:
    """`category` is the label the question is about; by default the correct option (a diagnosis,
    grade or structure), for counts and positions the lesion counted or placed."""
    return BenchmarkQuestion(index=-1, question=question, **dict(zip(LETTERS, options)), answer=answer,
                             category=category or options[LETTERS.index(answer)], clinical_task=clinical_task,
                             granularity=granularity, image_path=image_path, sha256=sha256)


def image_questions(record: ImageRecord, regions: list[Region], seed: int = 0, image_path: str | None = None
                    ) -> list[BenchmarkQuestion]:
    """Disease Diagnosis, Severity Grading and Counting about the whole photograph, from labels.
    `image_path`: the picture shown, when not the source file (an upright copy)."""
    out: list[BenchmarkQuestion] = []
    sha = record.sha256
    shown = image_path or record.path

    def add(question, made, task, category=None):
        if made:
            options, letter = made
            out.append(_question(question, options, letter, task, "Image level", shown, sha, category))

    diagnosis = canonical_diagnosis(record.diagnosis)
    if diagnosis:
        # Outside the vocabulary (e.g. "Hypertensive retinopathy"), a distractor sharing a word with
        # the truth may also be true of the eye; leave such distractors out.
        pool = [d for d in DIAGNOSES if diagnosis in DIAGNOSES or not (_content_words(d) & _content_words(diagnosis))]
        add(DIAGNOSIS_QUESTION, _options(_rng(seed, sha, "diagnosis"), diagnosis, pool), "Disease Diagnosis")
    grade = dr_grade_name(record)
    if grade:
        add(GRADING_QUESTION, _options(_rng(seed, sha, "grading"), grade, DR_GRADES), "Severity Grading")
    counts = truth_counts(record, regions)
    for label in LESIONS:
        n = counts.get(label, 0)
        if label not in COUNT_NOUNS or label in record.clustered_classes or not 1 <= n <= MAX_COUNT:
            continue
        rng = _rng(seed, sha, "counting", label)
        below = min(rng.randint(0, 4), n)  # where the truth sits in the run of numbers is random too
        numbers = [str(v) for v in range(n - below, n - below + 5)]
        add(COUNTING_QUESTION.format(noun=COUNT_NOUNS[label]), _options(rng, str(n), numbers), "Counting",
            BY_NAME[label].display)
    return out


def box_questions(regions: list[Region], seed: int = 0, max_box_questions: int = 2,
                  record: ImageRecord | None = None) -> list[BenchmarkQuestion]:
    """Organ Recognition, lesion Disease Diagnosis and quadrant Attribute Recognition about one
    marked box each (GMAI-MMBench has no lesion-recognition task: naming a marked lesion is
    diagnosis at box granularity).

    The quadrant question is box-level rather than image-level: with several lesions of a class
    in the eye, only the drawn box says which one is meant.

    A distractor is never a class with a box overlapping the marked one (it may be what is marked).
    A box made from a mask (`record.clustered_classes`) may be wide and hold more than its class:
    its distractors are only what is known not to be in it (`_not_in`), one lesion class at least.
    """
    out: list[BenchmarkQuestion] = []
    trusted = _trusted_marked(regions)
    if not trusted:
        return out
    sha = trusted[0].sha256
    anatomy_names = [BY_NAME[c].display for c in ANATOMY]
    lesion_names = [BY_NAME[c].display for c in LESIONS]
    rng = _rng(seed, sha, "boxes")
    # a box made from a mask is offered only what is known not to be in it, one lesion class at
    # least (structures alone would give the answer away)
    only = {r.region_id: _not_in(r, regions, record) for r in trusted
            if record is not None and r.label in area_classes(record, [r])}
    askable = [r for r in trusted if r.region_id not in only or set(only[r.region_id]) & set(lesion_names)]
    for r in rng.sample(askable, min(max_box_questions, len(askable))):
        lesion = r.label in LESIONS
        also = BY_NAME[_ALSO_MARKED[r.label]].display if r.label in _ALSO_MARKED else None
        inside = {BY_NAME[o.label].display for o in regions if o is not r and _overlap(r, o)}
        tiers = tuple([n for n in tier if n != also and n not in inside]
                      for tier in ((lesion_names, anatomy_names) if lesion else (anatomy_names, lesion_names)))
        if r.region_id in only:
            tiers = (only[r.region_id],)
        made = _options(_rng(seed, sha, "recognition", r.region_id), BY_NAME[r.label].display, *tiers)
        if made:
            out.append(_question(RECOGNITION_QUESTION, *made, "Disease Diagnosis" if lesion else "Organ Recognition",
                                 "Box level", r.marked_path, sha))
    # `Region.quadrant`: only of a box well inside one (`crop.QUADRANT_MARGIN_DD` from the lines through the fovea)
    placed = [r for r in trusted if r.label in LESIONS and r.quadrant in QUADRANTS]
    for r in rng.sample(placed, min(max_box_questions, len(placed))):
        names = [q.capitalize() for q in QUADRANTS]
        made = _options(_rng(seed, sha, "quadrant", r.region_id), r.quadrant.capitalize(), names)
        if made:
            out.append(_question(QUADRANT_QUESTION, *made, "Attribute Recognition", "Box level", r.marked_path, sha,
                                 BY_NAME[r.label].display))
    return out


def _overlap(a: Region, b: Region) -> bool:
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a.xyxy, b.xyxy
    return ax1 < bx2 and bx1 < ax2 and ay1 < by2 and by1 < ay2


def _not_in(box: Region, regions: list[Region], record: ImageRecord) -> list[str]:
    """Names known not to be inside `box`: a located structure whose box does not overlap it, and
    a lesion class annotated on the image with no box overlapping it."""
    located = {r.label for r in regions if r.label in ANATOMY}
    inside = {r.label for r in regions if r is not box and _overlap(box, r)}
    known = [c for c in ANATOMY if c in located] + [c for c in LESIONS if c in record.labelled_classes]
    return [BY_NAME[c].display for c in known if c not in inside and c != box.label]


def build_benchmark(records: list[ImageRecord], anatomies: list[Anatomy], regions: list[Region], held_out: set[str],
                    seed: int = 0, max_box_questions: int = 2) -> list[BenchmarkQuestion]:
    """All questions about the held-out images, indexed from 0 in (image sha256, task) order.

    Images outside `held_out` are ignored entirely, whatever labels they carry.
    """
    anatomy_of = {a.sha256: a for a in anatomies if a.sha256 in held_out}
    regions_of: dict[str, list[Region]] = defaultdict(list)
    for r in regions:
        if r.sha256 in held_out:
            regions_of[r.sha256].append(r)
    questions: list[BenchmarkQuestion] = []
    for record in sorted((r for r in records if r.sha256 in held_out), key=lambda r: r.sha256):
        own = regions_of.get(record.sha256, [])
        anatomy = anatomy_of.get(record.sha256)
        questions += image_questions(record, own, seed, anatomy.upright_path if anatomy else None)
        questions += box_questions(own, seed, max_box_questions, record)
    return [q.model_copy(update={"index": i}) for i, q in enumerate(questions)]


# ------------------------------------------------------------------ prompting

def options_of(question: BenchmarkQuestion) -> dict[str, str]:
    return {k: getattr(question, k) for k in LETTERS if getattr(question, k) is not None}


# ------------------------------------------------------------------ files

def write_benchmark(questions: list[BenchmarkQuestion], path: Path) -> Path:
    """Parquet with the explicit schema derived from BenchmarkQuestion."""
    return write_rows(Path(path), questions, BenchmarkQuestion)


def read_benchmark(path: Path) -> list[BenchmarkQuestion]:
    return read_rows(Path(path), BenchmarkQuestion)
