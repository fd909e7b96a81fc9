"""NIfTI / NRRD round trips: geometry (LPS vs NIfTI's RAS), voxels, masks; nibabel reads the affine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cohort.curate.convert import VolumeFormat, read_volume, volume_format, write_mask, write_volume
from cohort.errors import ConversionError

SUFFIXES = (".nii.gz", ".nii", ".nrrd")
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def _rotation(z: float, y: float, x: float) -> np.ndarray:
    """Rotation matrix from angles in degrees about z, then y, then x."""
    a, b, c = np.radians([z, y, x])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


def _oblique(origin: tuple[float, float, float] = (10.25, -5.5, 100.125)) -> sitk.Image:
    rng = np.random.default_rng(3)
    image = sitk.GetImageFromArray(rng.integers(-1024, 3000, size=(7, 9, 11)).astype(np.int16))
    image.SetDirection(tuple(_rotation(30, 20, 10).ravel()))
    image.SetOrigin(origin)
    image.SetSpacing((0.7, 0.8, 2.5))
    return image


def _assert_same(read: sitk.Image, written: sitk.Image, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(read.GetOrigin(), written.GetOrigin(), rtol=0, atol=atol)
    np.testing.assert_allclose(read.GetSpacing(), written.GetSpacing(), rtol=0, atol=atol)
    np.testing.assert_allclose(read.GetDirection(), written.GetDirection(), rtol=0, atol=atol)
    assert read.GetPixelID() == written.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(read), sitk.GetArrayViewFromImage(written))


def _assert_nibabel_affine_matches(path: Path, image: sitk.Image) -> None:
    """nibabel's RAS affine, turned to LPS, maps voxels where SimpleITK says they are."""
    nib = pytest.importorskip("nibabel")
    affine = nib.load(str(path)).affine
    np.testing.assert_allclose(LPS_FROM_RAS @ affine[:3, 3], image.GetOrigin(), rtol=0, atol=1e-6)
    for index in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (5, 3, 2)]:
        ras = affine @ np.array([*index, 1.0])
        expected = image.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(LPS_FROM_RAS @ ras[:3], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_oblique_volume_round_trips(tmp_path: Path, suffix: str) -> None:
    image = _oblique()
    path = write_volume(image, tmp_path / f"oblique{suffix}")
    assert path == tmp_path / f"oblique{suffix}"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    _assert_same(read_volume(path), image)
    if suffix != ".nrrd":
        _assert_nibabel_affine_matches(path, image)


def test_nifti_geometry_is_float32_nrrd_exact(tmp_path: Path) -> None:
    image = _oblique(origin=(10.3, -5.7, 100.123))  # not representable in float32
    nrrd = read_volume(write_volume(image, tmp_path / "a.nrrd"))
    nifti = read_volume(write_volume(image, tmp_path / "a.nii.gz"))
    _assert_same(nrrd, image, atol=1e-12)
    error = np.abs(np.subtract(nifti.GetOrigin(), image.GetOrigin())).max()
    assert 0 < error <= 1e-7 * 100.123


def test_nrrd_header_says_lps_and_nifti_header_says_scanner_frame(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    path = write_volume(_oblique(), tmp_path / "a.nrrd", compress=False)
    header = path.read_bytes()[:400].decode("latin-1")
    assert "space: left-posterior-superior" in header
    nifti = nib.load(str(write_volume(_oblique(), tmp_path / "a.nii")))
    assert (int(nifti.header["qform_code"]), int(nifti.header["sform_code"])) == (1, 1)  # scanner frame
    # RAS columns of the affine are the LPS direction columns with x and y negated.
    spacing = np.diag([0.7, 0.8, 2.5])
    np.testing.assert_allclose(
        nifti.affine[:3, :3], LPS_FROM_RAS @ _rotation(30, 20, 10) @ spacing, atol=1e-6
    )


def test_metadata_is_not_written(tmp_path: Path) -> None:
    image = _oblique()
    image.SetMetaData("0010|0010", "Doe^Jane")
    for suffix in (".nrrd", ".nii"):
        path = write_volume(image, tmp_path / f"a{suffix}", compress=False if suffix == ".nrrd" else None)
        assert b"Doe" not in path.read_bytes()
    assert image.GetMetaData("0010|0010") == "Doe^Jane"  # the caller's image is unchanged


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_masks_are_written_as_uint8(tmp_path: Path, suffix: str) -> None:
    labels = np.zeros((7, 9, 11), dtype=np.int32)
    labels[2:5, 3:6, 4:8] = 1
    labels[0, 0, 0] = 255
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(_oblique())
    read = read_volume(write_mask(mask, tmp_path / f"mask{suffix}"))
    assert read.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(read), labels.astype(np.uint8))
    assert int(sitk.GetArrayViewFromImage(read).sum()) == 36 + 255
    np.testing.assert_allclose(read.GetDirection(), mask.GetDirection(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("values", [[0, 256], [0, -1], [0.0, 0.5]])
def test_masks_out_of_uint8_are_refused(tmp_path: Path, values: list[float]) -> None:
    mask = sitk.GetImageFromArray(np.array(values * 4).reshape(2, 2, 2))
    with pytest.raises(ConversionError, match=r"integer labels in \[0, 255\]"):
        write_mask(mask, tmp_path / "m.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_bad_requests_fail_with_what_to_do(tmp_path: Path) -> None:
    image = _oblique()
    formats = [volume_format(f"x{s}") for s in (".NII.GZ", ".nii", ".nrrd")]
    assert formats == [VolumeFormat.NIFTI_GZ, VolumeFormat.NIFTI, VolumeFormat.NRRD]
    with pytest.raises(ConversionError, match=r"name it \.nii\.gz, \.nii or \.nrrd"):
        write_volume(image, tmp_path / "a.mha")
    with pytest.raises(ConversionError, match=r"name it \.nii\.gz"):
        write_volume(image, tmp_path / "a.nii", compress=True)
    with pytest.raises(ConversionError, match=r"name it \.nii$"):
        write_volume(image, tmp_path / "a.nii.gz", compress=False)
    sheared = sitk.Image(image)
    sheared.SetDirection((1, 0, 0, 0.5, 1, 0, 0, 0, 1))
    with pytest.raises(ConversionError, match="not orthonormal"):
        write_volume(sheared, tmp_path / "a.nrrd")
    with pytest.raises(ConversionError, match="scalar 3D"):
        write_volume(sitk.Image(4, 4, sitk.sitkUInt8), tmp_path / "a.nrrd")
    with pytest.raises(ConversionError, match="no such volume file"):
        read_volume(tmp_path / "missing.nii.gz")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def lung1_ct(lung1_archive: Path) -> sitk.Image:
    from cohort.curate.series import read_series
    from cohort.index.crawl import index_files, list_archive

    instances, _ = index_files(list_archive(next(lung1_archive.glob("LUNG1-001_*"))))
    rows = instances.select(["path", "modality"]).to_pylist()
    return read_series([r["path"] for r in rows if r["modality"] == "CT"])


@pytest.mark.slow
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_real_lung1_ct_round_trips(lung1_ct: sitk.Image, tmp_path: Path, suffix: str) -> None:
    assert lung1_ct.GetSize() == (512, 512, 134)
    path = write_volume(lung1_ct, tmp_path / f"ct{suffix}")
    _assert_same(read_volume(path), lung1_ct)
    if suffix != ".nrrd":
        _assert_nibabel_affine_matches(path, lung1_ct)
        nib = pytest.importorskip("nibabel")
        assert nib.aff2axcodes(nib.load(str(path)).affine) == ("L", "P", "S")  # axial HFS: x to the left
