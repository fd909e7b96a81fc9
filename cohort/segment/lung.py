"""Lung isolation: the seed's classical algorithm, vectorised.

The CT is reduced to the lungs plus a safety margin before a 2D network looks for
the tumour, so the network never sees the couch, the arms or the abdomen. Every
step is a whole-volume array operation (scipy.ndimage, SimpleITK); the only
Python-level recursion is the spine filter along the slices (``lfilter``).

1. **Couch removal.** Tissue is ``HU > body_threshold_hu``. An in-plane opening
   (a square about ``couch_opening_mm`` wide, an odd number of pixels) cuts thin
   contacts between the patient and the couch; the largest 3D connected component
   is the body; the tissue the opening took from it is given back within the
   opening's reach, and its in-plane holes (lungs, airways) are filled. This runs
   on a coarse grid, every n-th row and column, n the largest step with pixels of
   at most ``coarse_grid_mm``: the body only has to enclose the lungs.
2. **Air-filled volumes.** ``HU < air_threshold_hu`` inside the body is labelled
   in 3D with face connectivity (seeded region growing with that fixed interval,
   from all seeds at once). Components touching the in-plane border of the image
   (outside air) are dropped; the first and last *slices* are not border, since
   the trachea leaves the volume there. Of the rest, the largest
   ``max_lung_components`` whose volume is at least ``min_component_fraction`` of
   the largest and at least ``min_component_ml`` are the lungs (with the trachea
   and bronchi); bowel gas and small pockets are dropped.
3. **Vessels and joins.** Per slice, holes are filled (vessels inside the lung),
   an in-plane closing with a disc of ``closing_radius_mm`` adds the vessels and
   airway walls on the lung border, and holes are filled again. In-plane
   components that are small (``trachea_max_area_mm2``) and on the spine axis
   (``trachea_max_offset_mm``) are the trachea above the carina and are dropped
   (reference lung contours leave it out; the axis is that of step 4): ``lungs``,
   the lung mask before mirroring and margin.
4. **Spine axis.** See :func:`spine_axis`: per lung slice, the bone-window
   projection on the coronal axis gives a spine column; along the slices a
   moving average of ``spine_moving_average`` (7) slices, then exponential
   smoothing (α = ``spine_alpha``) starting from the mean of the first
   ``spine_start_slices`` (5) lung slices, feet first.
5. **Mirror.** ``lungs`` is mirrored about the sagittal plane through the spine
   axis of each slice and the union kept, so a collapsed or consolidated lung, or
   a tumour filling it, stays inside. The union is closed in-plane with a disc of
   ``join_radius_mm`` (on the coarse grid of step 1) and its holes are filled,
   which joins the two copies around a tumour on the mediastinum or beside the
   spine: ``mirrored``, the mask before the safety margin.
6. **Safety margin.** ``mirrored`` is dilated in-plane with a disc of radius
   ``margin_radius_mm``: ``mask``. The radius is in **millimetres**, converted
   with the in-plane spacing (the seed's disc of radius 5 pixels at its 1 × 1 mm
   grid is 5 mm; at 0.98 mm spacing the disc has radius 5.1 pixels).
7. Every voxel outside ``mask`` is set to ``air_hu``: ``image``.

All lengths are millimetres, so the algorithm runs on the native grid without
resampling. The image must be axial (rows and columns along the patient's x and
y axes, either sign).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from scipy.signal import lfilter

from cohort.errors import SegmentationError

#: In-plane face connectivity with no neighbours across slices: one 3D call acts slice by slice.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndi.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class LungIsolationSettings:
    """Every parameter of :func:`isolate_lungs` (HU, millimetres, millilitres, slices)."""

    body_threshold_hu: float = -500.0
    couch_opening_mm: float = 4.0
    coarse_grid_mm: float = 2.0
    air_threshold_hu: float = -320.0
    max_lung_components: int = 2
    min_component_fraction: float = 0.05
    min_component_ml: float = 20.0
    closing_radius_mm: float = 3.0
    trachea_max_area_mm2: float = 600.0
    trachea_max_offset_mm: float = 25.0
    bone_window_level: float = 400.0
    bone_window_width: float = 1800.0
    spine_bone_threshold_hu: float = 100.0
    spine_band_mm: float = 80.0
    spine_search_mm: float = 60.0
    spine_moving_average: int = 7
    spine_start_slices: int = 5
    spine_alpha: float = 0.3
    join_radius_mm: float = 10.0
    margin_radius_mm: float = 5.0
    air_hu: float = -1000.0
    #: Smallest |cosine| between an image axis and the patient axis it must follow.
    axial_tolerance: float = 0.99

    def __post_init__(self) -> None:
        radii = (self.couch_opening_mm, self.closing_radius_mm, self.join_radius_mm, self.margin_radius_mm)
        counts = (self.spine_moving_average, self.spine_start_slices, self.max_lung_components)
        checks = {
            "spine_alpha must be in (0, 1]": 0.0 < self.spine_alpha <= 1.0,
            "slice counts and max_lung_components must be >= 1": min(counts) >= 1,
            "coarse_grid_mm must be > 0": self.coarse_grid_mm > 0,
            "bone_window_width must be > 0": self.bone_window_width > 0,
            "radii must be >= 0 mm": min(radii) >= 0,
            "air_threshold_hu must not be below body_threshold_hu": (
                self.air_threshold_hu >= self.body_threshold_hu
            ),
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise SegmentationError("; ".join(failed), subject="LungIsolationSettings")


@dataclass(frozen=True)
class SpineAxis:
    """The spine axis on slices ``first_slice .. first_slice + len(column) - 1``.

    ``column`` is the smoothed (fractional) column index of the mirror plane per
    slice, ``raw_column`` the per-slice estimate before smoothing, ``x_mm`` the
    patient x coordinate of ``column``.
    """

    first_slice: int
    column: np.ndarray
    raw_column: np.ndarray
    x_mm: np.ndarray


@dataclass(frozen=True)
class LungIsolation:
    """Result of :func:`isolate_lungs`.

    ``image`` is the input with every voxel outside ``mask`` set to air. The masks
    (UInt8 images on the input grid) are built when first asked for: the
    segmentation pipeline needs only ``image``.
    """

    image: sitk.Image
    spine: SpineAxis
    settings: LungIsolationSettings
    box: tuple[slice, slice, slice]  # where the masks can be non-zero
    box_masks: dict[str, np.ndarray] = field(repr=False)  # "lungs", "mirrored", "mask" inside ``box``

    def _full(self, name: str) -> sitk.Image:
        full = np.zeros(sitk.GetArrayViewFromImage(self.image).shape, dtype=np.uint8)
        full[self.box] = self.box_masks[name]
        return _mask_image(full, self.image)

    @cached_property
    def lungs(self) -> sitk.Image:
        """Air-filled lungs with vessels filled (step 3)."""
        return self._full("lungs")

    @cached_property
    def mirrored(self) -> sitk.Image:
        """The lungs united with their mirror image, joined: the mask before the margin (step 5)."""
        return self._full("mirrored")

    @cached_property
    def mask(self) -> sitk.Image:
        """``mirrored`` plus the safety margin: the isolation mask (step 6)."""
        return self._full("mask")


# -- morphology on (z, y, x) boolean arrays, in-plane only ----------------------------------------


def _disc(radius_mm: float, spacing_yx: tuple[float, float]) -> np.ndarray:
    """A (1, ny, nx) in-plane disc of ``radius_mm`` on a grid of ``spacing_yx`` mm."""
    ry, rx = (int(np.floor(radius_mm / s + 1e-9)) for s in spacing_yx)
    y, x = np.ogrid[-ry : ry + 1, -rx : rx + 1]
    return ((y * spacing_yx[0]) ** 2 + (x * spacing_yx[1]) ** 2 <= radius_mm**2 + 1e-9)[None]


def _box_filter(mask: np.ndarray, half: tuple[int, int], maximum: bool) -> np.ndarray:
    """In-plane max (dilation) or min (erosion) over a (2h+1)-rectangle: separable, O(n)."""
    out = mask.view(np.uint8)
    op = ndi.maximum_filter1d if maximum else ndi.minimum_filter1d
    for axis, h in ((1, half[0]), (2, half[1])):
        if h > 0:
            out = op(out, size=2 * h + 1, axis=axis, mode="constant", cval=0)
    return out.view(bool)


def dilate_disc(mask: np.ndarray, radius_mm: float, spacing_yx: tuple[float, float]) -> np.ndarray:
    """Exact in-plane dilation with a disc of ``radius_mm`` (outside the array is empty).

    Only voxels within the disc's bounding square of the mask are tested (a
    separable max filter finds them), which makes large discs cheap.
    """
    disc = _disc(radius_mm, spacing_yx)
    half = (disc.shape[1] // 2, disc.shape[2] // 2)
    if half == (0, 0):
        return mask.copy()
    candidates = _box_filter(mask, half, maximum=True) & ~mask
    return ndi.binary_dilation(mask, disc, mask=candidates) | mask


def erode_disc(mask: np.ndarray, radius_mm: float, spacing_yx: tuple[float, float]) -> np.ndarray:
    """Exact in-plane erosion with a disc of ``radius_mm`` (outside the array counts as mask)."""
    disc = _disc(radius_mm, spacing_yx)
    half = (disc.shape[1] // 2, disc.shape[2] // 2)
    if half == (0, 0):
        return mask.copy()
    candidates = mask & ~_box_filter(mask, half, maximum=False)
    return ndi.binary_erosion(mask, disc, mask=candidates, border_value=1)


def close_disc(mask: np.ndarray, radius_mm: float, spacing_yx: tuple[float, float]) -> np.ndarray:
    """In-plane closing with a disc; exact when the mask lies ``radius_mm`` inside the array."""
    return erode_disc(dilate_disc(mask, radius_mm, spacing_yx), radius_mm, spacing_yx)


def _border_labels(labels: np.ndarray) -> np.ndarray:
    """Labels present on the in-plane border (first/last row and column of any slice)."""
    edges = (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1])
    return np.unique(np.concatenate([e.ravel() for e in edges]))


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill the in-plane holes of every slice of a (z, y, x) mask with one labelling.

    A hole is a background region (4-connected within its slice) that does not
    touch the slice border: ``binary_fill_holes`` slice by slice, without the loop.
    """
    labels, n = ndi.label(~mask, structure=_IN_PLANE)
    outside = np.zeros(n + 1, dtype=bool)
    outside[_border_labels(labels)] = True
    outside[0] = False
    return ~outside[labels]


# -- the steps ------------------------------------------------------------------------------------


def _coarse_step(spacing: tuple[float, ...], settings: LungIsolationSettings) -> int:
    """The largest row/column step whose pixels are at most ``coarse_grid_mm``."""
    return max(1, int(settings.coarse_grid_mm / min(spacing[0], spacing[1]) + 1e-9))


def join_regions(
    union: np.ndarray, spacing: tuple[float, ...], settings: LungIsolationSettings
) -> np.ndarray:
    """``union`` plus its in-plane closing by a disc of ``join_radius_mm``, holes filled (step 5).

    The closing runs on the coarse grid (2 x 2 blocks at 1 mm pixels, a block is
    in when any of its pixels is): it only has to bridge gaps of centimetres.
    """
    if settings.join_radius_mm <= 0:
        return fill_holes_per_slice(union)
    step = _coarse_step(spacing, settings)
    nz, ny, nx = union.shape
    padded = np.pad(union, ((0, 0), (0, -ny % step), (0, -nx % step)))
    blocks = padded.reshape(nz, padded.shape[1] // step, step, padded.shape[2] // step, step)
    coarse = np.asarray(blocks.any(axis=(2, 4)), dtype=bool)
    closed = close_disc(coarse, settings.join_radius_mm, (spacing[1] * step, spacing[0] * step))
    fine = closed.repeat(step, axis=1).repeat(step, axis=2)[:, :ny, :nx]
    return fill_holes_per_slice(union | fine)


def body_mask(hu: np.ndarray, spacing: tuple[float, ...], settings: LungIsolationSettings) -> np.ndarray:
    """The patient without the couch, in-plane holes (lungs, airways) filled (step 1).

    Tissue is opened in-plane, the largest 3D component kept, the tissue within the
    opening's reach of it given back (so a thin chest wall still closes the
    thorax), and the holes of every slice filled.
    """
    step = _coarse_step(spacing, settings)
    tissue = hu[:, ::step, ::step] > settings.body_threshold_hu
    half = (
        round(settings.couch_opening_mm / (2 * spacing[1] * step)),
        round(settings.couch_opening_mm / (2 * spacing[0] * step)),
    )
    opened = _box_filter(_box_filter(tissue, half, maximum=False), half, maximum=True) & tissue
    labels = sitk.GetArrayFromImage(
        sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(opened.view(np.uint8))))
    )
    if not (labels == 1).any():
        raise SegmentationError(f"no voxel above {settings.body_threshold_hu} HU: no body found")
    # Give back the tissue the opening took from the body (thin chest walls), but
    # only within the opening's reach: the couch stays cut off.
    body = tissue & _box_filter(labels == 1, half, maximum=True)
    filled = fill_holes_per_slice(body)
    if step > 1:
        filled = filled.repeat(step, axis=1).repeat(step, axis=2)[:, : hu.shape[1], : hu.shape[2]]
    return filled


def find_lung_components(
    hu: np.ndarray, body: np.ndarray, spacing: tuple[float, ...], settings: LungIsolationSettings
) -> np.ndarray:
    """Air-filled volumes inside the body that are large enough to be lung (step 2)."""
    # Label only inside the body's bounding box; the in-plane border test keeps
    # the image's own border (a box side on it), never a side inside the image.
    _, ny, nx = hu.shape
    ys, xs = np.flatnonzero(body.any(axis=(0, 2))), np.flatnonzero(body.any(axis=(0, 1)))
    y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    air = (hu[:, y0:y1, x0:x1] < settings.air_threshold_hu) & body[:, y0:y1, x0:x1]
    relabel = sitk.RelabelComponentImageFilter()  # labels 1, 2, ... by decreasing size
    labels = sitk.GetArrayFromImage(
        relabel.Execute(sitk.ConnectedComponent(sitk.GetImageFromArray(air.view(np.uint8)), False))
    )
    sizes = np.asarray([0, *relabel.GetSizeOfObjectsInPixels()], dtype=np.int64)
    edges = [e for e, on_border in ((labels[:, 0, :], y0 == 0), (labels[:, -1, :], y1 == ny)) if on_border]
    edges += [e for e, on_border in ((labels[:, :, 0], x0 == 0), (labels[:, :, -1], x1 == nx)) if on_border]
    if edges:
        sizes[np.unique(np.concatenate([e.ravel() for e in edges]))] = 0
    sizes[0] = 0
    voxel_ml = float(np.prod(spacing)) / 1000.0
    order = np.argsort(-sizes, kind="stable")[: settings.max_lung_components]
    largest = sizes[order[0]]
    keep = [
        int(label)
        for label in order
        if sizes[label] > 0
        and sizes[label] >= settings.min_component_fraction * largest
        and sizes[label] * voxel_ml >= settings.min_component_ml
    ]
    if not keep:
        raise SegmentationError(
            f"no air-filled volume of at least {settings.min_component_ml} ml inside the body "
            f"(HU < {settings.air_threshold_hu}); is this a chest CT in HU?"
        )
    lungs = np.zeros(hu.shape, dtype=bool)
    inside = lungs[:, y0:y1, x0:x1]
    for label in keep:  # at most max_lung_components comparisons
        inside |= labels == label
    return lungs


def spine_axis(
    hu: np.ndarray, body: np.ndarray, spacing: tuple[float, ...], settings: LungIsolationSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Raw and smoothed spine column of each slice of ``hu`` (z, y, x; lung slices, feet first).

    ``hu`` rows must run from anterior to posterior. Per slice, the bone window
    (0..1) above its value at ``spine_bone_threshold_hu`` (so soft tissue, the
    heart above all, adds nothing) is summed over the rows of the posterior band
    of the body (``spine_band_mm`` in front of the body's back at its centre
    column, where the vertebra is the only large bone near the midline): the
    projection on the coronal axis. The centroid of that profile within
    ``spine_search_mm`` of the body's centre column (the shoulders lie outside) is
    the raw spine column; the maximum of a profile this wide jumps between the
    transverse processes, the centroid does not (median error against the spinal
    cord contours of LUNG1-001/002: 10 columns for the maximum, 2-3 for the centroid).
    Along the slices: a moving average over ``spine_moving_average`` slices, then
    exponential smoothing starting from the mean of the first ``spine_start_slices``.
    """
    nz, ny, nx = hu.shape
    low = settings.bone_window_level - settings.bone_window_width / 2
    floor = float(np.clip((settings.spine_bone_threshold_hu - low) / settings.bone_window_width, 0.0, 1.0))
    x = np.arange(nx, dtype=np.float64)
    per_column = body.sum(axis=1, dtype=np.float64)  # (z, x)
    has_body = per_column.sum(axis=1) > 0
    centre = (per_column * x).sum(axis=1) / np.maximum(per_column.sum(axis=1), 1.0)
    centre_col = np.clip(np.rint(centre).astype(np.int64), 0, nx - 1)
    at_centre = np.take_along_axis(body, centre_col[:, None, None], axis=2)[:, :, 0]  # (z, y)
    back = ny - 1 - np.argmax(at_centre[:, ::-1], axis=1)
    # Only the columns that can hold the axis are windowed and projected.
    half = int(np.ceil(settings.spine_search_mm / spacing[0]))
    x0, x1 = max(int(centre.min()) - half, 0), min(int(np.ceil(centre.max())) + half + 1, nx)
    rows = np.arange(ny)[None, :, None]
    band = body[:, :, x0:x1] & (rows >= (back - settings.spine_band_mm / spacing[1])[:, None, None])
    window = (hu[:, :, x0:x1].astype(np.float32) - low) / settings.bone_window_width
    bone = np.clip(window, floor, 1.0) - floor
    profile = np.where(band, bone, 0.0).sum(axis=1, dtype=np.float64)  # (z, x): on the coronal axis
    xs = x[x0:x1]
    profile[np.abs(xs[None, :] - centre[:, None]) > settings.spine_search_mm / spacing[0]] = 0.0
    weight = profile.sum(axis=1)
    found = has_body & (weight > 0)
    if not found.any():
        raise SegmentationError("no bone near the body's midline on any lung slice: spine axis not found")
    raw = (profile * xs).sum(axis=1) / np.where(found, weight, 1.0)
    k = np.arange(nz)
    raw = np.interp(k, k[found], raw[found])  # slices without bone take their neighbours' estimate
    averaged = ndi.uniform_filter1d(raw, settings.spine_moving_average, mode="nearest")
    start = float(averaged[: settings.spine_start_slices].mean())
    alpha = settings.spine_alpha
    smoothed, _ = lfilter([alpha], [1.0, alpha - 1.0], averaged, zi=[(1.0 - alpha) * start])
    return raw, np.asarray(smoothed, dtype=np.float64)


def remove_trachea(
    lungs: np.ndarray, columns: np.ndarray, spacing: tuple[float, ...], settings: LungIsolationSettings
) -> np.ndarray:
    """Drop the in-plane components that are the trachea: small and on the spine axis.

    A component of a slice (4-connected) is removed when its area is below
    ``trachea_max_area_mm2`` and its centroid lies within ``trachea_max_offset_mm``
    of the slice's spine column; the lung apices are lateral, the trachea above the
    carina is a small disc on the midline. ``trachea_max_area_mm2 = 0`` disables it.
    """
    if settings.trachea_max_area_mm2 <= 0:
        return lungs
    labels, n = ndi.label(lungs, structure=_IN_PLANE)
    if n == 0:
        return lungs
    count = np.bincount(labels.ravel(), minlength=n + 1)
    small = count * (spacing[0] * spacing[1]) < settings.trachea_max_area_mm2
    small[0] = False
    if not small.any():
        return lungs
    # Only the voxels of small components need coordinates (the lungs are most of the voxels).
    in_small = small[labels]
    z, _, x = np.nonzero(in_small)
    component = labels[in_small]  # same C order as np.nonzero
    x_mean = np.bincount(component, weights=x, minlength=n + 1) / np.maximum(count, 1)
    slice_of = np.zeros(n + 1, dtype=np.int64)
    slice_of[component] = z  # every voxel of a component lies on one slice
    trachea = small & (np.abs(x_mean - columns[slice_of]) * spacing[0] < settings.trachea_max_offset_mm)
    return lungs & ~trachea[labels]


def mirror_about_columns(mask: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Mirror each slice ``mask[k]`` about the (fractional) column ``columns[k]``.

    Column ``x`` of the result holds column ``round(2 c − x)`` of the input;
    columns whose source lies outside the array are empty.
    """
    nx = mask.shape[2]
    x = np.arange(nx)
    source = np.rint(2.0 * columns[:, None] - x[None, :]).astype(np.int64)  # (z, x)
    valid = (source >= 0) & (source < nx)
    mirrored = np.take_along_axis(mask, np.clip(source, 0, nx - 1)[:, None, :], axis=2)
    return mirrored & valid[:, None, :]


def _check_axial(image: sitk.Image, tolerance: float) -> None:
    if image.GetDimension() != 3:
        raise SegmentationError(f"a 3D image is needed, got {image.GetDimension()}D")
    cosines = np.abs(np.diag(np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)))
    if np.any(cosines < tolerance):
        raise SegmentationError(
            f"image axes are not axial (|cos| to patient x, y, z = {np.round(cosines, 3).tolist()}); "
            "resample it to an axial grid first"
        )


def _mask_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.view(np.uint8))
    image.CopyInformation(reference)
    return image


def isolate_lungs(image: sitk.Image, settings: LungIsolationSettings | None = None) -> LungIsolation:
    """Isolate the lungs of an axial chest CT in HU (the steps are in the module docstring).

    Raises :class:`SegmentationError` for a non-axial image, or one without a body,
    an air-filled volume large enough to be lung, or bone near the midline.
    """
    settings = settings or LungIsolationSettings()
    _check_axial(image, settings.axial_tolerance)
    spacing = image.GetSpacing()
    spacing_yx = (spacing[1], spacing[0])
    hu = sitk.GetArrayViewFromImage(image)
    _, ny, nx = hu.shape

    body = body_mask(hu, spacing, settings)
    lungs_raw = find_lung_components(hu, body, spacing, settings)

    # Steps 3-6 work in a box around the lungs and their mirror image.
    zs = np.flatnonzero(lungs_raw.any(axis=(1, 2)))
    z0, z1 = int(zs[0]), int(zs[-1]) + 1
    rows = slice(None, None, -1) if image.GetDirection()[4] < 0 else slice(None)  # anterior first
    raw, columns = spine_axis(hu[z0:z1, rows], body[z0:z1, rows], spacing, settings)

    pad_mm = settings.closing_radius_mm + settings.join_radius_mm + settings.margin_radius_mm
    pad_y, pad_x = (int(np.ceil(pad_mm / s)) + 2 for s in spacing_yx)
    ys = np.flatnonzero(lungs_raw[z0:z1].any(axis=(0, 2)))
    xs = np.flatnonzero(lungs_raw[z0:z1].any(axis=(0, 1)))
    lo_x = min(int(xs[0]), int(np.floor(2 * columns.min())) - int(xs[-1]))
    hi_x = max(int(xs[-1]), int(np.ceil(2 * columns.max())) - int(xs[0]))
    y0, y1 = max(int(ys[0]) - pad_y, 0), min(int(ys[-1]) + 1 + pad_y, ny)
    x0, x1 = max(lo_x - pad_x, 0), min(hi_x + 1 + pad_x, nx)
    box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))

    lungs = fill_holes_per_slice(lungs_raw[box])
    lungs = fill_holes_per_slice(close_disc(lungs, settings.closing_radius_mm, spacing_yx))
    lungs = remove_trachea(lungs, columns - x0, spacing, settings)
    union = lungs | mirror_about_columns(lungs, columns - x0)
    mirrored = join_regions(union, spacing, settings)
    margin = dilate_disc(mirrored, settings.margin_radius_mm, spacing_yx)

    # Step 7: air outside the mask; outside the box every voxel is outside it.
    out = np.full(hu.shape, settings.air_hu, dtype=hu.dtype)
    out[box] = np.where(margin, hu[box], np.asarray(settings.air_hu, dtype=hu.dtype))
    isolated = sitk.GetImageFromArray(out)
    isolated.CopyInformation(image)

    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    index = np.column_stack([columns, np.zeros_like(columns), np.arange(z0, z1, dtype=np.float64)])
    x_mm = image.GetOrigin()[0] + (index * np.asarray(spacing)) @ direction[0]
    return LungIsolation(
        image=isolated,
        spine=SpineAxis(first_slice=z0, column=columns, raw_column=raw, x_mm=x_mm),
        settings=settings,
        box=box,
        box_masks={"lungs": lungs, "mirrored": mirrored, "mask": margin},
    )
