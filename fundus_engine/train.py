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
from pathlib import Path

from fundus_engine.synth import generate
from fundus_engine.vocabulary import CLASS_NAMES
from fundus_engine.yolo import ultralytics


def dataset_sha256(root: Path) -> str:
    """Hash of the training images and labels, recorded with the weights."""
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and path.suffix in (".jpg", ".png", ".txt"):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def train_detector(data_yaml: Path, out: Path, epochs: int, imgsz: int = 512, batch: int = 16,
                   model: str = "yolo11n.yaml", seed: int = 0) -> Path:
    """Train from scratch (a .yaml model, no weight download) on CPU or GPU; returns best weights."""
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


def evaluate_detector(weights: Path, n: int = 64, seed: int = 90_000, imgsz: int = 512) -> dict:
    """mAP50 overall and per class on a fresh synthetic set the detector never saw."""
    ul = ultralytics()
    with tempfile.TemporaryDirectory(prefix="fundus-val-") as tmp:
        generate(Path(tmp), n, seed=seed, size=imgsz)
        model = ul.YOLO(str(weights))
        metrics = model.val(data=str(Path(tmp) / "dataset.yaml"), imgsz=imgsz, batch=8, device="cpu", plots=False,
                            workers=0, verbose=False, project=tmp, name="val")
        per_class = {model.names[int(c)]: round(float(metrics.box.ap50[i]), 4)
                     for i, c in enumerate(metrics.box.ap_class_index)}
        return {"mAP50": round(float(metrics.box.map50), 4), "mAP50_95": round(float(metrics.box.map), 4),
                "images": n, "seed": seed, "per_class_mAP50": per_class}


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
    writes the class names into its metadata, so `detect.weights: x.onnx` just works."""
    ul = ultralytics()
    exported = ul.YOLO(str(weights)).export(format="onnx", imgsz=imgsz, dynamic=True, simplify=False, device="cpu",
                                            verbose=False)
    return Path(exported)
