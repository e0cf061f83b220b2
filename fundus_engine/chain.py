"""Chain: clinical cognitive-chain templates turn an image's facts and descriptions into
instruction records: the six FundusExpert task types, the whole chain as one answer and as a
conversation, presence (with as many "no" as "yes"), counting and attribute questions, in
English and optionally Chinese.

Template and question choice is seeded by (seed, image, task), so a build is reproducible and
a one-image change leaves every other image's records as they were.
"""
from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict

from fundus_engine.config import ChainConfig
from fundus_engine.evidence import area_classes
from fundus_engine.models import (Anatomy, Expansion, GroundedBox, ImageRecord, InstructionRecord, Region,
                                  Reject, Turn)
from fundus_engine.prompts import Prompt, load_dir
from fundus_engine.vocabulary import ANATOMY, BY_NAME, CLASS_NAMES, DR_GRADES, LESIONS, chinese, plural

STAGE = "chain"


def box_text(boxes: list[list[int]]) -> str:
    return "[" + ", ".join("[" + ", ".join(str(v) for v in b) + "]" for b in boxes) + "]"


def grounded(display: str, regions: list[Region]) -> str:
    """InternVL grounding syntax: <ref>Hard exudate</ref><box>[[x1, y1, x2, y2], ...]</box>."""
    return f"<ref>{display}</ref><box>{box_text([r.box_999 for r in regions])}</box>"


def templates(prompts_dir: str | None = None, language: str = "en") -> dict[str, Prompt]:
    """Task type -> template, from prompts/chain/*.j2 (English) or prompts/chain/<language>/*.j2."""
    by_task = {}
    for prompt in load_dir("chain" if language == "en" else f"chain/{language}", prompts_dir):
        for task in prompt.meta.get("tasks", {}):
            by_task[task] = prompt
    return by_task


def all_templates(prompts_dir: str | None, languages: list[str]) -> list[Prompt]:
    """Every chain template the configured languages render (their hashes key the stage)."""
    return list({p.sha256: p for lang in languages for p in templates(prompts_dir, lang).values()}.values())


def _rng(seed: int, *parts: str) -> random.Random:
    return random.Random(hashlib.sha256(":".join([str(seed), *parts]).encode()).digest())


def grading_family(record: ImageRecord, grade: str) -> str:
    """Which disease a grade belongs to, so the grading question names the right one."""
    text = f"{grade} {record.diagnosis or ''}".casefold()
    if grade in DR_GRADES or record.dr_grade is not None or "diabetic" in text:
        return "dr"
    if "macular degeneration" in text or "amd" in text.split():
        return "amd"
    if "hypertensive" in text:
        return "hypertensive"
    return "other"


def group_facts(items: list[Region]) -> dict:
    """Measured facts of one lesion class on one image, for step 3 of the chain: count, size
    range, where the boxes lie (`quadrant`: the one holding all or most, over half, of them, as
    `quadrant_share` says; else `quadrants`, by how many each holds), how near the nearest
    comes to the fovea's centre and to the disc's margin (DD, `Region.fovea_reach_dd`), and
    which box leads a report's description (`lead`)."""
    def known(attr):
        return [getattr(r, attr) for r in items if getattr(r, attr) is not None]

    sizes, placed = known("size_dd"), Counter(known("quadrant")).most_common()
    top, held = placed[0] if placed else (None, 0)
    share = "all" if held == len(items) else "most" if held > len(items) / 2 else None
    # the quadrants listed are all the class's, or all four: a box near the lines is in none, and
    # a list of the others would read as where they all are
    everywhere = len(placed) == 4 or sum(n for _, n in placed) == len(items)
    reaches = [r for r in items if r.fovea_reach_dd is not None]
    return {"count": len(items), "size_min": min(sizes) if sizes else None, "size_max": max(sizes) if sizes else None,
            "quadrant": top if share else None, "quadrant_share": share,
            "quadrants": [q for q, _ in placed] if everywhere else [],
            "nearest_fovea_dd": min(known("fovea_reach_dd"), default=None),
            "nearest_disc_dd": min(known("disc_reach_dd"), default=None),
            # the box a report describes: the one nearest the fovea, where that is known
            "lead": min(reaches, key=lambda r: r.fovea_reach_dd).region_id if reaches else items[0].region_id}


def chain_image(record: ImageRecord, anatomy: Anatomy, regions: list[Region], expansion: Expansion,
                config: ChainConfig, by_task: dict[str, Prompt], language: str = "en"
                ) -> list[InstructionRecord]:
    image = expansion.image
    groups: dict[str, list[Region]] = defaultdict(list)
    for r in sorted(regions, key=lambda r: (CLASS_NAMES.index(r.label), -r.confidence)):
        groups[r.label].append(r)
    region_text = {d.region_id: d.description for d in expansion.regions}
    lesion_groups = [(label, groups[label]) for label in LESIONS if label in groups]
    context = dict(image=image, groups=groups, lesion_groups=lesion_groups, region_text=region_text,
                   landmarks=[label for label in ANATOMY if label in groups], ref=grounded,
                   facts={label: group_facts(items) for label, items in lesion_groups},
                   # classes whose boxes were made from masks: "12 areas of", never "12" lesions
                   areas=area_classes(record, regions), plural=plural,
                   # "no lesion is seen" only where every lesion class was assessed absent
                   all_assessed=set(expansion.assessed_lesions) >= set(LESIONS))
    out: list[InstructionRecord] = []

    def pick(task: str, *key: str, kind: str | None = None) -> str:
        """A seeded question; templates that group their questions by kind are asked for `kind`."""
        questions = by_task[task].meta["tasks"][task]["questions"]
        if isinstance(questions, dict):
            questions = questions[kind]
        return _rng(config.seed, record.sha256, language, task, *key).choice(questions)

    def add(task: str, turns: list[tuple[str, str]], key: str = "", image_path: str | None = None,
            boxes: list[Region] = ()):
        prompt = by_task[task]
        conversations = []
        for n, (question, answer) in enumerate(turns):
            conversations += [Turn(**{"from": "human", "value": ("<image>\n" if n == 0 else "") + question}),
                              Turn(**{"from": "gpt", "value": answer.strip()})]
        out.append(InstructionRecord(
            record_id=hashlib.sha256(f"{record.sha256}:{language}:{task}:{key}".encode()).hexdigest()[:20],
            sha256=record.sha256, image_path=image_path or anatomy.upright_path or record.path,
            source_image_path=record.path, task=task,
            language=language, conversations=conversations,
            boxes=[GroundedBox(label=r.label, box_999=r.box_999) for r in boxes],
            template_id=prompt.id, template_version=prompt.version, diagnosis=image.diagnosis, grade=image.grade,
            provenance=expansion.provenance, flags=expansion.flags))

    def answer(task: str, macro: str | None = None, *args, **kw) -> str:
        """The macro named `macro` (or after the task) where the template defines one, else its body."""
        prompt = by_task[task]
        module = prompt.module(**{**context, **kw})
        if hasattr(module, macro or task):
            return str(getattr(module, macro or task)(*args)).strip()
        return prompt.render(**{**context, **kw})

    if image.diagnosis and "disease_diagnosis" in by_task:  # none where the evidence does not determine one
        add("disease_diagnosis", [(pick("disease_diagnosis"), answer("disease_diagnosis"))])
    if image.diagnosis and image.grade and "severity_grading" in by_task:
        add("severity_grading", [(pick("severity_grading", kind=grading_family(record, image.grade)),
                                  answer("severity_grading"))])

    rng = _rng(config.seed, record.sha256, "regions")
    marked = [r for r in regions if r.marked_path]
    for r in rng.sample(marked, min(config.max_region_questions, len(marked))):
        add("region_identification", [(pick("region_identification", r.region_id),
                                        answer("region_identification", None, r, region=r))],
            key=r.region_id, image_path=r.marked_path, boxes=[r])
    for label in rng.sample(list(groups), min(config.max_region_questions, len(groups))):
        items = groups[label]
        display = items[0].display
        kind = "lesion" if label in LESIONS else "anatomy"
        question = pick("region_detection", label, kind=kind).format(
            target=chinese(display) if language == "zh" else display.lower(), targets=plural(display))
        add("region_detection", [(question, answer("region_detection", None, items[0].display, items,
                                                   display=items[0].display, regions=items))],
            key=label, boxes=items)

    # Presence: as many absent lesions as present ones, so "no" is learnt from evidence, not habit;
    # absent only where labels or a detector trusted on the class say so (expansion.assessed_lesions).
    present = [label for label in LESIONS if label in groups]
    absent = [label for label in expansion.assessed_lesions if label not in groups]
    half = config.max_finding_questions // 2
    asked = rng.sample(present, min(half, len(present)))
    asked += rng.sample(absent, min(config.max_finding_questions - len(asked), len(absent)))
    for label in asked:
        display = BY_NAME[label].display
        target = chinese(display) if language == "zh" else display.lower()
        add("finding_presence", [(pick("finding_presence", label).format(target=target),
                                  answer("finding_presence", "presence", display, groups.get(label, [])))],
            key=label, boxes=groups.get(label, []))
    # Counts only where the count is known: the labels annotate the class exhaustively, or the
    # detector finds it reliably on this kind of photograph.
    countable = [label for label in present if label in expansion.counted_lesions]
    for label in rng.sample(countable, min(2, len(countable))):
        display = BY_NAME[label].display
        question = pick("counting", label).format(target=chinese(display) if language == "zh" else display.lower(),
                                                  targets=plural(display))
        add("counting", [(question, answer("counting", "counting", display, groups[label]))], key=label,
            boxes=groups[label])

    if language != "en":
        return out
    def measured(r: Region) -> list[str]:
        return [k for k, known in (("size", r.size_dd is not None and r.area_disc_areas is not None),
                                   ("position", r.fovea_reach_dd is not None), ("colour", r.colour is not None)) if known]

    # a lesion with nothing measured (no disc, no fovea, too faint for its colour) is not asked about
    lesions = [r for _, items in lesion_groups for r in items if measured(r)]
    for r in rng.sample(lesions, min(config.max_attribute_questions, len(lesions))):
        kind = _rng(config.seed, record.sha256, r.region_id, "attribute").choice(measured(r))
        question = pick("lesion_attribute", r.region_id, kind=kind).format(
            target=f"area of {plural(r.display)}" if r.label in context["areas"] else r.display.lower(),
            box=f"<box>{box_text([r.box_999])}</box>")
        add("lesion_attribute", [(question, answer("lesion_attribute", kind, r))], key=f"{r.region_id}:{kind}",
            boxes=[r])

    if image.diagnosis and not (image.positive_findings or image.negative_findings):
        # a diagnosis known from a grade alone, with no finding to reason from: a report or a
        # chain would teach a conclusion that follows from nothing it says (EyePACS grades)
        return out
    add("report_generation", [(pick("report_generation"), answer("report_generation", None, grounded=False,
                                                                  **{"ref": lambda d, _: d}))])
    add("grounded_report", [(pick("grounded_report"), answer("grounded_report", None, grounded=True))], boxes=regions)
    add("cognitive_chain", [(pick("cognitive_chain"), answer("cognitive_chain"))], boxes=regions)
    steps = by_task["multi_turn"].meta["tasks"]["multi_turn"]["steps"]
    macros = by_task["multi_turn"].module(**context)
    add("multi_turn", [(_rng(config.seed, record.sha256, "multi_turn", step).choice(questions),
                        str(getattr(macros, step)())) for step, questions in steps.items()], boxes=regions)
    return out


def chain(records: list[ImageRecord], anatomies: list[Anatomy], regions: list[Region], expansions: list[Expansion],
          config: ChainConfig, prompts_dir: str | None = None) -> tuple[list[InstructionRecord], list[Reject]]:
    """Records without a split: the write stage decides it for patients and near-duplicate
    groups across all shards."""
    by_language = {language: templates(prompts_dir, language) for language in config.languages}
    anatomy_of = {a.sha256: a for a in anatomies}
    record_of = {r.sha256: r for r in records}
    regions_of: dict[str, list[Region]] = defaultdict(list)
    for r in regions:
        regions_of[r.sha256].append(r)
    out, rejects = [], []
    for expansion in expansions:
        record = record_of[expansion.sha256]
        try:
            for language, by_task in by_language.items():
                out.extend(chain_image(record, anatomy_of[record.sha256], regions_of[record.sha256], expansion,
                                       config, by_task, language))
        except Exception as exc:  # a template error on one image is reported, the rest go on
            rejects.append(Reject(stage=STAGE, item=record.path, reason=f"chain template failed: {exc}"))
    return out, rejects
