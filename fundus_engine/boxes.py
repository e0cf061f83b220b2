"""Boxes and points in an image's pixel frame: clipped to it when they overshoot it a little,
refused when they lie outside it or have no area in it."""
from __future__ import annotations

import math

# Label boxes and points may overshoot the frame by this fraction of its side (rounding, padded
# exports) and are clipped; further out, they belong to another image or another frame.
TOLERANCE = 0.02


def _coords(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def clipped(values, side: int, tolerance: float | None) -> list[float] | None:
    """values clipped to [0, side]; None when one is not finite or overshoots by more than
    tolerance * side (None: any overshoot is clipped)."""
    slack = math.inf if tolerance is None else tolerance * side
    if not all(math.isfinite(v) and -slack <= v <= side + slack for v in values):
        return None
    return [min(max(float(v), 0.0), float(side)) for v in values]


def outside(values, width: int, height: int) -> ValueError:
    """The error for coordinates that do not fit a width x height image."""
    finite = all(math.isfinite(v) for v in values)
    return ValueError(f"{_coords(values)} " + (f"lies outside the {width}x{height} image" if finite else "is not finite"))


def fit_box(xyxy: list[float], width: int, height: int, tolerance: float | None = TOLERANCE) -> list[float]:
    """The box clipped to the image, or ValueError when it is not finite, overshoots the image by
    more than `tolerance` of its side, or has no area inside it. Every box an image's facts are
    measured from (labels and detector alike) passes here."""
    xs, ys = clipped(xyxy[0::2], width, tolerance), clipped(xyxy[1::2], height, tolerance)
    if xs is None or ys is None:
        raise outside(xyxy, width, height)
    if xs[1] <= xs[0] or ys[1] <= ys[0]:
        raise ValueError(f"{_coords(xyxy)} has no area inside the {width}x{height} image")
    return [xs[0], ys[0], xs[1], ys[1]]
