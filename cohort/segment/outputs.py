"""Segmentation masks as DICOM objects a radiotherapy system or a viewer can open.

Two writers share one input: binary masks by label on the grid of a source
image series, and the headers of that series.

- :func:`write_seg` writes a DICOM Segmentation (BINARY) with highdicom: one
  segment per label with SNOMED CT category and type codes, the algorithm that
  made it (AUTOMATIC), a frame per non-empty slice, each frame derived from its
  source slice.
- :func:`write_rtstruct` writes an RT Structure Set with pydicom: one ROI per
  label, CLOSED_PLANAR contours on every slice, each contour referencing its
  slice. Contours are traced by marching squares at level 0.5 on the zero-padded
  slice, so every vertex lies halfway between a voxel inside and one outside
  (the segment joins mid-edges of the pixel-centre lattice). A voxel centre is
  therefore never on a contour and
  :func:`cohort.curate.rtstruct.rasterise_contours` (even-odd rule on pixel
  centres) gives the mask back exactly: a hole is simply one more polygon, as
  are islands. Runs of collinear vertices are merged, which leaves the polygon
  unchanged.

Why not rt-utils: its last release (1.2.7) is from January 2023, it pulls
OpenCV, it traces contours through the centres of boundary pixels (read back by
centre sampling with half-open edges, a mask loses pixels on its right and lower
edges) and has been reported to emit
degenerate one- and two-point contours for thin structures; holes need its
"pin hole" cut. The writer here is a page of pydicom.

Masks are given either as SimpleITK images, which must lie on the grid of the
source slices (as :func:`cohort.curate.series.read_series` returns it; slices
the reader interpolated into a gap must be empty), or as ``(slice, row,
column)`` arrays with the slices ordered along the slice normal, one per source
slice. NIfTI masks are written by :func:`cohort.curate.convert.write_mask`.
"""

from __future__ import annotations

import datetime
import os
import re
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.charset import default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from skimage.measure import find_contours

from cohort import __version__
from cohort.errors import SegmentationError

RT_STRUCTURE_SET_STORAGE = UID("1.2.840.10008.5.1.4.1.1.481.3")
#: The SOP class an RT Referenced Study item names (Detached Study Management, as the RT IODs prescribe).
RT_REFERENCED_STUDY_SOP_CLASS = UID("1.2.840.10008.3.1.2.3.1")
#: Geometry of a mask and of the source slices must agree to this (direction cosines, voxel fractions).
GRID_TOLERANCE = 1e-3
#: Decimals (mm) kept in ContourData: far below any voxel, short enough for the 16-byte DS limit.
CONTOUR_DECIMALS = 4

_CONTOUR_DATA = Tag(0x3006, 0x0050)
_PERSON_NAME_WARNING = r"The string .* is unlikely to represent the intended person name"


class RTROIInterpretedType(StrEnum):
    """RT ROI Interpreted Type (3006,00A4), the defined terms an RT system sorts structures by."""

    GTV = "GTV"
    CTV = "CTV"
    PTV = "PTV"
    ORGAN = "ORGAN"
    AVOIDANCE = "AVOIDANCE"
    EXTERNAL = "EXTERNAL"
    CONTROL = "CONTROL"


@dataclass(frozen=True)
class AlgorithmInfo:
    """The algorithm that made the masks (Algorithm Identification macro)."""

    name: str
    version: str
    family: Code = codes.cid7162.ArtificialIntelligence


@dataclass(frozen=True)
class StructureCoding:
    """How one label is described: SEG property codes, RT interpreted type and display colour."""

    category: Code
    property_type: Code
    interpreted_type: RTROIInterpretedType
    modifier: Code | None = None  # e.g. laterality
    color: tuple[int, int, int] = (255, 0, 0)


GTV_CODING = StructureCoding(
    codes.cid7150.MorphologicallyAbnormalStructure,
    codes.cid7159.NeoplasmPrimary,
    RTROIInterpretedType.GTV,
    color=(255, 0, 0),
)
LUNG_CODING = StructureCoding(
    codes.cid7150.AnatomicalStructure, codes.SCT.Lung, RTROIInterpretedType.ORGAN, color=(0, 160, 255)
)
LEFT_LUNG_CODING = StructureCoding(
    codes.cid7150.AnatomicalStructure,
    codes.SCT.Lung,
    RTROIInterpretedType.ORGAN,
    modifier=codes.SCT.Left,
    color=(0, 200, 120),
)
RIGHT_LUNG_CODING = StructureCoding(
    codes.cid7150.AnatomicalStructure,
    codes.SCT.Lung,
    RTROIInterpretedType.ORGAN,
    modifier=codes.SCT.Right,
    color=(120, 120, 255),
)

#: Codings found by label (regular expression, matched case-insensitively on the whole label).
DEFAULT_CODINGS: tuple[tuple[str, StructureCoding], ...] = (
    (r"gtv([\s_-]*\w+)?|tumou?r([\s_-]*\d+)?", GTV_CODING),
    (r"lung[\s_-]*(l|lt|left)|(l|lt|left)[\s_-]*lung", LEFT_LUNG_CODING),
    (r"lung[\s_-]*(r|rt|right)|(r|rt|right)[\s_-]*lung", RIGHT_LUNG_CODING),
    (r"lungs?", LUNG_CODING),
)


def coding_for_label(label: str, codings: Mapping[str, StructureCoding] | None = None) -> StructureCoding:
    """The coding of ``label``: from ``codings`` if it names the label, else from :data:`DEFAULT_CODINGS`."""
    if codings and label in codings:
        return codings[label]
    for pattern, coding in DEFAULT_CODINGS:
        if re.fullmatch(pattern, label.strip(), flags=re.IGNORECASE):
            return coding
    raise SegmentationError(
        "no segmented property codes known for this label; pass codings={label: StructureCoding(...)}",
        subject=label,
    )


# --------------------------------------------------------------------------- source grid


@dataclass(frozen=True)
class SourceGrid:
    """The source slices sorted along the slice normal, with the geometry they share."""

    datasets: tuple[Dataset, ...]
    row_cosine: np.ndarray  # direction of increasing column index
    col_cosine: np.ndarray  # direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    positions: np.ndarray  # (n, 3) ImagePositionPatient, sorted
    shape: tuple[int, int, int]  # (slices, rows, columns)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.col_cosine)

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.datasets[0].FrameOfReferenceUID)

    def pixel_to_patient(self, k: int, xy: np.ndarray) -> np.ndarray:
        """Patient coordinates (mm) of continuous ``(column, row)`` indices on slice ``k``."""
        return (
            self.positions[k]
            + xy[:, :1] * self.pixel_spacing[1] * self.row_cosine
            + xy[:, 1:2] * self.pixel_spacing[0] * self.col_cosine
        )


def _floats(ds: Dataset, keyword: str, n: int) -> np.ndarray:
    value = ds.get(keyword)
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        array = np.empty(0)
    if array.size != n:
        raise SegmentationError(
            f"source slice lacks a valid {keyword}", subject=str(ds.get("SOPInstanceUID", "?"))
        )
    return array


def source_grid(source_datasets: Sequence[Dataset]) -> SourceGrid:
    """Check that the source slices form one single-frame series and sort them along the normal."""
    if not source_datasets:
        raise SegmentationError("no source slices given; pass the datasets of the segmented series")
    first = source_datasets[0]
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(keyword, "")) for ds in source_datasets}
        if len(values) != 1 or "" in values:
            raise SegmentationError(
                f"source slices must share one non-empty {keyword}; found {sorted(values)}",
                subject=str(first.get("SeriesInstanceUID", "")),
            )
    subject = str(first.SeriesInstanceUID)
    if any(int(ds.get("NumberOfFrames") or 1) != 1 for ds in source_datasets):
        raise SegmentationError(
            "multi-frame sources are not supported; pass single-frame slices", subject=subject
        )
    orientation = _floats(first, "ImageOrientationPatient", 6)
    spacing = _floats(first, "PixelSpacing", 2)
    size = (int(first.Rows), int(first.Columns))
    for ds in source_datasets[1:]:
        if (
            np.abs(_floats(ds, "ImageOrientationPatient", 6) - orientation).max() > GRID_TOLERANCE
            or np.abs(_floats(ds, "PixelSpacing", 2) - spacing).max() > GRID_TOLERANCE * spacing.min()
            or (int(ds.Rows), int(ds.Columns)) != size
        ):
            raise SegmentationError(
                "source slices differ in orientation, pixel spacing or matrix size", subject=subject
            )
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    positions = np.stack([_floats(ds, "ImagePositionPatient", 3) for ds in source_datasets])
    order = np.argsort(positions @ normal, kind="stable")
    along = (positions @ normal)[order]
    if along.size > 1 and np.diff(along).min() < GRID_TOLERANCE:
        raise SegmentationError(
            "two source slices share one position; pass one slice per position", subject=subject
        )
    return SourceGrid(
        datasets=tuple(source_datasets[i] for i in order),
        row_cosine=row,
        col_cosine=col,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        positions=positions[order],
        shape=(len(order), *size),
    )


def _binary(array: np.ndarray, label: str) -> np.ndarray:
    if array.dtype == np.bool_ or array.size == 0:
        return array.astype(bool, copy=False)
    binary = (
        (array.min() >= 0 and array.max() <= 1)
        if array.dtype.kind in "ui"
        else ((array == 0) | (array == 1)).all()
    )
    if not binary:
        raise SegmentationError(
            f"a mask must be binary (0/1); found values in [{array.min()}, {array.max()}]:"
            " threshold it or select one label first",
            subject=label,
        )
    return array.astype(bool)


def _image_on_grid(image: sitk.Image, grid: SourceGrid, label: str) -> np.ndarray:
    """The slices of ``image`` at the source slices, after checking that the grids coincide."""
    if image.GetDimension() != 3:
        raise SegmentationError(f"a mask image must be 3D, not {image.GetDimension()}D", subject=label)
    nx, ny, nz = image.GetSize()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    _, rows, columns = grid.shape
    if (
        (ny, nx) != (rows, columns)
        or np.abs(direction[:, 0] - grid.row_cosine).max() > GRID_TOLERANCE
        or np.abs(direction[:, 1] - grid.col_cosine).max() > GRID_TOLERANCE
        or abs(spacing[0] - grid.pixel_spacing[1]) > GRID_TOLERANCE * spacing[0]
        or abs(spacing[1] - grid.pixel_spacing[0]) > GRID_TOLERANCE * spacing[1]
    ):
        raise SegmentationError(
            "the mask is not on the grid of the source slices (size, direction or in-plane spacing differ);"
            " resample it onto the image read from those slices",
            subject=label,
        )
    index = ((grid.positions - np.asarray(image.GetOrigin())) @ direction) / spacing
    k = np.round(index[:, 2]).astype(np.int64)
    if np.abs(index[:, :2]).max() > GRID_TOLERANCE or np.abs(index[:, 2] - k).max() > GRID_TOLERANCE:
        raise SegmentationError(
            "the source slices do not fall on slices of the mask grid; resample the mask first", subject=label
        )
    if k.min() < 0 or k.max() >= nz:
        raise SegmentationError(
            f"source slices map to mask slices {k.min()}..{k.max()} of 0..{nz - 1}", subject=label
        )
    array = _binary(sitk.GetArrayViewFromImage(image), label)
    unreferenced = np.setdiff1d(np.arange(nz), k)
    if unreferenced.size and array[unreferenced].any():
        raise SegmentationError(
            f"mask slices {unreferenced.tolist()[:8]} hold voxels but have no source slice (interpolated"
            " into a gap?); only acquired slices can be referenced",
            subject=label,
        )
    return np.ascontiguousarray(array[k])


def masks_on_grid(
    mask_by_label: Mapping[str, sitk.Image | np.ndarray], grid: SourceGrid
) -> dict[str, np.ndarray]:
    """Each label's mask as a boolean ``(slice, row, column)`` array in the order of ``grid.datasets``."""
    if not mask_by_label:
        raise SegmentationError("no masks given", subject=grid.series_uid)
    arrays = {}
    for label, mask in mask_by_label.items():
        if not label.strip():
            raise SegmentationError("a label must not be empty", subject=grid.series_uid)
        if isinstance(mask, sitk.Image):
            array = _image_on_grid(mask, grid, label)
        else:
            array = _binary(np.asarray(mask), label)
            if array.shape != grid.shape:
                raise SegmentationError(
                    f"mask shape {array.shape} is not (slices, rows, columns) = {grid.shape} of the source",
                    subject=label,
                )
        if not array.any():
            raise SegmentationError("the mask is empty; there is nothing to write", subject=label)
        arrays[label] = array
    return arrays


# --------------------------------------------------------------------------- contours


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Remove vertices of a closed polygon that lie on the line through their neighbours."""
    prev, nxt = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    cross = (points[:, 0] - prev[:, 0]) * (nxt[:, 1] - prev[:, 1]) - (points[:, 1] - prev[:, 1]) * (
        nxt[:, 0] - prev[:, 0]
    )
    keep = np.abs(cross) > 1e-9
    return points[keep] if keep.sum() >= 3 else points


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed polygons, as ``(column, row)`` pixel indices, whose even-odd interior is ``mask``.

    Each polygon is given once (its first vertex is not repeated). Pixel
    centres are never on a polygon, so the even-odd fill at pixel centres gives
    ``mask`` back exactly.
    """
    mask = np.asarray(mask, dtype=bool)
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return []
    r0, c0 = int(rows[0]), int(columns[0])
    # Traced on the bounding box padded with background, so every contour closes.
    padded = np.pad(mask[r0 : rows[-1] + 1, c0 : columns[-1] + 1].astype(np.uint8), 1)
    offset = np.array([c0 - 1.0, r0 - 1.0])
    polygons = []
    for contour in find_contours(padded, 0.5):
        ring = contour[:-1] if np.array_equal(contour[0], contour[-1]) else contour
        polygons.append(_drop_collinear(ring[:, ::-1] + offset))  # (row, column) -> (column, row)
    return polygons


# --------------------------------------------------------------------------- writing


def _write_atomically(ds: Dataset, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, target)
    except OSError as exc:
        raise SegmentationError(f"could not write the DICOM object ({exc})", subject=str(target)) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _algorithm_identification(algorithm: AlgorithmInfo) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name, family=algorithm.family, version=algorithm.version
    )


#: Type 2 patient and study attributes a derived object copies from its source (empty when absent).
_PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _with_type2_defaults(ds: Dataset) -> Dataset:
    """``ds``, or a shallow copy of it with the absent type 2 patient/study attributes set empty."""
    missing = [keyword for keyword in _PATIENT_STUDY_TYPE2 if keyword not in ds]
    if not missing:
        return ds
    patched = Dataset()
    for element in ds:
        patched.add(element)
    for keyword in missing:
        setattr(patched, keyword, "")
    return patched


def write_seg(
    mask_by_label: Mapping[str, sitk.Image | np.ndarray],
    source_datasets: Sequence[Dataset],
    path: str | os.PathLike[str],
    *,
    algorithm: AlgorithmInfo,
    series_description: str = "Automatic segmentation",
    manufacturer: str = "cohort",
    codings: Mapping[str, StructureCoding] | None = None,
    series_number: int = 901,
    device_serial_number: str = "0",
) -> Path:
    """Write the masks as one binary DICOM Segmentation referencing the source series.

    One segment per label (numbered in the order of ``mask_by_label``), coded by
    :func:`coding_for_label`; empty frames are omitted. Raises
    :class:`SegmentationError` for masks off the source grid, non-binary or
    empty masks, labels without codes, or sources that are not one series.
    """
    grid = source_grid(source_datasets)
    arrays = masks_on_grid(mask_by_label, grid)
    descriptions = []
    for number, label in enumerate(arrays, start=1):
        coding = coding_for_label(label, codings)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=coding.category,
            segmented_property_type=coding.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm_identification(algorithm),
            display_color=hd.color.CIELabColor.from_rgb(*coding.color),
        )
        if coding.modifier is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(coding.modifier)
            ]
        descriptions.append(description)
    pixels = np.stack([arrays[label] for label in arrays], axis=-1).view(np.uint8)
    with warnings.catch_warnings():
        # The patient module is copied from the source as it is; a one-component
        # name (e.g. an anonymised ID) is valid DICOM and not ours to rewrite.
        warnings.filterwarnings("ignore", message=_PERSON_NAME_WARNING, category=UserWarning)
        try:
            seg = hd.seg.Segmentation(
                source_images=[_with_type2_defaults(grid.datasets[0]), *grid.datasets[1:]],
                pixel_array=pixels,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=generate_uid(),
                series_number=series_number,
                sop_instance_uid=generate_uid(),
                instance_number=1,
                manufacturer=manufacturer,
                manufacturer_model_name=algorithm.name,
                software_versions=(f"{algorithm.name} {algorithm.version}; cohort {__version__}"),
                device_serial_number=device_serial_number,
                series_description=series_description,
                content_label="SEGMENTATION",
                content_description=f"{algorithm.name} {algorithm.version}",
                omit_empty_frames=True,
            )
        except (ValueError, TypeError, AttributeError) as exc:  # highdicom's refusals of the sources
            raise SegmentationError(
                f"highdicom refused to build the segmentation: {exc}", subject=grid.series_uid
            ) from exc
    return _write_atomically(seg, path)


def _copy(target: Dataset, source: Dataset, keywords: Sequence[str], *, type2: bool) -> None:
    for keyword in keywords:
        if keyword in source and source[keyword].value is not None:
            setattr(target, keyword, source[keyword].value)
        elif type2:
            setattr(target, keyword, "")


def _ds_bytes(points: np.ndarray) -> bytes:
    """Coordinates as a DS value: shortest decimal strings of the rounded values, backslash-separated."""
    values = np.round(points.ravel(), CONTOUR_DECIMALS).tolist()
    encoded = "\\".join(map(repr, values)).encode("ascii")
    return encoded + b" " if len(encoded) % 2 else encoded


def _contour_item(number: int, points: np.ndarray, reference: Dataset) -> Dataset:
    image = Dataset()
    image.ReferencedSOPClassUID = reference.SOPClassUID
    image.ReferencedSOPInstanceUID = reference.SOPInstanceUID
    item = Dataset()
    item.ContourNumber = number
    item.ContourImageSequence = DicomSequence([image])
    item.ContourGeometricType = "CLOSED_PLANAR"
    item.NumberOfContourPoints = len(points)
    # Stored already encoded: pydicom would otherwise parse and validate every
    # coordinate as a DSfloat (most of the write time for organ-sized masks).
    value = _ds_bytes(points)
    item[_CONTOUR_DATA] = RawDataElement(_CONTOUR_DATA, "DS", len(value), value, 0, False, True)
    # Declared as read in the encoding it is written in, so the writer copies the raw value as it is.
    item.set_original_encoding(False, True, default_encoding)
    return item


def _referenced_frame_of_reference(grid: SourceGrid) -> Dataset:
    """ReferencedFrameOfReferenceSequence item: frame of reference, study, series and every slice."""
    contour_images = []
    for source in grid.datasets:
        image = Dataset()
        image.ReferencedSOPClassUID = source.SOPClassUID
        image.ReferencedSOPInstanceUID = source.SOPInstanceUID
        contour_images.append(image)
    series_item = Dataset()
    series_item.SeriesInstanceUID = grid.series_uid
    series_item.ContourImageSequence = DicomSequence(contour_images)
    study_item = Dataset()
    study_item.ReferencedSOPClassUID = RT_REFERENCED_STUDY_SOP_CLASS
    study_item.ReferencedSOPInstanceUID = grid.datasets[0].StudyInstanceUID
    study_item.RTReferencedSeriesSequence = DicomSequence([series_item])
    frame_item = Dataset()
    frame_item.FrameOfReferenceUID = grid.frame_of_reference_uid
    frame_item.RTReferencedStudySequence = DicomSequence([study_item])
    return frame_item


def write_rtstruct(
    mask_by_label: Mapping[str, sitk.Image | np.ndarray],
    source_datasets: Sequence[Dataset],
    path: str | os.PathLike[str],
    *,
    algorithm: AlgorithmInfo,
    series_description: str = "Automatic segmentation",
    manufacturer: str = "cohort",
    codings: Mapping[str, StructureCoding] | None = None,
    series_number: int = 902,
    structure_set_label: str = "AUTO",
) -> Path:
    """Write the masks as an RT Structure Set of CLOSED_PLANAR contours referencing the source series.

    One ROI per label (numbered in the order of ``mask_by_label``), generated
    AUTOMATIC by ``algorithm``, interpreted as its coding says (GTV, ORGAN, ...),
    left UNAPPROVED for a person to review. Raises :class:`SegmentationError`
    as :func:`write_seg` does.
    """
    grid = source_grid(source_datasets)
    arrays = masks_on_grid(mask_by_label, grid)
    first = grid.datasets[0]
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    sop_instance_uid = generate_uid()

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    _copy(ds, first, ("SpecificCharacterSet",), type2=False)
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    # Patient and General Study modules, copied from the source as they are.
    _copy(ds, first, ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"), type2=True)
    _copy(ds, first, ("PatientAge", "PatientIdentityRemoved", "DeidentificationMethod"), type2=False)
    ds.StudyInstanceUID = first.StudyInstanceUID
    _copy(
        ds,
        first,
        ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"),
        type2=True,
    )
    _copy(ds, first, ("StudyDescription",), type2=False)
    # Frame of Reference: the source's, in which every contour is drawn.
    ds.FrameOfReferenceUID = grid.frame_of_reference_uid
    _copy(ds, first, ("PositionReferenceIndicator",), type2=True)
    # RT Series and General Equipment.
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = series_description
    ds.OperatorsName = ""
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = algorithm.name
    ds.SoftwareVersions = [f"{algorithm.name} {algorithm.version}", f"cohort {__version__}"]
    # Structure Set, ROI Contour and RT ROI Observations.
    ds.InstanceNumber = 1
    ds.StructureSetLabel = structure_set_label
    ds.StructureSetName = series_description[:64]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame_of_reference(grid)])

    rois, roi_contours, observations = [], [], []
    for number, (label, array) in enumerate(arrays.items(), start=1):
        coding = coding_for_label(label, codings)
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = grid.frame_of_reference_uid
        roi.ROIName = label
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{algorithm.name} {algorithm.version}"[:64]
        roi.ROIDerivationAlgorithmIdentificationSequence = _algorithm_identification(algorithm)
        rois.append(roi)

        contours: list[Dataset] = []
        for k in np.flatnonzero(array.reshape(array.shape[0], -1).any(axis=1)):
            for polygon in slice_contours(array[k]):
                points = grid.pixel_to_patient(int(k), polygon)
                contours.append(_contour_item(len(contours) + 1, points, grid.datasets[k]))
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = list(coding.color)
        roi_contour.ContourSequence = DicomSequence(contours)
        roi_contours.append(roi_contour)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = coding.interpreted_type.value
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"
    return _write_atomically(ds, path)
