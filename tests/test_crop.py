"""fundus_engine.crop: positional geometry (clock hour, quadrant, disc diameters), the 0-999 box
convention, colour names, and the crop files written."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_engine.config import CropConfig, IngestConfig
from fundus_engine.landmarks import Landmarks
from fundus_engine.crop import (anatomy, centre, box_999, clock_hour, colour_name, context_window, contrast_words, crop,
                                crop_image, lesion_contrast, mark, mean_colour, quadrant, region_facts)
from fundus_engine.detect import from_labels
from fundus_engine.ingest import ingest
from fundus_engine.labels import load_labels
from fundus_engine.photo_files import scan
from fundus_engine.models import Anatomy, Detection, ImageRecord, Point, Quality, Reject
from fundus_engine.synth import generate, render
from fundus_engine.vocabulary import ANATOMY

QUALITY = Quality(sharpness=40.0, exposure=0.3, fov_coverage=0.69, grade="good")


def _record(**kw) -> ImageRecord:
    base = dict(sha256="ab" * 32, path="/nonexistent/x.jpg", relpath="x.jpg", width=400, height=400, quality=QUALITY)
    return ImageRecord(**{**base, **kw})


def _det(label: str, xyxy, conf=0.9, n=0) -> Detection:
    return Detection(sha256="ab" * 32, region_id=f"r-{n:03d}", label=label, xyxy=list(xyxy), confidence=conf,
                     source="model")


def _unit(degrees: float) -> tuple[float, float]:
    """Offset at a clock angle measured clockwise from 12 o'clock, in image coordinates (y down)."""
    a = math.radians(degrees)
    return math.sin(a), -math.cos(a)


# ------------------------------------------------------------------ clock hour and quadrant

@pytest.mark.parametrize("degrees,hour", [
    (0, 12), (30, 1), (60, 2), (90, 3), (120, 4), (150, 5), (180, 6), (210, 7), (240, 8), (270, 9), (300, 10),
    (330, 11), (10, 12), (350, 12), (100, 3), (80, 3), (200, 7),
])
def test_clock_hour_as_viewed(degrees, hour):
    dx, dy = _unit(degrees)
    assert clock_hour(dx, dy) == hour
    assert clock_hour(100 * dx, 100 * dy) == hour  # distance does not matter


def test_clock_hour_cardinal_points_in_image_coordinates():
    assert clock_hour(0, -5) == 12  # straight up (image y grows downward)
    assert clock_hour(5, 0) == 3  # viewer's right
    assert clock_hour(0, 5) == 6
    assert clock_hour(-5, 0) == 9


@pytest.mark.parametrize("dx,dy,od,os_", [
    (3, -2, "superonasal", "superotemporal"),  # up and to the viewer's right
    (-3, -2, "superotemporal", "superonasal"),
    (3, 2, "inferonasal", "inferotemporal"),
    (-3, 2, "inferotemporal", "inferonasal"),
])
def test_quadrant_mirrors_between_right_and_left_eyes(dx, dy, od, os_):
    # Nasal is toward the disc: the viewer's right in a right eye (OD), the left in a left eye (OS).
    assert quadrant(dx, dy, "OD") == od
    assert quadrant(dx, dy, "OS") == os_
    assert quadrant(-dx, dy, "OS") == od  # a mirrored point in the other eye has the same name
    assert quadrant(dx, dy, "unknown") is None


# ------------------------------------------------------------------ box_999

@pytest.mark.parametrize("xyxy,width,height,expected", [
    ([0, 0, 400, 200], 400, 200, [0, 0, 999, 999]),
    ([100, 50, 300, 150], 400, 200, [250, 250, 749, 749]),  # 249.75 -> 250, 749.25 -> 749
    ([40, 20, 120, 180], 400, 200, [100, 100, 300, 899]),  # 99.9, 99.9, 299.7, 899.1
    ([-12.5, -3, 410, 260], 400, 200, [0, 0, 999, 999]),  # clamped
    ([1, 1, 2, 2], 1000, 1000, [1, 1, 2, 2]),
    ([256, 0, 512, 256], 512, 256, [500, 0, 999, 999]),  # 499.5 rounds half to even
    ([2000, 1000, 2003, 1002], 4288, 2848, [466, 351, 467, 352]),  # a 3-px microaneurysm keeps one unit
    ([4287, 2847, 4288, 2848], 4288, 2848, [998, 998, 999, 999]),  # at the far edge too
])
def test_box_999_normalises_by_width_and_height(xyxy, width, height, expected):
    got = box_999(xyxy, width, height)
    assert got == expected
    assert all(type(v) is int and 0 <= v <= 999 for v in got)
    assert got[0] < got[2] and got[1] < got[3]


# ------------------------------------------------------------------ region facts

# A right eye, 400 px wide: disc of 100 px diameter at (350, 250), fovea 2.5 DD temporal at (100, 250).
OD_ANATOMY = Anatomy(sha256="x", laterality="OD", laterality_source="label", disc_centre=Point(x=350, y=250),
                     disc_diameter_px=100.0, fovea_centre=Point(x=100, y=250))
# Its mirror image about x = 200: a left eye.
OS_ANATOMY = Anatomy(sha256="x", laterality="OS", laterality_source="label", disc_centre=Point(x=50, y=250),
                     disc_diameter_px=100.0, fovea_centre=Point(x=300, y=250))


def test_region_facts_on_a_hand_made_right_eye():
    # A 20 x 20 px spot centred at (140, 180): 40 px right of and 70 px above the fovea.
    facts = region_facts([130, 170, 150, 190], OD_ANATOMY)
    assert facts == {
        "size_dd": 0.2,
        "area_disc_areas": 0.04,  # (20 * 20) / 100^2
        "fovea_distance_dd": 0.81,  # hypot(40, 70) = 80.6 px
        "disc_distance_dd": 2.21,  # hypot(210, 70) = 221.4 px
        "fovea_reach_dd": 0.67,  # to its nearest corner (130, 190): hypot(30, 60) = 67.1 px
        "disc_reach_dd": 1.59,  # (150, 190) from the disc's centre: hypot(200, 60) = 208.8 px, less its radius
        "clock_hour": 1,  # atan2(40, 70) = 29.7 degrees clockwise from 12
        "quadrant": "superonasal",  # above, and toward the disc
    }
    # A 60 x 40 px haemorrhage centred at (50, 280): left of and below the fovea.
    facts = region_facts([20, 260, 80, 300], OD_ANATOMY)
    # 10 px (0.1 DD) below the horizontal line through the fovea: too near it to be in a quadrant
    assert facts == {"size_dd": 0.6, "area_disc_areas": 0.24, "fovea_distance_dd": 0.58, "disc_distance_dd": 3.01,
                     "fovea_reach_dd": 0.22, "disc_reach_dd": 2.2, "clock_hour": 8, "quadrant": None}
    assert region_facts([20, 280, 70, 320], OD_ANATOMY)["quadrant"] == "inferotemporal"  # 30 px clear of both


def test_a_large_box_near_the_fovea_is_measured_from_its_nearest_point_and_placed_in_no_one_quadrant():
    """An area of exudates 1.6 DD wide whose centre is 0.9 DD above the fovea reaches 0.1 DD from
    it (IDRiD_10's records said 0.6 DD from centres while its exudates touched the fovea); a
    box across the vertical line through the fovea lies in two quadrants, so it is in none."""
    facts = region_facts([20, 100, 180, 240], OD_ANATOMY)
    assert (facts["fovea_distance_dd"], facts["fovea_reach_dd"]) == (0.8, 0.1)
    assert facts["clock_hour"] == 12 and facts["quadrant"] is None
    on_disc = region_facts([390, 240, 420, 260], OD_ANATOMY)  # 40 px right of the disc's centre: on its margin
    assert on_disc["disc_reach_dd"] == 0 and on_disc["disc_distance_dd"] == 0.55


def test_region_facts_mirror_for_the_left_eye():
    right = region_facts([130, 170, 150, 190], OD_ANATOMY)
    left = region_facts([250, 170, 270, 190], OS_ANATOMY)  # the same spot, mirrored about x = 200
    assert left == {**right, "clock_hour": 11}  # clock hours are as viewed, so 1 o'clock becomes 11
    assert left["quadrant"] == "superonasal"


def test_quadrants_follow_the_disc_on_a_mirrored_photograph():
    """EyePACS warns that some of its photographs are mirrored: labelled OD, the disc on the left.
    Nasal is toward the disc in the picture, whatever the label says."""
    mirrored = OS_ANATOMY.model_copy(update={"laterality": "OD"})
    assert region_facts([250, 170, 270, 190], mirrored)["quadrant"] == "superonasal"  # toward the disc
    assert region_facts([330, 170, 350, 190], mirrored)["quadrant"] == "superotemporal"
    no_disc = OD_ANATOMY.model_copy(update={"disc_centre": None})  # then the label is all there is
    assert region_facts([130, 170, 150, 190], no_disc)["quadrant"] == "superonasal"
    assert region_facts([130, 170, 150, 190], no_disc.model_copy(update={"laterality": "OS"}))["quadrant"] == \
        "superotemporal"


def test_disc_area_and_disc_diameter_units():
    # The disc's own box is one disc diameter across and one disc area.
    facts = region_facts([300, 200, 400, 300], OD_ANATOMY)
    assert (facts["size_dd"], facts["area_disc_areas"], facts["disc_distance_dd"]) == (1.0, 1.0, 0.0)
    assert facts["fovea_distance_dd"] == 2.5 and facts["clock_hour"] == 3
    assert region_facts([0, 0, 200, 100], OD_ANATOMY)["area_disc_areas"] == 2.0
    # At the fovea itself there is no direction to state.
    at_fovea = region_facts([90, 240, 110, 260], OD_ANATOMY)
    assert at_fovea["fovea_distance_dd"] == 0.0 and at_fovea["clock_hour"] is None and at_fovea["quadrant"] is None
    assert at_fovea["fovea_reach_dd"] == 0.0


def test_region_facts_are_unknown_without_disc_or_fovea():
    nothing = Anatomy(sha256="x", laterality="unknown", laterality_source="unknown")
    assert region_facts([130, 170, 150, 190], nothing) == dict.fromkeys(
        ("size_dd", "area_disc_areas", "fovea_distance_dd", "disc_distance_dd", "fovea_reach_dd", "disc_reach_dd",
         "clock_hour", "quadrant"))

    no_disc = OD_ANATOMY.model_copy(update={"disc_centre": None, "disc_diameter_px": None})
    facts = region_facts([130, 170, 150, 190], no_disc)
    assert facts["size_dd"] is None and facts["area_disc_areas"] is None and facts["disc_distance_dd"] is None
    assert facts["fovea_distance_dd"] is None  # no disc diameter to measure in
    # direction needs only the fovea; a quadrant, a box's clearance of the lines in disc diameters
    assert (facts["clock_hour"], facts["quadrant"]) == (1, None)

    no_fovea = OD_ANATOMY.model_copy(update={"fovea_centre": None})
    facts = region_facts([130, 170, 150, 190], no_fovea)
    assert (facts["size_dd"], facts["disc_distance_dd"]) == (0.2, 2.21)
    assert facts["fovea_distance_dd"] is None and facts["clock_hour"] is None and facts["quadrant"] is None

    unknown_eye = OD_ANATOMY.model_copy(update={"laterality": "unknown"})
    facts = region_facts([130, 170, 150, 190], unknown_eye)
    assert facts["clock_hour"] == 1 and facts["quadrant"] == "superonasal"  # the disc says which side is nasal
    facts = region_facts([130, 170, 150, 190], unknown_eye.model_copy(update={"disc_centre": None}))
    assert facts["clock_hour"] == 1 and facts["quadrant"] is None


# ------------------------------------------------------------------ anatomy

def test_anatomy_from_detections_infers_laterality_from_the_disc():
    dets = [_det("optic_disc", [0, 0, 10, 10], conf=0.3), _det("optic_disc", [300, 200, 400, 300], conf=0.9),
            _det("optic_cup", [330, 220, 370, 280]), _det("fovea", [75, 225, 125, 275])]
    anat, _ = anatomy(_record(), dets)
    assert anat.disc_centre == Point(x=350, y=250)  # the more confident disc
    assert anat.disc_diameter_px == 100.0
    assert anat.fovea_centre == Point(x=100, y=250)
    assert anat.cup_to_disc == 0.6  # vertical: 60 / 100
    assert (anat.laterality, anat.laterality_source) == ("OD", "inferred")

    mirrored = [_det(d.label, [400 - d.xyxy[2], d.xyxy[1], 400 - d.xyxy[0], d.xyxy[3]], d.confidence) for d in dets]
    mirrored_anat, _ = anatomy(_record(), mirrored)
    assert (mirrored_anat.laterality, mirrored_anat.laterality_source) == ("OS", "inferred")


def test_anatomy_prefers_labels_and_says_unknown_when_it_must():
    dets = [_det("optic_disc", [300, 200, 400, 300]), _det("fovea", [75, 225, 125, 275])]
    labelled = _record(laterality="OS", disc=Point(x=340, y=240), fovea=Point(x=90, y=260))
    anat, _ = anatomy(labelled, dets)
    # the disc is right of the fovea, which says OD: records state neither side, and the conflict is recorded
    assert (anat.laterality, anat.laterality_source) == ("unknown", "conflict")
    assert anat.landmark_disagreement == ["laterality: labelled OS, but the disc's side of the fovea says OD"]
    agreeing = _record(laterality="OD", disc=Point(x=340, y=240), fovea=Point(x=90, y=260))
    assert anatomy(agreeing, dets)[0].laterality_source == "label"
    assert anat.disc_centre == Point(x=340, y=240) and anat.fovea_centre == Point(x=90, y=260)
    assert anat.disc_diameter_px == 100.0 and anat.cup_to_disc is None  # no cup detected

    empty, _ = anatomy(_record(), [])
    assert (empty.laterality, empty.laterality_source) == ("unknown", "unknown")
    assert empty.disc_centre is None and empty.fovea_centre is None and empty.disc_diameter_px is None


# ------------------------------------------------------------------ detector + localiser

def _found(disc=(350, 250), dd=100.0, fovea=(100, 260)) -> Landmarks:
    return Landmarks(disc_centre=disc, disc_diameter_px=dd, disc_score=0.8, fovea_centre=fovea, fovea_score=0.6,
                     fov_centre=(200, 200), fov_radius=190)


def test_detector_box_is_used_where_the_localiser_agrees():
    dets = [_det("optic_disc", [300, 200, 400, 300], n=0), _det("fovea", [75, 225, 125, 275], n=1)]
    anat, used = anatomy(_record(), dets, _found(disc=(340, 245)), trusted=["optic_disc", "fovea"])
    assert (anat.disc_source, anat.fovea_source) == ("detector+localiser", "detector+localiser")
    assert anat.disc_centre == Point(x=350, y=250) and anat.landmark_disagreement == []
    assert [d.source for d in used] == ["model", "model"]
    # agreement with a detector not validated here: the localiser's measurements are used
    anat, used = anatomy(_record(), dets, _found(disc=(340, 245), dd=90.0), trusted=[])
    assert (anat.disc_source, anat.fovea_source) == ("detector+localiser", "detector+localiser")
    assert anat.disc_centre == Point(x=340, y=245) and anat.disc_diameter_px == 90.0
    assert [d.source for d in used] == ["localiser", "localiser"]


def test_an_unvalidated_detector_that_disagrees_gives_way_to_the_localiser():
    dets = [_det("optic_disc", [0, 0, 60, 60], n=0), _det("optic_cup", [10, 10, 40, 50], n=1),
            _det("fovea", [330, 300, 370, 340], n=2)]  # a disc in the corner, a fovea 2.9 DD away from it
    anat, used = anatomy(_record(), dets, _found(), trusted=[])
    assert anat.disc_source == "localiser" and anat.disc_centre == Point(x=350, y=250)
    assert anat.disc_diameter_px == 100.0 and anat.cup_to_disc is None  # no cup inside a disc that is not there
    assert anat.fovea_source == "localiser" and anat.fovea_centre == Point(x=100, y=260)
    assert anat.landmark_disagreement[0].startswith("optic disc: the detector's is 3.9 DD from the localiser's")
    assert {(d.label, d.source) for d in used} == {("optic_disc", "localiser"), ("fovea", "localiser")}
    disc = next(d for d in used if d.label == "optic_disc")
    assert disc.xyxy == [300.0, 200.0, 400.0, 300.0] and disc.confidence == 0.8
    assert (anat.laterality, anat.laterality_source) == ("OD", "inferred")


def test_a_validated_detector_keeps_its_disc_and_the_disagreement_is_recorded():
    dets = [_det("optic_disc", [0, 0, 60, 60], n=0)]
    anat, used = anatomy(_record(), dets, _found(), trusted=["optic_disc", "fovea"])
    assert anat.disc_source == "detector" and anat.disc_centre == Point(x=30, y=30)
    assert anat.landmark_disagreement[0].endswith("detector used (validated on this kind of photograph)")


def test_labelled_boxes_are_never_overridden_by_the_localiser():
    truth = _det("optic_disc", [0, 0, 60, 60]).model_copy(update={"source": "ground_truth"})
    anat, used = anatomy(_record(), [truth], _found(), trusted=[])
    assert anat.disc_source == "label" and anat.disc_centre == Point(x=30, y=30) and used == [truth]


def test_the_localiser_fills_in_where_the_detector_is_silent_and_says_less_when_unsure():
    anat, used = anatomy(_record(), [], _found(fovea=None), trusted=[])
    assert anat.disc_source == "localiser" and anat.fovea_centre is None and anat.fovea_source is None
    assert [d.label for d in used] == ["optic_disc"]
    # the disc is right of the field's centre: a right eye, recorded as inferred
    assert (anat.laterality, anat.laterality_source) == ("OD", "inferred")
    # a fovea 0.5 DD from the disc is not a fovea
    anat, _ = anatomy(_record(), [], _found(fovea=(330, 250)), trusted=[])
    assert anat.fovea_centre is None
    # an unvalidated detector alone is not believed
    anat, used = anatomy(_record(), [_det("optic_disc", [0, 0, 60, 60])], None, trusted=[])
    assert anat.disc_centre is None and used == []


# ------------------------------------------------------------------ colour

@pytest.mark.parametrize("rgb,name", [
    ((255, 255, 255), "white"),
    ((238, 228, 208), "white"),  # cotton-wool spot as synth draws it
    ((96, 10, 8), "dark red"),  # blood
    ((240, 214, 92), "yellow"),  # hard exudate
    ((226, 196, 104), "yellow"),  # drusen
    ((230, 140, 40), "yellow-orange"),
    ((244, 196, 130), "pale yellow"),  # optic disc
    ((220, 30, 30), "red"),
    ((230, 160, 160), "pink"),
])
def test_colour_name(rgb, name):
    assert colour_name(rgb) == name


def test_mean_colour_reads_the_central_half_of_the_box():
    rgb = np.zeros((100, 100, 3), np.uint8)
    rgb[30:70, 30:70] = (10, 10, 10)
    rgb[40:60, 40:60] = (200, 100, 50)
    assert mean_colour(rgb, [30, 30, 70, 70]) == [200, 100, 50]
    assert mean_colour(rgb, [0, 0, 100, 100]) == [int(v) for v in rgb[25:75, 25:75].reshape(-1, 3).mean(0)]


# ------------------------------------------------------------------ windows, marks and files

def test_context_window_pads_and_stays_inside_the_image():
    config = CropConfig()  # context 0.5, at least 64 px
    assert context_window([100, 100, 200, 150], 400, 400, config) == (50, 75, 250, 175)
    assert context_window([0, 0, 10, 10], 256, 256, config) == (0, 0, 64, 64)
    assert context_window([250, 250, 256, 256], 256, 256, config) == (192, 192, 256, 256)
    assert context_window([0, 0, 300, 300], 256, 256, config) == (0, 0, 256, 256)


def test_mark_draws_a_green_box_on_a_copy():
    rgb = np.full((300, 300, 3), 100, np.uint8)
    marked = mark(rgb, [50, 60, 150, 200])
    assert (rgb == 100).all()
    # the line runs just outside the box (57-59 and 201-203 down, 47-49 and 151-153 across), so no
    # pixel of what it marks is hidden, however small the box
    green = (marked == (0, 255, 0)).all(axis=2)
    ys, xs = np.nonzero(green)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (57, 203, 47, 153)
    assert green[58, 100] and green[130, 48] and green[202, 100] and green[130, 152]
    assert (marked[60:201, 50:151] == 100).all()  # the box's every pixel, edges included, untouched
    corner = (mark(rgb, [0, 0, 50, 50]) == (0, 255, 0)).all(axis=2)  # at the picture's edge: drawn on it
    assert corner[1:53, 0].all() and corner[0, 1:53].all() and corner[52, 10] and corner[10, 52]
    tiny = mark(rgb, [140, 140, 143, 142])  # a 3 x 2 px speck stays visible inside its line
    assert (tiny[140:143, 140:144] == 100).all() and (tiny[141, 138] == (0, 255, 0)).all()


@pytest.mark.parametrize("side", [256, 1500])  # thickness 2 and 5
@pytest.mark.parametrize("xyxy", [[50.4, 60.6, 150.5, 200.2], [0.0, 0.0, 12.0, 9.0], [3.0, 7.0, 255.9, 256.0]])
def test_a_marked_copy_written_in_place_has_the_bytes_of_a_marked_copy_and_leaves_the_photograph(tmp_path, side,
                                                                                                 xyxy):
    """crop draws the box on the photograph itself, writes it, and undraws it: no copy of a
    4000-px photograph per marked class, and the very JPEG `mark` gives."""
    from fundus_engine.crop import _write_jpeg, _write_marked

    rgb = render(3, 0, side)[0]
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    before = bgr.copy()
    box = [v * side / 256 for v in xyxy]
    _write_marked(tmp_path / "in_place.jpg", bgr, box, 92)
    _write_jpeg(tmp_path / "copy.jpg", np.ascontiguousarray(mark(rgb, box)[..., ::-1]), 92)
    assert np.array_equal(bgr, before)
    assert (tmp_path / "in_place.jpg").read_bytes() == (tmp_path / "copy.jpg").read_bytes()


def test_crop_gives_the_same_rows_and_files_on_one_thread_as_on_several(synthetic, tmp_path, monkeypatch):
    import fundus_engine.crop as crop_module

    detections = [d for r in synthetic for d in from_labels(r)]
    many = crop(synthetic, detections, tmp_path / "many", CropConfig())
    monkeypatch.setattr(crop_module, "THREADS", 1)
    one = crop(synthetic, detections, tmp_path / "one", CropConfig())

    def plain(result, folder):
        anatomies, regions, rejects = result
        files = sorted(p.relative_to(folder) for p in folder.rglob("*.jpg"))
        return ([a.model_dump() for a in anatomies], [r.model_dump(exclude={"crop_path", "marked_path"}) for r in regions],
                rejects, files, [(folder / f).read_bytes() for f in files])

    assert plain(many, tmp_path / "many") == plain(one, tmp_path / "one")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("crop-src")
    generate(root, 2, seed=0, size=256, full_labels=True)  # one patient with mild DR: microaneurysms
    config = IngestConfig()
    labels, _ = load_labels(root, config)
    sources, _ = scan(root)
    records, rejects = ingest(root, sources, labels, config)
    assert rejects == [] and len(records) == 2
    return records


def test_crop_image_writes_crops_and_one_marked_copy_per_class(synthetic, tmp_path):
    record = synthetic[0]
    detections = from_labels(record)
    config = CropConfig()
    anat, regions = crop_image(record, detections, tmp_path, config)

    assert anat.laterality == "OD" and anat.laterality_source == "label"
    assert anat.disc_centre == record.disc and anat.fovea_centre == record.fovea
    assert 28 < anat.disc_diameter_px < 36 and 0.25 < anat.cup_to_disc < 0.5
    assert [r.region_id for r in regions] == sorted(d.region_id for d in detections)
    labels = [r.label for r in regions]
    assert labels[:3] == ["optic_disc", "optic_cup", "fovea"] and set(labels[3:]) == {"microaneurysm"}

    image_dir = tmp_path / record.sha256[:16]
    assert sorted(p.name for p in image_dir.glob("*.crop.jpg")) == sorted(f"{r.region_id}.crop.jpg" for r in regions)
    assert len(list(image_dir.glob("*.marked.jpg"))) == len(set(labels))
    marked_labels = [r.label for r in regions if r.marked_path]
    assert sorted(marked_labels) == sorted(set(labels))

    by_id = {d.region_id: d for d in detections}
    for r in regions:
        d = by_id[r.region_id]
        assert r.xyxy == d.xyxy and r.source == "ground_truth" and r.confidence == 1.0
        assert r.box_999 == box_999(d.xyxy, 256, 256)
        boxed = region_facts(d.xyxy, anat)  # a lesion's reach is from its pixels told apart: no nearer than its box
        assert {k: getattr(r, k) for k in ("size_dd", "area_disc_areas", "fovea_distance_dd", "disc_distance_dd",
                                          "clock_hour", "quadrant")} == {k: v for k, v in boxed.items() if "reach" not in k}
        if r.label in ANATOMY:
            assert (r.fovea_reach_dd, r.disc_reach_dd) == (boxed["fovea_reach_dd"], boxed["disc_reach_dd"])
        else:
            assert r.fovea_reach_dd >= boxed["fovea_reach_dd"] and r.disc_reach_dd >= boxed["disc_reach_dd"]
        left, top, right, bottom = context_window(d.xyxy, 256, 256, config)
        crop_pixels = cv2.imread(r.crop_path)
        assert crop_pixels.shape == (bottom - top, right - left, 3)
        assert r.display == {"optic_disc": "Optic disc", "optic_cup": "Optic cup", "fovea": "Fovea",
                             "microaneurysm": "Microaneurysm"}[r.label]
        if r.marked_path:
            marked = cv2.cvtColor(cv2.imread(r.marked_path), cv2.COLOR_BGR2RGB)
            x1, y1 = int(round(d.xyxy[0])) - 2, int(round(d.xyxy[1])) - 2  # the line's 2 px outside the box
            edge = marked[y1, x1:x1 + 2].astype(int)
            assert (edge[:, 1] > 180).all() and (edge[:, 0] < 90).all(), r.label  # green (after JPEG)
    microaneurysms = [r for r in regions if r.label == "microaneurysm"]
    # measured against the retina around them: the synthetic microaneurysms are dark red dots
    assert microaneurysms and all(r.colour in ("darker", "darker and redder") for r in microaneurysms)
    # Every lesion of a right eye to the left of the fovea is temporal.
    for r in microaneurysms:
        cx = (r.xyxy[0] + r.xyxy[2]) / 2
        assert r.quadrant.endswith("temporal" if cx < record.fovea.x else "nasal")
    disc = regions[0]
    assert disc.mean_rgb[0] > disc.mean_rgb[1] > disc.mean_rgb[2] and disc.colour != "red"


def test_the_localiser_runs_only_where_its_answer_can_change_the_anatomy(synthetic, tmp_path, monkeypatch):
    """Where labels or a trusted detector give both the disc and the fovea, the localiser's
    cross-check could change nothing but the provenance: `localise: when_needed` skips it and every
    measurement and region is the one `always` gives. Where a landmark is missing or the detector
    is not trusted on the photograph, it runs."""
    import fundus_engine.crop as crop_module

    calls = []
    real = crop_module.locate_landmarks
    monkeypatch.setattr(crop_module, "locate_landmarks", lambda rgb: calls.append(rgb.shape) or real(rgb))
    provenance = {"disc_source", "fovea_source", "landmark_disagreement"}

    def rows(result):
        anatomies, regions, rejects = result
        assert rejects == []
        return ([a.model_dump(exclude=provenance) for a in anatomies],
                [r.model_dump(exclude={"crop_path", "marked_path"}) for r in regions])

    labelled = [d for r in synthetic for d in from_labels(r)]
    predicted = [d.model_copy(update={"source": "model", "confidence": 0.8}) for d in labelled]
    unlabelled = [r.model_copy(update={"disc": None, "fovea": None}) for r in synthetic]  # the detector's alone
    for records, detections in ((synthetic, labelled), (unlabelled, predicted)):
        lazy = crop(records, detections, tmp_path / "lazy", CropConfig())
        assert calls == []
        full = crop(records, detections, tmp_path / "full", CropConfig(localise="always"))
        assert len(calls) == 2
        calls.clear()
        assert rows(lazy) == rows(full)
    assert {(a.disc_source, a.fovea_source) for a in lazy[0]} == {("detector", "detector")}
    assert {a.disc_source for a in full[0]} <= {"detector", "detector+localiser"}

    record = unlabelled[0]
    no_fovea = [d for d in predicted if d.sha256 == record.sha256 and d.label != "fovea"]
    crop_image(record, no_fovea, tmp_path / "no-fovea", CropConfig())
    assert len(calls) == 1
    untrusted = [d for d in predicted if d.sha256 == record.sha256]
    anat, _ = crop_image(record, untrusted, tmp_path / "untrusted", CropConfig(), trusted=())
    assert len(calls) == 2 and anat.disc_source in ("localiser", "detector+localiser")


def test_crop_rejects_an_unreadable_image_and_goes_on(synthetic, tmp_path):
    good = synthetic[1]
    missing = good.model_copy(update={"sha256": "cd" * 32, "path": str(tmp_path / "gone.jpg")})
    detections = from_labels(good)
    anatomies, regions, rejects = crop([missing, good], detections, tmp_path / "crops", CropConfig())
    assert [a.sha256 for a in anatomies] == [good.sha256]
    assert len(regions) == len(detections) and {r.sha256 for r in regions} == {good.sha256}
    assert len(rejects) == 1 and rejects[0].stage == "crop" and rejects[0].item == str(tmp_path / "gone.jpg")
    assert isinstance(rejects[0], Reject)
    # An image with no detections still gets its disc and fovea from the labels, the disc's size
    # (and its box, around the labelled centre) from the localiser.
    anatomies, regions, rejects = crop([good], [], tmp_path / "crops2", CropConfig())
    assert rejects == [] and anatomies[0].fovea_centre == good.fovea and anatomies[0].fovea_source == "label"
    assert anatomies[0].disc_centre == good.disc and anatomies[0].disc_source == "label"
    assert anatomies[0].disc_diameter_px > 0
    disc, fovea = sorted(regions, key=lambda r: r.label != "optic_disc")
    assert [(r.label, r.source) for r in (disc, fovea)] == [("optic_disc", "localiser"), ("fovea", "localiser")]
    for box, point in ((disc, good.disc), (fovea, good.fovea)):
        assert centre(box.xyxy).x == pytest.approx(point.x, abs=0.1) and centre(box.xyxy).y == pytest.approx(point.y, abs=0.1)


def test_an_exif_rotated_photograph_gets_an_upright_copy_that_trainers_read_in_the_box_frame(tmp_path):
    """PIL (InternVL, LLaVA, LLaMA-Factory) ignores EXIF orientation; cv2 and ultralytics apply it.
    The records must point at pixels in the frame their boxes were measured in."""
    from PIL import Image

    from fundus_engine.ingest import ingest_image
    from fundus_engine.photo_files import SourceFile, sha256_file

    stored = np.zeros((300, 500, 3), np.uint8)  # a fundus photograph on the right of a wide frame
    stored[:, 200:] = render(0, 0, 300)[0]
    stored[100:140, 380:440] = (250, 240, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    Image.fromarray(stored).save(tmp_path / "plain.jpg", quality=95)
    config = IngestConfig(min_side=64, min_fov_coverage=0)
    records = [ingest_image(tmp_path, SourceFile(name, sha256_file(tmp_path / name)), None, config)
               for name in ("rotated.jpg", "plain.jpg")]
    rotated, plain = records
    assert (rotated.width, rotated.height) == (300, 500)  # the upright frame
    # In the upright frame the yellow patch sits near the bottom right: find it and box it.
    upright_rgb = cv2.cvtColor(cv2.imread(rotated.path), cv2.COLOR_BGR2RGB)
    ys, xs = np.nonzero((upright_rgb[..., 1] > 200) & (upright_rgb[..., 2] < 80))
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    detection = Detection(sha256=rotated.sha256, region_id="r-000", label="hard_exudate", xyxy=box,
                          confidence=0.9, source="model")
    anat, _ = crop_image(rotated, [detection], tmp_path / "crops", CropConfig())
    assert anat.upright_path and Path(anat.upright_path).is_file()
    with Image.open(anat.upright_path) as im:  # as a trainer opens it: no EXIF handling
        assert im.size == (rotated.width, rotated.height)
        x1, y1, x2, y2 = (int(v) for v in box)
        patch = np.asarray(im.convert("RGB"))[y1:y2, x1:x2]
        assert patch[..., 1].mean() > 200  # the box holds the yellow patch in the copy's pixels
    plain_anat, _ = crop_image(plain, [], tmp_path / "crops", CropConfig())
    assert plain_anat.upright_path is None  # no copy where the file is upright already


def test_a_lesion_is_described_by_how_it_differs_from_the_retina_around_it():
    """A small exudate on an orange fundus is mostly its background by mean colour (IDRiD's were
    named "dark red"); against the ring around it, it is brighter and yellower."""
    fundus = np.full((200, 200, 3), (170, 80, 30), np.uint8)  # RGB, orange-red retina
    fundus[94:100, 94:100] = (230, 200, 90)  # a 6-px yellow exudate in a 12-px box: a quarter of its pixels
    box = [91.0, 91.0, 103.0, 103.0]
    exudate = lesion_contrast(fundus, box)
    assert exudate.rgb == [230, 200, 90] and contrast_words(exudate.delta) == "brighter and yellower"
    # where it is: its 36 pixels, not the box's 144, so a distance is measured from the exudate itself
    assert len(exudate.points) == 36 and exudate.points.min(axis=0).tolist() == [94, 94]
    assert exudate.points.max(axis=0).tolist() == [99, 99]
    fundus[40:46, 40:46] = (90, 15, 10)  # a haemorrhage: dark red
    assert contrast_words(lesion_contrast(fundus, [38.0, 38.0, 48.0, 48.0]).delta) == "darker and redder"
    fundus[150:155, 150:155] = (245, 240, 235)  # a cotton-wool spot: white
    assert contrast_words(lesion_contrast(fundus, [148.0, 148.0, 157.0, 157.0]).delta) == "brighter and whiter"
    assert lesion_contrast(fundus, [120.0, 20.0, 130.0, 30.0]).delta == (0, 0, 0)  # nothing there
    assert contrast_words((2.0, -1.0, 1.0)) is None  # too little to state


def test_a_box_made_from_a_mask_is_measured_from_the_masks_pixels(tmp_path):
    """An area box spanning the fovea whose exudates lie only in its far corner (IDRiD_14: box 0,
    exudates 0.24 DD): how near it comes is the mask's, and the marked copy goes to a box the
    exudate fills rather than to the larger one that is mostly retina."""
    photo = tmp_path / "eye.png"
    pixels = np.full((400, 400, 3), (30, 80, 170), np.uint8)  # BGR, orange retina
    pixels[60:70, 180:190] = (90, 200, 230)  # the exudates: far corner of the big box
    pixels[300:310, 300:310] = (90, 200, 230)  # and a small box they fill
    cv2.imwrite(str(photo), pixels)
    mask = np.zeros((400, 400), np.uint8)
    mask[60:70, 180:190] = mask[300:310, 300:310] = 255
    cv2.imwrite(str(tmp_path / "eye__hard_exudate.png"), mask)
    masks = [str(tmp_path / "eye__hard_exudate.png")]
    record = _record(path=str(photo), laterality="OD", disc=Point(x=350, y=150), fovea=Point(x=100, y=150))
    big = Detection(sha256=record.sha256, region_id="r-001", label="hard_exudate", xyxy=[60.0, 60.0, 190.0, 200.0],
                    confidence=1.0, source="ground_truth", masks=masks)
    small = big.model_copy(update={"region_id": "r-002", "xyxy": [300.0, 300.0, 309.0, 309.0]})
    disc = Detection(sha256=record.sha256, region_id="r-000", label="optic_disc", xyxy=[300.0, 100.0, 400.0, 200.0],
                     confidence=1.0, source="ground_truth")
    anat, regions = crop_image(record, [disc, big, small], tmp_path / "out", CropConfig())
    by_id = {r.region_id: r for r in regions}
    assert anat.fovea_centre == Point(x=100, y=150) and anat.disc_diameter_px == 100
    assert region_facts(big.xyxy, anat)["fovea_reach_dd"] == 0  # its box covers the fovea
    assert by_id["r-001"].fovea_reach_dd == 1.14  # the mask's nearest pixel (180, 69): hypot(80, 81) = 113.8 px
    assert by_id["r-002"].marked_path and not by_id["r-001"].marked_path  # 100% filled against 0.6%
    # its colour from the mask's pixels: the box's most distinct quarter would be plain retina
    assert by_id["r-001"].colour == "brighter and yellower" and by_id["r-001"].mean_rgb == [230, 200, 90]


def test_distances_are_stated_to_the_tenth_rounding_half_up():
    from fundus_engine.prompts import dd_from

    assert dd_from(0.25, "the fovea") == "0.3 disc diameters from the fovea"  # '%.1f' said 0.2
    assert dd_from(0.05, "the fovea") == "0.1 disc diameters from the fovea"
    assert dd_from(0.049, "the disc margin") == "within 0.1 disc diameters of the disc margin"
