"""Segmentation metrics against a reference mask: overlap, surface distances, added path length.

Masks are boolean (z, y, x) arrays with ``spacing_zyx`` in millimetres (the order
of ``sitk.GetArrayFromImage``; :func:`segmentation_metrics_image` takes two
SimpleITK images on one grid and does the conversion).

Definitions (the ones the numbers in tests and reports use):

* **Surface** of a mask, as in DeepMind's ``surface-distance`` (Nikolov et al.
  2021, the definition behind the seed's surface Dice): the surface elements sit
  on the lattice of voxel corners. Each 2 × 2 × 2 cell of voxels that is neither
  empty nor full is a surface element, located at its centre (a voxel corner),
  with the area of the marching-cubes surface (level 0.5, physical spacing)
  inside that cell as its weight. DeepMind takes these areas from a lookup table
  of 256 cases; here they come from scikit-image's marching cubes on the masks
  themselves, which can split the 2 ambiguous cases differently, hence the
  tolerance of the cross-check in ``tests/segment/test_metrics.py``.
* **Surface distance** from an element of A to B: the Euclidean distance in mm to
  the nearest element of B (``distance_transform_edt`` of the complement of B's
  elements on the corner lattice, ``sampling=spacing``).
* **HD95**: the larger of the two directed, area-weighted 95th percentiles (the
  distance at which the cumulative element area first reaches 95 %, no
  interpolation), in mm. **Surface Dice** at tolerance τ: the area of both
  surfaces within τ of the other surface over the total area of both.
* **Added path length** (Vaassen et al. 2020): per axial slice, the pixels of the
  reference contour (in-plane 4-neighbour surface of the slice) that are farther
  than ``apl_tolerance_mm`` from the predicted contour of that slice (τ = 0: not
  on it), i.e. the contour a clinician would have to draw. Reported in pixels and
  in mm, a pixel counted as ``sqrt(sx * sy)`` of contour length (a count of
  pixels, not a polygon length: diagonal runs count one pixel side per pixel).

Everything is computed on the union bounding box of the two masks padded by one
empty voxel, which gives the same numbers as on the whole volume (every surface
voxel and every nearest neighbour lies in that box) in a fraction of the time;
``crop=False`` computes on the whole arrays, for checks and benchmarks.

Empty masks: both empty raises :class:`SegmentationError`; one empty gives Dice,
Jaccard and surface Dice 0, HD95 ``inf`` (never NaN), and an APL of the whole
reference contour (or 0 when the reference is empty).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from skimage.measure import marching_cubes

from cohort.errors import SegmentationError

#: Surface-Dice tolerance the seed estimated for NSCLC inter-observer variability (mm).
DEFAULT_TOLERANCE_MM = 1.18
_FACES_3D = ndi.generate_binary_structure(3, 1)
_FACES_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_FACES_IN_PLANE[1] = ndi.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class SurfaceDistances:
    """Distances (mm) from each surface voxel of one mask to the other mask's surface."""

    reference_to_prediction: np.ndarray
    prediction_to_reference: np.ndarray


@dataclass(frozen=True)
class AddedPathLength:
    pixels: int  # reference-contour pixels to add, summed over the axial slices
    mm: float  # pixels x sqrt(sx * sy)
    tolerance_mm: float


@dataclass(frozen=True)
class SegmentationMetrics:
    """All metrics of one (reference, prediction) pair; see the module docstring."""

    dice: float
    jaccard: float
    hd95_mm: float
    surface_dice: float
    tolerance_mm: float
    apl_pixels: int
    apl_mm: float
    apl_tolerance_mm: float
    reference_voxels: int
    prediction_voxels: int


def _as_masks(reference: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(reference, dtype=bool), np.asarray(prediction, dtype=bool)
    if a.shape != b.shape or a.ndim != 3:
        raise SegmentationError(
            f"masks must be 3D arrays of one shape, got {a.shape} and {b.shape}",
            subject="segmentation metrics",
        )
    return a, b


def _check_spacing(spacing_zyx: tuple[float, float, float]) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise SegmentationError(f"spacing must be 3 positive numbers (z, y, x mm), got {spacing_zyx}")
    return spacing[0], spacing[1], spacing[2]


def union_box(reference: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their union bounding box.

    Raises :class:`SegmentationError` when both masks are empty.
    """
    # Slices first (two projections of the full arrays), then rows and columns of those slices only.
    slices = np.flatnonzero(reference.any(axis=(1, 2)) | prediction.any(axis=(1, 2)))
    if slices.size == 0:
        raise SegmentationError("both masks are empty: nothing to compare", subject="segmentation metrics")
    z = slice(int(slices[0]), int(slices[-1]) + 1)
    union = reference[z] | prediction[z]
    ranges = [z]
    for other in ((0, 2), (0, 1)):
        hit = np.flatnonzero(union.any(axis=other))
        ranges.append(slice(int(hit[0]), int(hit[-1]) + 1))
    box = tuple(ranges)
    return reference[box], prediction[box]


def _prepare(reference: np.ndarray, prediction: np.ndarray, crop: bool) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_masks(reference, prediction)
    if crop:
        return union_box(a, b)
    if not (a.any() or b.any()):
        raise SegmentationError("both masks are empty: nothing to compare", subject="segmentation metrics")
    return a, b


def dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """2 |A ∩ B| / (|A| + |B|); both empty raises :class:`SegmentationError`."""
    a, b = _as_masks(reference, prediction)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        raise SegmentationError("both masks are empty: Dice is undefined", subject="segmentation metrics")
    return 2.0 * int(np.count_nonzero(a & b)) / total


def jaccard(reference: np.ndarray, prediction: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B|; both empty raises :class:`SegmentationError`."""
    a, b = _as_masks(reference, prediction)
    union = int(np.count_nonzero(a | b))
    if union == 0:
        raise SegmentationError("both masks are empty: Jaccard is undefined", subject="segmentation metrics")
    return int(np.count_nonzero(a & b)) / union


def surface(mask: np.ndarray, *, in_plane: bool = False) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (in-plane neighbours only if asked).

    This voxel surface is the contour of the added path length; the surface
    distances use :func:`surface_elements` instead.
    """
    structure = _FACES_IN_PLANE if in_plane else _FACES_3D
    return mask & ~ndi.binary_erosion(mask, structure, border_value=0)


def surface_elements(mask: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Surface elements of a mask padded by one empty voxel: (cell is on the surface, cell area mm²).

    Cell ``(i, j, k)`` covers voxels ``i..i+1, j..j+1, k..k+1``; both arrays have
    shape ``mask.shape - 1``. A cell is on the surface when its 8 voxels are
    neither all inside nor all outside; its area is that of the marching-cubes
    surface inside it.
    """
    cells = tuple(n - 1 for n in mask.shape)
    inside = np.zeros(cells, dtype=np.uint8)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                inside += mask[dz : dz + cells[0], dy : dy + cells[1], dx : dx + cells[2]]
    on_surface = (inside > 0) & (inside < 8)
    area = np.zeros(cells, dtype=np.float64)
    if on_surface.any():
        verts, faces, _, _ = marching_cubes(mask.astype(np.float32), 0.5, spacing=spacing, method="lewiner")
        triangles = verts[faces]
        areas = 0.5 * np.linalg.norm(
            np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0]), axis=1
        )
        # Marching cubes triangulates each cell on its own: a triangle's centroid names its cell.
        centre = triangles.mean(axis=1) / np.asarray(spacing)
        index = np.clip(np.floor(centre).astype(np.int64), 0, np.asarray(cells) - 1)
        flat = np.ravel_multi_index((index[:, 0], index[:, 1], index[:, 2]), cells)
        area = np.bincount(flat, weights=areas, minlength=area.size).reshape(cells)
    return on_surface, area


@dataclass(frozen=True)
class _Surfaces:
    distances: SurfaceDistances
    reference_area: np.ndarray  # mm² of each element, in the order of the distances
    prediction_area: np.ndarray


def _surfaces(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float]) -> _Surfaces:
    # One empty voxel all round: outside the array counts as background, surfaces close.
    a, b = np.pad(a, 1), np.pad(b, 1)
    on_a, area_a = surface_elements(a, spacing)
    on_b, area_b = surface_elements(b, spacing)

    def to(target: np.ndarray, source: np.ndarray) -> np.ndarray:
        if not target.any():
            return np.full(int(np.count_nonzero(source)), np.inf)
        return np.asarray(ndi.distance_transform_edt(~target, sampling=spacing)[source], dtype=np.float64)

    return _Surfaces(
        SurfaceDistances(to(on_b, on_a), to(on_a, on_b)),
        reference_area=area_a[on_a],
        prediction_area=area_b[on_b],
    )


def surface_distances(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    *,
    crop: bool = True,
) -> SurfaceDistances:
    """Distances (mm) from every surface element of each mask to the other's surface (``inf`` if empty)."""
    a, b = _prepare(reference, prediction, crop)
    return _surfaces(a, b, _check_spacing(spacing_zyx)).distances


def _weighted_percentile(distances: np.ndarray, area: np.ndarray, percent: float) -> float:
    if distances.size == 0 or not np.isfinite(distances).all():
        return math.inf
    order = np.argsort(distances, kind="stable")
    cumulative = np.cumsum(area[order]) / area.sum()
    index = int(np.searchsorted(cumulative, percent / 100.0))
    return float(distances[order][min(index, distances.size - 1)])


def _hd95(s: _Surfaces, percent: float = 95.0) -> float:
    return max(
        _weighted_percentile(s.distances.reference_to_prediction, s.reference_area, percent),
        _weighted_percentile(s.distances.prediction_to_reference, s.prediction_area, percent),
    )


def _surface_dice(s: _Surfaces, tolerance_mm: float) -> float:
    d = s.distances
    total = float(s.reference_area.sum() + s.prediction_area.sum())
    close = float(s.reference_area[d.reference_to_prediction <= tolerance_mm].sum()) + float(
        s.prediction_area[d.prediction_to_reference <= tolerance_mm].sum()
    )
    return close / total


def hausdorff95(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    *,
    crop: bool = True,
) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (``inf`` when one mask is empty)."""
    a, b = _prepare(reference, prediction, crop)
    return _hd95(_surfaces(a, b, _check_spacing(spacing_zyx)))


def surface_dice(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    *,
    crop: bool = True,
) -> float:
    """Area fraction of both surfaces within ``tolerance_mm`` of the other surface."""
    a, b = _prepare(reference, prediction, crop)
    return _surface_dice(_surfaces(a, b, _check_spacing(spacing_zyx)), tolerance_mm)


def _added_path_length(
    a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float], tolerance_mm: float
) -> AddedPathLength:
    contour_a, contour_b = surface(a, in_plane=True), surface(b, in_plane=True)
    if tolerance_mm <= 0:
        missing = contour_a & ~contour_b
    else:
        # In-plane distances only: slices are kept apart by a spacing no tolerance reaches.
        far = (tolerance_mm + 1.0) * max(a.shape[1] * spacing[1], a.shape[2] * spacing[2], 1.0)
        if contour_b.any():
            distance = ndi.distance_transform_edt(~contour_b, sampling=(far, spacing[1], spacing[2]))
            missing = contour_a & (distance > tolerance_mm)
        else:
            missing = contour_a
    pixels = int(np.count_nonzero(missing))
    return AddedPathLength(pixels, pixels * math.sqrt(spacing[1] * spacing[2]), float(tolerance_mm))


def added_path_length(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    tolerance_mm: float = 0.0,
    *,
    crop: bool = True,
) -> AddedPathLength:
    """Reference-contour pixels (and mm) to add per axial slice, summed; see the module docstring."""
    a, b = _prepare(reference, prediction, crop)
    return _added_path_length(a, b, _check_spacing(spacing_zyx), tolerance_mm)


def segmentation_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    *,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    apl_tolerance_mm: float = 0.0,
    crop: bool = True,
) -> SegmentationMetrics:
    """Dice, Jaccard, HD95, surface Dice and APL of ``prediction`` against ``reference``."""
    spacing = _check_spacing(spacing_zyx)
    a, b = _prepare(reference, prediction, crop)
    n_a, n_b = int(np.count_nonzero(a)), int(np.count_nonzero(b))
    overlap = int(np.count_nonzero(a & b))
    surfaces = _surfaces(a, b, spacing)
    apl = _added_path_length(a, b, spacing, apl_tolerance_mm)
    return SegmentationMetrics(
        dice=2.0 * overlap / (n_a + n_b),
        jaccard=overlap / (n_a + n_b - overlap),
        hd95_mm=_hd95(surfaces),
        surface_dice=_surface_dice(surfaces, tolerance_mm),
        tolerance_mm=float(tolerance_mm),
        apl_pixels=apl.pixels,
        apl_mm=apl.mm,
        apl_tolerance_mm=apl.tolerance_mm,
        reference_voxels=n_a,
        prediction_voxels=n_b,
    )


def segmentation_metrics_image(
    reference: sitk.Image,
    prediction: sitk.Image,
    *,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    apl_tolerance_mm: float = 0.0,
    crop: bool = True,
    grid_tolerance: float = 1e-4,
) -> SegmentationMetrics:
    """:func:`segmentation_metrics` of two masks (non-zero = inside) that share one 3D grid.

    Raises :class:`SegmentationError` when size, spacing, origin or direction
    differ (by more than ``grid_tolerance``): resample the prediction onto the
    reference grid first (nearest neighbour).
    """
    checks = {
        "size": (reference.GetSize(), prediction.GetSize()),
        "spacing": (reference.GetSpacing(), prediction.GetSpacing()),
        "origin": (reference.GetOrigin(), prediction.GetOrigin()),
        "direction": (reference.GetDirection(), prediction.GetDirection()),
    }
    for name, (r, p) in checks.items():
        if len(r) != len(p) or not np.allclose(r, p, rtol=0.0, atol=grid_tolerance):
            raise SegmentationError(
                f"reference and prediction differ in {name} ({r} vs {p}); resample the prediction "
                "onto the reference grid (nearest neighbour) first",
                subject="segmentation metrics",
            )
    if reference.GetDimension() != 3:
        raise SegmentationError(f"3D masks are needed, got {reference.GetDimension()}D")
    spacing = reference.GetSpacing()
    return segmentation_metrics(
        sitk.GetArrayViewFromImage(reference) != 0,
        sitk.GetArrayViewFromImage(prediction) != 0,
        (spacing[2], spacing[1], spacing[0]),
        tolerance_mm=tolerance_mm,
        apl_tolerance_mm=apl_tolerance_mm,
        crop=crop,
    )
