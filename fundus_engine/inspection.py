"""Inspect a build: per-stage counts, sample rows, and overlay images of the boxes and landmarks."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pyarrow.dataset as ds

from fundus_engine.decoding import decode
from fundus_engine.vocabulary import BY_NAME

STAGE_DIRS = ("ingest", "detect", "crop", "expand", "chain")


def stage_counts(out: Path) -> dict[str, dict[str, int]]:
    """Rows per table of each stage, read from the shard files the last build kept."""
    counts: dict[str, dict[str, int]] = {}
    for stage in STAGE_DIRS:
        tables: dict[str, int] = defaultdict(int)
        for path in sorted((out / "stages" / stage).glob("*.parquet")):
            tables[path.name.split(".")[-2]] += ds.dataset(path).count_rows()
        counts[stage] = dict(tables)
    return counts


def sample_rows(out: Path, stage: str, n: int = 3, table: str = "*") -> list[dict]:
    """The first n rows of a stage's table, or of the dataset for stage 'dataset'."""
    folder = out / "dataset" if stage == "dataset" else out / "stages" / stage
    files = sorted(folder.glob(f"*.{table}.parquet" if stage != "dataset" else "*.parquet"))
    if not files:
        return []
    return ds.dataset(files).head(n).to_pylist()


# One colour per class (RGB), bright enough to stand out on a red-orange fundus.
PALETTE: dict[str, tuple[int, int, int]] = {
    "optic_disc": (0, 255, 255), "optic_cup": (90, 160, 255), "fovea": (255, 0, 255),
    "microaneurysm": (255, 255, 0), "haemorrhage": (0, 255, 0), "hard_exudate": (170, 110, 255),
    "soft_exudate": (255, 120, 200), "drusen": (0, 255, 160), "neovascularisation": (255, 255, 255)}
LANDMARK = (255, 255, 255)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _size(text: str, fs: float) -> tuple[int, int, int]:
    """Width and height of `text` on its filled background, and the padding inside it."""
    (w, h), base = cv2.getTextSize(text, FONT, fs, max(1, round(fs * 1.6)))
    pad = max(2, round(h * 0.3))
    return w + 2 * pad, h + base + 2 * pad, pad


def _text(img: np.ndarray, text: str, x: int, y: int, fs: float, bg=(0, 0, 0)) -> tuple[int, int, int, int]:
    """`text` with its top-left corner at (x, y), kept inside the image, on a filled box of colour bg."""
    w, h, pad = _size(text, fs)
    x, y = int(min(max(0, x), img.shape[1] - w)), int(min(max(0, y), img.shape[0] - h))
    cv2.rectangle(img, (x, y), (x + w, y + h), bg, -1)
    fg = (0, 0, 0) if sum(bg) > 380 else (255, 255, 255)
    cv2.putText(img, text, (x + pad, y + h - pad - round(h * 0.2)), FONT, fs, fg,
                max(1, round(fs * 1.6)), cv2.LINE_AA)
    return x, y, x + w, y + h


def _free(rect, taken) -> bool:
    return all(rect[2] <= t[0] or rect[0] >= t[2] or rect[3] <= t[1] or rect[1] >= t[3] for t in taken)


def _label(img, text, box, fs, colour, taken: list, centred: bool = False) -> None:
    """A label beside `box` (above, below, right, left: the first place no other label holds);
    centred: below, above, right, left of a mark, centred on it."""
    w, h, _ = _size(text, fs)
    x1, y1, x2, y2 = box
    H, W = img.shape[:2]
    cx, cy = (x1 + x2 - w) // 2, (y1 + y2 - h) // 2
    spots = ([(cx, y2 + 2), (cx, y1 - h - 2), (x2 + 2, cy), (x1 - w - 2, cy)] if centred else
             [(x1, y1 - h), (x1, y2), (x2 + 2, y1), (x1 - w - 2, y1)])
    spots = [(min(max(0, x), W - w), min(max(0, y), H - h)) for x, y in spots]
    x, y = next((s for s in spots if _free((*s, s[0] + w, s[1] + h), taken)), spots[0])
    taken.append(_text(img, text, x, y, fs, colour))


def draw_overlay(rgb: np.ndarray, regions: list[dict], anatomy: dict | None = None, title: str = "",
                 max_side: int = 1280) -> np.ndarray:
    """The photograph at viewing size (longest side <= max_side) with every region's box and label,
    the disc and fovea centres, a one-disc-diameter circle, a scale bar and a header."""
    scale = min(1.0, max_side / max(rgb.shape[:2]))
    img = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else rgb.copy()
    H, W = img.shape[:2]
    fs = max(0.4, 0.55 * max(H, W) / 1280)
    line = max(1, round(max(H, W) / 640))
    taken: list = []
    # Header: relpath, laterality, landmark disagreements, on a darkened band across the top.
    a = anatomy or {}
    lat = a.get("laterality") or "unknown"
    lat += {"inferred": " (inferred)", "conflict": " (label and picture disagree)"}.get(a.get("laterality_source"), "")
    lines = [f"{title}  |  laterality {lat}  |  {len(regions)} boxes" + ("" if a.get("disc_centre") else "  |  no disc found"),
             *(f"disagreement: {d}" for d in a.get("landmark_disagreement") or [])]
    band = (_size("Ag", fs)[1] + 2) * len(lines) + 4
    img[:band] = (img[:band] * 0.3).astype(np.uint8)
    for i, text in enumerate(lines):
        while len(text) > 8 and _size(text, fs)[0] > W:
            text = text[:-4] + "..."
        taken.append(_text(img, text, 0, 2 + i * (_size("Ag", fs)[1] + 2), fs))
    # Landmarks first, so the box labels are placed around theirs.
    dd = (a.get("disc_diameter_px") or 0) * scale
    for name, where, src in (("disc", a.get("disc_centre"), a.get("disc_source")),
                             ("fovea", a.get("fovea_centre"), a.get("fovea_source"))):
        if not where:
            continue
        c = (round(where["x"] * scale), round(where["y"] * scale))
        if name == "disc" and dd:
            cv2.circle(img, c, round(dd / 2), LANDMARK, line, cv2.LINE_AA)
        arm = max(8, round(max(H, W) / 60))
        for colour, t in (((0, 0, 0), line + 2), (LANDMARK, line)):
            cv2.drawMarker(img, c, colour, cv2.MARKER_CROSS, 2 * arm, t, cv2.LINE_AA)
        _label(img, f"{name}: {src}" if src else name, (c[0] - arm, c[1] - arm, c[0] + arm, c[1] + arm),
               fs, (0, 0, 0), taken, centred=True)
    for r in regions:
        x1, y1, x2, y2 = (round(v * scale) for v in r["xyxy"])
        colour = PALETTE.get(r["label"], (200, 200, 200))
        cv2.rectangle(img, (x1, y1), (x2, y2), colour, line)
        _label(img, box_caption(r), (x1, y1, x2, y2), fs, colour, taken)
    if dd:  # scale bar, bottom left
        h = _size("Ag", fs)[1]
        x, y = 6, H - 6 - h
        cv2.rectangle(img, (x - 3, y - 3 * line - 6), (x + round(dd) + 3, y), (0, 0, 0), -1)
        cv2.line(img, (x, y - 2 * line - 2), (x + round(dd), y - 2 * line - 2), LANDMARK, 2 * line)
        _text(img, f"1 DD = {a['disc_diameter_px']:.0f} px", x - 3, y, fs)
    return img


def box_caption(region: dict) -> str:
    """"Optic disc: localiser 0.81": the class, where the box came from, and how sure it was."""
    info = BY_NAME.get(region["label"])
    source = {"ground_truth": "label", "model": "detector", "localiser": "localiser"}[region["source"]]
    confidence = "" if region["source"] == "ground_truth" else f" {region['confidence']:.2f}"
    return f"{info.display if info else region['label']}: {source}{confidence}"


def write_overlays(out: Path, n: int = 4, max_side: int = 1280, fmt: str = "jpg", quality: int = 90) -> list[Path]:
    """Overlays of the first n images (by sha256) at viewing size, as JPEG (fmt "jpg") or PNG."""
    if fmt not in ("jpg", "png"):
        raise ValueError(f"overlay format {fmt!r}: jpg or png")
    images = {r["sha256"]: r for r in sample_rows(out, "ingest", 10_000)}
    anatomy = {r["sha256"]: r for r in sample_rows(out, "crop", 1_000_000, table="anatomy")}
    by_image: dict[str, list[dict]] = defaultdict(list)
    for r in sample_rows(out, "crop", 1_000_000, table="regions"):
        by_image[r["sha256"]].append(r)
    written = []
    target = out / "inspect"
    target.mkdir(exist_ok=True)
    for sha in sorted(images)[:n]:
        img = draw_overlay(decode(Path(images[sha]["path"])), by_image.get(sha, []), anatomy.get(sha),
                           images[sha]["relpath"], max_side)
        path = target / f"{sha[:16]}.overlay.{fmt}"
        params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 9]
        cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), params)
        written.append(path)
    return written


def manifest(out: Path) -> dict:
    path = out / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {out} the output folder of a build?")
    return json.loads(path.read_text())
