"""What a detector may say about a photograph depends on what it was validated on."""
from __future__ import annotations

import json
import shutil

from fundus_engine.config import DetectConfig
from fundus_engine.detect import DEMO_WEIGHTS, in_domain
from fundus_engine.evidence import (DetectorEvidence, assessed_lesions, counted_lesions, trusted_classes,
                                    validated_classes)
from fundus_engine.models import Anatomy, Detection, ImageRecord, LabelBox, Point, Quality, Region
from fundus_engine.vocabulary import CLASS_NAMES, LESIONS
from in_memory import domain_report

QUALITY = Quality(sharpness=40.0, exposure=0.3, fov_coverage=0.69, grade="good")


def _record(sha="ab", **kw) -> ImageRecord:
    return ImageRecord(**{**dict(sha256=sha * 32, path="/x.jpg", relpath="x.jpg", width=400, height=400,
                                 quality=QUALITY), **kw})


def test_the_demo_detector_is_trusted_only_on_synthetic_photographs():
    trusted = trusted_classes(DEMO_WEIGHTS, 0.5)
    assert trusted == {"synthetic": ["drusen", "fovea", "haemorrhage", "optic_disc", "soft_exudate"], "real": []}
    assert trusted_classes(DEMO_WEIGHTS, 0.995) == {"synthetic": ["optic_disc"], "real": []}
    assert validated_classes(DEMO_WEIGHTS) == {"synthetic": sorted(CLASS_NAMES), "real": []}


def test_a_real_validation_makes_it_trusted_on_real_photographs_per_class(tmp_path):
    weights = tmp_path / "w.pt"
    shutil.copy(DEMO_WEIGHTS, weights)
    meta = json.loads(DEMO_WEIGHTS.with_suffix(".json").read_text())
    meta["validations"] += [{"domain": "real", "datasets": ["IDRiD"], "images": 20,
                             "per_class_mAP50": {"optic_disc": 0.9, "hard_exudate": 0.55, "haemorrhage": 0.2,
                                                 "drusen": 0.01}}]
    weights.with_suffix(".json").write_text(json.dumps(meta))
    evidence = DetectorEvidence.of(weights, 0.5)
    real, synthetic = _record(), _record(synthetic=True)
    assert evidence.trusted_for(real) == ["hard_exudate", "optic_disc"]
    # drusen at 0.01: measured, but not found at all, so its boxes are out of domain too
    assert evidence.validated["real"] == ["haemorrhage", "hard_exudate", "optic_disc"]
    assert assessed_lesions(real, evidence) == ["hard_exudate"]
    assert assessed_lesions(synthetic, evidence) == ["haemorrhage", "soft_exudate", "drusen"]
    # not validated for every lesion class on real photographs: no diagnosis from its detections
    assert not evidence.grounds_diagnosis(real) and evidence.grounds_diagnosis(synthetic)
    assert evidence.grounds_diagnosis(real.model_copy(update={"labelled_classes": list(LESIONS)}))
    bare = tmp_path / "bare.pt"
    bare.write_bytes(b"")
    assert DetectorEvidence.of(bare, 0.5).trusted == {"synthetic": [], "real": []}  # no metrics, no trust


def test_with_the_labels_boxes_ignored_a_labelled_lesion_is_never_stated_absent():
    """`detect.ground_truth: ignore` states the detector's boxes: a lesion the labels box and the
    detector misses (every lesion on a real photograph, for the demo detector) must not read as
    absent, nor ground a diagnosis; a class the labels annotate with no box is absent either way."""
    labelled = _record(labelled_classes=list(LESIONS), clustered_classes=["hard_exudate"],
                       label_boxes=[LabelBox(label="hard_exudate", xyxy=[10, 10, 40, 40])])
    stated = DetectorEvidence.of(DEMO_WEIGHTS, 0.5)
    ignored = DetectorEvidence.of(DEMO_WEIGHTS, 0.5, labels_stated=False)
    assert assessed_lesions(labelled, stated) == list(LESIONS)
    assert assessed_lesions(labelled, ignored) == [c for c in LESIONS if c != "hard_exudate"]
    assert "hard_exudate" not in counted_lesions(labelled, stated)  # the masks' boxes are areas
    assert stated.grounds_diagnosis(labelled) and not ignored.grounds_diagnosis(labelled)
    # on a synthetic photograph the demo detector is trusted on drusen: its boxes there are counted
    synthetic = labelled.model_copy(update={"synthetic": True, "clustered_classes": ["drusen"],
                                            "label_boxes": [LabelBox(label="drusen", xyxy=[10, 10, 40, 40])]})
    assert "drusen" in counted_lesions(synthetic, ignored) and "drusen" not in counted_lesions(synthetic, stated)


def test_legacy_validation_counts_as_synthetic(tmp_path):
    weights = tmp_path / "old.pt"
    weights.write_bytes(b"")
    weights.with_suffix(".json").write_text(json.dumps({"validation": {"per_class_mAP50": {"drusen": 0.8}}}))
    assert trusted_classes(weights, 0.5) == {"synthetic": ["drusen"], "real": []}


def test_out_of_domain_boxes_are_dropped_except_the_landmarks():
    boxes = [Detection(sha256="ab" * 32, region_id=f"r{i}", label=label, xyxy=[1, 1, 9, 9], confidence=0.9,
                       source="model") for i, label in enumerate(("optic_disc", "optic_cup", "fovea", "drusen"))]
    assert [d.label for d in in_domain(boxes, [], DetectConfig())] == ["optic_disc", "fovea"]
    assert [d.label for d in in_domain(boxes, ["drusen"], DetectConfig())] == ["optic_disc", "fovea", "drusen"]
    assert in_domain(boxes, [], DetectConfig(out_of_domain="keep")) == boxes


def test_the_domain_report_warns_plainly_with_the_remedy():
    real, synthetic = _record("aa"), _record("bb", synthetic=True)
    anatomies = [Anatomy(sha256=real.sha256, laterality="OD", laterality_source="inferred",
                         disc_centre=Point(x=1, y=1), disc_diameter_px=10, disc_source="localiser"),
                 Anatomy(sha256=synthetic.sha256, laterality="OD", laterality_source="label",
                         disc_centre=Point(x=1, y=1), disc_diameter_px=10, disc_source="detector+localiser")]
    region = Region(sha256=synthetic.sha256, region_id="r", label="optic_disc", display="Optic disc",
                    xyxy=[0, 0, 2, 2], box_999=[0, 0, 5, 5], confidence=0.8, source="model", crop_path="c.jpg",
                    mean_rgb=[1, 2, 3], colour="red")
    evidence = DetectorEvidence.of(DEMO_WEIGHTS, 0.5)
    report = domain_report([real, synthetic], anatomies, [region], evidence)
    assert report["images"] == {"real": 1, "synthetic": 1}
    assert report["disc_source"] == {"real": {"localiser": 1}, "synthetic": {"detector+localiser": 1}}
    assert report["detector_mean_confidence"] == {"real": None, "synthetic": 0.8}
    assert report["out_of_domain"] and "out of its domain on 1 real photograph" in report["warning"]
    assert "Where the optic disc came from: localiser 1." in report["warning"] and "train-detector" in report["warning"]
    synthetic_only = domain_report([synthetic], anatomies[1:], [region], evidence)
    assert not synthetic_only["out_of_domain"] and synthetic_only["warning"] is None
