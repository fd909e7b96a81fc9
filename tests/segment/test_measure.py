"""Measurements against analytic shapes: volume, RECIST longest axial diameter, volumetric RECIST."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from cohort.errors import SegmentationError
from cohort.segment.measure import (
    equivalent_sphere_diameter,
    longest_axial_diameter,
    max_3d_diameter,
    measure_mask,
    volume_mm3,
)


def _ball(radius: float, spacing: float) -> np.ndarray:
    n = int(2 * radius / spacing) + 6
    c = (np.arange(n) - (n - 1) / 2) * spacing
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return x**2 + y**2 + z**2 <= radius**2


@pytest.mark.parametrize("spacing", [0.25, 0.5])
def test_sphere(spacing: float) -> None:
    r = 10.0
    ball = _ball(r, spacing)
    s = (spacing,) * 3
    volume = volume_mm3(ball, s)
    assert abs(volume / (4 / 3 * math.pi * r**3) - 1) < 0.02
    assert abs(equivalent_sphere_diameter(volume) - 2 * r) < 0.01 * 2 * r
    axial = longest_axial_diameter(ball, s)
    # Pixel-corner convention: never shorter than the digitised disc, at most one pixel diagonal longer
    # than the true diameter (measured: 20.30 mm at 0.25 mm, 20.62 mm at 0.5 mm).
    assert 2 * r - spacing <= axial.length_mm <= 2 * r + math.sqrt(2) * spacing
    # on a slice near the equator: one whose true section is within a pixel diagonal of 2 r
    dz = abs(axial.slice_index - (ball.shape[0] - 1) / 2) * spacing
    assert 2 * math.sqrt(r**2 - dz**2) >= 2 * r - math.sqrt(2) * spacing
    three_d = max_3d_diameter(ball, s)
    assert 2 * r <= three_d.length_mm <= 2 * r + math.sqrt(3) * spacing
    assert three_d.length_mm >= axial.length_mm


@pytest.mark.parametrize(("sy", "sx"), [(0.5, 0.5), (1.0, 0.5), (0.25, 2.0)])
def test_rectangle_10_by_20_mm_gives_the_diagonal_exactly(sy: float, sx: float) -> None:
    mask = np.zeros((5, 200, 200), dtype=bool)
    rows, cols = round(10 / sy), round(20 / sx)
    mask[2, 7 : 7 + rows, 11 : 11 + cols] = True
    d = longest_axial_diameter(mask, (3.0, sy, sx))
    assert d.length_mm == pytest.approx(math.sqrt(500), abs=1e-9)
    assert d.slice_index == 2
    ends = sorted([d.start_index, d.end_index])
    assert ends in (
        [(10.5, 6.5, 2.0), (10.5 + cols, 6.5 + rows, 2.0)],
        [(10.5, 6.5 + rows, 2.0), (10.5 + cols, 6.5, 2.0)],
    )


def test_rotated_rectangle_within_one_pixel_diagonal() -> None:
    s = 0.2
    n = 200
    c = (np.arange(n) - (n - 1) / 2) * s
    y, x = np.meshgrid(c, c, indexing="ij")
    a = math.radians(30)
    u, v = x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)
    mask = ((np.abs(u) <= 10) & (np.abs(v) <= 5))[None]
    d = longest_axial_diameter(mask, (1.0, s, s)).length_mm
    assert abs(d - math.sqrt(500)) <= math.sqrt(2) * s


def test_box_3d_diameter_and_volume() -> None:
    mask = np.zeros((20, 40, 40), dtype=bool)
    mask[2:12, 5:25, 5:35] = True  # 30 x 20 x 10 mm at 1 mm
    assert max_3d_diameter(mask, (1.0, 1.0, 1.0)).length_mm == pytest.approx(math.sqrt(900 + 400 + 100))
    assert volume_mm3(mask, (1.0, 1.0, 1.0)) == 6000.0
    assert longest_axial_diameter(mask, (1.0, 1.0, 1.0)).length_mm == pytest.approx(math.sqrt(1300))


def test_longest_slice_wins_and_single_voxel() -> None:
    mask = np.zeros((3, 30, 30), dtype=bool)
    mask[0, 5:10, 5:10] = True
    mask[2, 0:2, 0:25] = True  # 25 x 2 px: longer
    d = longest_axial_diameter(mask, (2.0, 1.0, 1.0))
    assert d.slice_index == 2 and d.length_mm == pytest.approx(math.hypot(25, 2))
    one = np.zeros((1, 3, 3), dtype=bool)
    one[0, 1, 1] = True
    assert longest_axial_diameter(one, (1.0, 0.7, 0.7)).length_mm == pytest.approx(0.7 * math.sqrt(2))
    with pytest.raises(SegmentationError, match="the mask is empty"):
        longest_axial_diameter(np.zeros((2, 2, 2), bool), (1.0, 1.0, 1.0))


def test_measure_mask_in_patient_coordinates() -> None:
    array = np.zeros((6, 50, 60), dtype=np.uint8)
    array[3, 10:30, 20:30] = 1  # 10 columns x 1 mm, 20 rows x 0.5 mm: 10 x 10 mm
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 0.5, 2.5))
    image.SetOrigin((-100.0, 50.0, 300.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    m = measure_mask(image)
    assert (
        m.voxels == 200 and m.volume_mm3 == pytest.approx(200 * 1.25) and m.volume_ml == pytest.approx(0.25)
    )
    assert m.recist_mm == pytest.approx(math.hypot(10, 10))  # 10 px x 1 mm by 20 px x 0.5 mm
    assert m.recist_slice == 3
    assert {m.recist_start_mm[2], m.recist_end_mm[2]} == {300.0 + 3 * 2.5}
    xs = sorted([m.recist_start_mm[0], m.recist_end_mm[0]])
    assert xs == pytest.approx([-100.0 - 29.5, -100.0 - 19.5])  # x axis flipped
    ys = sorted([m.recist_start_mm[1], m.recist_end_mm[1]])
    assert ys == pytest.approx([50.0 + 9.5 * 0.5, 50.0 + 29.5 * 0.5])
    assert math.dist(m.recist_start_mm, m.recist_end_mm) == pytest.approx(m.recist_mm)
    assert m.volumetric_recist_mm == pytest.approx((6 * 250 / math.pi) ** (1 / 3))
    row = m.as_row("gtv_")
    assert row["gtv_recist_mm"] == m.recist_mm and row["gtv_recist_start_mm_z"] == 307.5
    with pytest.raises(SegmentationError, match="label 2 is empty"):
        measure_mask(image, label=2)


def test_agrees_with_pyradiomics_maximum_2d_diameter_slice() -> None:
    """pyradiomics measures on its marching-cubes mesh (vertices half-way between voxel centres), so
    its value is at most ours and within one pixel diagonal of it."""
    radiomics = pytest.importorskip("radiomics")
    from radiomics import shape

    s = (0.7, 0.7, 2.0)
    n = 48
    z, y, x = np.indices((12, n, n)).astype(float)
    mask = ((x - 20) * s[0] / 11) ** 2 + ((y - 25) * s[1] / 7) ** 2 + ((z - 6) * s[2] / 9) ** 2 <= 1
    image = sitk.GetImageFromArray(mask.astype(np.float32))
    image.SetSpacing(s)
    label = sitk.GetImageFromArray(mask.astype(np.uint8))
    label.SetSpacing(s)
    radiomics.setVerbosity(60)
    features = shape.RadiomicsShape(image, label)
    theirs = float(features.getMaximum2DDiameterSliceFeatureValue())
    ours = longest_axial_diameter(mask, (s[2], s[1], s[0])).length_mm
    assert theirs <= ours <= theirs + math.hypot(s[0], s[1])
