"""Crawl an archive folder and read DICOM headers into index rows.

Files are recognised by content (the ``DICM`` marker after the 128-byte
preamble), not by name. Anything that cannot be read becomes a quarantine row
with the reason; no input file stops a crawl. Symbolic links are not followed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pydicom
from pydicom.errors import InvalidDicomError

from cohort.errors import DicomReadError
from cohort.index.schema import INSTANCE_SCHEMA, QUARANTINE_SCHEMA

#: Elements larger than this are not read into memory while indexing
#: (contour data of an RTSTRUCT, overlays, ...).
DEFER_SIZE = 4096
_HASH_CHUNK = 1 << 20


def list_archive(root: str | Path) -> list[str]:
    """Every regular file under ``root``, sorted; symbolic links are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise DicomReadError("archive folder does not exist or is not a folder", subject=str(root))
    found: list[str] = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                found.append(path)
    found.sort()
    return found


def is_dicom_file(path: str) -> bool:
    """True when the file has the DICOM Part 10 preamble and ``DICM`` marker."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def _number(ds: pydicom.Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _integer(ds: pydicom.Dataset, keyword: str) -> int | None:
    number = _number(ds, keyword)
    return None if number is None else int(number)


def _floats(ds: pydicom.Dataset, keyword: str) -> list[float] | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _pixel_spacing(ds: pydicom.Dataset) -> tuple[float | None, float | None]:
    """(between rows, between columns) in mm, or Nones when absent or malformed."""
    values = _floats(ds, "PixelSpacing")
    if not values or len(values) != 2:
        return None, None
    return values[0], values[1]


def _referenced_series(ds: pydicom.Dataset) -> list[str] | None:
    if ds.get("Modality") not in ("RTSTRUCT", "SEG"):
        return None
    uids: list[str] = []
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []) or []:
        for study in frame.get("RTReferencedStudySequence", []) or []:
            for series in study.get("RTReferencedSeriesSequence", []) or []:
                uid = series.get("SeriesInstanceUID")
                if uid and uid not in uids:
                    uids.append(str(uid))
    for series in ds.get("ReferencedSeriesSequence", []) or []:  # DICOM-SEG
        uid = series.get("SeriesInstanceUID")
        if uid and uid not in uids:
            uids.append(str(uid))
    return uids


def _roi_names(ds: pydicom.Dataset) -> list[str] | None:
    if ds.get("Modality") != "RTSTRUCT":
        return None
    return [str(roi.get("ROIName", "")) for roi in ds.get("StructureSetROISequence", []) or []]


def _frame_of_reference(ds: pydicom.Dataset) -> str | None:
    uid = _text(ds, "FrameOfReferenceUID")
    if uid is None and ds.get("Modality") == "RTSTRUCT":
        frames = ds.get("ReferencedFrameOfReferenceSequence", []) or []
        if frames:
            uid = _text(frames[0], "FrameOfReferenceUID")
    return uid


def read_index_row(path: str) -> dict[str, Any]:
    """Read the header of one DICOM file into an index row.

    Raises :class:`DicomReadError` naming the file when it is not DICOM or its
    header cannot be parsed.
    """
    if not is_dicom_file(path):
        raise DicomReadError("not a DICOM Part 10 file (no DICM marker at byte 128)", subject=path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=DEFER_SIZE)
        stat = os.stat(path)
        meta = ds.file_meta
        spacing_row, spacing_col = _pixel_spacing(ds)
        row: dict[str, Any] = {
            "path": path,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": file_sha256(path),
            "transfer_syntax_uid": _text(meta, "TransferSyntaxUID"),
            "sop_class_uid": _text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID"),
            "sop_instance_uid": _text(ds, "SOPInstanceUID") or _text(meta, "MediaStorageSOPInstanceUID"),
            "patient_id": _text(ds, "PatientID"),
            "study_uid": _text(ds, "StudyInstanceUID"),
            "series_uid": _text(ds, "SeriesInstanceUID"),
            "frame_of_reference_uid": _frame_of_reference(ds),
            "modality": _text(ds, "Modality"),
            "series_description": _text(ds, "SeriesDescription"),
            "study_date": _text(ds, "StudyDate"),
            "institution": _text(ds, "InstitutionName"),
            "manufacturer": _text(ds, "Manufacturer"),
            "manufacturer_model": _text(ds, "ManufacturerModelName"),
            "convolution_kernel": _text(ds, "ConvolutionKernel"),
            "kvp": _number(ds, "KVP"),
            "exposure": _number(ds, "Exposure"),
            "tube_current": _number(ds, "XRayTubeCurrent"),
            "contrast_agent": _text(ds, "ContrastBolusAgent"),
            "slice_thickness": _number(ds, "SliceThickness"),
            "pixel_spacing_row": spacing_row,
            "pixel_spacing_col": spacing_col,
            "rows": _integer(ds, "Rows"),
            "columns": _integer(ds, "Columns"),
            "instance_number": _integer(ds, "InstanceNumber"),
            "image_position": _floats(ds, "ImagePositionPatient"),
            "image_orientation": _floats(ds, "ImageOrientationPatient"),
            "rescale_slope": _number(ds, "RescaleSlope"),
            "rescale_intercept": _number(ds, "RescaleIntercept"),
            "referenced_series_uids": _referenced_series(ds),
            "roi_names": _roi_names(ds),
        }
    except (InvalidDicomError, OSError, ValueError, TypeError, KeyError, AttributeError, EOFError) as exc:
        raise DicomReadError(f"unreadable DICOM header: {type(exc).__name__}: {exc}", subject=path) from exc
    if not row["sop_instance_uid"] or not row["series_uid"]:
        raise DicomReadError("header lacks SOPInstanceUID or SeriesInstanceUID", subject=path)
    return row


def index_files(paths: Sequence[str] | Iterable[str]) -> tuple[pa.Table, pa.Table]:
    """Index ``paths``: (instances table, quarantine table), both with fixed schemas."""
    rows: list[dict[str, Any]] = []
    quarantined: list[dict[str, Any]] = []
    for path in paths:
        try:
            rows.append(read_index_row(path))
        except DicomReadError as exc:
            try:
                size = os.path.getsize(path)
            except OSError:
                size = -1
            quarantined.append({"path": path, "size": size, "reason": exc.reason})
    return (
        pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA),
        pa.Table.from_pylist(quarantined, schema=QUARANTINE_SCHEMA),
    )


def concat_index(
    instance_parts: Iterable[pa.Table], quarantine_parts: Iterable[pa.Table]
) -> tuple[pa.Table, pa.Table]:
    """Join chunk results into the (instances, quarantine) tables, sorted by path.

    No chunk at all still gives two empty tables with the fixed schemas.
    """
    instances = pa.concat_tables([pa.Table.from_pylist([], schema=INSTANCE_SCHEMA), *instance_parts])
    quarantine = pa.concat_tables([pa.Table.from_pylist([], schema=QUARANTINE_SCHEMA), *quarantine_parts])
    return instances.sort_by("path"), quarantine.sort_by("path")


def iter_chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])
