"""Segmentation metrics: analytic shapes, an independent implementation, the union-box shortcut."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from cohort.errors import SegmentationError
from cohort.segment.metrics import (
    added_path_length,
    dice,
    hausdorff95,
    jaccard,
    segmentation_metrics,
    segmentation_metrics_image,
    surface_dice,
)

ANISOTROPIC = (2.5, 0.8, 1.2)  # z, y, x mm


def _sphere(shape: tuple[int, int, int], radius: float, spacing=(1.0, 1.0, 1.0), centre=None) -> np.ndarray:
    centre = centre if centre is not None else tuple((n - 1) / 2 for n in shape)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    r2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, spacing, strict=True))
    return r2 <= radius**2


def _box(shape: tuple[int, int, int], start: tuple[int, int, int], size: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))] = True
    return mask


def test_identical_spheres_score_perfectly() -> None:
    a = _sphere((30, 40, 40), 10.0, spacing=ANISOTROPIC)
    m = segmentation_metrics(a, a.copy(), ANISOTROPIC)
    assert (m.dice, m.jaccard, m.hd95_mm, m.surface_dice) == (1.0, 1.0, 0.0, 1.0)
    assert m.apl_pixels == 0 and m.apl_mm == 0.0
    assert m.reference_voxels == m.prediction_voxels == int(a.sum())


@pytest.mark.parametrize("k", [1, 2, 5])
def test_box_shifted_along_x_has_closed_form_overlap_and_distances(k: int) -> None:
    lz, ly, lx = 8, 10, 12
    a = _box((14, 16, 24), (3, 3, 4), (lz, ly, lx))
    b = np.roll(a, k, axis=2)
    assert dice(a, b) == pytest.approx((lx - k) / lx, abs=1e-12)
    assert jaccard(a, b) == pytest.approx((lx - k) / (lx + k), abs=1e-12)
    # The end faces are k voxels apart; they carry more than 5 % of the surface area.
    assert hausdorff95(a, b, ANISOTROPIC) == pytest.approx(k * ANISOTROPIC[2], abs=1e-12)
    # With τ below every spacing only coincident surface elements count. On the corner
    # lattice a box's surface is its marching-cubes surface: flat face cells, edge cells
    # cut by a chamfer and corner triangles. Per x position the side ring has area
    # ring; each end face has a flat inside of area face and a rim of area rim.
    sz, sy, sx = ANISOTROPIC
    e_x, e_y, e_z = (math.hypot(sy, sz) / 2, math.hypot(sx, sz) / 2, math.hypot(sx, sy) / 2)
    corner = math.sqrt((sy * sz) ** 2 + (sx * sz) ** 2 + (sx * sy) ** 2) / 8
    ring = 2 * (lz - 1) * sx * sz + 2 * (ly - 1) * sx * sy + 4 * sx * e_x
    rim = 2 * (ly - 1) * sy * e_y + 2 * (lz - 1) * sz * e_z + 4 * corner
    face = (ly - 1) * (lz - 1) * sy * sz
    total = 2 * face + (lx - 1) * ring + 2 * rim
    # Shared: the side rings over the overlap (lx − k positions) and one end rim per box.
    expected = ((lx - k) * ring + rim) / total
    assert surface_dice(a, b, ANISOTROPIC, tolerance_mm=0.5) == pytest.approx(expected, abs=1e-12)
    # Added path length per slice: the rectangle's 4-connected contour (2 (ly + lx) − 4
    # pixels) minus the 2 (lx − k) pixels shared along the top and bottom rows.
    apl = added_path_length(a, b, ANISOTROPIC)
    assert apl.pixels == lz * (2 * ly - 4 + 2 * k)
    assert apl.mm == pytest.approx(apl.pixels * math.sqrt(sy * sx))
    # A tolerance of k pixels along x forgives the whole shift.
    assert added_path_length(a, b, ANISOTROPIC, tolerance_mm=k * sx + 1e-6).pixels == 0


def test_concentric_spheres_match_the_continuous_formulas() -> None:
    r1, r2, spacing = 12.0, 15.0, (0.5, 0.5, 0.5)
    inner, outer = _sphere((65, 65, 65), r1, spacing), _sphere((65, 65, 65), r2, spacing)
    # Voxelised at 0.5 mm the volumes are within 0.3 % of 4/3 π r³ (Dice off by 0.0009).
    assert dice(inner, outer) == pytest.approx(2 * r1**3 / (r1**3 + r2**3), abs=0.002)
    assert jaccard(inner, outer) == pytest.approx(r1**3 / r2**3, abs=0.002)
    # Every surface point is r2 − r1 = 3 mm from the other surface, within one voxel.
    assert hausdorff95(inner, outer, spacing) == pytest.approx(r2 - r1, abs=0.5)
    assert surface_dice(inner, outer, spacing, tolerance_mm=1.18) == 0.0
    assert surface_dice(inner, outer, spacing, tolerance_mm=4.0) == 1.0


def _blob(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(shape)
    return ndi.gaussian_filter(noise, (2.0, 4.0, 4.0)) > 0.0


@pytest.mark.parametrize("seed", range(8))
def test_agrees_with_deepminds_surface_distance_on_random_blobs(seed: int) -> None:
    """Same surface definition as ``surface-distance``: HD95 equal, surface Dice within 1e-3.

    The only difference: surface-element areas come from scikit-image's marching cubes
    instead of DeepMind's 256-case table (the ambiguous cases can be split differently).
    """
    import surface_distance  # pinned dev dependency: missing means a broken environment, not a skip

    spacing = [(3.0, 1.0, 1.0), (1.0, 1.0, 1.0), (2.0, 0.8, 0.8), (1.5, 0.7, 1.1)][seed % 4]
    a = _blob((24, 48, 48), seed)
    b = _blob((24, 48, 48), seed + 100) if seed % 2 else ndi.binary_dilation(np.roll(a, 1, axis=2))
    reference = surface_distance.compute_surface_distances(a, b, spacing)
    for tolerance in (1.18, 2.0, 3.0):
        ours = segmentation_metrics(a, b, spacing, tolerance_mm=tolerance)
        theirs = surface_distance.compute_surface_dice_at_tolerance(reference, tolerance)
        assert ours.surface_dice == pytest.approx(theirs, abs=1e-3)
    assert ours.hd95_mm == pytest.approx(surface_distance.compute_robust_hausdorff(reference, 95), abs=1e-9)
    assert ours.dice == pytest.approx(surface_distance.compute_dice_coefficient(a, b), abs=1e-12)


def test_union_box_gives_the_same_numbers_as_the_whole_volume() -> None:
    a = _blob((30, 60, 60), 3) & _sphere((30, 60, 60), 20.0, spacing=(1.0, 1.0, 1.0))
    b = ndi.binary_erosion(np.roll(a, (1, -2, 3), axis=(0, 1, 2)))
    b[0, 0, :5] = True  # touches the array border: the box must not change that surface
    cropped = segmentation_metrics(a, b, ANISOTROPIC, apl_tolerance_mm=1.0)
    full = segmentation_metrics(a, b, ANISOTROPIC, apl_tolerance_mm=1.0, crop=False)
    assert cropped == full


def test_empty_masks_give_zero_and_infinity_never_nan() -> None:
    a = _sphere((20, 20, 20), 5.0)
    empty = np.zeros_like(a)
    m = segmentation_metrics(a, empty, (1.0, 1.0, 1.0))
    assert (m.dice, m.jaccard, m.surface_dice) == (0.0, 0.0, 0.0)
    assert m.hd95_mm == math.inf
    assert m.apl_pixels == int(
        (a & ~ndi.binary_erosion(a, ndi.generate_binary_structure(3, 1)[None, 1])).sum()
    )
    with pytest.raises(SegmentationError, match="both masks are empty"):
        segmentation_metrics(empty, empty, (1.0, 1.0, 1.0))
    with pytest.raises(SegmentationError, match="one shape"):
        dice(a, a[:-1])


def test_images_on_different_grids_are_refused() -> None:
    a = _sphere((12, 16, 16), 4.0)
    ref = sitk.GetImageFromArray(a.astype(np.uint8))
    ref.SetSpacing((1.2, 0.8, 2.5))
    pred = sitk.GetImageFromArray(np.roll(a, 1, axis=2).astype(np.uint8))
    pred.CopyInformation(ref)
    m = segmentation_metrics_image(ref, pred)
    assert m.hd95_mm == pytest.approx(1.2)  # one voxel along x (spacing 1.2 mm)
    pred.SetOrigin((0.0, 0.0, 1.0))
    with pytest.raises(SegmentationError, match="differ in origin"):
        segmentation_metrics_image(ref, pred)
