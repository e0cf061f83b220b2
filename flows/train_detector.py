"""The `train-detector` Prefect flow: import labelled fundus datasets (public layouts recognised
by their naming, YOLO folders, COCO JSON, per-class lesion masks, the synthetic generator), train
a YOLO detector offline, optionally self-train on an unlabelled pool, and write the weights
beside a metadata JSON.

The metadata's `validations` say what the figures were measured on, one record per domain:
"real" from held-out real photographs only, "synthetic" from held-out generated images only
(`fundus_engine.detect.validations` reads them; a class validated on real photographs at
`negative_min_map50` may later be stated absent on one). Each class is scored only on the
held-out images annotated for it. Small real sets are cross-validated (`folds: k`): k detectors,
each scored on the real images it did not see, then the written one trained on all of them.

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
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fundus_engine import importers, layouts, training_data
from fundus_engine import train as training
from fundus_engine.config import IMAGE_EXTENSIONS
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
    datasets: list[str] = Field([], description="folders in a public layout, recognised by their naming: IDRiD "
                                "segmentation, DDR, FGADR, e-ophtha, images/<DATASET> + masks/<DATASET>/<id>__<class>.png "
                                "(fundus_engine.layouts)")
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
    val_fraction: float = Field(0.2, gt=0, lt=1, description="held out of training, per domain (real, synthetic)")
    folds: int = Field(0, ge=0, description="k-fold cross-validation by image on the real photographs (k >= 2): "
                       "k detectors, each validated on the fold it did not see, then the written one trained on all "
                       "real images; 0: one held-out split of val_fraction")
    seed: int = 0

    @model_validator(mode="after")
    def _folds_fit(self):
        if self.folds == 1:
            raise ValueError("folds: 1 is no cross-validation; give 0 (one held-out split) or at least 2")
        if self.folds and self.held_out:
            raise ValueError("folds cross-validates on the labelled real photographs; held_out names another "
                             "validation set: give one or the other")
        if self.folds and self.self_training_rounds:
            raise ValueError("self-training rounds are not cross-validated: use folds: 0 with self_training_rounds")
        return self


@task(task_run_name="import-labelled")
def import_labelled(params: TrainDetectorParams, work: str) -> list[importers.LabelledImage]:
    logger = get_run_logger()
    named: list[tuple[str, list[importers.LabelledImage]]] = []
    for folder in params.datasets:
        layout = layouts.detect_layout(Path(folder))
        named.append((f"{folder} ({layout})", layouts.from_layout(Path(folder), layout)))
    named += [(f"yolo {f}", importers.from_yolo(Path(f))) for f in params.yolo]
    named += [(f"coco {c.annotations}", importers.from_coco(Path(c.annotations), Path(c.images) if c.images else None))
              for c in params.coco]
    named += [(f"masks {m.images}", importers.from_masks(Path(m.images), {k: Path(v) for k, v in m.masks.items()},
                                                         m.min_area, m.merge_distance, levels=m.levels,
                                                         max_boxes=m.max_boxes)) for m in params.masks]
    if params.synthetic:
        synth = Path(work) / "synthetic"
        generate(synth, params.synthetic, seed=params.synthetic_seed, size=params.imgsz)
        generated = importers.from_yolo(synth)
        for item in generated:
            item.synthetic, item.dataset = True, "synthetic"
        named.append((f"synthetic (seed {params.synthetic_seed})", generated))
    items = training_data.merge(*(s for _, s in named))
    if not items:
        raise ValueError("no labelled images: give datasets, yolo, coco, masks or synthetic")
    for name, part in named:
        classes = sorted({c for i in part for c in (i.annotated_classes or CLASS_NAMES)}, key=CLASS_NAMES.index)
        logger.info("%s: %d images, annotated for %s", name, len(part), ", ".join(classes) or "nothing")
    rows = [{"source": name, "images": len(part), "real": sum(not i.synthetic for i in part)} for name, part in named]
    rows.append({"source": "all (merged)", "images": len(items), "real": sum(not i.synthetic for i in items)})
    counts = {name: 0 for name in CLASS_NAMES}
    for item in items:
        for box in item.boxes:
            counts[box.label] += 1
    create_table_artifact(key="train-detector-data", table=rows + [{"source": f"boxes: {k}", "images": v, "real": None}
                                                                   for k, v in counts.items()],
                          description="labelled images imported (of them real photographs) and boxes per class")
    return items


def self_training_pool(folder: Path, labelled: list[importers.LabelledImage],
                       held_out: Path | list[importers.LabelledImage]) -> list[Path]:
    """The unlabelled images, minus any that are labelled or in the held-out set (a dataset.yaml,
    or the held-out images) by content: a pool image that is also labelled would be
    pseudo-labelled over its truth, one that is held out trained on and then scored on; both
    inflate the metrics."""
    if isinstance(held_out, list):
        held_out_images = [Path(i.image) for i in held_out]
    else:
        held_out_images, _ = importers.dataset_images(held_out)
    known = {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in [i.image for i in labelled] + held_out_images}
    pool = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    return [p for p in pool if hashlib.sha256(p.read_bytes()).hexdigest() not in known]


def hold_out(items: list[importers.LabelledImage], params: TrainDetectorParams
             ) -> tuple[list[importers.LabelledImage], list[importers.LabelledImage], str]:
    """(train, held out, method). Real photographs and synthetic images are split separately, so
    each domain keeps held-out images however few real ones there are; with `folds`, the real
    photographs are all trained on (cross-validation scores them) and only synthetic ones are held out."""
    if params.held_out:
        return items, importers.from_yolo(Path(params.held_out)), "held-out set"
    train: list[importers.LabelledImage] = []
    held: list[importers.LabelledImage] = []
    for synthetic in (False, True):
        part = [i for i in items if bool(i.synthetic) == synthetic]
        if not part:
            continue
        if params.folds and not synthetic:
            train += part
            continue
        kept, kept_out = training_data.split(part, params.val_fraction, params.seed)
        train += kept
        held += kept_out
    return train, held, "held-out split"


@task(task_run_name="cross-validate-{params.folds}-folds")
def cross_validate(items: list[importers.LabelledImage], synthetic_train: list[importers.LabelledImage],
                   params: TrainDetectorParams, work: str) -> dict:
    """k-fold cross-validation on the real photographs: fold f's detector is trained on the other
    folds (plus the synthetic training images) and scored on fold f, class by class on the images
    annotated for it; the record gives each fold and, per class, the mean over the folds where the
    class has boxes."""
    logger = get_run_logger()
    real = [i for i in items if not i.synthetic]
    if not real:
        raise ValueError("folds: cross-validation needs real photographs; every labelled image is synthetic")
    folds = training_data.kfold(real, params.folds, params.seed)
    per_fold = []
    for f, held in enumerate(folds):
        fold_dir = Path(work) / f"fold{f}"
        trained_on = [i for g, fold in enumerate(folds) if g != f for i in fold] + synthetic_train
        data = training_data.write_yolo_dataset(trained_on, fold_dir / "data", val_fraction=0, max_side=params.imgsz)
        weights = training.train_detector(data, fold_dir / "weights.pt", params.epochs, params.imgsz, params.batch,
                                          params.base_model, params.seed)
        per_class = training.validate_items(weights, held, params.imgsz, fold_dir / "val")
        per_fold.append({"fold": f, **training.validation_entry("real", held, "held-out fold", per_class)})
        logger.info("fold %d/%d: %d real images held out, per-class mAP50 %s", f + 1, params.folds, len(held), per_class)
        shutil.rmtree(fold_dir, ignore_errors=True)
    classes = [c for c in CLASS_NAMES if any(c in f["per_class_mAP50"] for f in per_fold)]
    mean = {c: round(sum(aps) / len(aps), 4)
            for c in classes if (aps := [f["per_class_mAP50"][c] for f in per_fold if c in f["per_class_mAP50"]])}
    entry = training.validation_entry("real", real, f"k-fold cross-validation (k={params.folds})", mean)
    entry["folds"] = [{k: v for k, v in f.items() if k not in ("domain", "method")} for f in per_fold]
    return entry


@task(task_run_name="self-train-{params.self_training_rounds}-rounds")
def train_rounds(items: list[importers.LabelledImage], held: list[importers.LabelledImage], method: str,
                 everything: list[importers.LabelledImage], params: TrainDetectorParams, work: str
                 ) -> list[training.Round]:
    """Train (and self-train) on `items`; every round is scored per domain on `held`."""
    work_dir = Path(work)
    unlabelled = self_training_pool(Path(params.unlabelled), everything, held) if params.unlabelled else []
    if params.self_training_rounds and not unlabelled:
        raise ValueError(f"self-training needs unlabelled images; none found in {params.unlabelled!r}")
    counter = iter(range(10**6))

    def evaluate(weights: Path) -> dict:
        entries = training.domain_validations(weights, held, params.imgsz, work_dir / f"eval{next(counter)}", method)
        return {"mAP50": training.headline_map50(entries), "validations": entries}

    return training.self_train(items, unlabelled, None, work_dir / "rounds", params.self_training_rounds,
                               params.pseudo_label_confidence, params.epochs, params.imgsz, params.batch,
                               params.base_model, params.seed, evaluate=evaluate, max_side=params.imgsz)


@flow(name="train-detector", log_prints=True)
def train_detector(params: TrainDetectorParams) -> dict:
    """Train a fundus detector from labelled datasets (and optionally unlabelled images)."""
    logger = get_run_logger()
    work = tempfile.mkdtemp(prefix="fundus-train-detector-")
    try:
        items = import_labelled(params, work)
        logger.info("%d labelled images (%d real photographs), %d boxes", len(items),
                    sum(not i.synthetic for i in items), sum(len(i.boxes) for i in items))
        train_items, held, method = hold_out(items, params)
        cross = None
        if params.folds:
            cross = cross_validate(items, [i for i in train_items if i.synthetic], params, work)
        history = train_rounds(train_items, held, method, items, params, work)
        # Pseudo-labels from a teacher that misses a lesion class teach that class as background
        # (measured in bench/self_training.py), so a round is kept only if it validates better.
        final = max(history, key=lambda r: (r.metrics["mAP50"], -r.round))
        validations = ([cross] if cross else []) + final.metrics["validations"]
        output = Path(params.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(final.weights, output)
        training.strip_for_shipping(output)
        meta = json.loads(final.weights.with_suffix(".json").read_text())
        meta.update({"labelled_images": len(items), "real_images": sum(not i.synthetic for i in items),
                     "trained_images": len(train_items), "validations": validations, "kept_round": final.round,
                     "self_training": [{"round": r.round, "pseudo_images": r.pseudo_images,
                                        "pseudo_boxes": r.pseudo_boxes, **r.metrics} for r in history],
                     "params": params.model_dump(mode="json")})
        output.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    create_table_artifact(key="train-detector-validation",
                          table=[{"domain": v["domain"], "method": v["method"], "images": v["images"], "class": c,
                                  "mAP50": v["per_class_mAP50"].get(c)} for v in validations for c in CLASS_NAMES
                                 if c in v["per_class_mAP50"]]
                          + [{"domain": v["domain"], "method": v["method"], "images": v["images"], "class": "all",
                              "mAP50": v["mAP50"]} for v in validations],
                          description="per-class mAP50 of the written weights, per image domain, each class on the "
                                      "held-out images annotated for it")
    lines = ["| round | pseudo images | pseudo boxes | mAP50 |", "|---|---|---|---|"]
    lines += [f"| {r.round} | {r.pseudo_images} | {r.pseudo_boxes} | {r.metrics['mAP50']} |" for r in history]
    create_markdown_artifact(key="train-detector-rounds", markdown="\n".join(lines),
                             description="held-out mAP50 (real photographs when held out, else synthetic) after each "
                                         "self-training round")
    logger.info("wrote %s (round %d of %d); validations: %s", output, final.round, len(history) - 1,
                "; ".join(f"{v['domain']} {v['method']} mAP50 {v['mAP50']}" for v in validations) or "none")
    return meta
