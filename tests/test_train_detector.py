"""Detector training from imported datasets, self-training, pseudo-labels and the ONNX path:
real ultralytics runs on small generated data."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from flows.train_detector import TrainDetectorParams, train_detector
from fundus_engine.cli import app
from fundus_engine.config import DetectConfig, IngestConfig
from fundus_engine.detect import DEMO_WEIGHTS, detect
from fundus_engine.ingest import SourceFile, ingest, sha256_file
from fundus_engine.synth import generate
from fundus_engine.train import export_onnx, pseudo_labels
from fundus_engine.vocabulary import ANATOMY, CLASS_NAMES

pytestmark = pytest.mark.usefixtures("prefect_local")


def test_pseudo_labels_keep_confident_boxes_and_one_disc(tmp_path):
    truths = generate(tmp_path, 4, seed=808)
    images = [tmp_path / t.image for t in truths]
    loose = pseudo_labels(DEMO_WEIGHTS, images, confidence=0.1)
    strict = pseudo_labels(DEMO_WEIGHTS, images, confidence=0.7)
    assert [p.image for p in loose] == images and all(p.source.startswith("pseudo:") for p in loose)
    assert sum(len(p.boxes) for p in strict) < sum(len(p.boxes) for p in loose)
    for p in loose:
        anatomy = [b.label for b in p.boxes if b.label in ANATOMY]
        assert len(anatomy) == len(set(anatomy))
        assert "optic_disc" in anatomy  # the demo detector always finds the disc


@pytest.mark.slow
def test_train_detector_flow_imports_masks_trains_and_self_trains(tmp_path):
    # a labelled synthetic set plus an IDRiD-style mask folder, and an unlabelled pool
    generate(tmp_path / "yolo", 6, seed=3, size=256)
    masks_images, ex_masks = tmp_path / "idrid" / "images", tmp_path / "idrid" / "EX"
    masks_images.mkdir(parents=True)
    ex_masks.mkdir(parents=True)
    for t in generate(tmp_path / "idrid_src", 2, seed=9, size=256):
        stem = Path(t.image).stem
        shutil.copy(tmp_path / "idrid_src" / t.image, masks_images / f"{stem}.jpg")
        mask = np.zeros((256, 256), np.uint8)
        mask[100:110, 60:75] = 255
        cv2.imwrite(str(ex_masks / f"{stem}_EX.png"), mask)
    pool = tmp_path / "pool"
    generate(pool, 4, seed=21, size=256)
    shutil.rmtree(pool / "labels")
    out = tmp_path / "weights" / "fundus.pt"
    params = TrainDetectorParams(output=str(out), yolo=[str(tmp_path / "yolo")],
                                 masks=[{"images": str(masks_images), "masks": {"EX": str(ex_masks)}}],
                                 unlabelled=str(pool / "images"), self_training_rounds=1, pseudo_label_confidence=0.01,
                                 epochs=1, imgsz=256, batch=4, val_fraction=0.25)
    meta = train_detector(params)
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text()) == meta
    assert meta["class_names"] == list(CLASS_NAMES) and meta["imgsz"] == 256
    assert meta["labelled_images"] == 8
    rounds = meta["self_training"]
    assert [r["round"] for r in rounds] == [0, 1] and rounds[0]["pseudo_images"] == 0
    best = max(rounds, key=lambda r: (r["mAP50"], -r["round"]))  # a round that validates worse is not kept
    assert meta["kept_round"] == best["round"] and meta["validation"]["mAP50"] == best["mAP50"]
    assert "mAP50" in meta["validation"] and len(meta["training_data_sha256"]) == 64


def test_self_training_pool_leaves_out_labelled_and_held_out_images(tmp_path):
    from flows.train_detector import self_training_pool
    from fundus_engine.importers import from_yolo, split, write_yolo_dataset

    generate(tmp_path / "labelled", 3, seed=31, size=128)
    generate(tmp_path / "held", 2, seed=32, size=128)
    generate(tmp_path / "fresh", 2, seed=33, size=128)
    pool = tmp_path / "pool"
    pool.mkdir()
    copies = [*sorted((tmp_path / "labelled" / "images").glob("*.jpg"))[:1],
              *sorted((tmp_path / "held" / "images").glob("*.jpg")), *sorted((tmp_path / "fresh" / "images").glob("*.jpg"))]
    for n, image in enumerate(copies):
        shutil.copy(image, pool / f"pool_{n}.jpg")  # renamed: only the content can tell
    labelled = from_yolo(tmp_path / "labelled")
    assert [p.name for p in self_training_pool(pool, labelled, tmp_path / "held" / "dataset.yaml")] == \
        ["pool_3.jpg", "pool_4.jpg"]
    # The automatic split's held-out part (written out as a dataset) is excluded the same way.
    kept, kept_out = split(labelled, 0.34, seed=0)
    assert kept and kept_out
    for training_part, held_part in ((kept, kept_out), (kept_out, kept)):
        written = write_yolo_dataset(held_part, tmp_path / f"auto_{len(held_part)}", val_fraction=1.0)
        names = [p.name for p in self_training_pool(pool, training_part, written)]
        assert names == ["pool_1.jpg", "pool_2.jpg", "pool_3.jpg", "pool_4.jpg"]  # pool_0 is in one part or the other


def test_train_detector_cli_rejects_unknown_options_with_the_file(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"output": "w.pt", "epoch": 3}))
    result = CliRunner().invoke(app, ["train-detector", "--config", str(config)])
    assert result.exit_code == 2 and "train.yaml" in result.output and "epoch" in result.output


@pytest.mark.slow
def test_onnx_inference_agrees_with_pytorch(tmp_path):
    onnx_weights = export_onnx(shutil.copy(DEMO_WEIGHTS, tmp_path / "demo.pt"))
    assert onnx_weights.suffix == ".onnx"
    truths = generate(tmp_path / "images", 4, seed=99)
    sources = [SourceFile(t.image, sha256_file(tmp_path / "images" / t.image)) for t in truths]
    records, _ = ingest(tmp_path / "images", sources, {}, IngestConfig())
    torch_boxes, _ = detect(records, DetectConfig(batch=1))
    onnx_boxes, _ = detect(records, DetectConfig(weights=str(onnx_weights), batch=1))
    assert [(d.sha256, d.label) for d in torch_boxes] == [(d.sha256, d.label) for d in onnx_boxes]
    for a, b in zip(torch_boxes, onnx_boxes):
        assert np.abs(np.array(a.xyxy) - np.array(b.xyxy)).max() <= 2.0
        assert abs(a.confidence - b.confidence) <= 0.02
