"""Benchmark: a GMAI-MMBench-style multiple-choice test built from the held-out split, VLMEvalKit-style
answer parsing and scoring, and FundusExpert's clinical-consistency score for generated reports.

Only images of the test split are used, so a model trained on the build's train split is never
asked about an image it has seen. Every question's truth is a label or a measured fact, never a
model's description; questions whose truth is unknown or ambiguous are left out rather than guessed.
Choice of distractors and option order is seeded by (seed, image, task, key), so the same seed
gives the same questions and a change to one image leaves the others' questions as they were.

Everything here is a pure function of its arguments except the file helpers at the end.
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from fundus_engine.config import WriteConfig
from fundus_engine.models import Anatomy, BenchmarkQuestion, ImageRecord, Region
from fundus_engine.tables import read_rows, write_rows
from fundus_engine.vocabulary import (AMD, ANATOMY, BY_NAME, CLASSES, DIAGNOSES, DR, DR_GRADES, GLAUCOMA, LESIONS,
                                      NORMAL, canonical_diagnosis)
from fundus_engine.write import split_images

LETTERS = ("A", "B", "C", "D", "E")
MIN_OPTIONS = 4  # fewer choices make chance accuracy too high to compare with GMAI-MMBench
PROMPT_HEADER = "Answer with the option's letter from the given choices directly."

DIAGNOSIS_QUESTION = "What is the condition demonstrated in this fundus image?"
GRADING_QUESTION = "What is the grading of diabetic retinopathy in this fundus image?"
COUNTING_QUESTION = "How many {noun} are visible in this fundus image?"
RECOGNITION_QUESTION = "What is the marked part in this fundus image?"
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
MAX_COUNT = 10  # above this an exact count is not a fair question (mask-derived boxes merge clusters)
BOX_MIN_CONFIDENCE = 0.5  # a detector box weaker than this is not trusted as a benchmark truth
QUADRANTS = ("superotemporal", "inferotemporal", "superonasal", "inferonasal")


# ------------------------------------------------------------------ building questions

def held_out_images(records: Iterable[ImageRecord], config: WriteConfig) -> set[str]:
    """The sha256s of the test split, decided exactly as the write stage decides it (patients and
    near-duplicates grouped)."""
    return {sha for sha, split in split_images(list(records), config).items() if split == "test"}


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


def _clear_quadrant(region: Region, anatomy: Anatomy | None) -> str | None:
    """The region's quadrant, only if its whole box lies inside it (no straddling of the lines
    through the fovea) and the eye is known; otherwise the answer would be arguable."""
    if anatomy is None or anatomy.fovea_centre is None or region.quadrant not in QUADRANTS:
        return None
    x1, y1, x2, y2 = region.xyxy
    f = anatomy.fovea_centre
    if x1 <= f.x <= x2 or y1 <= f.y <= y2:
        return None
    return region.quadrant


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
        if label not in COUNT_NOUNS or not 1 <= n <= MAX_COUNT:
            continue
        rng = _rng(seed, sha, "counting", label)
        below = min(rng.randint(0, 4), n)  # where the truth sits in the run of numbers is random too
        numbers = [str(v) for v in range(n - below, n - below + 5)]
        add(COUNTING_QUESTION.format(noun=COUNT_NOUNS[label]), _options(rng, str(n), numbers), "Counting",
            BY_NAME[label].display)
    return out


def box_questions(regions: list[Region], anatomy: Anatomy | None, seed: int = 0, max_box_questions: int = 2
                  ) -> list[BenchmarkQuestion]:
    """Organ Recognition, lesion Disease Diagnosis and quadrant Attribute Recognition about one
    marked box each (GMAI-MMBench has no lesion-recognition task: naming a marked lesion is
    diagnosis at box granularity).

    The quadrant question is box-level rather than image-level: with several lesions of a class
    in the eye, only the drawn box says which one is meant.
    """
    out: list[BenchmarkQuestion] = []
    trusted = _trusted_marked(regions)
    if not trusted:
        return out
    sha = trusted[0].sha256
    anatomy_names = [BY_NAME[c].display for c in ANATOMY]
    lesion_names = [BY_NAME[c].display for c in LESIONS]
    rng = _rng(seed, sha, "boxes")
    for r in rng.sample(trusted, min(max_box_questions, len(trusted))):
        lesion = r.label in LESIONS
        tiers = (lesion_names, anatomy_names) if lesion else (anatomy_names, lesion_names)
        made = _options(_rng(seed, sha, "recognition", r.region_id), BY_NAME[r.label].display, *tiers)
        if made:
            out.append(_question(RECOGNITION_QUESTION, *made, "Disease Diagnosis" if lesion else "Organ Recognition",
                                 "Box level", r.marked_path, sha))
    placed = [r for r in trusted if r.label in LESIONS and _clear_quadrant(r, anatomy)]
    for r in rng.sample(placed, min(max_box_questions, len(placed))):
        names = [q.capitalize() for q in QUADRANTS]
        made = _options(_rng(seed, sha, "quadrant", r.region_id), r.quadrant.capitalize(), names)
        if made:
            out.append(_question(QUADRANT_QUESTION, *made, "Attribute Recognition", "Box level", r.marked_path, sha,
                                 BY_NAME[r.label].display))
    return out


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
        questions += box_questions(own, anatomy, seed, max_box_questions)
    return [q.model_copy(update={"index": i}) for i, q in enumerate(questions)]


# ------------------------------------------------------------------ prompting and parsing answers

def options_of(question: BenchmarkQuestion) -> dict[str, str]:
    return {k: getattr(question, k) for k in LETTERS if getattr(question, k) is not None}


def prompt_for(question: BenchmarkQuestion) -> str:
    """The prompt FundusExpert's evaluation sends (at temperature 0); absent options are omitted."""
    lines = [PROMPT_HEADER, f"Question: {question.question}"]
    lines += [f"{k}. {v}" for k, v in options_of(question).items()]
    return "\n".join(lines)


_PREFIX = re.compile(r"(?:the\s+)?(?:correct\s+|final\s+|best\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*",
                     re.IGNORECASE)
_LEAD = re.compile(r"([(\[]?)([A-Ea-e])([)\]]?)(?![A-Za-z0-9])")
_WRAP = " \t\r\n*_`'\""


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip(_WRAP + ".!").casefold())


def _text_match(reply: str, options: dict[str, str]) -> str | None:
    """One option whose text the reply states; options only found inside a longer matched option
    (e.g. "Proliferative DR" inside "Non-proliferative DR") do not count."""
    exact = [k for k, v in options.items() if _norm(v) == _norm(reply)]
    if len(exact) == 1:
        return exact[0]
    text = reply.casefold()
    spans = {k: [m.span() for m in re.finditer(rf"(?<![\w-]){re.escape(_norm(v))}(?![\w-])", text)]
             for k, v in options.items() if _norm(v)}
    every = [(k, x, y) for k, s in spans.items() for x, y in s]

    def nested(k, x, y):
        return any(o != k and a <= x and y <= b and (a, b) != (x, y) for o, a, b in every)

    found = {k for k, x, y in every if not nested(k, x, y)}
    return found.pop() if len(found) == 1 else None


def extract_letter(reply: str | None, question: BenchmarkQuestion) -> str | None:
    """The option a reply chooses, as VLMEvalKit reads it: a leading letter ("B", "B.", "(B)",
    "Answer: B"), else the one option whose text the reply states, else None (unparseable).

    A bare leading "A" followed by words ("A hard exudate") is an article, not a choice.
    """
    if reply is None:
        return None
    options = options_of(question)
    text = reply.strip(_WRAP)
    prefix = _PREFIX.match(text)
    body = text[prefix.end():] if prefix else text
    lead = _LEAD.match(body)
    if lead:
        bracket, letter, rest = bool(lead.group(1) or lead.group(3)), lead.group(2), body[lead.end():]
        after = rest.strip(_WRAP)
        alone = bracket or not after.strip(".:,;)") or rest[:1] in ".:,;)\r\n"
        names_it = letter.upper() in options and after.casefold().startswith(_norm(options[letter.upper()]))
        if (alone or (letter.isupper() and (prefix or names_it))) and letter.upper() in options:
            return letter.upper()
    return _text_match(text, options)


# ------------------------------------------------------------------ scoring answers

def _bucket() -> dict:
    return {"questions": 0, "correct": 0, "accuracy": 0.0}


def _tally(bucket: dict, right: bool) -> None:
    bucket["questions"] += 1
    bucket["correct"] += int(right)
    bucket["accuracy"] = round(bucket["correct"] / bucket["questions"], 4)


def score(questions: list[BenchmarkQuestion], answers: dict[int, str]) -> dict:
    """Accuracy overall and per category, clinical task and granularity; a question without an
    answer, or with an answer no option can be read from, counts as wrong."""
    overall = _bucket()
    per = {"per_category": defaultdict(_bucket), "per_task": defaultdict(_bucket),
           "per_granularity": defaultdict(_bucket)}
    unanswered = unparseable = 0
    for q in questions:
        reply = answers.get(q.index)
        letter = extract_letter(reply, q)
        unanswered += reply is None
        unparseable += reply is not None and letter is None
        right = letter == q.answer
        _tally(overall, right)
        _tally(per["per_category"][q.category], right)
        _tally(per["per_task"][q.clinical_task], right)
        _tally(per["per_granularity"][q.granularity], right)
    known = {q.index for q in questions}
    return {**overall, "answered": len(questions) - unanswered, "unanswered": unanswered,
            "unparseable": unparseable, "unknown_indices": sorted(i for i in answers if i not in known),
            **{k: dict(sorted(v.items())) for k, v in per.items()}}


# ------------------------------------------------------------------ clinical consistency of reports

REPORT_FINDINGS: tuple[str, ...] = tuple(c.report_finding for c in CLASSES if c.report_finding)
_FINDING_PATTERNS: dict[str, str] = {
    "microaneurysm": r"micro-?\s?aneurysm(?:s|al)?",
    "intraretinal haemorrhage": r"(?:intra-?\s?retinal\s+|retinal\s+|dot(?:-and-|\s+and\s+)blot\s+|blot\s+|dot\s+"
                                r"|flame(?:-|\s+)shaped\s+)?ha?emorrhag(?:es?|ic)",
    "hard exudate": r"(?:hard\s+)?exudates?",
    "cotton-wool spot": r"cotton[-\s]?wool\s+spots?|soft\s+exudates?",
    "drusen": r"drus(?:en|e)",
    "neovascularisation of the disc": r"neovasculari[sz]ation(?:\s+(?:of|at)\s+the\s+(?:optic\s+)?disc)?|nvd"
                                      r"|new\s+vessels",
    # REFERENCE's two terms without a detector class: matched so they are never read as another term.
    "venous beading": r"venous\s+beading|beaded\s+veins?",
    "preretinal haemorrhage": r"(?:pre-?\s?retinal|sub-?\s?hyaloid|vitreous)\s+ha?emorrhag(?:es?|ic)",
}
_MENTION = {t: re.compile(rf"(?<![\w-])(?:{p})(?!\w)", re.IGNORECASE) for t, p in _FINDING_PATTERNS.items()}
_SEGMENT = re.compile(r"(?<!\d)[.!?](?!\d)|[;\n]|\b(?:but|however|although|though|whereas|while|except)\b"
                      r"|(?=\b(?:present|absent|(?:positive|negative)(?:\s+findings?)?)\s*:)", re.IGNORECASE)
_STATES = r"(?:seen|present|observed|detected|identified|visible|found|noted|evident|apparent)"
_PRE_NEGATION = re.compile(
    rf"\b(?:(?:no|without|absence\s+of|free\s+of|negative\s+for|neither|nor|none\s+of|rules?\s+out|ruled\s+out"
    rf"|lack\s+of)\b|(?:negative(?:\s+findings?)?|absent|not\s+{_STATES})\s*:)", re.IGNORECASE)
_POST_NEGATION = re.compile(rf"\b(?:absent|not\s+{_STATES}|ruled\s+out|none)\b(?!\s*:)", re.IGNORECASE)
_AFFIRM = re.compile(rf"(?<!not )(?<!no )\b(?:{_STATES}|there\s+(?:is|are))\b", re.IGNORECASE)


def _mentions(segment: str) -> list[tuple[str, int, int]]:
    """(term, start, end) of each finding named, dropping matches inside a longer one
    ("soft exudates" is a cotton-wool spot, not a hard exudate)."""
    found = [(t, m.start(), m.end()) for t, rx in _MENTION.items() for m in rx.finditer(segment)]
    return [f for f in found if not any(o is not f and o[1] <= f[1] and f[2] <= o[2] and o[2] - o[1] > f[2] - f[1]
                                        for o in found)]


def _negated(segment: str, start: int, end: int) -> bool:
    """NegEx-style: a negation before the mention with no affirmation in between ("no exudates or
    haemorrhages"), or one after it with none in between ("haemorrhages are absent")."""
    for m in _PRE_NEGATION.finditer(segment, 0, start):
        if m.end() <= start and not _AFFIRM.search(segment, m.end(), start):
            return True
    for m in _POST_NEGATION.finditer(segment, end):
        if not _AFFIRM.search(segment, end, m.start()):
            return True
    return False


def statements(report: str) -> dict[str, set[bool]]:
    """Every way the report states each finding: {term: {True}} present, {False} absent, both if it
    contradicts itself. Terms never mentioned are missing."""
    out: dict[str, set[bool]] = defaultdict(set)
    pieces = _SEGMENT.split(report or "")
    for segment in pieces:
        for term, start, end in _mentions(segment):
            out[term].add(not _negated(segment, start, end))
    return dict(out)


def findings_in(report: str, terms: Iterable[str] = REPORT_FINDINGS) -> dict[str, bool]:
    """{term: True} stated present, {term: False} stated absent; unmentioned terms are left out.

    A finding stated both ways counts as present here (it is the claim a reader acts on);
    `report_consistency` gives such a finding no credit either way.
    """
    said = statements(report)
    return {t: True in said[t] for t in terms if t in said}


def _term(name: str) -> str:
    """A report-findings term from a term or a vocabulary class name."""
    key = name.strip()
    if key in BY_NAME and BY_NAME[key].report_finding:
        return BY_NAME[key].report_finding
    return key.casefold()


def report_consistency(report: str, truth_present: set[str], terms: Iterable[str] = REPORT_FINDINGS) -> dict:
    """FundusExpert's clinical consistency: score = findings stated correctly (true positives
    stated present + truly absent findings stated absent); total = all true positives + findings
    the report states that are truly absent. Only `terms` are judged (narrow them when the truth
    is known for fewer findings, e.g. a dataset annotating only exudates and microaneurysms).
    """
    terms = tuple(terms)
    truth = {_term(t) for t in truth_present} & set(terms)
    said = {t: s for t, s in statements(report).items() if t in terms}
    stated_present = {t for t, s in said.items() if s == {True}}
    stated_absent = {t for t, s in said.items() if s == {False}}
    contradicted = {t for t, s in said.items() if s == {True, False}}
    correct_present = truth & stated_present
    correct_absent = stated_absent - truth
    false_present = stated_present - truth
    total = len(truth) + len(set(said) - truth)
    score_ = len(correct_present) + len(correct_absent)
    order = {t: i for i, t in enumerate(terms)}

    def listed(items):
        return sorted(items, key=order.get)

    return {"score": score_, "total": total, "ratio": round(score_ / total, 4) if total else None,
            "correct_present": listed(correct_present), "correct_absent": listed(correct_absent),
            "missed": listed(truth - set(said)), "negated_positive": listed(truth & stated_absent),
            "false_present": listed(false_present), "contradicted": listed(contradicted)}


def score_reports(pairs: Iterable[tuple[str, set[str]]], terms: Iterable[str] = REPORT_FINDINGS) -> dict:
    """Consistency over many (report, truth_present) pairs: the pooled ratio (sum of scores over sum
    of totals), the mean per-report ratio, and per finding how often each outcome happened."""
    terms = tuple(terms)
    results = [report_consistency(report, truth, terms) for report, truth in pairs]
    per_finding = {t: Counter() for t in terms}
    for r in results:
        for outcome in ("correct_present", "correct_absent", "missed", "negated_positive", "false_present",
                        "contradicted"):
            for t in r[outcome]:
                per_finding[t][outcome] += 1
    score_, total = sum(r["score"] for r in results), sum(r["total"] for r in results)
    ratios = [r["ratio"] for r in results if r["ratio"] is not None]
    return {"reports": len(results), "score": score_, "total": total,
            "ratio": round(score_ / total, 4) if total else None,
            "mean_ratio": round(sum(ratios) / len(ratios), 4) if ratios else None,
            "per_finding": {t: dict(c) for t, c in per_finding.items()}}


def truth_findings(record: ImageRecord, regions: list[Region] = ()) -> set[str]:
    """Report-findings terms the labels say are present (label boxes, else ground-truth regions)."""
    return {BY_NAME[label].report_finding for label in truth_counts(record, list(regions))
            if label in BY_NAME and BY_NAME[label].report_finding}


# ------------------------------------------------------------------ files

def write_benchmark(questions: list[BenchmarkQuestion], path: Path) -> Path:
    """Parquet with the explicit schema derived from BenchmarkQuestion."""
    return write_rows(Path(path), questions, BenchmarkQuestion)


def read_benchmark(path: Path) -> list[BenchmarkQuestion]:
    return read_rows(Path(path), BenchmarkQuestion)


def _json_lines(path: Path, required: tuple[str, ...]) -> Iterable[tuple[str, dict]]:
    """(path:line, object) for each non-blank line, each object holding the `required` keys."""
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
        if not isinstance(row, dict) or not all(k in row for k in required):
            raise ValueError(f"{path}:{n}: needs " + " and ".join(repr(k) for k in required))
        yield f"{path}:{n}", row


def read_answers(path: Path) -> dict[int, str]:
    """Model replies by question index, from JSONL lines {"index": n, "prediction": "..."} or a
    TSV/CSV with index and prediction columns (VLMEvalKit's output shape)."""
    path = Path(path)
    answers: dict[int, str] = {}

    def put(index, prediction, where):
        try:
            i = int(str(index).strip())
        except ValueError:
            raise ValueError(f"{where}: index {index!r} is not an integer") from None
        if i in answers:
            raise ValueError(f"{where}: index {i} answered twice")
        answers[i] = "" if prediction is None else str(prediction)

    if path.suffix.lower() in (".jsonl", ".json"):
        for where, row in _json_lines(path, ("index", "prediction")):
            put(row["index"], row["prediction"], where)
        return answers
    if path.suffix.lower() not in (".tsv", ".csv"):
        raise ValueError(f"{path}: answers must be .jsonl, .tsv or .csv")
    default_limit = csv.field_size_limit(1 << 30)  # VLMEvalKit rows carry base64 images; the limit is process-wide
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            if not {"index", "prediction"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{path}: needs 'index' and 'prediction' columns, has {reader.fieldnames}")
            for row in reader:
                put(row["index"], row["prediction"], f"{path}:{reader.line_num}")
    finally:
        csv.field_size_limit(default_limit)
    return answers


def score_build_reports(out: Path, reports: Path, terms: Iterable[str] = REPORT_FINDINGS) -> dict:
    """Clinical consistency of generated reports against a build's labels.

    `reports`: JSONL lines {"sha256": <the record's sha256>, "report": "..."}. Only images whose
    lesions are labelled (label boxes or ground-truth regions) can be judged; the others are
    counted as `no_truth` and left out, since an unlabelled image would make every stated
    finding look false.
    """
    out = Path(out)
    images = {r.sha256: r for r in read_rows(sorted((out / "stages" / "ingest").glob("*.images.parquet")), ImageRecord)}
    if not images:
        raise FileNotFoundError(f"{out}: no ingest stage files; is this the output folder of a build?")
    regions: dict[str, list[Region]] = defaultdict(list)
    for r in read_rows(sorted((out / "stages" / "crop").glob("*.regions.parquet")), Region):
        regions[r.sha256].append(r)
    pairs, no_truth = [], 0
    for where, row in _json_lines(reports, ("sha256", "report")):
        record = images.get(row["sha256"])
        if record is None:
            raise ValueError(f"{where}: sha256 {str(row['sha256'])[:16]}... is not an image of the build in {out}")
        if not truth_counts(record, regions[record.sha256]):
            no_truth += 1
            continue
        pairs.append((str(row["report"]), truth_findings(record, regions[record.sha256])))
    return {**score_reports(pairs, terms), "no_truth": no_truth}
