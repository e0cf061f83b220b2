"""Real YOLO: the shipped demo detector on fresh synthetic images, and a short real training run."""
from __future__ import annotations

import json

import pytest

from fundus_engine.config import DetectConfig, IngestConfig
from fundus_engine.detect import DEMO_WEIGHTS, detect, load_model
from fundus_engine.ingest import ingest
from fundus_engine.photo_files import SourceFile, sha256_file
from fundus_engine.synth import generate
from fundus_engine.train import evaluate_detector, train_detector
from fundus_engine.vocabulary import CLASS_NAMES


def test_shipped_detector_metadata_records_its_validation():
    meta = json.loads(DEMO_WEIGHTS.with_suffix(".json").read_text())
    assert meta["class_names"] == list(CLASS_NAMES)
    (validation,) = meta["validations"]  # measured on synthetic images only, and it says so
    assert validation["domain"] == "synthetic" and validation["mAP50"] >= 0.5 and validation["images"] == 64
    assert DEMO_WEIGHTS.stat().st_size < 12 * 2**20  # stripped, ships in the package


@pytest.mark.slow
def test_shipped_detector_finds_anatomy_on_unseen_images():
    metrics = evaluate_detector(DEMO_WEIGHTS, n=16, seed=123_456)
    assert metrics["per_class_mAP50"]["optic_disc"] >= 0.8
    assert metrics["per_class_mAP50"]["fovea"] >= 0.8
    assert metrics["mAP50"] >= 0.35  # 16 images: a loose floor under the 64-image figure in the metadata


def test_detect_stage_uses_model_boxes_and_keeps_one_disc(tmp_path):
    truths = generate(tmp_path, 4, seed=77)
    sources = [SourceFile(t.image, sha256_file(tmp_path / t.image)) for t in truths]
    records, rejects = ingest(tmp_path, sources, {}, IngestConfig())
    assert not rejects
    detections, rejects = detect(records, DetectConfig(batch=3))
    assert not rejects
    for record, truth in zip(records, truths):
        mine = [d for d in detections if d.sha256 == record.sha256]
        discs = [d for d in mine if d.label == "optic_disc"]
        assert len(discs) == 1 and discs[0].source == "model"
        (true_disc,) = [b.xyxy for b in truth.boxes if b.label == "optic_disc"]
        centre = [(discs[0].xyxy[0] + discs[0].xyxy[2]) / 2, (discs[0].xyxy[1] + discs[0].xyxy[3]) / 2]
        assert true_disc[0] <= centre[0] <= true_disc[2] and true_disc[1] <= centre[1] <= true_disc[3]
        assert [d.region_id for d in mine] == [f"{record.sha256[:12]}-{i:03d}" for i in range(len(mine))]


@pytest.mark.slow
def test_short_training_run_writes_loadable_weights_and_metadata(tmp_path):
    generate(tmp_path / "data", 8, seed=5, size=256)
    weights = train_detector(tmp_path / "data" / "dataset.yaml", tmp_path / "w" / "tiny.pt", epochs=1, imgsz=256,
                             batch=4)
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert meta["class_names"] == list(CLASS_NAMES) and meta["epochs"] == 1 and meta["imgsz"] == 256
    assert len(meta["training_data_sha256"]) == 64
    model = load_model(weights)
    assert list(model.names.values()) == list(CLASS_NAMES)


def test_lesion_only_labels_keep_their_boxes_and_the_model_adds_the_anatomy(tmp_path):
    from fundus_engine.models import LabelBox

    truths = generate(tmp_path, 2, seed=77)
    sources = [SourceFile(t.image, sha256_file(tmp_path / t.image)) for t in truths]
    records, _ = ingest(tmp_path, sources, {}, IngestConfig())
    lesion = LabelBox(label="hard_exudate", xyxy=[100.0, 100.0, 120.0, 112.0])
    records = [records[0].model_copy(update={"label_boxes": [lesion]}), records[1]]
    detections, _ = detect(records, DetectConfig())
    first = [d for d in detections if d.sha256 == records[0].sha256]
    assert [(d.label, d.xyxy, d.source) for d in first if d.label == "hard_exudate"] == \
        [("hard_exudate", lesion.xyxy, "ground_truth")]
    assert {d.source for d in first if d.label == "optic_disc"} == {"model"}
    assert [d.region_id for d in first] == [f"{records[0].sha256[:12]}-{i:03d}" for i in range(len(first))]


def test_anatomy_only_labels_still_get_lesions_from_the_model(tmp_path):
    """REFUGE/ADAM-style labels box the disc and fovea only: the model must still find lesions,
    and an image labelled for every class is not sent to the model at all."""
    from fundus_engine.models import LabelBox

    truths = generate(tmp_path, 6, seed=11)
    truth = max(truths, key=lambda t: sum(b.label in ("haemorrhage", "soft_exudate") for b in t.boxes))
    records, _ = ingest(tmp_path, [SourceFile(truth.image, sha256_file(tmp_path / truth.image))], {}, IngestConfig())
    anatomy = [LabelBox(label=b.label, xyxy=b.xyxy) for b in truth.boxes if b.label in ("optic_disc", "fovea")]
    anatomy_only = records[0].model_copy(update={"label_boxes": anatomy, "labelled_classes": ["fovea", "optic_disc"]})
    detections, _ = detect([anatomy_only], DetectConfig())
    assert {(d.label, d.source) for d in detections if d.label in ("optic_disc", "fovea")} == \
        {("optic_disc", "ground_truth"), ("fovea", "ground_truth")}
    assert any(d.source == "model" and d.label in ("haemorrhage", "soft_exudate") for d in detections)

    everything = [LabelBox(label=b.label, xyxy=b.xyxy) for b in truth.boxes]
    complete = records[0].model_copy(update={"label_boxes": everything, "labelled_classes": list(CLASS_NAMES)})
    detections, _ = detect([complete], DetectConfig(weights=str(tmp_path / "never-loaded.pt")))
    assert len(detections) == len(everything) and {d.source for d in detections} == {"ground_truth"}


def test_detect_stage_sees_the_pixels_ultralytics_reads_from_the_paths(tmp_path):
    """The stage decodes ahead of the model on worker threads; on 8-bit photographs its boxes are
    those of ultralytics given the paths, EXIF-rotated ones included."""
    from PIL import Image

    from fundus_engine.detect import _from_result

    truths = generate(tmp_path, 3, seed=4242)
    turned = tmp_path / "images" / "turned.jpg"
    with Image.open(tmp_path / truths[0].image) as im:
        exif = im.getexif()
        exif[0x0112] = 6  # stored on its side: shown turned 90 degrees clockwise
        im.save(turned, exif=exif, quality=95)
    sources = [SourceFile(t.image, sha256_file(tmp_path / t.image)) for t in truths]
    sources.append(SourceFile("images/turned.jpg", sha256_file(turned)))
    records, rejects = ingest(tmp_path, sources, {}, IngestConfig())
    assert not rejects and len(records) == 4
    config = DetectConfig(backend="torch", device="cpu", batch=3, ground_truth="ignore", out_of_domain="keep")
    found, rejects = detect(records, config)
    assert not rejects
    model = load_model(DEMO_WEIGHTS)
    expected = []
    for start in (0, 3):
        chunk = records[start:start + 3]
        results = model.predict([r.path for r in chunk], imgsz=512, conf=config.confidence, iou=config.iou,
                                device="cpu", batch=3, verbose=False)
        expected += [d for r, result in zip(chunk, results) for d in _from_result(r.sha256, result)]
    assert found == expected and len({d.sha256 for d in found}) == 4


def test_a_12_bit_photograph_in_a_16_bit_png_is_detected_as_its_8_bit_original(tmp_path):
    """The detector reads the pixels every stage reads (`decoding.decode_bgr`: 16-bit data scaled by
    its brightest value, which gives back these originals exactly: their brightest value is 255).
    PIL, which ultralytics uses for a path, keeps the high byte of 16-bit RGB, so a 12-bit
    photograph reached the model nearly black and lost every box."""
    import cv2
    import numpy as np

    truths = generate(tmp_path / "synth", 3, seed=7)
    for i, truth in enumerate(truths):
        bgr = cv2.imread(str(tmp_path / "synth" / truth.image))
        cv2.imwrite(str(tmp_path / f"eye{i}.png"), bgr)
        cv2.imwrite(str(tmp_path / f"eye{i}_12bit.png"), bgr.astype(np.uint16) * 16)  # 0..4080 of 65535
    sources = [SourceFile(p.name, sha256_file(p)) for p in sorted(tmp_path.glob("*.png"))]
    records, rejects = ingest(tmp_path, sources, {}, IngestConfig())
    assert not rejects and len(records) == 6
    found, rejects = detect(records, DetectConfig(ground_truth="ignore", out_of_domain="keep"))
    assert not rejects

    def boxes(name: str) -> list:
        (record,) = [r for r in records if r.relpath == name]
        return [(d.label, d.xyxy, d.confidence) for d in found if d.sha256 == record.sha256]

    for i in range(3):
        assert boxes(f"eye{i}.png") and boxes(f"eye{i}_12bit.png") == boxes(f"eye{i}.png")
