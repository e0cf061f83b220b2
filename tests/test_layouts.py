"""Public dataset layouts recognised by their naming (fundus_engine.layouts): tiny hand-made
copies of each layout, so every box is known exactly, and the real photographs of
../shared/real_fundus read in place (never copied into the repository)."""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_engine.mask_boxes import mask_to_boxes
from fundus_engine.layouts import detect_layout, from_layout, label_folders
from fundus_engine.photo_files import scan
from fundus_engine.synth import generate

REAL_FUNDUS = Path(__file__).resolve().parents[1].parent / "shared" / "real_fundus"
W, H = 60, 40  # every fixture image


def image(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((H, W, 3), 50, np.uint8)
    pixels[0, 0] = (shade % 256, shade // 256, 9)  # distinct bytes per image
    assert cv2.imwrite(str(path), pixels)
    return path


def mask(path: Path, *blobs: tuple[int, int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((H, W), np.uint8)
    for x1, y1, x2, y2 in blobs:
        pixels[y1:y2, x1:x2] = 255
    assert cv2.imwrite(str(path), pixels)
    return path


def by_name(items) -> dict[str, object]:
    return {Path(i.image).name: i for i in items}


def photos(root: Path) -> list[str]:
    """What a build with the layout as its input and its labels reads as photographs: its masks
    are labels, so they are neither photographs nor grayscale rejects."""
    sources, rejects = scan(root, exclude=label_folders(root))
    # the fixtures' tiny JPEGs may encode alike: a copy is scanned, and rejected as a duplicate
    assert all(r.reason.startswith("duplicate") for r in rejects), rejects
    return sorted([s.relpath for s in sources] + [Path(r.item).relative_to(root).as_posix() for r in rejects])


def boxes(item) -> list[tuple[str, list[float]]]:
    return [(b.label, b.xyxy) for b in item.boxes]


# ------------------------------------------------------------------------------------------ IDRiD

@pytest.fixture
def idrid(tmp_path):
    root = tmp_path / "IDRiD"
    seg = root / "A. Segmentation"
    for n in (1, 2):
        image(seg / "1. Original Images" / "a. Training Set" / f"IDRiD_{n:02d}.jpg", n)
    image(root / "B. Disease Grading" / "1. Original Images" / "a. Training Set" / "IDRiD_001.jpg", 9)  # no masks
    gt = seg / "2. All Segmentation Groundtruths" / "a. Training Set"
    mask(gt / "1. Microaneurysms" / "IDRiD_01_MA.tif", (2, 2, 4, 4), (30, 30, 33, 32))
    mask(gt / "2. Haemorrhages" / "IDRiD_02_HE.tif", (10, 10, 20, 15))
    mask(gt / "3. Hard Exudates" / "IDRiD_01_EX.tif", (40, 5, 45, 9))
    (gt / "4. Soft Exudates").mkdir(parents=True)  # IDRiD ships no mask for an image without soft exudates
    mask(gt / "5. Optic Disc" / "IDRiD_01_OD.tif", (5, 20, 20, 35))
    mask(gt / "5. Optic Disc" / "IDRiD_02_OD.tif", (40, 20, 55, 35), (0, 0, 2, 2))  # a speck beside the disc
    return root


def test_idrid_segmentation_layout(idrid):
    assert detect_layout(idrid) == "idrid"
    items = by_name(from_layout(idrid, merge_fraction=None, min_area=1))
    assert sorted(items) == ["IDRiD_01.jpg", "IDRiD_02.jpg"]  # the grading image has no masks: not imported
    one, two = items["IDRiD_01.jpg"], items["IDRiD_02.jpg"]
    assert boxes(one) == [("optic_disc", [5.0, 20.0, 20.0, 35.0]), ("microaneurysm", [2.0, 2.0, 4.0, 4.0]),
                          ("microaneurysm", [30.0, 30.0, 33.0, 32.0]), ("hard_exudate", [40.0, 5.0, 45.0, 9.0])]
    assert boxes(two) == [("optic_disc", [40.0, 20.0, 55.0, 35.0]),  # anatomy: the largest component only
                          ("haemorrhage", [10.0, 10.0, 20.0, 15.0])]
    for item in (one, two):
        assert item.annotated_classes == ("optic_disc", "microaneurysm", "haemorrhage", "hard_exudate",
                                          "soft_exudate")
        assert item.dataset == "IDRiD" and item.synthetic is False and (item.width, item.height) == (W, H)
    assert "IDRiD_01_MA.tif" in one.source
    assert photos(idrid) == ["A. Segmentation/1. Original Images/a. Training Set/IDRiD_01.jpg",
                             "A. Segmentation/1. Original Images/a. Training Set/IDRiD_02.jpg",
                             "B. Disease Grading/1. Original Images/a. Training Set/IDRiD_001.jpg"]



def test_boxes_from_masks_are_kept_in_the_user_cache_by_content(idrid, tmp_path, monkeypatch):
    """A build reads its layouts' masks whenever it is planned: the second time from the cache,
    and a mask whose bytes changed is read again."""
    from fundus_engine import importers

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = from_layout(idrid, merge_fraction=None, min_area=1)
    assert len(list((tmp_path / "cache" / "fundus-engine" / "mask-boxes").glob("*.json"))) == 5  # one per mask set
    read = importers.mask_files_to_boxes

    def not_again(*args, **kwargs):
        raise AssertionError("a cached mask was read again")

    monkeypatch.setattr(importers, "mask_files_to_boxes", not_again)
    assert from_layout(idrid, merge_fraction=None, min_area=1) == first
    with pytest.raises(AssertionError, match="read again"):  # other settings: another key
        from_layout(idrid, merge_fraction=0.5, min_area=1)
    calls = []
    monkeypatch.setattr(importers, "mask_files_to_boxes", lambda *a, **k: calls.append(a[2]) or read(*a, **k))
    gt = idrid / "A. Segmentation" / "2. All Segmentation Groundtruths" / "a. Training Set"
    mask(gt / "3. Hard Exudates" / "IDRiD_01_EX.tif", (40, 5, 45, 9), (1, 30, 6, 36))
    again = by_name(from_layout(idrid, merge_fraction=None, min_area=1))
    assert calls == ["hard_exudate"]
    assert [b.xyxy for b in again["IDRiD_01.jpg"].boxes if b.label == "hard_exudate"] == [[40.0, 5.0, 45.0, 9.0],
                                                                                        [1.0, 30.0, 6.0, 36.0]]

def test_merge_fraction_is_relative_to_the_image_width(idrid):
    # the two microaneurysms of IDRiD_01 are 26 px apart edge to edge (hypot(26, 26) ~ 36.8)
    assert len([b for b in from_layout(idrid, merge_fraction=0.5, min_area=1)[0].boxes
                if b.label == "microaneurysm"]) == 2  # 0.5 * 60 = 30 px < 36.8
    merged = [b.xyxy for b in from_layout(idrid, merge_fraction=0.7, min_area=1)[0].boxes if b.label == "microaneurysm"]
    assert merged == [[2.0, 2.0, 33.0, 32.0]]  # 42 px > 36.8


def test_default_min_area_scales_with_the_image(idrid):
    # 60 px wide: max(4, 4 * 0.06^2) = 4 px, so the 2x2 microaneurysm and the 2x2 speck stay ...
    one = from_layout(idrid, merge_fraction=None)[0]
    assert [b.xyxy for b in one.boxes if b.label == "microaneurysm"] == [[2.0, 2.0, 4.0, 4.0], [30.0, 30.0, 33.0, 32.0]]
    # ... while an explicit min_area drops it
    two = from_layout(idrid, merge_fraction=None, min_area=5)[0]
    assert [b.xyxy for b in two.boxes if b.label == "microaneurysm"] == [[30.0, 30.0, 33.0, 32.0]]


# -------------------------------------------------------------------------------------------- DDR

def voc(path: Path, objects: list[tuple[str, int, int, int, int]]) -> None:
    body = "".join(f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
                   f"<ymax>{d}</ymax></bndbox></object>" for n, a, b, c, d in objects)
    path.write_text(f"<annotation><filename>{path.stem}.jpg</filename>{body}</annotation>")


def test_ddr_segmentation_and_detection(tmp_path):
    root = tmp_path / "DDR-dataset"
    for split, name, shade in (("train", "007-1", 1), ("valid", "007-2", 2)):
        image(root / "lesion_segmentation" / split / "image" / f"{name}.jpg", shade)
        for kind in ("EX", "HE", "MA", "SE"):
            (root / "lesion_segmentation" / split / "label" / kind).mkdir(parents=True, exist_ok=True)
    mask(root / "lesion_segmentation" / "train" / "label" / "EX" / "007-1.tif", (1, 1, 6, 6))
    mask(root / "lesion_segmentation" / "valid" / "label" / "SE" / "007-2.tif", (20, 20, 30, 25))
    det = root / "lesion_detection" / "train"
    image(det / "007-9.jpg", 3)
    voc(det / "007-9.xml", [("HE", 3, 4, 10, 12), ("MA", 30, 30, 33, 33)])
    image(det / "007-1.jpg", 1)  # also in the segmentation set: taken from there, once
    voc(det / "007-1.xml", [("EX", 0, 0, 50, 30)])
    image(det / "007-8.jpg", 4)  # no xml: not imported
    assert detect_layout(tmp_path) == "ddr"
    items = by_name(from_layout(tmp_path, merge_fraction=None))
    assert sorted(items) == ["007-1.jpg", "007-2.jpg", "007-9.jpg"]
    assert boxes(items["007-1.jpg"]) == [("hard_exudate", [1.0, 1.0, 6.0, 6.0])]
    assert "lesion_segmentation" in str(items["007-1.jpg"].image)
    assert boxes(items["007-2.jpg"]) == [("soft_exudate", [20.0, 20.0, 30.0, 25.0])]
    assert boxes(items["007-9.jpg"]) == [("haemorrhage", [3.0, 4.0, 10.0, 12.0]),
                                         ("microaneurysm", [30.0, 30.0, 33.0, 33.0])]
    for item in items.values():
        assert set(item.annotated_classes) == {"microaneurysm", "haemorrhage", "hard_exudate", "soft_exudate"}
        assert item.dataset == "DDR"
    assert photos(tmp_path) == ["DDR-dataset/lesion_detection/train/007-1.jpg",
                                "DDR-dataset/lesion_detection/train/007-8.jpg",
                                "DDR-dataset/lesion_detection/train/007-9.jpg",
                                "DDR-dataset/lesion_segmentation/train/image/007-1.jpg",
                                "DDR-dataset/lesion_segmentation/valid/image/007-2.jpg"]


def test_ddr_voc_unknown_class_names_the_file(tmp_path):
    det = tmp_path / "lesion_detection" / "test"
    image(det / "1.jpg")
    voc(det / "1.xml", [("IRMA", 1, 1, 5, 5)])
    with pytest.raises(ValueError, match=r"1\.xml.*IRMA"):
        from_layout(tmp_path)
    image(det / "2.jpg", 2)
    voc(det / "2.xml", [("EX", 1, 1, 5, 5)])
    skipped = []  # as a build reads it: the image left out and said why, the others read
    assert [Path(i.image).name for i in from_layout(tmp_path, skipped=skipped)] == ["2.jpg"]
    assert [(p.name, "IRMA" in why) for p, why in skipped] == [("1.jpg", True)]
    with pytest.raises(ValueError, match=r"1\.xml.*IRMA"):  # and a later call without `skipped` raises again
        from_layout(tmp_path)


# ------------------------------------------------------------------------------------------ FGADR

def test_fgadr_seg_set_skips_irma_with_a_log_line(tmp_path, caplog):
    seg = tmp_path / "FGADR" / "Seg-set"
    image(seg / "Original_Images" / "0001_1.png", 1)
    image(seg / "Original_Images" / "0002_1.png", 2)
    mask(seg / "Microaneurysms_Masks" / "0001_1.png", (1, 1, 4, 4))
    mask(seg / "Hemohedge_Masks" / "0002_1.png", (5, 5, 15, 12))
    mask(seg / "HardExudate_Masks" / "0001_1.png", (30, 10, 36, 16))
    mask(seg / "SoftExudate_Masks" / "0002_1.png")  # an empty mask: no soft exudate
    mask(seg / "Neovascularization_Masks" / "0002_1.png", (40, 20, 58, 38))
    mask(seg / "IRMA_Masks" / "0001_1.png", (10, 10, 20, 20))
    assert detect_layout(tmp_path / "FGADR") == "fgadr"
    with caplog.at_level(logging.INFO, logger="fundus_engine.layouts"):
        items = by_name(from_layout(tmp_path / "FGADR", merge_fraction=None))
    assert "IRMA" in caplog.text and "not in the vocabulary" in caplog.text
    assert boxes(items["0001_1.png"]) == [("microaneurysm", [1.0, 1.0, 4.0, 4.0]),
                                          ("hard_exudate", [30.0, 10.0, 36.0, 16.0])]
    assert boxes(items["0002_1.png"]) == [("haemorrhage", [5.0, 5.0, 15.0, 12.0]),
                                          ("neovascularisation", [40.0, 20.0, 58.0, 38.0])]
    assert items["0001_1.png"].annotated_classes == ("microaneurysm", "haemorrhage", "hard_exudate", "soft_exudate",
                                                     "neovascularisation")
    assert {i.dataset for i in items.values()} == {"FGADR"}
    assert photos(tmp_path / "FGADR") == ["Seg-set/Original_Images/0001_1.png", "Seg-set/Original_Images/0002_1.png"]


# --------------------------------------------------------------------------------------- e-ophtha

def test_eophtha_ex_and_ma_subsets(tmp_path):
    ex, ma = tmp_path / "e_optha_EX", tmp_path / "e_optha_MA"
    image(ex / "EX" / "E0001" / "DS01.jpg", 1)
    mask(ex / "Annotation_EX" / "E0001" / "DS01_EX.png", (10, 10, 14, 13))
    image(ex / "healthy" / "E0002" / "DS02.jpg", 2)
    image(ma / "MA" / "E0003" / "C01.jpg", 3)
    mask(ma / "Annotation_MA" / "E0003" / "C01.png", (50, 30, 53, 33))
    image(ma / "MA" / "E0004" / "C01.jpg", 4)  # same file name, another patient: no lesion mask
    image(ma / "healthy" / "E0005" / "C05.jpg", 5)
    assert detect_layout(tmp_path) == "e-ophtha"
    items = {(Path(i.image).parent.name, Path(i.image).name): i for i in from_layout(tmp_path, merge_fraction=None)}
    assert len(items) == 5
    assert boxes(items["E0001", "DS01.jpg"]) == [("hard_exudate", [10.0, 10.0, 14.0, 13.0])]
    assert boxes(items["E0003", "C01.jpg"]) == [("microaneurysm", [50.0, 30.0, 53.0, 33.0])]
    assert boxes(items["E0004", "C01.jpg"]) == [] and boxes(items["E0002", "DS02.jpg"]) == []
    for key in (("E0001", "DS01.jpg"), ("E0002", "DS02.jpg")):
        assert items[key].annotated_classes == ("hard_exudate",)
    for key in (("E0003", "C01.jpg"), ("E0004", "C01.jpg"), ("E0005", "C05.jpg")):
        assert items[key].annotated_classes == ("microaneurysm",)
    assert {i.dataset for i in items.values()} == {"e-ophtha"}
    assert len(photos(tmp_path)) == 5 and not any("Annotation" in p for p in photos(tmp_path))


# ------------------------------------------------------------------- images/<DATASET> + masks/<DATASET>

def test_real_fundus_layout_by_double_underscore_names(tmp_path, caplog):
    image(tmp_path / "images" / "IDRiD" / "IDRiD_01.jpg", 1)
    image(tmp_path / "images" / "IDRiD" / "IDRiD_02.jpg", 2)
    mask(tmp_path / "masks" / "IDRiD" / "IDRiD_01__optic_disc.png", (5, 5, 20, 20))
    mask(tmp_path / "masks" / "IDRiD" / "IDRiD_01__hard_exudate.png", (30, 30, 35, 34))
    mask(tmp_path / "masks" / "IDRiD" / "IDRiD_02__optic_disc.png", (35, 5, 50, 20))  # no exudate mask: none
    image(tmp_path / "images" / "DRIVE" / "21_training.tif", 3)
    mask(tmp_path / "masks" / "DRIVE" / "21_training__vessels.png", (0, 0, 60, 2))
    image(tmp_path / "images" / "HRF" / "01_h.jpg", 4)  # no masks at all
    assert detect_layout(tmp_path) == "real_fundus"
    with caplog.at_level(logging.INFO, logger="fundus_engine.layouts"):
        items = by_name(from_layout(tmp_path))
    assert sorted(items) == ["IDRiD_01.jpg", "IDRiD_02.jpg"]  # DRIVE's vessels are not a vocabulary class
    assert "vessels" in caplog.text
    assert boxes(items["IDRiD_01.jpg"]) == [("optic_disc", [5.0, 5.0, 20.0, 20.0]),
                                            ("hard_exudate", [30.0, 30.0, 35.0, 34.0])]
    assert boxes(items["IDRiD_02.jpg"]) == [("optic_disc", [35.0, 5.0, 50.0, 20.0])]
    assert all(i.annotated_classes == ("optic_disc", "hard_exudate") and i.dataset == "IDRiD" for i in items.values())
    # every mask, of a vocabulary class or not (vessels), is a label, not a photograph
    assert photos(tmp_path) == ["images/DRIVE/21_training.tif", "images/HRF/01_h.jpg", "images/IDRiD/IDRiD_01.jpg",
                                "images/IDRiD/IDRiD_02.jpg"]


def test_yolo_folder_and_unknown_folder(tmp_path):
    generate(tmp_path / "synth", 2, seed=5, size=64)
    assert detect_layout(tmp_path / "synth") == "yolo"
    items = from_layout(tmp_path / "synth")
    assert len(items) == 2 and all(i.synthetic for i in items)  # marked by the generator
    (tmp_path / "other" / "pictures").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a layout this engine knows"):
        detect_layout(tmp_path / "other")
    with pytest.raises(ValueError, match="not a folder"):
        detect_layout(tmp_path / "missing")


# ------------------------------------------------------------------------ the real photographs

@pytest.mark.skipif(not REAL_FUNDUS.is_dir(), reason="../shared/real_fundus is not here")
def test_real_fundus_folder_gives_the_idrid_disc_and_exudates():
    assert detect_layout(REAL_FUNDUS) == "real_fundus"
    items = sorted(from_layout(REAL_FUNDUS), key=lambda i: Path(i.image).name)
    assert [Path(i.image).name for i in items] == [f"IDRiD_{n:02d}.jpg" for n in range(1, 21)]
    for item in items:
        assert item.dataset == "IDRiD" and item.synthetic is False
        assert item.annotated_classes == ("optic_disc", "hard_exudate")
        assert (item.width, item.height) == (4288, 2848)
        discs = [b.xyxy for b in item.boxes if b.label == "optic_disc"]
        assert len(discs) == 1
        x1, y1, x2, y2 = discs[0]
        assert 400 < x2 - x1 < 800 and 400 < y2 - y1 < 800  # about 1/7 of the width, as a disc is
    assert sum(b.label == "hard_exudate" for i in items for b in i.boxes) > 100
    # the disc box is the mask's bounding rectangle, exactly
    pixels = cv2.imread(str(REAL_FUNDUS / "masks" / "IDRiD" / "IDRiD_01__optic_disc.png"), cv2.IMREAD_GRAYSCALE)
    largest = max(mask_to_boxes(pixels), key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    assert [b.xyxy for b in items[0].boxes if b.label == "optic_disc"] == [largest]
