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

from flows.train_detector import train_detector
from fundus_engine.config import TrainDetectorParams
from fundus_engine.cli import app
from fundus_engine.config import DetectConfig, IngestConfig
from fundus_engine.detect import DEMO_WEIGHTS, detect
from fundus_engine.ingest import ingest
from fundus_engine.photo_files import SourceFile, sha256_file
from fundus_engine.importers import LabelledImage, from_yolo
from fundus_engine.synth import generate, is_synthetic
from fundus_engine.train import domain_validations, export_onnx, pseudo_labels, validate_items
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


def unmarked_copy(source: Path, target: Path) -> Path:
    """The generator's pixels without its mark: by the engine's rule, a real photograph. Tests
    use these where real photographs are needed, as none may be copied into the repository."""
    target.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(target), cv2.imread(str(source)))
    assert not is_synthetic(target)
    return target


@pytest.mark.slow
def test_train_detector_flow_imports_masks_trains_and_self_trains(tmp_path):
    # a labelled synthetic set plus an IDRiD-style mask folder of "real" photographs, and an unlabelled pool
    generate(tmp_path / "yolo", 6, seed=3, size=256)
    masks_images, ex_masks = tmp_path / "idrid" / "images", tmp_path / "idrid" / "EX"
    ex_masks.mkdir(parents=True)
    for t in generate(tmp_path / "idrid_src", 2, seed=9, size=256):
        stem = Path(t.image).stem
        unmarked_copy(tmp_path / "idrid_src" / t.image, masks_images / f"{stem}.jpg")
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
    assert meta["labelled_images"] == 8 and meta["real_images"] == 2
    rounds = meta["self_training"]
    assert [r["round"] for r in rounds] == [0, 1] and rounds[0]["pseudo_images"] == 0
    best = max(rounds, key=lambda r: (r["mAP50"], -r["round"]))  # a round that validates worse is not kept
    assert meta["kept_round"] == best["round"] and meta["validations"] == best["validations"]
    assert "validation" not in meta and len(meta["training_data_sha256"]) == 64
    real, synthetic = meta["validations"]
    # one of the two real photographs held out, scored only on the class its masks annotate
    assert real["domain"] == "real" and real["images"] == 1 and real["datasets"] == ["idrid"]
    assert real["method"] == "held-out split" and list(real["per_class_mAP50"]) == ["hard_exudate"]
    assert best["mAP50"] == real["mAP50"]  # rounds are judged on real photographs when some are held out
    assert synthetic["domain"] == "synthetic" and synthetic["datasets"] == ["yolo"] and synthetic["images"] >= 1


def test_self_training_pool_leaves_out_labelled_and_held_out_images(tmp_path):
    from fundus_engine.training_data import self_training_pool
    from fundus_engine.importers import from_yolo
    from fundus_engine.training_data import split, write_yolo_dataset

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


def test_train_detector_cli_takes_layout_folders_and_folds(tmp_path):
    result = CliRunner().invoke(app, ["train-detector", "--out", "w.pt", "--dataset", str(tmp_path), "--folds", "1"])
    assert result.exit_code == 2 and "folds: 1 is no cross-validation" in result.output


@pytest.mark.slow
def test_onnx_inference_agrees_with_pytorch(tmp_path):
    shutil.copy(DEMO_WEIGHTS.with_suffix(".json"), tmp_path / "demo.json")
    onnx_weights = export_onnx(shutil.copy(DEMO_WEIGHTS, tmp_path / "demo.pt"))
    assert onnx_weights.suffix == ".onnx"
    assert onnx_weights.with_suffix(".json").read_text() == DEMO_WEIGHTS.with_suffix(".json").read_text()
    truths = generate(tmp_path / "images", 4, seed=99)
    sources = [SourceFile(t.image, sha256_file(tmp_path / "images" / t.image)) for t in truths]
    records, _ = ingest(tmp_path / "images", sources, {}, IngestConfig())
    torch_boxes, _ = detect(records, DetectConfig(batch=1))
    onnx_boxes, _ = detect(records, DetectConfig(weights=str(onnx_weights), batch=1))
    assert [(d.sha256, d.label) for d in torch_boxes] == [(d.sha256, d.label) for d in onnx_boxes]
    for a, b in zip(torch_boxes, onnx_boxes):
        assert np.abs(np.array(a.xyxy) - np.array(b.xyxy)).max() <= 2.0
        assert abs(a.confidence - b.confidence) <= 0.02


# ----------------------------------------------------------- validations: domains, annotated classes


def weights_validations(weights: Path) -> list[dict]:
    try:  # the reader of the metadata (moved from detect to evidence)
        from fundus_engine.evidence import validations
    except ImportError:
        from fundus_engine.detect import validations
    return validations(weights)


@pytest.fixture(scope="module")
def demo_held_out(tmp_path_factory):
    """Held-out images for the demo detector: synthetic ones (fully labelled) and unmarked copies
    of others, standing for real photographs of a dataset that annotates only the disc and fovea."""
    root = tmp_path_factory.mktemp("held")
    generate(root / "synth", 3, seed=808)
    generate(root / "src", 2, seed=809)
    synthetic = from_yolo(root / "synth")
    real = []
    for item in from_yolo(root / "src"):
        copy = unmarked_copy(item.image, root / "Eyes" / "images" / Path(item.image).name)
        real.append(LabelledImage(copy, item.width, item.height, [b for b in item.boxes if b.label in ANATOMY],
                                  annotated_classes=("optic_disc", "optic_cup", "fovea"), dataset="Eyes"))
    return synthetic, real


def test_domain_validations_never_mix_real_and_synthetic(demo_held_out, tmp_path):
    synthetic, real = demo_held_out
    entries = domain_validations(DEMO_WEIGHTS, synthetic + real, 512, tmp_path)
    assert [e["domain"] for e in entries] == ["real", "synthetic"]
    real_entry, synthetic_entry = entries
    assert real_entry["images"] == 2 and real_entry["datasets"] == ["Eyes"]
    assert real_entry["method"] == "held-out split"
    assert set(real_entry["per_class_mAP50"]) <= set(ANATOMY)  # only what those photographs annotate
    assert real_entry["per_class_mAP50"]["optic_disc"] > 0.5  # the demo detector finds the disc
    assert synthetic_entry["images"] == 3 and any(c not in ANATOMY for c in synthetic_entry["per_class_mAP50"])
    assert real_entry["mAP50"] == round(sum(real_entry["per_class_mAP50"].values()) / len(real_entry["per_class_mAP50"]), 4)
    assert domain_validations(DEMO_WEIGHTS, synthetic, 512, tmp_path / "synthetic only")[0]["domain"] == "synthetic"


def test_a_class_is_scored_only_on_images_annotated_for_it(demo_held_out, tmp_path):
    synthetic, _ = demo_held_out
    full, partial = synthetic[0], synthetic[1]
    # `partial` stands for an image whose dataset annotates only the disc: its lesions are unlabelled
    disc_only = LabelledImage(partial.image, partial.width, partial.height,
                              [b for b in partial.boxes if b.label == "optic_disc"], annotated_classes=("optic_disc",))
    both = validate_items(DEMO_WEIGHTS, [disc_only, full], 512, tmp_path / "both")
    alone = validate_items(DEMO_WEIGHTS, [full], 512, tmp_path / "alone")
    lesions = [c for c in alone if c not in ANATOMY]
    assert lesions and {c: both[c] for c in lesions} == {c: alone[c] for c in lesions}
    assert "optic_disc" in both


@pytest.mark.parametrize("extra, message", [
    ({"folds": 1}, "folds: 1 is no cross-validation"),
    ({"folds": 3, "held_out": "x/dataset.yaml"}, "one or the other"),
    ({"folds": 3, "self_training_rounds": 1}, "not cross-validated"),
])
def test_params_reject_folds_that_cannot_work(extra, message):
    with pytest.raises(ValueError, match=message):
        TrainDetectorParams(output="w.pt", **extra)


@pytest.mark.slow
def test_cross_validated_flow_records_real_and_synthetic_validations(tmp_path):
    # four "real" photographs in the images/<DATASET> + masks/<DATASET>/<id>__<class>.png layout, disc and
    # hard exudates annotated as in ../shared/real_fundus, plus synthetic images
    layout = tmp_path / "real_fundus"
    for n, truth in enumerate(generate(tmp_path / "src", 4, seed=77, size=128)):
        unmarked_copy(tmp_path / "src" / truth.image, layout / "images" / "IDRiD" / f"IDRiD_{n:02d}.jpg")
        for label in ("optic_disc", "hard_exudate"):
            mask = np.zeros((128, 128), np.uint8)
            for box in truth.boxes:
                if box.label == label:
                    x1, y1, x2, y2 = map(int, box.xyxy)
                    mask[y1:y2, x1:x2] = 255
            (layout / "masks" / "IDRiD").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(layout / "masks" / "IDRiD" / f"IDRiD_{n:02d}__{label}.png"), mask)
    out = tmp_path / "w.pt"
    meta = train_detector(TrainDetectorParams(output=str(out), datasets=[str(layout)], synthetic=4, folds=2,
                                              epochs=1, imgsz=128, batch=4))
    assert "validation" not in meta and meta["real_images"] == 4 and meta["labelled_images"] == 8
    real, synthetic = meta["validations"]
    assert real["domain"] == "real" and real["method"] == "k-fold cross-validation (k=2)"
    assert real["datasets"] == ["IDRiD"] and real["images"] == 4
    assert [f["images"] for f in real["folds"]] == [2, 2]
    assert "optic_disc" in real["per_class_mAP50"] and set(real["per_class_mAP50"]) <= {"optic_disc", "hard_exudate"}
    for name, mean in real["per_class_mAP50"].items():
        scores = [f["per_class_mAP50"][name] for f in real["folds"] if name in f["per_class_mAP50"]]
        assert mean == round(sum(scores) / len(scores), 4)
    assert synthetic["domain"] == "synthetic" and synthetic["method"] == "held-out split"
    assert synthetic["datasets"] == ["synthetic"] and synthetic["images"] >= 1
    assert weights_validations(out) == meta["validations"]
    assert json.loads(out.with_suffix(".json").read_text()) == meta


def test_pseudo_labels_of_a_12_bit_photograph_are_those_of_its_8_bit_original(tmp_path):
    """Pseudo-labels come from the pixels the detect stage reads (`decoding.decode_bgr`); given
    the path, ultralytics kept the high byte of 16-bit data and saw the photograph nearly black."""
    truths = generate(tmp_path / "synth", 2, seed=808)
    images = []
    for i, truth in enumerate(truths):
        bgr = cv2.imread(str(tmp_path / "synth" / truth.image))
        assert cv2.imwrite(str(tmp_path / f"eye{i}.png"), bgr)
        assert cv2.imwrite(str(tmp_path / f"eye{i}_12bit.png"), bgr.astype(np.uint16) * 16)
        images += [tmp_path / f"eye{i}.png", tmp_path / f"eye{i}_12bit.png"]
    labelled = pseudo_labels(DEMO_WEIGHTS, images, confidence=0.25)
    assert [p.image for p in labelled] == images
    for original, deep in zip(labelled[::2], labelled[1::2]):
        assert original.boxes and deep.boxes == original.boxes
