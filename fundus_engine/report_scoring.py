"""FundusExpert's clinical consistency of generated reports: which findings a report states
present or absent (negations read NegEx-style), scored against the findings the labels show."""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from fundus_engine.mcq import truth_counts
from fundus_engine.models import ImageRecord, Region
from fundus_engine.tables import json_lines, read_rows
from fundus_engine.vocabulary import BY_NAME, CLASSES

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
    for where, row in json_lines(reports, ("sha256", "report")):
        record = images.get(row["sha256"])
        if record is None:
            raise ValueError(f"{where}: sha256 {str(row['sha256'])[:16]}... is not an image of the build in {out}")
        if not truth_counts(record, regions[record.sha256]):
            no_truth += 1
            continue
        pairs.append((str(row["report"]), truth_findings(record, regions[record.sha256])))
    return {**score_reports(pairs, terms), "no_truth": no_truth}
