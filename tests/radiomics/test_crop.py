"""Cropping to the ROI before extraction changes no value beyond the filters' tails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from cohort.curate.rtstruct import rasterise_rtstruct, read_roi_infos
from cohort.curate.series import read_series
from cohort.errors import RadiomicsError
from cohort.radiomics.crop import crop_for_extraction, filter_reach_mm
from cohort.radiomics.extract import extract_features
from cohort.spec import load_preset

FILTERS_NO_RESAMPLING: dict[str, Any] = {
    "setting": {"binWidth": 25, "voxelArrayShift": 1000, "label": 1},
    "imageType": {"Original": {}, "LoG": {"sigma": [1.0, 3.0, 5.0]}, "Wavelet": {}},
}


def _gtv(lung1_archive: Path, patient: str) -> tuple[sitk.Image, sitk.Image]:
    folder = next(lung1_archive.glob(f"{patient}_*"))
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in folder.iterdir()}
    image = read_series([str(p) for p, h in headers.items() if h.Modality == "CT"])
    rs = pydicom.dcmread(next(p for p, h in headers.items() if h.Modality == "RTSTRUCT"))
    number = next(r.number for r in read_roi_infos(rs) if r.name == "GTV-1")
    return image, rasterise_rtstruct(rs, number, image).mask


def _worst_by_image_type(a: dict[str, float], b: dict[str, float]) -> dict[str, tuple[float, str]]:
    assert a.keys() == b.keys()
    worst: dict[str, tuple[float, str]] = {}
    for name in a:
        image_type = name.split("_")[0]
        rel = abs(a[name] - b[name]) / max(abs(a[name]), 1e-12)
        if rel >= worst.get(image_type, (-1.0, ""))[0]:
            worst[image_type] = (rel, name)
    return worst


def _compare(image: sitk.Image, mask: sitk.Image, params: dict[str, Any], label: str) -> dict[str, float]:
    uncropped = extract_features(image, mask, params, crop=False)
    cropped = extract_features(image, mask, params, crop=True)
    worst = _worst_by_image_type(uncropped, cropped)
    print(f"\n{label}: worst relative difference, cropped vs uncropped, per image type")
    for image_type, (rel, name) in sorted(worst.items()):
        print(f"  {image_type:24s} {rel:9.2e}  {name}")
    assert all(uncropped[n] == cropped[n] for n in uncropped if n.startswith("original_"))
    return {image_type: rel for image_type, (rel, _) in worst.items()}


@pytest.mark.slow
@pytest.mark.parametrize("patient", ["LUNG1-001", "LUNG1-002"])
def test_ct_filters_preset_cropped_equals_uncropped(lung1_archive: Path, patient: str) -> None:
    image, mask = _gtv(lung1_archive, patient)
    worst = _compare(image, mask, load_preset("ct-filters"), f"{patient} ct-filters (1 mm resampling)")
    assert len(worst) == 1 + 5 + 8  # original, 5 LoG sigmas, 8 wavelet bands
    assert max(worst.values()) <= 1e-12  # with resampling the crop is exact: same grid, same filters


@pytest.mark.slow
def test_filters_without_resampling_stay_within_1e_4(lung1_archive: Path) -> None:
    image, mask = _gtv(lung1_archive, "LUNG1-001")
    worst = _compare(image, mask, FILTERS_NO_RESAMPLING, "LUNG1-001 LoG + wavelet, no resampling")
    assert len(worst) == 1 + 3 + 8
    assert max(worst.values()) <= 1e-4


def _sphere(shape: tuple[int, int, int] = (40, 60, 60), radius: float = 8.0) -> tuple[sitk.Image, sitk.Image]:
    rng = np.random.default_rng(1)
    image = sitk.GetImageFromArray(rng.normal(0, 50, size=shape).round().astype(np.int16))
    image.SetSpacing((0.8, 0.8, 2.0))
    zz, yy, xx = np.indices(shape)
    inside = ((zz - 20) * 2.0) ** 2 + ((yy - 30) * 0.8) ** 2 + ((xx - 30) * 0.8) ** 2 <= radius**2
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


def test_margin_rule_with_resampling_crops_only_the_image() -> None:
    image, mask = _sphere()
    cropped, handed_mask, _, plan = crop_for_extraction(image, mask, load_preset("ct-original"))
    assert handed_mask is mask and not plan.crop_mask
    # (padDistance 5 + 1) x 1 mm + 24 B-spline voxels x 2 mm = 54 mm on every side.
    assert plan.margin_mm == pytest.approx(6 * 1.0 + 24 * 2.0)
    assert cropped.GetSize() == (60, 60, 40)  # the sphere plus 54 mm exceeds this small image


def test_margin_rule_without_resampling_follows_the_widest_filter() -> None:
    image, mask = _sphere((40, 120, 120))
    cropped, cropped_mask, _, plan = crop_for_extraction(image, mask, FILTERS_NO_RESAMPLING)
    assert plan.crop_mask and cropped.GetSize() == cropped_mask.GetSize()
    assert plan.margin_mm == pytest.approx(filter_reach_mm(FILTERS_NO_RESAMPLING, (0.8, 0.8, 2.0)))
    assert plan.margin_mm == pytest.approx(6 * 5.0 + 2.0)  # LoG sigma 5 mm: 6 sigma + one voxel
    assert int(sitk.GetArrayViewFromImage(cropped_mask).sum()) == int(sitk.GetArrayViewFromImage(mask).sum())
    assert cropped.GetSize()[0] < 120


def test_memory_cap_refuses_a_case_with_the_reason() -> None:
    image, mask = _sphere()
    with pytest.raises(RadiomicsError, match=r"exceeds the cap of 0 MiB \(radiomics.max_case_mb\)"):
        extract_features(image, mask, load_preset("ct-original"), max_case_mb=0.01)
    features = extract_features(image, mask, load_preset("ct-original"), max_case_mb=512)
    assert features["original_shape_VoxelVolume"] > 0


@pytest.mark.parametrize(
    "preset", ["ct-original", "ct-filters", "ct-all-filters", "mr-zscore", "mr-zscore-filters", "pet-suv"]
)
def test_every_shipped_preset_extracts_on_a_phantom(preset: str) -> None:
    image, mask = _sphere()
    params = load_preset(preset)
    features = extract_features(image, mask, params)
    image_types = {name.split("_")[0] for name in features}
    expected = {"original"} | ({"log-sigma-1-0-mm-3D"} if "LoG" in params["imageType"] else set())
    assert expected <= image_types
    if preset.startswith("mr-"):
        # Normalised before cropping: the whole image's z-score, scaled by 100.
        values = sitk.GetArrayViewFromImage(image).astype(float)
        inside = values[sitk.GetArrayViewFromImage(mask) == 1]
        expected_mean = ((inside - values.mean()) / values.std() * 100).mean()
        assert features["original_firstorder_Mean"] == pytest.approx(expected_mean, abs=2.0)
