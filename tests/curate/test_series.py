from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from cohort.curate.series import read_series
from cohort.errors import SeriesAssemblyError
from tests.helpers import write_ct_slices


def _ramp(nz: int = 5, ny: int = 4, nx: int = 6) -> np.ndarray:
    return (np.arange(nz * ny * nx).reshape(nz, ny, nx) + 1000).astype(np.uint16)


def test_slices_sorted_along_the_normal_not_by_file_order(tmp_path: Path) -> None:
    volume = _ramp()
    paths = [str(p) for p in write_ct_slices(tmp_path, volume)]
    random.Random(0).shuffle(paths)
    image = read_series(paths)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume.astype(np.int32) - 1024)
    assert image.GetSpacing() == (1.0, 1.0, 2.0)
    assert sitk.GetArrayViewFromImage(image).dtype == np.int16


def test_oblique_series_geometry_maps_voxels_to_patient_positions(tmp_path: Path) -> None:
    # Rotated 30 degrees about z, then the stack goes along the normal: z sorting would
    # still work here, so also reverse it (feet-first) to check the sign is handled.
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    row, col = (c, s, 0.0), (-s, c, 0.0)
    volume = _ramp()
    write_ct_slices(
        tmp_path, volume, origin=(10.0, -5.0, 100.0), row_cosine=row, col_cosine=col, spacing=(0.7, 0.8, 2.5)
    )
    image = read_series(sorted(str(p) for p in tmp_path.iterdir()))
    # Voxel (x=2, y=3, z=4) must sit at origin + 2*0.7*row + 3*0.8*col + 4*2.5*normal.
    expected = (
        np.array([10.0, -5.0, 100.0])
        + 2 * 0.7 * np.array(row)
        + 3 * 0.8 * np.array(col)
        + 4 * 2.5 * np.cross(row, col)
    )
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((2, 3, 4)), expected, atol=1e-9)


def test_non_integer_rescale_gives_float_image(tmp_path: Path) -> None:
    paths = write_ct_slices(tmp_path, _ramp(), slope=0.5, intercept=-1024.0)
    image = read_series([str(p) for p in paths])
    array = sitk.GetArrayViewFromImage(image)
    assert array.dtype == np.float32
    assert array[0, 0, 0] == pytest.approx(1000 * 0.5 - 1024)


@pytest.mark.parametrize("defect, message", [("drop", "irregular slice spacing"), ("duplicate", "duplicate")])
def test_damaged_series_fail_with_the_reason(tmp_path: Path, defect: str, message: str) -> None:
    paths = [str(p) for p in write_ct_slices(tmp_path, _ramp(nz=6))]
    if defect == "drop":
        paths.pop(3)
    else:
        ds = pydicom.dcmread(paths[2])
        ds.ImagePositionPatient = pydicom.dcmread(paths[1]).ImagePositionPatient
        ds.save_as(paths[2])
    with pytest.raises(SeriesAssemblyError, match=message) as info:
        read_series(paths, series_uid="1.2.3.series")
    assert info.value.subject == "1.2.3.series"


def test_mixed_sizes_are_refused(tmp_path: Path) -> None:
    paths = [str(p) for p in write_ct_slices(tmp_path / "a", _ramp(nz=3))]
    other = write_ct_slices(tmp_path / "b", np.zeros((1, 8, 8), np.uint16), series_uid="1.2")
    ds = pydicom.dcmread(other[0])
    ds.ImagePositionPatient = [0.0, 0.0, 6.0]
    ds.save_as(other[0])
    with pytest.raises(SeriesAssemblyError, match="mixed slice sizes"):
        read_series([*paths, str(other[0])])


@pytest.mark.parametrize("patient", ["LUNG1-001", "LUNG1-002"])
def test_real_ct_matches_the_reference_image_hash(lung1_archive: Path, lung1_reference, patient: str) -> None:
    """The reference features' diagnostics carry pyradiomics' sha1 of the image array."""
    folder = next(lung1_archive.glob(f"{patient}_*"))
    ct = [str(p) for p in folder.iterdir() if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT"]
    image = read_series(ct)
    ref = lung1_reference.loc[patient]
    assert (
        hashlib.sha1(sitk.GetArrayViewFromImage(image)).hexdigest() == ref["diagnostics_Image-original_Hash"]
    )
    assert str(image.GetSize()) == ref["diagnostics_Image-original_Size"]
    assert sitk.GetArrayViewFromImage(image).mean() == pytest.approx(
        float(ref["diagnostics_Image-original_Mean"]), rel=1e-12
    )
