"""The harmonisation spec (validation) and the chain (composition, mask handling, provenance)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from cohort.errors import HarmoniseError, SpecError
from cohort.harmonise import apply_chain, chain_digest, fit_zscore, image_digest, parse_steps
from cohort.harmonise.spec import BinStep, CropPadStep, ResampleStep, WindowStep, ZScoreStep

SEED_CHAIN = """
- {op: resample, spacing: [1, 1, null], interpolator: bspline}
- {op: window, level: -600, width: 1500}
- {op: bin_fixed_width, width: 25, lower: -1000}
- {op: crop_pad, size: [64, 64, null], pad_value: 0}
"""


def _ct(seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    rng = np.random.default_rng(seed)
    array = rng.normal(-700, 300, (6, 40, 50)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 3.0))
    image.SetOrigin((-20.0, -16.0, 100.0))
    mask_array = np.zeros(array.shape, np.uint8)
    mask_array[2:4, 10:30, 15:35] = 1
    mask = sitk.GetImageFromArray(mask_array)
    mask.CopyInformation(image)
    return image, mask


def test_yaml_steps_validate_into_typed_models_with_defaults() -> None:
    steps = parse_steps(yaml.safe_load(SEED_CHAIN))
    assert [type(s) for s in steps] == [ResampleStep, WindowStep, BinStep, CropPadStep]
    resample = steps[0]
    assert isinstance(resample, ResampleStep)
    assert resample.spacing == (1.0, 1.0, None) and resample.interpolator == "bspline"
    assert resample.max_upsampling == 5.0 and resample.mask_interpolator == "nearest"


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"op": "sharpen"}], "does not match any of the expected tags"),
        ([{"op": "window", "level": -600, "widht": 1500}], "widht"),
        ([{"op": "window", "level": -600, "width": 0}], "greater than 0"),
        ([{"op": "resample", "spacing": [1, 1]}], "spacing"),
        ([{"op": "resample", "spacing": [1, -1, 1]}], "greater than 0"),
        ([{"op": "zscore", "mean": 3.0}], "both mean and std"),
        ([{"op": "clip"}], "lower, upper or both"),
        ({"op": "window"}, "must be a list of steps"),
    ],
)
def test_invalid_steps_are_refused_with_the_field_named(steps: object, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_steps(steps)  # type: ignore[arg-type]


def test_chain_applies_the_steps_moves_the_mask_and_records_provenance() -> None:
    image, mask = _ct()
    result = apply_chain(image, yaml.safe_load(SEED_CHAIN), mask=mask)
    out = result.image
    # resample 0.8 -> 1 mm in-plane: 50 -> 40 and 40 -> 32 voxels; z kept; crop/pad to 64 x 64.
    assert out.GetSize() == (64, 64, 6) and out.GetSpacing() == (1.0, 1.0, 3.0)
    assert out.GetPixelID() == sitk.sitkUInt8
    values = sitk.GetArrayViewFromImage(out)
    # Window [-1350, 150] then 25-HU bins from -1000: 0 (below -975) .. 46 (150); padding is bin 0.
    assert values.min() == 0 and values.max() == 46
    assert result.mask is not None and result.mask.GetSize() == out.GetSize()
    assert result.mask.GetOrigin() == out.GetOrigin()
    # The 20 x 20 x 2 voxel block of 0.64 mm² pixels keeps its area at 1 mm² (within the rim).
    assert abs(int(sitk.GetArrayViewFromImage(result.mask).sum()) - 2 * 256) <= 2 * 40
    assert [r.op for r in result.records] == ["resample", "window", "bin_fixed_width", "crop_pad"]
    assert result.records[0].params["spacing"] == [1.0, 1.0, None]
    assert result.records[0].details["size"] == [40, 32, 6]
    assert result.records[3].params == {"size": [64, 64, None], "pad_value": 0.0}
    assert result.digest == chain_digest(result.records) and len(result.digest) == 64


def test_the_digest_names_the_recipe_not_the_image() -> None:
    steps = yaml.safe_load(SEED_CHAIN)
    first = apply_chain(_ct(0)[0], steps)
    second = apply_chain(_ct(1)[0], steps)
    assert first.digest == second.digest  # same recipe, other image
    changed = [*steps[:1], {"op": "window", "level": -600, "width": 1400}, *steps[2:]]
    assert apply_chain(_ct(0)[0], changed).digest != first.digest
    # Defaults spelled out or left implicit are the same recipe.
    explicit = [{**steps[0], "max_upsampling": 5.0, "mask_interpolator": "nearest"}, *steps[1:]]
    assert apply_chain(_ct(0)[0], explicit).digest == first.digest


def test_fitted_zscore_goes_into_the_step_and_its_provenance() -> None:
    train = [_ct(seed)[0] for seed in range(3)]
    params = fit_zscore(train)
    step = ZScoreStep(mean=params.mean, std=params.std)
    test_image = _ct(9)[0]
    result = apply_chain(test_image, [step])
    assert result.records[0].params == {"mean": params.mean, "std": params.std, "use_mask": False}
    raw = sitk.GetArrayFromImage(test_image).astype(np.float64)
    np.testing.assert_allclose(
        sitk.GetArrayViewFromImage(result.image), (raw - params.mean) / params.std, rtol=1e-5, atol=1e-5
    )
    # Per image: the statistics used are details of this output, not part of the recipe.
    per_image = apply_chain(test_image, [{"op": "zscore"}])
    assert per_image.records[0].details["mean"] == pytest.approx(raw.mean())


def test_histogram_matching_records_which_reference_it_used() -> None:
    image, _ = _ct(0)
    reference = sitk.Cast(_ct(5)[0] + 300, sitk.sitkInt16)
    result = apply_chain(image, [{"op": "histogram_match"}], references={"default": reference})
    assert result.records[0].params["reference_sha256"] == image_digest(reference)
    assert abs(float(np.median(sitk.GetArrayViewFromImage(result.image))) + 400) < 10
    with pytest.raises(HarmoniseError, match="needs the reference image 'default'"):
        apply_chain(image, [{"op": "histogram_match"}])


def test_use_mask_without_a_mask_fails_and_extreme_upsampling_stops_the_chain() -> None:
    image, _ = _ct()
    with pytest.raises(HarmoniseError, match="use_mask"):
        apply_chain(image, [{"op": "zscore", "use_mask": True}])
    with pytest.raises(HarmoniseError, match=r"3\.75x up-sampling"):
        apply_chain(image, [{"op": "resample", "spacing": [None, None, 0.8], "max_upsampling": 3}])
