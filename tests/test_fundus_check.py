"""fundus_engine.fundus_check: ingest keeps full-field colour fundus photographs and rejects the rest,
naming what each rejected picture looks like.

Both sides are checked: all 69 real photographs in ../shared/real_fundus (six datasets, six cameras)
and the project's synthetic photographs are accepted; close-up crops, OCT-like scans, document scans
and scikit-image's sample photographs are rejected.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_engine.config import IngestConfig
from fundus_engine.fundus_check import SIDE, downscale, measure, not_a_fundus_photograph
from fundus_engine.decoding import decode
from fundus_engine.ingest import ingest_image
from fundus_engine.photo_files import SourceFile
from fundus_engine.models import ImageRecord, Reject
from fundus_engine.synth import generate, render

REAL = Path(__file__).parents[1].parent / "shared" / "real_fundus"
CONFIG = IngestConfig()

CROP = "looks like a close-up crop of a fundus photograph"
PHOTO = "looks like an ordinary photograph, not a fundus photograph"
OCT = "looks like an OCT scan"
DOCUMENT = "looks like a document scan"
NEAR_GRAY = "near-grayscale picture"


@pytest.fixture(scope="module")
def real_images() -> list[Path]:
    assert (REAL / "images").is_dir(), f"{REAL}: the shared real photographs are missing (see its README.md)"
    images = sorted(p for p in (REAL / "images").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif"))
    assert len(images) == 69
    return images


def _ingest_array(tmp_path: Path, name: str, rgb: np.ndarray) -> ImageRecord | Reject:
    """Write the picture losslessly (PNG) and ingest it as a source file would be."""
    cv2.imwrite(str(tmp_path / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb)
    return ingest_image(tmp_path, SourceFile(name, "0" * 64), None, CONFIG)


def _reason(result: ImageRecord | Reject) -> str:
    assert isinstance(result, Reject), f"accepted: {result.relpath}"
    assert result.stage == "ingest"
    return result.reason


# ------------------------------------------------------------------ accepted

def test_every_real_photograph_is_accepted(real_images):
    root = REAL / "images"
    rejected = {}
    for path in real_images:
        result = ingest_image(root, SourceFile(path.relative_to(root).as_posix(), "0" * 64), None, CONFIG)
        if isinstance(result, Reject):
            rejected[path.name] = result.reason
    assert rejected == {}
    assert {p.parent.name for p in real_images} == {"IDRiD", "EyePACS", "DRIVE", "STARE", "Messidor-2", "HRF"}


def test_synthetic_photographs_are_accepted(tmp_path):
    generate(tmp_path, 20, seed=5, size=512)  # JPEG files, as the demo writes them
    sources = sorted((tmp_path / "images").glob("*.jpg"))
    assert len(sources) == 20
    for path in sources:
        result = ingest_image(tmp_path, SourceFile(f"images/{path.name}", "0" * 64), None, CONFIG)
        assert isinstance(result, ImageRecord), (path.name, getattr(result, "reason", None))
    # 50 more, from other seeds and at sizes from 256 to 452 px (up to 1040 px when the thresholds were set)
    reasons = {(seed, 256 + 4 * seed): not_a_fundus_photograph(render(seed, 3 * seed, 256 + 4 * seed)[0])
               for seed in range(50)}
    assert {key: reason for key, reason in reasons.items() if reason is not None} == {}


def test_features_of_real_photographs_keep_their_margins(real_images):
    """The margins the thresholds were set with (see fundus_check.py), on a sample of the datasets."""
    for name in ("DRIVE/21_training.tif", "STARE/im0002.jpg", "HRF/07_h.jpg", "EyePACS/10_right.jpeg"):
        f = measure(decode(REAL / "images" / name))
        assert f.dark_corners == 1.0 and f.dark_sides > 0.85, name
        assert f.circularity > 0.9 and f.height_to_diameter > 0.65, name
        r, g, b = f.mean_rgb
        assert r > g > b and f.hue < 40 and f.chroma > 0.17, name


# ------------------------------------------------------------------ close-up crops

def _disc_crop(rgb: np.ndarray, disc_xy, disc_diameter: float) -> np.ndarray:
    """A square of 3 disc diameters centred on the disc, clipped to the frame."""
    half = round(1.5 * disc_diameter)
    x, y = round(disc_xy[0]), round(disc_xy[1])
    return np.ascontiguousarray(rgb[max(0, y - half):y + half, max(0, x - half):x + half])


def test_a_disc_centred_crop_of_a_real_photograph_is_rejected_as_a_crop(real_images, tmp_path):
    full = decode(REAL / "images" / "IDRiD" / "IDRiD_01.jpg")
    mask = cv2.imread(str(REAL / "masks" / "IDRiD" / "IDRiD_01__optic_disc.png"), cv2.IMREAD_GRAYSCALE) > 127
    ys, xs = np.nonzero(mask)
    diameter = 2 * np.sqrt(mask.sum() / np.pi)
    crop = _disc_crop(full, (xs.mean(), ys.mean()), diameter)
    assert 1400 < crop.shape[0] < 1700 and crop.shape[0] == crop.shape[1]  # ~3 x 520 px

    assert not_a_fundus_photograph(full) is None  # the photograph it was cut from
    assert _reason(_ingest_array(tmp_path, "idrid_01_disc.png", crop)).startswith(CROP)
    # The same crop as a JPEG, as a user would have saved it.
    cv2.imwrite(str(tmp_path / "idrid_01_disc.jpg"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    assert _reason(ingest_image(tmp_path, SourceFile("idrid_01_disc.jpg", "0" * 64), None, CONFIG)).startswith(CROP)


def test_a_disc_centred_crop_of_a_synthetic_photograph_is_rejected_as_a_crop(tmp_path):
    rgb, truth = render(0, 0, 1024)
    crop = _disc_crop(rgb, truth.disc, truth.disc_diameter)
    assert min(crop.shape[:2]) >= CONFIG.min_side  # rejected for what it is, not for its size
    assert not_a_fundus_photograph(rgb) is None
    assert _reason(_ingest_array(tmp_path, "synth_disc.png", crop)).startswith(CROP)


def test_any_crop_inside_the_field_of_view_is_a_crop(real_images):
    """Crops that leave no border at all, from each dataset: the centre half of the field."""
    for name in ("DRIVE/21_training.tif", "STARE/im0001.jpg", "HRF/01_h.jpg", "Messidor-2/20051020_44261_0100_PP.png",
                 "EyePACS/13_left.jpeg"):
        rgb = downscale(decode(REAL / "images" / name), 1024)
        h, w = rgb.shape[:2]
        side = h // 2
        centre = rgb[h // 2 - side // 2:h // 2 + side // 2, w // 2 - side // 2:w // 2 + side // 2]
        assert (not_a_fundus_photograph(centre) or "").startswith(CROP), name


# ------------------------------------------------------------------ other pictures

@pytest.fixture(scope="module")
def skimage_samples() -> dict[str, np.ndarray]:
    """scikit-image's bundled sample pictures, loaded with the network blocked (no download)."""
    import skimage.data

    def refuse(*args, **kwargs):
        raise AssertionError("skimage.data tried to download")

    original = socket.socket.connect
    socket.socket.connect = refuse
    try:
        return {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "camera", "chelsea")}
    finally:
        socket.socket.connect = original


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_ordinary_photographs_are_rejected(skimage_samples, tmp_path, name):
    rgb = skimage_samples[name]
    assert rgb.ndim == 3 and min(rgb.shape[:2]) >= CONFIG.min_side
    assert _reason(_ingest_array(tmp_path, f"{name}.png", rgb)).startswith(PHOTO)


def test_a_grayscale_photograph_is_rejected(skimage_samples, tmp_path):
    camera = skimage_samples["camera"]
    assert camera.ndim == 2
    reason = _reason(_ingest_array(tmp_path, "camera.png", camera))
    assert reason.startswith("grayscale image (no colour in any channel)")
    # The check names it too, should a grayscale picture get past decode.
    assert not_a_fundus_photograph(np.repeat(camera[..., None], 3, axis=2)).startswith(NEAR_GRAY)


def oct_scan(seed: int = 0, tint=(1.0, 0.96, 1.05), height: int = 496, width: int = 768) -> np.ndarray:
    """An OCT B-scan look-alike: speckled horizontal retinal layers, a foveal dip, a dark background."""
    rng = np.random.default_rng(seed)
    x = np.arange(width)
    fovea = np.exp(-((x - width / 2) / 50) ** 2)
    top = 0.33 * height + 18 * np.sin(2 * np.pi * x / width * 0.8 + rng.uniform(0, 6)) + 30 * fovea
    scan = np.full((height, width), 12.0)
    rows = np.arange(height)[:, None]
    # (thickness, brightness) from the nerve fibre layer down to the choroid
    layers = [(12, 210), (25, 120), (14, 60), (10, 140), (30, 55), (5, 200), (8, 150), (10, 240), (40, 90)]
    for thickness, value in layers:
        thick = thickness * (1 - 0.6 * fovea) if value in (120, 210) else np.full(width, float(thickness))
        scan[(rows >= top) & (rows < top + thick)] = value
        top = top + thick
    scan = cv2.GaussianBlur(scan, (0, 0), 1.5) * rng.gamma(4.0, 0.25, scan.shape)  # speckle
    scan = cv2.GaussianBlur(scan, (0, 0), 0.8)
    return np.clip(scan[..., None] * np.array(tint) + np.array([0, 0, 4]), 0, 255).astype(np.uint8)


def test_an_oct_scan_is_rejected(tmp_path):
    tinted = oct_scan()
    assert np.abs(tinted[..., 2].astype(int) - tinted[..., 0]).max() > 2  # not grayscale, so decode lets it through
    assert _reason(_ingest_array(tmp_path, "oct.png", tinted)).startswith(OCT)
    assert not_a_fundus_photograph(oct_scan(1, tint=(1.0, 0.93, 0.85))).startswith(OCT)  # sepia
    assert not_a_fundus_photograph(oct_scan(2, tint=(1.0, 1.0, 1.0))).startswith(OCT)  # exactly gray


def document_scan(seed: int = 0, height: int = 1100, width: int = 850) -> np.ndarray:
    """A scanned page: slightly warm paper with scanner noise, a heading and lines of text."""
    rng = np.random.default_rng(seed)
    page = np.clip(np.full((height, width, 3), (246, 244, 238), np.float32) + rng.normal(0, 3, (height, width, 1)),
                   0, 255).astype(np.uint8)
    cv2.putText(page, "Discharge summary", (80, 120), cv2.FONT_HERSHEY_SIMPLEX, 1.4, (20, 20, 20), 3, cv2.LINE_AA)
    words = "the patient was seen in clinic today and reported blurred vision in the right eye".split()
    for y in range(190, height - 80, 42):
        cv2.putText(page, " ".join(rng.choice(words, 7)), (80, y), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (30, 30, 35), 2,
                    cv2.LINE_AA)
    return page


def test_a_document_scan_is_rejected(tmp_path):
    assert _reason(_ingest_array(tmp_path, "letter.png", document_scan())).startswith(DOCUMENT)
    cv2.imwrite(str(tmp_path / "letter.jpg"), cv2.cvtColor(document_scan(1), cv2.COLOR_RGB2BGR))
    assert _reason(ingest_image(tmp_path, SourceFile("letter.jpg", "0" * 64), None, CONFIG)).startswith(DOCUMENT)


def test_a_circular_field_of_the_wrong_colour_is_rejected(real_images):
    """A full-field photograph with its colours swapped (a blue-green retina) is not a colour fundus photograph."""
    rgb = decode(REAL / "images" / "DRIVE" / "21_training.tif")
    assert not_a_fundus_photograph(rgb) is None
    assert not_a_fundus_photograph(np.ascontiguousarray(rgb[..., ::-1])).startswith(
        "not a colour fundus photograph: field is not red-orange")


def test_the_check_is_cheap():
    rgb = cv2.resize(render(1, 1, 512)[0], (2048, 2048), interpolation=cv2.INTER_CUBIC)
    assert downscale(rgb).shape[:2] == (SIDE, SIDE)
    start = time.perf_counter()
    for _ in range(5):
        assert not_a_fundus_photograph(rgb) is None
    assert (time.perf_counter() - start) / 5 < 0.5  # measured 0.02 s
