"""One ASCII class vocabulary for anatomy and lesions, with the ophthalmic knowledge the
offline expander and the chain templates ground their text in.

Class names are ASCII identifiers because YOLO writes them into weights and plots; the
display names are what the instruction records say.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ClassInfo:
    name: str  # ASCII id used by the detector
    display: str  # name used in instruction text and <ref> tags
    kind: str  # "anatomy" or "lesion"
    appearance: str
    significance: str
    diseases: tuple[str, ...]
    report_finding: str | None = None  # FundusExpert report-findings vocabulary term


CLASSES: tuple[ClassInfo, ...] = (
    ClassInfo("optic_disc", "Optic disc", "anatomy",
              "a round, yellow-pink structure where the vessels enter the eye",
              "the reference for disc-diameter distances and for cup-to-disc assessment",
              ()),
    ClassInfo("optic_cup", "Optic cup", "anatomy",
              "a pale central excavation inside the optic disc",
              "an enlarged cup relative to the disc suggests glaucomatous optic neuropathy",
              ("Glaucoma",)),
    ClassInfo("fovea", "Fovea", "anatomy",
              "a small darker depression at the centre of the macula, about 2.5 disc diameters "
              "temporal to the disc",
              "the centre of fine vision; lesions near it threaten acuity",
              ()),
    ClassInfo("microaneurysm", "Microaneurysm", "lesion",
              "tiny, sharply outlined round red dots",
              "the earliest visible sign of diabetic retinopathy",
              ("Diabetic retinopathy",), "microaneurysm"),
    ClassInfo("haemorrhage", "Haemorrhage", "lesion",
              "dark red blot or flame-shaped areas of intraretinal blood",
              "intraretinal haemorrhages mark moderate or worse non-proliferative diabetic "
              "retinopathy; many in all quadrants suggest severe disease",
              ("Diabetic retinopathy", "Hypertensive retinopathy", "Retinal vein occlusion"),
              "intraretinal haemorrhage"),
    ClassInfo("hard_exudate", "Hard exudate", "lesion",
              "bright yellow, sharply defined waxy deposits, often in clusters or rings",
              "lipid leakage from abnormal vessels; near the fovea it signals macular oedema",
              ("Diabetic retinopathy", "Diabetic macular oedema"), "hard exudate"),
    ClassInfo("soft_exudate", "Cotton-wool spot", "lesion",
              "pale white, fluffy patches with feathery edges",
              "nerve-fibre-layer infarcts from retinal ischaemia",
              ("Diabetic retinopathy", "Hypertensive retinopathy"), "cotton-wool spot"),
    ClassInfo("drusen", "Drusen", "lesion",
              "round yellow deposits beneath the retina, clustered around the macula",
              "the hallmark of age-related macular degeneration; larger and more numerous "
              "drusen carry a higher risk of progression",
              ("Age-related macular degeneration",), "drusen"),
    ClassInfo("neovascularisation", "Neovascularisation", "lesion",
              "a fine, tangled network of new vessels on or near the optic disc",
              "the defining sign of proliferative diabetic retinopathy, at risk of bleeding",
              ("Proliferative diabetic retinopathy",), "neovascularisation of the disc"),
)

BY_NAME: dict[str, ClassInfo] = {c.name: c for c in CLASSES}
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
ANATOMY: tuple[str, ...] = tuple(c.name for c in CLASSES if c.kind == "anatomy")
LESIONS: tuple[str, ...] = tuple(c.name for c in CLASSES if c.kind == "lesion")

# Diagnoses and grades the engine writes. DR grades follow the international clinical scale.
NORMAL = "Normal fundus"
DR = "Diabetic retinopathy"
AMD = "Age-related macular degeneration"
GLAUCOMA = "Glaucoma"
DIAGNOSES: tuple[str, ...] = (NORMAL, DR, AMD, GLAUCOMA)
DR_GRADES: tuple[str, ...] = (
    "No diabetic retinopathy",
    "Mild non-proliferative diabetic retinopathy",
    "Moderate non-proliferative diabetic retinopathy",
    "Severe non-proliferative diabetic retinopathy",
    "Proliferative diabetic retinopathy",
)

# Diagnosis names as datasets spell them (APTOS, EyePACS, ODIR-5K, RFMiD, ...), mapped onto one
# spelling; diagnoses outside this table are kept as the label gives them.
DIAGNOSIS_ALIASES: dict[str, str] = {
    "normal": NORMAL, "normal fundus": NORMAL, "healthy": NORMAL, "n": NORMAL,
    "dr": DR, "diabetic retinopathy": DR, "diabetic retinopathy dr": DR, "npdr": DR, "pdr": DR, "d": DR,
    "amd": AMD, "armd": AMD, "age related macular degeneration": AMD, "macular degeneration": AMD, "a": AMD,
    "glaucoma": GLAUCOMA, "g": GLAUCOMA,
    "cataract": "Cataract", "c": "Cataract",
    "myopia": "Myopia", "m": "Myopia", "pathological myopia": "Pathological myopia",
    "hypertensive retinopathy": "Hypertensive retinopathy", "hypertension": "Hypertensive retinopathy",
    "h": "Hypertensive retinopathy",
    "macular oedema": "Macular oedema", "macular edema": "Macular oedema", "dme": "Macular oedema",
    "dmo": "Macular oedema", "diabetic macular edema": "Macular oedema", "diabetic macular oedema": "Macular oedema",
}


def canonical_diagnosis(label: str | None) -> str | None:
    """A labelled diagnosis in the vocabulary's spelling; a DR grade name counts as DR itself.

    "No diabetic retinopathy" is not a diagnosis (the eye may still have glaucoma), so it gives None.
    """
    if not label or not label.strip():
        return None
    text = label.strip()
    key = re.sub(r"[\s_()-]+", " ", text.casefold()).strip()
    for d in DIAGNOSES:
        if key == d.casefold().replace("-", " "):
            return d
    if key in DIAGNOSIS_ALIASES:
        return DIAGNOSIS_ALIASES[key]
    if key == DR_GRADES[0].casefold():
        return None
    if key in {g.casefold() for g in DR_GRADES[1:]}:
        return DR
    return text


# Aliases used by public datasets and manifests, mapped onto the vocabulary above.
ALIASES: dict[str, str] = {
    "od": "optic_disc", "disc": "optic_disc", "optic disc": "optic_disc",
    "oc": "optic_cup", "cup": "optic_cup", "optic cup": "optic_cup",
    "macula": "fovea", "fovea": "fovea",
    "ma": "microaneurysm", "microaneurysms": "microaneurysm",
    "he": "haemorrhage", "hemorrhage": "haemorrhage", "haemorrhages": "haemorrhage",
    "hemorrhages": "haemorrhage",
    "ex": "hard_exudate", "hard exudate": "hard_exudate", "hard exudates": "hard_exudate",
    "exudate": "hard_exudate",
    "se": "soft_exudate", "soft exudate": "soft_exudate", "cotton wool spot": "soft_exudate",
    "cotton-wool spot": "soft_exudate", "cotton wool spots": "soft_exudate",
    "druse": "drusen",
    "nv": "neovascularisation", "nvd": "neovascularisation",
    "neovascularization": "neovascularisation",
}


# Chinese names for the zh templates (FundusExpert trained on English and Chinese).
CHINESE: dict[str, str] = {
    "Optic disc": "视盘", "Optic cup": "视杯", "Fovea": "黄斑中心凹", "Microaneurysm": "微动脉瘤",
    "Haemorrhage": "出血", "Hard exudate": "硬性渗出", "Cotton-wool spot": "棉絮斑", "Drusen": "玻璃膜疣",
    "Neovascularisation": "新生血管",
    NORMAL: "正常眼底", DR: "糖尿病视网膜病变", AMD: "年龄相关性黄斑变性", GLAUCOMA: "青光眼",
    DR_GRADES[0]: "无糖尿病视网膜病变", DR_GRADES[1]: "轻度非增殖性糖尿病视网膜病变",
    DR_GRADES[2]: "中度非增殖性糖尿病视网膜病变", DR_GRADES[3]: "重度非增殖性糖尿病视网膜病变",
    DR_GRADES[4]: "增殖性糖尿病视网膜病变",
}


def plural(display: str) -> str:
    """"hard exudates", "drusen", "neovascularisation": a class's name for more than one."""
    lower = display.lower()
    return lower if lower.endswith(("s", "drusen", "neovascularisation")) else lower + "s"


def chinese(text: str) -> str:
    """The Chinese name of a class, diagnosis or grade; text outside the vocabulary stays as it is."""
    return CHINESE.get(text, text)


def canonical_class(name: str) -> str:
    """Map a dataset's class name onto the vocabulary; unknown names are an error, not a guess."""
    key = name.strip().lower().replace("-", "_")
    if key in BY_NAME:
        return key
    spaced = key.replace("_", " ")
    for candidate in (key, spaced, name.strip().lower()):
        if candidate in ALIASES:
            return ALIASES[candidate]
    raise ValueError(f"unknown class name {name!r}; known: {', '.join(CLASS_NAMES)}")
