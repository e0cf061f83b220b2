"""Importers for public fundus lesion labels: masks, COCO and YOLO in; one YOLO dataset out.

Inputs are tiny hand-made images and masks, so every expected box is known exactly.
"""
from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from fundus_engine.importers import (
    LabelledImage,
    dataset_name,
    from_coco,
    from_masks,
    from_yolo,
)
from fundus_engine.mask_boxes import mask_to_boxes
from fundus_engine.models import LabelBox
from fundus_engine.training_data import kfold, merge, write_yolo_dataset
from fundus_engine.vocabulary import CLASS_NAMES

W, H = 40, 30  # every test image is 40 wide and 30 high


def write_image(path: Path, width: int = W, height: int = H, shade: int = 0) -> Path:
    """A small image whose bytes differ per `shade`, so the content-hash split sees distinct files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((height, width, 3), 40, np.uint8)
    image[0, 0] = (shade % 256, shade // 256, 7)
    assert cv2.imwrite(str(path), image)
    return path


def write_mask(path: Path, blobs: list[tuple[int, int, int, int]], value: int = 255,
               shape: tuple[int, int] = (H, W)) -> Path:
    """A mask with value in each (x1, y1, x2, y2) rectangle, x2/y2 exclusive."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(shape, np.uint8)
    for x1, y1, x2, y2 in blobs:
        mask[y1:y2, x1:x2] = value
    assert cv2.imwrite(str(path), mask)
    return path


def boxes_of(item: LabelledImage) -> list[tuple[str, list[float]]]:
    return [(b.label, b.xyxy) for b in item.boxes]


# ---------------------------------------------------------------------------------- mask_to_boxes

def test_mask_to_boxes_gives_exact_boxes_in_scan_order():
    mask = np.zeros((H, W), np.uint8)
    mask[2:5, 3:7] = 255  # 4 wide, 3 high
    mask[10:20, 20:25] = 255
    for i in range(4):  # a diagonal line: one blob only with 8-connectivity
        mask[25 + i, i] = 255
    assert mask_to_boxes(mask) == [[3.0, 2.0, 7.0, 5.0], [20.0, 10.0, 25.0, 20.0], [0.0, 25.0, 4.0, 29.0]]


def test_min_area_drops_specks():
    mask = np.zeros((H, W), np.uint8)
    mask[1, 1] = 1  # 1 px speck
    mask[5:7, 5:7] = 1  # 4 px
    mask[10:13, 10:13] = 1  # 9 px
    assert mask_to_boxes(mask) == [[5.0, 5.0, 7.0, 7.0], [10.0, 10.0, 13.0, 13.0]]
    assert mask_to_boxes(mask, min_area=5) == [[10.0, 10.0, 13.0, 13.0]]
    assert len(mask_to_boxes(mask, min_area=1)) == 3


def test_merge_distance_joins_close_fragments_only():
    mask = np.zeros((H, W), np.uint8)
    mask[0:3, 0:3] = 255  # A
    mask[0:3, 5:8] = 255  # B: 2 empty columns after A
    mask[0:3, 18:21] = 255  # C: 10 empty columns after B
    apart = [[0.0, 0.0, 3.0, 3.0], [5.0, 0.0, 8.0, 3.0], [18.0, 0.0, 21.0, 3.0]]
    assert mask_to_boxes(mask) == apart
    assert mask_to_boxes(mask, merge_distance=1.9) == apart
    assert mask_to_boxes(mask, merge_distance=2) == [[0.0, 0.0, 8.0, 3.0], [18.0, 0.0, 21.0, 3.0]]
    assert mask_to_boxes(mask, merge_distance=10) == [[0.0, 0.0, 21.0, 3.0]]


def test_merge_is_single_linkage_with_euclidean_edge_gap():
    mask = np.zeros((H, W), np.uint8)
    mask[0:2, 0:2] = 1  # A
    mask[6:8, 5:7] = 1  # B: 3 px right and 4 px below A's edges -> gap 5
    mask[12:14, 10:12] = 1  # C: gap 5 from B, far from A
    assert len(mask_to_boxes(mask, merge_distance=4.9)) == 3
    assert mask_to_boxes(mask, merge_distance=5) == [[0.0, 0.0, 12.0, 14.0]]  # A-B-C chained


def test_max_boxes_keeps_the_largest_in_scan_order():
    mask = np.zeros((40, 60), np.uint8)
    for x1, y1, x2, y2 in [(0, 0, 3, 3), (10, 0, 20, 8), (30, 0, 32, 2), (0, 20, 12, 30)]:
        mask[y1:y2, x1:x2] = 255
    assert mask_to_boxes(mask, min_area=1, max_boxes=2) == [[10.0, 0.0, 20.0, 8.0], [0.0, 20.0, 12.0, 30.0]]
    assert len(mask_to_boxes(mask, min_area=1, max_boxes=10)) == 4


def test_min_area_applies_before_merging():
    mask = np.zeros((H, W), np.uint8)
    mask[0:3, 0:3] = 1
    mask[1, 5] = 1  # a speck next to the blob must not stretch its box
    assert mask_to_boxes(mask, merge_distance=5) == [[0.0, 0.0, 3.0, 3.0]]


def test_merge_matches_brute_force_single_linkage():
    """Union-find clusters equal the transitive closure of 'gap <= eps', on random fragments."""
    rng = np.random.default_rng(1)
    mask = np.zeros((60, 80), np.uint8)
    for _ in range(25):
        x, y = rng.integers(0, 78), rng.integers(0, 58)
        mask[y:y + 2, x:x + 2] = 1
    fragments = mask_to_boxes(mask)
    eps = 3.0
    clusters = [[b] for b in fragments]
    changed = True
    while changed:  # naive agglomeration until no two clusters have a pair within eps
        changed = False
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                if any(np.hypot(max(0, max(a[0], b[0]) - min(a[2], b[2])), max(0, max(a[1], b[1]) - min(a[3], b[3])))
                       <= eps for a in clusters[i] for b in clusters[j]):
                    clusters[i] += clusters.pop(j)
                    changed = True
                    break
            if changed:
                break
    expected = sorted([min(b[0] for b in c), min(b[1] for b in c), max(b[2] for b in c), max(b[3] for b in c)]
                      for c in clusters)
    got = mask_to_boxes(mask, merge_distance=eps)
    assert sorted(got) == expected and 1 < len(got) < len(fragments)


def test_zero_one_and_zero_255_and_colour_masks_agree():
    ones = np.zeros((H, W), np.uint8)
    ones[4:9, 6:16] = 1
    colour = np.zeros((H, W, 3), np.uint8)
    colour[4:9, 6:16, 2] = 255  # only one channel set (red in BGR)
    expected = [[6.0, 4.0, 16.0, 9.0]]
    assert mask_to_boxes(ones) == expected
    assert mask_to_boxes(ones * 255) == expected
    assert mask_to_boxes(ones.astype(bool)) == expected
    assert mask_to_boxes(colour) == expected


def test_empty_mask_has_no_boxes():
    assert mask_to_boxes(np.zeros((H, W), np.uint8)) == []
    assert mask_to_boxes(np.zeros((H, W), np.uint8), merge_distance=3) == []


# ---------------------------------------------------------------------------------- from_masks

@pytest.fixture
def idrid(tmp_path):
    """IDRiD layout: images IDRiD_01.jpg, IDRiD_02.jpg; masks IDRiD_01_EX.tif etc. per class folder."""
    images = tmp_path / "1. Original Images"
    write_image(images / "IDRiD_01.jpg", shade=1)
    write_image(images / "IDRiD_02.jpg", shade=2)
    ex = tmp_path / "3. Hard Exudates"
    write_mask(ex / "IDRiD_01_EX.tif", [(3, 2, 7, 5), (20, 10, 25, 20)], value=1)  # IDRiD masks are 0/1
    write_mask(ex / "IDRiD_02_EX.tif", [])  # empty mask: no boxes, no error
    write_mask(ex / "IDRiD_99_EX.tif", [(0, 0, 5, 5)])  # no such image
    he = tmp_path / "2. Haemorrhages"
    write_mask(he / "IDRiD_01_HE.tif", [(30, 20, 36, 26)])
    return images, ex, he


def test_idrid_mask_matches_image_by_stem_and_suffix(idrid, caplog):
    images, ex, _ = idrid
    with caplog.at_level(logging.WARNING, logger="fundus_engine.importers"):
        items = from_masks(images, {"EX": ex})
    by_name = {i.image.name: i for i in items}
    assert sorted(by_name) == ["IDRiD_01.jpg", "IDRiD_02.jpg"]
    first = by_name["IDRiD_01.jpg"]
    assert (first.width, first.height) == (W, H)
    assert boxes_of(first) == [("hard_exudate", [3.0, 2.0, 7.0, 5.0]), ("hard_exudate", [20.0, 10.0, 25.0, 20.0])]
    assert "IDRiD_01_EX.tif" in first.source and first.source.startswith("masks:")
    assert by_name["IDRiD_02.jpg"].boxes == []
    assert f"mask {ex / 'IDRiD_99_EX.tif'} matches no image" in caplog.text


def test_mask_merge_distance_and_min_area_pass_through(tmp_path):
    images = tmp_path / "images"
    write_image(images / "a.png")
    write_mask(tmp_path / "ma" / "a.png", [(0, 0, 3, 3), (5, 0, 8, 3), (30, 25, 31, 26)])
    items = from_masks(images, {"microaneurysms": tmp_path / "ma"}, min_area=2, merge_distance=2)
    assert boxes_of(items[0]) == [("microaneurysm", [0.0, 0.0, 8.0, 3.0])]


def test_gif_mask_is_read(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    write_image(images / "image001.png")
    mask = np.zeros((H, W), np.uint8)
    mask[5:9, 10:14] = 255
    (tmp_path / "od").mkdir()
    Image.fromarray(mask).convert("P").save(tmp_path / "od" / "image001_mask.gif")
    assert boxes_of(from_masks(images, {"OD": tmp_path / "od"})[0]) == [("optic_disc", [10.0, 5.0, 14.0, 9.0])]


def test_mask_size_mismatch_names_both_files(tmp_path):
    images = tmp_path / "images"
    write_image(images / "IDRiD_05.jpg")
    write_mask(tmp_path / "EX" / "IDRiD_05_EX.tif", [(1, 1, 4, 4)], shape=(20, 20))
    with pytest.raises(ValueError, match=r"IDRiD_05_EX\.tif.*IDRiD_05\.jpg"):
        from_masks(images, {"EX": tmp_path / "EX"})


def test_refuge_multi_level_mask_gives_disc_and_cup(tmp_path):
    """REFUGE: one bmp per image, 255 background, 128 disc rim, 0 cup (inside the disc)."""
    images = tmp_path / "images"
    write_image(images / "g0001.jpg")
    mask = np.full((H, W), 255, np.uint8)
    mask[8:24, 10:30] = 128
    mask[12:18, 15:22] = 0
    (tmp_path / "Disc_Cup_Masks").mkdir()
    cv2.imwrite(str(tmp_path / "Disc_Cup_Masks" / "g0001.bmp"), mask)
    folder = tmp_path / "Disc_Cup_Masks"
    items = from_masks(images, {"optic_disc": folder, "optic_cup": folder},
                       levels={"optic_disc": [0, 128], "optic_cup": [0]})
    assert boxes_of(items[0]) == [("optic_disc", [10.0, 8.0, 30.0, 24.0]), ("optic_cup", [15.0, 12.0, 22.0, 18.0])]
    # Without levels every non-zero pixel is foreground: the background would become the "cup".
    plain = from_masks(images, {"optic_cup": folder})
    assert boxes_of(plain[0]) == [("optic_cup", [0.0, 0.0, float(W), float(H)])]
    with pytest.raises(ValueError, match=r"levels given for \['cup'\]"):
        from_masks(images, {"optic_disc": folder}, levels={"cup": [0]})


def test_unknown_mask_class_is_an_error(idrid):
    images, ex, _ = idrid
    with pytest.raises(ValueError, match="unknown class name 'banana'"):
        from_masks(images, {"banana": ex})


def test_merge_combines_per_class_mask_imports(idrid):
    images, ex, he = idrid
    merged = merge(from_masks(images, {"EX": ex}), from_masks(images, {"HE": he}))
    by_name = {i.image.name: i for i in merged}
    assert len(merged) == 2
    assert boxes_of(by_name["IDRiD_01.jpg"]) == [
        ("hard_exudate", [3.0, 2.0, 7.0, 5.0]),
        ("hard_exudate", [20.0, 10.0, 25.0, 20.0]),
        ("haemorrhage", [30.0, 20.0, 36.0, 26.0]),
    ]
    assert "IDRiD_01_EX.tif" in by_name["IDRiD_01.jpg"].source
    assert "IDRiD_01_HE.tif" in by_name["IDRiD_01.jpg"].source
    assert by_name["IDRiD_02.jpg"].boxes == []
    # one call with both folders says the same thing
    both = {i.image.name: boxes_of(i) for i in from_masks(images, {"EX": ex, "HE": he})}
    assert both == {name: boxes_of(i) for name, i in by_name.items()}


# ---------------------------------------------------------------------------------- COCO

@pytest.fixture
def coco(tmp_path):
    write_image(tmp_path / "imgs" / "one.jpg", shade=1)
    write_image(tmp_path / "imgs" / "two.jpg", shade=2)
    data = {
        "images": [{"id": 1, "file_name": "one.jpg", "width": W, "height": H},
                   {"id": 2, "file_name": "two.jpg", "width": W, "height": H}],
        "categories": [{"id": 1, "name": "hard exudates"}, {"id": 7, "name": "Haemorrhages"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 8], "iscrowd": 0, "area": 160},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [0.5, 1.5, 3, 4], "iscrowd": 1, "area": 12},
        ],
    }
    path = tmp_path / "ann" / "instances.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    return path, data


def test_coco_boxes_and_alias_categories(coco):
    path, _ = coco
    items = from_coco(path, path.parent.parent / "imgs")
    assert [i.image.name for i in items] == ["one.jpg", "two.jpg"]
    assert boxes_of(items[0]) == [("hard_exudate", [10.0, 5.0, 30.0, 13.0]), ("haemorrhage", [0.5, 1.5, 3.5, 5.5])]
    assert items[1].boxes == []
    assert items[0].source == f"coco:{path}"


@pytest.mark.parametrize("annotation, message", [
    ({"id": 12, "image_id": 2, "category_id": 99}, r"bad\.json.*annotation id 12.*category id 99"),
    ({"id": 13, "image_id": 5, "category_id": 1}, r"bad\.json.*annotation id 13.*image id 5"),
], ids=["unknown-category", "unknown-image"])
def test_coco_bad_reference_names_file_and_ids(coco, tmp_path, annotation, message):
    path, data = coco
    data["annotations"].append({**annotation, "bbox": [1, 1, 2, 2]})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        from_coco(bad, tmp_path / "imgs")


# ---------------------------------------------------------------------------------- YOLO out and in

def make_items(root: Path, n: int = 8) -> list[LabelledImage]:
    items = []
    for i in range(n):
        image = write_image(root / f"src{i % 2}" / f"img{i:02d}.png", shade=i)
        boxes = [LabelBox(label="hard_exudate", xyxy=[3.0 + i, 2.0, 7.0 + i, 5.0]),
                 LabelBox(label="optic_disc", xyxy=[20.0, 10.5, 33.25, 24.0])]
        items.append(LabelledImage(image, W, H, boxes, f"test:{image}"))
    return items


def test_yolo_round_trip_within_one_pixel(tmp_path):
    items = make_items(tmp_path / "src")
    items[0].boxes += [LabelBox(label="drusen", xyxy=[-5.0, 25.0, 4.0, 35.0]),  # clipped to the image
                       LabelBox(label="drusen", xyxy=[45.0, 1.0, 50.0, 5.0]),  # wholly outside: dropped
                       LabelBox(label="drusen", xyxy=[8.0, 8.0, 8.0, 12.0])]  # no width: dropped
    data_yaml = write_yolo_dataset(items, tmp_path / "out", val_fraction=0.25, seed=3)
    assert data_yaml == (tmp_path / "out" / "dataset.yaml").resolve()

    back = {i.image.name: i for i in from_yolo(tmp_path / "out")}
    assert sorted(back) == sorted(i.image.name for i in items)
    for item in items:
        got = back[item.image.name]
        assert (got.width, got.height) == (W, H)
        expected = [(b.label, b.xyxy) for b in item.boxes if b.label != "drusen"]
        if item is items[0]:
            expected.append(("drusen", [0.0, 25.0, 4.0, 30.0]))
        assert [b.label for b in got.boxes] == [label for label, _ in expected]
        for b, (_, xyxy) in zip(got.boxes, expected):
            assert np.allclose(b.xyxy, xyxy, atol=1.0), (item.image.name, b.xyxy, xyxy)

    splits = {p.name: p.parent.name for p in (tmp_path / "out" / "images").rglob("*.png")}
    assert set(splits.values()) == {"train", "val"}
    # deterministic: the same content and seed give the same split, in any order
    again = write_yolo_dataset(list(reversed(items)), tmp_path / "again", val_fraction=0.25, seed=3)
    assert {p.name: p.parent.name for p in (again.parent / "images").rglob("*.png")} == splits


def test_write_refuses_a_non_empty_output(tmp_path):
    items = make_items(tmp_path / "src", 2)
    write_yolo_dataset(items, tmp_path / "out")
    with pytest.raises(FileExistsError):
        write_yolo_dataset(items, tmp_path / "out")


def plain_yolo_folder(root: Path, label_text: str | None) -> Path:
    write_image(root / "images" / "a.jpg")
    write_image(root / "images" / "b.jpg", shade=1)  # no label file: an image with no boxes
    if label_text is not None:
        (root / "labels").mkdir(parents=True)
        (root / "labels" / "a.txt").write_text(label_text)
    return root


def test_from_yolo_plain_folder_with_names(tmp_path):
    root = plain_yolo_folder(tmp_path / "ds", "0 0.5 0.5 0.25 0.2\n\n1 0.1 0.1 0.2 0.2\n")
    items = {i.image.name: i for i in from_yolo(root, names={0: "EX", 1: "Optic Disc"})}
    assert boxes_of(items["a.jpg"]) == [("hard_exudate", [15.0, 12.0, 25.0, 18.0]),
                                        ("optic_disc", [0.0, 0.0, 8.0, 6.0])]
    assert items["b.jpg"].boxes == []


def test_from_yolo_unknown_class_name_lists_known_names(tmp_path):
    root = plain_yolo_folder(tmp_path / "ds", "0 0.5 0.5 0.25 0.2\n")
    with pytest.raises(ValueError, match=r"a\.txt:1.*'banana'.*known:.*hard_exudate"):
        from_yolo(root, names=["banana"])
    (root / "dataset.yaml").write_text(f"path: {root}\ntrain: images\nval: images\nnames:\n  0: banana\n")
    with pytest.raises(ValueError, match="banana.*known:.*optic_disc"):
        from_yolo(root)


def test_from_yolo_malformed_lines_name_file_and_line(tmp_path):
    root = plain_yolo_folder(tmp_path / "short", "0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2\n")
    with pytest.raises(ValueError, match=r"a\.txt:2: expected"):
        from_yolo(root, names=["EX"])
    root = plain_yolo_folder(tmp_path / "range", "0 1.5 0.5 0.2 0.2\n")
    with pytest.raises(ValueError, match=r"a\.txt:1: normalised coordinates must lie in \[0, 1\]"):
        from_yolo(root, names=["EX"])
    root = plain_yolo_folder(tmp_path / "id", "3 0.5 0.5 0.2 0.2\n")
    with pytest.raises(ValueError, match=r"a\.txt:1: class id 3"):
        from_yolo(root, names=["EX"])


def test_ultralytics_accepts_written_dataset(tmp_path, monkeypatch):
    """ultralytics parses the yaml and reads every image and label.

    check_det_dataset() ends with check_font("Arial.ttf"), which, with no Arial on this
    machine, asks github over HTTP even with YOLO_OFFLINE; that one call is replaced and the
    network blocked, and the yaml is also checked field by field.
    """
    data_yaml = write_yolo_dataset(make_items(tmp_path / "src", 6), tmp_path / "out", val_fraction=0.3)
    root = data_yaml.parent

    written = yaml.safe_load(data_yaml.read_text())
    assert set(written) == {"path", "train", "val", "names"}  # no download key
    assert Path(written["path"]).is_absolute() and Path(written["path"]) == root
    assert written["names"] == dict(enumerate(CLASS_NAMES))
    for split in ("train", "val"):
        images = sorted((root / written[split]).iterdir())
        assert images
        assert all((root / "labels" / split / f"{p.stem}.txt").is_file() for p in images)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    from fundus_engine.yolo import ultralytics

    ultralytics()
    import ultralytics.data.utils as data_utils
    from ultralytics.data.dataset import YOLODataset

    fonts = []
    monkeypatch.setattr(data_utils, "check_font", fonts.append)
    data = data_utils.check_det_dataset(str(data_yaml), autodownload=False)
    assert fonts == ["Arial.ttf"]  # the ASCII class names need no Unicode font
    assert data["nc"] == len(CLASS_NAMES) and data["names"] == dict(enumerate(CLASS_NAMES))
    assert Path(data["train"]) == root / "images" / "train" and Path(data["val"]) == root / "images" / "val"

    total = 0
    for split in ("train", "val"):
        dataset = YOLODataset(img_path=data[split], data=data, task="detect", imgsz=64, augment=False)
        for label in dataset.labels:
            assert sorted(label["cls"].ravel().tolist()) == [CLASS_NAMES.index("optic_disc"),
                                                              CLASS_NAMES.index("hard_exudate")]
        total += len(dataset.labels)
    assert total == 6


# ---------------------------------------------------------------- annotated classes, domain, folds


def test_each_importer_says_which_classes_it_annotates(idrid, coco, tmp_path):
    images, ex, he = idrid
    assert {i.annotated_classes for i in from_masks(images, {"EX": ex})} == {("hard_exudate",)}
    merged = merge(from_masks(images, {"HE": he}), from_masks(images, {"EX": ex}))
    assert {i.annotated_classes for i in merged} == {("haemorrhage", "hard_exudate")}  # union, vocabulary order
    path, _ = coco
    assert {i.annotated_classes for i in from_coco(path, path.parent.parent / "imgs")} == \
        {("haemorrhage", "hard_exudate")}
    root = plain_yolo_folder(tmp_path / "yolo", "0 0.5 0.5 0.2 0.2\n")
    assert from_yolo(root, names=["EX", "some odd name"])[0].annotated_classes == ("hard_exudate",)
    item = from_masks(images, {"EX": ex})[0]
    assert item.annotates("hard_exudate") and not item.annotates("optic_disc")
    # an item that cannot say (hand-made, pseudo-labels) annotates everything, and merging it says so too
    loose = LabelledImage(images / "IDRiD_01.jpg", W, H)
    assert loose.annotated_classes is None and loose.annotates("optic_disc")
    assert merge([item], [loose])[0].annotated_classes is None


def test_dataset_names_skip_generic_folders(tmp_path):
    assert dataset_name(tmp_path / "IDRiD" / "images" / "train") == "IDRiD"
    assert dataset_name(tmp_path / "DDR" / "data") == "DDR"


def test_synthetic_is_read_from_the_generators_mark(tmp_path):
    from fundus_engine.synth import generate

    generate(tmp_path / "synth", 2, seed=4, size=64)
    marked = from_yolo(tmp_path / "synth")
    assert [i.synthetic for i in marked] == [True, True]
    copy = tmp_path / "copy" / "images" / "eye.jpg"  # the same pixels re-encoded without the mark: a real photograph
    copy.parent.mkdir(parents=True)
    cv2.imwrite(str(copy), cv2.imread(str(marked[0].image)))
    assert LabelledImage(copy, 64, 64).synthetic is False
    assert merge(marked)[0].synthetic is True


def test_kfold_is_deterministic_balanced_and_keeps_duplicates_together(tmp_path):
    items = make_items(tmp_path / "src", 7)
    duplicate = tmp_path / "dup.png"
    duplicate.write_bytes(Path(items[0].image).read_bytes())
    items.append(LabelledImage(duplicate, W, H))
    folds = kfold(items, 3, seed=0)
    assert sorted(len(f) for f in folds) == [2, 3, 3]  # 7 distinct images dealt out in turn, + the duplicate
    assert sorted(str(i.image) for f in folds for i in f) == sorted(str(i.image) for i in items)
    together = [f for f in folds if any(i.image == duplicate for i in f)][0]
    assert items[0] in together
    assert [[i.image for i in f] for f in kfold(items, 3, seed=0)] == [[i.image for i in f] for f in folds]
    assert [[i.image for i in f] for f in kfold(items, 3, seed=1)] != [[i.image for i in f] for f in folds]
    with pytest.raises(ValueError, match="k >= 2"):
        kfold(items, 1)
    with pytest.raises(ValueError, match="at least 9 distinct images"):
        kfold(items, 9)


def test_write_downscales_large_images_and_keeps_labels(tmp_path):
    from PIL import Image

    from fundus_engine.synth import generate

    big = write_image(tmp_path / "src" / "big.jpg", width=400, height=300, shade=1)
    small = write_image(tmp_path / "src" / "small.png", width=40, height=30, shade=2)
    generate(tmp_path / "synth", 1, seed=6, size=128)
    synthetic = from_yolo(tmp_path / "synth")[0]
    items = [LabelledImage(big, 400, 300, [LabelBox(label="optic_disc", xyxy=[100, 60, 200, 150])]),
             LabelledImage(small, 40, 30, [LabelBox(label="hard_exudate", xyxy=[4, 3, 8, 6])]), synthetic]
    root = write_yolo_dataset(items, tmp_path / "out", val_fraction=0, max_side=100).parent
    written = {p.name: p for p in (root / "images" / "train").iterdir()}
    with Image.open(written["big.jpg"]) as im:
        assert im.size == (100, 75)
    assert written["small.png"].read_bytes() == small.read_bytes()  # small enough: copied as it is
    assert (root / "labels" / "train" / "big.txt").read_text() == "0 0.375000 0.350000 0.250000 0.300000\n"
    from fundus_engine.synth import is_synthetic

    synthetic_copy = written[Path(synthetic.image).name]
    with Image.open(synthetic_copy) as im:
        assert im.size == (100, 100)
    assert is_synthetic(synthetic_copy)  # downscaled, still marked as generated


def test_an_image_deeper_than_8_bits_is_stored_8_bit_as_the_detect_stage_reads_it(tmp_path):
    """ultralytics reads a training image with OpenCV's 8-bit decode, which keeps the high byte of
    16-bit data: a 12-bit photograph (values up to 4095) would train nearly black while the detect
    stage scales it by its brightest value (`decoding.to_uint8`). The copy is that scaled image."""
    from fundus_engine.decoding import deeper_than_8_bits

    bgr = np.random.default_rng(5).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    bgr[0, 0] = 255  # the brightest value: 4080 in 12 bits scales back to 255 exactly
    original = tmp_path / "src" / "eye.png"
    original.parent.mkdir(parents=True)
    assert cv2.imwrite(str(original), bgr)
    deep = {"eye12.png": bgr.astype(np.uint16) * 16, "eye12b.tif": bgr.astype(np.uint16) * 16}
    items = [LabelledImage(original, 60, 40, [LabelBox(label="optic_disc", xyxy=[10, 10, 20, 20])])]
    for name, pixels in deep.items():
        assert cv2.imwrite(str(tmp_path / "src" / name), pixels)
        items.append(LabelledImage(tmp_path / "src" / name, 60, 40, [LabelBox(label="optic_disc", xyxy=[10, 10, 20, 20])]))
    assert [deeper_than_8_bits(i.image) for i in items] == [False, True, True]
    assert cv2.imread(str(tmp_path / "src" / "eye12.png")).max() <= 16  # what ultralytics would train on
    root = write_yolo_dataset(items, tmp_path / "out", val_fraction=0).parent
    written = {p.name: p for p in (root / "images" / "train").iterdir()}
    assert written["eye.png"].read_bytes() == original.read_bytes()  # 8-bit: copied as it is
    for name in deep:
        assert not deeper_than_8_bits(written[name])
        assert np.array_equal(cv2.imread(str(written[name])), bgr)
