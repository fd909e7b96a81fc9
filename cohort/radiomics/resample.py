"""IBSI-conform interpolation, as an alternative to pyradiomics' own resampling.

pyradiomics anchors its new grid at the corner of the mask's bounding box,
resamples the mask by nearest neighbour and keeps the input pixel type (integer
CT is truncated). The IBSI reference manual instead centres the new grid on the
old one, interpolates the mask linearly and keeps it where it is at least 0.5,
and rounds interpolated intensities of integer images. With
``radiomics.interpolation: ibsi`` the platform resamples this way and hands
pyradiomics the resampled image with its own resampling switched off; this is
what reproduces IBSI configuration B (tests/radiomics/test_ibsi.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk


def resample_ibsi(
    image: sitk.Image, mask: sitk.Image, spacing: Sequence[float], *, mask_threshold: float = 0.5
) -> tuple[sitk.Image, sitk.Image]:
    """Resample ``image`` and ``mask`` onto the IBSI grid of ``spacing`` (0 keeps an axis).

    The new grid has ``ceil(n * old / new)`` voxels per axis and shares the old
    grid's centre. Intensities are interpolated linearly (rounded to integers when
    the image is of an integer type), the mask linearly and thresholded.
    """
    old_spacing = np.asarray(image.GetSpacing(), dtype=float)
    target = np.asarray([float(s) for s in spacing])
    new_spacing = np.where(target <= 0, old_spacing, target)
    old_size = np.asarray(image.GetSize())
    new_size = np.ceil(old_size * old_spacing / new_spacing - 1e-9).astype(int)
    first = (old_size - 1) / 2 - (new_size - 1) / 2 * new_spacing / old_spacing  # continuous index
    resample = sitk.ResampleImageFilter()
    resample.SetOutputSpacing([float(v) for v in new_spacing])
    resample.SetSize([int(v) for v in new_size])
    resample.SetOutputOrigin(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in first]))
    resample.SetOutputDirection(image.GetDirection())
    resample.SetInterpolator(sitk.sitkLinear)
    resample.SetOutputPixelType(sitk.sitkFloat64)
    values = sitk.GetArrayViewFromImage(resample.Execute(sitk.Cast(image, sitk.sitkFloat64)))
    dtype = sitk.GetArrayViewFromImage(image).dtype
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.round(values), info.min, info.max)
    new_image = sitk.GetImageFromArray(values.astype(dtype))
    fraction = sitk.GetArrayViewFromImage(resample.Execute(sitk.Cast(mask, sitk.sitkFloat64)))
    new_mask = sitk.GetImageFromArray((fraction >= mask_threshold).astype(np.uint8))
    for out in (new_image, new_mask):
        out.SetSpacing([float(v) for v in new_spacing])
        out.SetOrigin(resample.GetOutputOrigin())
        out.SetDirection(image.GetDirection())
    return new_image, new_mask
