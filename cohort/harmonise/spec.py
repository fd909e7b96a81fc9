"""The harmonisation spec: an ordered list of steps, each validated on its own ``op``.

In a cohort spec (YAML) it reads::

    harmonise:
      - {op: resample, spacing: [1, 1, null], interpolator: bspline}
      - {op: window, level: -600, width: 1500}
      - {op: bin_fixed_width, width: 25, lower: -1000}
      - {op: crop_pad, size: [512, 512, null], pad_value: -1000}

Every field that changes a result is a field here, so it lands in the provenance
record of each step (:mod:`cohort.harmonise.chain`). Unknown ops and unknown or
misspelled fields are refused (``extra="forbid"``) with :class:`SpecError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from cohort.errors import SpecError
from cohort.harmonise.ops import DEFAULT_MAX_UPSAMPLING, Interpolator, MaskInterpolator

PositiveSpacing = Annotated[float, Field(gt=0)]


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResampleStep(_Step):
    """Resample to ``spacing`` (x, y, z mm; null keeps the axis); masks follow the new grid."""

    op: Literal["resample"] = "resample"
    spacing: tuple[PositiveSpacing | None, PositiveSpacing | None, PositiveSpacing | None]
    interpolator: Interpolator = Interpolator.LINEAR
    mask_interpolator: MaskInterpolator = MaskInterpolator.NEAREST
    mask_threshold: float = Field(0.5, gt=0, le=1)
    max_upsampling: float = Field(DEFAULT_MAX_UPSAMPLING, ge=1)
    default_value: float = 0.0


class WindowStep(_Step):
    """Clip to ``level ± width / 2``; map to ``output_range`` when given."""

    op: Literal["window"] = "window"
    level: float
    width: float = Field(gt=0)
    output_range: tuple[float, float] | None = None


class ClipStep(_Step):
    op: Literal["clip"] = "clip"
    lower: float | None = None
    upper: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> ClipStep:
        if self.lower is None and self.upper is None:
            raise ValueError("clip needs lower, upper or both")
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ValueError(f"lower {self.lower} > upper {self.upper}")
        return self


class ZScoreStep(_Step):
    """Per image (no mean/std) or with parameters fitted on a training set (both given)."""

    op: Literal["zscore"] = "zscore"
    mean: float | None = None
    std: float | None = Field(None, gt=0)
    use_mask: bool = False

    @model_validator(mode="after")
    def _both_or_neither(self) -> ZScoreStep:
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std (fitted parameters) or neither (per image)")
        return self


class N4Step(_Step):
    op: Literal["n4"] = "n4"
    shrink_factor: int = Field(4, ge=1)
    iterations: tuple[Annotated[int, Field(ge=1)], ...] = (50, 50, 50, 50)
    convergence_threshold: float = Field(1e-3, gt=0)
    control_points: int = Field(4, ge=4)
    spline_order: int = Field(3, ge=1, le=3)
    use_mask: bool = False


class HistogramMatchStep(_Step):
    """Match the histogram to the reference image passed to the chain under ``reference``."""

    op: Literal["histogram_match"] = "histogram_match"
    reference: str = "default"
    levels: int = Field(256, ge=2)
    match_points: int = Field(64, ge=1)
    threshold_at_mean: bool = False


class EqualiseStep(_Step):
    op: Literal["histogram_equalise"] = "histogram_equalise"
    bins: int = Field(256, ge=2)
    use_mask: bool = False
    output_range: tuple[float, float] | None = None


class BinStep(_Step):
    """Fixed-width bins into 8 bits: ``floor((x − lower) / width)`` clipped to 0..255."""

    op: Literal["bin_fixed_width"] = "bin_fixed_width"
    width: float = Field(gt=0)
    lower: float


class CropPadStep(_Step):
    """Centre-crop or pad to ``size`` (x, y, z voxels; null keeps the axis)."""

    op: Literal["crop_pad"] = "crop_pad"
    size: tuple[
        Annotated[int, Field(ge=1)] | None,
        Annotated[int, Field(ge=1)] | None,
        Annotated[int, Field(ge=1)] | None,
    ]
    pad_value: float = 0.0


HarmoniseStep = Annotated[
    ResampleStep
    | WindowStep
    | ClipStep
    | ZScoreStep
    | N4Step
    | HistogramMatchStep
    | EqualiseStep
    | BinStep
    | CropPadStep,
    Field(discriminator="op"),
]

_STEPS: TypeAdapter[tuple[HarmoniseStep, ...]] = TypeAdapter(tuple[HarmoniseStep, ...])


def parse_steps(data: Sequence[Any]) -> tuple[HarmoniseStep, ...]:
    """Validate a list of step mappings (as read from YAML); raises :class:`SpecError`.

    Already validated step models pass through unchanged.
    """
    if isinstance(data, str | bytes) or not isinstance(data, Sequence):
        raise SpecError(f"harmonise must be a list of steps, got {type(data).__name__}", subject="harmonise")
    try:
        return _STEPS.validate_python(
            [step.model_dump() if isinstance(step, BaseModel) else step for step in data]
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"step {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise SpecError(problems, subject="harmonise") from exc
