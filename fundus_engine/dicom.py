"""DICOM fundus photographs (Ophthalmic Photography objects, as clinical archives export them):
the pixels, and the eye side the file states, read with pydicom; nothing else of the header.

A DICOM file carries the patient's name, identifiers and dates in its header. The build never
copies a header: ingest renders the pixels to a PNG (`render`, no metadata) and every later stage,
export and model request reads that rendition, so none of it can reach a record.

pydicom reads elements lazily, so a malformed one fails wherever it is first read: every access
here is inside `_reading`, which turns any failure into a ValueError naming what was being read.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import cv2
import numpy as np

from fundus_engine.config import IMAGE_EXTENSIONS

EXTENSIONS = (".dcm", ".dicom")
DICOMDIR = "DICOMDIR"  # the index a DICOM export (PS3.10 media) carries beside the files it lists
RENDITIONS = "renditions"  # OUT/renditions/<sha256>.png: what the stages read of each DICOM photograph
# (0020,0062) Image Laterality, else (0020,0060) Laterality: R, L (B both, U unpaired: no side)
_SIDES = {"R": "OD", "L": "OS"}
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def is_dicom(path: Path) -> bool:
    """Named .dcm or .dicom; or, named otherwise, a file that opens as DICOM Part 10 does (a
    128-byte preamble, then "DICM"): media and PACS exports name their files IM000001 or by
    instance UID, with no extension. Not the export's DICOMDIR (its index, no photograph) nor a
    file named as another image format."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in EXTENSIONS:
        return True
    if suffix in IMAGE_EXTENSIONS or path.name.upper() == DICOMDIR:
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


@contextlib.contextmanager
def _reading(what: str):
    try:
        yield
    except ValueError:
        raise
    except Exception as exc:  # pydicom's own errors, a bad value representation, a short element ...
        raise ValueError(f"unreadable DICOM {what}: {type(exc).__name__}: {exc}") from exc


def _read(path: Path, pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError:
        raise ValueError("not a DICOM file (no DICOM header)") from None
    except Exception as exc:
        raise ValueError(f"unreadable DICOM file: {type(exc).__name__}: {exc}") from exc


class Photograph:
    """A DICOM file read once. On opening, what ingest needs before the pixels: the size its pixel
    data really has (checked against the limit before anything is decoded) and the eye side it
    states; `pixels` then decodes from the same read."""

    def __init__(self, path: Path):
        self._ds = ds = _read(path, pixels=True)  # the pixel data element is read as bytes, not decoded
        with _reading("header"):
            rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
            self.laterality = _side(ds)
            encapsulated = "PixelData" in ds and ds.file_meta.TransferSyntaxUID.is_encapsulated
        if not rows or not columns:
            raise ValueError("DICOM file states no image size (Rows, Columns)")
        self.width, self.height = columns, rows
        if encapsulated:  # compressed: a codestream of another size would be decoded at that size
            with _reading("pixel data"):
                from pydicom.encaps import generate_frames

                first = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1)))
            stored = _codestream_size(bytes(first))
            if stored is not None and stored != (columns, rows):
                raise ValueError(f"DICOM pixel data is {stored[0]}x{stored[1]} but its header says {columns}x{rows}")

    def pixels(self) -> np.ndarray:
        """RGB uint8 pixels (data of more than 8 bits scaled from the range the file states), or
        ValueError saying why the file is not one colour photograph."""
        ds = self._ds
        with _reading("pixel module"):
            if "PixelData" not in ds:
                raise ValueError("DICOM file holds no image (no Pixel Data)")
            frames = int(ds.get("NumberOfFrames") or 1)
            samples = int(ds.get("SamplesPerPixel") or 1)
            photometric = str(ds.get("PhotometricInterpretation") or "not stated")
            signed = int(ds.get("PixelRepresentation") or 0) == 1
            bits = int(ds.get("BitsStored") or 8)
        if frames > 1:
            raise ValueError(f"DICOM file holds {frames} frames: one photograph per file is expected")
        if photometric.startswith("MONOCHROME"):
            raise ValueError(f"grayscale DICOM image ({photometric}): a colour fundus photograph is required")
        if samples != 3:
            raise ValueError(f"DICOM image of {samples} sample(s) per pixel ({photometric}): a colour photograph "
                             "(3 samples) is required")
        if signed:
            raise ValueError("DICOM pixel data is signed: not a colour photograph's")
        try:
            image = ds.pixel_array  # YCbCr is converted to RGB by pydicom
        except Exception as exc:  # no decoder for the transfer syntax, or corrupt pixel data
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            raise ValueError(f"cannot decode DICOM pixel data ({getattr(syntax, 'name', syntax)}): {exc}") from exc
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"DICOM pixel data of shape {image.shape}: one colour photograph is expected")
        if image.dtype != np.uint8:
            image = np.round(image.astype(np.float32) * (255.0 / (2 ** min(bits, 16) - 1))).clip(0, 255).astype(np.uint8)
        return np.ascontiguousarray(image)


def _side(ds) -> str | None:
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value:  # B (both) or U (unpaired) says no side: the series' Laterality does not override it
            return _SIDES.get(value)
    return None


def _codestream_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) a compressed frame decodes to, from its own header: JPEG's start-of-frame
    marker (every JPEG process, lossless included), else whatever PIL reads (JPEG 2000)."""
    if data[:2] == b"\xff\xd8":
        at = 2
        while at + 9 <= len(data) and data[at] == 0xFF:
            marker, length = data[at + 1], int.from_bytes(data[at + 2:at + 4], "big")
            if marker in _JPEG_SOF:
                return int.from_bytes(data[at + 7:at + 9], "big"), int.from_bytes(data[at + 5:at + 7], "big")
            at += 2 + length
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:
        return None


def render(bgr: np.ndarray, target: Path) -> Path:
    """The pixels as a PNG (lossless, no metadata) at `target`, written under a temporary name and
    renamed, so a killed build never leaves half a rendition under the final name."""
    ok, data = cv2.imencode(".png", bgr)
    if not ok:
        raise OSError(f"{target}: could not encode the rendition")
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    scratch.write_bytes(data.tobytes())
    os.replace(scratch, target)
    return target
