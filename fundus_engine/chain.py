"""Chain: clinical cognitive-chain templates turn an image's facts and descriptions into
instruction records of the six FundusExpert task types.

Template and question choice is seeded by (seed, image, task), so a build is reproducible and
a one-image change leaves every other image's records as they were.
"""
from __future__ import annotations

import hashlib
import random
from collections import defaultdict

from fundus_engine.config import ChainConfig, WriteConfig
from fundus_engine.models import (Anatomy, Expansion, GroundedBox, ImageRecord, InstructionRecord, Region,
                                  Reject, Turn)
from fundus_engine.prompts import Prompt, load_dir
from fundus_engine.vocabulary import ANATOMY, CLASS_NAMES, LESIONS
from fundus_engine.write import assign_split

STAGE = "chain"


def box_text(boxes: list[list[int]]) -> str:
    return "[" + ", ".join("[" + ", ".join(str(v) for v in b) + "]" for b in boxes) + "]"


def grounded(display: str, regions: list[Region]) -> str:
    """InternVL grounding syntax: <ref>Hard exudate</ref><box>[[x1, y1, x2, y2], ...]</box>."""
    return f"<ref>{display}</ref><box>{box_text([r.box_999 for r in regions])}</box>"


def templates(prompts_dir: str | None = None) -> dict[str, Prompt]:
    """Task type -> template, from prompts/chain/*.j2 front matter."""
    by_task = {}
    for prompt in load_dir("chain", prompts_dir):
        for task in prompt.meta.get("tasks", {}):
            by_task[task] = prompt
    return by_task


def _rng(seed: int, *parts: str) -> random.Random:
    return random.Random(hashlib.sha256(":".join([str(seed), *parts]).encode()).digest())


def _record(record: ImageRecord, expansion: Expansion, task: str, prompt: Prompt, question: str, answer: str,
            split: str, key: str, image_path: str | None = None, boxes: list[GroundedBox] = ()) -> InstructionRecord:
    return InstructionRecord(
        record_id=hashlib.sha256(f"{record.sha256}:{task}:{key}".encode()).hexdigest()[:20],
        sha256=record.sha256, image_path=image_path or record.path, source_image_path=record.path, task=task,
        conversations=[Turn(**{"from": "human", "value": "<image>\n" + question}), Turn(**{"from": "gpt", "value": answer})],
        boxes=list(boxes), split=split, template_id=prompt.id, template_version=prompt.version,
        diagnosis=expansion.image.diagnosis, grade=expansion.image.grade, provenance=expansion.provenance,
        flags=expansion.flags)


def chain_image(record: ImageRecord, anatomy: Anatomy, regions: list[Region], expansion: Expansion,
                config: ChainConfig, split: str, by_task: dict[str, Prompt]) -> list[InstructionRecord]:
    image = expansion.image
    groups: dict[str, list[Region]] = defaultdict(list)
    for r in sorted(regions, key=lambda r: (CLASS_NAMES.index(r.label), -r.confidence)):
        groups[r.label].append(r)
    region_text = {d.region_id: d.description for d in expansion.regions}
    out: list[InstructionRecord] = []

    def question(task: str, *key: str) -> str:
        return _rng(config.seed, record.sha256, task, *key).choice(by_task[task].meta["tasks"][task]["questions"])

    def add(task, answer, key="", **kw):
        out.append(_record(record, expansion, task, by_task[task], kw.pop("q", None) or question(task, key),
                           answer, split, key, **kw))

    add("disease_diagnosis", by_task["disease_diagnosis"].render(image=image))
    if image.grade:
        add("severity_grading", by_task["severity_grading"].render(image=image))

    rng = _rng(config.seed, record.sha256, "regions")
    marked = [r for r in regions if r.marked_path]
    for r in rng.sample(marked, min(config.max_region_questions, len(marked))):
        add("region_identification", by_task["region_identification"].render(region=r), key=r.region_id,
            image_path=r.marked_path, boxes=[GroundedBox(label=r.label, box_999=r.box_999)])
    labels = list(groups)
    for label in rng.sample(labels, min(config.max_region_questions, len(labels))):
        items = groups[label]
        target = items[0].display.lower()
        add("region_detection", by_task["region_detection"].render(display=items[0].display, regions=items, ref=grounded),
            key=label, q=question("region_detection", label).format(target=target),
            boxes=[GroundedBox(label=label, box_999=r.box_999) for r in items])

    lesion_groups = [(label, groups[label]) for label in LESIONS if label in groups]
    context = dict(image=image, groups=groups, lesion_groups=lesion_groups, region_text=region_text,
                   landmarks=[label for label in ANATOMY if label in groups])
    add("report_generation", by_task["report_generation"].render(grounded=False, ref=lambda d, _: d, **context))
    add("grounded_report", by_task["grounded_report"].render(grounded=True, ref=grounded, **context),
        boxes=[GroundedBox(label=r.label, box_999=r.box_999) for r in regions])
    return out


def chain(records: list[ImageRecord], anatomies: list[Anatomy], regions: list[Region], expansions: list[Expansion],
          config: ChainConfig, write_config: WriteConfig, prompts_dir: str | None = None
          ) -> tuple[list[InstructionRecord], list[Reject]]:
    by_task = templates(prompts_dir)
    anatomy_of = {a.sha256: a for a in anatomies}
    record_of = {r.sha256: r for r in records}
    regions_of: dict[str, list[Region]] = defaultdict(list)
    for r in regions:
        regions_of[r.sha256].append(r)
    out, rejects = [], []
    for expansion in expansions:
        record = record_of[expansion.sha256]
        split = assign_split(record.patient_id or record.sha256, write_config)
        try:
            out.extend(chain_image(record, anatomy_of[record.sha256], regions_of[record.sha256], expansion,
                                   config, split, by_task))
        except Exception as exc:  # a template error on one image is reported, the rest go on
            rejects.append(Reject(stage=STAGE, item=record.path, reason=f"chain template failed: {exc}"))
    return out, rejects
