"""Apply a harmonisation spec step by step, with a provenance record for every step.

A record holds the step's ``op`` and its parameters exactly as validated (every
default filled in), plus the SHA-256 of any reference image it used. The digest
of a chain is the SHA-256 of the canonical JSON of its records, so two outputs
with the same digest were made by the same operations with the same parameters.
Values computed per image (the mean and std of a per-image z-score, the grid a
resample produced) go to ``details``, which is kept beside the record and not
hashed: they describe the output, not the recipe.

Geometric steps (``resample``, ``crop_pad``) move an optional mask along with the
image; intensity steps leave it as it is and read it where ``use_mask`` is set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from cohort.errors import HarmoniseError
from cohort.harmonise import ops
from cohort.harmonise.spec import (
    BinStep,
    ClipStep,
    CropPadStep,
    EqualiseStep,
    HarmoniseStep,
    HistogramMatchStep,
    N4Step,
    ResampleStep,
    WindowStep,
    ZScoreStep,
    parse_steps,
)


@dataclass(frozen=True)
class StepRecord:
    """Provenance of one applied step: what was done (hashed) and what came out (not hashed)."""

    op: str
    params: Mapping[str, Any]
    details: Mapping[str, Any] = field(default_factory=dict)

    def canonical(self) -> str:
        return json.dumps({"op": self.op, "params": self.params}, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class StepResult:
    image: sitk.Image
    mask: sitk.Image | None
    record: StepRecord


@dataclass(frozen=True)
class ChainResult:
    image: sitk.Image
    mask: sitk.Image | None
    records: tuple[StepRecord, ...]
    digest: str  # chain_digest(records)


def chain_digest(records: Sequence[StepRecord]) -> str:
    """SHA-256 (hex) of the canonical JSON of the records' ops and parameters, in order."""
    text = "[" + ",".join(r.canonical() for r in records) + "]"
    return hashlib.sha256(text.encode()).hexdigest()


def image_digest(image: sitk.Image) -> str:
    """SHA-256 of an image's voxels, pixel type and geometry (names a reference image in provenance)."""
    h = hashlib.sha256()
    h.update(image.GetPixelIDTypeAsString().encode())
    for part in (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()):
        h.update(np.asarray(part, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    return h.hexdigest()


def _need_mask(mask: sitk.Image | None, op: str) -> sitk.Image:
    if mask is None:
        raise HarmoniseError(f"step {op} has use_mask set but no mask was given", subject=op)
    return mask


def apply_step(
    image: sitk.Image,
    step: HarmoniseStep,
    *,
    mask: sitk.Image | None = None,
    references: Mapping[str, sitk.Image] | None = None,
) -> StepResult:
    """Apply one validated step; return the new image, the (moved) mask and the step's record."""
    params: dict[str, Any] = step.model_dump(mode="json", exclude={"op"})
    details: dict[str, Any] = {}
    if isinstance(step, ResampleStep):
        out = ops.resample_image(
            image,
            step.spacing,
            step.interpolator,
            max_upsampling=step.max_upsampling,
            default_value=step.default_value,
        )
        if mask is not None:
            mask = ops.resample_mask_like(mask, out, step.mask_interpolator, step.mask_threshold)
        details = {"size": list(out.GetSize()), "spacing": list(out.GetSpacing())}
    elif isinstance(step, WindowStep):
        out = ops.window(image, step.level, step.width, step.output_range)
    elif isinstance(step, ClipStep):
        out = ops.clip(image, step.lower, step.upper)
    elif isinstance(step, ZScoreStep):
        use = _need_mask(mask, step.op) if step.use_mask else None
        if step.mean is not None and step.std is not None:
            fitted = ops.ZScoreParams(step.mean, step.std, n_images=0, n_voxels=0)
        else:
            fitted = ops.fit_zscore([image], None if use is None else [use])
        out = ops.zscore(image, fitted)
        details = {"mean": fitted.mean, "std": fitted.std}
    elif isinstance(step, N4Step):
        out = ops.n4_bias_correction(
            image,
            _need_mask(mask, step.op) if step.use_mask else None,
            shrink_factor=step.shrink_factor,
            iterations=step.iterations,
            convergence_threshold=step.convergence_threshold,
            control_points=step.control_points,
            spline_order=step.spline_order,
        )
    elif isinstance(step, HistogramMatchStep):
        reference = (references or {}).get(step.reference)
        if reference is None:
            raise HarmoniseError(
                f"histogram_match needs the reference image {step.reference!r}; pass it in references=",
                subject=step.op,
            )
        out = ops.match_histogram(
            image,
            reference,
            levels=step.levels,
            match_points=step.match_points,
            threshold_at_mean=step.threshold_at_mean,
        )
        params["reference_sha256"] = image_digest(reference)
    elif isinstance(step, EqualiseStep):
        out = ops.equalise_histogram(
            image,
            bins=step.bins,
            mask=_need_mask(mask, step.op) if step.use_mask else None,
            output_range=step.output_range,
        )
    elif isinstance(step, BinStep):
        out = ops.bin_fixed_width(image, step.width, step.lower)
    elif isinstance(step, CropPadStep):
        out = ops.crop_or_pad(image, step.size, step.pad_value)
        if mask is not None:
            mask = ops.crop_or_pad(sitk.Cast(mask != 0, sitk.sitkUInt8), step.size, 0)
        details = {"size": list(out.GetSize()), "origin": list(out.GetOrigin())}
    else:  # pragma: no cover - the discriminated union admits nothing else
        raise HarmoniseError(f"unknown step {step!r}")
    return StepResult(out, mask, StepRecord(step.op, params, details))


def apply_chain(
    image: sitk.Image,
    steps: Sequence[HarmoniseStep] | Sequence[Mapping[str, Any]],
    *,
    mask: sitk.Image | None = None,
    references: Mapping[str, sitk.Image] | None = None,
) -> ChainResult:
    """Apply the steps in order (mappings are validated first); return the image, mask and provenance."""
    validated = parse_steps(list(steps))
    records = []
    for step in validated:
        result = apply_step(image, step, mask=mask, references=references)
        image, mask = result.image, result.mask
        records.append(result.record)
    return ChainResult(image, mask, tuple(records), chain_digest(records))
