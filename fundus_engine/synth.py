"""Synthetic fundus photographs with exact ground truth.

They feed the demo, the tests and the shipped demo detector, so every image is reproducible
from (seed, index) alone and its labels are derived from the pixels actually drawn.
Geometry follows clinical convention: the fovea lies about 2.5 disc diameters temporal to the
disc and slightly below it; a right eye (OD) shows the disc to the right of the fovea, a left
eye (OS) is its mirror image.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from fundus_engine.vocabulary import AMD, CLASS_NAMES, DR, DR_GRADES, GLAUCOMA, NORMAL

# RGB colours of what is drawn; the detector learns these, so keep them stable.
_FUNDUS = np.array([196, 82, 40], np.float32)
_VESSEL = np.array([128, 22, 18], np.float32)
_DISC = np.array([244, 196, 130], np.float32)
_CUP = np.array([252, 236, 196], np.float32)
_BLOOD = np.array([96, 10, 8], np.float32)
_EXUDATE = np.array([240, 214, 92], np.float32)
_COTTON = np.array([238, 228, 208], np.float32)
_DRUSEN = np.array([226, 196, 104], np.float32)
_NEW_VESSEL = np.array([150, 16, 16], np.float32)


@dataclass
class Box:
    label: str
    xyxy: list[float]


@dataclass
class SyntheticImage:
    image: str  # path relative to the dataset root
    patient_id: str
    laterality: str  # "OD" (right eye) or "OS" (left eye)
    diagnosis: str
    dr_grade: int | None
    grade: str | None
    disc: list[float]
    fovea: list[float]
    disc_diameter: float
    cup_to_disc: float
    boxes: list[Box] = field(default_factory=list)


def _rng(seed: int, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _condition(rng: np.random.Generator) -> tuple[str, int | None]:
    roll = rng.random()
    if roll < 0.22:
        return NORMAL, 0
    if roll < 0.66:
        return DR, int(rng.integers(1, 5))
    if roll < 0.83:
        return AMD, None
    return GLAUCOMA, None


def _blend(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float = 1.0) -> None:
    a = (mask * alpha)[..., None]
    canvas *= 1.0 - a
    canvas += a * colour


def _mask_box(mask: np.ndarray, threshold: float = 0.35) -> list[float] | None:
    ys, xs = np.nonzero(mask > threshold)
    if len(xs) == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _curve(rng, start, heading, length, step, curvature, wobble):
    """A random-walk vessel path: mostly smooth, bending by `curvature` rad per step."""
    pts = [np.array(start, np.float32)]
    angle = heading
    for _ in range(int(length / step)):
        angle += curvature + rng.normal(0, wobble)
        pts.append(pts[-1] + step * np.array([np.cos(angle), np.sin(angle)], np.float32))
    return np.array(pts)


def _draw_vessels(canvas, rng, disc, fovea, dd, nasal):
    layer = np.zeros(canvas.shape[:2], np.float32)
    cx, cy = fovea[0] + nasal * 0.3 * dd, disc[1]
    a, b = 2.2 * dd, 2.0 * dd
    for sign in (-1, 1):  # superior (-1 in image y) and inferior arcade
        theta = np.linspace(0, np.deg2rad(rng.uniform(150, 175)), 40)
        xs = cx + nasal * a * np.cos(theta) * (1 + 0.25 * theta / np.pi)
        ys = cy + sign * b * np.sin(theta) * (1 + 0.15 * theta / np.pi)
        pts = np.stack([xs, ys], 1) + rng.normal(0, 0.6, (len(theta), 2))
        for i in range(len(pts) - 1):
            width = max(1, int(round(dd * 0.1 * (1 - i / len(pts) * 0.6))))
            cv2.line(layer, tuple(map(int, pts[i])), tuple(map(int, pts[i + 1])), 1.0, width, cv2.LINE_AA)
        for k in rng.choice(np.arange(6, len(pts) - 2), size=4, replace=False):
            outward = np.arctan2(pts[k][1] - cy, pts[k][0] - cx) + rng.normal(0, 0.3)
            branch = _curve(rng, pts[k], outward, dd * rng.uniform(1.0, 2.0), dd * 0.15, 0, 0.12)
            cv2.polylines(layer, [branch.astype(np.int32)], False, 1.0, max(1, int(dd * 0.05)), cv2.LINE_AA)
        nasal_heading = np.arctan2(sign * 1.0, nasal * 1.2) + rng.normal(0, 0.15)
        nasal_path = _curve(rng, disc, nasal_heading, dd * 3.5, dd * 0.15, 0, 0.08)
        cv2.polylines(layer, [nasal_path.astype(np.int32)], False, 1.0, max(1, int(dd * 0.07)), cv2.LINE_AA)
    _blend(canvas, np.clip(cv2.GaussianBlur(layer, (3, 3), 0), 0, 1), _VESSEL, 0.85)


def _spot(shape, centre, radius, blur, squash=1.0, angle=0.0):
    mask = np.zeros(shape, np.float32)
    axes = (max(1, int(round(radius))), max(1, int(round(radius * squash))))
    cv2.ellipse(mask, (int(round(centre[0])), int(round(centre[1]))), axes, angle, 0, 360, 1.0, -1, cv2.LINE_AA)
    if blur:
        k = int(blur) * 2 + 1
        mask = cv2.GaussianBlur(mask, (k, k), 0)
    return mask


def _random_site(rng, centre, radius, avoid, avoid_r, near=None, near_r=None):
    for _ in range(200):
        if near is not None:
            r, t = near_r * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
            p = np.array(near) + r * np.array([np.cos(t), np.sin(t)])
        else:
            r, t = radius * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
            p = np.array(centre) + r * np.array([np.cos(t), np.sin(t)])
        if np.hypot(*(p - centre)) < radius and np.hypot(*(p - np.array(avoid))) > avoid_r:
            return p
    return None


def _lesion_counts(diagnosis: str, dr_grade: int | None, rng) -> dict[str, int]:
    if diagnosis == DR:
        table = {
            1: {"microaneurysm": (2, 6)},
            2: {"microaneurysm": (3, 8), "haemorrhage": (1, 4), "hard_exudate": (1, 3)},
            3: {"microaneurysm": (4, 10), "haemorrhage": (5, 10), "hard_exudate": (1, 4),
                "soft_exudate": (1, 3)},
            4: {"microaneurysm": (3, 8), "haemorrhage": (3, 8), "hard_exudate": (1, 3),
                "soft_exudate": (1, 3), "neovascularisation": (1, 1)},
        }[dr_grade]
        return {k: int(rng.integers(lo, hi + 1)) for k, (lo, hi) in table.items()}
    if diagnosis == AMD:
        return {"drusen": int(rng.integers(4, 12))}
    return {}


def render(seed: int, index: int, size: int = 512) -> tuple[np.ndarray, SyntheticImage]:
    """Draw one fundus photograph (RGB uint8) and its ground truth."""
    rng = _rng(seed, index)
    patient = index // 2
    prng = _rng(seed, -1 - patient)  # both eyes of a patient share the condition
    diagnosis, dr_grade = _condition(prng)
    laterality = "OD" if index % 2 == 0 else "OS"
    nasal = 1 if laterality == "OD" else -1

    h = w = size
    centre = np.array([w / 2, h / 2])
    fov_r = 0.47 * size
    dd = rng.uniform(0.11, 0.13) * size
    fovea = centre + rng.normal(0, 0.02 * size, 2) - np.array([nasal * 0.6 * dd, 0])
    disc = fovea + np.array([nasal * rng.uniform(2.3, 2.7) * dd, -rng.uniform(0.15, 0.45) * dd])
    cdr = rng.uniform(0.7, 0.85) if diagnosis == GLAUCOMA else rng.uniform(0.25, 0.45)

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot(xx - centre[0], yy - centre[1]) / fov_r
    tone = _FUNDUS * rng.uniform(0.88, 1.08, 3).astype(np.float32)
    falloff = (1.0 - 0.45 * np.clip(r, 0, 1) ** 2.2)[..., None]
    texture = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 3)[..., None]
    canvas = tone * falloff * (1 + 0.05 * texture)

    macula = np.exp(-((xx - fovea[0]) ** 2 + (yy - fovea[1]) ** 2) / (2 * (0.9 * dd) ** 2))
    _blend(canvas, macula * 0.45, np.array([90, 30, 20], np.float32))
    _blend(canvas, _spot((h, w), fovea, 0.22 * dd, 3), np.array([70, 20, 14], np.float32), 0.7)
    _blend(canvas, _spot((h, w), fovea, 0.04 * dd + 1, 1), np.array([230, 170, 120], np.float32), 0.6)

    disc_mask = _spot((h, w), disc, dd / 2, 2, squash=rng.uniform(1.0, 1.08))
    _blend(canvas, disc_mask, _DISC * rng.uniform(0.92, 1.04))
    cup_mask = _spot((h, w), disc, cdr * dd / 2, 2)
    _blend(canvas, cup_mask, _CUP, 0.9)
    _draw_vessels(canvas, rng, disc, fovea, dd, nasal)

    boxes = [
        Box("optic_disc", _mask_box(disc_mask, 0.5)),
        Box("optic_cup", _mask_box(cup_mask, 0.5)),
        Box("fovea", [fovea[0] - dd / 2, fovea[1] - dd / 2, fovea[0] + dd / 2, fovea[1] + dd / 2]),
    ]
    unit = size / 512  # lesion sizes are tuned at 512 px and scale with the image
    for label, count in _lesion_counts(diagnosis, dr_grade, rng).items():
        for _ in range(count):
            if label == "drusen":
                site = _random_site(rng, centre, fov_r * 0.9, disc, dd, near=fovea, near_r=1.6 * dd)
            elif label == "neovascularisation":
                site = disc + rng.normal(0, 0.15 * dd, 2)
            else:
                site = _random_site(rng, centre, fov_r * 0.85, disc, dd * 0.9)
            if site is None:
                continue
            mask, colour, alpha = _lesion(label, rng, (h, w), site, unit, dd)
            box = _mask_box(mask)
            if box is None:
                continue
            _blend(canvas, mask, colour, alpha)
            boxes.append(Box(label, box))

    # Optical blur and the dark border outside the circular field of view.
    canvas = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(0.4, 0.9))
    fov = np.clip((1.0 - r) * fov_r / 2.0, 0, 1)[..., None]
    canvas = canvas * fov + 4.0 * (1 - fov)
    image = np.clip(canvas + rng.normal(0, 2.0, canvas.shape), 0, 255).astype(np.uint8)

    boxes = [Box(b.label, [round(float(np.clip(v, 0, size)), 1) for v in b.xyxy]) for b in boxes if b.xyxy]
    truth = SyntheticImage(
        image="", patient_id=f"S{seed}-P{patient:05d}", laterality=laterality, diagnosis=diagnosis,
        dr_grade=dr_grade, grade=DR_GRADES[dr_grade] if dr_grade is not None else None,
        disc=[round(float(v), 1) for v in disc], fovea=[round(float(v), 1) for v in fovea],
        disc_diameter=round(float(dd), 2), cup_to_disc=round(float(cdr), 3), boxes=boxes,
    )
    return image, truth


def _lesion(label, rng, shape, site, unit, dd):
    if label == "microaneurysm":
        return _spot(shape, site, rng.uniform(2.2, 3.2) * unit, 0), _BLOOD, 0.95
    if label == "haemorrhage":
        mask = np.zeros(shape, np.float32)
        for _ in range(int(rng.integers(1, 4))):
            offset = rng.normal(0, 2.5 * unit, 2)
            mask = np.maximum(mask, _spot(shape, site + offset, rng.uniform(5, 10) * unit, 1,
                                          squash=rng.uniform(0.6, 1.0), angle=rng.uniform(0, 180)))
        return mask, _BLOOD, 0.92
    if label == "hard_exudate":
        mask = np.zeros(shape, np.float32)
        for _ in range(int(rng.integers(3, 8))):
            mask = np.maximum(mask, _spot(shape, site + rng.normal(0, 5 * unit, 2), rng.uniform(1.8, 3.5) * unit, 0))
        return mask, _EXUDATE, 0.95
    if label == "soft_exudate":
        radius = rng.uniform(8, 13) * unit
        return _spot(shape, site, radius, 3, squash=rng.uniform(0.6, 0.9), angle=rng.uniform(0, 180)), _COTTON, 0.85
    if label == "drusen":
        return _spot(shape, site, rng.uniform(3, 6) * unit, 1), _DRUSEN, 0.9
    if label == "neovascularisation":
        mask = np.zeros(shape, np.float32)
        for _ in range(10):
            start = site + rng.normal(0, 0.25 * dd, 2)
            path = _curve(rng, start, rng.uniform(0, 2 * np.pi), 0.5 * dd, 2.0 * unit, 0.0, 0.7)
            cv2.polylines(mask, [path.astype(np.int32)], False, 1.0, 1, cv2.LINE_AA)
        return mask, _NEW_VESSEL, 0.9
    raise ValueError(f"no renderer for {label!r}")


SYNTHETIC_MARK = b"fundus-engine synthetic fundus photograph"


def write_marked_jpeg(path: Path, rgb: np.ndarray, quality: int = 92) -> None:
    """A JPEG carrying SYNTHETIC_MARK in a comment segment, so ingest can tell a generated eye
    from a real photograph: evidence validated on synthetic images may speak only for these."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError(f"{path}: could not encode image")
    data = buf.tobytes()
    comment = b"\xff\xfe" + (len(SYNTHETIC_MARK) + 2).to_bytes(2, "big") + SYNTHETIC_MARK
    Path(path).write_bytes(data[:2] + comment + data[2:])  # right after the SOI marker


def is_synthetic(path: Path) -> bool:
    """True for a photograph written by this generator (its JPEG comment says so)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.info.get("comment") == SYNTHETIC_MARK
    except OSError:
        return False


def generate(out: Path, n: int, seed: int = 0, size: int = 512, full_labels: bool = False) -> list[SyntheticImage]:
    """Write n images in YOLO layout (images/, labels/) plus `labels.json` and `dataset.yaml`.

    `labels.json` always carries image-level labels; with `full_labels` it also carries the
    disc and fovea points and every box, as a fully annotated source dataset would.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        image, truth = render(seed, i, size)
        name = f"synth_s{seed}_{i:05d}_{truth.laterality}.jpg"
        truth.image = f"images/{name}"
        write_marked_jpeg(out / truth.image, image)
        lines = []
        for b in truth.boxes:
            x1, y1, x2, y2 = b.xyxy
            lines.append(f"{CLASS_NAMES.index(b.label)} {(x1 + x2) / 2 / size:.6f} {(y1 + y2) / 2 / size:.6f} "
                         f"{(x2 - x1) / size:.6f} {(y2 - y1) / size:.6f}")
        (out / "labels" / name.replace(".jpg", ".txt")).write_text("\n".join(lines) + "\n")
        records.append(truth)
    entries = []
    for t in records:
        entry = asdict(t)
        if not full_labels:
            for key in ("disc", "fovea", "disc_diameter", "cup_to_disc", "boxes"):
                entry.pop(key)
        entries.append(entry)
    (out / "labels.json").write_text(json.dumps({"images": entries}, indent=1))
    (out / "dataset.yaml").write_text(
        f"path: {out.resolve()}\ntrain: images\nval: images\nnames:\n"
        + "".join(f"  {i}: {name}\n" for i, name in enumerate(CLASS_NAMES))
    )
    return records
