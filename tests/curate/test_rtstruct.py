from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from cohort.curate.rtstruct import RoiInfo, RoiKind, rasterise_contours, rasterise_rtstruct, read_roi_infos
from cohort.errors import RTStructError


def _grid(nx: int = 20, ny: int = 20, nz: int = 3, spacing: float = 1.0) -> sitk.Image:
    image = sitk.Image(nx, ny, nz, sitk.sitkInt16)
    image.SetSpacing((spacing, spacing, 2.0))
    return image


def _square(x0: float, y0: float, x1: float, y1: float, z: float = 2.0) -> np.ndarray:
    return np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], dtype=float)


def test_square_covers_the_pixel_centres_inside_it() -> None:
    # Edges at x = 2.5 and 7.5: centres 3..7 inside (5 columns), same for rows.
    mask, notes = rasterise_contours([_square(2.5, 2.5, 7.5, 7.5)], _grid())
    assert notes == []
    assert mask[1].sum() == 25 and mask[0].sum() == 0 and mask[2].sum() == 0
    assert mask[1, 3:8, 3:8].all()


def test_boundary_rule_is_half_open() -> None:
    # Edges exactly on centres 2 and 6: left/top edge in, right/bottom edge out -> 4 x 4.
    mask, _ = rasterise_contours([_square(2.0, 2.0, 6.0, 6.0)], _grid())
    assert mask[1].sum() == 16
    assert mask[1, 2:6, 2:6].all()


def test_inner_polygon_is_a_hole_and_disjoint_polygons_are_both_kept() -> None:
    outer, hole = _square(1.5, 1.5, 9.5, 9.5), _square(3.5, 3.5, 6.5, 6.5)
    island = _square(12.5, 12.5, 15.5, 15.5)
    mask, _ = rasterise_contours([outer, hole, island], _grid())
    assert mask[1].sum() == 64 - 9 + 9
    assert not mask[1, 4:7, 4:7].any()
    assert mask[1, 13:16, 13:16].all()


def test_off_grid_contours_are_reported() -> None:
    mask, notes = rasterise_contours(
        [_square(2.5, 2.5, 5.5, 5.5, z=20.0), _square(2.5, 2.5, 5.5, 5.5, z=3.0)], _grid()
    )
    assert mask.sum() == 0
    assert any("outside the image" in n for n in notes)
    assert any("not on a slice plane" in n for n in notes)


@settings(max_examples=40, deadline=None)
@given(
    cx=st.floats(20, 44),
    cy=st.floats(20, 44),
    a=st.floats(4, 18),
    b=st.floats(4, 18),
)
def test_rasterised_ellipse_area_matches_the_analytic_area(cx: float, cy: float, a: float, b: float) -> None:
    t = np.linspace(0, 2 * np.pi, 256, endpoint=False)
    poly = np.column_stack([cx + a * np.cos(t), cy + b * np.sin(t), np.full_like(t, 2.0)])
    mask, _ = rasterise_contours([poly], _grid(64, 64))
    perimeter = 2 * np.pi * np.sqrt((a * a + b * b) / 2)
    # Pixel-centre sampling errs by at most about one pixel per unit of perimeter.
    assert abs(mask.sum() - np.pi * a * b) <= perimeter


def _lung1(lung1_archive: Path, patient: str) -> tuple[list[str], pydicom.Dataset]:
    folder = next(lung1_archive.glob(f"{patient}_*"))
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in folder.iterdir()}
    ct = [str(p) for p, h in headers.items() if h.Modality == "CT"]
    rs = next(p for p, h in headers.items() if h.Modality == "RTSTRUCT")
    return ct, pydicom.dcmread(rs)


@pytest.mark.parametrize("patient", ["LUNG1-001", "LUNG1-002"])
def test_real_gtv_mask_is_bit_identical_to_the_reference_mask(
    lung1_archive: Path, lung1_reference, patient: str
) -> None:
    """pyradiomics' diagnostics of the reference hold the voxel count and sha1 of its mask."""
    from cohort.curate.series import read_series

    ct, rs = _lung1(lung1_archive, patient)
    image = read_series(ct)
    number = next(r.number for r in read_roi_infos(rs) if r.name == "GTV-1")
    roi = rasterise_rtstruct(rs, number, image)
    ref = lung1_reference.loc[patient]
    assert roi.voxel_count == int(ref["diagnostics_Mask-original_VoxelNum"])
    array = sitk.GetArrayViewFromImage(roi.mask).astype(np.int32)  # the reference mask was int32
    assert (
        hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()
        == ref["diagnostics_Mask-original_Hash"]
    )


def test_point_rois_are_skipped_with_a_note_and_refused_as_masks(lung1_archive: Path) -> None:
    from cohort.curate.series import read_series

    ct, rs = _lung1(lung1_archive, "LUNG1-001")
    infos = {r.name: r for r in read_roi_infos(rs)}
    assert infos["Isocenter 6"].geometric_types == ("POINT",)
    assert infos["Lung L"].geometric_types == ("CLOSED_PLANAR",)
    with pytest.raises(RTStructError, match="POINT skipped"):
        rasterise_rtstruct(rs, infos["Isocenter 6"].number, read_series(ct))


def test_point_and_empty_rois_say_why_they_give_no_mask(lung1_archive: Path) -> None:
    _, rs = _lung1(lung1_archive, "LUNG1-001")
    infos = {r.name: r for r in read_roi_infos(rs)}
    assert infos["GTV-1"].kind == RoiKind.VOLUME and infos["GTV-1"].skip_note is None
    assert infos["Isocenter 6"].kind == RoiKind.POINT
    assert infos["Isocenter 6"].skip_note == "ROI 'Isocenter 6' is a POINT ROI (e.g. an isocentre); skipped"
    empty = RoiInfo(99, "Empty", (), 0)
    assert empty.kind == RoiKind.EMPTY and empty.skip_note == "ROI 'Empty' has no contours; skipped"
    assert RoiInfo(7, "Line", ("OPEN_PLANAR",), 2).kind == RoiKind.OTHER
