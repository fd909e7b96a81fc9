"""Lung isolation: a generated chest phantom (every step) and the real LUNG1 planning CTs."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from cohort.errors import SegmentationError
from cohort.segment.lung import LungIsolationSettings, isolate_lungs
from cohort.segment.metrics import dice

SPACING = (1.5, 1.5, 3.0)  # x, y, z mm
SHAPE = (40, 128, 128)  # z, y, x
SPINE_X = 66.0  # the spine's column, off the image centre on purpose
LUNG_X = (SPINE_X - 26.0, SPINE_X + 26.0)


def _ellipsoid(centre_zyx: tuple[float, ...], axes_zyx: tuple[float, ...]) -> np.ndarray:
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    return ((z - centre_zyx[0]) / axes_zyx[0]) ** 2 + ((y - centre_zyx[1]) / axes_zyx[1]) ** 2 + (
        (x - centre_zyx[2]) / axes_zyx[2]
    ) ** 2 <= 1.0


def _cylinder(centre_yx: tuple[float, float], radius: float, z0: int, z1: int) -> np.ndarray:
    _, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    z = np.arange(SHAPE[0])[:, None, None]
    return ((y - centre_yx[0]) ** 2 + (x - centre_yx[1]) ** 2 <= radius**2) & (z >= z0) & (z < z1)


def _phantom(collapse_left_below: int | None = None) -> tuple[sitk.Image, dict[str, np.ndarray]]:
    """A chest in HU: body, two lungs with vessels, trachea, spine, bowel gas and a hollow couch."""
    hu = np.full(SHAPE, -1000, dtype=np.int16)
    _, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    body = np.broadcast_to(((x - SPINE_X) / 56.0) ** 2 + ((y - 62) / 40.0) ** 2 <= 1.0, SHAPE)
    hu[body] = 40
    lungs = _ellipsoid((21, 58, LUNG_X[0]), (14, 26, 17)) | _ellipsoid((21, 58, LUNG_X[1]), (14, 26, 17))
    hu[lungs] = -850
    vessels = np.zeros(SHAPE, dtype=bool)
    for cy, cx in ((50, LUNG_X[0] + 4), (64, LUNG_X[0] - 6), (55, LUNG_X[1] - 3), (68, LUNG_X[1] + 7)):
        vessels |= _cylinder((cy, cx), 1.6, 0, SHAPE[0]) & lungs
    hu[vessels] = 40
    trachea = _cylinder((45, SPINE_X), 5.0, 27, SHAPE[0])
    bronchi = np.zeros(SHAPE, dtype=bool)
    bronchi[27:29, 43:48, int(LUNG_X[0]) : int(LUNG_X[1])] = True
    hu[trachea | bronchi] = -1000
    spine = _cylinder((88, SPINE_X), 7.0, 0, SHAPE[0])
    hu[spine] = 700
    gas = _cylinder((70, SPINE_X + 10), 4.0, 1, 4)
    hu[gas] = -1000
    hu[:, 106:116, 4:124] = 300  # the couch: a plate with a closed air chamber
    hu[:, 109:113, 8:120] = -1000
    truth = lungs.copy()
    if collapse_left_below is not None:
        left = _ellipsoid((21, 58, LUNG_X[1]), (14, 26, 17))
        collapsed = left & (np.arange(SHAPE[0])[:, None, None] < collapse_left_below)
        hu[collapsed] = 40
        truth &= ~collapsed
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(SPACING)
    image.SetOrigin((-100.0, -90.0, -60.0))
    return image, {"lungs": lungs, "truth": truth, "trachea": trachea, "gas": gas, "vessels": vessels}


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).astype(bool)


def test_phantom_lungs_are_found_with_vessels_and_without_trachea_gas_or_couch() -> None:
    image, parts = _phantom()
    result = isolate_lungs(image)
    lungs = _array(result.lungs)
    assert dice(lungs, parts["lungs"]) > 0.98
    deep = ndi.binary_erosion(parts["lungs"], iterations=2)
    assert lungs[parts["vessels"] & deep].all()  # vessels inside the lung are filled in
    assert not lungs[parts["gas"]].any()  # 1.3 ml of bowel gas: below min_component_ml
    assert not lungs[:, 100:, :].any()  # nothing from the couch's air chamber
    above_carina = parts["trachea"].copy()
    above_carina[:30] = False
    assert not lungs[above_carina].any()


def test_phantom_spine_axis_follows_the_spine() -> None:
    image, _ = _phantom()
    spine = isolate_lungs(image).spine
    assert spine.first_slice == 7  # the first lung slice
    np.testing.assert_allclose(spine.raw_column, SPINE_X, atol=0.05)
    np.testing.assert_allclose(spine.column, SPINE_X, atol=0.05)
    np.testing.assert_allclose(spine.x_mm, -100.0 + SPINE_X * SPACING[0], atol=0.1)


def test_mirroring_keeps_a_collapsed_lung_and_the_margin_is_a_5_mm_disc() -> None:
    image, parts = _phantom(collapse_left_below=21)
    result = isolate_lungs(image)
    lungs, mirrored, mask = _array(result.lungs), _array(result.mirrored), _array(result.mask)
    collapsed = parts["lungs"] & ~parts["truth"]
    assert lungs[collapsed].mean() < 0.05  # the air-based mask misses the collapsed lung ...
    assert mirrored[collapsed].mean() > 0.98  # ... the mirror of the other lung restores it
    # The margin: the mask is the in-plane 5 mm dilation of the mirrored mask, exactly.
    distance = ndi.distance_transform_edt(~mirrored, sampling=(1e6, SPACING[1], SPACING[0]))
    np.testing.assert_array_equal(mask, distance <= 5.0 + 1e-9)
    # Everything outside the mask is air in the isolated image, everything inside untouched.
    isolated, original = sitk.GetArrayFromImage(result.image), sitk.GetArrayFromImage(image)
    assert (isolated[~mask] == -1000).all()
    np.testing.assert_array_equal(isolated[mask], original[mask])
    assert result.image.GetOrigin() == image.GetOrigin()


def test_settings_are_validated_and_non_axial_images_refused() -> None:
    with pytest.raises(SegmentationError, match="spine_alpha"):
        LungIsolationSettings(spine_alpha=0.0)
    with pytest.raises(SegmentationError, match="radii"):
        LungIsolationSettings(margin_radius_mm=-1.0)
    image, _ = _phantom()
    tilted = sitk.Image(image)
    c, s = np.cos(0.3), np.sin(0.3)
    tilted.SetDirection((1.0, 0.0, 0.0, 0.0, c, -s, 0.0, s, c))
    with pytest.raises(SegmentationError, match="not axial"):
        isolate_lungs(tilted)
    no_air = sitk.GetImageFromArray(np.full((8, 32, 32), 40, np.int16))
    with pytest.raises(SegmentationError, match="air-filled volume"):
        isolate_lungs(no_air)


def test_a_zero_margin_and_no_join_leave_the_mirrored_union() -> None:
    image, _ = _phantom(collapse_left_below=21)
    settings = replace(LungIsolationSettings(), margin_radius_mm=0.0, join_radius_mm=0.0)
    result = isolate_lungs(image, settings)
    np.testing.assert_array_equal(_array(result.mask), _array(result.mirrored))
    assert result.settings is settings


# -- real planning CTs ----------------------------------------------------------------------------


def _lung1_case(lung1_archive: Path, patient: str) -> tuple[sitk.Image, dict[str, np.ndarray]]:
    from cohort.curate.rtstruct import rasterise_rtstruct, read_roi_infos
    from cohort.curate.series import read_series

    folder = next(lung1_archive.glob(f"{patient}_*"))
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in folder.iterdir()}
    ct = read_series([str(p) for p, h in headers.items() if h.Modality == "CT"])
    rs = pydicom.dcmread(next(p for p, h in headers.items() if h.Modality == "RTSTRUCT"))
    numbers = {r.name: r.number for r in read_roi_infos(rs)}
    masks = {
        name: sitk.GetArrayFromImage(rasterise_rtstruct(rs, numbers[name], ct).mask).astype(bool)
        for name in ("Lung L", "Lung R", "GTV-1", "Spinal cord")
    }
    return ct, masks


#: Measured on 2026-11-27 with the default settings (2-core machine shared with other jobs):
#: LUNG1-001 Dice 0.969, GTV 100 % inside; LUNG1-002 Dice 0.935, GTV 99.96 % inside.
#: The Dice of LUNG1-002 is capped near 0.98 by five reference slices on which Lung L
#: was not contoured (~53k voxels that any lung mask must count as false positives).
@pytest.mark.slow
@pytest.mark.parametrize("patient", ["LUNG1-001", "LUNG1-002"])
def test_real_lungs_match_the_rtstruct_and_the_mask_holds_the_tumour(
    lung1_archive: Path, patient: str
) -> None:
    ct, masks = _lung1_case(lung1_archive, patient)
    start = time.perf_counter()
    result = isolate_lungs(ct)
    seconds = time.perf_counter() - start
    reference = masks["Lung L"] | masks["Lung R"]
    lungs, mask = _array(result.lungs), _array(result.mask)
    assert dice(lungs, reference) >= 0.93
    gtv = masks["GTV-1"]
    assert np.count_nonzero(gtv & mask) / np.count_nonzero(gtv) >= 0.99
    # The mask is a margin, not the chest: well under the body's volume.
    assert np.count_nonzero(mask) < 2.0 * np.count_nonzero(reference)
    # The spine axis runs through the spinal cord (median within 5 mm on the lung slices).
    cord = masks["Spinal cord"][
        result.spine.first_slice : result.spine.first_slice + len(result.spine.column)
    ]
    has_cord = cord.any(axis=(1, 2))
    cord_x = np.array([np.flatnonzero(s.any(axis=0)).mean() for s in cord[has_cord]])
    offset_mm = np.abs(result.spine.column[has_cord] - cord_x) * ct.GetSpacing()[0]
    assert np.median(offset_mm) < 5.0
    assert seconds < 60  # generous: a loaded 2-core machine; benchmarks/bench_segment_cpu.py measures


#: On the demo model's 2 mm grid (the segmentation pipeline's ``preprocess_on: model_grid``), measured
#: 2026-11-27: LUNG1-001 Dice 0.972, GTV 100 % inside; LUNG1-002 Dice 0.934, GTV 99.83 % inside.
@pytest.mark.slow
@pytest.mark.parametrize("patient", ["LUNG1-001", "LUNG1-002"])
def test_real_lungs_on_the_model_grid_still_match_and_hold_the_tumour(
    lung1_archive: Path, patient: str
) -> None:
    from cohort.curate.rtstruct import rasterise_rtstruct, read_roi_infos
    from cohort.segment.model import load_model
    from cohort.segment.pipeline import model_grid, resample_to_grid

    ct, _ = _lung1_case(lung1_archive, patient)
    model = load_model("demo-lung-gtv")
    grid = model_grid(ct, model.manifest)
    on_grid = grid.image(resample_to_grid(ct, grid, model.manifest))
    assert on_grid.GetSpacing()[:2] == (2.0, 2.0)
    result = isolate_lungs(on_grid)
    folder = next(lung1_archive.glob(f"{patient}_*"))
    rs_path = next(
        p for p in folder.iterdir() if pydicom.dcmread(p, stop_before_pixels=True).Modality == "RTSTRUCT"
    )
    rs = pydicom.dcmread(rs_path)
    numbers = {r.name: r.number for r in read_roi_infos(rs)}

    def on(name: str) -> np.ndarray:
        return sitk.GetArrayFromImage(rasterise_rtstruct(rs, numbers[name], on_grid).mask).astype(bool)

    assert dice(_array(result.lungs), on("Lung L") | on("Lung R")) >= 0.93
    gtv = on("GTV-1")
    assert np.count_nonzero(gtv & _array(result.mask)) / np.count_nonzero(gtv) >= 0.99
