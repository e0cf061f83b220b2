"""The small core of data models every stage reads and writes.

Each stage's Parquet rows are one of these models; `fundus_engine.tables` derives the Arrow
schema from the model, so the schema written, the validation applied and the JSON Schema
exported under `schemas/` can never disagree.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Laterality = Literal["OD", "OS", "unknown"]
BoxSource = Literal["model", "ground_truth", "localiser"]
# Where a landmark (disc or fovea centre) came from: the labels, the detector's box, the
# image-analysis localiser (fundus_engine.landmarks), or the detector confirmed by the localiser.
LandmarkSource = Literal["label", "detector", "localiser", "detector+localiser"]
TaskType = Literal[
    "disease_diagnosis",
    "severity_grading",
    "region_identification",
    "region_detection",
    "report_generation",
    "grounded_report",
    "cognitive_chain",  # the whole reasoning chain in one answer, citing boxes
    "multi_turn",  # the same chain, one step per turn
    "finding_presence",  # "is there X?" answered yes with boxes, or no where none was found or labelled
    "counting",
    "lesion_attribute",  # size, position, colour from the measured facts
]
Split = Literal["train", "val", "test"]


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LabelBox(Row):
    label: str  # canonical class name from fundus_engine.vocabulary
    xyxy: list[float] = Field(min_length=4, max_length=4)
    # the mask files (their non-zero pixels, as one) a box was made from: inside the box they are
    # the lesion itself, which crop measures from (an area's box may hold much retina besides)
    masks: list[str] = []


class Point(Row):
    x: float
    y: float


class Quality(Row):
    """Cheap image-quality measures; enough to reject unusable photographs and to say so."""

    sharpness: float  # variance of the Laplacian inside the field of view
    exposure: float  # mean brightness inside the field of view, 0-1
    fov_coverage: float  # fraction of the frame inside the circular field of view
    grade: Literal["good", "usable", "poor"]


class ImageRecord(Row):
    """One accepted photograph with its optional source labels (ingest stage)."""

    sha256: str
    path: str  # absolute path of what the stages read: the source file, or a DICOM file's PNG rendition
    relpath: str  # path relative to the input folder
    width: int
    height: int
    patient_id: str | None = None  # `labels.patient_pseudonym` of the labels' identifier, never the identifier
    laterality: Laterality = "unknown"
    diagnosis: str | None = None
    grade: str | None = None
    dr_grade: int | None = Field(default=None, ge=0, le=4)
    disc: Point | None = None
    fovea: Point | None = None
    label_boxes: list[LabelBox] = []
    # Classes the labels annotate exhaustively for this image (absent box = absent finding);
    # empty when its labels give no boxes. The detector predicts only the other classes.
    labelled_classes: list[str] = []
    # Lesion classes whose label boxes were made from masks: each box surrounds one or more
    # lesions, so the records say in how many areas, never how many lesions.
    clustered_classes: list[str] = []
    quality: Quality
    phash: str | None = None  # 256-bit dHash, hex: near-duplicates are kept in one split
    # Marked as such by `fundus_engine.synth`; everything else is a real photograph, and only
    # evidence validated on real photographs may speak for it.
    synthetic: bool = False


class Reject(Row):
    """An item a stage could not use, with the reason; the run goes on without it."""

    stage: str
    item: str  # the file path, or the image sha256 for later stages
    reason: str
    raw_output: str | None = None  # what a model answered, when its answer was the problem


class Detection(Row):
    sha256: str
    region_id: str
    label: str
    xyxy: list[float] = Field(min_length=4, max_length=4)  # pixels
    confidence: float = Field(ge=0, le=1)
    source: BoxSource
    masks: list[str] = []  # a label box's mask files (`LabelBox.masks`)


class Anatomy(Row):
    """Where the disc and fovea are, which every positional fact is measured from."""

    sha256: str
    laterality: Laterality
    # inferred: from the disc's side of the fovea; conflict: labelled one side and pictured as the
    # other (a mirrored photograph, or a wrong label), so `laterality` is unknown and records state neither
    laterality_source: Literal["label", "inferred", "conflict", "unknown"]
    disc_centre: Point | None = None
    disc_diameter_px: float | None = None
    disc_source: LandmarkSource | None = None
    fovea_centre: Point | None = None
    fovea_source: LandmarkSource | None = None
    # Where the detector and the localiser disagreed, what each said and which was used.
    landmark_disagreement: list[str] = []
    cup_to_disc: float | None = None
    # An upright copy of a photograph that relies on EXIF orientation: trainers open images with
    # PIL, which ignores it, and the boxes are measured in the upright frame.
    upright_path: str | None = None


class Region(Row):
    """A detected region with its crops and measured facts (crop stage)."""

    sha256: str
    region_id: str
    label: str
    display: str
    xyxy: list[float] = Field(min_length=4, max_length=4)
    box_999: list[int] = Field(min_length=4, max_length=4)  # InternVL 0-999 convention
    confidence: float
    source: BoxSource
    crop_path: str
    marked_path: str | None = None  # full image with this box drawn, for region identification
    size_dd: float | None = None  # largest extent in disc diameters
    area_disc_areas: float | None = None
    fovea_distance_dd: float | None = None  # from the box's centre
    disc_distance_dd: float | None = None
    # from the fovea's centre (the disc's margin) to the box's nearest point, 0 where the box covers
    # it: how near the lesion may come (an exudate within 1/3 DD of the fovea threatens central
    # vision; new vessels within 1 DD of the disc margin are NVD)
    fovea_reach_dd: float | None = None
    disc_reach_dd: float | None = None
    clock_hour: int | None = Field(default=None, ge=1, le=12)  # of the box's centre, as viewed, 12 = superior
    quadrant: str | None = None  # superotemporal, ... around the fovea; None unless the box is well inside one
    mean_rgb: list[int] = Field(min_length=3, max_length=3)  # a lesion's: of its pixels that stand out
    # a structure's colour by name; a lesion's difference from the retina around it ("brighter and
    # yellower"), None where too small to state
    colour: str | None


class Provenance(Row):
    """Which backend, model and prompts wrote the descriptions a record is built from."""

    backend: str
    model: str
    prompt_id: str  # the image prompt (or the one prompt, for the offline backend)
    prompt_version: str
    prompt_sha256: str
    engine_version: str
    region_prompt_id: str | None = None  # where regions are described by a prompt of their own
    region_prompt_version: str | None = None
    region_prompt_sha256: str | None = None


class RegionDescription(Row):
    region_id: str
    label: str
    description: str
    significance: str


class ImageDescription(Row):
    """What the expand stage says about one image, in the order a clinician reads it."""

    overview: str
    anatomy: str
    positive_findings: list[str]
    negative_findings: list[str]
    diagnosis: str | None  # None: not determined from the evidence available (no diagnosis or grading record)
    grade: str | None = None
    diagnosis_source: Literal["label", "inferred", "model", "undetermined"]
    evidence: list[str]


class ImageFindings(Row):
    """What a multimodal model must answer about a whole image (the JSON schema it is sent)."""

    overview: str = Field(description="image type, eye, quality and field of view in one or two sentences")
    anatomy: str = Field(description="optic disc, cup and macula as seen")
    laterality: Laterality = Field(description="OD for a right eye, OS for a left eye, unknown if not visible")
    positive_findings: list[str] = Field(description="abnormal findings that are visible, one per item")
    negative_findings: list[str] = Field(description="findings checked for and absent")
    diagnosis: str
    grade: str | None = Field(description="severity grade where the diagnosis has one, else null")
    evidence: list[str] = Field(description="the visible findings the diagnosis rests on")


class RegionFindings(Row):
    """What a multimodal model must answer about one detected region."""

    description: str = Field(description="what the region shows: colour, shape, size, position")
    significance: str = Field(description="clinical significance of this finding here")


class Expansion(Row):
    sha256: str
    image: ImageDescription
    regions: list[RegionDescription]
    provenance: Provenance
    flags: list[str] = []  # contradictions between the description and the detections/labels
    # Lesion classes whose absence may be stated for this image: labelled exhaustively, or found
    # reliably by the detector (held-out mAP50), and not implied by the image's labelled diagnosis.
    assessed_lesions: list[str] = []
    # Lesion classes whose boxes are complete on this image (labelled exhaustively or found
    # reliably): only their counts are stated.
    counted_lesions: list[str] = []


class Turn(Row):
    from_: Literal["human", "gpt"] = Field(alias="from")
    value: str

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)


class GroundedBox(Row):
    label: str
    box_999: list[int] = Field(min_length=4, max_length=4)


class InstructionRecord(Row):
    """One instruction-tuning sample, the unit users train on."""

    record_id: str
    sha256: str
    image_path: str  # the image the model sees (the marked copy for region identification)
    source_image_path: str
    task: TaskType
    language: str = "en"
    conversations: list[Turn] = Field(min_length=2)
    boxes: list[GroundedBox] = []
    split: Split | None = None  # set by the write stage (patients and near-duplicates grouped across shards)
    template_id: str
    template_version: str
    diagnosis: str | None = None
    grade: str | None = None
    provenance: Provenance
    flags: list[str] = []  # carried from the expansion; `expand.drop_flagged` leaves such records out


class BenchmarkQuestion(Row):
    """One multiple-choice question of the held-out benchmark, GMAI-MMBench style: options A-E,
    one correct letter; box-level questions show the image with the box drawn."""

    index: int
    question: str
    A: str
    B: str
    C: str | None = None
    D: str | None = None
    E: str | None = None
    answer: Literal["A", "B", "C", "D", "E"]
    category: str  # the correct label, e.g. "Hard exudate" or "Moderate non-proliferative diabetic retinopathy"
    clinical_task: str  # Disease Diagnosis, Severity Grading, Attribute Recognition, Counting, Organ Recognition, ...
    granularity: Literal["Image level", "Box level"]
    department: str = "ophthalmology"
    modality: str = "fundus photography"
    image_path: str  # the image shown (the box-marked copy for box-level questions)
    sha256: str  # the source image, for leakage checks against the training splits
