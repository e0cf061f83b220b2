"""`fundus-engine inspect --overlays`: small overlays at viewing size that a person can read."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from fundus_engine.cli import app
from fundus_engine.inspection import PALETTE, box_caption, draw_overlay, write_overlays
from fundus_engine.models import Anatomy, ImageRecord, Point, Quality, Region
from fundus_engine.synth import render
from fundus_engine.tables import write_rows

W, H, PAD, K = 4288, 2848, 720, 4  # a Kowa VX-10 frame: a 712-px synthetic fundus x4, padded left and right


def _region(sha: str, i: int, label: str, xyxy: list[float], source: str, confidence: float) -> Region:
    return Region(sha256=sha, region_id=f"{sha[:12]}-{i:03d}", label=label, display=label, xyxy=xyxy,
                  box_999=[0, 0, 1, 1], confidence=confidence, source=source, crop_path="unused.jpg",
                  mean_rgb=[0, 0, 0], colour="red")


def _image(sha: str, path, relpath: str, rgb: np.ndarray) -> ImageRecord:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return ImageRecord(sha256=sha, path=str(path), relpath=relpath, width=rgb.shape[1], height=rgb.shape[0],
                       quality=Quality(sharpness=1, exposure=0.5, fov_coverage=0.7, grade="good"))


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """The ingest and crop tables of a build, as the crop stage writes them, for two photographs:
    A, 4288x2848 with ground-truth boxes, every landmark and a disagreement; B, 512 px with one
    detector box and no disc or fovea found. Returns (out, photographs, anatomy, regions)."""
    root = tmp_path_factory.mktemp("overlays")
    (root / "in").mkdir()
    out = root / "out"
    small, truth = render(0, 0, 712)  # diabetic retinopathy: disc, cup, fovea and lesions
    big = cv2.resize(small, None, fx=K, fy=K, interpolation=cv2.INTER_CUBIC).astype(np.float32)
    big += np.random.default_rng(0).normal(0, 4, big.shape)  # sensor noise, as in a real photograph
    photo_a = np.zeros((H, W, 3), np.uint8)
    photo_a[:, PAD:PAD + H] = np.clip(big, 0, 255).astype(np.uint8)
    photo_b, truth_b = render(0, 2, 512)
    a, b = "a" * 64, "b" * 64
    images = [_image(a, root / "in" / "a.jpg", "eyes/a.jpg", photo_a), _image(b, root / "in" / "b.jpg", "b.jpg", photo_b)]
    dd = truth.disc_diameter * K
    anatomy = {
        a: Anatomy(sha256=a, laterality="OD", laterality_source="inferred",
                   disc_centre=Point(x=truth.disc[0] * K + PAD, y=truth.disc[1] * K), disc_diameter_px=dd,
                   disc_source="label", fovea_centre=Point(x=truth.fovea[0] * K + PAD, y=truth.fovea[1] * K),
                   fovea_source="detector+localiser",
                   landmark_disagreement=["fovea: detector (1900, 1400) vs localiser (2010, 1460); used the localiser"]),
        b: Anatomy(sha256=b, laterality="unknown", laterality_source="unknown"),
    }
    regions = {
        a: [_region(a, i, box.label, [box.xyxy[0] * K + PAD, box.xyxy[1] * K, box.xyxy[2] * K + PAD, box.xyxy[3] * K],
                    "ground_truth", 1.0) for i, box in enumerate(truth.boxes)],
        b: [_region(b, 0, "optic_disc", next(x.xyxy for x in truth_b.boxes if x.label == "optic_disc"), "model", 0.61)],
    }
    write_rows(out / "stages" / "ingest" / "00000-x.images.parquet", images, ImageRecord)
    write_rows(out / "stages" / "crop" / "00000-x.anatomy.parquet", list(anatomy.values()), Anatomy)
    write_rows(out / "stages" / "crop" / "00000-x.regions.parquet", [r for rs in regions.values() for r in rs], Region)
    return out, {a: photo_a, b: photo_b}, anatomy, regions


def _viewing(rgb: np.ndarray, side: int) -> np.ndarray:
    scale = min(1.0, side / max(rgb.shape[:2]))
    return cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else rgb


def _read(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB).astype(int)


def test_overlays_are_small_at_viewing_size_and_mark_boxes_and_landmarks(build):
    out, photos, anatomy, regions = build
    paths = write_overlays(out, n=4, max_side=1280)
    a, b = sorted(photos)
    assert [p.name for p in paths] == [f"{a[:16]}.overlay.jpg", f"{b[:16]}.overlay.jpg"]
    assert all(p.is_file() for p in paths)

    # A 4288-px photograph: 1280 x 850 and a few hundred KB at most (full-size PNG: ~10 MB).
    over, photo = _read(paths[0]), _viewing(photos[a], 1280).astype(int)
    assert over.shape == photo.shape == (850, 1280, 3)
    assert paths[0].stat().st_size < 400_000
    s = 1280 / W
    # The crosses at the disc and fovea centres (white, on an orange fundus).
    for point in (anatomy[a].disc_centre, anatomy[a].fovea_centre):
        x, y = round(point.x * s), round(point.y * s)
        assert over[y - 1:y + 2, x - 1:x + 2].min() > 200, (point, over[y, x])
        assert np.abs(over[y, x] - photo[y, x]).sum() > 60
    # The circle of one disc diameter: white on its radius, not well inside or outside it.
    r = anatomy[a].disc_diameter_px * s / 2
    x, y = anatomy[a].disc_centre.x * s, anatomy[a].disc_centre.y * s
    ring = lambda k: tuple(np.array([(round(y + k * r * np.sin(t)), round(x + k * r * np.cos(t)))  # noqa: E731
                                     for t in np.linspace(0, 2 * np.pi, 72, endpoint=False)]).T)
    drawn = lambda k: ((over[ring(k)] > 200).all(axis=1) & (photo[ring(k)] < 200).any(axis=1)).mean()  # noqa: E731
    assert drawn(1) > 0.4 and drawn(0.7) < 0.2 and drawn(1.4) < 0.2
    # Header (relpath, laterality, disagreement) top left and the scale bar bottom left, both
    # drawn where the photograph is black padding.
    assert photo[:40, :200].max() < 40 and (over[:40, :200] > 200).all(axis=2).sum() > 200
    assert photo[-40:, :100].max() < 40 and (over[-40:, :100] > 200).all(axis=2).sum() > 200
    # Each ground-truth box outlined in its class colour.
    for region in regions[a]:
        x1, y1, x2, y2 = (round(v * s) for v in region.xyxy)
        edge = np.abs(over[y1:y2 + 1, x1 - 1:x1 + 2] - PALETTE[region.label]).sum(axis=2).min(axis=1)
        assert (edge < 120).mean() > 0.6, region.label  # left edge, top to bottom, in the class colour

    # A 512-px photograph stays 512 px; its detector box has its label on a filled background.
    over, photo = _read(paths[1]), photos[b].astype(int)
    assert over.shape == (512, 512, 3) and paths[1].stat().st_size < 100_000
    x1, y1, x2, y2 = (round(v) for v in regions[b][0].xyxy)
    label = over[y1 - 7:y1 - 2, x1 + 2:x1 + 40].reshape(-1, 3)
    assert (np.abs(label - PALETTE["optic_disc"]).sum(axis=1) < 90).mean() > 0.6
    assert np.abs(label - photo[y1 - 7:y1 - 2, x1 + 2:x1 + 40].reshape(-1, 3)).sum(axis=1).mean() > 100


def test_max_side_and_png(build):
    out = build[0]
    paths = write_overlays(out, n=1, max_side=640, fmt="png")
    assert len(paths) == 1 and paths[0].suffix == ".png"
    assert cv2.imread(str(paths[0])).shape == (425, 640, 3)
    with pytest.raises(ValueError, match="jpg or png"):
        write_overlays(out, fmt="gif")
    result = CliRunner().invoke(app, ["inspect", str(out), "--overlay-format", "gif"])
    assert result.exit_code == 2 and "jpg or png" in result.output


def test_header_grows_with_disagreements_and_missing_anatomy_is_fine():
    grey = np.full((H, W, 3), 128, np.uint8)
    box = [{"label": "haemorrhage", "xyxy": [2000, 1400, 2100, 1500], "source": "model", "confidence": 0.5}]
    plain = draw_overlay(grey, box, None, "x.jpg")
    assert plain.shape == (850, 1280, 3)
    assert (plain[:, 1000:] != 128).any(axis=2)[60:].sum() == 0  # nothing drawn right of the label but the header
    anatomy = Anatomy(sha256="c" * 64, laterality="OS", laterality_source="label",
                      landmark_disagreement=["disc: detector vs localiser 2.1 DD apart; used the localiser"] * 2)
    told = draw_overlay(grey, box, anatomy.model_dump(mode="json"), "x.jpg")
    # Two more header lines below the first: the darkened band reaches further down.
    band = lambda img: int((img[:, 1270] < 100).all(axis=1).sum())  # noqa: E731
    assert band(told) >= 2.5 * band(plain) > 0


def test_box_captions_name_the_source_of_each_box():
    box = {"label": "optic_disc", "confidence": 0.81}
    assert box_caption({**box, "source": "localiser"}) == "Optic disc: localiser 0.81"
    assert box_caption({**box, "source": "model"}) == "Optic disc: detector 0.81"
    assert box_caption({**box, "source": "ground_truth"}) == "Optic disc: label"
