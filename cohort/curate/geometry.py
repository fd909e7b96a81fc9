"""Geometry QC of an image series from its headers alone (no pixel data).

:func:`check_series_geometry` takes the index rows of one series (or the slice
headers read from its files) and says what is wrong with it as a volume, each
defect a :class:`GeometryIssue` with a value: how many slices are missing and
where, the largest deviation of a gap from the median spacing, the gantry-tilt
angle in degrees, the orientations, sizes and pixel spacings that are mixed,
the acquisitions or temporal positions that share one series. A healthy series
has no issue at all.

:func:`split_series` decides whether a series is better read as several
sub-series (one per geometry when orientations, sizes or pixel spacings are
mixed; one per acquisition or temporal position when each of them covers
positions of the others) and gives each part a stable key
``<SeriesInstanceUID>#<part>`` (``#acq2``, ``#t3``, ``#geo1``) and the reason.

:class:`ReadPolicy` says which issues a reader may repair (resample irregular
spacing or a tilted stack onto a regular orthogonal grid, keep the first of
duplicate slices) and which make it refuse the series; ``read_series`` follows it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd

#: SOP classes of enhanced (multi-frame) images whose per-frame geometry lives in
#: the functional groups, not in the top-level header the index reads.
ENHANCED_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image Storage
        "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image Storage
    }
)

#: Optional index columns this module uses when present (the header keyword each holds).
OPTIONAL_COLUMNS = {
    "acquisition_number": "AcquisitionNumber",
    "temporal_position_identifier": "TemporalPositionIdentifier",
    "number_of_frames": "NumberOfFrames",
}


class GeometryFlag(StrEnum):
    """A geometry finding on a series; see :data:`INFORMATIONAL_FLAGS` for the harmless ones."""

    MISSING_GEOMETRY = "missing_geometry"
    DUPLICATE_INSTANCES = "duplicate_instances"
    MIXED_ORIENTATIONS = "mixed_orientations"
    MIXED_SIZES = "mixed_sizes"
    MIXED_PIXEL_SPACING = "mixed_pixel_spacing"
    NON_ORTHOGONAL = "non_orthogonal"
    OBLIQUE = "oblique"
    DUPLICATE_POSITIONS = "duplicate_positions"
    SINGLE_SLICE = "single_slice"
    MISSING_SLICES = "missing_slices"
    IRREGULAR_SPACING = "irregular_spacing"
    OVERLAPPING_SLICES = "overlapping_slices"
    GANTRY_TILT = "gantry_tilt"
    MULTIPLE_ACQUISITIONS = "multiple_acquisitions"
    MULTIPLE_TEMPORAL_POSITIONS = "multiple_temporal_positions"
    MULTI_FRAME = "multi_frame"
    UNSUPPORTED_MULTI_FRAME = "unsupported_multi_frame"


#: Findings that describe a series without keeping it from being read as it is:
#: an oblique stack, thick slices reconstructed with overlap, exact copies of an
#: instance, acquisitions that tile the stack, an enhanced multi-frame object.
INFORMATIONAL_FLAGS = frozenset(
    {
        GeometryFlag.OBLIQUE,
        GeometryFlag.OVERLAPPING_SLICES,
        GeometryFlag.DUPLICATE_INSTANCES,
        GeometryFlag.MULTIPLE_ACQUISITIONS,
        GeometryFlag.MULTIPLE_TEMPORAL_POSITIONS,
        GeometryFlag.MULTI_FRAME,
    }
)


class Orientation(StrEnum):
    """The patient axis nearest to the slice normal (``OBLIQUE`` issues give the angle)."""

    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"
    UNKNOWN = "unknown"


class SpacingAction(StrEnum):
    """What a reader does with missing slices or irregular spacing."""

    REFUSE = "refuse"
    RESAMPLE = "resample"


class TiltAction(StrEnum):
    """What a reader does with a tilted (sheared) stack."""

    REFUSE = "refuse"
    RESAMPLE = "resample"


class DuplicateAction(StrEnum):
    """What a reader does with several slices at one position."""

    REFUSE = "refuse"
    KEEP_FIRST = "keep_first"


@dataclass(frozen=True)
class GeometryTolerances:
    """Thresholds of the geometry checks."""

    #: Largest difference between direction cosines still counted as one orientation.
    orientation: float = 1e-4
    #: Largest relative difference between pixel spacings still counted as one.
    pixel_spacing: float = 1e-4
    #: Largest deviation of a gap from the median spacing, relative to it, of a regular series.
    spacing: float = 0.05
    #: A gap longer than this many median spacings holds missing slices.
    missing_factor: float = 1.5
    #: Slices closer than this (mm along the normal) share one position.
    duplicate_mm: float = 1e-3
    #: Largest in-plane offset of a slice from the stack axis, in pixels, of an untilted stack.
    tilt_pixels: float = 0.25
    #: A normal further than this from the nearest patient axis (degrees) is oblique.
    oblique_deg: float = 0.5
    #: Row and column cosines further than this from perpendicular (degrees) are non-orthogonal.
    perpendicular_deg: float = 0.01


@dataclass(frozen=True)
class GeometryIssue:
    """One finding with its value (count, mm or degrees, see ``unit``) and where it is."""

    flag: GeometryFlag
    value: float
    unit: str
    detail: str
    #: Positions (mm along the slice normal) the finding concerns, e.g. the gap starts.
    positions: tuple[float, ...] = ()

    @property
    def informational(self) -> bool:
        return self.flag in INFORMATIONAL_FLAGS

    def __str__(self) -> str:
        return f"{self.flag.value}: {self.detail}"


@dataclass(frozen=True)
class SliceHeader:
    """The geometry of one slice (an instance, or one frame of a multi-frame instance)."""

    path: str
    sop_instance_uid: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) in mm
    rows: int | None
    columns: int | None
    slice_thickness: float | None = None
    instance_number: int | None = None
    acquisition: str | None = None
    temporal_position: str | None = None
    sop_class_uid: str | None = None
    frame: int | None = None  # 0-based frame of a multi-frame instance, None for a single frame
    n_frames: int = 1
    rescale_slope: float | None = None
    rescale_intercept: float | None = None

    @property
    def enhanced(self) -> bool:
        """An enhanced multi-frame image (geometry per frame in the functional groups)."""
        return self.sop_class_uid in ENHANCED_SOP_CLASSES


@dataclass(frozen=True)
class SeriesGeometry:
    """What the headers of one (sub-)series say about it as a volume."""

    series_uid: str
    n_instances: int
    n_slices: int  # distinct slice positions (frames for a multi-frame object)
    orientation: Orientation
    obliquity_deg: float | None
    rows: int | None
    columns: int | None
    pixel_spacing: tuple[float, float] | None
    slice_spacing: float | None  # median gap along the normal (mm)
    slice_thickness: float | None  # median SliceThickness (mm)
    extent_mm: float | None  # first to last slice along the normal
    issues: tuple[GeometryIssue, ...] = ()

    @property
    def flags(self) -> tuple[GeometryFlag, ...]:
        return tuple(issue.flag for issue in self.issues)

    @property
    def healthy(self) -> bool:
        return not self.issues

    def issue(self, flag: GeometryFlag) -> GeometryIssue | None:
        return next((issue for issue in self.issues if issue.flag == flag), None)

    def describe(self) -> str:
        """One line: the issues, or that the series is regular."""
        if not self.issues:
            return "regular"
        return "; ".join(str(issue) for issue in self.issues)


@dataclass(frozen=True)
class SubSeries:
    """A part of a series read as one volume; the whole series when it is not split."""

    key: str  # "<SeriesInstanceUID>" or "<SeriesInstanceUID>#<part>"
    series_uid: str
    part: str  # "" for the whole series
    paths: tuple[str, ...]
    reason: str  # why the series was split into this part ("" when not split)
    geometry: SeriesGeometry


@dataclass(frozen=True)
class SeriesSplit:
    """The geometry of a whole series and the parts it is read as."""

    whole: SeriesGeometry
    parts: tuple[SubSeries, ...]

    @property
    def is_split(self) -> bool:
        return len(self.parts) > 1 or (len(self.parts) == 1 and self.parts[0].part != "")


_SPLIT_HINT = "split it (qc.geometry.split: true) to read one sub-series per geometry"
_HINTS = {
    GeometryFlag.MISSING_GEOMETRY: "the series cannot be placed in space",
    GeometryFlag.MIXED_ORIENTATIONS: _SPLIT_HINT,
    GeometryFlag.MIXED_SIZES: _SPLIT_HINT,
    GeometryFlag.MIXED_PIXEL_SPACING: _SPLIT_HINT,
    GeometryFlag.NON_ORTHOGONAL: "the header is inconsistent; fix ImageOrientationPatient",
    GeometryFlag.SINGLE_SLICE: "a volume needs at least 2 slice positions",
    GeometryFlag.UNSUPPORTED_MULTI_FRAME: "only enhanced multi-frame images and single-frame series are read",
    GeometryFlag.MISSING_SLICES: "set qc.geometry.irregular_spacing: resample to interpolate the gap",
    GeometryFlag.IRREGULAR_SPACING: "set qc.geometry.irregular_spacing: resample for a regular grid",
    GeometryFlag.GANTRY_TILT: "set qc.geometry.gantry_tilt: resample to read it on an orthogonal grid",
    GeometryFlag.DUPLICATE_POSITIONS: "split it by acquisition (qc.geometry.split: true) or set "
    "qc.geometry.duplicate_positions: keep_first",
}


@dataclass(frozen=True)
class ReadPolicy:
    """Which geometry issues a reader repairs and which make it refuse the series.

    ``irregular_spacing: resample`` puts missing slices and irregular gaps on a
    regular grid at the median spacing along the normal (linear interpolation
    between the two nearest slices; slices on grid positions keep their values).
    ``gantry_tilt: resample`` shifts each slice in-plane onto the orthogonal grid
    of the first slice (linear interpolation; pixels shifted in from outside take
    the series minimum). Integer images stay integer (interpolated values rounded,
    as the IBSI manual prescribes for CT). ``duplicate_positions: keep_first``
    keeps, at each position, the slice with the lowest InstanceNumber.
    """

    irregular_spacing: SpacingAction = SpacingAction.REFUSE
    gantry_tilt: TiltAction = TiltAction.REFUSE
    duplicate_positions: DuplicateAction = DuplicateAction.REFUSE
    tolerances: GeometryTolerances = field(default_factory=GeometryTolerances)

    def repairs(self, flag: GeometryFlag) -> bool:
        if flag in INFORMATIONAL_FLAGS:
            return True
        if flag in (GeometryFlag.MISSING_SLICES, GeometryFlag.IRREGULAR_SPACING):
            return self.irregular_spacing == SpacingAction.RESAMPLE
        if flag == GeometryFlag.GANTRY_TILT:
            return self.gantry_tilt == TiltAction.RESAMPLE
        if flag == GeometryFlag.DUPLICATE_POSITIONS:
            return self.duplicate_positions == DuplicateAction.KEEP_FIRST
        return False

    def blocking(self, geometry: SeriesGeometry) -> tuple[GeometryIssue, ...]:
        """The issues of ``geometry`` this policy cannot read past."""
        return tuple(issue for issue in geometry.issues if not self.repairs(issue.flag))

    def refusal(self, geometry: SeriesGeometry) -> str | None:
        """Why the series is refused, with what to do next; None when it can be read."""
        blocking = self.blocking(geometry)
        if not blocking:
            return None
        parts = []
        for issue in blocking:
            detail = issue.detail
            if issue.flag == GeometryFlag.DUPLICATE_POSITIONS:
                # Say where the duplicates come from when the headers tell.
                cause = geometry.issue(GeometryFlag.MULTIPLE_ACQUISITIONS) or geometry.issue(
                    GeometryFlag.MULTIPLE_TEMPORAL_POSITIONS
                )
                if cause is not None:
                    detail = f"{cause.detail}: {detail}"
            parts.append(f"{detail} ({_HINTS.get(issue.flag, 'cannot be read')})")
        return "; ".join(parts)


# --------------------------------------------------------------------------- headers


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value == ""


def _float_tuple(value: Any, n: int) -> tuple[float, ...] | None:
    if _missing(value):
        return None
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        return None
    return values


def _opt_float(value: Any) -> float | None:
    if _missing(value):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _opt_int(value: Any) -> int | None:
    number = _opt_float(value)
    return None if number is None else int(number)


def _opt_text(value: Any) -> str | None:
    if _missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip() or None


def header_from_row(row: Mapping[str, Any]) -> SliceHeader:
    """A :class:`SliceHeader` from one index row (see ``cohort.index.schema``)."""
    spacing = (_opt_float(row.get("pixel_spacing_row")), _opt_float(row.get("pixel_spacing_col")))
    position = _float_tuple(row.get("image_position"), 3)
    orientation = _float_tuple(row.get("image_orientation"), 6)
    return SliceHeader(
        path=str(row.get("path", "")),
        sop_instance_uid=str(row.get("sop_instance_uid", "")),
        position=position,  # type: ignore[arg-type]
        orientation=orientation,  # type: ignore[arg-type]
        pixel_spacing=None if spacing[0] is None or spacing[1] is None else (spacing[0], spacing[1]),
        rows=_opt_int(row.get("rows")),
        columns=_opt_int(row.get("columns")),
        slice_thickness=_opt_float(row.get("slice_thickness")),
        instance_number=_opt_int(row.get("instance_number")),
        acquisition=_opt_text(row.get("acquisition_number")),
        temporal_position=_opt_text(row.get("temporal_position_identifier")),
        sop_class_uid=_opt_text(row.get("sop_class_uid")),
        n_frames=_opt_int(row.get("number_of_frames")) or 1,
        rescale_slope=_opt_float(row.get("rescale_slope")),
        rescale_intercept=_opt_float(row.get("rescale_intercept")),
    )


def _series_uid(rows: Any) -> str:
    if isinstance(rows, pd.DataFrame):
        return str(rows["series_uid"].iloc[0]) if "series_uid" in rows and len(rows) else ""
    first = next(iter(rows), None)
    return str(first.get("series_uid") or "") if isinstance(first, Mapping) else ""


#: The index columns a :class:`SliceHeader` is made from.
HEADER_COLUMNS = (
    "path",
    "sop_instance_uid",
    "image_position",
    "image_orientation",
    "pixel_spacing_row",
    "pixel_spacing_col",
    "rows",
    "columns",
    "slice_thickness",
    "instance_number",
    "acquisition_number",
    "temporal_position_identifier",
    "sop_class_uid",
    "number_of_frames",
    "rescale_slope",
    "rescale_intercept",
)


def _headers(rows: Any) -> list[SliceHeader]:
    if isinstance(rows, pd.DataFrame):
        # Only the header columns: converting all ~80 index columns per row dominated planning time.
        records: Iterable[Any] = rows[[c for c in HEADER_COLUMNS if c in rows.columns]].to_dict("records")
    else:
        records = rows
    return [r if isinstance(r, SliceHeader) else header_from_row(r) for r in records]


# --------------------------------------------------------------------------- checks


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def _fmt(values: Iterable[float], limit: int = 5) -> str:
    items = [f"{v:.2f}" for v in values]
    return ", ".join(items[:limit]) + (f", … ({len(items)} in all)" if len(items) > limit else "")


def _orientation_label(normal: np.ndarray) -> tuple[Orientation, float]:
    axis = int(np.argmax(np.abs(normal)))
    angle = math.degrees(math.acos(min(1.0, float(abs(normal[axis])))))
    return (Orientation.SAGITTAL, Orientation.CORONAL, Orientation.AXIAL)[axis], angle


def _geometry_key(h: SliceHeader, tol: GeometryTolerances) -> tuple[Any, ...]:
    assert h.orientation is not None and h.pixel_spacing is not None
    digits_o = max(0, round(-math.log10(tol.orientation)) - 1)
    digits_s = max(0, round(-math.log10(tol.pixel_spacing)))
    return (
        tuple(round(v, digits_o) + 0.0 for v in h.orientation),
        h.rows,
        h.columns,
        tuple(round(v, digits_s) for v in h.pixel_spacing),
    )


def _describe_key(key: tuple[Any, ...], count: int) -> str:
    iop, rows, columns, spacing = key
    normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
    label, angle = _orientation_label(_unit(normal))
    tilt = f" ({angle:.1f}° off)" if angle > 0.5 else ""
    return f"{count} {label.value}{tilt} {rows}x{columns} at {spacing[0]:g}x{spacing[1]:g} mm"


def _dedupe_instances(headers: list[SliceHeader]) -> tuple[list[SliceHeader], int]:
    seen: set[tuple[str, int | None]] = set()
    kept = []
    for h in sorted(headers, key=lambda h: (h.path, h.frame if h.frame is not None else -1)):
        key = (h.sop_instance_uid, h.frame)
        if h.sop_instance_uid and key in seen:
            continue
        seen.add(key)
        kept.append(h)
    return kept, len(headers) - len(kept)


def _groups(headers: Sequence[SliceHeader], attribute: str) -> dict[str | None, list[SliceHeader]]:
    out: dict[str | None, list[SliceHeader]] = {}
    for h in headers:
        out.setdefault(getattr(h, attribute), []).append(h)
    return out


def _along_normal(headers: Sequence[SliceHeader], normal: np.ndarray) -> np.ndarray:
    return np.array([np.asarray(h.position, dtype=np.float64) @ normal for h in headers])


def _shared_positions(groups: Sequence[Sequence[SliceHeader]], normal: np.ndarray, tol_mm: float) -> int:
    """How many positions of one group are also positions of another group."""
    sets = [np.sort(_along_normal(g, normal)) for g in groups]
    shared = 0
    for i, a in enumerate(sets):
        others = np.sort(np.concatenate([b for j, b in enumerate(sets) if j != i] or [np.empty(0)]))
        if others.size == 0:
            continue
        idx = np.clip(np.searchsorted(others, a), 1, max(others.size - 1, 1))
        near = np.minimum(np.abs(others[idx - 1] - a), np.abs(others[np.minimum(idx, others.size - 1)] - a))
        shared += int(np.sum(near < tol_mm))
    return shared


def _sequence_issue(
    headers: Sequence[SliceHeader],
    attribute: str,
    flag: GeometryFlag,
    name: str,
    normal: np.ndarray,
    tol_mm: float,
) -> GeometryIssue | None:
    groups = _groups(headers, attribute)
    if len(groups) < 2:
        return None
    labels = sorted(groups, key=lambda v: (v is None, _natural(v)))
    counts = ", ".join(f"{v if v is not None else 'none'} ({len(groups[v])})" for v in labels)
    shared = _shared_positions([groups[v] for v in labels], normal, tol_mm)
    overlap = f"; they share {shared} slice positions" if shared else "; they tile the stack without overlap"
    return GeometryIssue(
        flag, float(len(groups)), "count", f"{len(groups)} {name}s in one series: {counts}{overlap}"
    )


def _natural(value: str | None) -> tuple[Any, ...]:
    text = value or ""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def check_series_geometry(
    rows: Any, *, series_uid: str = "", tolerances: GeometryTolerances | None = None
) -> SeriesGeometry:
    """Check the geometry of one series from its headers; no pixel data is read.

    ``rows`` are index rows (a DataFrame or mappings with the columns of
    ``cohort.index.schema.INSTANCE_SCHEMA``; ``acquisition_number``,
    ``temporal_position_identifier`` and ``number_of_frames`` are used when present) or
    :class:`SliceHeader` objects. The series is checked as one stack; see
    :func:`split_series` for the parts a mixed series is better read as.
    """
    tol = tolerances or GeometryTolerances()
    headers = _headers(rows)
    return _analyse(headers, series_uid or _series_uid(rows), tol)


def _analyse(headers: list[SliceHeader], series_uid: str, tol: GeometryTolerances) -> SeriesGeometry:
    issues: list[GeometryIssue] = []
    n_instances = len({(h.path, h.sop_instance_uid) for h in headers})
    headers, copies = _dedupe_instances(headers)
    if copies:
        issues.append(
            GeometryIssue(
                GeometryFlag.DUPLICATE_INSTANCES,
                float(copies),
                "count",
                f"{copies} extra cop{'y' if copies == 1 else 'ies'} of an instance (same SOPInstanceUID); "
                "the first is kept",
            )
        )
    thickness_values = [h.slice_thickness for h in headers if h.slice_thickness is not None]
    thickness = float(np.median(thickness_values)) if thickness_values else None
    first = headers[0] if headers else None
    base: dict[str, Any] = {
        "series_uid": series_uid,
        "n_instances": n_instances,
        "n_slices": len(headers),
        "orientation": Orientation.UNKNOWN,
        "obliquity_deg": None,
        "rows": first.rows if first else None,
        "columns": first.columns if first else None,
        "pixel_spacing": first.pixel_spacing if first else None,
        "slice_spacing": None,
        "slice_thickness": thickness,
        "extent_mm": None,
    }

    def done() -> SeriesGeometry:
        return SeriesGeometry(**base, issues=tuple(issues))

    if not headers:
        issues.append(GeometryIssue(GeometryFlag.SINGLE_SLICE, 0.0, "count", "no slice"))
        return done()
    classic = [h for h in headers if h.n_frames > 1 and not h.enhanced and h.frame is None]
    if classic:
        issues.append(
            GeometryIssue(
                GeometryFlag.UNSUPPORTED_MULTI_FRAME,
                float(sum(h.n_frames for h in classic)),
                "frames",
                f"{len(classic)} multi-frame instance(s) without per-frame functional groups "
                f"({classic[0].n_frames} frames, SOP class {classic[0].sop_class_uid})",
            )
        )
        return done()
    unexpanded = [h for h in headers if h.enhanced and h.frame is None]
    if unexpanded:
        frames = sum(h.n_frames for h in unexpanded)
        base["n_slices"] = frames + len(headers) - len(unexpanded)
        issues.append(
            GeometryIssue(
                GeometryFlag.MULTI_FRAME,
                float(frames),
                "frames",
                f"{len(unexpanded)} enhanced multi-frame instance(s)"
                + (f" with {frames} frames" if frames > len(unexpanded) else "")
                + "; per-frame geometry is in the functional groups and is checked when read",
            )
        )
        return done()
    if any(h.frame is not None for h in headers):
        issues.append(
            GeometryIssue(
                GeometryFlag.MULTI_FRAME,
                float(len(headers)),
                "frames",
                f"enhanced multi-frame: {len(headers)} frames in {n_instances} instance(s)",
            )
        )

    incomplete = [
        h for h in headers if h.position is None or h.orientation is None or h.pixel_spacing is None
    ]
    if incomplete:
        issues.append(
            GeometryIssue(
                GeometryFlag.MISSING_GEOMETRY,
                float(len(incomplete)),
                "count",
                f"missing or malformed geometry tag (ImagePositionPatient, ImageOrientationPatient or "
                f"PixelSpacing) on {len(incomplete)} of {len(headers)} slices, e.g. {incomplete[0].path}",
            )
        )
        return done()

    keys: dict[tuple[Any, ...], list[SliceHeader]] = {}
    for h in headers:
        keys.setdefault(_geometry_key(h, tol), []).append(h)
    if len(keys) > 1:
        orientations = {k[0] for k in keys}
        sizes = {(k[1], k[2]) for k in keys}
        spacings = {k[3] for k in keys}
        described = "; ".join(_describe_key(k, len(v)) for k, v in sorted(keys.items(), key=_key_order))
        if len(orientations) > 1:
            issues.append(
                GeometryIssue(
                    GeometryFlag.MIXED_ORIENTATIONS,
                    float(len(orientations)),
                    "count",
                    f"mixed slice orientations in one series ({len(orientations)}): {described}",
                )
            )
        if len(sizes) > 1:
            shown = " and ".join(f"{r}x{c}" for r, c in sorted(sizes, key=lambda s: (s[0] or 0, s[1] or 0)))
            issues.append(
                GeometryIssue(
                    GeometryFlag.MIXED_SIZES, float(len(sizes)), "count", f"mixed slice sizes: {shown}"
                )
            )
        if len(spacings) > 1:
            shown = " and ".join(f"{a:g}x{b:g} mm" for a, b in sorted(spacings))
            issues.append(
                GeometryIssue(
                    GeometryFlag.MIXED_PIXEL_SPACING,
                    float(len(spacings)),
                    "count",
                    f"mixed pixel spacings: {shown}",
                )
            )
        return done()

    assert first is not None and first.orientation is not None and first.pixel_spacing is not None
    iop = np.asarray(first.orientation, dtype=np.float64)
    row, col = _unit(iop[:3]), _unit(iop[3:])
    between = math.degrees(math.acos(max(-1.0, min(1.0, float(row @ col)))))
    if abs(between - 90.0) > tol.perpendicular_deg:
        issues.append(
            GeometryIssue(
                GeometryFlag.NON_ORTHOGONAL,
                between,
                "degrees",
                f"row and column direction cosines are {between:.3f}° apart, not 90°",
            )
        )
        return done()
    normal = _unit(np.cross(row, col))
    label, obliquity = _orientation_label(normal)
    base["orientation"], base["obliquity_deg"] = label, obliquity
    if obliquity > tol.oblique_deg:
        issues.append(
            GeometryIssue(
                GeometryFlag.OBLIQUE,
                obliquity,
                "degrees",
                f"slice normal is {obliquity:.2f}° from the {label} axis",
            )
        )

    for attribute, flag, name in (
        ("acquisition", GeometryFlag.MULTIPLE_ACQUISITIONS, "acquisition"),
        ("temporal_position", GeometryFlag.MULTIPLE_TEMPORAL_POSITIONS, "temporal position"),
    ):
        found = _sequence_issue(headers, attribute, flag, name, normal, tol.duplicate_mm)
        if found is not None:
            issues.append(found)

    s = _along_normal(headers, normal)
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    # Positions within duplicate_mm of the previous one are the same position.
    new_position = np.concatenate([[True], np.diff(s_sorted) >= tol.duplicate_mm])
    unique = s_sorted[new_position]
    n_dup_positions = int(np.sum(np.diff(np.flatnonzero(np.concatenate([new_position, [True]]))) > 1))
    base["n_slices"] = int(unique.size)
    if n_dup_positions:
        starts = np.flatnonzero(new_position)
        counts = np.diff(np.concatenate([starts, [s_sorted.size]]))
        where = unique[counts > 1]
        issues.append(
            GeometryIssue(
                GeometryFlag.DUPLICATE_POSITIONS,
                float(n_dup_positions),
                "positions",
                f"duplicate slice position: {n_dup_positions} position(s) hold more than one slice "
                f"({int(np.sum(counts) - unique.size)} extra), at {_fmt(where)} mm along the normal",
                tuple(float(v) for v in where),
            )
        )
    if unique.size < 2:
        issues.append(
            GeometryIssue(
                GeometryFlag.SINGLE_SLICE, float(unique.size), "count", f"{unique.size} slice position(s)"
            )
        )
        return done()

    gaps = np.diff(unique)
    spacing = float(np.median(gaps))
    base["slice_spacing"] = spacing
    base["extent_mm"] = float(unique[-1] - unique[0])
    missing = gaps > tol.missing_factor * spacing
    if np.any(missing):
        counts = np.maximum(np.round(gaps[missing] / spacing).astype(int) - 1, 1)
        starts = unique[:-1][missing]
        ends = unique[1:][missing]
        where = ", ".join(
            f"{int(c)} between {a:.2f} and {b:.2f} mm"
            for c, a, b in zip(counts[:5], starts, ends, strict=False)
        )
        total = int(counts.sum())
        issues.append(
            GeometryIssue(
                GeometryFlag.MISSING_SLICES,
                float(total),
                "slices",
                f"missing slices: {total} missing at median spacing {spacing:.3f} mm ({where}"
                + (", …)" if counts.size > 5 else ")"),
                tuple(float(v) for v in starts),
            )
        )
    deviation = np.abs(gaps - spacing)
    irregular = ~missing & (deviation > tol.spacing * spacing)
    if np.any(irregular):
        worst = float(deviation[irregular].max())
        shorter, longer = np.any(gaps[irregular] < spacing), np.any(gaps[irregular] > spacing)
        kind = "uneven" if shorter and longer else "overlapping" if shorter else "stretched"
        issues.append(
            GeometryIssue(
                GeometryFlag.IRREGULAR_SPACING,
                worst,
                "mm",
                f"irregular slice spacing ({kind}): gaps from {gaps[~missing].min():.3f} to "
                f"{gaps[~missing].max():.3f} mm around the median {spacing:.3f} mm, largest deviation "
                f"{worst:.3f} mm at {_fmt(unique[:-1][irregular])} mm",
                tuple(float(v) for v in unique[:-1][irregular]),
            )
        )
    if thickness is not None and spacing < (1.0 - tol.spacing) * thickness:
        issues.append(
            GeometryIssue(
                GeometryFlag.OVERLAPPING_SLICES,
                thickness - spacing,
                "mm",
                f"slices {thickness:g} mm thick every {spacing:.3f} mm overlap "
                f"by {thickness - spacing:.3f} mm",
            )
        )

    positions = np.array([h.position for h in headers], dtype=np.float64)[order]
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    shift = np.linalg.norm(in_plane, axis=1)
    k = int(np.argmax(shift))
    if shift[k] > tol.tilt_pixels * min(first.pixel_spacing):
        far = int(np.argmax(np.abs(s_sorted - s_sorted[0])))
        along = abs(float(s_sorted[far] - s_sorted[0]))
        angle = math.degrees(math.atan2(float(shift[far]), along)) if along > 0 else 90.0
        issues.append(
            GeometryIssue(
                GeometryFlag.GANTRY_TILT,
                angle,
                "degrees",
                f"gantry tilt or sheared stack: the stack leans {angle:.2f}° from the slice normal "
                f"(slices offset in-plane by up to {shift[k]:.2f} mm over {along:.1f} mm)",
            )
        )
    return done()


def _key_order(item: tuple[tuple[Any, ...], list[SliceHeader]]) -> tuple[Any, ...]:
    key, members = item
    return (-len(members), str(key))


# --------------------------------------------------------------------------- split


def _part_name(prefix: str, value: str | None) -> str:
    text = re.sub(r"[^A-Za-z0-9]+", "", value or "") or "none"
    return f"{prefix}{text}"


def split_series(
    rows: Any,
    *,
    series_uid: str = "",
    tolerances: GeometryTolerances | None = None,
    split: bool = True,
) -> SeriesSplit:
    """The geometry of a whole series and the sub-series it is best read as.

    A series is split (each part with the reason) when

    - its slices have several geometries (orientation, size or pixel spacing):
      one part per geometry, ``#geo1``, ``#geo2``, … (largest first);
    - it holds several acquisitions (AcquisitionNumber) or temporal positions
      whose slice positions coincide, i.e. each covers the stack again: one part
      per acquisition (``#acq2``) or temporal position (``#t3``). Acquisitions
      that tile the stack without shared positions are read as one volume.

    Enhanced multi-frame instances are not split (their frames are not in the
    index); ``split=False`` keeps every series whole.
    """
    tol = tolerances or GeometryTolerances()
    headers = _headers(rows)
    uid = series_uid or _series_uid(rows)
    whole = _analyse(list(headers), uid, tol)

    def one(part_headers: list[SliceHeader], parts: list[str], reason: str) -> SubSeries:
        part = "-".join(parts)
        key = f"{uid}#{part}" if part else uid
        paths = tuple(sorted({h.path for h in part_headers}))
        return SubSeries(key, uid, part, paths, reason, _analyse(part_headers, key, tol))

    if (
        not split
        or not headers
        or GeometryFlag.MULTI_FRAME in whole.flags
        or GeometryFlag.MISSING_GEOMETRY in whole.flags
        or GeometryFlag.NON_ORTHOGONAL in whole.flags
    ):
        return SeriesSplit(whole, (one(headers, [], ""),))

    pieces: list[tuple[list[SliceHeader], list[str], list[str]]] = [(headers, [], [])]
    mixed = {GeometryFlag.MIXED_ORIENTATIONS, GeometryFlag.MIXED_SIZES, GeometryFlag.MIXED_PIXEL_SPACING}
    if mixed & set(whole.flags):
        keys: dict[tuple[Any, ...], list[SliceHeader]] = {}
        for h in headers:
            keys.setdefault(_geometry_key(h, tol), []).append(h)
        ordered = sorted(keys.items(), key=_key_order)
        summary = "; ".join(f"geo{i} = {_describe_key(k, len(v))}" for i, (k, v) in enumerate(ordered, 1))
        pieces = [
            (members, [f"geo{i}"], [f"mixed geometries in one series, one sub-series each ({summary})"])
            for i, (_, members) in enumerate(ordered, 1)
        ]

    for attribute, prefix, name in (
        ("acquisition", "acq", "acquisitions (AcquisitionNumber)"),
        ("temporal_position", "t", "temporal positions"),
    ):
        next_pieces = []
        for members, parts, reasons in pieces:
            groups = _groups(members, attribute)
            if len(groups) < 2:
                next_pieces.append((members, parts, reasons))
                continue
            first = members[0]
            assert first.orientation is not None
            iop = np.asarray(first.orientation, dtype=np.float64)
            normal = _unit(np.cross(_unit(iop[:3]), _unit(iop[3:])))
            labels = sorted(groups, key=lambda v: (v is None, _natural(v)))
            shared = _shared_positions([groups[v] for v in labels], normal, tol.duplicate_mm)
            if not shared:
                next_pieces.append((members, parts, reasons))
                continue
            shown = ", ".join(f"{v if v is not None else 'none'} ({len(groups[v])} slices)" for v in labels)
            why = f"{len(groups)} {name} that cover the same positions ({shared} shared): {shown}"
            for v in labels:
                next_pieces.append((groups[v], [*parts, _part_name(prefix, v)], [*reasons, why]))
        pieces = next_pieces

    if len(pieces) == 1:
        return SeriesSplit(whole, (one(headers, [], ""),))
    return SeriesSplit(whole, tuple(one(m, p, "; ".join(r)) for m, p, r in pieces))
