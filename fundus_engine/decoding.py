"""A photograph's file to pixels, or the reason it cannot be used: too large to decode (from its
header alone), not an image, grayscale. (DICOM files are read by `dicom`.)

Full resolution (`decode`, `decode_bgr`) is what boxes, crops and the landmark localiser are
measured on. Ingest's measurements (quality on a copy 512 px long, the fundus check on one 256 px
long, the 16x16 perceptual hash) need far fewer pixels: `decode_for_measures` decodes a large JPEG
at 1/2, 1/4 or 1/8 scale inside the JPEG decoder (the DCT is scaled: several times cheaper than a
full decode and the resize after it), never below `MEASURE_SIDE` on its longer side.
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# A reduced copy keeps at least this many pixels on its longer side: four per pixel of the
# largest measurement (512 px quality copy). Measured on the real photographs of
# ../shared/real_fundus (tests/test_single_decode.py): sharpness 1-5% lower than from the full
# decode (a 1/4-scale decode, 1072 px, read 20% lower), exposure and field-of-view coverage within
# 0.0001, perceptual hashes within 1 bit; grades, acceptance and splits unchanged.
MEASURE_SIDE = 2048
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
# A reduced decode is a filtered copy: its channels may differ by a little more, or less, than the
# full decode's. Colour beyond 2 + this settles it; less, and the full decode is checked.
_REDUCED_COLOUR_SLACK = 6
GRAYSCALE = "grayscale image (no colour in any channel): a colour fundus photograph is required"


def decode(path: Path) -> np.ndarray:
    """RGB uint8 pixels, or ValueError saying why the file is unusable."""
    return cv2.cvtColor(decode_bgr(path), cv2.COLOR_BGR2RGB)


def decode_bgr(path: Path, data: np.ndarray | None = None) -> np.ndarray:
    """BGR uint8 pixels as the decoder gives them (OpenCV's order, what its encoders take), or
    ValueError saying why the file is unusable. `data`: the file's bytes, when already read."""
    return in_colour(to_uint8(_imdecode(np.fromfile(path, dtype=np.uint8) if data is None else data, cv2.IMREAD_COLOR)))


def in_colour(image: np.ndarray) -> np.ndarray:
    """The image, or ValueError(GRAYSCALE) when its channels are equal everywhere."""
    if not _has_colour(image, beyond=2):
        raise ValueError(GRAYSCALE)
    return image


def decode_for_measures(path: Path) -> tuple[np.ndarray, int, int]:
    """(BGR pixels, full width, full height): the photograph decoded at the smallest JPEG scale
    that keeps `MEASURE_SIDE` px on its longer side (full scale for other formats and for smaller
    photographs), with the size of the full decode. ValueError as `decode`."""
    data = np.fromfile(path, dtype=np.uint8)
    size = _jpeg_size(path, data)
    reduction = max((k for k in _REDUCED if size and max(size) / k >= MEASURE_SIDE), default=1)
    if reduction > 1 and (image := cv2.imdecode(data, _REDUCED[reduction] | cv2.IMREAD_ANYDEPTH)) is not None:
        full = _full_size(image.shape, size, reduction)
        # 8-bit (a 12-bit JPEG is scaled by its brightest pixel, which a reduced copy does not keep)
        # and plainly in colour: else the full decode says what the photograph is
        if full is not None and image.dtype == np.uint8 and _has_colour(image, beyond=2 + _REDUCED_COLOUR_SLACK):
            return image, *full
    image = decode_bgr(path, data)
    return image, image.shape[1], image.shape[0]


def _imdecode(data: np.ndarray, flags: int) -> np.ndarray:
    # IMREAD_COLOR applies the EXIF orientation, as ultralytics and the model client do when they
    # read the same file, so boxes, crops and 0-999 coordinates share one frame; ANYDEPTH keeps
    # 16-bit data (scaled by `to_uint8`); a grayscale file comes back as three equal channels.
    image = cv2.imdecode(data, flags | cv2.IMREAD_ANYDEPTH) if data.size else None
    if image is None:
        raise ValueError("cannot decode: not an image or a corrupt file")
    return image


def to_uint8(image: np.ndarray) -> np.ndarray:
    """8-bit pixels; deeper data (16-bit PNGs and TIFFs, often 12 bits of a camera's) scaled by
    its brightest value, so a 12-bit photograph is not read nearly black."""
    if image.dtype != np.uint8:
        image = cv2.convertScaleAbs(image, alpha=255.0 / max(1, int(image.max())))
    return image


def deeper_than_8_bits(path: Path) -> bool:
    """True for a PNG or TIFF storing more than 8 bits a sample, from its header. Readers that keep
    the high byte of such data (PIL; OpenCV without IMREAD_ANYDEPTH, as ultralytics reads) see a
    12-bit photograph nearly black where `to_uint8` scales it."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        return head[24] > 8
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        try:
            with Image.open(path) as im:
                bits = im.tag_v2.get(258, 8)
        except Exception:  # a header PIL cannot read: decoding says why, where it is decoded
            return False
        return max(bits if isinstance(bits, tuple) else (bits,)) > 8
    return False


def _has_colour(image: np.ndarray, beyond: int) -> bool:
    """True when two neighbouring channels of some pixel differ by more than `beyond`. A sparse
    grid is looked at first: colour there settles it for nearly every photograph without reading
    the rest."""
    for view in (image[::16, ::16], image):
        a, b, c = (view[..., i].astype(np.int16) for i in range(3))
        if max(np.abs(a - b).max(), np.abs(b - c).max()) > beyond:
            return True
    return False


def _jpeg_size(path: Path, data: np.ndarray) -> tuple[int, int] | None:
    """(width, height) as stored, for a JPEG (the one format decoded at reduced scale), else None."""
    if data.size < 3 or bytes(data[:3]) != b"\xff\xd8\xff":
        return None
    try:
        with Image.open(path) as im:
            return im.size if im.format == "JPEG" else None
    except Exception:
        return None


def _full_size(shape: tuple, stored: tuple[int, int], reduction: int) -> tuple[int, int] | None:
    """(width, height) of the full decode, from a reduced one: the JPEG decoder rounds each side up
    (libjpeg's scaled output), and the EXIF orientation may have turned it. None when the shape
    does not say which way it stands (then the full decode is made)."""
    width, height = stored
    reduced = (math.ceil(height / reduction), math.ceil(width / reduction))
    upright, turned = tuple(shape[:2]) == reduced, tuple(shape[:2]) == reduced[::-1]
    if upright and not turned:
        return width, height
    if turned and not upright:
        return height, width
    if upright and turned and width == height:
        return width, height
    return None


def too_large(path: Path, max_pixels: int) -> str | None:
    """Why a file is too large to decode, from its header alone (PIL reads no pixels on open), so
    a decompression bomb never reaches the decoder; None when within the limit, or when PIL
    cannot read the header (decode then says why)."""
    try:
        with warnings.catch_warnings():  # PIL warns of what is checked here, and said in the reject
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
    except Image.DecompressionBombError as exc:  # over PIL's own limit (179 MP): it gives the pixels only
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = found[1] if found else f"over {2 * Image.MAX_IMAGE_PIXELS}"
        return f"too large: {pixels} pixels, limit {max_pixels} (ingest.max_pixels)"
    except Exception:  # not an image, or a header PIL does not know
        return None
    return over_limit(width, height, max_pixels)


def over_limit(width: int, height: int, max_pixels: int) -> str | None:
    if width * height > max_pixels:
        return f"too large: {width}x{height} = {width * height} pixels, limit {max_pixels} (ingest.max_pixels)"
    return None
