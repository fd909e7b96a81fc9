"""The segmentation stage over a cohort: one case = one selected CT; rows for the store.

:func:`segment_items` is the shard worker of the ``segment-cohort`` flow: per case
it reads the series, runs the model (one cached session per worker process),
measures the primary tumour and, when the case's structure set has the reference
ROI, compares the two (Dice, HD95, surface Dice, added path length). One failing
case becomes a failure row; the others go on. :func:`summarise_metrics` gives the
distribution the seed reported: median and IQR, by slice thickness and tumour size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from cohort.curate.convert import write_mask
from cohort.curate.rtstruct import rasterise_rtstruct, read_roi_infos
from cohort.curate.select import WorkItem
from cohort.curate.series import assemble_series
from cohort.errors import CohortError, Stage
from cohort.index.source import read_dicom
from cohort.segment.metrics import DEFAULT_TOLERANCE_MM, segmentation_metrics_image
from cohort.segment.model import ModelSpec, load_model
from cohort.segment.pipeline import segment_case

#: Key of a segmentation row: one per (image series, model file).
SEGMENT_KEY_COLUMNS = ("series_uid", "model_sha256")


@dataclass(frozen=True)
class SegmentSettings:
    """What every segmentation shard needs (small, picklable)."""

    model: str  # registry name or folder
    run_id: str
    compare_to: str | None = "GTV"  # canonical reference ROI; None: no comparison
    tolerance_mm: float = DEFAULT_TOLERANCE_MM
    batch_size: int = 16
    masks_dir: str | None = None  # local folder for NIfTI masks (named by series UID), or None


@dataclass(frozen=True)
class SegmentShardResult:
    rows: list[dict[str, Any]]
    failures: list[dict[str, Any]]


def segment_items(items: Sequence[WorkItem], settings: SegmentSettings) -> SegmentShardResult:
    """Segment every item; a failure of one case is recorded and never stops the others."""
    model = load_model(settings.model)
    rows, failures = [], []
    for item in items:
        try:
            rows.append(_segment_one(item, model, settings))
        except Exception as exc:  # recorded per case, with its stage and reason
            stage = exc.stage if isinstance(exc, CohortError) else Stage.SEGMENT
            failures.append(
                {
                    "run_id": settings.run_id,
                    "series_uid": item.series_uid,
                    "patient_id": item.patient_id,
                    "stage": stage.value,
                    "error_type": type(exc).__name__,
                    "reason": str(exc),
                    "failed_at": datetime.now(UTC),
                }
            )
    return SegmentShardResult(rows, failures)


def _segment_one(item: WorkItem, model: ModelSpec, settings: SegmentSettings) -> dict[str, Any]:
    t0 = time.perf_counter()
    image = assemble_series(item.image_paths, series_uid=item.series_uid, policy=item.read_policy).image
    read_s = time.perf_counter() - t0
    result = segment_case(image, model, batch_size=settings.batch_size, subject=item.series_uid)
    row: dict[str, Any] = {
        "patient_id": item.patient_id,
        "study_uid": item.study_uid,
        "series_uid": item.series_uid,
        "slice_thickness": item.metadata.get("slice_thickness"),
        "n_slices": item.n_slices,
        "image_hash": item.image_hash,
        "run_id": settings.run_id,
        "processed_at": datetime.now(UTC),
        "seconds_read": read_s,
        **result.as_row(),
    }
    if settings.masks_dir:
        write_mask(result.mask, Path(settings.masks_dir) / f"{item.series_uid}.nii.gz")
    reference = next((r for r in item.rois if r.canonical == settings.compare_to), None)
    if reference is not None and item.rtstruct_path:
        structure_set = read_dicom(item.rtstruct_path)
        number = next(i.number for i in read_roi_infos(structure_set) if i.name == reference.source_name)
        truth = rasterise_rtstruct(structure_set, number, image)
        metrics = segmentation_metrics_image(truth.mask, result.mask, tolerance_mm=settings.tolerance_mm)
        row |= {
            "reference_roi": reference.source_name,
            "reference_volume_ml": truth.voxel_count * _voxel_ml(image),
            "dice": metrics.dice,
            "jaccard": metrics.jaccard,
            "hd95_mm": metrics.hd95_mm,
            "surface_dice": metrics.surface_dice,
            "surface_dice_tolerance_mm": metrics.tolerance_mm,
            "apl_mm": metrics.apl_mm,
        }
    return row


def _voxel_ml(image: Any) -> float:
    sx, sy, sz = image.GetSpacing()
    return float(sx * sy * sz) / 1000.0


def summarise_metrics(
    table: pd.DataFrame, metrics: Sequence[str] = ("dice", "hd95_mm", "surface_dice")
) -> pd.DataFrame:
    """Median and IQR of each metric: overall, by slice thickness, and by reference tumour size (tertiles)."""
    compared = table.dropna(subset=[metrics[0]]) if metrics[0] in table else table.iloc[0:0]
    groups: list[tuple[str, str, pd.DataFrame]] = [("all", "all", compared)]
    if not compared.empty:
        for thickness, part in compared.groupby(compared["slice_thickness"].round(2), dropna=True):
            groups.append(("slice thickness (mm)", f"{thickness:g}", part))
        if compared["reference_volume_ml"].nunique() >= 3:
            sizes = pd.qcut(compared["reference_volume_ml"], 3, labels=["small", "medium", "large"])
            for size, part in compared.groupby(sizes, observed=True):
                groups.append(("tumour size (tertile)", str(size), part))
    rows = []
    for stratum, value, part in groups:
        row: dict[str, Any] = {"stratum": stratum, "value": value, "cases": len(part)}
        for metric in metrics:
            series = part[metric] if metric in part else pd.Series(dtype=float)
            row[f"{metric}_median"] = series.median()
            row[f"{metric}_q1"] = series.quantile(0.25)
            row[f"{metric}_q3"] = series.quantile(0.75)
        rows.append(row)
    return pd.DataFrame(rows)
