"""Ingest measures a large JPEG on a reduced decode (`decoding.decode_for_measures`); crop decodes
once, as BGR, and writes from it. On the real photographs of ../shared/real_fundus (read in place;
skipped when absent) what each record states is the same as on the full decode, and a whole build
gives the same dataset records either way."""
from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_engine import ingest as ingest_module
from fundus_engine.config import BuildConfig, IngestConfig
from fundus_engine.decoding import MEASURE_SIDE, decode, decode_bgr, decode_for_measures
from fundus_engine.fundus_check import not_a_fundus_photograph
from fundus_engine.ingest import ingest_image
from fundus_engine.labels import labels_for, load_labels
from fundus_engine.models import ImageRecord, InstructionRecord, Reject
from fundus_engine.photo_files import scan
from fundus_engine.quality import QUALITY_SIDE, downscaled, grade_quality, perceptual_hash
from fundus_engine.tables import read_rows

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "real_fundus" / "images"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL}: the real photographs are not here")
CONFIG = IngestConfig()


def _full_decode(path: Path) -> tuple[np.ndarray, int, int]:
    """The full path: every measurement on the full-resolution decode."""
    bgr = decode_bgr(path)
    return bgr, bgr.shape[1], bgr.shape[0]


def _bits(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


@pytest.fixture(scope="module")
def sources():
    labels, _ = load_labels(REAL, CONFIG)
    found, rejects = scan(REAL)
    assert rejects == [] and len(found) >= 60
    return [(s, labels_for(s.relpath, labels)) for s in found]


def test_a_large_jpeg_is_decoded_reduced_keeping_its_full_size_and_a_small_one_whole():
    idrid = REAL / "IDRiD" / "IDRiD_01.jpg"  # 4288 x 2848
    bgr, width, height = decode_for_measures(idrid)
    assert (width, height) == (4288, 2848) and bgr.shape[:2] == (1424, 2144)  # 1/2: still >= MEASURE_SIDE
    assert max(bgr.shape[:2]) >= MEASURE_SIDE
    drive = REAL / "DRIVE" / "21_training.tif"  # not a JPEG, and small: decoded whole, as decode does
    bgr, width, height = decode_for_measures(drive)
    assert (width, height) == (565, 584) and np.array_equal(bgr[..., ::-1], decode(drive))


def test_an_exif_turned_jpeg_reports_the_full_upright_size(tmp_path):
    from PIL import Image

    wide = cv2.resize(cv2.imread(str(REAL / "IDRiD" / "IDRiD_01.jpg")), (4200, 2800))[..., ::-1]
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees: upright it is 2800 wide and 4200 tall
    Image.fromarray(np.ascontiguousarray(wide)).save(tmp_path / "turned.jpg", exif=exif, quality=90)
    bgr, width, height = decode_for_measures(tmp_path / "turned.jpg")
    full = decode_bgr(tmp_path / "turned.jpg")
    assert (width, height) == (full.shape[1], full.shape[0]) == (2800, 4200)
    assert bgr.shape[:2] == (2100, 1400)


def test_every_real_photograph_states_on_the_reduced_decode_what_it_states_on_the_full_one(sources, tmp_path,
                                                                                         monkeypatch):
    """Acceptance, size, labels, quality grade and the field-of-view percentage a record states are
    the same; the measured numbers move by at most the bounds below (sharpness: the reduced copy is
    a little smoother), and a photograph not reduced gives the very same record."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    reduced = 0
    for source, labels in sources:
        path = REAL / source.relpath
        new = ingest_image(REAL, source, labels, CONFIG)
        rgb = decode(path)  # the full path: measured on the full decode, as ingest did before
        assert not isinstance(new, Reject) and not_a_fundus_photograph(rgb) is None, source.relpath
        with monkeypatch.context() as m:
            m.setattr(ingest_module, "decode_for_measures", _full_decode)
            full = ingest_image(REAL, source, labels, CONFIG)
        assert full.quality == grade_quality(downscaled(rgb, QUALITY_SIDE), CONFIG) and full.phash == perceptual_hash(rgb)
        if decode_for_measures(path)[0].shape == rgb.shape:
            assert new == full, source.relpath
            continue
        reduced += 1
        assert new.model_dump(exclude={"quality", "phash"}) == full.model_dump(exclude={"quality", "phash"})
        q, f = new.quality, full.quality
        assert q.grade == f.grade and f"{q.fov_coverage * 100:.0f}" == f"{f.fov_coverage * 100:.0f}", source.relpath
        assert abs(q.fov_coverage - f.fov_coverage) <= 0.001 and abs(q.exposure - f.exposure) <= 0.001
        assert abs(q.sharpness - f.sharpness) <= 0.06 * f.sharpness, (source.relpath, q.sharpness, f.sharpness)
        assert _bits(new.phash, full.phash) <= 2, source.relpath
    assert reduced >= 20  # IDRiD and the large EyePACS photographs


@pytest.mark.slow
def test_a_build_of_the_real_photographs_has_the_same_records_on_either_decode(tmp_path, monkeypatch):
    """Two builds (the library's local loop), ingest measuring on the reduced decode and on the full
    one: the same dataset records, regions and anatomy, word for word."""
    from fundus_engine.models import Anatomy, Region
    from fundus_engine.runner import RunContext, finish_build, plan_build
    from in_memory import run_local

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def build(out: Path) -> dict:
        ctx = RunContext.create(REAL, out, BuildConfig(), run_id="single-decode")
        plan = plan_build(ctx)
        outcomes = run_local(ctx, plan)
        assert all(o.completion for o in outcomes), [o.failure for o in outcomes if not o.completion]
        manifest = finish_build(ctx, plan, outcomes, time.monotonic())

        def plain(rows: list) -> list[dict]:  # the output folder named OUT: the builds write to two
            return [json.loads(json.dumps(r.model_dump(mode="json")).replace(str(out), "OUT")) for r in rows]

        def stage_rows(stage: str, table: str, model) -> list[dict]:
            return plain([row for f in sorted((out / "stages" / stage).glob(f"*.{table}.parquet"))
                          for row in read_rows(f, model)])

        return {"records": plain(read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)),
                "regions": stage_rows("crop", "regions", Region), "anatomy": stage_rows("crop", "anatomy", Anatomy),
                "images": stage_rows("ingest", "images", ImageRecord), "split": manifest["images_per_split"]}

    reduced = build(tmp_path / "reduced")
    monkeypatch.setattr(ingest_module, "decode_for_measures", _full_decode)
    full = build(tmp_path / "full")
    assert len(reduced["records"]) > 100
    for key in ("records", "regions", "anatomy", "split"):
        assert reduced[key] == full[key], key
    strip = [{k: v for k, v in row.items() if k not in ("quality", "phash")} for row in reduced["images"]]
    assert strip == [{k: v for k, v in row.items() if k not in ("quality", "phash")} for row in full["images"]]
