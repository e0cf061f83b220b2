"""Is a picture a full-field colour fundus photograph?

Fundus cameras image the retina through the pupil, so every full-field photograph is a roughly
circular, red-orange field of view inside a near-black border (the field may be cut flat at the
top and bottom by the sensor). Close-up crops, OCT scans, document scans and ordinary
photographs all lack one of these, and each is named in the reason so whoever supplied the
file knows what was wrong with it.

Everything is measured on a copy whose longer side is 256 px (a few milliseconds per image).
Thresholds were set from measurements on the 69 real photographs in ../shared/real_fundus
(IDRiD, EyePACS, DRIVE, STARE, Messidor-2, HRF), 100 synthetic ones (fundus_engine.synth) and
the rejected kinds (scikit-image's astronaut, coffee, camera, chelsea; generated OCT-like and
document scans; disc-centred crops of real and synthetic photographs). The measured range of
each side is recorded next to each threshold: "real" and "synth" are the accepted photographs,
"rejected" the nearest non-fundus picture.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from fundus_engine.landmarks import brightest_channel, darkest_channel

SIDE = 256  # features are measured on a copy this long

# A pixel is dark (outside the field of view) below 0.3 x the frame's 99th-percentile
# brightness, clamped to [20, 70]: STARE's border is up to 43 (JPEG-lossy, dark green), the
# field of the dimmest real photograph (EyePACS 10_right, mean RGB 59,53,47) has its 99th
# percentile at 109, so its threshold comes down to 33.
DARK_FRACTION_OF_P99, DARK_MIN, DARK_MAX = 0.3, 20.0, 70.0

# Shape of a full-field photograph.
MIN_DARK_CORNERS = 0.9  # corner patches dark: real 1.00 (all 69), synth 1.00; crops <= 0.50, photographs <= 0.32
MIN_DARK_SIDES = 0.7  # left/right frame edges dark: real >= 0.89 (STARE im0044), synth 1.00; crops <= 0.50
MIN_FIELD_FRACTION = 0.3  # field / frame: real 0.44 (EyePACS 10_left)-0.85 (HRF), synth 0.68-0.69; OCT 0.13
MIN_HEIGHT_TO_DIAMETER = 0.55  # field height / its circle diameter: real >= 0.70 (HRF, cut flat); OCT <= 0.14
MIN_CIRCULARITY = 0.85  # real >= 0.92 (STARE im0002), synth >= 0.99; OCT <= 0.64

# Colour of a full-field photograph (over the field): R > G > B, a red-orange hue, not near-grayscale.
MAX_HUE = 45.0  # hue of the mean colour: real 7-35 degrees (HRF 13_h, STARE im0001), synth 11-20
MIN_CHROMA = 0.15  # real >= 0.18 (EyePACS 10_right, dim bluish-grey), synth >= 0.76; OCT 0.03-0.11, document 0.03

# Naming what a rejected picture looks like (these never decide acceptance).
DOC_WHITE = 0.5  # near-white unsaturated pixels: document scan 0.91; photographs <= 0.31, real fundus <= 0.02
OCT_HORIZONTAL = 2.5  # vertical / horizontal gradient energy: OCT scans >= 7.0; real <= 1.31, synth <= 1.04
OCT_DARK = 0.4  # dark background: OCT scans >= 0.75
CROP_ROUGHNESS = 0.75  # 90th-percentile gradient / mean brightness: fundus crops <= 0.59 (327 random crops of
#                       real and synthetic photographs, 30 disc crops); photographs >= 0.95 (chelsea), coffee 1.42


@dataclass(frozen=True)
class FundusFeatures:
    dark_level: float  # brightness below which a pixel is border
    field_fraction: float  # largest bright region (holes filled) / frame
    circularity: float  # field area / area of its enclosing circle within the frame and the field's rows
    height_to_diameter: float  # field height / enclosing circle diameter (1 for an uncut circle)
    dark_corners: float  # fraction of the four corner patches that is dark
    dark_sides: float  # fraction of the left and right frame edges that is dark
    mean_rgb: tuple[float, float, float]  # over the field, eroded
    hue: float  # degrees, of the mean colour (0 red, 30 orange, 60 yellow, 120 green, 240 blue)
    chroma: float  # mean (max - min) / max over the field: 0 for a grayscale picture
    white_fraction: float  # frame pixels near-white and unsaturated (paper)
    dark_fraction: float  # frame pixels darker than dark_level
    roughness: float  # 90th-percentile gradient magnitude / mean brightness over lit pixels
    horizontal: float  # vertical / horizontal gradient energy of the smoothed picture


def downscale(rgb: np.ndarray, side: int = SIDE) -> np.ndarray:
    scale = side / max(rgb.shape[:2])
    return cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else rgb


def _hue(r: float, g: float, b: float) -> float:
    hsv = cv2.cvtColor(np.array([[[r, g, b]]], np.float32) / 255, cv2.COLOR_RGB2HSV)
    return float(hsv[0, 0, 0])


def measure(rgb: np.ndarray) -> FundusFeatures:
    """The features not_a_fundus_photograph decides on (RGB uint8 in)."""
    small = downscale(rgb)
    h, w = small.shape[:2]
    brightness = brightest_channel(small).astype(np.float32)
    dark_level = float(np.clip(DARK_FRACTION_OF_P99 * np.percentile(brightness, 99), DARK_MIN, DARK_MAX))
    dark = brightness < dark_level
    bright = cv2.morphologyEx((~dark).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))

    field = np.zeros((h, w), np.uint8)
    circularity = height_to_diameter = 0.0
    contours, _ = cv2.findContours(bright, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if contours:
        contour = max(contours, key=cv2.contourArea)
        cv2.drawContours(field, [contour], -1, 1, thickness=-1)  # holes (dark lesions, vessels) filled
        (cx, cy), radius = cv2.minEnclosingCircle(contour)
        _, y, _, fh = cv2.boundingRect(contour)
        circle = np.zeros((h, w), np.uint8)  # clipped to the frame by drawing into it
        cv2.circle(circle, (round(cx), round(cy)), round(radius), 1, thickness=-1)
        circle[:y], circle[y + fh:] = 0, 0  # flats cut off at the top and bottom are allowed
        circularity = float(field.sum() / max(1, circle.sum()))
        height_to_diameter = float(fh / max(1.0, 2 * radius))

    c = max(4, round(0.06 * min(h, w)))
    dark_corners = float(np.mean([dark[:c, :c].mean(), dark[:c, -c:].mean(),
                                  dark[-c:, :c].mean(), dark[-c:, -c:].mean()]))
    dark_sides = float(np.concatenate([dark[:, :2], dark[:, -2:]], axis=1).mean())

    inner = cv2.erode(field, np.ones((7, 7), np.uint8)).astype(bool)
    if not inner.any():
        inner = np.ones((h, w), bool)
    pixels = small[inner].astype(np.float32)
    r, g, b = (float(v) for v in pixels.mean(axis=0))
    peak = brightest_channel(pixels)
    chroma = float(((peak - darkest_channel(pixels)) / np.maximum(peak, 1)).mean())
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    white_fraction = float(((hsv[..., 1] < 0.15 * 255) & (hsv[..., 2] > 0.7 * 255)).mean())

    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)
    lit = ~dark
    magnitude = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    roughness = float(np.percentile(magnitude[lit], 90) / max(1.0, gray[lit].mean())) if lit.any() else 0.0
    smooth = cv2.GaussianBlur(gray, (0, 0), 2)
    horizontal = float(np.abs(cv2.Sobel(smooth, cv2.CV_32F, 0, 1)).sum()
                       / max(1.0, np.abs(cv2.Sobel(smooth, cv2.CV_32F, 1, 0)).sum()))

    return FundusFeatures(
        dark_level=dark_level, field_fraction=float(field.mean()), circularity=circularity,
        height_to_diameter=height_to_diameter, dark_corners=dark_corners, dark_sides=dark_sides,
        mean_rgb=(r, g, b), hue=_hue(r, g, b), chroma=chroma,
        white_fraction=white_fraction, dark_fraction=float(dark.mean()), roughness=roughness,
        horizontal=horizontal)


def _shape_problem(f: FundusFeatures) -> str | None:
    if f.dark_corners < MIN_DARK_CORNERS or f.dark_sides < MIN_DARK_SIDES:
        return "no dark border around the field of view"
    if f.field_fraction < MIN_FIELD_FRACTION:
        return f"field of view covers only {f.field_fraction:.0%} of the frame"
    if f.height_to_diameter < MIN_HEIGHT_TO_DIAMETER or f.circularity < MIN_CIRCULARITY:
        return f"field of view is not circular ({f.circularity:.0%} of its circle)"
    return None


def _colour_problem(f: FundusFeatures) -> str | None:
    r, g, b = f.mean_rgb
    if f.chroma < MIN_CHROMA:
        return "almost no colour"
    if not (r > g > b and f.hue <= MAX_HUE):
        return f"field is not red-orange (mean RGB {r:.0f},{g:.0f},{b:.0f})"
    return None


def explain(f: FundusFeatures) -> str | None:
    """The reason a picture with these features is not a full-field colour fundus photograph, or None."""
    shape, colour = _shape_problem(f), _colour_problem(f)
    if shape is None and colour is None:
        return None
    if f.white_fraction >= DOC_WHITE:
        return "looks like a document scan (white page with dark text), not a fundus photograph"
    if f.chroma < MIN_CHROMA:
        if f.horizontal >= OCT_HORIZONTAL and f.dark_fraction >= OCT_DARK:
            return ("looks like an OCT scan (near-grayscale horizontal layers on a dark background), "
                    "not a colour fundus photograph")
        return "near-grayscale picture (almost no colour), not a colour fundus photograph"
    retina_like = colour is None and f.roughness <= CROP_ROUGHNESS  # fundus-coloured and smooth like retina
    if retina_like and shape == "no dark border around the field of view":
        return ("looks like a close-up crop of a fundus photograph (retina reaches the frame edges, no circular "
                "field of view in a dark border); a full-field fundus photograph is required")
    if retina_like:
        return f"not a full-field fundus photograph: {shape}"
    if shape is None:
        return f"not a colour fundus photograph: {colour}"
    return ("looks like an ordinary photograph, not a fundus photograph "
            "(no red-orange circular field of view in a dark border)")


def not_a_fundus_photograph(rgb: np.ndarray) -> str | None:
    """None for a full-field colour fundus photograph (RGB uint8), else what it looks like instead."""
    return explain(measure(rgb))
