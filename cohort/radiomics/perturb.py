"""Small perturbations of an (image, mask) pair for stability analysis.

In the spirit of Zwanenburg et al. (Sci Rep 2019): the mask is eroded or dilated
by one voxel, or shifted by one voxel in x or y (a contour shift); the image gets
Gaussian noise, or is translated by half a voxel in-plane (a resampling
perturbation). Every perturbation is deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import SimpleITK as sitk


def _mask_from_array(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    mask = sitk.GetImageFromArray(array.astype(np.uint8))
    mask.CopyInformation(like)
    return mask


def _shift(mask: sitk.Image, axis_xyz: int) -> sitk.Image:
    array = sitk.GetArrayFromImage(mask)
    axis = 2 - axis_xyz  # numpy arrays are (z, y, x)
    shifted = np.zeros_like(array)
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    src[axis], dst[axis] = slice(0, -1), slice(1, None)
    shifted[tuple(dst)] = array[tuple(src)]
    return _mask_from_array(shifted, mask)


def _noise(image: sitk.Image, sd: float, seed: int) -> sitk.Image:
    array = sitk.GetArrayFromImage(image)
    noisy = array.astype(np.float64) + np.random.default_rng(seed).normal(0.0, sd, size=array.shape)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        noisy = np.clip(np.round(noisy), info.min, info.max)
    out = sitk.GetImageFromArray(noisy.astype(array.dtype))
    out.CopyInformation(image)
    return out


def _translate(image: sitk.Image) -> sitk.Image:
    spacing = image.GetSpacing()
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    offset = direction @ np.array([spacing[0] / 2, spacing[1] / 2, 0.0])
    transform = sitk.TranslationTransform(3, [float(v) for v in offset])
    fill = float(np.min(sitk.GetArrayViewFromImage(image)))
    return sitk.Resample(image, image, transform, sitk.sitkLinear, fill, image.GetPixelID())


def perturb(
    image: sitk.Image, mask: sitk.Image, names: Sequence[str], *, noise_sd: float = 10.0, seed: int = 0
) -> Iterator[tuple[str, sitk.Image, sitk.Image]]:
    """Yield ``(name, image, mask)`` for each requested perturbation."""
    for name in names:
        if name == "erode":
            yield name, image, sitk.BinaryErode(mask, [1, 1, 1], sitk.sitkBall, 0, 1)
        elif name == "dilate":
            yield name, image, sitk.BinaryDilate(mask, [1, 1, 1], sitk.sitkBall, 0, 1)
        elif name == "shift_x":
            yield name, image, _shift(mask, 0)
        elif name == "shift_y":
            yield name, image, _shift(mask, 1)
        elif name == "noise":
            yield name, _noise(image, noise_sd, seed), mask
        elif name == "translate":
            yield name, _translate(image), mask
        else:
            raise ValueError(f"unknown perturbation {name!r}")
