"""Masks of a public dataset layout as a build's labels (`ingest.label_layouts`): the IDRiD
photographs of ../shared/real_fundus built from their own folder, their disc and hard-exudate
masks read from the dataset's root, matched by content."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from flows.build_fundusgen import build_fundusgen
from fundus_engine.config import BuildConfig
from fundus_engine.crop import box_999
from fundus_engine.labels import load_labels
from fundus_engine.layout_labels import MIN_AREA, layout_items, with_layout_boxes
from fundus_engine.layouts import from_layout
from fundus_engine.importers import LabelledImage
from fundus_engine.models import BenchmarkQuestion, Detection, ImageRecord, InstructionRecord, LabelBox
from fundus_engine.photo_files import scan, sha256_file
from fundus_engine.runner import RunContext, plan_build
from fundus_engine.tables import read_rows

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "real_fundus"
pytestmark = pytest.mark.usefixtures("prefect_local")


@pytest.fixture(scope="module")
def idrid(tmp_path_factory):
    out = tmp_path_factory.mktemp("idrid") / "out"
    config = BuildConfig(ingest={"label_layouts": [str(REAL)]})
    manifest = build_fundusgen(str(REAL / "images" / "IDRiD"), str(out), config)
    masks = {sha256_file(i.image): i for i in from_layout(REAL, min_area=MIN_AREA) if i.dataset == "IDRiD"}
    return out, manifest, masks


def test_the_masks_boxes_are_the_boxes_the_records_state(idrid):
    out, manifest, masks = idrid
    assert len(masks) == 20 and manifest["labels"]["matched_images"] == 20
    images = read_rows(sorted((out / "stages" / "ingest").glob("*.images.parquet")), ImageRecord)
    assert all(i.labelled_classes == ["hard_exudate", "optic_disc"] and i.clustered_classes == ["hard_exudate"]
               for i in images) and len(images) == 20
    found = read_rows(sorted((out / "stages" / "detect").glob("*.detections.parquet")), Detection)
    for sha, item in masks.items():
        expected = sorted((b.label, [round(v, 1) for v in b.xyxy]) for b in item.boxes)
        mine = sorted((d.label, [round(v, 1) for v in d.xyxy]) for d in found
                      if d.sha256 == sha and d.label in ("optic_disc", "hard_exudate"))
        assert mine == expected and all(d.source == "ground_truth" for d in found
                                        if d.sha256 == sha and d.label in ("optic_disc", "hard_exudate"))
        assert sum(b.label == "hard_exudate" for b in item.boxes) >= 1  # every IDRiD photograph here has exudates
    records = read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)
    located = [r for r in records if r.task == "region_detection" and r.boxes and r.boxes[0].label == "hard_exudate"]
    assert len(located) >= 10  # asked on most photographs (region questions are sampled)
    for r in located:
        item = masks[r.sha256]
        width, height = item.width, item.height
        assert sorted(b.box_999 for b in r.boxes) == sorted(box_999(b.xyxy, width, height) for b in item.boxes
                                                             if b.label == "hard_exudate")


def test_what_the_masks_do_not_annotate_is_never_stated_absent(idrid):
    out, _, masks = idrid
    records = read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)
    assert {r.sha256 for r in records} == set(masks)
    answers = [t.value for r in records for t in r.conversations if t.from_ == "gpt"]
    stated = [a for a in answers if "hard exudate" in a.lower()]
    assert len(stated) >= 60
    for answer in answers:
        assert not re.search(r"\bno (hard exudate|microaneurysm|haemorrhage|drusen|cotton|soft exudate)|\babsent:|"
                             r"\bthe absence of\b|normal fundus|no lesion is seen", answer, re.I), answer
    # a box from a mask may hold several exudates: the records say in how many areas, never how many
    assert not [r for r in records if r.task == "counting"]
    assert not [a for a in answers if re.search(r"\b\d+ hard exudates?\b|\(\d+\)", a, re.I)]
    assert sum(bool(re.search(r"\b\d+ areas? of <ref>Hard exudate|hard exudates in \d+ areas?", a)) for a in answers) >= 60
    attributes = [r.conversations[0].value for r in records if r.task == "lesion_attribute"]
    named = [q for q in attributes if "exudate" in q]  # some ask of "the lesion at <box>"
    assert named and all("area of hard exudates at <box>" in q for q in named)
    benchmark = read_rows([out / "benchmark" / "test.parquet"], BenchmarkQuestion)
    assert benchmark and not [q for q in benchmark if q.clinical_task == "Counting"]
    # the masks give no grade: no diagnosis is stated, and the records say why
    assert all(r.diagnosis is None for r in records)
    chains = [r for r in records if r.task == "cognitive_chain"]
    assert len(chains) == 20 and all("not determined" in r.conversations[-1].value for r in chains)


def test_layout_boxes_join_a_manifest_entry_of_the_same_photograph(tmp_path):
    """A photograph in the labels manifest (its grade, its patient) and in a layout: one entry
    with both, the layout's classes annotated."""
    idrid = REAL / "images" / "IDRiD"
    (tmp_path / "labels.csv").write_text("image,patient_id,dr_grade\nIDRiD_03.jpg,P7,2\n")
    labels, rejects = load_labels(tmp_path, BuildConfig().ingest)
    assert not rejects
    sources, _ = scan(idrid)
    items, rejects = layout_items([str(REAL)], idrid, sources)
    assert sorted(items) == sorted(s.relpath for s in sources) and len(items) == 20 and not rejects
    entry = with_layout_boxes(labels["IDRiD_03.jpg"], items["IDRiD_03.jpg"])
    assert entry["dr_grade"] == 2 and entry["patient_id"] == labels["IDRiD_03.jpg"]["patient_id"]
    assert entry["labelled_classes"] == ["hard_exudate", "optic_disc"]
    assert entry["label_boxes"] == items["IDRiD_03.jpg"][0].boxes
    assert len(entry["_from"]["boxes"]) == len(entry["label_boxes"])  # each box named for the checks at ingest
    assert labels["IDRiD_03.jpg"]["label_boxes"] == []  # the manifest's entry is left as it was


def test_a_folder_in_no_known_layout_stops_the_build_naming_it(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "nothing").mkdir()
    config = BuildConfig(ingest={"label_layouts": [str(tmp_path / "nothing")]})
    ctx = RunContext.create(tmp_path / "in", tmp_path / "out", config, run_id="x")
    with pytest.raises(ValueError, match=re.escape(f"ingest.label_layouts: {tmp_path / 'nothing'}: ")):
        plan_build(ctx)


def test_the_dataset_root_as_input_reads_its_masks_as_labels_not_as_photographs(tmp_path):
    """../shared/real_fundus itself as the input, its own layout as labels: the 69 photographs,
    and not one of its 93 mask files among them nor among the rejects (grayscale, before)."""
    config = BuildConfig(ingest={"label_layouts": ["."], "labels": "images/labels.csv"})
    plan = plan_build(RunContext.create(REAL, tmp_path / "out", config, run_id="x"))
    relpaths = [s.relpath for shard in plan.shards for s in shard.sources]
    assert len(relpaths) == 69 and all(r.startswith("images/") for r in relpaths)
    assert plan.rejects == [] and plan.labelled_images == 28  # 20 IDRiD (masks) + 8 EyePACS (images/labels.csv)


def _layout(root: Path, masks: dict[str, dict[str, list[tuple[int, int, int, int]]]], size=(200, 150)) -> Path:
    """`images/DS/<id>.png` + `masks/DS/<id>__<class>.png` with the given rectangles (x1, y1, x2, y2)."""
    import cv2
    import numpy as np

    for n, (stem, classes) in enumerate(masks.items()):
        (root / "images" / "DS").mkdir(parents=True, exist_ok=True)
        (root / "masks" / "DS").mkdir(parents=True, exist_ok=True)
        pixels = np.full((size[1], size[0], 3), (40, 60, 150), np.uint8)
        pixels[0, 0] = (n, 0, 0)
        cv2.imwrite(str(root / "images" / "DS" / f"{stem}.png"), pixels)
        for label, rects in classes.items():
            mask = np.zeros((size[1], size[0]), np.uint8)
            for x1, y1, x2, y2 in rects:
                mask[y1:y2, x1:x2] = 255
            cv2.imwrite(str(root / "masks" / "DS" / f"{stem}__{label}.png"), mask)
    return root


def test_every_annotated_piece_is_a_box_once_and_a_bad_mask_costs_only_its_image(tmp_path):
    """A 2x2 microaneurysm is a box (training would drop it as a speck, and the class would read
    as absent); the same photograph in two layouts gives its boxes once; a manifest's own boxes of
    a class stand, and that class is counted; a mask of another size rejects its image alone; a
    relative folder is read from the input folder; a folder that matches nothing is a reject."""
    import cv2

    root = _layout(tmp_path / "in" / "data", {"a": {"microaneurysm": [(10, 10, 12, 12)], "hard_exudate": [(50, 50, 70, 60)]},
                                            "b": {"microaneurysm": [(30, 30, 34, 34)]}})
    copy = _layout(tmp_path / "copy", {"a": {"microaneurysm": [(10, 10, 12, 12)], "hard_exudate": [(50, 50, 70, 60)]}})
    cv2.imwrite(str(root / "masks" / "DS" / "b__microaneurysm.png"), cv2.imread(str(root / "masks" / "DS" / "b__microaneurysm.png"))[:50])
    elsewhere = _layout(tmp_path / "other", {"z": {"drusen": [(5, 5, 9, 9)]}}, size=(120, 90))
    broken = _layout(tmp_path / "broken", {"y": {"drusen": [(5, 5, 9, 9)]}}, size=(120, 90))  # not an input photograph
    cv2.imwrite(str(broken / "masks" / "DS" / "y__drusen.png"), cv2.imread(str(broken / "masks" / "DS" / "y__drusen.png"))[:20])
    sources, _ = scan(tmp_path / "in")
    items, rejects = layout_items(["data", str(copy), str(elsewhere), str(broken), "data"], tmp_path / "in", sources)
    assert sorted(items) == ["data/images/DS/a.png"] and len(items["data/images/DS/a.png"]) == 2
    # b: a photograph of the input whose mask is of another size; elsewhere and broken: no photograph
    # of the input (broken's only image, its mask unusable, is not the build's to reject); "data" once
    assert sorted((r.item.rsplit("/", 1)[-1], r.reason.split(":")[1].strip()) for r in rejects) == [
        ("b.png", "its masks in data are not used"),
        ("broken", "no photograph of the input folder is in this layout; its labels are not used"),
        ("other", "no photograph of the input folder is in this layout; its labels are not used")]
    assert next(r.item for r in rejects if r.item.endswith("b.png")) == "data/images/DS/b.png"
    assert "must match its image pixel for pixel" in next(r.reason for r in rejects if r.item.endswith("b.png"))
    merged = with_layout_boxes(None, items["data/images/DS/a.png"])
    assert sorted((b.label, b.xyxy) for b in merged["label_boxes"]) == [
        ("hard_exudate", [50.0, 50.0, 70.0, 60.0]), ("microaneurysm", [10.0, 10.0, 12.0, 12.0])]
    assert merged["labelled_classes"] == ["hard_exudate", "microaneurysm"]
    assert merged["clustered_classes"] == ["hard_exudate", "microaneurysm"]
    manifest = {"_from": {"boxes": [0], "entry": "labels.json entry for a"}, "labelled_classes": ["microaneurysm"],
                "label_boxes": [LabelBox(label="microaneurysm", xyxy=[9, 9, 13, 13])]}
    kept = with_layout_boxes(manifest, items["data/images/DS/a.png"])
    assert sorted((b.label, b.xyxy) for b in kept["label_boxes"]) == [
        ("hard_exudate", [50.0, 50.0, 70.0, 60.0]), ("microaneurysm", [9.0, 9.0, 13.0, 13.0])]
    assert kept["clustered_classes"] == ["hard_exudate"]  # the manifest's microaneurysm is one lesion: counted
    assert len(kept["_from"]["boxes"]) == len(kept["label_boxes"])
    # a microaneurysm box given without annotating the class: the masks' join it, and all are areas
    partial = with_layout_boxes({**manifest, "labelled_classes": []}, items["data/images/DS/a.png"])
    assert sorted(b.xyxy for b in partial["label_boxes"] if b.label == "microaneurysm") == [[9, 9, 13, 13],
                                                                                         [10, 10, 12, 12]]
    assert partial["clustered_classes"] == ["hard_exudate", "microaneurysm"]
    no_classes = LabelledImage(items["data/images/DS/a.png"][0].image, 200, 150, [], "yolo:x", ())
    assert with_layout_boxes(None, [no_classes])["labelled_classes"] == []  # annotates nothing, not everything
