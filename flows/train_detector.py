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
import shutil
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from fundus_engine import importers, training_data
from fundus_engine import train as training
from fundus_engine.config import TrainDetectorParams
from fundus_engine.vocabulary import CLASS_NAMES


@task(task_run_name="import-labelled")
def import_labelled(params: TrainDetectorParams, work: str) -> list[importers.LabelledImage]:
    logger = get_run_logger()
    named = training_data.labelled_sources(params, Path(work))
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


@task(task_run_name="cross-validate-{params.folds}-folds")
def cross_validate(items: list[importers.LabelledImage], synthetic_train: list[importers.LabelledImage],
                   params: TrainDetectorParams, work: str) -> dict:
    return training.cross_validate(items, synthetic_train, params, work, log=get_run_logger().info)


@task(task_run_name="self-train-{params.self_training_rounds}-rounds")
def train_rounds(items: list[importers.LabelledImage], held: list[importers.LabelledImage], method: str,
                 everything: list[importers.LabelledImage], params: TrainDetectorParams, work: str
                 ) -> list[training.Round]:
    """Train (and self-train) on `items`; every round is scored per domain on `held`."""
    work_dir = Path(work)
    unlabelled = training_data.self_training_pool(Path(params.unlabelled), everything, held) if params.unlabelled else []
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
        train_items, held, method = training_data.hold_out(items, params)
        cross = None
        if params.folds:
            cross = cross_validate(items, [i for i in train_items if i.synthetic], params, work)
        history = train_rounds(train_items, held, method, items, params, work)
        # Pseudo-labels from a teacher that misses a lesion class teach that class as background
        # (measured in bench/self_training.py), so a round is kept only if it validates better.
        final = max(history, key=lambda r: (r.metrics["mAP50"], -r.round))
        validations = ([cross] if cross else []) + final.metrics["validations"]
        output = Path(params.output)
        meta = training.write_weights(final, history, output, validations, items, train_items, params)
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
