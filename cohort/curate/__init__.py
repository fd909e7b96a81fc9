"""Curation: series assembly, RTSTRUCT masks, ROI-name harmonisation, selection."""

from cohort.curate.rtstruct import (
    RoiInfo,
    RoiMask,
    rasterise_contours,
    rasterise_rtstruct,
    read_roi_infos,
)
from cohort.curate.select import WorkItem, harmonise_roi_name, plan_work
from cohort.curate.series import read_series

__all__ = [
    "RoiInfo",
    "RoiMask",
    "WorkItem",
    "harmonise_roi_name",
    "plan_work",
    "rasterise_contours",
    "rasterise_rtstruct",
    "read_roi_infos",
    "read_series",
]
