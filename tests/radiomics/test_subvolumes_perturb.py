from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from cohort.radiomics.perturb import perturb
from cohort.radiomics.subvolumes import split_solid


def _phantom() -> tuple[sitk.Image, sitk.Image]:
    zz, yy, xx = np.indices((20, 40, 40))
    r2 = (zz - 10) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2
    values = np.where(r2 <= 25, 40, np.where(r2 <= 64, -500, -850)).astype(np.int16)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.9, 0.9, 2.0))
    mask = sitk.GetImageFromArray((r2 <= 64).astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


def test_solid_and_ground_glass_parts_partition_the_gtv() -> None:
    image, mask = _phantom()
    solid, rest = split_solid(image, mask, -300.0, solid_name="GTV_solid", rest_name="GTV_ggo")
    gtv = int(sitk.GetArrayViewFromImage(mask).sum())
    core = int((sitk.GetArrayViewFromImage(image) >= -300).sum())
    assert solid.voxel_count == core and solid.voxel_count + rest.voxel_count == gtv
    both = sitk.GetArrayViewFromImage(solid.mask) & sitk.GetArrayViewFromImage(rest.mask)
    assert not both.any()
    assert (solid.name, rest.name) == ("GTV_solid", "GTV_ggo")


def test_perturbations_do_what_they_say() -> None:
    image, mask = _phantom()
    n = int(sitk.GetArrayViewFromImage(mask).sum())
    out = {
        name: (img, m)
        for name, img, m in perturb(
            image, mask, ["erode", "dilate", "shift_x", "shift_y", "noise", "translate"], noise_sd=10, seed=1
        )
    }
    count = {name: int(sitk.GetArrayViewFromImage(m).sum()) for name, (_, m) in out.items()}
    assert count["erode"] < n < count["dilate"]
    assert count["shift_x"] == count["shift_y"] == n
    moved = sitk.GetArrayViewFromImage(out["shift_x"][1])
    np.testing.assert_array_equal(moved[:, :, 1:], sitk.GetArrayViewFromImage(mask)[:, :, :-1])
    noise = sitk.GetArrayViewFromImage(out["noise"][0]).astype(float) - sitk.GetArrayViewFromImage(image)
    assert noise.std() == pytest.approx(10, rel=0.05) and out["noise"][0].GetPixelID() == image.GetPixelID()
    again = next(perturb(image, mask, ["noise"], noise_sd=10, seed=1))[1]
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(again), sitk.GetArrayViewFromImage(out["noise"][0])
    )
    translated = sitk.GetArrayViewFromImage(out["translate"][0])
    assert translated.shape == sitk.GetArrayViewFromImage(image).shape and not np.array_equal(
        translated, sitk.GetArrayViewFromImage(image)
    )
    with pytest.raises(ValueError, match="unknown perturbation"):
        list(perturb(image, mask, ["rotate"]))
