"""Optic disc and fovea localisation on the 69 real photographs of ../shared/real_fundus, against a
naive baseline (brightest and darkest smoothed spot) measured in the same run.

Run: `python bench/real_anatomy.py [--real ../shared/real_fundus] [--out bench/out]`.
Targets: disc centre inside the IDRiD disc mask on >= 19/20; median disc-diameter error <= 20%
against the mask's equivalent diameter; a disc found on >= 95% of all images; a fovea found
2.0-3.2 DD from the disc on >= 90% of the macula-centred images.

"Macula-centred" means the datasets whose acquisition protocol centres the posterior pole, so the
fovea is inside the field on every image: IDRiD, EyePACS, DRIVE, Messidor-2, HRF. STARE mixes
disc-centred, macula-centred and peripheral views, so it is reported on its own line, not scored.
There is no fovea ground truth here: the fovea check is anatomical plausibility, plus laterality
(the disc lies on the fovea's nasal side) on the EyePACS images, which carry OD/OS labels.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from fundus_engine.landmarks import Landmarks, field_of_view, locate_landmarks

DATASETS = ("IDRiD", "EyePACS", "DRIVE", "Messidor-2", "HRF", "STARE")
MACULA_CENTRED = ("IDRiD", "EyePACS", "DRIVE", "Messidor-2", "HRF")
SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}


def load_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def baseline(rgb: np.ndarray) -> Landmarks:
    """The naive localiser: disc at the brightest smoothed spot, fovea at the darkest smoothed spot
    of the central third of the field, disc diameter = field-of-view diameter / 7."""
    fov = field_of_view(rgb)
    h, w = rgb.shape[:2]
    (fcx, fcy), radius = (fov[0], fov[1]) if fov else (((w - 1) / 2, (h - 1) / 2), min(h, w) / 2)
    scale = 256 / max(h, w)
    grey = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), None, fx=scale, fy=scale,
                      interpolation=cv2.INTER_AREA).astype(np.float32)
    smooth = cv2.GaussianBlur(grey, (0, 0), 256 / 60)
    yy, xx = np.mgrid[: smooth.shape[0], : smooth.shape[1]]
    r = np.hypot(xx - fcx * scale, yy - fcy * scale)
    disc = np.unravel_index(np.argmax(np.where(r < 0.9 * radius * scale, smooth, -1)), smooth.shape)
    fovea = np.unravel_index(np.argmin(np.where(r < radius * scale / 3, smooth, 1e9)), smooth.shape)
    return Landmarks((disc[1] / scale, disc[0] / scale), 2 * radius / 7, 1.0,
                     (fovea[1] / scale, fovea[0] / scale), 1.0, (fcx, fcy), radius)


def mask_facts(path: Path) -> tuple[np.ndarray, float] | None:
    """A 0/255 mask and its equivalent diameter sqrt(4 area / pi)."""
    if not path.exists():
        return None
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 127
    return mask, math.sqrt(4 * mask.sum() / math.pi)


def inside(mask: np.ndarray, point) -> bool:
    if point is None:
        return False
    x, y = round(point[0]), round(point[1])
    return 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and bool(mask[y, x])


def fovea_distance_dd(lm: Landmarks) -> float | None:
    if lm.disc_centre is None or lm.fovea_centre is None or not lm.disc_diameter_px:
        return None
    return math.dist(lm.disc_centre, lm.fovea_centre) / lm.disc_diameter_px


def fovea_ok(lm: Landmarks) -> bool:
    d = fovea_distance_dd(lm)
    return d is not None and 2.0 <= d <= 3.2


def draw(rgb: np.ndarray, lm: Landmarks, title: str, truth: np.ndarray | None, size: int = 256) -> np.ndarray:
    scale = size / max(rgb.shape[:2])
    thumb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    tile = np.zeros((size + 30, size, 3), np.uint8)  # a strip below for the caption
    top, left = (size - thumb.shape[0]) // 2, (size - thumb.shape[1]) // 2
    tile[top: top + thumb.shape[0], left: left + thumb.shape[1]] = thumb
    view = tile[top: top + thumb.shape[0], left: left + thumb.shape[1]]

    def pt(p):
        return (round(p[0] * scale), round(p[1] * scale))

    if truth is not None:
        small = cv2.resize(truth.astype(np.uint8), (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(view, contours, -1, (0, 255, 0), 1)
    cv2.circle(view, pt(lm.fov_centre), round(lm.fov_radius * scale), (110, 110, 110), 1)
    if lm.disc_centre:
        cv2.circle(view, pt(lm.disc_centre), max(1, round(lm.disc_diameter_px * scale / 2)), (0, 255, 255), 1)
        cv2.drawMarker(view, pt(lm.disc_centre), (0, 255, 255), cv2.MARKER_CROSS, 6, 1)
    if lm.fovea_centre:
        cv2.drawMarker(view, pt(lm.fovea_centre), (255, 0, 255), cv2.MARKER_TILTED_CROSS, 8, 2)
    for i, text in enumerate(title.split("\n")):
        cv2.putText(tile, text, (3, size + 12 + 13 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
    return tile


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "real_fundus")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--columns", type=int, default=10)
    ap.add_argument("--tile", type=int, default=256, help="thumbnail size (px) on the contact sheet")
    args = ap.parse_args()
    laterality = {row["image"]: row["laterality"] for row in csv.DictReader((args.real / "images" / "labels.csv").open())}

    rows, tiles = [], []
    for dataset in DATASETS:
        for path in sorted(p for p in (args.real / "images" / dataset).iterdir() if p.suffix.lower() in SUFFIXES):
            rgb = load_rgb(path)
            times = {}
            for name, fn in (("ours", locate_landmarks), ("baseline", baseline)):
                started = time.perf_counter()
                times[name] = (fn(rgb), time.perf_counter() - started)
            disc_truth = mask_facts(args.real / "masks" / dataset / f"{path.stem}__optic_disc.png")
            fov_truth = mask_facts(args.real / "masks" / dataset / f"{path.stem}__field_of_view.png")
            row = dict(dataset=dataset, name=path.stem, side=laterality.get(f"{dataset}/{path.name}"))
            for name, (lm, seconds) in times.items():
                row[name] = dict(lm=lm, seconds=seconds, found=lm.disc_centre is not None, fovea_ok=fovea_ok(lm),
                                 in_mask=inside(disc_truth[0], lm.disc_centre) if disc_truth else None,
                                 in_fov=inside(fov_truth[0], lm.disc_centre) if fov_truth else None,
                                 diameter_error=(abs(lm.disc_diameter_px - disc_truth[1]) / disc_truth[1]
                                                 if disc_truth and lm.disc_diameter_px else None))
                if row["side"] and lm.disc_centre and lm.fovea_centre:  # OD: disc right of fovea
                    row[name]["side_ok"] = (lm.disc_centre[0] > lm.fovea_centre[0]) == (row["side"] == "OD")
            rows.append(row)
            lm = row["ours"]["lm"]
            dist = fovea_distance_dd(lm)
            title = f"{dataset} {path.stem[:18]}\ndisc {lm.disc_score:.2f} fovea " + (
                f"{lm.fovea_score:.2f} {dist:.1f}DD" if dist else "-")
            tiles.append(draw(rgb, lm, title, disc_truth[0] if disc_truth else None, args.tile))

    def figures(name: str) -> dict[str, tuple[float, str]]:
        """metric -> (value, printed form); higher is better except where noted."""
        def subset(ds):
            return [r[name] for r in rows if r["dataset"] in ds]
        idrid, drive, macula = subset(["IDRiD"]), subset(["DRIVE"]), subset(MACULA_CENTRED)
        stare, eyepacs = subset(["STARE"]), subset(["EyePACS"])
        errors = [r["diameter_error"] for r in idrid if r["diameter_error"] is not None]
        sides = [r["side_ok"] for r in eyepacs if "side_ok" in r]
        median_error = float(np.median(errors)) if errors else float("nan")
        return {
            "IDRiD disc centre inside mask": (sum(r["in_mask"] for r in idrid), f"{sum(r['in_mask'] for r in idrid)}/{len(idrid)}"),
            "IDRiD disc diameter median error": (median_error, f"{median_error:.1%}"),
            "disc found, all images": (np.mean([r["found"] for r in rows_of(name)]),
                                       f"{np.mean([r['found'] for r in rows_of(name)]):.1%}"),
            "DRIVE disc centre inside field": (sum(r["in_fov"] for r in drive), f"{sum(r['in_fov'] for r in drive)}/{len(drive)}"),
            "fovea at 2.0-3.2 DD, macula-centred": (np.mean([r["fovea_ok"] for r in macula]),
                                                    f"{np.mean([r['fovea_ok'] for r in macula]):.1%} of {len(macula)}"),
            "fovea at 2.0-3.2 DD, STARE (mixed)": (np.mean([r["fovea_ok"] for r in stare]),
                                                    f"{np.mean([r['fovea_ok'] for r in stare]):.1%} of {len(stare)}"),
            "EyePACS fovea on the labelled side": (sum(sides), f"{sum(sides)}/{len(eyepacs)}"),
            "seconds per image": (np.mean([r["seconds"] for r in rows_of(name)]),
                                  f"{np.mean([r['seconds'] for r in rows_of(name)]):.3f}"),
        }

    def rows_of(name):
        return [r[name] for r in rows]

    ours, base = figures("ours"), figures("baseline")
    print(f"{'IDRiD':<10}{'disc in mask':>14}{'diameter':>10}{'truth':>8}{'error':>8}   baseline in mask / error")
    for r in (r for r in rows if r["dataset"] == "IDRiD"):
        o, b = r["ours"], r["baseline"]
        truth = o["lm"].disc_diameter_px / (1 + o["diameter_error"]) if False else None
        print(f"{r['name']:<10}{str(o['in_mask']):>14}{o['lm'].disc_diameter_px or 0:>10.0f}"
              f"{(mask_facts(args.real / 'masks' / 'IDRiD' / (r['name'] + '__optic_disc.png'))[1]):>8.0f}"
              f"{(o['diameter_error'] or float('nan')):>8.1%}   {b['in_mask']} / {b['diameter_error']:.1%}")
    print()
    for r in rows:
        o = r["ours"]
        if not o["found"] or (r["dataset"] in MACULA_CENTRED and not o["fovea_ok"]) or o.get("side_ok") is False:
            dist = fovea_distance_dd(o["lm"])
            print(f"check: {r['dataset']}/{r['name']}: disc {'found' if o['found'] else 'NOT found'}, fovea "
                  + (f"at {dist:.2f} DD" if dist else "not found") + (", wrong side" if o.get("side_ok") is False else ""))
    print()
    print(f"{'metric':<40}{'ours':>14}{'baseline':>14}{'ratio':>8}")
    for metric, (value, text) in ours.items():
        b_value, b_text = base[metric]
        ratio = value / b_value if b_value else float("inf")
        print(f"{metric:<40}{text:>14}{b_text:>14}{ratio:>8.2f}")

    args.out.mkdir(parents=True, exist_ok=True)
    while len(tiles) % args.columns:
        tiles.append(np.zeros_like(tiles[0]))
    sheet = np.vstack([np.hstack(tiles[i: i + args.columns]) for i in range(0, len(tiles), args.columns)])
    sheet_path = args.out / "real_anatomy_contact_sheet.png"
    cv2.imwrite(str(sheet_path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    print(f"\ncontact sheet: {sheet_path}")

    ok = (ours["IDRiD disc centre inside mask"][0] >= 19 and ours["IDRiD disc diameter median error"][0] <= 0.20
          and ours["disc found, all images"][0] >= 0.95 and ours["fovea at 2.0-3.2 DD, macula-centred"][0] >= 0.90)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
