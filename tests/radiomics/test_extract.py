from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from cohort.errors import RadiomicsError
from cohort.radiomics.extract import extract_features
from cohort.spec import load_preset


def _phantom(mask_voxels: bool = True) -> tuple[sitk.Image, sitk.Image]:
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(40, 20, size=(30, 40, 40)).round().astype(np.int16))
    image.SetSpacing((1.0, 1.0, 1.0))
    zz, yy, xx = np.mgrid[:30, :40, :40]
    sphere = ((zz - 15) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 8**2) & mask_voxels
    mask = sitk.GetImageFromArray(sphere.astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


def test_features_of_a_sphere_count_its_voxels() -> None:
    image, mask = _phantom()
    params = load_preset("ct-original")
    features = extract_features(image, mask, params)
    n = int(sitk.GetArrayViewFromImage(mask).sum())
    assert features["original_shape_VoxelVolume"] == pytest.approx(n)
    assert len([k for k in features if k.startswith("original_")]) == 107
    assert not any(k.startswith("diagnostics_") for k in features)
    values = sitk.GetArrayViewFromImage(image)[sitk.GetArrayViewFromImage(mask) == 1]
    assert features["original_firstorder_Mean"] == pytest.approx(values.mean(), rel=1e-12)


def test_empty_mask_fails_with_the_reason() -> None:
    image, mask = _phantom(mask_voxels=False)
    with pytest.raises(RadiomicsError, match="no voxel labelled 1") as info:
        extract_features(image, mask, load_preset("ct-original"), subject="series / GTV")
    assert info.value.subject == "series / GTV"
