"""Post-processing: probabilities, back to the original grid, connected components."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from cohort.errors import SegmentationError
from cohort.segment.model import Activation, OutputSpec
from cohort.segment.postprocess import (
    BackInterpolation,
    Connectivity,
    KeepComponents,
    PostprocessSettings,
    label_components,
    output_probabilities,
    postprocess,
    resample_mask,
    to_reference,
)


def _output(activation: str, channels: int, from_logits: bool) -> OutputSpec:
    return OutputSpec(
        name="y",
        shape=("batch", channels, 4, 4),
        activation=Activation(activation),
        from_logits=from_logits,
        threshold=0.5,
    )


def test_output_probabilities() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 30, size=(3, 2, 4, 4)).astype(np.float32)
    p = output_probabilities(logits, _output("sigmoid", 2, True), 1)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-logits[:, 1].astype(np.float64))), rtol=1e-5, atol=1e-7)
    assert p.shape == (3, 4, 4) and p.dtype == np.float32 and np.isfinite(p).all()
    soft = output_probabilities(logits, _output("softmax", 2, True), 1)
    e = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(soft, e[:, 1] / e.sum(axis=1), rtol=1e-5, atol=1e-7)
    probs = rng.uniform(size=(3, 1, 4, 4)).astype(np.float32)
    assert np.array_equal(output_probabilities(probs, _output("sigmoid", 1, False), 0), probs[:, 0])
    with pytest.raises(SegmentationError, match=r"must be \(N, K, H, W\)"):
        output_probabilities(probs[0], _output("sigmoid", 1, False), 0)


def _blobs() -> np.ndarray:
    mask = np.zeros((10, 20, 20), dtype=bool)
    mask[1:4, 2:6, 2:6] = True  # 48 voxels
    mask[5:9, 10:16, 10:16] = True  # 144 voxels: the largest
    mask[0, 18, 18] = True  # 1 voxel
    return mask


def test_largest_component_is_the_primary_tumour() -> None:
    labels, comps = label_components(_blobs(), (2.0, 1.0, 0.5))
    assert [c.voxels for c in comps] == [144, 48, 1]
    assert [c.volume_mm3 for c in comps] == [144.0, 48.0, 1.0]
    assert [c.kept for c in comps] == [True, False, False]
    assert comps[0].bbox == (5, 10, 10, 9, 16, 16)
    assert np.array_equal(labels == 1, np.pad(np.ones((4, 6, 6), bool), ((5, 1), (10, 4), (10, 4))))
    assert labels.max() == 1 and labels.dtype == np.uint8


def test_keep_all_labels_by_volume_with_minimum() -> None:
    labels, comps = label_components(
        _blobs(), (1.0, 1.0, 1.0), keep=KeepComponents.ALL, min_component_mm3=2.0
    )
    assert [c.kept for c in comps] == [True, True, False]
    assert np.count_nonzero(labels == 1) == 144 and np.count_nonzero(labels == 2) == 48
    assert labels[0, 18, 18] == 0
    empty_labels, none = label_components(np.zeros((3, 3, 3), bool), (1.0, 1.0, 1.0))
    assert none == () and not empty_labels.any()


def test_connectivity_26_joins_corner_neighbours() -> None:
    mask = np.zeros((3, 3, 3), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # touch at a corner only
    mask[2, 2, 1] = True  # touches (1, 1, 1) along an edge
    assert len(label_components(mask, (1.0, 1.0, 1.0))[1]) == 1
    assert len(label_components(mask, (1.0, 1.0, 1.0), connectivity=Connectivity.EDGE)[1]) == 2
    assert len(label_components(mask, (1.0, 1.0, 1.0), connectivity=Connectivity.FACE)[1]) == 3


def test_ties_are_broken_by_position() -> None:
    mask = np.zeros((1, 5, 9), dtype=bool)
    mask[0, 1:3, 6:8] = True
    mask[0, 1:3, 1:3] = True
    labels, comps = label_components(mask, (1.0, 1.0, 1.0))
    assert comps[0].bbox == (0, 1, 1, 1, 3, 3) and labels[0, 1, 1] == 1 and labels[0, 1, 6] == 0


def _sphere_probability(
    spacing: float, radius: float, size: int, centre: tuple[float, float, float]
) -> sitk.Image:
    """A smooth probability map (logistic in the distance to a sphere) on an LPS grid centred at 0."""
    coords = (np.arange(size) - (size - 1) / 2) * spacing
    z, y, x = np.meshgrid(coords, coords, coords, indexing="ij")
    d = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    image = sitk.GetImageFromArray((1 / (1 + np.exp((d - radius) / 0.8))).astype(np.float32))
    image.SetSpacing((spacing,) * 3)
    image.SetOrigin((-(size - 1) / 2 * spacing,) * 3)
    return image


def _reference(spacing: tuple[float, float, float], size: tuple[int, int, int]) -> sitk.Image:
    ref = sitk.Image(list(size), sitk.sitkInt16)
    ref.SetSpacing(spacing)
    ref.SetOrigin(tuple(-(n - 1) / 2 * s + 0.3 for n, s in zip(size, spacing, strict=True)))
    ref.SetDirection((-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))  # x flipped: the resampling is physical
    ref.SetOrigin(((size[0] - 1) / 2 * spacing[0] + 0.3, ref.GetOrigin()[1], ref.GetOrigin()[2]))
    return ref


@pytest.mark.parametrize("interpolation", list(BackInterpolation))
def test_cropped_resampling_equals_the_full_resampling(interpolation: BackInterpolation) -> None:
    probability = _sphere_probability(2.0, 9.0, 40, (10.0, -6.0, 4.0))
    reference = _reference((0.9, 0.9, 2.5), (90, 90, 32))
    got = to_reference(probability, reference, 0.5, interpolation)
    kind = sitk.sitkLinear if interpolation == BackInterpolation.LINEAR else sitk.sitkNearestNeighbor
    full = sitk.Resample(probability, reference, sitk.Transform(), kind, 0.0, sitk.sitkFloat32)
    assert np.array_equal(got, sitk.GetArrayViewFromImage(full) >= 0.5)
    volume = got.sum() * 0.9 * 0.9 * 2.5
    assert abs(volume / (4 / 3 * np.pi * 9.0**3) - 1) < 0.05
    assert not to_reference(probability, reference, 0.999999, interpolation).any()


def test_postprocess_to_the_original_grid() -> None:
    probability = _sphere_probability(2.0, 9.0, 40, (10.0, -6.0, 4.0))
    arr = sitk.GetArrayFromImage(probability)
    arr[2:5, 2:5, 2:5] = 1.0  # a speck far from the tumour
    speckled = sitk.GetImageFromArray(arr)
    speckled.CopyInformation(probability)
    reference = _reference((0.9, 0.9, 2.5), (90, 90, 32))

    largest = postprocess(speckled, reference, PostprocessSettings(), threshold=0.5)
    assert largest.mask.GetSize() == reference.GetSize() and largest.mask.GetOrigin() == reference.GetOrigin()
    assert largest.mask.GetPixelID() == sitk.sitkUInt8
    assert len(largest.components) == 2 and largest.primary is largest.components[0]
    assert largest.primary is not None and abs(largest.primary.volume_mm3 / (4 / 3 * np.pi * 729) - 1) < 0.05
    labels = sitk.GetArrayViewFromImage(largest.mask)
    assert set(np.unique(labels)) == {0, 1}

    everything = postprocess(speckled, reference, PostprocessSettings(keep=KeepComponents.ALL), threshold=0.5)
    assert set(np.unique(sitk.GetArrayViewFromImage(everything.mask))) == {0, 1, 2}

    strict = postprocess(speckled, reference, PostprocessSettings(threshold=0.9), threshold=0.5)
    assert strict.threshold == 0.9 and strict.primary is not None
    assert strict.primary.volume_mm3 < largest.primary.volume_mm3

    too_big = postprocess(speckled, reference, PostprocessSettings(min_component_mm3=1e6), threshold=0.5)
    assert too_big.primary is None and not sitk.GetArrayViewFromImage(too_big.mask).any()

    with pytest.raises(SegmentationError, match=r"threshold must be in \(0, 1\)"):
        PostprocessSettings(threshold=1.0)


def test_resample_mask_nearest_and_linear() -> None:
    fine = np.zeros((4, 40, 40), dtype=np.uint8)
    fine[:, 10:30, 10:30] = 1
    mask = sitk.GetImageFromArray(fine)
    mask.SetSpacing((0.5, 0.5, 2.0))
    coarse = sitk.Image([10, 10, 4], sitk.sitkUInt8)
    coarse.SetSpacing((2.0, 2.0, 2.0))
    coarse.SetOrigin((1.75, 1.75, 0.0))  # centres 5.75 .. 13.75 mm inside [4.75, 14.75]
    for kind in BackInterpolation:
        out = sitk.GetArrayFromImage(resample_mask(mask, coarse, kind))
        assert out.sum() == 4 * 25, kind  # 10 mm square = 5 x 5 coarse pixels per slice
