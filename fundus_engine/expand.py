"""Expand: structured descriptions of each image and each region.

Backends share one interface (`Expander`); the default `offline` backend is knowledge-grounded:
it writes only what the detections, the measured facts and the ophthalmic knowledge table
support, so its output can be trusted as a baseline and costs nothing.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fundus_engine import __version__
from fundus_engine.config import ExpandConfig
from fundus_engine.evidence import DetectorEvidence, area_classes, assessed_lesions, counted_lesions
from fundus_engine.models import (Anatomy, Expansion, ImageDescription, ImageRecord, Provenance, Region,
                                  RegionDescription, Reject)
from fundus_engine.prompts import Prompt, load
from fundus_engine.quality import stated_grade
from fundus_engine.vocabulary import AMD, BY_NAME, DR, DR_GRADES, GLAUCOMA, LESIONS, NORMAL, plural

STAGE = "expand"
GLAUCOMA_CUP_TO_DISC = 0.6  # vertical CDR at or above which the disc is called suspicious


@dataclass
class ExpandResult:
    """One shard's descriptions, what could not be described, and what it cost."""

    expansions: list[Expansion] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    usage: dict = field(default_factory=dict)
    complete: bool = True  # False: some requests failed or were not sent; a re-run retries them


class Expander(Protocol):
    name: str
    prompts: list[Prompt]  # the templates whose edits must re-run this stage

    def expand_shard(self, items: list[tuple[ImageRecord, Anatomy, list[Region]]]) -> ExpandResult: ...


def absence_phrase(labels: list[str]) -> str:
    names = [BY_NAME[label].report_finding for label in labels]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"the absence of {listed}"


def _counted(label: str, count: int, areas: Collection[str] = ()) -> str:
    """"3 haemorrhages", "1 drusen": a finding stated as its count; for a class in `areas`
    (`evidence.area_classes`: boxes made from masks) as its boxes, "hard exudates in 12 areas"."""
    name = BY_NAME[label].display.lower()
    if label in areas:
        return f"{plural(name)} in {count} area{'s' if count > 1 else ''}"
    return f"{count} {name}{'s' if count > 1 and label != 'drusen' else ''}"


def infer_diagnosis(counts: Counter, cup_to_disc: float | None, areas: Collection[str] = ()
                    ) -> tuple[str, str | None, list[str]]:
    """Diagnosis, grade and the findings that justify them, from lesion counts alone.

    A simplified international DR scale: new vessels make it proliferative; many haemorrhages
    or cotton-wool spots severe; haemorrhages or exudates moderate; microaneurysms only mild.
    A class in `areas` counts its boxes, each one lesion or more: a lower bound.
    """
    def n(label):
        return counts.get(label, 0)

    def plural(label):
        return _counted(label, n(label), areas)

    if n("neovascularisation"):
        return DR, DR_GRADES[4], [f"{plural('neovascularisation')} at the disc"]
    if n("haemorrhage") >= 8 or (n("soft_exudate") and n("haemorrhage") >= 4):
        return DR, DR_GRADES[3], [plural(x) for x in ("haemorrhage", "soft_exudate", "microaneurysm") if n(x)]
    if n("haemorrhage") or n("hard_exudate") or n("soft_exudate"):
        return DR, DR_GRADES[2], [plural(x) for x in ("haemorrhage", "hard_exudate", "soft_exudate", "microaneurysm") if n(x)]
    if n("microaneurysm"):
        return DR, DR_GRADES[1], [plural("microaneurysm")]
    if n("drusen"):
        return AMD, None, [plural("drusen") + " around the macula"]
    if cup_to_disc is not None and cup_to_disc >= GLAUCOMA_CUP_TO_DISC:
        return GLAUCOMA, None, [f"an enlarged cup-to-disc ratio of {cup_to_disc:.2f}"]
    return NORMAL, None, []  # the caller states which lesions were assessed absent


def _supporting(diagnosis: str, counts: Counter, cup_to_disc: float | None, areas: Collection[str] = ()
                ) -> list[str]:
    """Findings that bear on a labelled diagnosis, stated as counts (or areas)."""
    evidence = [_counted(label, c, areas) for label, c in sorted(counts.items())
                if label in LESIONS and any(diagnosis.lower() in d.lower() or d.lower() in diagnosis.lower()
                                            for d in BY_NAME[label].diseases)]
    if diagnosis == GLAUCOMA and cup_to_disc is not None:
        evidence.append(f"a cup-to-disc ratio of {cup_to_disc:.2f}")
    return evidence


class OfflineExpander:
    """Knowledge-grounded descriptions rendered from `prompts/expand/offline.j2`."""

    name = "offline"

    def __init__(self, config: ExpandConfig, prompts_dir: str | None = None,
                 evidence: DetectorEvidence = DetectorEvidence()):
        self.config = config
        self.prompt = load("expand/offline", prompts_dir)
        self.prompts = [self.prompt]
        self.evidence = evidence  # what the detector may say about each kind of photograph

    def provenance(self) -> Provenance:
        return Provenance(backend=self.name, model="knowledge-table", prompt_id=self.prompt.id,
                          prompt_version=self.prompt.version, prompt_sha256=self.prompt.sha256,
                          engine_version=__version__)

    def expand(self, record: ImageRecord, anatomy: Anatomy, regions: list[Region]) -> Expansion:
        text = self.prompt.module(knowledge=BY_NAME, plural=plural)
        lesions = [r for r in regions if r.label in LESIONS]
        counts = Counter(r.label for r in lesions)
        assessed = assessed_lesions(record, self.evidence)
        areas = area_classes(record, regions)
        if record.diagnosis:
            diagnosis, grade, source = record.diagnosis, record.grade, "label"
            evidence = _supporting(diagnosis, counts, anatomy.cup_to_disc, areas)
        elif record.grade and record.dr_grade == 0:
            grade, source = record.grade, "label"
            if self.evidence.grounds_diagnosis(record):  # every lesion class assessed: normal is measured
                diagnosis, evidence = NORMAL, _supporting(NORMAL, counts, anatomy.cup_to_disc, areas)
            else:  # a DR grade says nothing of other diseases: the label's own words ("No DR"), no more
                diagnosis, evidence = record.grade, []
        elif self.evidence.grounds_diagnosis(record):
            diagnosis, grade, evidence = infer_diagnosis(counts, anatomy.cup_to_disc, areas)
            source = "inferred"
        else:  # a lesion nothing looked for may be there: say less, never guess "normal"
            diagnosis, grade, source = None, None, "undetermined"
            evidence = [_counted(label, c, areas) for label, c in sorted(counts.items(), key=lambda kv: LESIONS.index(kv[0]))]
        absent = [label for label in assessed if label not in counts]
        if diagnosis == NORMAL and not counts and absent:
            evidence = [absence_phrase(absent)]
        positives = [str(text.finding(label=label, count=c, regions=[r for r in lesions if r.label == label],
                                      areas=label in areas))
                     for label, c in sorted(counts.items(), key=lambda kv: LESIONS.index(kv[0]))]
        if anatomy.cup_to_disc is not None and anatomy.cup_to_disc >= GLAUCOMA_CUP_TO_DISC:
            positives.append(f"an enlarged cup-to-disc ratio of {anatomy.cup_to_disc:.2f}")
        negatives = [BY_NAME[label].report_finding for label in absent]
        description = ImageDescription(
            overview=str(text.overview(record=record, anatomy=anatomy, quality=stated_grade(record))).strip(),
            anatomy=str(text.anatomy(anatomy=anatomy, regions=regions)).strip(),
            positive_findings=[p.strip() for p in positives], negative_findings=negatives,
            diagnosis=diagnosis, grade=grade, diagnosis_source=source, evidence=evidence)
        region_texts = [RegionDescription(region_id=r.region_id, label=r.label,
                                          description=str(text.region(r=r, area=r.label in areas)).strip(),
                                          significance=BY_NAME[r.label].significance) for r in regions]
        return Expansion(sha256=record.sha256, image=description, regions=region_texts, provenance=self.provenance(),
                         assessed_lesions=assessed, counted_lesions=counted_lesions(record, self.evidence))


    def expand_shard(self, items: list[tuple[ImageRecord, Anatomy, list[Region]]]) -> ExpandResult:
        result = ExpandResult()
        for record, anatomy, regions in items:
            try:
                result.expansions.append(self.expand(record, anatomy, regions))
            except Exception as exc:  # a failure on one image must not lose the others
                result.rejects.append(Reject(stage=STAGE, item=record.sha256, reason=f"offline expander failed: {exc}"))
        return result


def make_expander(config: ExpandConfig, prompts_dir: str | None = None, out: Path | None = None,
                  run_id: str | None = None, evidence: DetectorEvidence = DetectorEvidence()) -> Expander:
    """`evidence`: what the detector may say (present, absent) about each kind of photograph."""
    if config.backend == "offline":
        return OfflineExpander(config, prompts_dir, evidence)
    if config.backend == "openai":
        from fundus_engine.expand_openai import OpenAIExpander

        from fundus_engine.llm_ledger import ledger_path

        cache_dir = Path(out) / ".cache" / "llm" if out else None
        return OpenAIExpander(config.openai, prompts_dir, cache_dir=cache_dir, run_id=run_id, evidence=evidence,
                              ledger_path=ledger_path(out) if out else None)
    raise ValueError(f"unknown expand backend {config.backend!r}")


def expand(expander: Expander, records: list[ImageRecord], anatomies: list[Anatomy], regions: list[Region]
           ) -> ExpandResult:
    """Pair each surviving image with its anatomy and regions and hand the shard to the backend."""
    by_image: dict[str, list[Region]] = {}
    for r in regions:
        by_image.setdefault(r.sha256, []).append(r)
    anatomy_of = {a.sha256: a for a in anatomies}
    items = [(record, anatomy_of[record.sha256], by_image.get(record.sha256, []))
             for record in records if record.sha256 in anatomy_of]  # others were rejected upstream
    return expander.expand_shard(items)
