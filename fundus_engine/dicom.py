"""DICOM fundus photographs (Ophthalmic Photography objects, as clinical archives export them):
the pixels, and the eye side the file states, read with pydicom; nothing else of the header.

A DICOM file carries the patient's name, identifiers and dates in its header. The build never
copies a header: ingest renders the pixels to a PNG (`render`, no metadata) and every later stage,
export and model request reads that rendition, so none of it can reach a record.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

EXTENSIONS = (".dcm", ".dicom")
RENDITIONS = "renditions"  # OUT/renditions/<sha256>.png: what the stages read of each DICOM photograph
# (0020,0062) Image Laterality, else (0020,0060) Laterality: R, L (B both, U unpaired: no side)
_SIDES = {"R": "OD", "L": "OS"}


def is_dicom(path: Path) -> bool:
    return Path(path).suffix.lower() in EXTENSIONS


def _read(path: Path, pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a readable DICOM file: {exc}") from exc


def size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the header alone, or None when the header does not say."""
    ds = _read(path, pixels=False)
    rows, columns = ds.get("Rows"), ds.get("Columns")
    return (int(columns), int(rows)) if rows and columns else None


def laterality(path: Path) -> str | None:
    """OD or OS when the file states the eye (Image Laterality, else Laterality), else None."""
    ds = _read(path, pixels=False)
    for keyword in ("ImageLaterality", "Laterality"):
        if (side := _SIDES.get(str(ds.get(keyword, "") or "").strip().upper())) is not None:
            return side
    return None


def pixels(path: Path) -> np.ndarray:
    """RGB pixels (uint8, or uint16 for more than 8 bits stored: `decoding` scales them), or
    ValueError saying why the file is not one colour photograph."""
    ds = _read(path, pixels=True)
    if "PixelData" not in ds:
        raise ValueError("DICOM file holds no image (no Pixel Data)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"DICOM file holds {frames} frames: one photograph per file is expected")
    if int(ds.get("SamplesPerPixel", 1)) != 3:
        raise ValueError(f"grayscale DICOM image ({ds.get('PhotometricInterpretation', 'MONOCHROME')}): "
                         "a colour fundus photograph is required")
    try:
        image = ds.pixel_array  # YCbCr is converted to RGB by pydicom
    except Exception as exc:  # no decoder for the transfer syntax, or corrupt pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise ValueError(f"cannot decode DICOM pixel data ({name}): {exc}") from exc
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"DICOM pixel data of shape {image.shape}: one colour photograph is expected")
    return np.ascontiguousarray(image)


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
