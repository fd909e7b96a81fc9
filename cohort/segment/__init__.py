"""Segmentation: classical lung isolation and the metrics that compare masks."""

from cohort.segment.lung import LungIsolation, LungIsolationSettings, SpineAxis, isolate_lungs
from cohort.segment.metrics import (
    DEFAULT_TOLERANCE_MM,
    AddedPathLength,
    SegmentationMetrics,
    SurfaceDistances,
    added_path_length,
    dice,
    hausdorff95,
    jaccard,
    segmentation_metrics,
    segmentation_metrics_image,
    surface_dice,
    surface_distances,
)

__all__ = [
    "DEFAULT_TOLERANCE_MM",
    "AddedPathLength",
    "LungIsolation",
    "LungIsolationSettings",
    "SegmentationMetrics",
    "SpineAxis",
    "SurfaceDistances",
    "added_path_length",
    "dice",
    "hausdorff95",
    "isolate_lungs",
    "jaccard",
    "segmentation_metrics",
    "segmentation_metrics_image",
    "surface_dice",
    "surface_distances",
]
