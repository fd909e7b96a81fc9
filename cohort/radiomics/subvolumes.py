"""Tumour sub-volumes: the solid part of a GTV and the rest (ground-glass opacity).

Following the seed's patent: within a GTV, voxels at or above an intensity
threshold (in HU for CT) form the solid part; the remaining GTV voxels form the
ground-glass part, so GTV = solid + GGO exactly, voxel for voxel, on the image grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from cohort.errors import RadiomicsError


@dataclass(frozen=True)
class Subvolume:
    """A named part of an ROI and its mask on the image grid."""

    name: str
    suffix: str
    mask: sitk.Image
    voxel_count: int


def split_solid(
    image: sitk.Image, mask: sitk.Image, threshold: float, *, solid_name: str, rest_name: str
) -> tuple[Subvolume, Subvolume]:
    """Split ``mask`` into voxels with ``image >= threshold`` and the others."""
    values = sitk.GetArrayViewFromImage(image)
    inside = sitk.GetArrayViewFromImage(mask) > 0
    if values.shape != inside.shape:
        raise RadiomicsError(f"image {values.shape} and mask {inside.shape} grids differ")
    solid = inside & (values >= threshold)
    rest = inside & ~solid
    parts = []
    for name, suffix, array in ((solid_name, "solid", solid), (rest_name, "rest", rest)):
        part = sitk.GetImageFromArray(array.astype(np.uint8))
        part.CopyInformation(mask)
        parts.append(Subvolume(name, suffix, part, int(array.sum())))
    return parts[0], parts[1]
