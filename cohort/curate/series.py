"""Assemble the slices of one image series into a 3D SimpleITK image in HU.

Slices are ordered by their position projected on the slice normal (the cross
product of the row and column direction cosines), never by
``ImagePositionPatient[2]``, which is wrong for tilted or oblique series.

The headers are checked first by :func:`cohort.curate.geometry.check_series_geometry`
(the same checks curation runs on the index), and a :class:`ReadPolicy` says
which findings are repaired and which refuse the series:

- missing slices or irregular spacing: refused, or (``resample``) put on a
  regular grid at the median spacing along the normal, linearly interpolated
  between the two nearest slices. Slices that fall on grid positions (all of
  them when only whole slices are missing) keep their values exactly, so a mask
  rasterised from contours drawn on the acquired slices is unchanged there.
  This is what pyradiomics users expect: pyradiomics assumes a regular grid and
  resamples from there, and a stack read with one average spacing (what ITK's
  series reader does) misplaces every slice after a gap.
- gantry tilt (a stack that leans away from the slice normal, i.e. a sheared
  grid): refused, or (``resample``) each slice shifted in-plane onto the
  orthogonal grid of the first slice, as dcm2niix does. Refusal names the angle.
- duplicate positions: refused, or (``keep_first``) the slice with the lowest
  InstanceNumber kept at each position.

Integer images stay integer after resampling (values rounded, as the IBSI
manual prescribes for CT). A healthy series is read exactly as before any of
this existed: no value and no geometry changes.

Enhanced multi-frame objects (one file, many frames, with a
PerFrameFunctionalGroupsSequence) are read frame by frame with each frame's
position, orientation, pixel spacing and rescale from the functional groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
import SimpleITK as sitk
from scipy import ndimage

from cohort.curate.geometry import (
    GeometryFlag,
    GeometryTolerances,
    ReadPolicy,
    SeriesGeometry,
    SliceHeader,
    check_series_geometry,
)
from cohort.errors import SeriesAssemblyError
from cohort.index.source import read_dicom

#: Largest accepted difference between direction cosines of two slices.
ORIENTATION_TOLERANCE = GeometryTolerances().orientation
#: Relative tolerance on slice spacing before a series counts as irregular.
SPACING_TOLERANCE = GeometryTolerances().spacing


@dataclass(frozen=True)
class SeriesVolume:
    """A read series: the image, the geometry findings and what the reader did about them."""

    image: sitk.Image
    geometry: SeriesGeometry
    actions: tuple[str, ...] = ()


def _first(item: pydicom.Dataset | None, sequence: str) -> pydicom.Dataset | None:
    if item is None:
        return None
    seq = item.get(sequence)
    return seq[0] if seq else None


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    return values if len(values) == n else None


def _number(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _text(value: object) -> str | None:
    return None if value is None or value == "" else str(value)


def headers_from_dataset(ds: pydicom.Dataset, path: str) -> list[SliceHeader]:
    """The slice headers of one instance: one, or one per frame of an enhanced multi-frame object."""
    n_frames = int(_number(ds.get("NumberOfFrames")) or 1)
    sop_class = _text(ds.get("SOPClassUID"))
    top_slope, top_intercept = _number(ds.get("RescaleSlope")), _number(ds.get("RescaleIntercept"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        spacing = _floats(ds.get("PixelSpacing"), 2)
        return [
            SliceHeader(
                path=path,
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),  # type: ignore[arg-type]
                pixel_spacing=spacing,  # type: ignore[arg-type]
                rows=int(ds.Rows) if "Rows" in ds else None,
                columns=int(ds.Columns) if "Columns" in ds else None,
                slice_thickness=_number(ds.get("SliceThickness")),
                instance_number=int(_number(ds.get("InstanceNumber")) or 0) or None,
                acquisition=_text(ds.get("AcquisitionNumber")),
                temporal_position=_text(ds.get("TemporalPositionIdentifier")),
                sop_class_uid=sop_class,
                n_frames=n_frames,
                rescale_slope=top_slope,
                rescale_intercept=top_intercept,
            )
        ]
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    headers = []
    for i, item in enumerate(per_frame):

        def group(name: str, item: pydicom.Dataset = item) -> pydicom.Dataset | None:
            return _first(item, name) or _first(shared, name)

        plane = group("PlanePositionSequence")
        orient = group("PlaneOrientationSequence")
        measures = group("PixelMeasuresSequence")
        values = group("PixelValueTransformationSequence")
        content = group("FrameContentSequence")
        slope = _number(values.get("RescaleSlope")) if values is not None else None
        intercept = _number(values.get("RescaleIntercept")) if values is not None else None
        headers.append(
            SliceHeader(
                path=path,
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                position=_floats(plane.get("ImagePositionPatient") if plane else None, 3),  # type: ignore[arg-type]
                orientation=_floats(  # type: ignore[arg-type]
                    orient.get("ImageOrientationPatient") if orient else None, 6
                ),
                pixel_spacing=_floats(  # type: ignore[arg-type]
                    measures.get("PixelSpacing") if measures else None, 2
                ),
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                slice_thickness=_number(measures.get("SliceThickness")) if measures else None,
                instance_number=i + 1,
                acquisition=_text(content.get("FrameAcquisitionNumber")) if content else None,
                temporal_position=_text(content.get("TemporalPositionIndex")) if content else None,
                sop_class_uid=sop_class,
                frame=i,
                n_frames=n_frames,
                rescale_slope=slope if slope is not None else top_slope,
                rescale_intercept=intercept if intercept is not None else top_intercept,
            )
        )
    return headers


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


def _unit(v: np.ndarray) -> np.ndarray:
    return v / float(np.linalg.norm(v))


def _keep_first_at_each_position(
    headers: list[SliceHeader], s: np.ndarray, tol_mm: float
) -> tuple[list[SliceHeader], np.ndarray, int]:
    """Sorted headers with one slice per position: the lowest InstanceNumber (then path) wins."""
    groups: list[list[int]] = []
    for i in range(len(headers)):
        if groups and s[i] - s[groups[-1][0]] < tol_mm:
            groups[-1].append(i)
        else:
            groups.append([i])

    def rank(i: int) -> tuple[float, str, int]:
        h = headers[i]
        number = h.instance_number if h.instance_number is not None else float("inf")
        return (number, h.path, h.frame or 0)

    kept = [min(group, key=rank) for group in groups]
    return [headers[i] for i in kept], s[kept], len(headers) - len(kept)


def _correct_tilt(values: np.ndarray, shifts: np.ndarray, fill: float) -> np.ndarray:
    """Shift slice k by ``shifts[k]`` = (rows, columns) pixels, linear interpolation."""
    out = np.empty(values.shape, dtype=np.float64)
    for k in range(values.shape[0]):
        if np.allclose(shifts[k], 0.0, atol=1e-9):
            out[k] = values[k]
        else:
            out[k] = ndimage.shift(
                values[k].astype(np.float64), shifts[k], order=1, mode="constant", cval=fill, prefilter=False
            )
    return out


def _regular_grid(values: np.ndarray, s: np.ndarray, spacing: float) -> tuple[np.ndarray, int]:
    """Linear interpolation along axis 0 from positions ``s`` onto ``s[0] + k * spacing``.

    Returns the new stack and how many of its slices were interpolated.
    """
    n_nodes = int(np.floor((s[-1] - s[0]) / spacing + 1e-6)) + 1
    grid = s[0] + np.arange(n_nodes) * spacing
    lower = np.clip(np.searchsorted(s, grid + 1e-6 * spacing, side="right") - 1, 0, s.size - 2)
    weight = np.clip((grid - s[lower]) / (s[lower + 1] - s[lower]), 0.0, 1.0)
    out = np.empty((n_nodes, *values.shape[1:]), dtype=np.float64)
    interpolated = 0
    for k, (i, w) in enumerate(zip(lower, weight, strict=True)):
        if w < 1e-6:
            out[k] = values[i]
        elif w > 1.0 - 1e-6:
            out[k] = values[i + 1]
        else:
            out[k] = (1.0 - w) * values[i] + w * values[i + 1]
            interpolated += 1
    return out, interpolated


def assemble_series(
    paths: Sequence[str], *, series_uid: str = "", policy: ReadPolicy | None = None
) -> SeriesVolume:
    """Read the slices (or frames) in ``paths`` into one 3D image of rescaled values (HU for CT).

    Raises :class:`SeriesAssemblyError` naming the series, the reason and what
    to do next when the geometry findings are not repaired by ``policy``
    (default: refuse every defect) or a file cannot be read or decoded.
    """
    policy = policy or ReadPolicy()
    tol = policy.tolerances
    subject = series_uid or (paths[0] if paths else "<empty series>")
    datasets: dict[str, pydicom.Dataset] = {}
    headers: list[SliceHeader] = []
    for path in paths:
        try:
            ds = read_dicom(path)
        except Exception as exc:  # pydicom raises many types for damaged files
            raise SeriesAssemblyError(f"cannot read {path}: {exc}", subject=subject) from exc
        datasets[path] = ds
        headers.extend(headers_from_dataset(ds, path))
    unframed = [h for h in headers if h.n_frames > 1 and h.frame is None]
    if unframed:
        raise SeriesAssemblyError(
            f"multi-frame object without per-frame functional groups ({unframed[0].n_frames} frames); "
            "only enhanced multi-frame images and single-frame series are read",
            subject=subject,
        )
    if len(headers) < 2:
        raise SeriesAssemblyError(f"{len(headers)} slice(s); a volume needs at least 2", subject=subject)

    geometry = check_series_geometry(headers, series_uid=subject, tolerances=tol)
    refusal = policy.refusal(geometry)
    if refusal is not None:
        raise SeriesAssemblyError(refusal, subject=subject)
    actions: list[str] = []

    # One header per instance (and frame): exact copies of an instance are dropped.
    seen: set[tuple[str, int | None]] = set()
    unique: list[SliceHeader] = []
    for h in headers:
        if (h.sop_instance_uid, h.frame) in seen and h.sop_instance_uid:
            continue
        seen.add((h.sop_instance_uid, h.frame))
        unique.append(h)
    if len(unique) < len(headers):
        actions.append(f"dropped {len(headers) - len(unique)} extra copies of an instance")

    first = unique[0]
    assert first.orientation is not None and first.pixel_spacing is not None
    iop = np.asarray(first.orientation, dtype=np.float64)
    row_cosine, col_cosine = iop[:3], iop[3:]
    normal = np.cross(row_cosine, col_cosine)
    positions = np.array([h.position for h in unique], dtype=np.float64)
    along_normal = positions @ normal
    order = np.argsort(along_normal, kind="stable")
    unique = [unique[i] for i in order]
    along_normal = along_normal[order]
    positions = positions[order]
    if geometry.issue(GeometryFlag.DUPLICATE_POSITIONS) is not None:
        unique, along_normal, dropped = _keep_first_at_each_position(unique, along_normal, tol.duplicate_mm)
        positions = np.array([h.position for h in unique], dtype=np.float64)
        actions.append(f"kept the first of duplicate slices ({dropped} dropped)")

    gaps = np.diff(along_normal)
    spacing_z = float(np.median(gaps))

    pixel_cache: dict[str, np.ndarray] = {}
    try:
        planes = []
        for h in unique:
            if h.path not in pixel_cache:
                pixel_cache[h.path] = datasets[h.path].pixel_array
            array = pixel_cache[h.path]
            planes.append(array[h.frame] if h.frame is not None else array)
        raw = np.stack(planes)
    except Exception as exc:
        raise SeriesAssemblyError(f"cannot decode pixel data: {exc}", subject=subject) from exc
    slopes = np.array([h.rescale_slope if h.rescale_slope is not None else 1.0 for h in unique])
    intercepts = np.array([h.rescale_intercept if h.rescale_intercept is not None else 0.0 for h in unique])
    dtype = _hu_dtype(slopes, intercepts, int(raw.min()), int(raw.max()))
    if dtype is np.int16:
        values = raw.astype(np.int32) * slopes.astype(np.int32)[:, None, None]
        values += intercepts.astype(np.int32)[:, None, None]
    else:
        values = raw.astype(np.float64) * slopes[:, None, None] + intercepts[:, None, None]

    resampled = False
    tilt = geometry.issue(GeometryFlag.GANTRY_TILT)
    if tilt is not None:
        offsets = positions - positions[0]
        # In-plane offset of each slice in (rows, columns) pixels: the shift onto the grid of slice 0.
        shifts = np.column_stack(
            [
                offsets @ _unit(col_cosine) / first.pixel_spacing[0],
                offsets @ _unit(row_cosine) / first.pixel_spacing[1],
            ]
        )
        values = _correct_tilt(values, shifts, float(values.min()))
        resampled = True
        actions.append(f"gantry tilt of {tilt.value:.2f}° corrected: slices shifted onto an orthogonal grid")
    spacing_issue = geometry.issue(GeometryFlag.MISSING_SLICES) or geometry.issue(
        GeometryFlag.IRREGULAR_SPACING
    )
    if spacing_issue is not None:
        values, interpolated = _regular_grid(values, along_normal, spacing_z)
        resampled = True
        actions.append(
            f"resampled onto a regular grid at {spacing_z:.3f} mm: {interpolated} of {values.shape[0]} "
            "slices interpolated"
        )
    if resampled and np.issubdtype(dtype, np.integer):
        values = np.rint(values)

    image = sitk.GetImageFromArray(values.astype(dtype))
    image.SetOrigin(tuple(float(v) for v in positions[0]))
    image.SetSpacing((first.pixel_spacing[1], first.pixel_spacing[0], spacing_z))
    direction = np.column_stack([row_cosine, col_cosine, normal])
    if not np.allclose(np.linalg.norm(direction, axis=0), 1.0, atol=1e-12):
        direction = np.column_stack([_unit(row_cosine), _unit(col_cosine), _unit(normal)])
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return SeriesVolume(image=image, geometry=geometry, actions=tuple(actions))


def read_series(
    paths: Sequence[str], *, series_uid: str = "", policy: ReadPolicy | None = None
) -> sitk.Image:
    """Read the slices in ``paths`` into one 3D image of rescaled values (HU for CT).

    Raises :class:`SeriesAssemblyError` naming the series and the reason when the
    slices do not form one regular volume (mixed orientations or sizes, duplicate
    positions, missing slices, irregular spacing, gantry tilt, unreadable pixel
    data) and ``policy`` does not repair it; see :func:`assemble_series`.
    """
    return assemble_series(paths, series_uid=series_uid, policy=policy).image
