"""DICOM fundus photographs, as clinical archives export them: read with pydicom, rendered to a
PNG that every later stage reads, the eye side taken from the file's Image Laterality, and
nothing of the header (patient name, identifiers, dates) reaching what a build writes.

The photographs are real (../shared/real_fundus): a DRIVE TIFF stored uncompressed, and an
EyePACS JPEG stored as it is (JPEG Baseline inside the DICOM, the usual way fundus cameras export).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid  # noqa: E402

from fundus_engine.config import BuildConfig, IngestConfig  # noqa: E402
from fundus_engine.ingest import ingest  # noqa: E402
from fundus_engine.models import ImageRecord, InstructionRecord, Reject  # noqa: E402
from fundus_engine.photo_files import scan, sha256_file  # noqa: E402
from fundus_engine.tables import read_rows  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "real_fundus" / "images"
DRIVE = REAL / "DRIVE" / "21_training.tif"
EYEPACS = REAL / "EyePACS" / "10_left.jpeg"
OPHTHALMIC_PHOTOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
# what a clinical export carries in its header, which no output may hold
PATIENT = {"PatientName": "DOE^JANE^Q", "PatientID": "MRN-7731942", "PatientBirthDate": "19580214",
           "AccessionNumber": "ACC-99120457", "InstitutionName": "St Elsewhere Eye Clinic"}

pytestmark = pytest.mark.skipif(not (DRIVE.is_file() and EYEPACS.is_file()), reason="needs ../shared/real_fundus")


def _dataset(rows: int, columns: int, syntax, **tags) -> pydicom.Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = OPHTHALMIC_PHOTOGRAPHY
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = OPHTHALMIC_PHOTOGRAPHY, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OP"
    for keyword, value in {**PATIENT, **tags}.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    return ds


def uncompressed(path: Path, rgb: np.ndarray, photometric: str = "RGB", **tags) -> Path:
    samples = 1 if rgb.ndim == 2 else 3
    ds = _dataset(rgb.shape[0], rgb.shape[1], ExplicitVRLittleEndian, **tags)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_inside(path: Path, jpeg: Path, **tags) -> Path:
    """The JPEG's own bytes encapsulated, as a camera's DICOM export stores them."""
    height, width = cv2.imread(str(jpeg)).shape[:2]
    ds = _dataset(height, width, JPEGBaseline8Bit, **tags)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.PixelData = encapsulate([jpeg.read_bytes()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def drive_rgb() -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(DRIVE)), cv2.COLOR_BGR2RGB)


def _ingested(root: Path, out: Path) -> tuple[dict[str, ImageRecord], dict[str, str]]:
    sources, rejects = scan(root)
    records, more = ingest(root, sources, {}, IngestConfig(), renditions=out / "renditions")
    return {Path(r.relpath).name: r for r in records}, {Path(r.item).name: r.reason for r in rejects + more}


def test_a_dicom_photograph_is_measured_as_its_pixels_and_rendered_losslessly(tmp_path, drive_rgb):
    """An uncompressed DICOM of a real photograph: the same size, quality measurements and
    perceptual hash as a PNG of the same pixels; the stages read a PNG rendition holding exactly
    those pixels; the eye side comes from Image Laterality."""
    root = tmp_path / "in"
    root.mkdir()
    cv2.imwrite(str(root / "drive21.png"), cv2.cvtColor(drive_rgb, cv2.COLOR_RGB2BGR))
    uncompressed(root / "drive21.dcm", drive_rgb, ImageLaterality="L")  # its disc is on the left: a left eye
    records, rejects = _ingested(root, tmp_path / "out")
    assert rejects == {}
    png, dcm = records["drive21.png"], records["drive21.dcm"]
    assert (dcm.width, dcm.height) == (png.width, png.height) == (565, 584)
    assert dcm.quality == png.quality and dcm.phash == png.phash
    assert dcm.laterality == "OS" and png.laterality == "unknown"
    rendition = Path(dcm.path)
    assert rendition == tmp_path / "out" / "renditions" / f"{dcm.sha256}.png" and dcm.relpath == "drive21.dcm"
    assert np.array_equal(cv2.cvtColor(cv2.imread(str(rendition)), cv2.COLOR_BGR2RGB), drive_rgb)


def test_a_camera_export_with_the_jpeg_inside_is_read(tmp_path):
    """JPEG Baseline inside the DICOM (YBR_FULL_422), the side from Laterality when Image
    Laterality is absent: pixels within JPEG decoders' rounding of OpenCV's decode of the same JPEG."""
    root = tmp_path / "in"
    root.mkdir()
    jpeg_inside(root / "eyepacs10.dcm", EYEPACS, Laterality="L")
    records, rejects = _ingested(root, tmp_path / "out")
    assert rejects == {}
    record = records["eyepacs10.dcm"]
    direct = cv2.imread(str(EYEPACS))
    rendered = cv2.imread(record.path)
    assert rendered.shape == direct.shape and (record.width, record.height) == (direct.shape[1], direct.shape[0])
    assert np.abs(rendered.astype(int) - direct.astype(int)).mean() < 1.0
    assert record.laterality == "OS"


def test_an_export_s_files_without_an_extension_are_found_and_its_dicomdir_is_not(tmp_path, drive_rgb):
    """Media and PACS exports name their files IM000001 or by instance UID (whose last part reads as
    an extension): found by the DICM preamble. Their DICOMDIR index and other files are no photographs."""
    root = tmp_path / "in"
    series = root / "DICOM" / "PA000001" / "ST000001" / "SE000001"
    series.mkdir(parents=True)
    uncompressed(series / "IM000001", drive_rgb, ImageLaterality="L")
    jpeg_inside(series / "1.2.826.0.1.3680043.8.498.10457", EYEPACS)
    uncompressed(root / "DICOMDIR", drive_rgb[:64, :64])  # a Part 10 file too: what an export indexes
    (root / "README").write_text("exported by the clinic's archive\n")
    (series / "IM000002.txt").write_text("not a photograph")
    sources, rejects = scan(root)
    assert rejects == [] and [s.relpath for s in sources] == [
        "DICOM/PA000001/ST000001/SE000001/1.2.826.0.1.3680043.8.498.10457", "DICOM/PA000001/ST000001/SE000001/IM000001"]
    records, rejects = _ingested(root, tmp_path / "out")
    assert rejects == {} and set(records) == {"IM000001", "1.2.826.0.1.3680043.8.498.10457"}
    drive = records["IM000001"]
    assert (drive.width, drive.height, drive.laterality) == (565, 584, "OS")
    assert np.array_equal(cv2.cvtColor(cv2.imread(drive.path), cv2.COLOR_BGR2RGB), drive_rgb)
    assert Path(records["1.2.826.0.1.3680043.8.498.10457"].path).parent == tmp_path / "out" / "renditions"


def test_dicom_files_that_are_not_one_colour_photograph_are_rejected_with_the_reason(tmp_path, drive_rgb):
    root = tmp_path / "in"
    root.mkdir()
    uncompressed(root / "gray.dcm", cv2.cvtColor(drive_rgb, cv2.COLOR_RGB2GRAY), photometric="MONOCHROME2")
    frames = np.stack([drive_rgb, drive_rgb])
    path = uncompressed(root / "two_frames.dcm", frames.reshape(-1, *drive_rgb.shape[1:]))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.NumberOfFrames = drive_rgb.shape[0], 2
    ds.save_as(path, enforce_file_format=True)
    (root / "notes.dcm").write_text("patient letter, not an image")
    uncompressed(root / "good.dcm", drive_rgb)
    records, rejects = _ingested(root, tmp_path / "out")
    assert set(records) == {"good.dcm"}
    assert "grayscale DICOM image (MONOCHROME2)" in rejects["gray.dcm"]
    assert "holds 2 frames: one photograph per file is expected" in rejects["two_frames.dcm"]
    assert rejects["notes.dcm"] == "not a DICOM file (no DICOM header)"



def test_size_is_checked_before_decoding_and_a_header_that_lies_about_it_is_rejected(tmp_path, drive_rgb, monkeypatch):
    """`ingest.max_pixels` from the header's rows and columns, before any pixel is decoded; a
    compressed frame of another size than the header states (a decompression bomb behind a small
    header) is rejected from the frame's own header, also undecoded."""
    from fundus_engine import dicom

    root = tmp_path / "in"
    root.mkdir()
    uncompressed(root / "good.dcm", drive_rgb)
    lying = jpeg_inside(root / "lying.dcm", EYEPACS)
    ds = pydicom.dcmread(lying)
    ds.Rows, ds.Columns = 64, 80
    ds.save_as(lying, enforce_file_format=True)

    def no_decoding(photograph):
        raise AssertionError("decoded")

    monkeypatch.setattr(dicom.Photograph, "pixels", no_decoding)
    sources, _ = scan(root)
    records, rejects = ingest(root, sources, {}, IngestConfig(max_pixels=300_000), renditions=tmp_path / "renditions")
    assert records == []
    assert {Path(r.item).name: r.reason for r in rejects} == {
        "good.dcm": "too large: 565x584 = 329960 pixels, limit 300000 (ingest.max_pixels)",
        "lying.dcm": "DICOM pixel data is 4752x3168 but its header says 80x64"}


def test_a_malformed_element_rejects_its_file_and_the_shard_goes_on(tmp_path, drive_rgb):
    """pydicom reads elements lazily: a bad value representation fails only when read. That file
    is rejected with the reason, the good photograph beside it is kept."""
    root = tmp_path / "in"
    root.mkdir()
    uncompressed(root / "good.dcm", drive_rgb)
    bad = uncompressed(root / "bad.dcm", drive_rgb)
    data = bad.read_bytes()
    samples = b"\x28\x00\x02\x00US"  # (0028,0002) Samples per Pixel, explicit VR little endian
    assert data.count(samples) == 1
    bad.write_bytes(data.replace(samples, b"\x28\x00\x02\x00ZZ"))
    records, rejects = _ingested(root, tmp_path / "out")
    assert set(records) == {"good.dcm"} and "unreadable DICOM" in rejects["bad.dcm"]


def test_more_than_8_bits_are_scaled_from_the_range_the_file_states(tmp_path, drive_rgb):
    """12 bits stored in 16: 4095 is white, so a dim photograph stays dim (not stretched to its brightest pixel)."""
    from fundus_engine import dicom

    twelve = (drive_rgb.astype(np.uint16) * 4095 // 255 // 4)  # a quarter of the range
    path = uncompressed(tmp_path / "twelve.dcm", np.zeros((2, 2, 3), np.uint8))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = twelve.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = np.ascontiguousarray(twelve).tobytes()
    ds.save_as(path, enforce_file_format=True)
    got = dicom.Photograph(path).pixels()
    assert got.dtype == np.uint8
    assert np.abs(got.astype(int) - np.round(twelve * (255 / 4095))).max() <= 1 and got.max() <= 64


def test_a_build_of_dicom_photographs_writes_nothing_of_their_headers(tmp_path, drive_rgb):
    """A whole build (every stage, the dataset, benchmark, card, exports): records point at the
    renditions; the eye side the file states is checked against the disc like a label's (stated
    where they agree, neither side named where they do not); no output holds the patient's name,
    identifiers, birth date, accession number or institution."""
    from fundus_engine.runner import RunContext, finish_build, plan_build
    from in_memory import run_local

    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    uncompressed(root / "1.2.840.99.1.dcm", drive_rgb, ImageLaterality="R")  # wrong: the disc says left
    jpeg_inside(root / "1.2.840.99.2.dcm", EYEPACS, ImageLaterality="L")
    ctx = RunContext.create(root, out, BuildConfig(), run_id="dicom")
    plan = plan_build(ctx)
    manifest = finish_build(ctx, plan, run_local(ctx, plan), time.monotonic())
    assert manifest["complete"] and manifest["images"] == 2 and manifest["rejects"] == 0

    records = read_rows(sorted((out / "dataset").glob("*.parquet")), InstructionRecord)
    assert records and all(Path(r.source_image_path).suffix == ".png" for r in records)
    assert all(Path(r.source_image_path).parent == out / "renditions" for r in records)
    chains = {r.sha256: r.conversations[1].value for r in records if r.task == "cognitive_chain"}
    sha = {p.name: sha256_file(p) for p in root.iterdir()}
    assert "of the left eye (OS)" in chains[sha["1.2.840.99.2.dcm"]]
    drive_chain = chains[sha["1.2.840.99.1.dcm"]]
    assert "undetermined laterality" in drive_chain and "(OD)" not in drive_chain and "(OS)" not in drive_chain

    import pyarrow.parquet as pq

    needles = [*PATIENT.values(), "7731942", "Elsewhere"]  # long enough not to occur by chance in image bytes
    holding = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        text = (json.dumps(pq.read_table(path).to_pylist(), default=str) if path.suffix == ".parquet"
                else path.read_bytes().decode("latin-1"))
        holding += [(str(path.relative_to(out)), n) for n in needles if n in text]
    assert holding == []
    assert not read_rows([out / "rejects.parquet"], Reject)

    # the renditions live outside the stage tables: deleted, ingest runs again and writes them again
    import shutil

    shutil.rmtree(out / "renditions")
    plan = plan_build(ctx)
    again = finish_build(ctx, plan, run_local(ctx, plan), time.monotonic())
    assert again["stages"]["ingest"]["computed"] == 1 and len(list((out / "renditions").glob("*.png"))) == 2
    assert again["records"] == manifest["records"]
