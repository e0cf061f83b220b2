"""What ingest measures on a photograph's pixels: image quality (sharpness, exposure, how much
of the frame the retina covers, and a grade from them) and the perceptual hash that keeps
near-duplicates in one split.

Each takes RGB pixels, or BGR (OpenCV's decode order) with `channels="BGR"`: the same values
either way, without a conversion of the whole photograph.
"""
from __future__ import annotations

import cv2
import numpy as np

from fundus_engine.config import IngestConfig
from fundus_engine.landmarks import brightest_channel
from fundus_engine.models import ImageRecord, Quality

QUALITY_SIDE = 512  # quality is measured on a copy this long
_GRAY = {"RGB": cv2.COLOR_RGB2GRAY, "BGR": cv2.COLOR_BGR2GRAY}


def downscaled(image: np.ndarray, side: int) -> np.ndarray:
    """An area-averaged copy whose longer side is `side`; the image itself when not longer."""
    scale = side / max(image.shape[:2])
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image


FOV_MIN_LEVEL = 25  # brightest channel of a digital camera's near-black border: at most this


def field_of_view(rgb: np.ndarray) -> np.ndarray:
    """The retina area, brighter than the border the camera leaves around it. A digital camera's
    border is near black; scanned film (STARE) has a dim one, 25-45 in the brightest channel, that
    a fixed threshold of 25 counted as retina (93% of a frame the retina covers 73% of). So the
    threshold is the larger of 25 and half of Otsu's split between border and retina, which keeps
    DRIVE's coverage within 0.7 points of its field-of-view masks."""
    level = brightest_channel(rgb)
    split, _ = cv2.threshold(np.ascontiguousarray(level, np.uint8), 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return level > max(FOV_MIN_LEVEL, split / 2)


def grade_quality(small: np.ndarray, config: IngestConfig, channels: str = "RGB") -> Quality:
    """Quality measured on the photograph's `QUALITY_SIDE` copy (`downscaled`)."""
    fov = field_of_view(small)
    coverage = float(fov.mean())
    inner = cv2.erode(fov.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    gray = cv2.cvtColor(small, _GRAY[channels]).astype(np.float32)
    sharpness = float(cv2.Laplacian(gray, cv2.CV_32F)[inner].var()) if inner.any() else 0.0
    exposure = float(gray[fov].mean() / 255) if fov.any() else 0.0
    if sharpness < config.min_sharpness or not 0.12 <= exposure <= 0.85:
        grade = "poor"
    elif sharpness < 3 * config.min_sharpness or not 0.18 <= exposure <= 0.75:
        grade = "usable"
    else:
        grade = "good"
    return Quality(sharpness=round(sharpness, 3), exposure=round(exposure, 4),
                   fov_coverage=round(coverage, 4), grade=grade)


def stated_grade(record: ImageRecord) -> str | None:
    """The quality grade a record may state: where its thresholds were set and tested, on the
    synthetic photographs (blur and exposure sweeps, tests/test_ingest.py). On the 69 real
    photographs every one graded "good", the out-of-focus STARE im0004 and the hazy, underexposed
    EyePACS 10_right included: there the grade separates nothing, and records state none."""
    return record.quality.grade if record.synthetic else None


def perceptual_hash(rgb: np.ndarray, channels: str = "RGB") -> str:
    """256-bit difference hash (16x16 dHash) as 64 hex digits. Resized, recompressed, blurred
    or re-exposed copies of a photograph stay within a few bits; different fundus photographs,
    which all share a dark border and a bright disc, differ in 30 or more (a 64-bit dHash
    cannot tell them apart: measured 1 bit between different synthetic eyes)."""
    gray = cv2.cvtColor(rgb, _GRAY[channels])
    small = cv2.resize(gray, (17, 16), interpolation=cv2.INTER_AREA).astype(np.int16)
    return np.packbits(small[:, 1:] > small[:, :-1]).tobytes().hex()
