"""Hostile inputs (issue 12): a badly named file, a bad label field, an unreadable manifest row,
an oversized photograph or a looping link is rejected alone (or, for the name, processed), naming
the file and the field; every good item beside it still yields its records."""
from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import cv2
import pytest

from fundus_engine import ingest as ingest_module
from fundus_engine.config import IngestConfig, WriteConfig
from fundus_engine.detect import _from_result
from fundus_engine.ingest import ingest, ingest_image
from fundus_engine.labels import load_labels, patient_pseudonym
from fundus_engine.photo_files import SourceFile, scan, sha256_file
from fundus_engine.models import ImageRecord, InstructionRecord, LabelBox, Point, Region, Reject
from fundus_engine.synth import generate
from fundus_engine.tables import read_rows, write_rows
from fundus_engine.write import split_images, split_position, write_rejects

CONFIG = IngestConfig()
LATIN1 = os.fsdecode(b"caf\xe9.jpg")  # "café.jpg" saved by an old Windows system: not UTF-8


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Links to files whose names are not UTF-8 go to the user cache: a fresh one per test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def root(tmp_path) -> Path:
    """Four 256 px synthetic photographs (patients S12-P00000 and S12-P00001, two eyes each)."""
    generate(tmp_path / "in", 4, seed=12, size=256, full_labels=True)
    return tmp_path / "in"


def _images(root: Path) -> list[Path]:
    return sorted((root / "images").glob("synth_*.jpg"))


def _reencoded(src: Path, dst: Path, quality: int = 85) -> None:
    """The same picture in different bytes (cv2.imwrite crashes on a name that is not UTF-8)."""
    ok, data = cv2.imencode(".jpg", cv2.imread(str(src)), [cv2.IMWRITE_JPEG_QUALITY, quality])
    Path(dst).write_bytes(data.tobytes())


def _manifest(root: Path, entries: list[dict]) -> Path:
    path = root / "labels.json"
    path.write_text(json.dumps({"images": entries}))
    return path


def _ingested(root: Path, config: IngestConfig = CONFIG):
    labels, label_rejects = load_labels(root, config)
    sources, scan_rejects = scan(root)
    records, rejects = ingest(root, sources, labels, config)
    return {r.relpath: r for r in records}, label_rejects + scan_rejects + rejects


# ------------------------------------------------------------------ 1: names that are not UTF-8

def test_a_file_named_in_latin1_is_ingested_under_a_utf8_path_that_opens_it(root, tmp_path):
    _reencoded(_images(root)[0], root / "images" / LATIN1)
    records, rejects = _ingested(root)
    assert rejects == []
    record = records["images/caf\\xe9.jpg"]  # shown with the byte escaped
    record.path.encode("utf-8")  # Parquet and every reader downstream need valid UTF-8
    assert sha256_file(Path(record.path)) == sha256_file(root / "images" / LATIN1) == record.sha256
    assert cv2.imread(record.path) is not None  # what ultralytics and the model client open
    write_rows(tmp_path / "images.parquet", list(records.values()), ImageRecord)
    assert len(read_rows(tmp_path / "images.parquet", ImageRecord)) == 5


def test_a_reject_naming_a_latin1_file_can_be_written(root, tmp_path):
    (root / "images" / LATIN1).write_text("not an image")
    records, rejects = _ingested(root)
    assert len(records) == 4
    assert [(r.item, r.reason) for r in rejects] == [
        (str(root / "images" / "caf\\xe9.jpg"), "cannot decode: not an image or a corrupt file")]
    write_rejects(rejects, tmp_path)
    assert read_rows(tmp_path / "rejects.parquet", Reject) == rejects


# ------------------------------------------------------------------ 2, 3: boxes and points

def test_label_boxes_outside_inverted_or_not_finite_are_rejected_alone(root):
    first, second = (f"images/{p.name}" for p in _images(root)[:2])
    good = {"label": "HE", "xyxy": [40, 40, 60, 60]}
    path = _manifest(root, [
        {"image": first, "patient_id": "P1", "dr_grade": 3, "boxes": [
            good,
            {"label": "EX", "xyxy": [998, 998, 999, 999]},  # outside the 256 px image
            {"label": "drusen", "xyxy": [120, 120, 100, 100]},  # inverted
            {"label": "HE", "xyxy": [float("nan"), 10, 30, 30]},
            {"label": "MA", "xyxy": [-40, 10, -20, 30]},  # negative, left of the image
            {"label": "SE", "xyxy": [-3, 10, 60, 259]},  # overshoots by 3 px: clipped
            {"label": "drusen", "xyxy": [10, 10, 20]},
        ]},
        {"image": second, "patient_id": "P1", "boxes": [{"label": "EX", "xyxy": [1, 2, 30, 40]}]},
    ])
    records, rejects = _ingested(root)
    at_load, at_ingest = f"{path} entry 1 ({first})", f"{path} entry for {first}"  # read; checked against the image
    assert sorted((r.item, r.reason.split(":")[0]) for r in rejects) == [
        (at_load, f"boxes[{i}].xyxy") for i in (2, 3, 6)] + [(at_ingest, f"boxes[{i}].xyxy") for i in (1, 4)]
    reasons = {r.reason.split(":")[0]: r.reason for r in rejects}
    assert "lies outside the 256x256 image" in reasons["boxes[1].xyxy"]
    assert "no area" in reasons["boxes[2].xyxy"] and "not finite" in reasons["boxes[3].xyxy"]
    assert "lies outside the 256x256 image" in reasons["boxes[4].xyxy"]
    record = records[first]
    assert record.label_boxes == [LabelBox(label="haemorrhage", xyxy=[40, 40, 60, 60]),
                                  LabelBox(label="soft_exudate", xyxy=[0, 10, 60, 256])]
    assert (record.patient_id, record.dr_grade) == (patient_pseudonym("P1"), 3)  # the entry's other labels are kept
    # A class with a rejected box is no longer annotated exhaustively on that image: its absence
    # is never stated from an incomplete annotation. The other image keeps every class.
    assert record.labelled_classes == ["soft_exudate"]
    assert records[second].labelled_classes == ["drusen", "haemorrhage", "hard_exudate", "microaneurysm",
                                                 "soft_exudate"]


def test_disc_and_fovea_must_be_finite_and_inside_the_image(root):
    first, second = (f"images/{p.name}" for p in _images(root)[:2])
    path = _manifest(root, [
        {"image": first, "patient_id": "P1", "disc": [float("nan"), 100], "fovea": [900, 120]},
        {"image": second, "patient_id": "P1", "disc": [257, 100], "fovea": "[120, 130]"},
    ])
    records, rejects = _ingested(root)
    assert sorted((r.item, r.reason.split(":")[0]) for r in rejects) == [
        (f"{path} entry 1 ({first})", "disc"), (f"{path} entry for {first}", "fovea")]
    assert records[first].disc is None and records[first].fovea is None and records[first].patient_id == patient_pseudonym("P1")
    assert records[second].disc == Point(x=256, y=100)  # 1 px over the edge: clipped
    assert records[second].fovea == Point(x=120, y=130)


def test_detector_boxes_are_clipped_to_the_image_and_degenerate_ones_dropped():
    class Column(list):
        def tolist(self):
            return list(self)

    boxes = SimpleNamespace(xyxy=Column([[-5, 10, 50, 60], [490, 500, 530, 520], [600, 600, 700, 700],
                                         [10, 10, 10, 40], [float("nan"), 1, 2, 3]]),
                            cls=Column([2, 2, 2, 2, 2]), conf=Column([0.9, 0.8, 0.7, 0.6, 0.5]))
    result = SimpleNamespace(names={2: "haemorrhage"}, boxes=boxes, orig_shape=(510, 512))
    found = _from_result("f" * 64, result)
    assert [d.xyxy for d in found] == [[0, 10, 50, 60], [490, 500, 512, 510]]


# ------------------------------------------------------------------ 4: a label problem never moves a patient

def test_a_bad_label_field_never_moves_a_patient_to_another_split(root):
    left, right = (f"images/{p.name}" for p in _images(root)[:2])
    path = _manifest(root, [
        {"image": left, "patient_id": "P7", "laterality": "OD"},
        {"image": right, "patient_id": "P7", "laterality": "both", "dr_grade": 9,
         "boxes": [{"label": "tumour", "xyxy": [1, 1, 9, 9]}, {"label": "HE", "xyxy": [10, 10, 40, 40]}]},
    ])
    records, rejects = _ingested(root)
    assert sorted(r.reason.split(":")[0] for r in rejects) == ["boxes[0].label", "dr_grade", "laterality"]
    assert {r.item for r in rejects} == {f"{path} entry 2 ({right})"}
    eye = records[right]
    assert eye.patient_id == patient_pseudonym("P7") and eye.label_boxes == [LabelBox(label="haemorrhage", xyxy=[10, 10, 40, 40])]
    # An unreadable box could be of any class: none is stated absent from this image.
    assert eye.labelled_classes == []
    # Cut the test split between the patient's hash and the eye's own: an eye that lost its
    # patient would be split on its own hash and land on the other side of the cut.
    cut = (split_position(patient_pseudonym("P7")) + split_position(eye.sha256)) / 2
    splits = split_images(list(records.values()), WriteConfig(test_fraction=cut, val_fraction=0,
                                                              near_duplicate_bits=0))
    assert splits[records[left].sha256] == splits[eye.sha256]


# ------------------------------------------------------------------ 5: manifests that cannot be read whole

def test_a_csv_row_over_the_field_limit_is_rejected_alone(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("image,patient_id,dr_grade\na.jpg,P1,1\nb.jpg,P2," + "9" * 200_000 + "\nc.jpg,P3,2\n")
    labels, rejects = load_labels(tmp_path, CONFIG)
    assert sorted(labels) == ["a.jpg", "c.jpg"] and labels["c.jpg"]["dr_grade"] == 2
    assert [r.item for r in rejects] == [f"{path} entry 2 (line 3)"]
    assert "field larger than field limit" in rejects[0].reason


# ------------------------------------------------------------------ 10: photographs too large to decode

def test_an_image_over_max_pixels_is_rejected_from_its_header_before_decoding(root, monkeypatch):
    big = cv2.resize(cv2.imread(str(_images(root)[0])), (600, 500))
    cv2.imwrite(str(root / "images" / "big.png"), big)
    monkeypatch.setattr(ingest_module, "decode_for_measures", lambda path: pytest.fail(f"decoded {path}"))
    result = ingest_image(root, SourceFile("images/big.png", "0" * 64), None, IngestConfig(max_pixels=299_999))
    assert result == Reject(stage="ingest", item=str(root / "images" / "big.png"),
                            reason="too large: 600x500 = 300000 pixels, limit 299999 (ingest.max_pixels)")


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels: a few dozen bytes that would decode to gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [9000, 100_000])  # over max_pixels; over PIL's own bomb limit too
def test_a_decompression_bomb_is_rejected_without_decoding(tmp_path, side):
    (tmp_path / "bomb.png").write_bytes(_png_header(side, side))
    result = ingest_image(tmp_path, SourceFile("bomb.png", "0" * 64), None, CONFIG)
    assert isinstance(result, Reject) and result.item == str(tmp_path / "bomb.png")
    assert result.reason.startswith("too large: ") and f"{side * side} pixels" in result.reason
    assert result.reason.endswith(f"limit {CONFIG.max_pixels} (ingest.max_pixels)")


# ------------------------------------------------------------------ 11: links that lead nowhere

@pytest.mark.timeout(60)
def test_symlink_loops_and_broken_links_are_listed_and_good_images_kept(root, tmp_path):
    images = root / "images"
    (images / "loop").symlink_to(".")
    (images / "up").symlink_to("..")
    (images / "a.jpg").symlink_to("b.jpg")
    (images / "b.jpg").symlink_to("a.jpg")
    (images / "gone.jpg").symlink_to("missing.jpg")
    elsewhere = tmp_path / "clinic_b"
    elsewhere.mkdir()
    _reencoded(_images(root)[1], elsewhere / "other.jpg")
    (root / "clinic_b").symlink_to(elsewhere)  # a linked folder is followed
    sources, rejects = scan(root)
    assert sorted((Path(r.item).name, r.reason) for r in rejects) == [
        ("a.jpg", "symlink loop"), ("b.jpg", "symlink loop"), ("gone.jpg", "broken symlink: target missing"),
        ("loop", "symlink loop"), ("up", "symlink loop")]
    assert all(r.item.startswith(str(images)) for r in rejects)
    assert [s.relpath for s in sources] == ["clinic_b/other.jpg"] + [f"images/{p.name}" for p in _images(root)]


# ------------------------------------------------------------------ end to end

@pytest.mark.usefixtures("prefect_local")
def test_a_build_with_hostile_inputs_keeps_every_good_image(tmp_path):
    """7 good photographs, one more named in Latin-1, a bad box, an oversized image and looping
    and broken links, all in one shard: the 8 good images get records, the rest are rejects."""
    from flows.build_fundusgen import build_fundusgen
    from fundus_engine.config import BuildConfig

    root = tmp_path / "in"
    generate(root, 7, seed=12)
    images = root / "images"
    _reencoded(sorted(images.glob("synth_*.jpg"))[0], images / LATIN1)
    cv2.imwrite(str(images / "huge.png"), cv2.resize(cv2.imread(str(sorted(images.glob("synth_*.jpg"))[1])),
                                                     (600, 600)))
    (images / "loop").symlink_to(".")
    (images / "gone.jpg").symlink_to("missing.jpg")
    manifest = json.loads((root / "labels.json").read_text())
    boxed = manifest["images"][2]
    boxed["boxes"] = [{"label": "HE", "xyxy": [200, 200, 240, 230]}, {"label": "EX", "xyxy": [998, 998, 999, 999]}]
    (root / "labels.json").write_text(json.dumps(manifest))

    out = tmp_path / "out"
    config = BuildConfig.model_validate({"shard_size": 16, "ingest": {"max_pixels": 300_000}})
    summary = build_fundusgen(str(root), str(out), config)

    assert summary["stages"]["ingest"]["shards"] == 1 and summary["images"] == 8
    records = read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)
    assert len({r.sha256 for r in records}) == 8
    assert sha256_file(images / LATIN1) in {r.sha256 for r in records}
    rejects = {(Path(r.item.split(" entry ")[0]).name, r.reason.split(" (")[0].split(":")[0])
               for r in read_rows(out / "rejects.parquet", Reject)}
    assert rejects == {("loop", "symlink loop"), ("gone.jpg", "broken symlink"), ("huge.png", "too large"),
                       ("labels.json", "boxes[1].xyxy")}
    regions = read_rows(sorted((out / "stages" / "crop").glob("*.regions.parquet")), Region)
    truth = [r for r in regions if r.source == "ground_truth"]
    assert [(r.label, r.xyxy) for r in truth] == [("haemorrhage", [200, 200, 240, 230])]
    assert all(0 <= v <= 512 for r in regions for v in r.xyxy)
