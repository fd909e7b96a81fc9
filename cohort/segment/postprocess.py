"""Post-processing: network output -> probabilities -> mask on the original grid -> components.

Order (vectorised throughout, no per-voxel Python):

1. :func:`output_probabilities`: the output tensor ``(N, K, H, W)`` of the slices
   becomes the probability of one label, ``(N, H, W)`` (sigmoid or softmax,
   applied here only when the graph ends in logits), i.e. slices stacked to 3D.
2. :func:`to_reference`: that probability volume, on the model's grid, is
   resampled onto the original image grid (linear interpolation of the
   probabilities, or nearest) and thresholded. Linear interpolation followed by
   ``p >= threshold`` is the "linear + 0.5" rule for binary masks when the
   threshold is 0.5. Only the bounding box of the above-threshold voxels
   (grown by one model voxel) is resampled: no voxel outside it can reach the
   threshold, since a linear interpolant is a convex combination of its
   neighbours, so the result is exact and the cost scales with the tumour.
3. :func:`label_components`: 3D connected components with **26-connectivity**
   (voxels touching by a face, an edge or a corner are connected; 6- and
   18-connectivity can be chosen). Components are ranked by volume; the
   largest is the primary tumour (GTV-1). With :attr:`KeepComponents.ALL`
   every component at least ``min_component_mm3`` large is kept, labelled 1..n
   by decreasing volume, with its volume in mm³.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from cohort.errors import SegmentationError
from cohort.segment.model import Activation, OutputSpec


class KeepComponents(StrEnum):
    LARGEST = "largest"  # the primary tumour only (label 1)
    ALL = "all"  # every component >= min_component_mm3, labels 1..n by decreasing volume


class BackInterpolation(StrEnum):
    LINEAR = "linear"  # linear interpolation of the probabilities, then the threshold
    NEAREST = "nearest"


class Connectivity(IntEnum):
    FACE = 6
    EDGE = 18
    CORNER = 26

    def structure(self) -> np.ndarray:
        rank = {6: 1, 18: 2, 26: 3}[int(self)]
        return ndi.generate_binary_structure(3, rank)


@dataclass(frozen=True)
class PostprocessSettings:
    """Every parameter of post-processing. ``threshold=None``: the model manifest's threshold."""

    threshold: float | None = None
    keep: KeepComponents = KeepComponents.LARGEST
    min_component_mm3: float = 0.0
    connectivity: Connectivity = Connectivity.CORNER
    interpolation: BackInterpolation = BackInterpolation.LINEAR

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise SegmentationError(
                f"threshold must be in (0, 1), got {self.threshold}", subject="postprocess"
            )
        if self.min_component_mm3 < 0:
            raise SegmentationError("min_component_mm3 must be >= 0", subject="postprocess")


@dataclass(frozen=True)
class Component:
    """One connected component of the thresholded prediction (on the original grid)."""

    rank: int  # 1 = largest
    voxels: int
    volume_mm3: float
    kept: bool
    bbox: tuple[int, int, int, int, int, int]  # z0, y0, x0, z1, y1, x1 (exclusive ends), array order


@dataclass(frozen=True)
class Postprocessed:
    """``mask``: UInt8 labels on the original grid (1 = primary tumour, 2.. other kept components)."""

    mask: sitk.Image
    components: tuple[Component, ...]
    threshold: float

    @property
    def primary(self) -> Component | None:
        """The largest component when it was kept (large enough), else None."""
        return self.components[0] if self.components and self.components[0].kept else None


def output_probabilities(output: np.ndarray, spec: OutputSpec, channel: int) -> np.ndarray:
    """Probability of output ``channel`` per pixel, ``(N, H, W)`` float32, from ``(N, K, H, W)``."""
    if output.ndim != 4:
        raise SegmentationError(
            f"model output must be (N, K, H, W), got {output.shape}", subject="postprocess"
        )
    if not spec.from_logits:
        return np.ascontiguousarray(output[:, channel], dtype=np.float32)
    if spec.activation == Activation.SIGMOID:
        logits = output[:, channel].astype(np.float32)
        return np.asarray(0.5 * (1.0 + np.tanh(0.5 * logits)), dtype=np.float32)  # sigmoid without overflow
    shifted = output.astype(np.float32) - output.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return np.asarray(e[:, channel] / e.sum(axis=1), dtype=np.float32)


def _interpolator(kind: BackInterpolation) -> int:
    return sitk.sitkLinear if kind == BackInterpolation.LINEAR else sitk.sitkNearestNeighbor


def to_reference(
    probability: sitk.Image,
    reference: sitk.Image,
    threshold: float,
    interpolation: BackInterpolation = BackInterpolation.LINEAR,
) -> np.ndarray:
    """Resample ``probability`` (model grid) onto ``reference``'s grid and threshold: bool ``(z, y, x)``.

    Only the region that can reach ``threshold`` is resampled (see the module docstring).
    """
    nx, ny, nz = reference.GetSize()
    out = np.zeros((nz, ny, nx), dtype=bool)
    p = sitk.GetArrayViewFromImage(probability)
    hot = p >= threshold
    box = bounding_box(hot)
    if box is None:
        return out
    # Corners of the hot box grown by one model voxel, in physical space, then in reference indices.
    box_lo = [v - 1 for v in box[:3]]
    box_hi = list(box[3:])  # exclusive end = last hot voxel + 1
    corners = [
        probability.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z)))
        for z in (box_lo[0], box_hi[0])
        for y in (box_lo[1], box_hi[1])
        for x in (box_lo[2], box_hi[2])
    ]
    index = np.array([reference.TransformPhysicalPointToContinuousIndex(c) for c in corners])
    start = np.maximum(np.floor(index.min(axis=0)).astype(int) - 1, 0)
    stop = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 2, [nx, ny, nz])
    if np.any(stop <= start):
        return out
    size = [int(v) for v in stop - start]
    origin = reference.TransformIndexToPhysicalPoint([int(v) for v in start])
    region = sitk.Resample(
        probability,
        size,
        sitk.Transform(),
        _interpolator(interpolation),
        origin,
        reference.GetSpacing(),
        reference.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )
    sx, sy, sz = (int(v) for v in start)
    ex, ey, ez = (int(v) for v in stop)
    out[sz:ez, sy:ey, sx:ex] = sitk.GetArrayViewFromImage(region) >= threshold
    return out


def bounding_box(mask: np.ndarray) -> tuple[int, ...] | None:
    """``(z0, y0, x0, z1, y1, x1)`` (exclusive ends) of the nonzero voxels of a 3D array, or None."""
    lo: list[int] = []
    hi: list[int] = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        lo.append(int(hits[0]))
        hi.append(int(hits[-1]) + 1)
    return (*lo, *hi)


def label_components(
    mask: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    *,
    connectivity: Connectivity = Connectivity.CORNER,
    keep: KeepComponents = KeepComponents.LARGEST,
    min_component_mm3: float = 0.0,
) -> tuple[np.ndarray, tuple[Component, ...]]:
    """Connected components of a bool ``(z, y, x)`` mask, ranked by volume.

    Returns a uint8 label array (1 = largest; with ``keep=ALL`` 2.. the others
    kept, by decreasing volume; at most 255 labels) and every component found
    (``kept`` says which are in the label array). Ties in volume are broken by
    the position of the first voxel, so the result is deterministic.
    """
    out = np.zeros(mask.shape, dtype=np.uint8)
    box = bounding_box(mask)
    if box is None:
        return out, ()
    crop = tuple(slice(a, b) for a, b in zip(box[:3], box[3:], strict=True))
    labels, n = ndi.label(mask[crop], structure=connectivity.structure())
    voxel_mm3 = float(np.prod(spacing_zyx))
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-counts, kind="stable")  # stable: ties keep label order = raster order
    objects = ndi.find_objects(labels)
    new_label = np.zeros(n + 1, dtype=np.uint8)
    components: list[Component] = []
    next_label = 1
    for rank, idx in enumerate(order, start=1):
        volume = float(counts[idx]) * voxel_mm3
        kept = (rank == 1 or keep == KeepComponents.ALL) and volume >= min_component_mm3 and next_label <= 255
        if kept:
            new_label[idx + 1] = next_label
            next_label += 1
        sl = objects[idx]
        assert sl is not None
        bbox = tuple(s.start + o for s, o in zip(sl, box[:3], strict=True)) + tuple(
            s.stop + o for s, o in zip(sl, box[:3], strict=True)
        )
        components.append(Component(rank, int(counts[idx]), volume, kept, bbox))  # type: ignore[arg-type]
    out[crop] = new_label[labels]
    return out, tuple(components)


def postprocess(
    probability: sitk.Image,
    reference: sitk.Image,
    settings: PostprocessSettings,
    threshold: float,
) -> Postprocessed:
    """Probability volume on the model grid -> labelled mask on ``reference``'s grid (module docstring).

    ``threshold`` is used unless ``settings.threshold`` overrides it.
    """
    t = settings.threshold if settings.threshold is not None else threshold
    binary = to_reference(probability, reference, t, settings.interpolation)
    sx, sy, sz = reference.GetSpacing()
    labels, components = label_components(
        binary,
        (sz, sy, sx),
        connectivity=settings.connectivity,
        keep=settings.keep,
        min_component_mm3=settings.min_component_mm3,
    )
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(reference)
    return Postprocessed(mask=mask, components=components, threshold=t)


def resample_mask(
    mask: sitk.Image, reference: sitk.Image, interpolation: BackInterpolation = BackInterpolation.LINEAR
) -> sitk.Image:
    """A binary mask onto ``reference``'s grid: nearest, or linear interpolation then ``>= 0.5``."""
    as_float = sitk.Cast(mask > 0, sitk.sitkFloat32)
    moved = sitk.Resample(
        as_float, reference, sitk.Transform(), _interpolator(interpolation), 0.0, sitk.sitkFloat32
    )
    out = sitk.Cast(moved >= 0.5, sitk.sitkUInt8)
    out.CopyInformation(reference)
    return out


__all__ = [
    "BackInterpolation",
    "Component",
    "Connectivity",
    "KeepComponents",
    "PostprocessSettings",
    "Postprocessed",
    "bounding_box",
    "label_components",
    "output_probabilities",
    "postprocess",
    "resample_mask",
    "to_reference",
]
