"""Crop: region crops with context, a box-marked copy for region-identification questions, and
the measured facts a clinician would state (size and distance in disc diameters, clock hour
and quadrant relative to the fovea, colour).

The geometry is pure functions of boxes and points; only `crop_image` touches files. A
photograph is decoded once, as BGR (what OpenCV's encoder takes: crops and marked copies are
written from it without a conversion), or taken as detect decoded it (`handoff`), and read as RGB
through a view of it.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, NamedTuple

import cv2
import numpy as np
from PIL import Image

from fundus_engine.config import CropConfig
from fundus_engine.decoding import decode_bgr
from fundus_engine.models import Anatomy, Detection, ImageRecord, Point, Region, Reject
from fundus_engine.evidence import DetectorEvidence
from fundus_engine.handoff import PixelHandoff
from fundus_engine.importers import mask_foreground
from fundus_engine.landmarks import Landmarks, locate_landmarks
from fundus_engine.vocabulary import ANATOMY, BY_NAME, LESIONS

STAGE = "crop"
THREADS = min(4, os.cpu_count() or 1)  # photographs cropped at once (OpenCV and NumPy release the GIL)


def centre(xyxy: list[float]) -> Point:
    return Point(x=(xyxy[0] + xyxy[2]) / 2, y=(xyxy[1] + xyxy[3]) / 2)


def box_999(xyxy: list[float], width: int, height: int) -> list[int]:
    """InternVL box convention: integers 0-999 normalised by image width and height.

    A box narrower than one unit (a microaneurysm on a 4288-px photograph is about four pixels)
    keeps a width and height of one unit rather than collapsing to x1 == x2."""
    scale = [width, height, width, height]
    x1, y1, x2, y2 = [int(min(999, max(0, round(v / s * 999)))) for v, s in zip(xyxy, scale)]
    if x2 <= x1:
        x1, x2 = (x1, x1 + 1) if x1 < 999 else (998, 999)
    if y2 <= y1:
        y1, y2 = (y1, y1 + 1) if y1 < 999 else (998, 999)
    return [x1, y1, x2, y2]


AGREE_DD = 0.5  # detector and localiser centres closer than this (in disc diameters) agree
# The localiser's score a landmark needs to be stated on the localiser's word alone (no detector
# validated on that kind of photograph confirming it). On the 69 real photographs of
# ../shared/real_fundus, the discs found misplaced on review (DRIVE 34, STARE im0001, im0005,
# im0081) scored 0.23-0.51 and the 20 checked against IDRiD's disc masks (all inside) 0.69-0.89;
# the foveas found misplaced (STARE im0005, im0077, EyePACS 10_right) 0.14-0.37. Below these the
# record says the landmark was not found, which is true, rather than where it is, which may not be.
LOCALISER_ALONE_MIN_SCORE = {"optic_disc": 0.6, "fovea": 0.4}
PLAUSIBLE_FOVEA_DD = (1.5, 3.5)  # a disc-fovea distance a landmark from any source may have (clinically
# ~2.5, range ~2.0-3.0; wider than the localiser's search, `landmarks.FOVEA_SEARCH_DD`, for measurement error)


def _box_around(point: Point, side: float) -> list[float]:
    return [round(point.x - side / 2, 1), round(point.y - side / 2, 1), round(point.x + side / 2, 1),
            round(point.y + side / 2, 1)]


def _localised(record: ImageRecord, label: str, point: Point, dd: float, score: float) -> Detection:
    """The localiser's disc or fovea as a region: a one-disc-diameter box, as the detector draws them."""
    return Detection(sha256=record.sha256, region_id=f"{record.sha256[:12]}-loc-{label}", label=label,
                     xyxy=_box_around(point, dd), confidence=round(min(1.0, max(0.0, score)), 4), source="localiser")


def _fovea_plausible(fovea: Point | None, disc: Point | None, dd: float | None) -> bool:
    if fovea is None or disc is None or not dd:
        return fovea is not None
    return PLAUSIBLE_FOVEA_DD[0] <= math.hypot(fovea.x - disc.x, fovea.y - disc.y) / dd <= PLAUSIBLE_FOVEA_DD[1]


def _fuse(label: str, detected: Detection | None, located: Detection | None, trusted: bool, dd: float | None,
          plausible) -> tuple[Detection | None, str | None, str | None]:
    """One landmark from the detector's box and the localiser's: (the box used, its source, a note
    on any disagreement). Labelled boxes stand; where both agree (within AGREE_DD) the detector's
    box is used if it is validated on this kind of photograph, else the localiser's; where they
    disagree, the validated detector, else the localiser; implausible positions are not used, nor the
    localiser's alone when it is unsure (`LOCALISER_ALONE_MIN_SCORE`)."""
    name = BY_NAME[label].display.lower()
    if detected and detected.source == "ground_truth":
        return detected, "label", None
    detected = detected if detected and plausible(centre(detected.xyxy)) else None
    located = located if located and plausible(centre(located.xyxy)) else None
    if detected and located:
        a, b = centre(detected.xyxy), centre(located.xyxy)
        gap = math.hypot(a.x - b.x, a.y - b.y) / (dd or 1)
        if gap <= AGREE_DD:
            return (detected if trusted else located), "detector+localiser", None
        if trusted:
            return detected, "detector", (f"{name}: the localiser's is {gap:.1f} DD from the detector's; detector "
                                          "used (validated on this kind of photograph)")
        if _confident(label, located)[0]:
            return located, "localiser", (f"{name}: the detector's is {gap:.1f} DD from the localiser's; localiser "
                                          "used (the detector is not validated on this kind of photograph)")
        return None, None, (f"{name}: the detector's is {gap:.1f} DD from the localiser's, and neither is sure "
                            f"enough to state (the detector is not validated on this kind of photograph, the "
                            f"localiser scores {located.confidence:.2f}, under {LOCALISER_ALONE_MIN_SCORE[label]})")
    if detected and trusted:
        return detected, "detector", None
    if located:
        confident, weak = _confident(label, located)
        return (confident, "localiser", None) if confident else (None, None, weak)
    if detected:
        return None, None, f"{name}: the detector's is not validated on this kind of photograph and the localiser found none"
    return None, None, None


def _confident(label: str, located: Detection | None) -> tuple[Detection | None, str | None]:
    """The localiser's landmark where its score allows stating it on the localiser's word alone
    (`LOCALISER_ALONE_MIN_SCORE`), else None and why."""
    floor = LOCALISER_ALONE_MIN_SCORE[label]
    if located is None or located.confidence >= floor:
        return located, None
    return None, (f"{BY_NAME[label].display.lower()}: the localiser's scores {located.confidence:.2f} (under "
                  f"{floor}) and no detector validated on this kind of photograph confirms it; not stated")


def _diameter(box: Detection) -> float:
    return ((box.xyxy[2] - box.xyxy[0]) + (box.xyxy[3] - box.xyxy[1])) / 2


def anatomy(record: ImageRecord, detections: list[Detection], found: Landmarks | None = None,
            trusted: Iterable[str] = ANATOMY) -> tuple[Anatomy, list[Detection]]:
    """Disc and fovea from labels where given, else fused from the detector and the image-analysis
    localiser (`_fuse`; `trusted`: the anatomy classes the detector is validated on for this kind of
    photograph). Returns the anatomy and the detections with the disc and fovea boxes actually used."""
    trusted = set(trusted)
    best = {d.label: d for d in sorted(detections, key=lambda d: d.confidence) if d.label in ANATOMY}
    others = [d for d in detections if d.label not in ("optic_disc", "fovea")]
    notes: list[str] = []
    loc_dd = found.disc_diameter_px if found and found.disc_centre else None

    located = None
    if loc_dd:
        located = _localised(record, "optic_disc", Point(x=found.disc_centre[0], y=found.disc_centre[1]), loc_dd,
                             found.disc_score)
    disc_box, disc_source, note = _fuse("optic_disc", best.get("optic_disc"), located, "optic_disc" in trusted,
                                        loc_dd, lambda p: True)
    notes += [note] if note else []
    disc_centre = centre(disc_box.xyxy) if disc_box else None
    disc_diameter = _diameter(disc_box) if disc_box else None
    if disc_source == "localiser" or disc_source is None:
        others = [d for d in others if d.label != "optic_cup"]  # no cup without the disc it sits in
    if record.disc:  # a labelled centre outranks both; the diameter still comes from a box
        if disc_box and disc_box.source == "localiser":
            disc_box = _localised(record, "optic_disc", record.disc, disc_diameter, disc_box.confidence)
        disc_centre, disc_source = record.disc, "label"

    located = None  # the localiser searched for the fovea from its own disc: not where that disc was not used
    if found and found.fovea_centre and disc_box is not None and (disc_diameter or loc_dd):
        located = _localised(record, "fovea", Point(x=found.fovea_centre[0], y=found.fovea_centre[1]),
                             disc_diameter or loc_dd, found.fovea_score)
    fovea_box, fovea_source, note = _fuse("fovea", best.get("fovea"), located, "fovea" in trusted,
                                          disc_diameter or loc_dd,
                                          lambda p: _fovea_plausible(p, disc_centre, disc_diameter))
    notes += [note] if note else []
    fovea_centre = centre(fovea_box.xyxy) if fovea_box else None
    if record.fovea:
        if fovea_box and fovea_box.source == "localiser":
            fovea_box = _localised(record, "fovea", record.fovea, disc_diameter or loc_dd, fovea_box.confidence)
        fovea_centre, fovea_source = record.fovea, "label"

    cup_box = next((d for d in others if d.label == "optic_cup"), None)
    cup_to_disc = None
    if disc_box and cup_box:  # vertical cup-to-disc ratio, as glaucoma screening uses
        cup_to_disc = round((cup_box.xyxy[3] - cup_box.xyxy[1]) / max(1e-6, disc_box.xyxy[3] - disc_box.xyxy[1]), 3)
    laterality, source = record.laterality, "label"
    seen = _inferred_laterality(disc_centre, fovea_centre, found)
    if laterality == "unknown":
        laterality, source = seen, ("unknown" if seen == "unknown" else "inferred")
    elif seen != "unknown" and seen != laterality:  # a mirrored photograph, or a wrong label
        # a record saying "left eye" of a picture of a right eye would teach the wrong side: neither is stated
        notes.append(f"laterality: labelled {laterality}, but the disc's side of the fovea says {seen}")
        laterality, source = "unknown", "conflict"
    anat = Anatomy(sha256=record.sha256, laterality=laterality, laterality_source=source,
                   disc_centre=disc_centre, disc_diameter_px=round(disc_diameter, 2) if disc_diameter else None,
                   disc_source=disc_source, fovea_centre=fovea_centre, fovea_source=fovea_source,
                   cup_to_disc=cup_to_disc, landmark_disagreement=notes)
    used = [box for box in (disc_box, fovea_box) if box]
    return anat, sorted(used + others, key=lambda d: d.region_id)


def settled_without_localiser(anat: Anatomy, used: list[Detection]) -> bool:
    """Whether `anatomy` made without the localiser is what it would make with it, apart from the
    provenance: the disc and the fovea are both boxes from labels or from a detector trusted here
    (`anatomy` uses those wherever the localiser puts its own, and checks the fovea's distance from
    the disc without it), and they are apart enough to tell the side."""
    boxes = {d.label for d in used if d.label in ("optic_disc", "fovea") and d.source != "localiser"}
    return (boxes == {"optic_disc", "fovea"} and anat.disc_source in ("label", "detector")
            and anat.fovea_source in ("label", "detector") and anat.disc_centre is not None
            and anat.fovea_centre is not None and abs(anat.disc_centre.x - anat.fovea_centre.x) > 1)


def _inferred_laterality(disc: Point | None, fovea: Point | None, found: Landmarks | None) -> str:
    """The disc is nasal to the fovea: on the viewer's right in a right eye. Without a fovea, a
    disc well off the centre of the field of view tells the side too."""
    if disc and fovea and abs(disc.x - fovea.x) > 1:
        return "OD" if disc.x > fovea.x else "OS"
    if disc and found and abs(disc.x - found.fov_centre[0]) > 0.2 * found.fov_radius:
        return "OD" if disc.x > found.fov_centre[0] else "OS"
    return "unknown"


def clock_hour(dx: float, dy: float) -> int:
    """Clock hour as viewed, 12 superior and 3 on the viewer's right (image y grows downward)."""
    angle = math.degrees(math.atan2(dx, -dy)) % 360
    hour = round(angle / 30) % 12
    return 12 if hour == 0 else hour


def quadrant(dx: float, dy: float, laterality: str) -> str | None:
    """Retinal quadrant around the fovea; nasal is toward the disc, so it mirrors between eyes."""
    if laterality not in ("OD", "OS"):
        return None
    vertical = "supero" if dy < 0 else "infero"
    nasal_is_right = laterality == "OD"
    horizontal = "nasal" if (dx > 0) == nasal_is_right else "temporal"
    return vertical + horizontal


def colour_name(rgb: tuple[float, float, float]) -> str:
    hsv = cv2.cvtColor(np.uint8([[rgb]]), cv2.COLOR_RGB2HSV)[0, 0]
    hue, sat, val = int(hsv[0]) * 2, int(hsv[1]) / 255, int(hsv[2]) / 255
    if sat < 0.28 and val > 0.6:
        return "white"
    if val < 0.45:
        return "dark red"
    if 35 <= hue <= 70:
        return "yellow"
    if 20 <= hue < 35:
        return "yellow-orange" if sat > 0.5 else "pale yellow"
    return "red" if sat > 0.5 else "pink"


def _reach(point: Point, xyxy: list[float], lesion: np.ndarray | None) -> float:
    """Pixels from a point to the nearest of the lesion's pixels where they were told apart from
    the retina (`Contrast.points`), else to the nearest point of its box (0 inside it). A box's
    centre says nothing of how near a large box or an area of lesions comes; nor does its edge,
    for an area of exudates whose box spans the fovea with none of them there (IDRiD_14: the box
    0, its nearest exudate 0.24 DD; measured from the pixels told apart, 0.25)."""
    if lesion is not None and len(lesion):
        return float(np.hypot(lesion[:, 0] - point.x, lesion[:, 1] - point.y).min())
    x1, y1, x2, y2 = xyxy
    return math.hypot(max(x1 - point.x, 0, point.x - x2), max(y1 - point.y, 0, point.y - y2))


# A box is in a quadrant only this far inside it, from both lines through the fovea: a fovea
# placed a little off (the localiser's is within about 0.2 DD) must not change which one.
QUADRANT_MARGIN_DD = 0.25


def _clear_of_the_lines(xyxy: list[float], fovea: Point, dd: float) -> bool:
    x1, y1, x2, y2 = xyxy
    return min(max(x1 - fovea.x, fovea.x - x2), max(y1 - fovea.y, fovea.y - y2)) >= QUADRANT_MARGIN_DD * dd


def region_facts(xyxy: list[float], anat: Anatomy, lesion: np.ndarray | None = None) -> dict:
    """Size and position in disc diameters; None where the disc or fovea was not found. The
    quadrant only of a box well inside one (`QUADRANT_MARGIN_DD`); the reach distances from the
    fovea's centre and the disc's margin (a circle one disc diameter across) to the nearest of the
    `lesion`'s pixels, where given, else to the box's nearest point."""
    facts: dict = {"size_dd": None, "area_disc_areas": None, "fovea_distance_dd": None,
                   "disc_distance_dd": None, "fovea_reach_dd": None, "disc_reach_dd": None,
                   "clock_hour": None, "quadrant": None}
    w, h = xyxy[2] - xyxy[0], xyxy[3] - xyxy[1]
    c = centre(xyxy)
    dd = anat.disc_diameter_px
    if dd:
        facts["size_dd"] = round(max(w, h) / dd, 2)
        facts["area_disc_areas"] = round(w * h / dd ** 2, 3)  # ellipse in box / disc circle
        if anat.disc_centre:
            facts["disc_distance_dd"] = round(math.hypot(c.x - anat.disc_centre.x, c.y - anat.disc_centre.y) / dd, 2)
            facts["disc_reach_dd"] = round(max(_reach(anat.disc_centre, xyxy, lesion) / dd - 0.5, 0), 2)
    if anat.fovea_centre:
        dx, dy = c.x - anat.fovea_centre.x, c.y - anat.fovea_centre.y
        if dd:
            facts["fovea_distance_dd"] = round(math.hypot(dx, dy) / dd, 2)
            facts["fovea_reach_dd"] = round(_reach(anat.fovea_centre, xyxy, lesion) / dd, 2)
        if math.hypot(dx, dy) > 1:
            facts["clock_hour"] = clock_hour(dx, dy)
            if dd and _clear_of_the_lines(xyxy, anat.fovea_centre, dd):
                facts["quadrant"] = quadrant(dx, dy, _side_as_pictured(anat))
    return facts


def _side_as_pictured(anat: Anatomy) -> str:
    """The eye the photograph shows by the disc's side of the fovea, else its laterality: nasal is
    toward the disc, so on a mirrored photograph (EyePACS has some) or under a wrong label the
    disc, not the label, says which side of the picture is nasal."""
    disc, fovea = anat.disc_centre, anat.fovea_centre
    if disc and fovea and abs(disc.x - fovea.x) > 1:
        return "OD" if disc.x > fovea.x else "OS"
    return anat.laterality


def context_window(xyxy: list[float], width: int, height: int, config: CropConfig) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = xyxy
    w = max(x2 - x1, 1) * (1 + 2 * config.context)
    h = max(y2 - y1, 1) * (1 + 2 * config.context)
    w, h = max(w, config.min_crop_px), max(h, config.min_crop_px)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left = int(max(0, min(width - w, cx - w / 2)))
    top = int(max(0, min(height - h, cy - h / 2)))
    return left, top, int(min(width, left + w)), int(min(height, top + h))


def mean_colour(rgb: np.ndarray, xyxy: list[float]) -> list[int]:
    """Mean colour of the box's central half, where the lesion rather than background lies."""
    x1, y1, x2, y2 = xyxy
    qx, qy = (x2 - x1) / 4, (y2 - y1) / 4
    patch = rgb[int(y1 + qy):max(int(y1 + qy) + 1, int(y2 - qy)), int(x1 + qx):max(int(x1 + qx) + 1, int(x2 - qx))]
    return [int(v) for v in patch.reshape(-1, 3).mean(axis=0)] if patch.size else [0, 0, 0]


# Colour against the retina around a lesion, in OpenCV's 8-bit Lab (L 0-255, a and b offset by
# 128): a difference below these is not stated. A speck's own colour is mostly its background's
# (IDRiD's exudate pixels read "yellow-orange" or "dark red" by name on that orange fundus, while
# against the retina around them they are brighter and yellower); so lesions are described by
# how they differ from their surroundings, which is what a reader sees.
MIN_LIGHTNESS_STEP = 6.0
MIN_HUE_STEP = 3.0
STANDOUT_FRACTION = 0.25  # of a box's pixels, those most unlike the ring around it
OUTSIDE_FIELD_MAX = 20  # a pixel no channel of which reaches this is the black around the field of view


def contrast_words(delta: tuple[float, float, float]) -> str | None:
    """(dL, da, db) of a lesion against the retina around it, in words: "brighter and yellower",
    "darker and redder", "brighter and whiter"; None where it differs too little to say."""
    dl, da, db = delta
    light = "brighter" if dl >= MIN_LIGHTNESS_STEP else "darker" if dl <= -MIN_LIGHTNESS_STEP else None
    if db >= MIN_HUE_STEP and db > da:
        hue = "yellower"  # more yellow than red added
    elif da >= MIN_HUE_STEP:
        hue = "redder"
    elif da <= -MIN_HUE_STEP and db <= -MIN_HUE_STEP:
        hue = "whiter" if light == "brighter" else "greyer"  # less of both: less saturated
    elif db <= -MIN_HUE_STEP and light == "darker":
        hue = "redder"  # a dark lesion that lost its yellow: a deeper red than the orange around it
    else:
        hue = None
    words = [w for w in (light, hue) if w]
    return " and ".join(words) if words else None


class Contrast(NamedTuple):
    """How a lesion's box stands out from the retina around it."""

    rgb: list[int]  # mean colour of its standing-out pixels
    delta: tuple[float, float, float]  # their Lab difference from the ring's median (dL, da, db)
    points: np.ndarray  # (x, y) of its standing-out pixels on the side of its lightness: the lesion itself


def lesion_contrast(rgb: np.ndarray, xyxy: list[float], annotated: np.ndarray | None = None) -> Contrast:
    """The box's pixels that stand out most from the ring of retina around it (a quarter of them,
    by Lab distance from the ring's median): their mean colour, their difference from the ring,
    and where they are (those brighter than the ring for a brighter lesion, darker for a darker).
    With `annotated` (x, y of a mask's pixels in the box) only those are candidates: an area's box
    may be mostly retina, whose quarter most unlike the ring is vessels or the fovea."""
    height, width = rgb.shape[:2]
    x1, y1 = max(0, int(xyxy[0])), max(0, int(xyxy[1]))
    x2, y2 = min(width, max(int(math.ceil(xyxy[2])), x1 + 1)), min(height, max(int(math.ceil(xyxy[3])), y1 + 1))
    pad = max(x2 - x1, y2 - y1) // 2 + 2
    left, top, right, bottom = max(0, x1 - pad), max(0, y1 - pad), min(width, x2 + pad), min(height, y2 + pad)
    window = np.ascontiguousarray(rgb[top:bottom, left:right])
    lab = cv2.cvtColor(window, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
    inside = np.zeros((bottom - top, right - left), bool)
    inside[y1 - top:y2 - top, x1 - left:x2 - left] = True
    inside = inside.reshape(-1)
    # the black outside the field of view is neither retina nor lesion
    retina = window.reshape(-1, 3).max(axis=1) >= OUTSIDE_FIELD_MAX
    ring = lab[~inside & retina]
    if annotated is not None and len(annotated):
        lesion = np.zeros((bottom - top, right - left), bool)
        lesion[annotated[:, 1].astype(int) - top, annotated[:, 0].astype(int) - left] = True
        inside &= lesion.reshape(-1)
    inside &= retina
    box = lab[inside]
    if not len(ring) or not len(box):  # the box fills the photograph, or lies outside its field
        return Contrast([int(v) for v in window.reshape(-1, 3).mean(axis=0)], (0.0, 0.0, 0.0), np.empty((0, 2)))
    background = np.median(ring, axis=0)
    distance = np.linalg.norm(box - background, axis=1)
    keep = max(1, int(len(box) * STANDOUT_FRACTION))
    standout = np.argpartition(-distance, keep - 1)[:keep]
    colour = window.reshape(-1, 3)[inside][standout].mean(axis=0)
    dl, da, db = (box[standout].mean(axis=0) - background).tolist()
    side = standout[(box[standout, 0] - background[0]) * dl > 0] if abs(dl) >= MIN_LIGHTNESS_STEP else standout
    rows, cols = np.divmod(np.flatnonzero(inside)[side], right - left)
    return Contrast([int(v) for v in colour], (round(dl, 1), round(da, 1), round(db, 1)),
                    np.column_stack([cols + left, rows + top]).astype(np.float64))


def _write_jpeg(path: Path, bgr: np.ndarray, quality: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_QUALITY, quality]):
        raise OSError(f"{path}: could not write image")
    return str(path)


def _thickness(image: np.ndarray) -> int:
    return max(2, round(max(image.shape[:2]) / 300))


def _outline(image: np.ndarray, xyxy: list[float]) -> tuple[int, int, int, int, int]:
    """Where the box's line is drawn, and how thick: just outside the box, so that no pixel of
    what it marks is hidden (a 14-px line on a 4288-px photograph would cover a 26-px exudate)."""
    thickness = _thickness(image)
    out = thickness // 2 + 1  # cv2 centres a thick line on the given edge
    x1, y1, x2, y2 = (int(round(v)) for v in xyxy)
    # kept whole inside the picture: a box at its edge is drawn on its edge rather than off it
    height, width = image.shape[:2]
    low, high_x, high_y = thickness // 2, width - 1 - thickness // 2, height - 1 - thickness // 2
    return (max(min(x1, x2) - out, low), max(min(y1, y2) - out, low), min(max(x1, x2) + out, high_x),
            min(max(y1, y2) + out, high_y), thickness)


def _draw_box(image: np.ndarray, xyxy: list[float]) -> None:
    x1, y1, x2, y2, thickness = _outline(image, xyxy)
    cv2.rectangle(image, (x1, y1), (x2, y2), (0, 255, 0), thickness)  # green in RGB and BGR alike


def mark(rgb: np.ndarray, xyxy: list[float]) -> np.ndarray:
    marked = rgb.copy()
    _draw_box(marked, xyxy)
    return marked


def _write_marked(path: Path, bgr: np.ndarray, xyxy: list[float], quality: int) -> str:
    """The photograph with the box drawn, written: drawn on the photograph itself and undrawn after
    (what `mark` draws, without a copy of the whole photograph)."""
    height, width = bgr.shape[:2]
    x1, y1, x2, y2, thickness = _outline(bgr, xyxy)
    margin = thickness + 2  # a thick line reaches half its thickness past the outline
    left, top = max(0, x1 - margin), max(0, y1 - margin)
    right, bottom = min(width, x2 + margin + 1), min(height, y2 + margin + 1)
    under = bgr[top:bottom, left:right].copy()
    try:
        _draw_box(bgr, xyxy)
        return _write_jpeg(path, bgr, quality)
    finally:
        bgr[top:bottom, left:right] = under


def exif_rotated(path: Path) -> bool:
    """True when the file's pixels must be turned by its EXIF orientation to stand upright."""
    try:
        with Image.open(path) as im:
            return im.getexif().get(0x0112, 1) not in (0, 1)
    except OSError:
        return False


MIN_MARKED_FILL = 0.2  # a box made from a mask is marked for its class only if its lesion fills this much of it


def _mask_points(detections: list[Detection], width: int, height: int) -> dict[str, np.ndarray]:
    """region_id -> (x, y) of the mask pixels inside each box made from masks: the lesion as
    annotated, which distances are measured from. Each set of mask files is read once."""
    read: dict[tuple[str, ...], np.ndarray | None] = {}
    points = {}
    for d in detections:
        if not d.masks:
            continue
        key = tuple(d.masks)
        if key not in read:
            try:
                union = None
                for path in key:
                    mask = mask_foreground(Path(path))
                    union = mask if union is None else union | mask
                read[key] = union if union is not None and union.shape == (height, width) else None
            except (OSError, ValueError):  # moved or rewritten since the labels were read: the box stands
                read[key] = None
        if read[key] is None:
            continue
        x1, y1 = max(0, int(d.xyxy[0])), max(0, int(d.xyxy[1]))
        ys, xs = np.nonzero(read[key][y1:int(math.ceil(d.xyxy[3])) + 1, x1:int(math.ceil(d.xyxy[2])) + 1])
        if len(xs):
            points[d.region_id] = np.column_stack([xs + x1, ys + y1]).astype(np.float64)
    return points


def _fill(d: Detection, points: dict[str, np.ndarray]) -> float:
    """How much of a box its annotated lesion fills (1 where no mask says)."""
    if d.region_id not in points:
        return 1.0
    return len(points[d.region_id]) / max(1.0, (d.xyxy[2] - d.xyxy[0] + 1) * (d.xyxy[3] - d.xyxy[1] + 1))


def crop_image(record: ImageRecord, detections: list[Detection], out_dir: Path, config: CropConfig,
               trusted: Iterable[str] = ANATOMY, handoff: PixelHandoff | None = None) -> tuple[Anatomy, list[Region]]:
    bgr = handoff.take(record.path, record.sha256) if handoff is not None else None
    if bgr is None:
        bgr = decode_bgr(Path(record.path))
    rgb = bgr[..., ::-1]  # a view: the localiser and the colours read RGB
    anat, used = anatomy(record, detections, None, trusted)
    if config.localise == "always" or not settled_without_localiser(anat, used):
        anat, used = anatomy(record, detections, locate_landmarks(rgb), trusted)
    detections = used
    regions = []
    marked_labels = set()
    image_dir = Path(out_dir) / record.sha256[:16]
    if exif_rotated(Path(record.path)):
        anat.upright_path = _write_jpeg(image_dir / "upright.jpg", bgr, max(config.jpeg_quality, 95))
    annotated = _mask_points(detections, record.width, record.height)
    # the class's marked copy shows its most confident box (labels' are all 1.0), of those the
    # largest that its lesion fills well: not an area 3 DD wide, most of it retina or the fovea
    for d in sorted(detections, key=lambda d: (-d.confidence, _fill(d, annotated) < MIN_MARKED_FILL,
                                               -(d.xyxy[2] - d.xyxy[0]) * (d.xyxy[3] - d.xyxy[1]))):
        left, top, right, bottom = context_window(d.xyxy, record.width, record.height, config)
        crop_path = _write_jpeg(image_dir / f"{d.region_id}.crop.jpg", bgr[top:bottom, left:right], config.jpeg_quality)
        marked_path = None
        if d.label not in marked_labels:  # one marked copy per class bounds the disk cost
            marked_labels.add(d.label)
            marked_path = _write_marked(image_dir / f"{d.region_id}.marked.jpg", bgr, d.xyxy, config.jpeg_quality)
        lesion = None
        if d.label in LESIONS:  # how it stands out from the retina around it, and where it does
            contrast = lesion_contrast(rgb, d.xyxy, annotated.get(d.region_id))
            colour, named = contrast.rgb, contrast_words(contrast.delta)
            # where it lies: its mask's pixels, else those told apart (too faint: its box stands)
            lesion = annotated.get(d.region_id, contrast.points if named else None)
        else:
            colour = mean_colour(rgb, d.xyxy)
            named = colour_name(tuple(colour))
        regions.append(Region(
            sha256=record.sha256, region_id=d.region_id, label=d.label, display=BY_NAME[d.label].display,
            xyxy=d.xyxy, box_999=box_999(d.xyxy, record.width, record.height), confidence=d.confidence,
            source=d.source, crop_path=crop_path, marked_path=marked_path, mean_rgb=colour,
            colour=named, **region_facts(d.xyxy, anat, lesion)))
    regions.sort(key=lambda r: r.region_id)
    return anat, regions


def crop(records: list[ImageRecord], detections: list[Detection], out_dir: Path, config: CropConfig,
         evidence: DetectorEvidence | None = None, handoff: PixelHandoff | None = None
         ) -> tuple[list[Anatomy], list[Region], list[Reject]]:
    """`evidence`: which anatomy classes the detector may be trusted on for each kind of photograph
    (where it disagrees with the localiser); without it the detector is trusted. `handoff`: the
    photographs detect decoded, taken instead of decoded again."""
    by_image: dict[str, list[Detection]] = {}
    for d in detections:
        by_image.setdefault(d.sha256, []).append(d)

    def one(record: ImageRecord) -> tuple[Anatomy, list[Region]] | Reject:
        try:
            trusted = ANATOMY if evidence is None else evidence.trusted_for(record)
            return crop_image(record, by_image.get(record.sha256, []), out_dir, config, trusted, handoff)
        except (ValueError, OSError) as exc:
            return Reject(stage=STAGE, item=record.path, reason=str(exc))

    anatomies, regions, rejects = [], [], []
    with ThreadPoolExecutor(THREADS, thread_name_prefix="crop") as pool:
        for result in pool.map(one, records):  # in order: the same rows whatever the threads
            if isinstance(result, Reject):
                rejects.append(result)
                continue
            anatomies.append(result[0])
            regions.extend(result[1])
    return anatomies, regions, rejects
