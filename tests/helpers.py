"""Small DICOM objects made per test (no files from outside the test)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT = "1.2.840.10008.5.1.4.1.1.2"


def write_ct_slices(
    folder: Path,
    volume: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    row_cosine: Sequence[float] = (1.0, 0.0, 0.0),
    col_cosine: Sequence[float] = (0.0, 1.0, 0.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
) -> list[Path]:
    """Write ``volume`` (z, y, x; stored values) as CT slices; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    normal = np.cross(row_cosine, col_cosine)
    paths = []
    for k, plane in enumerate(volume):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientID = "TEST"
        ds.StudyInstanceUID = "1.2.3"
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.FrameOfReferenceUID = "1.2.3.4"
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[2] * normal]
        ds.ImageOrientationPatient = [float(v) for v in (*row_cosine, *col_cosine)]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.PixelData = plane.astype(np.uint16).tobytes()
        path = folder / f"slice{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_pixels_undecodable(path: Path) -> bytes:
    """Rewrite a slice as a JPEG baseline object whose compressed data is junk; returns the original bytes.

    Its header still indexes (and claims a decodable transfer syntax); only decoding the
    pixel data fails — the way a damaged compressed file in a real archive fails.
    """
    import pydicom
    from pydicom.encaps import encapsulate

    original = path.read_bytes()
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + bytes(200)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return original
