"""Curation: series assembly, geometry QC, quality checks, RTSTRUCT masks, ROI-name harmonisation, selection.

DICOM-SEG reading lives in :mod:`cohort.curate.seg` (imported on use: it loads highdicom).
"""

from cohort.curate.geometry import (
    GeometryFlag,
    GeometryIssue,
    ReadPolicy,
    SeriesGeometry,
    SubSeries,
    check_series_geometry,
    split_series,
)
from cohort.curate.qc import QcCheck, SeriesQc, check_series_quality, qc_table
from cohort.curate.rtstruct import (
    RoiInfo,
    RoiKind,
    RoiMask,
    rasterise_contours,
    rasterise_rtstruct,
    read_roi_infos,
)
from cohort.curate.select import (
    CurationPlan,
    LinkMethod,
    WorkItem,
    harmonise_roi_name,
    plan_cohort,
    plan_work,
)
from cohort.curate.series import SeriesVolume, assemble_series, read_series

__all__ = [
    "CurationPlan",
    "GeometryFlag",
    "GeometryIssue",
    "LinkMethod",
    "QcCheck",
    "ReadPolicy",
    "RoiInfo",
    "RoiKind",
    "RoiMask",
    "SeriesGeometry",
    "SeriesQc",
    "SeriesVolume",
    "SubSeries",
    "WorkItem",
    "assemble_series",
    "check_series_geometry",
    "check_series_quality",
    "harmonise_roi_name",
    "plan_cohort",
    "plan_work",
    "qc_table",
    "rasterise_contours",
    "rasterise_rtstruct",
    "read_roi_infos",
    "read_series",
    "split_series",
]
