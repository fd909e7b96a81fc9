"""Harmonisation operations on small generated volumes, with the numbers they must give."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from cohort.errors import HarmoniseError
from cohort.harmonise.ops import (
    Interpolator,
    MaskInterpolator,
    bin_fixed_width,
    clip,
    crop_or_pad,
    equalise_histogram,
    fit_zscore,
    match_histogram,
    n4_bias_correction,
    resample_image,
    resample_mask_like,
    target_grid,
    window,
    zscore,
)


def _image(
    array: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    direction: tuple[float, ...] | None = None,
) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def _ramp(
    shape_zyx: tuple[int, int, int], spacing: tuple[float, float, float], origin: tuple[float, float, float]
) -> sitk.Image:
    """A float64 image whose value is 2x + 3y − 0.5z + 7 at every voxel centre (patient mm)."""
    z, y, x = np.indices(shape_zyx, dtype=np.float64)
    px, py, pz = (origin[0] + x * spacing[0], origin[1] + y * spacing[1], origin[2] + z * spacing[2])
    return _image(2 * px + 3 * py - 0.5 * pz + 7, spacing, origin)


# -- resampling -----------------------------------------------------------------------------------


def test_resampled_grid_keeps_origin_and_covers_the_old_centres() -> None:
    image = _image(np.zeros((10, 20, 30), np.int16), spacing=(0.8, 0.8, 3.0), origin=(-12.5, 40.0, 100.0))
    out = resample_image(image, [1.0, None, 2.0])
    assert out.GetSpacing() == (1.0, 0.8, 2.0)
    # x: (30 - 1) * 0.8 / 1 = 23.2 -> 24 voxels; y kept; z: 9 * 3 / 2 = 13.5 -> 14.
    assert out.GetSize() == (24, 20, 14)
    assert out.GetOrigin() == (-12.5, 40.0, 100.0)
    assert out.GetPixelID() == sitk.sitkFloat32
    grid = target_grid(image, [0.5, 0.5, 1.0])
    assert grid.size == (47, 31, 28) and grid.spacing == (0.5, 0.5, 1.0)


def test_a_linear_ramp_stays_exact_under_linear_resampling() -> None:
    spacing, origin = (0.7, 0.9, 3.0), (-20.0, 5.0, -60.0)
    image = _ramp((9, 17, 23), spacing, origin)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    out = resample_image(image, [0.5, 1.3, 1.0], Interpolator.LINEAR)
    assert out.GetPixelID() == sitk.sitkFloat64
    z, y, x = np.indices(_array(out).shape, dtype=np.float64)
    index = np.stack([x, y, z], axis=-1) * np.asarray(out.GetSpacing())
    points = np.asarray(out.GetOrigin()) + index @ direction.T
    expected = 2 * points[..., 0] + 3 * points[..., 1] - 0.5 * points[..., 2] + 7
    np.testing.assert_allclose(_array(out), expected, rtol=0, atol=1e-9)


def test_bspline_reproduces_the_ramp_inside_and_nearest_keeps_the_type() -> None:
    image = _ramp((16, 24, 24), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    out = resample_image(image, [0.5, 0.5, 1.0], Interpolator.BSPLINE)
    z, y, x = np.indices(_array(out).shape, dtype=np.float64)
    expected = np.asarray(2 * x * 0.5 + 3 * y * 0.5 - 0.5 * z * 1.0 + 7)
    # ITK's cubic B-spline mirrors at the border; the error decays by ~0.27 per voxel
    # inwards (0.07 one voxel in), so compare 6 original voxels away from the border.
    inner = (slice(12, -12), slice(12, -12), slice(12, -12))
    np.testing.assert_allclose(_array(out)[inner], expected[inner], atol=2e-3)
    labels = _image(np.arange(4 * 4 * 4, dtype=np.int16).reshape(4, 4, 4))
    nearest = resample_image(labels, [0.5, 0.5, 0.5], Interpolator.NEAREST)
    assert nearest.GetPixelID() == sitk.sitkInt16
    assert set(np.unique(_array(nearest))) <= set(range(64))


def test_extreme_upsampling_is_refused_with_the_factor_in_the_message() -> None:
    image = _image(np.zeros((5, 8, 8), np.float32), spacing=(0.9, 0.9, 7.0))
    with pytest.raises(HarmoniseError, match=r"axis z from 7 mm to 1 mm is a 7.00x up-sampling.*limit of 5x"):
        resample_image(image, [1.0, 1.0, 1.0])
    # Allowed once the limit is raised on purpose.
    assert resample_image(image, [None, None, 1.0], max_upsampling=7.0).GetSize() == (8, 8, 29)


def test_masks_resample_by_nearest_or_by_linear_then_threshold() -> None:
    mask_array = np.zeros((6, 10, 10), np.uint8)
    mask_array[2:4, 3:7, 3:7] = 1
    mask = _image(mask_array, spacing=(1.0, 1.0, 2.0))
    reference = resample_image(_image(np.zeros((6, 10, 10), np.float32), (1.0, 1.0, 2.0)), [0.5, 0.5, 1.0])
    nearest = _array(resample_mask_like(mask, reference, MaskInterpolator.NEAREST))
    linear = _array(resample_mask_like(mask, reference, MaskInterpolator.LINEAR, threshold=0.5))
    assert nearest.dtype == np.uint8 and set(np.unique(nearest)) == {0, 1}
    # A 4 x 4 x 2 block at 1 x 1 x 2 mm (64 mm³) is 8 x 8 x 4 voxels of 0.25 mm³ by nearest neighbour.
    assert nearest.sum() == 8 * 8 * 4
    # Linear: 7 x 7 x 3 new centres inside (value 1), plus the centres on the block's faces, where one
    # factor of the trilinear weight is 0.5 (kept, >= 0.5); on its edges two are (0.25, dropped).
    assert linear.sum() == 7 * 7 * 3 + 2 * (7 * 3) + 2 * (7 * 3) + 2 * (7 * 7)


# -- intensity ------------------------------------------------------------------------------------


def test_window_clips_to_the_bounds_and_maps_to_an_output_range() -> None:
    hu = _image(np.array([[[-2000.0, -1350.0, -600.0, 150.0, 3000.0]]], np.float32))
    out = _array(window(hu, level=-600, width=1500))
    np.testing.assert_array_equal(out.ravel(), [-1350.0, -1350.0, -600.0, 150.0, 150.0])
    unit = _array(window(hu, level=-600, width=1500, output_range=(0.0, 1.0)))
    np.testing.assert_allclose(unit.ravel(), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_array_equal(_array(clip(hu, lower=-1000)).ravel(), [-1000, -1000, -600, 150, 3000])
    with pytest.raises(HarmoniseError, match="width must be > 0"):
        window(hu, level=0, width=0)


def test_zscore_per_image_has_mean_0_and_std_1() -> None:
    rng = np.random.default_rng(1)
    image = _image(rng.gamma(2.0, 30.0, (8, 16, 16)).astype(np.float32))
    out = _array(zscore(image)).astype(np.float64)
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1.0) < 1e-5


def test_zscore_inside_a_mask_uses_the_mask_statistics() -> None:
    array = np.full((4, 8, 8), 1000.0, np.float32)
    array[:, 2:6, 2:6] = np.arange(16, dtype=np.float32).reshape(4, 4)[None]
    mask_array = np.zeros(array.shape, np.uint8)
    mask_array[:, 2:6, 2:6] = 1
    image, mask = _image(array), _image(mask_array)
    inside = _array(zscore(image, mask=mask))[mask_array == 1].astype(np.float64)
    assert abs(inside.mean()) < 1e-6 and abs(inside.std() - 1.0) < 1e-6


def test_fitted_zscore_parameters_are_pooled_and_reused_unchanged() -> None:
    rng = np.random.default_rng(2)
    train = [_image(rng.normal(100 + 20 * i, 10 + i, (4, 10, 10))) for i in range(3)]
    params = fit_zscore(train)
    pooled = np.concatenate([_array(im).ravel() for im in train])
    assert params.n_images == 3 and params.n_voxels == pooled.size
    assert params.mean == pytest.approx(pooled.mean(), rel=1e-12)
    assert params.std == pytest.approx(pooled.std(), rel=1e-12)
    test = _image(rng.normal(500, 50, (4, 10, 10)))
    out = _array(zscore(test, params))
    np.testing.assert_allclose(out, (_array(test) - params.mean) / params.std, rtol=1e-12)
    # The training images together (not each one) have mean 0 and std 1 afterwards.
    together = np.concatenate([_array(zscore(im, params)).ravel() for im in train])
    assert abs(together.mean()) < 1e-9 and abs(together.std() - 1) < 1e-9


def _biased_phantom() -> tuple[sitk.Image, sitk.Image, np.ndarray]:
    n = 48
    z, y, x = np.mgrid[:n, :n, :n].astype(np.float64)
    c = (n - 1) / 2
    r = np.sqrt((x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2)
    phantom = np.where(r < 18, 100.0, 5.0)
    bias = np.exp(0.4 * (x - c) / n + 0.2 * (y - c) / n)  # smooth, multiplicative, x0.82..x1.22
    noise = np.random.default_rng(0).normal(0, 1, phantom.shape)
    image = _image((phantom * bias + noise).astype(np.float32), spacing=(2.0, 2.0, 2.0))
    mask = _image((r < 18).astype(np.uint8), spacing=(2.0, 2.0, 2.0))
    return image, mask, r < 15


def test_n4_removes_most_of_a_multiplicative_bias_field() -> None:
    image, mask, inside = _biased_phantom()

    def cv(im: sitk.Image) -> float:
        values = _array(im)[inside].astype(np.float64)
        return float(values.std() / values.mean())

    before = cv(image)
    after_masked = cv(n4_bias_correction(image, mask))
    after_otsu = cv(n4_bias_correction(image))
    # The phantom is uniform (100) under a bias of 0.82..1.22: CV 0.064. The noise alone is CV 0.01.
    assert before > 0.06
    assert after_masked < 0.02 and after_masked < 0.3 * before
    assert after_otsu < 0.02


def test_n4_refuses_non_positive_intensities() -> None:
    hu = _image(np.full((8, 8, 8), -500.0, np.float32))
    mask = _image(np.ones((8, 8, 8), np.uint8))
    with pytest.raises(HarmoniseError, match="positive intensities"):
        n4_bias_correction(hu, mask)


def test_histogram_matching_moves_the_quantiles_to_the_reference() -> None:
    rng = np.random.default_rng(3)
    source = _image(rng.normal(50, 10, (16, 32, 32)).astype(np.float32))
    reference = _image(rng.gamma(4.0, 25.0, (16, 32, 32)).astype(np.float32))
    out = match_histogram(source, reference, levels=1024, match_points=64)
    q = [0.05, 0.25, 0.5, 0.75, 0.95]
    got, want = np.quantile(_array(out), q), np.quantile(_array(reference), q)
    before = np.quantile(_array(source), q)
    assert np.max(np.abs(got - want)) < 1.0  # reference IQR is ~65: within 1.5 % of it
    assert np.max(np.abs(before - want)) > 40


def test_equalisation_spreads_values_uniformly_over_the_range() -> None:
    rng = np.random.default_rng(4)
    image = _image(rng.exponential(100.0, (16, 32, 32)).astype(np.float32))
    values = _array(image)
    out = _array(equalise_histogram(image, bins=512, output_range=(0.0, 1.0)))
    q = np.linspace(0.05, 0.95, 10)
    np.testing.assert_allclose(np.quantile(out, q), q, atol=0.01)
    # Order is kept (a monotone map) and the default range is the input's own.
    default = _array(equalise_histogram(image))
    assert default.min() == pytest.approx(values.min()) and default.max() == pytest.approx(values.max())
    order = np.argsort(values.ravel())
    assert np.all(np.diff(default.ravel()[order]) >= -1e-3)


def test_fixed_width_binning_into_8_bits() -> None:
    hu = _image(np.array([[[-2000.0, -1000.0, -976.0, -975.0, 0.0, 5374.9, 5375.0, 9000.0]]]))
    out = bin_fixed_width(hu, width=25, lower=-1000)
    assert out.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(_array(out).ravel(), [0, 0, 0, 1, 40, 254, 255, 255])


def test_crop_and_pad_keep_voxels_in_place_and_move_the_origin() -> None:
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # rotated in-plane: origin moves along it
    array = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)  # z=5, y=6, x=7
    image = _image(array, spacing=(0.5, 0.8, 3.0), origin=(10.0, 20.0, 30.0), direction=direction)
    out = crop_or_pad(image, [4, 9, None], pad_value=-1000)
    assert out.GetSize() == (4, 9, 5)
    # x: 7 -> 4 crops 1 low, 2 high; y: 6 -> 9 pads 1 low, 2 high.
    offset = np.array([1 * 0.5, -1 * 0.8, 0.0])
    expected_origin = np.array([10.0, 20.0, 30.0]) + np.asarray(direction).reshape(3, 3) @ offset
    np.testing.assert_allclose(out.GetOrigin(), expected_origin, atol=1e-12)
    result = _array(out)
    np.testing.assert_array_equal(result[:, 1:7, :], array[:, :, 1:5])
    assert (result[:, 0, :] == -1000).all() and (result[:, 7:, :] == -1000).all()
    # The same physical point has the same value before and after.
    point = image.TransformIndexToPhysicalPoint((3, 2, 4))
    assert out[out.TransformPhysicalPointToIndex(point)] == image[3, 2, 4]
