"""Landmarks: optic disc and fovea on a colour fundus photograph by image analysis, no training.

Every measured fact downstream (size and distance in disc diameters, clock hour, quadrant) needs
the disc and the fovea on real photographs, whatever the detector was trained on. This works from
anatomy that holds across cameras:
- the field of view is a bright circle (sometimes cut flat) on a dark background, and the disc
  diameter is about 1/7 of its diameter;
- the disc is a bright blob about one disc diameter across, where thick vessel trunks run
  vertically and the vessels radiate; exudate plaques are as bright but have neither, so
  candidates are the bright blobs and the vessels pick between them;
- the fovea is the darkest vessel-free spot 2.0-3.2 DD from the disc, level with it or a little
  below, toward the field's centre; that geometry rules out haemorrhages elsewhere.
It works on a copy scaled so the field of view is `WORK_RADIUS` px in radius (about 0.1 s of CPU
per photograph) and returns coordinates in the input frame; None rather than a guess when the
evidence is weak. Measured on 69 real photographs by bench/real_anatomy.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

WORK_RADIUS = 256  # field-of-view radius in the working copy (px)
DISC_FRACTION = 1 / 7  # disc diameter / field-of-view diameter, a 45-degree camera
DISC_PRIOR = 2 * WORK_RADIUS * DISC_FRACTION  # prior disc diameter in work px (~73)
FOVEA_SEARCH_DD = (2.0, 3.2)  # where the fovea is looked for, in disc diameters from the disc (anatomy: 2.0-3.0, centre 2.5)
MIN_DISC_SCORE = 0.2  # below: the best blob has under half the vessel-trunk evidence of a typical patch
MIN_FOVEA_SCORE = 0.1  # below: no spot a tenth as dark as the darkest 1% (exudate-filled macula)
# A rival spot 0.5 DD or more from the best scoring this fraction of it: the best is no location.
# On IDRiD_06 a rival at 0.94 took the lead when the JPEG was decoded by another library (the
# fovea moved 0.44 DD); on the other 68 real photographs no rival reaches 0.9 where the score is
# high enough to state (>= 0.4, `crop.LOCALISER_ALONE_MIN_SCORE`).
FOVEA_RIVAL_RATIO = 0.9
FOVEA_RIVAL_DD = 0.5
# The disc's bright region recentred this far (in prior disc diameters) from the bright blob it
# was found at: the two disagree (a pale peripapillary halo drew the region away), and the disc's
# score is halved, so the localiser alone does not state it. On the 69 real photographs the
# centre moved 0.13-0.31 DD on discs judged right on review, and 0.42 on DRIVE 39 (a halo on its
# temporal side: the box moved up and out, 0.75 DD from the disc, and grew to 1.5 times it).
MAX_DISC_DRIFT_DD = 0.35


@dataclass(frozen=True)
class Landmarks:
    disc_centre: tuple[float, float] | None  # (x, y) in the input image's pixel frame
    disc_diameter_px: float | None  # the unit of every measured fact
    disc_score: float  # 0-1, how sure the localiser is
    fovea_centre: tuple[float, float] | None  # None when not found with confidence
    fovea_score: float
    fov_centre: tuple[float, float]
    fov_radius: float


def _shrink(image: np.ndarray, scale: float) -> np.ndarray:
    """Area-average downscale; a cheap stride first so a 4000-px photograph costs milliseconds."""
    step = max(1, int(1 / scale / 2))
    image = np.ascontiguousarray(image[::step, ::step])
    scale *= step
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def brightest_channel(image: np.ndarray) -> np.ndarray:
    """The largest of the three channels per pixel (`image.max(axis=2)`, several times faster)."""
    return np.maximum(np.maximum(image[..., 0], image[..., 1]), image[..., 2])


def darkest_channel(image: np.ndarray) -> np.ndarray:
    """The smallest of the three channels per pixel, as fast as `brightest_channel`."""
    return np.minimum(np.minimum(image[..., 0], image[..., 1]), image[..., 2])


def _fit_circle(points: np.ndarray) -> tuple[float, float, float]:
    """Least-squares circle, refitted without outliers (notches, flat cuts, text at the edge)."""
    keep = np.ones(len(points), bool)
    for _ in range(3):
        x, y = points[keep, 0], points[keep, 1]
        a = np.column_stack([x, y, np.ones_like(x)])
        (cx2, cy2, c), *_ = np.linalg.lstsq(a, x * x + y * y, rcond=None)
        cx, cy = cx2 / 2, cy2 / 2
        r = math.sqrt(max(c + cx * cx + cy * cy, 1.0))
        residual = np.abs(np.hypot(points[:, 0] - cx, points[:, 1] - cy) - r)
        keep = residual < max(1.5, 3 * np.median(residual[keep]))
        if keep.sum() < 20:
            break
    return cx, cy, r


def field_of_view(rgb: np.ndarray) -> tuple[tuple[float, float], float, float] | None:
    """(centre, radius) of the field-of-view circle in the input frame, and the threshold on the
    max channel that separates it from the background. A photograph with no dark surround (the
    field fills or was cropped to the frame) gets the frame's centre and half its longer side;
    a frame with no contrast at all (blank, uniform) gets None."""
    h, w = rgb.shape[:2]
    scale = min(1.0, 256 / max(h, w))
    small = brightest_channel(_shrink(rgb, scale))
    border = np.concatenate([small[:3].ravel(), small[-3:].ravel(), small[:, :3].ravel(), small[:, -3:].ravel()])
    background, bright = float(np.median(border)), float(np.percentile(small, 95))
    if bright - float(np.percentile(small, 5)) < 20:  # no contrast anywhere: a blank frame
        return None
    sh, sw = small.shape
    if background > 0.4 * bright:  # no dark surround: the field fills (or was cropped to) the frame
        return ((w - 1) / 2, (h - 1) / 2), max(h, w) / 2, 0.0
    threshold = background + 0.15 * (bright - background)
    mask = (small > threshold).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    outline = max(contours, key=cv2.contourArea)[:, 0, :].astype(float)
    inside = (outline[:, 0] > 1) & (outline[:, 0] < sw - 2) & (outline[:, 1] > 1) & (outline[:, 1] < sh - 2)
    if inside.sum() < 20:  # the field fills the frame: take the frame's inscribed circle
        cx, cy, r = (sw - 1) / 2, (sh - 1) / 2, max(sw, sh) / 2
    else:
        cx, cy, r = _fit_circle(outline[inside])
    if r < 0.15 * max(sw, sh):
        return None
    return (float((cx + 0.5) / scale - 0.5), float((cy + 0.5) / scale - 0.5)), float(r / scale), threshold


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; wide ones on a shrunk copy (a sigma of 150 px costs 1 ms, not 30)."""
    factor = int(sigma / 3)
    if factor < 2:
        return cv2.GaussianBlur(image, (0, 0), sigma)
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma * small.shape[1] / w)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _masked_blur(image: np.ndarray, mask: np.ndarray, sigma: float, weights: dict | None = None) -> np.ndarray:
    """Gaussian mean over the field only, so the dark surround does not bleed into the edge.
    `weights`: the blurred masks already made for this mask, by sigma (kept there)."""
    m = mask.astype(np.float32)
    if weights is None or sigma not in weights:
        weight = np.maximum(_blur(m, sigma), 1e-3)
        if weights is not None:
            weights[sigma] = weight
    else:
        weight = weights[sigma]
    if image.ndim == 3:
        m, weight = m[..., None], weight[..., None]
    return _blur(image * m, sigma) / weight


def _box_mean(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    m = mask.astype(np.float32)
    return cv2.boxFilter(image * m, -1, size) / np.maximum(cv2.boxFilter(m, -1, size), 1e-3)


def _inset(mask: np.ndarray, margin: float) -> np.ndarray:
    """The mask shrunk by `margin` px, the frame's edge counting as outside (a field cut flat by
    the frame has an edge there too)."""
    return _depth(mask) > margin


def _depth(mask: np.ndarray) -> np.ndarray:
    """Each pixel's distance to the nearest pixel outside the mask or the frame."""
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    return cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]


def _long_structures(mask: np.ndarray, min_length: float) -> np.ndarray:
    """Keep connected pieces at least `min_length` long: vessels, not the dark gaps between
    exudates or the speckle of a grainy photograph."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    long = np.maximum(stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]) >= min_length
    long[0] = False
    return long[labels]


@dataclass
class _Work:
    """The working copy and the maps both searches share; `scale` maps work px to input px."""
    rgb: np.ndarray  # float32, field of view WORK_RADIUS in radius
    origin: tuple[int, int]  # the crop's top-left corner in the input frame
    scale: tuple[float, float]  # (x, y) input px per work px
    centre: tuple[float, float]  # field-of-view centre in work px
    fov: np.ndarray  # bool, inside the field
    lum: np.ndarray  # luminance with the vessels closed over
    vessels: np.ndarray  # vessel contrast (black-hat / local background)
    depth: np.ndarray  # distance into the field (`_depth` of fov)
    weights: dict = field(default_factory=dict)  # `_masked_blur`'s blurred fov, by sigma

    def blur_in_field(self, image: np.ndarray, sigma: float) -> np.ndarray:
        return _masked_blur(image, self.fov, sigma, self.weights)

    def inset(self, margin: float) -> np.ndarray:
        return self.depth > margin

    def to_input(self, x: float, y: float) -> tuple[float, float]:
        return (float(self.origin[0] + (x + 0.5) * self.scale[0] - 0.5),
                float(self.origin[1] + (y + 0.5) * self.scale[1] - 0.5))


def _prepare(rgb: np.ndarray, fov_centre: tuple[float, float], fov_radius: float, threshold: float) -> _Work:
    """Crop the field's bounding square (clipped to the frame), scale it to WORK_RADIUS, and
    compute the vessel map and the vessel-free luminance."""
    h, w = rgb.shape[:2]
    (fcx, fcy), reach = fov_centre, 1.04 * fov_radius
    x0, y0 = max(0, int(fcx - reach)), max(0, int(fcy - reach))
    x1, y1 = min(w, int(fcx + reach) + 1), min(h, int(fcy + reach) + 1)
    work = _shrink(rgb[y0:y1, x0:x1], WORK_RADIUS / fov_radius).astype(np.float32)
    sx, sy = (x1 - x0) / work.shape[1], (y1 - y0) / work.shape[0]
    cx, cy = (fcx - x0 + 0.5) / sx - 0.5, (fcy - y0 + 0.5) / sy - 0.5
    xs, ys = np.arange(work.shape[1], dtype=np.float32), np.arange(work.shape[0], dtype=np.float32)
    radial = np.hypot((xs - cx)[None, :], (ys - cy)[:, None])
    fov = (radial < 0.97 * WORK_RADIUS) & (brightest_channel(work) > threshold)
    fov = _inset(fov, 2)
    depth, weights = _depth(fov), {}
    # outside the field, continue the field's own values so the dark rim reads as no vessel
    work = np.where(fov[..., None], work, _masked_blur(work, fov, DISC_PRIOR / 4, weights))
    red, green = work[..., 0], work[..., 1]
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(DISC_PRIOR / 5) | 1,) * 2)
    # bright lesions clipped to the local median first, so the gaps between exudates are not
    # darker than their surroundings and do not read as vessels
    background = cv2.medianBlur(np.clip(green, 0, 255).astype(np.uint8), int(DISC_PRIOR / 2) | 1).astype(np.float32)
    clipped = np.minimum(green, background)
    vessels = (cv2.morphologyEx(clipped, cv2.MORPH_CLOSE, kernel) - clipped) / np.maximum(background, 1)
    vessels[depth <= 4] = 0  # not the rim's shading
    if fov.any():  # the strongest 12%, in long pieces
        vessels *= _long_structures(vessels > np.percentile(vessels[fov], 88), 0.6 * DISC_PRIOR)
    lum = cv2.morphologyEx(0.6 * green + 0.4 * red, cv2.MORPH_CLOSE, kernel)
    return _Work(work, (x0, y0), (sx, sy), (cx, cy), fov, lum, vessels, depth, weights)


def _disc_maps(work: _Work) -> tuple[np.ndarray, np.ndarray]:
    """Two pieces of evidence for the disc: a bright blob about one disc across (`bright`), and
    vertical vessel trunks in a 1 x 2.5 DD band around it (`vertical`)."""
    dd = DISC_PRIOR
    # opening drops bright spots smaller than a third of a disc: exudates, reflexes, drusen
    open_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(dd / 3) | 1,) * 2)
    lum = cv2.morphologyEx(work.lum, cv2.MORPH_OPEN, open_kernel)
    lum_norm = lum / np.maximum(work.blur_in_field(lum, 2 * dd), 1)
    bright = work.blur_in_field(lum_norm, dd / 4) - work.blur_in_field(lum_norm, dd)
    gx = np.abs(cv2.Sobel(work.vessels, cv2.CV_32F, 1, 0, ksize=3))
    gy = np.abs(cv2.Sobel(work.vessels, cv2.CV_32F, 0, 1, ksize=3))
    vertical = _box_mean(np.clip(gx - gy, 0, None), work.fov, (int(dd), int(2.5 * dd)))
    return bright, vertical


def _vessel_direction(vessels: np.ndarray) -> np.ndarray:
    """Direction of the vessel through each pixel (radians), from the structure tensor: across the
    dominant gradient of the vessel map."""
    smooth = cv2.GaussianBlur(vessels, (0, 0), 2)
    gx, gy = cv2.Sobel(smooth, cv2.CV_32F, 1, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 1)
    jxx, jyy, jxy = (cv2.GaussianBlur(g, (0, 0), 4) for g in (gx * gx, gy * gy, gx * gy))
    return 0.5 * np.arctan2(2 * jxy, jxx - jyy) + np.pi / 2


def _radial_alignment(vessel_px: tuple[np.ndarray, ...], x: float, y: float, dd: float) -> float:
    """How radial the vessels 0.3-1.5 DD around (x, y) run, weighted by their contrast: +1 all
    pointing at it, 0 no preference, -1 all running around it. The vessels leave the disc
    radially; around an exudate or a bright reflex they run any way."""
    xs, ys, weight, direction = vessel_px
    dx, dy = xs - x, ys - y
    near = np.hypot(dx, dy)
    near = (near > 0.3 * dd) & (near < 1.5 * dd)
    if not near.any():
        return 0.0
    cos2 = np.cos(2 * (direction[near] - np.arctan2(dy[near], dx[near])))
    return float((weight[near] * cos2).sum() / weight[near].sum())


def _find_disc(work: _Work) -> tuple[float, float, float, float] | None:
    """(x, y, diameter, score) in work px. Candidates are the brightest blobs about a disc across;
    each is scored by brightness x vertical vessel trunks x radial vessels, so a bright exudate
    plaque or a reflex (no trunks, no radiating vessels) loses to a dimmer real disc."""
    dd = DISC_PRIOR
    bright, vertical = _disc_maps(work)
    bright = np.where(work.fov, np.clip(bright, 0, None), 0)
    peaks = (bright == cv2.dilate(bright, np.ones((int(dd) | 1,) * 2, np.uint8))) & (bright > 0)
    candidates = sorted(zip(*np.nonzero(peaks)), key=lambda p: -bright[p])[:8]
    if not candidates:
        return None
    ys, xs = np.nonzero(work.vessels)
    vessel_px = (xs, ys, work.vessels[ys, xs], _vessel_direction(work.vessels)[ys, xs])
    vertical_typical = max(float(np.median(vertical[work.fov])), 1e-6)
    top = bright[candidates[0]]

    def score(p):
        radial = _radial_alignment(vessel_px, p[1], p[0], dd)
        return bright[p] / top * vertical[p] / vertical_typical * max(0.0, radial + 0.5)

    py, px = max(candidates, key=score)
    raw = score((py, px))  # 0.5: the brightest blob, typical trunk density, no radial preference
    x, y, diameter = _refine_disc(work, float(px), float(py))
    agree = 0.5 if math.hypot(x - px, y - py) > MAX_DISC_DRIFT_DD * dd else 1.0
    return x, y, diameter, agree * float(raw / (raw + 1))


def _refine_disc(work: _Work, x: float, y: float) -> tuple[float, float, float]:
    """(x, y, diameter) from the disc's own extent: the region brighter than 35% of the way from
    the surrounding retina to the disc's centre, recentred on it three times. The measured size
    is pulled halfway (geometric mean) to the prior FOV/7, which on the IDRiD masks halves the
    error of either alone (a pale rim or a bright atrophic halo moves the measurement)."""
    dd, half = DISC_PRIOR, int(1.3 * DISC_PRIOR)
    x0, y0 = max(0, int(x) - half), max(0, int(y) - half)
    lum = cv2.GaussianBlur(work.lum, (0, 0), 2)[y0: int(y) + half, x0: int(x) + half]
    fov = work.fov[y0: int(y) + half, x0: int(x) + half]
    yy, xx = np.mgrid[: lum.shape[0], : lum.shape[1]]
    cx, cy, diameter = x - x0, y - y0, dd
    for _ in range(3):
        d = np.hypot(xx - cx, yy - cy)
        ring = (d > 0.9 * dd) & (d < 1.2 * dd) & fov
        core = (d < 0.25 * dd) & fov
        if not ring.any() or not core.any():
            break
        peak, background = np.median(lum[core]), np.median(lum[ring])
        if peak <= background:
            break
        region = ((lum > background + 0.35 * (peak - background)) & (d < 0.8 * dd) & fov).astype(np.uint8)
        labels = cv2.connectedComponents(region)[1]
        label = labels[min(int(round(cy)), lum.shape[0] - 1), min(int(round(cx)), lum.shape[1] - 1)]
        if label == 0:
            break
        inside = labels == label
        cx, cy = float(xx[inside].mean()), float(yy[inside].mean())
        measured = math.sqrt(4 * inside.sum() / math.pi)
        if (inside & ~_inset(fov, 2)).any():  # cut by the field's edge: its height, the disc is ~4% taller than wide
            measured = max(measured, 0.96 * (np.ptp(yy[inside]) + 1))
        diameter = math.sqrt(measured * dd)
    return cx + x0, cy + y0, diameter


def _find_fovea(work: _Work, disc: tuple[float, float], dd: float) -> tuple[float, float, float, float] | None:
    """(x, y, score, rival) in work px: the darkest vessel-free spot 2.0-3.2 DD from the disc, level
    with it or a little below, on the side toward the field's centre when the disc is off-centre,
    and the best score `FOVEA_RIVAL_DD` or more away from it. Darkness is centre (DD/6) against
    surround (DD/1.5) on the green channel as photographed: the foveal pit is smaller than the
    vessel-closing kernel, so the closed luminance would erase it."""
    green, clear = work.rgb[..., 1], work.inset(dd / 2)
    surround = work.blur_in_field(green, dd / 1.5)
    darkness = (surround - work.blur_in_field(green, dd / 6)) / np.maximum(surround, 1)
    darkness /= max(float(np.percentile(darkness[clear], 99)), 1e-3)  # 1: as dark as the darkest 1% of spots
    vessel_density = _box_mean(work.vessels, work.fov, (int(dd * 0.6), int(dd * 0.6)))
    typical_density = max(float(np.mean(vessel_density[work.fov])), 1e-4)
    yy, xx = np.mgrid[: darkness.shape[0], : darkness.shape[1]].astype(np.float32)
    dx, dy = (xx - disc[0]) / dd, (yy - disc[1]) / dd
    distance = np.hypot(dx, dy)
    angle = np.degrees(np.arctan2(dy, np.abs(dx)))  # below the disc is positive
    allowed = (distance >= FOVEA_SEARCH_DD[0]) & (distance <= FOVEA_SEARCH_DD[1]) & (angle > -20) & (angle < 35) & clear
    offset = (disc[0] - work.centre[0]) / WORK_RADIUS
    if abs(offset) > 0.25:  # an off-centre disc: the macula lies toward the field's centre
        allowed &= (dx < 0) if offset > 0 else (dx > 0)
    prior = np.exp(-((distance - 2.5) ** 2) / (2 * 0.4**2) - ((angle - 8) ** 2) / (2 * 15**2))
    score = np.clip(darkness, 0, None) * prior * np.exp(-vessel_density / typical_density)
    score[~allowed] = 0
    if not score.any():
        return None
    py, px = np.unravel_index(int(np.argmax(score)), score.shape)
    rival = score[np.hypot(xx - px, yy - py) >= FOVEA_RIVAL_DD * dd]
    return float(px), float(py), min(1.0, float(score[py, px])), min(1.0, float(rival.max(initial=0.0)))


def locate_landmarks(rgb: np.ndarray) -> Landmarks:
    """rgb: HxWx3 uint8 RGB full-resolution photograph. Works internally on a downscaled copy
    (field of view scaled to `WORK_RADIUS`) so it is fast; returns coordinates in the input frame.
    The disc (and then the fovea) is None when its score is below MIN_DISC_SCORE (MIN_FOVEA_SCORE);
    the fovea also when a rival spot scores nearly as well (`FOVEA_RIVAL_RATIO`)."""
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    h, w = rgb.shape[:2]
    fov = field_of_view(rgb)
    if fov is None:  # nothing but background: no field, so no anatomy
        return Landmarks(None, None, 0.0, None, 0.0, ((w - 1) / 2, (h - 1) / 2), min(h, w) / 2)
    fov_centre, fov_radius, threshold = fov
    work = _prepare(rgb, fov_centre, fov_radius, threshold)
    disc = _find_disc(work) if work.fov.sum() > 0.3 * math.pi * WORK_RADIUS**2 else None
    if disc is None or disc[3] < MIN_DISC_SCORE:
        return Landmarks(None, None, disc[3] if disc else 0.0, None, 0.0, fov_centre, fov_radius)
    x, y, dd, disc_score = disc
    fovea = _find_fovea(work, (x, y), dd)
    fovea_score = fovea[2] if fovea else 0.0
    clear_winner = fovea is not None and fovea[3] < FOVEA_RIVAL_RATIO * fovea[2]
    fovea_centre = work.to_input(*fovea[:2]) if clear_winner and fovea_score >= MIN_FOVEA_SCORE else None
    return Landmarks(work.to_input(x, y), float(dd * work.scale[0]), disc_score, fovea_centre, fovea_score,
                     fov_centre, fov_radius)
