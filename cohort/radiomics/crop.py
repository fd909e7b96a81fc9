"""Crop an image to its ROI, with a margin safe for the extraction, before pyradiomics.

pyradiomics resamples and filters whatever image it is given; on a planning CT
that is tens of millions of voxels for an ROI of a few thousand. The platform
crops first. The margin rule keeps every feature equal to uncropped extraction
as far as the operations allow:

* **With resampling** (``resampledPixelSpacing`` set), pyradiomics computes the
  new grid from the *mask* (its bounding box plus ``padDistance`` new voxels) and
  then filters only that grid. Only the image is cropped (the mask is passed
  whole, so the grid is the same to the last bit), with a margin of
  ``(padDistance + 1)`` target voxels plus the interpolator's reach in original
  voxels: 1 for nearest/linear, 4 for windowed-sinc kernels, and 24 for B-splines,
  whose prefilter has infinite support decaying as 0.268^n (0.268^24 ≈ 2e-14, below
  double rounding relative to the HU range).
* **Without resampling**, pyradiomics filters the whole image, so image and mask
  are cropped to the bounding box plus the largest filter reach: 6σ for LoG
  (Gaussian tail e^-18), ``2^level × filter length`` voxels for wavelets, 1 voxel for
  gradient/LBP, ``padDistance`` voxels otherwise. Original-image features are
  identical; filtered ones differ only by the filters' tails and border handling.
* A mask on another grid than the image is not cropped (pyradiomics resamples
  it onto the image itself).
* **Normalisation** (``normalize``) uses whole-image statistics, so the platform
  normalises the whole image with pyradiomics' own function first, then crops,
  and hands pyradiomics ``normalize: false``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

#: Interpolator reach, in original voxels, beyond which its influence is below rounding.
INTERPOLATOR_REACH = {
    "sitkNearestNeighbor": 1,
    "sitkLinear": 1,
    "sitkBSpline": 24,
    "sitkBSpline1": 1,
    "sitkBSpline2": 24,
    "sitkBSpline3": 24,
    "sitkBSpline4": 24,
    "sitkBSpline5": 24,
    "sitkGaussian": 8,
    "sitkLabelGaussian": 8,
    "sitkHammingWindowedSinc": 4,
    "sitkCosineWindowedSinc": 4,
    "sitkWelchWindowedSinc": 4,
    "sitkLanczosWindowedSinc": 4,
    "sitkBlackmanWindowedSinc": 4,
}
DEFAULT_PAD_DISTANCE = 5  # pyradiomics' default padDistance


@dataclass(frozen=True)
class CropPlan:
    """What was cropped and why, for provenance and the memory estimate."""

    margin_mm: float
    crop_mask: bool
    pre_normalised: bool
    size: tuple[int, int, int]


def _settings(params: Mapping[str, Any]) -> dict[str, Any]:
    return dict(params.get("setting") or {})


def filter_reach_mm(params: Mapping[str, Any], spacing: tuple[float, float, float]) -> float:
    """The farthest any enabled filter looks from a voxel, in mm."""
    settings = _settings(params)
    image_types = params.get("imageType") or {"Original": {}}
    voxel = max(spacing)
    reach = voxel * float(settings.get("padDistance", DEFAULT_PAD_DISTANCE))
    for name, custom in image_types.items():
        merged = {**settings, **(custom or {})}
        if name == "LoG":
            sigmas = merged.get("sigma") or [1.0]
            reach = max(reach, 6.0 * max(float(s) for s in sigmas) + voxel)
        elif name == "Wavelet":
            import pywt

            levels = int(merged.get("start_level", 0)) + int(merged.get("level", 1))
            length = pywt.Wavelet(str(merged.get("wavelet", "coif1"))).dec_len
            reach = max(reach, voxel * (2**levels) * length)
        elif name in ("Gradient", "LBP2D", "LBP3D"):
            reach = max(reach, voxel * 2)
    return reach


def _bounding_box(mask: sitk.Image, label: int) -> tuple[np.ndarray, np.ndarray]:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if label not in stats.GetLabels():
        raise ValueError(f"the mask has no voxel labelled {label}")
    box = stats.GetBoundingBox(label)
    return np.array(box[:3]), np.array(box[3:])


def same_grid(image: sitk.Image, mask: sitk.Image, tolerance: float = 1e-6) -> bool:
    """True when image and mask share size, origin, spacing and direction."""
    return bool(
        image.GetSize() == mask.GetSize()
        and np.allclose(image.GetOrigin(), mask.GetOrigin(), atol=tolerance)
        and np.allclose(image.GetSpacing(), mask.GetSpacing(), atol=tolerance)
        and np.allclose(image.GetDirection(), mask.GetDirection(), atol=tolerance)
    )


def _size(image: sitk.Image) -> tuple[int, int, int]:
    x, y, z = image.GetSize()
    return int(x), int(y), int(z)


def _crop_region(
    image: sitk.Image, index: np.ndarray, size: np.ndarray, margin_vox: np.ndarray
) -> sitk.Image:
    lower = np.maximum(index - margin_vox, 0)
    upper = np.minimum(index + size + margin_vox, np.array(image.GetSize()))
    return sitk.RegionOfInterest(image, [int(v) for v in upper - lower], [int(v) for v in lower])


def crop_for_extraction(
    image: sitk.Image, mask: sitk.Image, params: Mapping[str, Any]
) -> tuple[sitk.Image, sitk.Image, dict[str, Any], CropPlan]:
    """Crop ``image`` (and, without resampling, ``mask``) by the margin rule above.

    Returns the cropped image, the mask to hand over, the parameters to extract
    with (``normalize`` switched off when the platform normalised already) and
    the crop plan.
    """
    settings = _settings(params)
    label = int(settings.get("label", 1))
    out_params: dict[str, Any] = {key: value for key, value in params.items()}
    pre_normalised = bool(settings.get("normalize", False))
    if pre_normalised:
        from radiomics.imageoperations import normalizeImage

        image = normalizeImage(image, **settings)
        out_params["setting"] = {**settings, "normalize": False}
    index, size = _bounding_box(mask, label)
    spacing = np.array(image.GetSpacing())
    if not same_grid(image, mask):
        # A mask on another grid (pyradiomics resamples it onto the image itself):
        # no crop, so nothing can differ from uncropped extraction.
        return image, mask, out_params, CropPlan(0.0, False, pre_normalised, _size(image))
    target = settings.get("resampledPixelSpacing")
    if target is not None and settings.get("interpolator") is not None:
        target_arr = np.array([float(t) if float(t) > 0 else s for t, s in zip(target, spacing, strict=True)])
        pad = float(settings.get("padDistance", DEFAULT_PAD_DISTANCE))
        reach = INTERPOLATOR_REACH.get(str(settings.get("interpolator")), 24)
        margin_mm = (pad + 1.0) * target_arr.max() + reach * spacing.max()
        margin_vox = np.ceil(margin_mm / spacing).astype(int)
        cropped = _crop_region(image, index, size, margin_vox)
        plan = CropPlan(float(margin_mm), False, pre_normalised, _size(cropped))
        return cropped, mask, out_params, plan
    margin_mm = filter_reach_mm(params, (float(spacing[0]), float(spacing[1]), float(spacing[2])))
    margin_vox = np.ceil(margin_mm / spacing).astype(int)
    cropped_image = _crop_region(image, index, size, margin_vox)
    cropped_mask = _crop_region(mask, index, size, margin_vox)
    plan = CropPlan(float(margin_mm), True, pre_normalised, _size(cropped_image))
    return cropped_image, cropped_mask, out_params, plan


def estimate_case_bytes(plan: CropPlan, mask: sitk.Image, params: Mapping[str, Any]) -> int:
    """A conservative estimate of the memory one extraction needs, in bytes.

    The (resampled) crop in float64, once per derived image held at a time (one
    LoG sigma or wavelet band each, plus the original), times a working factor of
    4 for pyradiomics' intermediate arrays (texture matrices, masks, copies).
    """
    settings = _settings(params)
    target = settings.get("resampledPixelSpacing")
    spacing = np.array(mask.GetSpacing())
    size = np.array(plan.size, dtype=float)
    if target is not None:
        target_arr = np.array([float(t) if float(t) > 0 else s for t, s in zip(target, spacing, strict=True)])
        size = size * spacing / target_arr
    voxels = float(np.prod(size))
    image_types = params.get("imageType") or {"Original": {}}
    held = 1 + (1 if len(image_types) > 1 or "Original" not in image_types else 0)
    return math.ceil(voxels * 8 * held * 4)
