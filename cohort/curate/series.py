"""Assemble the slices of one image series into a 3D SimpleITK image in HU.

Slices are ordered by their position projected on the slice normal (the cross
product of the row and column direction cosines), never by
``ImagePositionPatient[2]``, which is wrong for tilted or oblique series.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
import SimpleITK as sitk

from cohort.errors import SeriesAssemblyError

#: Largest accepted difference between direction cosines of two slices.
ORIENTATION_TOLERANCE = 1e-4
#: Relative tolerance on slice spacing before a series counts as irregular.
SPACING_TOLERANCE = 0.05


@dataclass(frozen=True)
class SliceGeometry:
    """Geometry shared by all slices of a series, as read from the first slice."""

    row_cosine: np.ndarray
    column_cosine: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm
    rows: int
    columns: int

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.column_cosine)


def _geometry(ds: pydicom.Dataset, path: str) -> SliceGeometry:
    try:
        iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        spacing = tuple(float(v) for v in ds.PixelSpacing)
        rows, columns = int(ds.Rows), int(ds.Columns)
        np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    except (AttributeError, ValueError, TypeError) as exc:
        raise SeriesAssemblyError(f"missing or malformed geometry tag ({exc})", subject=path) from exc
    if iop.shape != (6,) or len(spacing) != 2:
        raise SeriesAssemblyError("malformed ImageOrientationPatient/PixelSpacing", subject=path)
    return SliceGeometry(iop[:3], iop[3:], (spacing[0], spacing[1]), rows, columns)


def _check_same_geometry(ref: SliceGeometry, other: SliceGeometry, path: str) -> None:
    if not (
        np.allclose(ref.row_cosine, other.row_cosine, atol=ORIENTATION_TOLERANCE)
        and np.allclose(ref.column_cosine, other.column_cosine, atol=ORIENTATION_TOLERANCE)
    ):
        raise SeriesAssemblyError("mixed slice orientations in one series", subject=path)
    if (ref.rows, ref.columns) != (other.rows, other.columns):
        raise SeriesAssemblyError(
            f"mixed slice sizes: {ref.rows}x{ref.columns} and {other.rows}x{other.columns}",
            subject=path,
        )
    if not np.allclose(ref.pixel_spacing, other.pixel_spacing, rtol=1e-4):
        raise SeriesAssemblyError(
            f"mixed pixel spacings: {ref.pixel_spacing} and {other.pixel_spacing}", subject=path
        )


def _hu_dtype(slopes: np.ndarray, intercepts: np.ndarray, raw_min: int, raw_max: int) -> type:
    """int16 when the rescale is an integer map that stays in range, else float32.

    Keeping integer CT in an integer image matters downstream: pyradiomics
    resamples into the input pixel type, so the same data handed over as float
    gives (slightly) different features.
    """
    integral = np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts))
    if not integral:
        return np.float32
    s_min, s_max = float(slopes.min()), float(slopes.max())
    lo = min(raw_min * s_min, raw_max * s_min) + float(intercepts.min())
    hi = max(raw_max * s_max, raw_min * s_max) + float(intercepts.max())
    info = np.iinfo(np.int16)
    return np.int16 if info.min <= lo and hi <= info.max else np.float32


def read_series(paths: Sequence[str], *, series_uid: str = "") -> sitk.Image:
    """Read the slices in ``paths`` into one 3D image of rescaled values (HU for CT).

    Raises :class:`SeriesAssemblyError` naming the series and the reason when the
    slices do not form one regular volume (mixed orientations or sizes, duplicate
    positions, irregular spacing, gantry tilt, unreadable pixel data).
    """
    subject = series_uid or (paths[0] if paths else "<empty series>")
    if len(paths) < 2:
        raise SeriesAssemblyError(f"{len(paths)} slice(s); a volume needs at least 2", subject=subject)
    datasets = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except Exception as exc:  # pydicom raises many types for damaged files
            raise SeriesAssemblyError(f"cannot read {path}: {exc}", subject=subject) from exc

    geometry = _geometry(datasets[0], paths[0])
    for ds, path in zip(datasets[1:], paths[1:], strict=True):
        _check_same_geometry(geometry, _geometry(ds, path), path)

    normal = geometry.normal
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets])
    along_normal = positions @ normal
    order = np.argsort(along_normal, kind="stable")
    along_normal = along_normal[order]
    positions = positions[order]
    datasets = [datasets[i] for i in order]

    gaps = np.diff(along_normal)
    if np.any(gaps < 1e-3):
        i = int(np.argmin(gaps))
        raise SeriesAssemblyError(
            f"duplicate slice position {along_normal[i]:.3f} mm along the normal", subject=subject
        )
    spacing_z = float(np.median(gaps))
    if np.max(np.abs(gaps - spacing_z)) > SPACING_TOLERANCE * spacing_z:
        raise SeriesAssemblyError(
            f"irregular slice spacing: gaps from {gaps.min():.3f} to {gaps.max():.3f} mm "
            f"(median {spacing_z:.3f}); missing or overlapping slices",
            subject=subject,
        )
    # The stack direction must be the slice normal; otherwise the series is tilted
    # (gantry tilt) or sheared and a plain 3D grid would misplace every voxel.
    stack = positions[-1] - positions[0]
    in_plane = stack - (stack @ normal) * normal
    offset, length = float(np.linalg.norm(in_plane)), float(np.linalg.norm(stack))
    if offset > 0.01 * max(length, 1.0):
        raise SeriesAssemblyError(
            f"slices are offset in-plane by {offset:.2f} mm over the stack (gantry tilt or sheared series)",
            subject=subject,
        )

    try:
        raw = np.stack([ds.pixel_array for ds in datasets])
    except Exception as exc:
        raise SeriesAssemblyError(f"cannot decode pixel data: {exc}", subject=subject) from exc
    slopes = np.array([float(getattr(ds, "RescaleSlope", 1.0)) for ds in datasets])
    intercepts = np.array([float(getattr(ds, "RescaleIntercept", 0.0)) for ds in datasets])
    dtype = _hu_dtype(slopes, intercepts, int(raw.min()), int(raw.max()))
    if dtype is np.int16:
        values = raw.astype(np.int32) * slopes.astype(np.int32)[:, None, None]
        values += intercepts.astype(np.int32)[:, None, None]
    else:
        values = raw.astype(np.float64) * slopes[:, None, None] + intercepts[:, None, None]
    image = sitk.GetImageFromArray(values.astype(dtype))
    image.SetOrigin(tuple(float(v) for v in positions[0]))
    image.SetSpacing((geometry.pixel_spacing[1], geometry.pixel_spacing[0], spacing_z))
    direction = np.column_stack([geometry.row_cosine, geometry.column_cosine, normal])
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image
