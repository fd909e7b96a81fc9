from __future__ import annotations

import hashlib
import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from cohort.curate.geometry import (
    DuplicateAction,
    GeometryFlag,
    ReadPolicy,
    SpacingAction,
    TiltAction,
    split_series,
)
from cohort.curate.series import assemble_series, headers_from_dataset, read_series
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


@pytest.mark.parametrize(
    "defect, message",
    [
        ("drop", r"missing slices: 1 missing .*\(set qc.geometry.irregular_spacing: resample"),
        ("duplicate", "duplicate slice position"),
    ],
)
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
        hashlib.sha1(sitk.GetArrayViewFromImage(image).tobytes()).hexdigest()
        == ref["diagnostics_Image-original_Hash"]
    )
    assert str(image.GetSize()) == ref["diagnostics_Image-original_Size"]
    assert sitk.GetArrayViewFromImage(image).mean() == pytest.approx(
        float(ref["diagnostics_Image-original_Mean"]), rel=1e-12
    )


def _edit(path: str | Path, **attributes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if "SOPInstanceUID" in attributes:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path)


def test_missing_slice_resampled_when_the_policy_allows(tmp_path: Path) -> None:
    volume = _ramp(nz=6)
    paths = [str(p) for p in write_ct_slices(tmp_path, volume)]
    del paths[3]
    result = assemble_series(paths, policy=ReadPolicy(irregular_spacing=SpacingAction.RESAMPLE))
    array = sitk.GetArrayFromImage(result.image)
    hu = volume.astype(np.int32) - 1024
    assert array.dtype == np.int16 and array.shape == (6, 4, 6)
    # Acquired slices unchanged; the missing one interpolated halfway (the ramp makes it exact).
    np.testing.assert_array_equal(array[[0, 1, 2, 4, 5]], hu[[0, 1, 2, 4, 5]])
    np.testing.assert_array_equal(array[3], (hu[2] + hu[4]) // 2)
    assert result.image.GetSpacing() == (1.0, 1.0, 2.0)
    assert result.geometry.flags == (GeometryFlag.MISSING_SLICES,)
    assert result.actions == ("resampled onto a regular grid at 2.000 mm: 1 of 6 slices interpolated",)


def test_irregular_spacing_resampled_onto_the_median_spacing(tmp_path: Path) -> None:
    volume = _ramp(nz=6)
    paths = [str(p) for p in write_ct_slices(tmp_path, volume, slope=0.5)]  # float image
    _edit(paths[2], ImagePositionPatient=[0.0, 0.0, 5.0])  # z = 0, 2, 5, 6, 8, 10
    with pytest.raises(
        SeriesAssemblyError, match=r"irregular slice spacing \(uneven\).*largest deviation 1.000"
    ):
        read_series(paths)
    image = read_series(paths, policy=ReadPolicy(irregular_spacing=SpacingAction.RESAMPLE))
    array = sitk.GetArrayFromImage(image)
    values = volume.astype(np.float64) * 0.5 - 1024
    assert array.shape == (6, 4, 6)
    np.testing.assert_allclose(array[2], values[1] + (values[2] - values[1]) * 2 / 3, rtol=1e-6)
    np.testing.assert_array_equal(array[[0, 1, 3, 4, 5]], values[[0, 1, 3, 4, 5]])


def test_gantry_tilt_refused_with_the_angle_or_resampled_onto_an_orthogonal_grid(tmp_path: Path) -> None:
    # A bar fixed in patient space at y = 10 mm, seen by slices whose origins move 1 mm in y per slice:
    # the scanner's sheared stack (tilt atan(1 / 2) = 26.57 degrees).
    nz, ny, nx = 5, 24, 6
    volume = np.full((nz, ny, nx), 24, np.uint16)
    for k in range(nz):
        volume[k, 10 - k] = 2024
    paths = write_ct_slices(tmp_path, volume)
    for k, path in enumerate(paths):
        _edit(path, ImagePositionPatient=[0.0, float(k), 2.0 * k])
    with pytest.raises(SeriesAssemblyError, match=r"stack leans 26.57° .*gantry_tilt: resample"):
        read_series([str(p) for p in paths])
    result = assemble_series([str(p) for p in paths], policy=ReadPolicy(gantry_tilt=TiltAction.RESAMPLE))
    array = sitk.GetArrayFromImage(result.image)
    assert (array[:, 10] == 1000).all() and (np.delete(array, 10, axis=1)[:, : ny - nz] == -1000).all()
    assert result.image.GetOrigin() == (0.0, 0.0, 0.0) and result.image.GetSpacing() == (1.0, 1.0, 2.0)
    assert result.actions == ("gantry tilt of 26.57° corrected: slices shifted onto an orthogonal grid",)


def test_duplicate_positions_keep_the_first_instance_when_asked(tmp_path: Path) -> None:
    paths = [str(p) for p in write_ct_slices(tmp_path, _ramp(nz=4))]
    for k, path in enumerate(paths):
        _edit(path, InstanceNumber=k + 1)
    extra = tmp_path / "extra.dcm"
    ds = pydicom.dcmread(paths[1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = 9
    ds.PixelData = np.zeros((4, 6), np.uint16).tobytes()
    ds.save_as(extra)
    image = read_series(
        [str(extra), *paths], policy=ReadPolicy(duplicate_positions=DuplicateAction.KEEP_FIRST)
    )
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), _ramp(nz=4).astype(np.int32) - 1024)


def test_two_acquisitions_refused_whole_and_read_per_sub_series(tmp_path: Path) -> None:
    first = write_ct_slices(tmp_path / "a", _ramp(), series_uid="1.2.8")
    second = write_ct_slices(tmp_path / "b", _ramp() + 5, series_uid="1.2.8")
    for n, paths in ((1, first), (2, second)):
        for path in paths:
            _edit(path, AcquisitionNumber=n)
    everything = [str(p) for p in [*first, *second]]
    with pytest.raises(SeriesAssemblyError, match=r"2 acquisitions.*split it by acquisition"):
        read_series(everything, series_uid="1.2.8")
    headers = [h for p in everything for h in headers_from_dataset(pydicom.dcmread(p), p)]
    parts = split_series(headers, series_uid="1.2.8").parts
    assert [p.key for p in parts] == ["1.2.8#acq1", "1.2.8#acq2"]
    images = [sitk.GetArrayFromImage(read_series(p.paths, series_uid=p.key)) for p in parts]
    np.testing.assert_array_equal(images[1] - images[0], np.full((5, 4, 6), 5))


def test_enhanced_multi_frame_ct_reads_like_its_single_frame_slices(tmp_path: Path) -> None:
    c, s = np.cos(0.3), np.sin(0.3)
    paths = write_ct_slices(
        tmp_path / "ct", _ramp(nz=6), spacing=(0.8, 0.7, 2.5), row_cosine=(c, s, 0), col_cosine=(-s, c, 0)
    )
    datasets = [pydicom.dcmread(p) for p in paths]
    for k, ds in enumerate(datasets):
        ds.StudyDate, ds.StudyTime, ds.InstanceNumber = "20200101", "120000", k + 1
        ds.PatientName, ds.ImageType = "Test^Patient", ["ORIGINAL", "PRIMARY", "AXIAL"]
    random.Random(2).shuffle(datasets)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets,
        series_instance_uid=generate_uid(),
        series_number=1,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    enhanced.save_as(tmp_path / "enhanced.dcm")
    single = read_series([str(p) for p in paths])
    result = assemble_series([str(tmp_path / "enhanced.dcm")])
    assert result.geometry.flags == (GeometryFlag.MULTI_FRAME,)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.image), sitk.GetArrayFromImage(single))
    assert result.image.GetOrigin() == single.GetOrigin()
    assert result.image.GetSpacing() == single.GetSpacing()
    np.testing.assert_allclose(result.image.GetDirection(), single.GetDirection(), atol=1e-12)


def test_real_ct_with_a_dropped_slice_is_refused_or_interpolated(lung1_archive: Path) -> None:
    folder = next(lung1_archive.glob("LUNG1-001_*"))
    headers = {str(p): pydicom.dcmread(p, stop_before_pixels=True) for p in folder.iterdir()}
    ct = sorted(
        (p for p, h in headers.items() if h.Modality == "CT"),
        key=lambda p: headers[p].ImagePositionPatient[2],
    )
    healthy = sitk.GetArrayFromImage(read_series(ct))
    damaged = ct[:60] + ct[61:]
    with pytest.raises(SeriesAssemblyError, match="missing slices: 1 missing"):
        read_series(damaged)
    repaired = sitk.GetArrayFromImage(
        read_series(damaged, policy=ReadPolicy(irregular_spacing=SpacingAction.RESAMPLE))
    )
    assert repaired.shape == healthy.shape and repaired.dtype == healthy.dtype
    np.testing.assert_array_equal(np.delete(repaired, 60, axis=0), np.delete(healthy, 60, axis=0))
    expected = np.rint((healthy[59].astype(np.float64) + healthy[61]) / 2)
    np.testing.assert_array_equal(repaired[60], expected)
