"""The `train-detector` Prefect flow: import labelled fundus datasets (YOLO folders, COCO JSON,
per-class lesion masks, the synthetic generator), train a YOLO detector offline, optionally
self-train on an unlabelled pool, and write the weights beside a metadata JSON.

Run it with `fundus-engine train-detector --config train.yaml` or as a deployment; every step
is a task, and the import counts, the per-class validation and the self-training rounds are
published as artifacts.
"""
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from fundus_engine import importers
from fundus_engine import train as training
from fundus_engine.ingest import IMAGE_EXTENSIONS
from fundus_engine.synth import generate
from fundus_engine.vocabulary import CLASS_NAMES


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CocoSource(Strict):
    annotations: str = Field(description="COCO detection JSON")
    images: str | None = Field(None, description="image folder; default: beside the JSON")


class MaskSource(Strict):
    images: str = Field(description="image folder (IDRiD, DDR, e-ophtha, DiaretDB1 ...)")
    masks: dict[str, str] = Field(description="class name or alias (EX, HE, MA, SE, OD ...) -> folder of binary masks")
    min_area: int = Field(4, ge=1, description="components smaller than this many pixels are dropped")
    merge_distance: float | None = Field(None, ge=0, description="fragments closer than this (pixels) become one box")
    max_boxes: int | None = Field(None, ge=1, description="per image and class, keep only the largest boxes")
    levels: dict[str, list[int]] = Field({}, description="mask key -> pixel values of that class, for multi-level "
                                         "masks; REFUGE: {'optic_disc': [0, 128], 'optic_cup': [0]}")


class TrainDetectorParams(Strict):
    output: str = Field(description="weights file to write (.pt); the metadata JSON goes beside it")
    yolo: list[str] = Field([], description="YOLO-format folders (images/ + labels/, or with a dataset.yaml)")
    coco: list[CocoSource] = []
    masks: list[MaskSource] = []
    synthetic: int = Field(0, ge=0, description="synthetic photographs to add")
    synthetic_seed: int = 1000
    held_out: str | None = Field(None, description="dataset.yaml to validate on; default: the val split")
    unlabelled: str | None = Field(None, description="folder of unlabelled images for self-training")
    self_training_rounds: int = Field(0, ge=0)
    pseudo_label_confidence: float = Field(0.5, gt=0, lt=1)
    epochs: int = Field(30, ge=1)
    imgsz: int = Field(512, ge=64)
    batch: int = Field(16, ge=1)
    base_model: str = Field("yolo11n.yaml", description="a model .yaml (from scratch) or local .pt weights")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0


@task(task_run_name="import-labelled")
def import_labelled(params: TrainDetectorParams, work: str) -> list[importers.LabelledImage]:
    sources: list[list[importers.LabelledImage]] = [importers.from_yolo(Path(f)) for f in params.yolo]
    sources += [importers.from_coco(Path(c.annotations), Path(c.images) if c.images else None) for c in params.coco]
    sources += [importers.from_masks(Path(m.images), {k: Path(v) for k, v in m.masks.items()}, m.min_area,
                                     m.merge_distance, levels=m.levels, max_boxes=m.max_boxes) for m in params.masks]
    if params.synthetic:
        synth = Path(work) / "synthetic"
        generate(synth, params.synthetic, seed=params.synthetic_seed, size=params.imgsz)
        sources.append(importers.from_yolo(synth))
    items = importers.merge(*sources)
    if not items:
        raise ValueError("no labelled images: give yolo, coco, masks or synthetic")
    rows = [{"source": kind, "images": n} for kind, n in
            (("yolo", sum(len(s) for s in sources[:len(params.yolo)])), ("all (merged)", len(items)))]
    counts = {name: 0 for name in CLASS_NAMES}
    for item in items:
        for box in item.boxes:
            counts[box.label] += 1
    create_table_artifact(key="train-detector-data", table=rows + [{"source": f"boxes: {k}", "images": v}
                                                                   for k, v in counts.items()],
                          description="labelled images imported and boxes per class")
    return items


def self_training_pool(folder: Path, labelled: list[importers.LabelledImage], held_out: Path) -> list[Path]:
    """The unlabelled images, minus any that are labelled or in the held-out set (by content): a
    pool image that is also labelled would be pseudo-labelled over its truth, one that is held out
    trained on and then scored on; both inflate the metrics."""
    held_out_images, _ = importers.dataset_images(held_out)
    known = {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in [i.image for i in labelled] + held_out_images}
    pool = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    return [p for p in pool if hashlib.sha256(p.read_bytes()).hexdigest() not in known]


@task(task_run_name="self-train-{params.self_training_rounds}-rounds")
def train_rounds(items: list[importers.LabelledImage], params: TrainDetectorParams, work: str) -> list[training.Round]:
    work_dir = Path(work)
    everything = list(items)
    if params.held_out:
        held_out = Path(params.held_out)
    else:  # a fixed split of the labelled data, kept out of every round's training
        items, kept_out = importers.split(items, params.val_fraction, params.seed)
        held_out = importers.write_yolo_dataset(kept_out, work_dir / "held_out", val_fraction=1.0)
    unlabelled = self_training_pool(Path(params.unlabelled), everything, held_out) if params.unlabelled else []
    if params.self_training_rounds and not unlabelled:
        raise ValueError(f"self-training needs unlabelled images; none found in {params.unlabelled!r}")
    return training.self_train(items, unlabelled, held_out, work_dir / "rounds", params.self_training_rounds,
                               params.pseudo_label_confidence, params.epochs, params.imgsz, params.batch,
                               params.base_model, params.seed)


@flow(name="train-detector", log_prints=True)
def train_detector(params: TrainDetectorParams) -> dict:
    """Train a fundus detector from labelled datasets (and optionally unlabelled images)."""
    logger = get_run_logger()
    work = tempfile.mkdtemp(prefix="fundus-train-detector-")
    try:
        items = import_labelled(params, work)
        logger.info("%d labelled images, %d boxes", len(items), sum(len(i.boxes) for i in items))
        history = train_rounds(items, params, work)
        # Pseudo-labels from a teacher that misses a lesion class teach that class as background
        # (measured in bench/self_training.py), so a round is kept only if it validates better.
        final = max(history, key=lambda r: (r.metrics["mAP50"], -r.round))
        output = Path(params.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(final.weights, output)
        training.strip_for_shipping(output)
        meta = json.loads(final.weights.with_suffix(".json").read_text())
        meta.update({"labelled_images": len(items), "validation": final.metrics, "kept_round": final.round,
                     "self_training": [{"round": r.round, "pseudo_images": r.pseudo_images,
                                        "pseudo_boxes": r.pseudo_boxes, **r.metrics} for r in history],
                     "params": params.model_dump(mode="json")})
        output.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    create_table_artifact(key="train-detector-validation",
                          table=[{"class": c, "mAP50": final.metrics["per_class_mAP50"].get(c)} for c in CLASS_NAMES]
                          + [{"class": "all", "mAP50": final.metrics["mAP50"]}],
                          description="per-class mAP50 of the written weights on the held-out set")
    lines = ["| round | pseudo images | pseudo boxes | mAP50 |", "|---|---|---|---|"]
    lines += [f"| {r.round} | {r.pseudo_images} | {r.pseudo_boxes} | {r.metrics['mAP50']} |" for r in history]
    create_markdown_artifact(key="train-detector-rounds", markdown="\n".join(lines),
                             description="held-out mAP50 after each self-training round")
    logger.info("wrote %s (round %d of %d, mAP50 %.3f)", output, final.round, len(history) - 1, final.metrics["mAP50"])
    return meta
