"""pydicom's own test files, and small DICOM files made per test."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pydicom.data
from pydicom.uid import generate_uid

#: pydicom ships its test files in the wheel (test_files/, charset_files/, palettes/).
PYDICOM_DATA = Path(pydicom.data.__file__).parent
CT_SMALL = PYDICOM_DATA / "test_files" / "CT_small.dcm"


#: The folders of pydicom's data that hold test files.
CORPUS_FOLDERS = ("test_files", "charset_files", "palettes")


def corpus_files(root: Path) -> list[Path]:
    """Every file of the corpus folders (DICOM or not)."""
    return sorted(p for folder in CORPUS_FOLDERS for p in (root / folder).rglob("*") if p.is_file())


def write_instance(path: Path, *, series_uid: str | None = None, seed: int = 0) -> Path:
    """A small valid CT instance (CT_small with fresh UIDs and one pixel changed by ``seed``)."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = series_uid or generate_uid(entropy_srcs=[str(path.parent)])
    pixels = bytearray(ds.PixelData)
    pixels[0] = seed % 256
    ds.PixelData = bytes(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
