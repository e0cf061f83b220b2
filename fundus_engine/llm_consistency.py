"""Consistency flags: where a model's description contradicts what was detected or labelled, the
expansion says so, so a contradicting answer can be dropped (`expand.drop_flagged`) or counted."""
from __future__ import annotations

import re

from fundus_engine.models import Anatomy, ImageFindings, ImageRecord, Region
from fundus_engine.report_scoring import statements
from fundus_engine.vocabulary import BY_NAME, LESIONS, NORMAL


def mentioned(text: str, label: str) -> bool:
    """Whether text claims the lesion present. Negations are read as `report_scoring` reads them
    ("no microaneurysms, haemorrhages or exudates", "haemorrhages are not seen" claim none)."""
    return True in statements(text).get(BY_NAME[label].report_finding, set())


def consistency_flags(findings: ImageFindings, record: ImageRecord, anatomy: Anatomy, regions: list[Region]) -> list[str]:
    """Contradictions between what the model claims and what was detected or labelled."""
    found = {r.label for r in regions} | {b.label for b in record.label_boxes}
    claims = " . ".join([*findings.positive_findings, *findings.evidence])
    flags = [f"unsupported_lesion:{label}" for label in LESIONS if label not in found and mentioned(claims, label)]
    # a label the picture contradicts (laterality_source "conflict") is no ground to flag a description by
    known = (anatomy.laterality if anatomy.laterality != "unknown" or anatomy.laterality_source == "conflict"
             else record.laterality)
    if known != "unknown" and findings.laterality not in (known, "unknown"):
        flags.append(f"laterality:{findings.laterality}!={known}")
    if record.diagnosis and says_normal(findings.diagnosis) != (record.diagnosis == NORMAL or record.dr_grade == 0):
        flags.append("diagnosis_disagrees_with_label")
    return flags


def says_normal(diagnosis: str) -> bool:
    return bool(re.search(r"\bnormal\b|\bno (?:apparent |visible )?(?:abnormalit|diabetic retinopathy|retinopathy|disease)",
                          diagnosis, re.I))
