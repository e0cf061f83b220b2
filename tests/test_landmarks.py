"""fundus_engine.landmarks on the 69 real photographs of ../shared/real_fundus (IDRiD disc masks,
DRIVE field-of-view masks) and on transformed copies: the frame it reports in, mirroring, and
None rather than a guess when there is no fundus."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_engine.landmarks import Landmarks, locate_landmarks

REAL = Path(__file__).parents[1].parent / "shared" / "real_fundus"
MACULA_CENTRED = ("IDRiD", "EyePACS", "DRIVE", "Messidor-2", "HRF")  # STARE mixes views: not scored
SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}


def load_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def mask(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 127


def distance_dd(lm: Landmarks) -> float | None:
    if lm.disc_centre is None or lm.fovea_centre is None:
        return None
    return math.dist(lm.disc_centre, lm.fovea_centre) / lm.disc_diameter_px


@pytest.fixture(scope="module")
def found() -> dict[tuple[str, str], Landmarks]:
    """(dataset, image stem) -> landmarks, for every real photograph, computed once."""
    assert (REAL / "images").is_dir(), f"real photographs missing: {REAL} (CI keeps them beside the repo)"
    return {(p.parent.name, p.stem): locate_landmarks(load_rgb(p))
            for p in sorted((REAL / "images").rglob("*")) if p.suffix.lower() in SUFFIXES}


def test_all_real_photographs_are_read(found):
    assert len(found) == 69
    assert {d for d, _ in found} == set(MACULA_CENTRED) | {"STARE"}


def test_idrid_disc_centre_lies_inside_the_ground_truth_disc(found):
    idrid = {name: lm for (dataset, name), lm in found.items() if dataset == "IDRiD"}
    assert len(idrid) == 20
    inside = []
    for name, lm in idrid.items():
        truth = mask(REAL / "masks" / "IDRiD" / f"{name}__optic_disc.png")
        inside.append(lm.disc_centre is not None and bool(truth[round(lm.disc_centre[1]), round(lm.disc_centre[0])]))
    assert sum(inside) >= 19, [name for name, ok in zip(idrid, inside) if not ok]


def test_idrid_disc_diameter_matches_the_masks_equivalent_diameter(found):
    errors = {}
    for (dataset, name), lm in found.items():
        if dataset == "IDRiD":
            truth = math.sqrt(4 * mask(REAL / "masks" / "IDRiD" / f"{name}__optic_disc.png").sum() / math.pi)
            errors[name] = abs(lm.disc_diameter_px - truth) / truth if lm.disc_diameter_px else 1.0
    assert float(np.median(list(errors.values()))) <= 0.20, errors
    assert max(errors.values()) <= 0.5, errors  # no wild one either


def test_disc_found_on_nearly_every_photograph_and_inside_drives_field(found):
    missing = [key for key, lm in found.items() if lm.disc_centre is None]
    assert len(missing) <= 0.05 * len(found), missing
    for (dataset, name), lm in found.items():
        if dataset == "DRIVE":
            field = mask(REAL / "masks" / "DRIVE" / f"{name}__field_of_view.png")
            assert field[round(lm.disc_centre[1]), round(lm.disc_centre[0])], name
        if lm.disc_centre is not None:
            assert 0 < lm.disc_score <= 1 and lm.disc_diameter_px > 0


def test_fovea_found_at_anatomical_distance_on_macula_centred_photographs(found):
    macula = {key: lm for key, lm in found.items() if key[0] in MACULA_CENTRED}
    assert len(macula) == 59
    good = [key for key, lm in macula.items() if (d := distance_dd(lm)) is not None and 2.0 <= d <= 3.2]
    assert len(good) >= 0.9 * len(macula), sorted(set(macula) - set(good))


def test_fovea_is_darker_than_its_surroundings(found):
    """Independent of the search's own geometry: the green channel at the fovea is darker than the
    ring 0.5-1 DD around it on most photographs where one is reported."""
    darker, total = 0, 0
    for (dataset, name), lm in found.items():
        if dataset not in ("DRIVE", "HRF") or lm.fovea_centre is None:
            continue
        green = load_rgb(next((REAL / "images" / dataset).glob(name + ".*")))[..., 1].astype(float)
        yy, xx = np.mgrid[: green.shape[0], : green.shape[1]]
        r = np.hypot(xx - lm.fovea_centre[0], yy - lm.fovea_centre[1]) / lm.disc_diameter_px
        darker += green[r < 0.15].mean() < green[(r > 0.5) & (r < 1.0)].mean()
        total += 1
    assert total >= 25 and darker >= 0.9 * total


def test_a_fovea_located_does_not_depend_on_which_jpeg_decoder_read_the_photograph(found):
    """libjpeg (through pylibjpeg, as for a DICOM photograph) and OpenCV round a JPEG's pixels a
    little differently. On the 20 IDRiD photographs a fovea sure enough for a record to state on
    the localiser's word is found from both decodes or from neither, at most 0.2 DD apart (measured: 0.13 DD on IDRiD_08, within the foveal pit,
    under 0.02 DD on the others). Before rival spots were weighed, IDRiD_06's fovea
    moved 0.44 DD between the two: two spots scoring 0.49 and 0.46, now stated nowhere."""
    from fundus_engine.crop import LOCALISER_ALONE_MIN_SCORE

    def stated(lm: Landmarks) -> bool:  # what a record may state on the localiser's word alone
        return lm.fovea_centre is not None and lm.fovea_score >= LOCALISER_ALONE_MIN_SCORE["fovea"]

    libjpeg = pytest.importorskip("libjpeg")
    for path in sorted((REAL / "images" / "IDRiD").glob("*.jpg")):
        other = locate_landmarks(libjpeg.decode(path.read_bytes(), 1))  # 1: YCbCr to RGB
        lm = found[("IDRiD", path.stem)]
        assert stated(lm) == stated(other), path.name
        if stated(lm):
            assert math.dist(lm.fovea_centre, other.fovea_centre) <= 0.2 * lm.disc_diameter_px, path.name
    assert found[("IDRiD", "IDRiD_06")].fovea_centre is None and found[("IDRiD", "IDRiD_06")].fovea_score > 0.4


@pytest.fixture(scope="module")
def drive():
    path = REAL / "images" / "DRIVE" / "21_training.tif"
    rgb = load_rgb(path)
    return rgb, locate_landmarks(rgb)


def test_coordinates_are_in_the_input_frame(drive):
    rgb, lm = drive
    big = locate_landmarks(cv2.resize(rgb, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR))
    assert lm.disc_centre and big.disc_centre and lm.fovea_centre and big.fovea_centre
    tolerance = 0.25 * big.disc_diameter_px
    assert math.dist(big.disc_centre, [2 * v for v in lm.disc_centre]) < tolerance
    assert math.dist(big.fovea_centre, [2 * v for v in lm.fovea_centre]) < tolerance
    assert big.disc_diameter_px == pytest.approx(2 * lm.disc_diameter_px, rel=0.1)
    assert big.fov_radius == pytest.approx(2 * lm.fov_radius, rel=0.03)
    json.dumps(dataclasses.asdict(lm))  # plain floats, ready for a manifest


def test_a_mirrored_photograph_mirrors_the_disc(drive):
    rgb, lm = drive
    flipped = locate_landmarks(np.ascontiguousarray(rgb[:, ::-1]))
    width = rgb.shape[1]
    assert flipped.disc_centre is not None
    assert flipped.disc_centre[0] == pytest.approx(width - 1 - lm.disc_centre[0], abs=0.15 * lm.disc_diameter_px)
    assert flipped.disc_centre[1] == pytest.approx(lm.disc_centre[1], abs=0.15 * lm.disc_diameter_px)
    assert (flipped.fovea_centre[0] < flipped.disc_centre[0]) != (lm.fovea_centre[0] < lm.disc_centre[0])


def test_a_crop_away_from_the_disc_moves_the_coordinates_with_it(drive):
    rgb, lm = drive
    padded = cv2.copyMakeBorder(rgb, 40, 0, 120, 0, cv2.BORDER_CONSTANT, value=0)
    shifted = locate_landmarks(padded)
    expected = (lm.disc_centre[0] + 120, lm.disc_centre[1] + 40)
    assert math.dist(shifted.disc_centre, expected) < 0.15 * lm.disc_diameter_px


def test_a_photograph_cropped_inside_its_field_keeps_its_disc():
    """No dark surround left (the field fills the frame): the disc is still found where it was."""
    rgb = load_rgb(REAL / "images" / "DRIVE" / "22_training.tif")
    whole = locate_landmarks(rgb)
    x0, y0 = 110, 150
    cropped = locate_landmarks(np.ascontiguousarray(rgb[y0:430, x0:510]))
    assert cropped.disc_centre is not None
    moved = (cropped.disc_centre[0] + x0, cropped.disc_centre[1] + y0)
    assert math.dist(moved, whole.disc_centre) < 0.5 * whole.disc_diameter_px


@pytest.mark.parametrize("value", [0, 128, 255])
def test_uniform_image_has_no_disc(value):
    lm = locate_landmarks(np.full((480, 640, 3), value, np.uint8))
    assert lm.disc_centre is None and lm.disc_diameter_px is None and lm.fovea_centre is None
    assert lm.disc_score == 0.0


def test_a_blank_field_of_view_has_no_disc():
    """A bright circle with nothing in it: a field, but no anatomy to find."""
    rgb = np.zeros((600, 600, 3), np.uint8)
    cv2.circle(rgb, (300, 300), 280, (200, 90, 40), -1)
    rgb = cv2.GaussianBlur(rgb, (0, 0), 3)
    lm = locate_landmarks(rgb)
    assert lm.disc_centre is None and lm.fovea_centre is None
    assert lm.fov_radius == pytest.approx(280, rel=0.03)
    assert math.dist(lm.fov_centre, (300, 300)) < 5


def test_a_channel_reversed_view_of_bgr_pixels_is_read_as_rgb():
    """crop hands the localiser `bgr[..., ::-1]` (no copy of the photograph): the same landmarks."""
    from fundus_engine.synth import render

    for rgb in (render(5, 0, 512)[0], load_rgb(REAL / "images" / "IDRiD" / "IDRiD_03.jpg")):
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        assert dataclasses.astuple(locate_landmarks(bgr[..., ::-1])) == dataclasses.astuple(locate_landmarks(rgb))
