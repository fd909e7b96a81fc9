"""Quality checks of image series from the index alone, one pass/fail with a reason per check.

Each (sub-)series gets one :class:`SeriesQc`: a :class:`CheckResult` for every
:class:`QcCheck`, in a fixed order, so the QC table (:func:`qc_table`) has one
row per series and one column per check plus its reason. The limits come from
the ``qc:`` section of the cohort spec; an unset limit passes and says so.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import pandas as pd
import pyarrow as pa

from cohort.curate.geometry import (
    DuplicateAction,
    GeometryFlag,
    GeometryTolerances,
    ReadPolicy,
    SeriesGeometry,
    SpacingAction,
    TiltAction,
)
from cohort.spec import CohortSpec, QcSpec, RangeSpec


class QcCheck(StrEnum):
    """The checks every image series goes through, in table order."""

    MODALITY = "modality"
    ORIENTATION = "orientation"
    SLICE_THICKNESS = "slice_thickness"
    SLICE_COUNT = "slice_count"
    PIXEL_SPACING = "pixel_spacing"
    IN_PLANE_SIZE = "in_plane_size"
    KERNEL = "kernel"
    RESCALE = "rescale"
    CONTRAST = "contrast"
    GEOMETRY = "geometry"


@dataclass(frozen=True)
class CheckResult:
    check: QcCheck
    passed: bool
    reason: str


@dataclass(frozen=True)
class SeriesQc:
    """The QC of one (sub-)series: its identity, its geometry and one result per check."""

    patient_id: str | None
    study_uid: str | None
    series_uid: str
    series_key: str
    part: str
    modality: str | None
    n_instances: int
    geometry: SeriesGeometry
    convolution_kernel: str | None
    contrast_agent: str | None
    results: tuple[CheckResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        return tuple(r for r in self.results if not r.passed)

    def result(self, check: QcCheck) -> CheckResult:
        return next(r for r in self.results if r.check == check)

    @property
    def reason(self) -> str:
        """The failed checks and why, or ``passed``."""
        if self.passed:
            return "passed"
        return "; ".join(f"{r.check.value}: {r.reason}" for r in self.failures)


def geometry_tolerances(qc: QcSpec) -> GeometryTolerances:
    geometry = qc.geometry
    return GeometryTolerances(
        spacing=geometry.max_spacing_deviation,
        missing_factor=geometry.missing_slice_factor,
        tilt_pixels=geometry.max_tilt_pixels,
    )


def read_policy(qc: QcSpec) -> ReadPolicy:
    """The reader's policy for the geometry findings, from the ``qc.geometry`` spec."""
    geometry = qc.geometry
    return ReadPolicy(
        irregular_spacing=SpacingAction(geometry.irregular_spacing),
        gantry_tilt=TiltAction(geometry.gantry_tilt),
        duplicate_positions=DuplicateAction(geometry.duplicate_positions),
        tolerances=geometry_tolerances(qc),
    )


def accepted_modalities(spec: CohortSpec) -> tuple[str, ...]:
    return tuple(spec.qc.modality) if spec.qc.modality else (spec.selection.modality,)


def _range(
    check: QcCheck, name: str, values: Sequence[float | None], limits: RangeSpec, unit: str
) -> CheckResult:
    present = [v for v in values if v is not None]
    shown = " x ".join(f"{v:g}" for v in present) + unit
    if not limits.limited:
        return CheckResult(check, True, f"{shown} (no limit)" if present else f"no {name} (no limit)")
    if len(present) < len(values) or not present:
        return CheckResult(check, False, f"no {name}; required in {limits}")
    if all(limits.contains(v) for v in present):
        return CheckResult(check, True, f"{shown} in {limits}")
    return CheckResult(check, False, f"{name} {shown} outside {limits}")


def _distinct_text(rows: pd.DataFrame, column: str) -> list[str]:
    if column not in rows:
        return []
    values = [v for v in rows[column].tolist() if isinstance(v, str) and v.strip()]
    return sorted(set(values))


def _has_contrast(rows: pd.DataFrame, qc: QcSpec) -> tuple[bool, str]:
    none_values = {v.strip().lower() for v in qc.no_contrast_values}
    agents = [v for v in _distinct_text(rows, "contrast_agent") if v.strip().lower() not in none_values]
    if agents:
        return True, f"ContrastBolusAgent {', '.join(repr(a) for a in agents)}"
    return False, "no contrast agent recorded"


def _geometry_result(geometry: SeriesGeometry, policy: ReadPolicy) -> CheckResult:
    refusal = policy.refusal(geometry)
    if refusal is not None:
        return CheckResult(QcCheck.GEOMETRY, False, refusal)
    if not geometry.issues:
        return CheckResult(QcCheck.GEOMETRY, True, "regular")
    notes = []
    for issue in geometry.issues:
        repaired = "" if issue.informational else " (repaired when read)"
        notes.append(f"{issue}{repaired}")
    return CheckResult(QcCheck.GEOMETRY, True, "; ".join(notes))


def check_series_quality(
    rows: pd.DataFrame, geometry: SeriesGeometry, spec: CohortSpec, *, series_key: str = "", part: str = ""
) -> SeriesQc:
    """Run every :class:`QcCheck` on the index rows of one (sub-)series and its geometry."""
    qc = spec.qc
    first = rows.iloc[0]
    modality = first.get("modality")
    multi_frame = geometry.issue(GeometryFlag.MULTI_FRAME) is not None
    frames_known = multi_frame and "number_of_frames" in rows and rows["number_of_frames"].notna().all()
    results: list[CheckResult] = []

    accepted = accepted_modalities(spec)
    if modality in accepted:
        results.append(CheckResult(QcCheck.MODALITY, True, str(modality)))
    else:
        results.append(
            CheckResult(QcCheck.MODALITY, False, f"modality {modality} is not {' or '.join(accepted)}")
        )

    label = geometry.orientation.value
    oblique = geometry.obliquity_deg
    orientation_ok = qc.orientation is None or label in qc.orientation
    obliquity_ok = qc.max_obliquity_deg is None or (oblique is not None and oblique <= qc.max_obliquity_deg)
    shown = label + (f" ({oblique:.2f}° off axis)" if oblique else "")
    if orientation_ok and obliquity_ok:
        limit = "" if qc.orientation is None and qc.max_obliquity_deg is None else " accepted"
        results.append(CheckResult(QcCheck.ORIENTATION, True, shown + (limit or " (no limit)")))
    else:
        wanted = ", ".join(qc.orientation) if qc.orientation else "any orientation"
        if qc.max_obliquity_deg is not None:
            wanted += f" within {qc.max_obliquity_deg:g}° of its axis"
        results.append(CheckResult(QcCheck.ORIENTATION, False, f"{shown}; accepted: {wanted}"))

    results.append(
        _range(
            QcCheck.SLICE_THICKNESS, "SliceThickness", [geometry.slice_thickness], qc.slice_thickness, " mm"
        )
    )
    if multi_frame and not frames_known:
        results.append(
            CheckResult(
                QcCheck.SLICE_COUNT,
                True,
                "not checked: the frames of a multi-frame object are not in the index",
            )
        )
    else:
        results.append(
            _range(QcCheck.SLICE_COUNT, "slice count", [float(geometry.n_slices)], qc.slice_count, " slices")
        )
    spacing = geometry.pixel_spacing
    results.append(
        _range(
            QcCheck.PIXEL_SPACING,
            "PixelSpacing",
            [spacing[0], spacing[1]] if spacing else [None, None],
            qc.pixel_spacing,
            " mm",
        )
    )
    size = [float(v) if v is not None else None for v in (geometry.rows, geometry.columns)]
    results.append(_range(QcCheck.IN_PLANE_SIZE, "Rows x Columns", size, qc.in_plane_size, " pixels"))

    kernels = _distinct_text(rows, "convolution_kernel")
    if not qc.kernels:
        results.append(CheckResult(QcCheck.KERNEL, True, f"{', '.join(kernels) or 'no kernel'} (no limit)"))
    elif not kernels:
        results.append(
            CheckResult(QcCheck.KERNEL, False, f"no ConvolutionKernel; accepted: {', '.join(qc.kernels)}")
        )
    else:
        rejected = [
            k for k in kernels if not any(re.fullmatch(p, k, flags=re.IGNORECASE) for p in qc.kernels)
        ]
        if rejected:
            results.append(
                CheckResult(
                    QcCheck.KERNEL,
                    False,
                    f"kernel {', '.join(rejected)} not accepted ({', '.join(qc.kernels)})",
                )
            )
        else:
            results.append(CheckResult(QcCheck.KERNEL, True, f"{', '.join(kernels)} accepted"))

    if not qc.require_rescale:
        results.append(CheckResult(QcCheck.RESCALE, True, "not required"))
    elif multi_frame:
        results.append(CheckResult(QcCheck.RESCALE, True, "not checked: multi-frame rescale is per frame"))
    else:
        lacking = int((rows["rescale_slope"].isna() | rows["rescale_intercept"].isna()).sum())
        if lacking:
            results.append(
                CheckResult(
                    QcCheck.RESCALE,
                    False,
                    f"{lacking} of {len(rows)} instances lack RescaleSlope or RescaleIntercept",
                )
            )
        else:
            results.append(CheckResult(QcCheck.RESCALE, True, "RescaleSlope and RescaleIntercept present"))

    contrast, why = _has_contrast(rows, qc)
    if qc.contrast == "any":
        results.append(CheckResult(QcCheck.CONTRAST, True, f"{why} (any accepted)"))
    elif (qc.contrast == "with") == contrast:
        results.append(CheckResult(QcCheck.CONTRAST, True, why))
    else:
        results.append(CheckResult(QcCheck.CONTRAST, False, f"{why}; required: {qc.contrast} contrast"))

    results.append(_geometry_result(geometry, read_policy(qc)))
    series_uid = str(first.get("series_uid"))
    return SeriesQc(
        patient_id=_text(first.get("patient_id")),
        study_uid=_text(first.get("study_uid")),
        series_uid=series_uid,
        series_key=series_key or series_uid,
        part=part,
        modality=_text(modality),
        n_instances=len(rows),
        geometry=geometry,
        convolution_kernel=", ".join(kernels) or None,
        contrast_agent=", ".join(_distinct_text(rows, "contrast_agent")) or None,
        results=tuple(results),
    )


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    return str(value)


_str, _f64 = pa.string(), pa.float64()
QC_SCHEMA = pa.schema(
    [
        ("patient_id", _str),
        ("study_uid", _str),
        ("series_uid", _str),
        ("series_key", _str),
        ("part", _str),
        ("modality", _str),
        ("n_instances", pa.int64()),
        ("n_slices", pa.int64()),
        ("orientation", _str),
        ("obliquity_deg", _f64),
        ("slice_thickness", _f64),
        ("slice_spacing", _f64),
        ("pixel_spacing_row", _f64),
        ("pixel_spacing_col", _f64),
        ("rows", pa.int32()),
        ("columns", pa.int32()),
        ("convolution_kernel", _str),
        ("contrast_agent", _str),
        ("geometry_flags", pa.list_(_str)),
        *[
            field
            for check in QcCheck
            for field in ((f"qc_{check}", pa.bool_()), (f"qc_{check}_reason", _str))
        ],
        ("passed", pa.bool_()),
        ("reason", _str),
    ]
)


def qc_row(record: SeriesQc) -> dict[str, Any]:
    g = record.geometry
    row: dict[str, Any] = {
        "patient_id": record.patient_id,
        "study_uid": record.study_uid,
        "series_uid": record.series_uid,
        "series_key": record.series_key,
        "part": record.part or None,
        "modality": record.modality,
        "n_instances": record.n_instances,
        "n_slices": g.n_slices,
        "orientation": g.orientation.value,
        "obliquity_deg": g.obliquity_deg,
        "slice_thickness": g.slice_thickness,
        "slice_spacing": g.slice_spacing,
        "pixel_spacing_row": g.pixel_spacing[0] if g.pixel_spacing else None,
        "pixel_spacing_col": g.pixel_spacing[1] if g.pixel_spacing else None,
        "rows": g.rows,
        "columns": g.columns,
        "convolution_kernel": record.convolution_kernel,
        "contrast_agent": record.contrast_agent,
        "geometry_flags": [flag.value for flag in g.flags],
    }
    for result in record.results:
        row[f"qc_{result.check}"] = result.passed
        row[f"qc_{result.check}_reason"] = result.reason
    row["passed"] = record.passed
    row["reason"] = record.reason
    return row


def qc_table(records: Sequence[SeriesQc]) -> pa.Table:
    """One row per (sub-)series: identity, geometry, one column and one reason per check."""
    return pa.Table.from_pylist([qc_row(r) for r in records], schema=QC_SCHEMA)
