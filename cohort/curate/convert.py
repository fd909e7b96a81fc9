"""Write volumes and masks to NIfTI (``.nii``, ``.nii.gz``) and NRRD (``.nrrd``) and read them back.

SimpleITK images hold geometry in DICOM's patient frame (LPS: +x left, +y
posterior, +z superior). NIfTI's affine is RAS (+x right, +y anterior), so ITK's
NIfTI writer negates the first two rows of the voxel-to-world matrix on the way
out and back in; NRRD keeps LPS and says so (``space: left-posterior-superior``).
Reading back gives the same origin, spacing and direction either way. NIfTI
stores the affine in float32, so its geometry is exact to about 1e-7 relative;
NRRD writes float64 text and is exact.

Only the geometry and voxels are written: an image's metadata dictionary (which
can hold DICOM header values) is never copied into the file.
"""

from __future__ import annotations

import os
import uuid
from enum import StrEnum
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from cohort.errors import ConversionError

#: Largest deviation from orthonormality accepted in a direction matrix.
DIRECTION_TOLERANCE = 1e-6


class VolumeFormat(StrEnum):
    NIFTI = "nifti"  # .nii
    NIFTI_GZ = "nifti-gz"  # .nii.gz
    NRRD = "nrrd"  # .nrrd


_SUFFIXES = {".nii.gz": VolumeFormat.NIFTI_GZ, ".nii": VolumeFormat.NIFTI, ".nrrd": VolumeFormat.NRRD}


def volume_format(path: str | Path) -> VolumeFormat:
    """The format a file name asks for, from its suffix."""
    name = Path(path).name.lower()
    for suffix, fmt in _SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return fmt
    raise ConversionError(
        f"unknown volume file suffix: name it .nii.gz, .nii or .nrrd (one of {sorted(_SUFFIXES)})",
        subject=str(path),
    )


def _suffix(fmt: VolumeFormat) -> str:
    return next(s for s, f in _SUFFIXES.items() if f is fmt)


def _check_image(image: sitk.Image, subject: str) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(
            f"expected a scalar 3D image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components per voxel",
            subject=subject,
        )
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=DIRECTION_TOLERANCE):
        raise ConversionError(
            "direction cosines are not orthonormal (sheared grid): NIfTI and NRRD readers would "
            "not give this geometry back; resample onto an orthonormal grid first",
            subject=subject,
        )
    if min(image.GetSpacing()) <= 0:
        raise ConversionError(f"non-positive spacing {image.GetSpacing()}", subject=subject)


def _geometry_only(image: sitk.Image) -> sitk.Image:
    """``image`` without its metadata dictionary (the caller's image is left as it is)."""
    if not image.GetMetaDataKeys():
        return image
    # A SimpleITK copy shares the dictionary with the original: rebuild from the voxels instead.
    clean = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(image))
    clean.CopyInformation(image)
    return clean


def write_volume(image: sitk.Image, path: str | Path, *, compress: bool | None = None) -> Path:
    """Write a scalar 3D image; the format follows the suffix (``.nii.gz``, ``.nii``, ``.nrrd``).

    ``compress`` applies to NRRD (gzip; default on). For NIfTI the suffix decides:
    asking ``.nii`` to be compressed, or ``.nii.gz`` not to be, is an error. The file
    is written under a temporary name and renamed, so a reader never sees half a file.
    """
    target = Path(path)
    fmt = volume_format(target)
    if fmt is VolumeFormat.NIFTI and compress:
        raise ConversionError("a .nii file is not compressed: name it .nii.gz", subject=str(target))
    if fmt is VolumeFormat.NIFTI_GZ and compress is False:
        raise ConversionError("a .nii.gz file is compressed: name it .nii", subject=str(target))
    _check_image(image, str(target))
    use_compression = fmt is VolumeFormat.NIFTI_GZ or (fmt is VolumeFormat.NRRD and compress is not False)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial{_suffix(fmt)}")
    try:
        sitk.WriteImage(_geometry_only(image), str(tmp), useCompression=use_compression)
        os.replace(tmp, target)
    except RuntimeError as exc:  # SimpleITK reports I/O failures as RuntimeError
        raise ConversionError(f"could not write the volume ({exc})", subject=str(target)) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


def write_mask(mask: sitk.Image, path: str | Path, *, compress: bool | None = None) -> Path:
    """Write a label mask as uint8 after checking that every voxel is an integer in [0, 255]."""
    array = sitk.GetArrayViewFromImage(mask)
    if array.size and not np.issubdtype(array.dtype, np.bool_):
        if not np.array_equal(array, np.round(array)) or array.min() < 0 or array.max() > 255:
            raise ConversionError(
                f"a mask must hold integer labels in [0, 255]; found values in [{array.min()}, {array.max()}]"
                " or fractions: threshold or relabel it first",
                subject=str(path),
            )
    labels = mask if mask.GetPixelID() == sitk.sitkUInt8 else sitk.Cast(mask, sitk.sitkUInt8)
    return write_volume(labels, path, compress=compress)


def read_volume(path: str | Path) -> sitk.Image:
    """Read a NIfTI or NRRD volume (geometry in LPS, as written by :func:`write_volume`)."""
    source = Path(path)
    volume_format(source)
    if not source.is_file():
        raise ConversionError("no such volume file", subject=str(source))
    try:
        return sitk.ReadImage(str(source))
    except RuntimeError as exc:
        raise ConversionError(f"could not read the volume ({exc})", subject=str(source)) from exc
