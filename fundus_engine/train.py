"""Train and evaluate YOLO detectors offline, and produce the demo detector shipped in the package.

Weights are written next to a metadata JSON (class names, image size, training-data hash,
metrics) so a weights file is never separated from what it was trained on.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fundus_engine.config import IMAGE_EXTENSIONS, TrainDetectorParams
from fundus_engine.decoding import decode_bgr
from fundus_engine.detect import resolve_device
from fundus_engine.importers import LabelledImage
from fundus_engine.models import LabelBox
from fundus_engine.synth import generate
from fundus_engine.training_data import kfold, write_yolo_dataset
from fundus_engine.vocabulary import ANATOMY, CLASS_NAMES, canonical_class
from fundus_engine.yolo import ultralytics


def dataset_sha256(root: Path) -> str:
    """Hash of the training images and labels, recorded with the weights."""
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and path.suffix.lower() in (*IMAGE_EXTENSIONS, ".txt"):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def train_detector(data_yaml: Path, out: Path, epochs: int, imgsz: int = 512, batch: int = 16,
                   model: str = "yolo11n.yaml", seed: int = 0) -> Path:
    """Train from scratch (a .yaml model, no weight download) or on from local .pt weights, on CPU
    or GPU; returns the last weights, with a metadata JSON beside them."""
    ul = ultralytics()
    import torch

    device = "0" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="fundus-train-"))
    start = time.monotonic()
    yolo = ul.YOLO(model)
    yolo.train(data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=batch, device=device, amp=False, plots=False,
               workers=0, project=str(work), name="run", exist_ok=True, val=False, seed=seed, verbose=False)
    trained = work / "run" / "weights" / "last.pt"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(trained, out)
    shutil.rmtree(work, ignore_errors=True)
    meta = {"class_names": list(CLASS_NAMES), "imgsz": imgsz, "epochs": epochs, "base_model": model,
            "train_seconds": round(time.monotonic() - start, 1),
            "training_data_sha256": dataset_sha256(Path(data_yaml).parent)}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return out


def validate(weights: Path, data_yaml: Path, imgsz: int = 512, split: str = "val") -> dict:
    """mAP50 overall and per class (with box counts) of weights on a dataset's split."""
    ul = ultralytics()
    with tempfile.TemporaryDirectory(prefix="fundus-val-") as tmp:
        model = ul.YOLO(str(weights))
        metrics = model.val(data=str(data_yaml), imgsz=imgsz, batch=8, device=resolve_device("auto"), plots=False,
                            workers=0, verbose=False, project=tmp, name="val", split=split)
    per_class = {model.names[int(c)]: round(float(metrics.box.ap50[i]), 4)
                 for i, c in enumerate(metrics.box.ap_class_index)}
    return {"mAP50": round(float(metrics.box.map50), 4), "mAP50_95": round(float(metrics.box.map), 4),
            "per_class_mAP50": per_class}


def validate_items(weights: Path, items: list[LabelledImage], imgsz: int, work: Path) -> dict[str, float]:
    """mAP50 per class on labelled images, each class scored only on the images annotated for
    it: an IDRiD photograph (disc and hard exudates annotated) is no evidence about the
    detector's haemorrhages, so it neither counts its haemorrhage boxes as false nor missing.
    Classes with no box among those images have no AP and are left out. One ultralytics
    validation per distinct set of images (usually one)."""
    subsets: dict[tuple[int, ...], list[str]] = {}
    for label in CLASS_NAMES:
        subset = tuple(n for n, item in enumerate(items) if item.annotates(label))
        if subset:
            subsets.setdefault(subset, []).append(label)
    found: dict[str, float] = {}
    for g, (subset, labels) in enumerate(subsets.items()):
        data = write_yolo_dataset([items[n] for n in subset], Path(work) / f"subset{g}", val_fraction=1.0,
                                  max_side=imgsz)
        per_class = validate(weights, data, imgsz)["per_class_mAP50"]
        found.update({label: per_class[label] for label in labels if label in per_class})
    return {label: found[label] for label in CLASS_NAMES if label in found}


def validation_entry(domain: str, items: list[LabelledImage], method: str, per_class: dict[str, float]) -> dict:
    """One `validations` record of the weights metadata (read by `fundus_engine.detect.validations`)."""
    return {"domain": domain, "datasets": sorted({i.dataset or "unnamed" for i in items}), "images": len(items),
            "method": method, "mAP50": round(sum(per_class.values()) / len(per_class), 4) if per_class else None,
            "per_class_mAP50": per_class}


def domain_validations(weights: Path, held_out: list[LabelledImage], imgsz: int, work: Path,
                       method: str = "held-out split") -> list[dict]:
    """Held-out images split by domain, one record each: "real" from real photographs only,
    "synthetic" from images generated by fundus_engine.synth only, never the two mixed."""
    entries = []
    for domain in ("real", "synthetic"):
        part = [i for i in held_out if bool(i.synthetic) == (domain == "synthetic")]
        per_class = validate_items(weights, part, imgsz, Path(work) / domain) if part else {}
        if per_class:
            entries.append(validation_entry(domain, part, method, per_class))
    return entries


def headline_map50(entries: list[dict]) -> float:
    """The figure a round or a run is judged by: mAP50 on real photographs when measured, else synthetic."""
    for domain in ("real", "synthetic"):
        for entry in entries:
            if entry["domain"] == domain and entry.get("mAP50") is not None:
                return entry["mAP50"]
    return 0.0


def evaluate_detector(weights: Path, n: int = 64, seed: int = 90_000, imgsz: int = 512) -> dict:
    """mAP50 overall and per class on a fresh synthetic set the detector never saw."""
    with tempfile.TemporaryDirectory(prefix="fundus-heldout-") as tmp:
        generate(Path(tmp), n, seed=seed, size=imgsz)
        return {**validate(weights, Path(tmp) / "dataset.yaml", imgsz), "images": n, "seed": seed}


def strip_for_shipping(weights: Path) -> None:
    """Drop the optimizer state and store fp16, as ultralytics does for released weights."""
    from ultralytics.utils.torch_utils import strip_optimizer

    ultralytics()
    strip_optimizer(str(weights))


def build_demo_detector(out: Path, n_train: int = 240, epochs: int = 45, seed: int = 1000) -> dict:
    """Reproduce the shipped demo detector (about an hour on 2 CPU cores)."""
    with tempfile.TemporaryDirectory(prefix="fundus-demo-") as tmp:
        generate(Path(tmp), n_train, seed=seed)
        train_detector(Path(tmp) / "dataset.yaml", out, epochs=epochs)
    strip_for_shipping(out)
    metrics = evaluate_detector(out)
    meta_path = Path(out).with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta.update({"train_images": n_train, "train_seed": seed, "synthetic_validation": metrics})
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


def export_onnx(weights: Path, imgsz: int = 512) -> Path:
    """An ONNX copy of the weights for onnxruntime inference (the `onnx` extra); ultralytics
    writes the class names into its metadata, so `detect.weights: x.onnx` just works. The
    metadata JSON (what the detector was validated on) is copied beside it: the same model
    is trusted on the same classes."""
    ul = ultralytics()
    exported = Path(ul.YOLO(str(weights)).export(format="onnx", imgsz=imgsz, dynamic=True, simplify=False,
                                                 device="cpu", verbose=False))
    meta = Path(weights).with_suffix(".json")
    if meta.is_file() and meta.resolve() != exported.with_suffix(".json").resolve():
        shutil.copy(meta, exported.with_suffix(".json"))
    return exported


def pseudo_labels(weights: Path, images: list[Path], confidence: float, imgsz: int = 512, batch: int = 16
                  ) -> list[LabelledImage]:
    """Confident predictions on unlabelled images, as labels for the next round (one disc, cup
    and fovea per image, as in the detect stage). The model sees the pixels the detect stage
    reads (`decoding.decode_bgr`: 16-bit data scaled, not cut to its high byte); an image the
    detect stage would reject (grayscale, undecodable) gets no labels."""
    model = ultralytics().YOLO(str(weights))
    labelled = []
    for start in range(0, len(images), batch):
        chunk = [(path, pixels) for path in images[start:start + batch] if (pixels := _pixels(path)) is not None]
        if not chunk:
            continue
        for (path, _), result in zip(chunk, model.predict([pixels for _, pixels in chunk], imgsz=imgsz,
                                                          conf=confidence, device=resolve_device("auto"),
                                                          verbose=False)):
            height, width = result.orig_shape
            found = sorted(zip(result.boxes.conf.tolist(), result.boxes.cls.tolist(), result.boxes.xyxy.tolist()),
                           reverse=True)
            boxes, seen = [], set()
            for _, cls, xyxy in found:
                label = canonical_class(model.names[int(cls)])
                if label in ANATOMY and label in seen:
                    continue
                seen.add(label)
                boxes.append(LabelBox(label=label, xyxy=[round(v, 1) for v in xyxy]))
            labelled.append(LabelledImage(image=Path(path), width=width, height=height, boxes=boxes,
                                          source=f"pseudo:{Path(weights).name}"))
    return labelled


def _pixels(path: Path):
    """The pixels the detect stage would read, or None where it would reject the image."""
    try:
        return decode_bgr(Path(path))
    except ValueError:
        return None


@dataclass
class Round:
    round: int
    labelled_images: int
    pseudo_images: int
    pseudo_boxes: int
    weights: Path
    metrics: dict


def self_train(labelled: list[LabelledImage], unlabelled: list[Path], held_out: Path | None, work: Path, rounds: int,
               confidence: float = 0.5, epochs: int = 20, imgsz: int = 512, batch: int = 16,
               base_model: str = "yolo11n.yaml", seed: int = 0, first_epochs: int | None = None,
               evaluate: Callable[[Path], dict] | None = None, max_side: int | None = None) -> list[Round]:
    """Train on the labelled set, then `rounds` times: pseudo-label the unlabelled pool with the
    latest weights (boxes at or above `confidence`), and train on from those weights with
    labelled + pseudo-labelled images. Every round is validated on the same held-out set (the
    `held_out` dataset.yaml, or `evaluate(weights)` returning metrics with an "mAP50"). A
    teacher that finds nothing yields no pseudo-labels, so round 0 may get `first_epochs`.
    `max_side`: training images are stored downscaled to it (see write_yolo_dataset)."""
    work = Path(work)
    if evaluate is None:
        if held_out is None:
            raise ValueError("self_train needs a held-out dataset.yaml or an evaluate function")
        evaluate = lambda weights: validate(weights, held_out, imgsz)  # noqa: E731
    data = write_yolo_dataset(labelled, work / "round0" / "data", val_fraction=0, max_side=max_side)
    weights = train_detector(data, work / "round0" / "weights.pt", first_epochs or epochs, imgsz, batch, base_model, seed)
    history = [Round(0, len(labelled), 0, 0, weights, evaluate(weights))]
    for r in range(1, rounds + 1):
        pseudo = [p for p in pseudo_labels(weights, unlabelled, confidence, imgsz, batch) if p.boxes]
        data = write_yolo_dataset(labelled + pseudo, work / f"round{r}" / "data", val_fraction=0, max_side=max_side)
        weights = train_detector(data, work / f"round{r}" / "weights.pt", epochs, imgsz, batch, str(weights), seed)
        history.append(Round(r, len(labelled), len(pseudo), sum(len(p.boxes) for p in pseudo), weights,
                             evaluate(weights)))
    return history


def cross_validate(items: list[LabelledImage], synthetic_train: list[LabelledImage],
                   params: TrainDetectorParams, work: str,
                   log: Callable[[str], None] = print) -> dict:
    """k-fold cross-validation on the real photographs: fold f's detector is trained on the other
    folds (plus the synthetic training images) and scored on fold f, class by class on the images
    annotated for it; the record gives each fold and, per class, the mean over the folds where the
    class has boxes."""
    real = [i for i in items if not i.synthetic]
    if not real:
        raise ValueError("folds: cross-validation needs real photographs; every labelled image is synthetic")
    folds = kfold(real, params.folds, params.seed)
    per_fold = []
    for f, held in enumerate(folds):
        fold_dir = Path(work) / f"fold{f}"
        trained_on = [i for g, fold in enumerate(folds) if g != f for i in fold] + synthetic_train
        data = write_yolo_dataset(trained_on, fold_dir / "data", val_fraction=0, max_side=params.imgsz)
        weights = train_detector(data, fold_dir / "weights.pt", params.epochs, params.imgsz, params.batch,
                                 params.base_model, params.seed)
        per_class = validate_items(weights, held, params.imgsz, fold_dir / "val")
        per_fold.append({"fold": f, **validation_entry("real", held, "held-out fold", per_class)})
        log(f"fold {f + 1}/{params.folds}: {len(held)} real images held out, per-class mAP50 {per_class}")
        shutil.rmtree(fold_dir, ignore_errors=True)
    classes = [c for c in CLASS_NAMES if any(c in f["per_class_mAP50"] for f in per_fold)]
    mean = {c: round(sum(aps) / len(aps), 4)
            for c in classes if (aps := [f["per_class_mAP50"][c] for f in per_fold if c in f["per_class_mAP50"]])}
    entry = validation_entry("real", real, f"k-fold cross-validation (k={params.folds})", mean)
    entry["folds"] = [{k: v for k, v in f.items() if k not in ("domain", "method")} for f in per_fold]
    return entry


def write_weights(final: Round, history: list[Round], output: Path, validations: list[dict],
                  items: list[LabelledImage], trained: list[LabelledImage], params: TrainDetectorParams) -> dict:
    """The kept round's weights at `output`, stripped for shipping, and beside them the metadata
    JSON that is the detector's evidence (what it was trained and validated on, every round)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(final.weights, output)
    strip_for_shipping(output)
    meta = json.loads(final.weights.with_suffix(".json").read_text())
    meta.update({"labelled_images": len(items), "real_images": sum(not i.synthetic for i in items),
                 "trained_images": len(trained), "validations": validations, "kept_round": final.round,
                 "self_training": [{"round": r.round, "pseudo_images": r.pseudo_images,
                                    "pseudo_boxes": r.pseudo_boxes, **r.metrics} for r in history],
                 "params": params.model_dump(mode="json")})
    output.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return meta
