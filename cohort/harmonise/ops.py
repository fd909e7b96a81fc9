"""Image-level harmonisation operations: pure functions on SimpleITK images.

Each function takes an image (and, where it matters, a mask) and returns a new
image; nothing is modified in place and nothing is read from disk. The chain in
:mod:`cohort.harmonise.chain` composes them from a validated spec and records the
provenance of every step.

Conventions:

* Intensity operations return ``Float32`` images (``Float64`` stays ``Float64``),
  except :func:`bin_fixed_width` (``UInt8``) and :func:`crop_or_pad`/nearest
  resampling (pixel type kept).
* Masks are integer images, non-zero inside; they are returned as ``UInt8``.
* Resampling keeps the origin (the centre of the first voxel) and the direction;
  on an axis resampled from spacing ``s`` to ``s'`` the new grid has
  ``floor((n − 1) s / s') + 1`` voxels, so every new voxel centre lies inside
  the span of the old voxel centres and nothing is extrapolated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import SimpleITK as sitk

from cohort.errors import HarmoniseError

#: The largest up-sampling factor (old spacing / new spacing) accepted on any axis
#: unless a step says otherwise: 5 mm slices to 1 mm pass, 7 mm to 1 mm is refused.
DEFAULT_MAX_UPSAMPLING = 5.0
_AXES = ("x", "y", "z")


class Interpolator(StrEnum):
    LINEAR = "linear"
    BSPLINE = "bspline"  # cubic B-spline
    NEAREST = "nearest"


class MaskInterpolator(StrEnum):
    NEAREST = "nearest"
    LINEAR = "linear"  # linear interpolation of the 0/1 mask, then a threshold (0.5 by default)


_SITK_INTERPOLATOR = {
    Interpolator.LINEAR: sitk.sitkLinear,
    Interpolator.BSPLINE: sitk.sitkBSpline,
    Interpolator.NEAREST: sitk.sitkNearestNeighbor,
}


def _float_type(image: sitk.Image) -> int:
    return sitk.sitkFloat64 if image.GetPixelID() == sitk.sitkFloat64 else sitk.sitkFloat32


def _as_float(image: sitk.Image) -> sitk.Image:
    return sitk.Cast(image, _float_type(image))


def _values(image: sitk.Image, mask: sitk.Image | None, what: str) -> np.ndarray:
    """The image's voxel values (inside the mask when given) as float64."""
    values = sitk.GetArrayViewFromImage(image)
    if mask is None:
        return np.asarray(values, dtype=np.float64).ravel()
    check_same_grid(image, mask, what)
    inside = sitk.GetArrayViewFromImage(mask) != 0
    if not inside.any():
        raise HarmoniseError(f"the mask of {what} is empty", subject=what)
    return np.asarray(values[inside], dtype=np.float64)


def _from_array(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def check_same_grid(
    image: sitk.Image, mask: sitk.Image, what: str = "image", tolerance: float = 1e-4
) -> None:
    """Raise :class:`HarmoniseError` unless ``mask`` lies on the grid of ``image``."""
    same = (
        image.GetSize() == mask.GetSize()
        and np.allclose(image.GetSpacing(), mask.GetSpacing(), rtol=0, atol=tolerance)
        and np.allclose(image.GetOrigin(), mask.GetOrigin(), rtol=0, atol=tolerance)
        and np.allclose(image.GetDirection(), mask.GetDirection(), rtol=0, atol=tolerance)
    )
    if not same:
        raise HarmoniseError(
            f"mask grid (size {mask.GetSize()}, spacing {mask.GetSpacing()}, origin {mask.GetOrigin()}) "
            f"differs from the image grid (size {image.GetSize()}, spacing {image.GetSpacing()}, "
            f"origin {image.GetOrigin()}); resample the mask onto the image first",
            subject=what,
        )


# -- resampling -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """A target grid: size and spacing per axis (x, y, z); origin and direction are kept."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]


def target_grid(
    image: sitk.Image,
    spacing: Sequence[float | None],
    max_upsampling: float = DEFAULT_MAX_UPSAMPLING,
) -> Grid:
    """The grid of ``image`` resampled to ``spacing`` (``None`` keeps an axis).

    Raises :class:`HarmoniseError` when an axis would be up-sampled by more than
    ``max_upsampling`` (old spacing / new spacing), naming the axis and the factor.
    """
    old_spacing, old_size = image.GetSpacing(), image.GetSize()
    if len(spacing) != len(old_spacing):
        raise HarmoniseError(
            f"{len(spacing)} spacings given for a {len(old_spacing)}D image", subject="resample"
        )
    size, new_spacing = [], []
    for axis, (old, n, new) in enumerate(zip(old_spacing, old_size, spacing, strict=True)):
        target = float(old) if new is None else float(new)
        if not (target > 0 and math.isfinite(target)):
            raise HarmoniseError(
                f"spacing on axis {_AXES[axis]} must be > 0 mm, got {new}", subject="resample"
            )
        factor = old / target
        if factor > max_upsampling * (1 + 1e-9):
            raise HarmoniseError(
                f"resampling axis {_AXES[axis]} from {old:g} mm to {target:g} mm is a {factor:.2f}x "
                f"up-sampling, beyond the limit of {max_upsampling:g}x: choose a coarser spacing for this "
                "axis (or null to keep it), or raise max_upsampling if this really is intended",
                subject="resample",
            )
        size.append(math.floor((n - 1) * old / target + 1e-6) + 1)
        new_spacing.append(target)
    return Grid(tuple(size), tuple(new_spacing))


def _resample(
    image: sitk.Image, grid: Grid, interpolator: int, default: float, pixel_type: int
) -> sitk.Image:
    return sitk.Resample(
        image,
        list(grid.size),
        sitk.Transform(),
        interpolator,
        image.GetOrigin(),
        list(grid.spacing),
        image.GetDirection(),
        default,
        pixel_type,
    )


def resample_image(
    image: sitk.Image,
    spacing: Sequence[float | None],
    interpolator: Interpolator = Interpolator.LINEAR,
    *,
    max_upsampling: float = DEFAULT_MAX_UPSAMPLING,
    default_value: float = 0.0,
) -> sitk.Image:
    """Resample an image to ``spacing`` (mm per axis, ``None`` keeps it).

    Linear and B-spline give ``Float32`` (``Float64`` input stays ``Float64``);
    nearest keeps the pixel type. ``default_value`` fills points outside the image
    (none with this grid rule, barring round-off at the last voxel).
    """
    grid = target_grid(image, spacing, max_upsampling)
    interpolator = Interpolator(interpolator)
    pixel_type = image.GetPixelID() if interpolator is Interpolator.NEAREST else _float_type(image)
    return _resample(image, grid, _SITK_INTERPOLATOR[interpolator], default_value, pixel_type)


def resample_mask_like(
    mask: sitk.Image,
    reference: sitk.Image,
    interpolator: MaskInterpolator = MaskInterpolator.NEAREST,
    threshold: float = 0.5,
) -> sitk.Image:
    """Resample a mask (non-zero inside) onto the grid of ``reference``, as ``UInt8`` 0/1.

    ``nearest`` takes the nearest voxel; ``linear`` interpolates the 0/1 mask
    linearly and keeps the points where it is ``>= threshold``.
    """
    binary = sitk.Cast(mask != 0, sitk.sitkUInt8)
    if MaskInterpolator(interpolator) is MaskInterpolator.NEAREST:
        return sitk.Resample(binary, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    fraction = sitk.Resample(
        sitk.Cast(binary, sitk.sitkFloat32),
        reference,
        sitk.Transform(),
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    return sitk.Cast(fraction >= threshold, sitk.sitkUInt8)


# -- intensity ------------------------------------------------------------------------------------


def clip(image: sitk.Image, lower: float | None = None, upper: float | None = None) -> sitk.Image:
    """Clip intensities to ``[lower, upper]`` (either bound may be ``None``)."""
    if lower is not None and upper is not None and lower > upper:
        raise HarmoniseError(f"clip bounds are reversed: lower {lower} > upper {upper}", subject="clip")
    array = sitk.GetArrayFromImage(_as_float(image))
    return _from_array(np.clip(array, lower, upper), image)


def window(
    image: sitk.Image,
    level: float,
    width: float,
    output_range: tuple[float, float] | None = None,
) -> sitk.Image:
    """Clip to the window ``[level − width/2, level + width/2]``; map it to ``output_range`` if given."""
    if not width > 0:
        raise HarmoniseError(f"window width must be > 0, got {width}", subject="window")
    low, high = level - width / 2.0, level + width / 2.0
    array = np.clip(sitk.GetArrayFromImage(_as_float(image)), low, high)
    if output_range is not None:
        a, b = output_range
        array = (array - low) * ((b - a) / width) + a
    return _from_array(array, image)


@dataclass(frozen=True)
class ZScoreParams:
    """Mean and standard deviation to normalise with, and where they came from."""

    mean: float
    std: float
    n_images: int
    n_voxels: int


def fit_zscore(images: Sequence[sitk.Image], masks: Sequence[sitk.Image] | None = None) -> ZScoreParams:
    """Pooled mean and standard deviation of all voxels of ``images`` (inside ``masks`` if given).

    Fit on the training set, then pass the result to :func:`zscore` for every
    image (training and test alike), so the test set never leaks into the scale.
    """
    if not images:
        raise HarmoniseError("no images to fit z-score parameters on", subject="fit_zscore")
    if masks is not None and len(masks) != len(images):
        raise HarmoniseError(f"{len(masks)} masks for {len(images)} images", subject="fit_zscore")
    total, total_sq, count = 0.0, 0.0, 0
    # Two passes over each image keep the sums well conditioned (no E[x²] − E[x]² cancellation).
    chunks = [
        _values(image, None if masks is None else masks[i], f"image {i}") for i, image in enumerate(images)
    ]
    for values in chunks:
        total += float(values.sum())
        count += values.size
    mean = total / count
    for values in chunks:
        total_sq += float(np.square(values - mean).sum())
    std = math.sqrt(total_sq / count)
    if not std > 0:
        raise HarmoniseError("all fitted voxels have the same value: std is 0", subject="fit_zscore")
    return ZScoreParams(mean=mean, std=std, n_images=len(images), n_voxels=count)


def zscore(
    image: sitk.Image, params: ZScoreParams | None = None, mask: sitk.Image | None = None
) -> sitk.Image:
    """``(x − mean) / std``: with ``params`` (fitted on a training set) or the image's own statistics.

    With ``mask`` and no ``params``, the statistics come from the voxels inside the
    mask; the whole image is normalised either way.
    """
    if params is None:
        params = fit_zscore([image], None if mask is None else [mask])
    elif not params.std > 0:
        raise HarmoniseError(f"z-score std must be > 0, got {params.std}", subject="zscore")
    array = sitk.GetArrayFromImage(_as_float(image))
    return _from_array(((array - params.mean) / params.std).astype(array.dtype, copy=False), image)


def n4_bias_correction(
    image: sitk.Image,
    mask: sitk.Image | None = None,
    *,
    shrink_factor: int = 4,
    iterations: Sequence[int] = (50, 50, 50, 50),
    convergence_threshold: float = 1e-3,
    control_points: int = 4,
    spline_order: int = 3,
) -> sitk.Image:
    """N4 bias-field correction (SimpleITK ``N4BiasFieldCorrectionImageFilter``).

    The field is fitted on the image shrunk by ``shrink_factor`` (one fitting level
    per entry of ``iterations``) and divided out at full resolution. Without a
    mask, Otsu's threshold separates object from background. N4 works on the
    logarithm of the intensities: they must be positive inside the mask (shift or
    window CT first; N4 is meant for MR).
    """
    float_image = sitk.Cast(image, sitk.sitkFloat32)
    if mask is None:
        mask = sitk.OtsuThreshold(float_image, 0, 1, 200)
    else:
        check_same_grid(image, mask, "n4")
        mask = sitk.Cast(mask != 0, sitk.sitkUInt8)
    inside = _values(float_image, mask, "n4")
    if inside.min() <= 0:
        raise HarmoniseError(
            f"N4 needs positive intensities inside the mask, found a minimum of {inside.min():g}: "
            "shift or window the image first",
            subject="n4",
        )
    # Never shrink an axis below 4 voxels (a thin volume keeps its slices).
    shrink = [max(1, min(int(shrink_factor), n // 4)) for n in image.GetSize()]
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    corrector.SetConvergenceThreshold(float(convergence_threshold))
    corrector.SetNumberOfControlPoints([int(control_points)] * image.GetDimension())
    corrector.SetSplineOrder(int(spline_order))
    corrector.Execute(sitk.Shrink(float_image, shrink), sitk.Shrink(mask, shrink))
    log_field = corrector.GetLogBiasFieldAsImage(float_image)
    corrected = float_image / sitk.Exp(log_field)
    return sitk.Cast(corrected, _float_type(image))


def match_histogram(
    image: sitk.Image,
    reference: sitk.Image,
    *,
    levels: int = 256,
    match_points: int = 64,
    threshold_at_mean: bool = False,
) -> sitk.Image:
    """Map intensities so that ``match_points`` quantiles equal the reference's (SimpleITK).

    ``threshold_at_mean`` leaves out voxels below each image's mean (background
    in MR), as ITK's filter offers.
    """
    matcher = sitk.HistogramMatchingImageFilter()
    matcher.SetNumberOfHistogramLevels(int(levels))
    matcher.SetNumberOfMatchPoints(int(match_points))
    matcher.SetThresholdAtMeanIntensity(bool(threshold_at_mean))
    pixel_type = _float_type(image)
    return matcher.Execute(sitk.Cast(image, pixel_type), sitk.Cast(reference, pixel_type))


def equalise_histogram(
    image: sitk.Image,
    *,
    bins: int = 256,
    mask: sitk.Image | None = None,
    output_range: tuple[float, float] | None = None,
) -> sitk.Image:
    """Global histogram equalisation: each value is replaced by its cumulative frequency.

    The histogram (``bins`` bins between the minimum and maximum, of the voxels
    inside ``mask`` if given) gives a piecewise-linear cumulative distribution; the
    result is that distribution scaled to ``output_range`` (default: the input's
    own minimum and maximum), so equalised values are spread uniformly.
    """
    if bins < 2:
        raise HarmoniseError(f"equalisation needs at least 2 bins, got {bins}", subject="equalise")
    values = _values(image, mask, "equalise")
    low, high = float(values.min()), float(values.max())
    if not high > low:
        raise HarmoniseError(
            "the image (inside the mask) has one value: nothing to equalise", subject="equalise"
        )
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    cdf = np.concatenate([[0.0], np.cumsum(counts) / counts.sum()])
    a, b = output_range if output_range is not None else (low, high)
    array = sitk.GetArrayFromImage(_as_float(image))
    equalised = np.interp(array, edges, cdf) * (b - a) + a
    return _from_array(equalised.astype(array.dtype, copy=False), image)


def bin_fixed_width(image: sitk.Image, width: float, lower: float) -> sitk.Image:
    """Fixed-width bins packed into 8 bits: ``floor((x − lower) / width)`` clipped to 0..255.

    Bin 0 holds ``[lower, lower + width)`` and everything below ``lower``; bin 255
    holds everything from ``lower + 255 width`` up.
    """
    if not width > 0:
        raise HarmoniseError(f"bin width must be > 0, got {width}", subject="bin_fixed_width")
    array = sitk.GetArrayViewFromImage(image).astype(np.float64)
    bins = np.clip(np.floor((array - lower) / width), 0, 255).astype(np.uint8)
    return _from_array(bins, image)


def crop_or_pad(image: sitk.Image, size: Sequence[int | None], pad_value: float = 0.0) -> sitk.Image:
    """Centre-crop or pad each axis to ``size`` (``None`` keeps an axis); the origin follows.

    An odd difference puts the extra voxel at the high end. Cropped voxels keep
    their physical position (the origin moves by the cropped voxels along the
    image's direction); padding adds ``pad_value`` (air, -1000 HU, for CT).
    """
    old = image.GetSize()
    if len(size) != len(old):
        raise HarmoniseError(f"{len(size)} sizes given for a {len(old)}D image", subject="crop_pad")
    crop_low, crop_high, pad_low, pad_high = [], [], [], []
    for axis, (n, target) in enumerate(zip(old, size, strict=True)):
        want = n if target is None else int(target)
        if want < 1:
            raise HarmoniseError(f"size on axis {_AXES[axis]} must be >= 1, got {target}", subject="crop_pad")
        diff = want - n
        cut, grow = max(-diff, 0), max(diff, 0)
        crop_low.append(cut // 2)
        crop_high.append(cut - cut // 2)
        pad_low.append(grow // 2)
        pad_high.append(grow - grow // 2)
    out = sitk.Crop(image, crop_low, crop_high) if any(crop_low) or any(crop_high) else image
    if any(pad_low) or any(pad_high):
        out = sitk.ConstantPad(out, pad_low, pad_high, float(pad_value))
    return out
