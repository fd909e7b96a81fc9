"""DICOM-SEG segments to voxel masks on the grid of the image series they segment.

A segmentation is read with highdicom; each segment becomes a binary
SimpleITK image with exactly the geometry of the reference image (as read by
``read_series``). When the SEG frames lie on the reference grid (the usual case:
the SEG was made from that series, perhaps omitting empty frames) the mask is
placed voxel for voxel, only padded and cropped; otherwise it is resampled with
nearest-neighbour interpolation and a note says so. Fractional segments are
thresholded at 0.5.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk

from cohort.errors import RTStructError

#: Fractional segments: a voxel belongs to the segment at or above this fraction.
FRACTION_THRESHOLD = 0.5


class SegReadError(RTStructError):
    """A DICOM-SEG (or one of its segments) cannot be turned into a mask (stage: mask)."""


@dataclass(frozen=True)
class SegmentInfo:
    """One segment of a segmentation, as described in its SegmentSequence."""

    number: int
    label: str
    property_type: str | None
    algorithm_type: str | None


@dataclass(frozen=True)
class SegmentMask:
    """One segment on the reference grid, with the notes a curator needs."""

    number: int
    label: str
    mask: sitk.Image
    voxel_count: int
    notes: tuple[str, ...] = field(default=())


def read_segment_infos(ds: pydicom.Dataset) -> list[SegmentInfo]:
    """List the segments of a DICOM-SEG with their labels."""
    infos = []
    for item in ds.get("SegmentSequence", []) or []:
        types = item.get("SegmentedPropertyTypeCodeSequence") or []
        infos.append(
            SegmentInfo(
                number=int(item.SegmentNumber),
                label=str(item.get("SegmentLabel", "")),
                property_type=str(types[0].get("CodeMeaning")) if types else None,
                algorithm_type=str(item.get("SegmentAlgorithmType"))
                if "SegmentAlgorithmType" in item
                else None,
            )
        )
    return infos


def volume_geometry(reference: sitk.Image) -> hd.VolumeGeometry:
    """The highdicom geometry (slice, row, column axes) of a SimpleITK image (x, y, z axes)."""
    direction = np.asarray(reference.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(reference.GetSpacing(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, 0] = direction[:, 2] * spacing[2]
    affine[:3, 1] = direction[:, 1] * spacing[1]
    affine[:3, 2] = direction[:, 0] * spacing[0]
    affine[:3, 3] = reference.GetOrigin()
    nx, ny, nz = reference.GetSize()
    return hd.VolumeGeometry(affine, (nz, ny, nx), coordinate_system="PATIENT")


def _to_sitk(volume: hd.Volume) -> sitk.Image:
    affine = volume.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    image.SetSpacing((float(spacing[2]), float(spacing[1]), float(spacing[0])))
    image.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
    unit = affine[:3, :3] / spacing
    image.SetDirection(tuple(float(v) for v in np.column_stack([unit[:, 2], unit[:, 1], unit[:, 0]]).ravel()))
    return image


def _load(source: str | os.PathLike[str] | pydicom.Dataset) -> hd.seg.Segmentation:
    subject = "<dataset>" if isinstance(source, pydicom.Dataset) else os.fspath(source)
    try:
        if isinstance(source, pydicom.Dataset):
            return hd.seg.Segmentation.from_dataset(source, copy=True)
        return hd.seg.segread(os.fspath(source))
    except Exception as exc:  # highdicom and pydicom raise many types for malformed objects
        raise SegReadError(f"not a readable DICOM-SEG: {type(exc).__name__}: {exc}", subject=subject) from exc


def read_seg(
    source: str | os.PathLike[str] | pydicom.Dataset,
    reference: sitk.Image,
    *,
    segment_numbers: Sequence[int] | None = None,
) -> list[SegmentMask]:
    """Read segments of a DICOM-SEG as binary masks on ``reference``'s grid (all segments by default).

    Raises :class:`SegReadError` when the file is not a segmentation, a segment
    number does not exist, or a segment's frames do not form a volume.
    """
    seg = _load(source)
    subject = str(seg.SOPInstanceUID)
    infos = {info.number: info for info in read_segment_infos(seg)}
    numbers = list(segment_numbers) if segment_numbers is not None else sorted(infos)
    unknown = [n for n in numbers if n not in infos]
    if unknown:
        raise SegReadError(f"no segment number(s) {unknown}; the SEG has {sorted(infos)}", subject=subject)
    target = volume_geometry(reference)
    fractional = seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    masks = []
    for number in numbers:
        notes: list[str] = []
        try:
            volume = seg.get_volume(segment_numbers=[number], combine_segments=False, dtype=np.float32)
        except (RuntimeError, ValueError) as exc:
            raise SegReadError(
                f"segment {number}: frames do not form a volume ({exc})", subject=subject
            ) from exc
        values = volume.array[..., 0]
        binary = (values >= FRACTION_THRESHOLD) if fractional else (values > 0)
        plain = hd.Volume(binary.astype(np.uint8), volume.affine, coordinate_system="PATIENT")
        try:
            array = plain.match_geometry(target).array
        except RuntimeError:
            resampled = sitk.Resample(
                _to_sitk(plain), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
            )
            array = sitk.GetArrayFromImage(resampled)
            notes.append("SEG frames are not on the image grid; resampled (nearest neighbour)")
        count = int(array.sum())
        if count == 0:
            notes.append("segment is empty on the image grid")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
        image.CopyInformation(reference)
        masks.append(SegmentMask(number, infos[number].label, image, count, tuple(notes)))
    return masks
