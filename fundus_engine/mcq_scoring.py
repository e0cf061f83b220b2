"""Scoring a model's answers to the benchmark's questions: replies read from VLMEvalKit-style
files, the chosen option read from each reply as VLMEvalKit reads it, and accuracy per task."""
from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

from fundus_engine.mcq import options_of
from fundus_engine.models import BenchmarkQuestion
from fundus_engine.tables import json_lines

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
        for where, row in json_lines(path, ("index", "prediction")):
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
