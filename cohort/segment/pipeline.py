"""Segment one case: preprocess -> infer -> post-process -> measure; and many, overlapped.

The three parts are separate functions so that the CPU parts of one case can run
while another case is inferred (:func:`segment_cases`):

* :func:`prepare_case` (CPU): the manifest's preprocessing chain on the HU volume
  (e.g. ``isolate_lungs``) and the model grid: the image resampled in-plane to
  the model's spacing on a grid of the model's size centred on the image (crop
  or pad with ``fill_hu``, air), axes along the patient's (L, P, S), slices kept
  where they are; the chain runs before that resampling or, with
  ``geometry.preprocess_on: model_grid``, after it (the seed's order, and 3-4x
  cheaper for a 2 mm model on a 0.98 mm CT). Then one windowed plane per input
  channel. Returns the ``(N, C, H, W)`` float32 input.
* :func:`infer_case` (GPU or CPU): :func:`~cohort.segment.runtime.infer_volume`.
* :func:`finish_case` (CPU): output -> probability volume on the model grid ->
  mask on the original grid, components, the primary tumour (GTV-1)
  (:mod:`cohort.segment.postprocess`) -> measurements (:mod:`cohort.segment.measure`).

Preprocessing steps are looked up by name in a registry (:func:`register_step`);
``isolate_lungs`` (:func:`cohort.segment.lung.isolate_lungs`) is built in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from cohort.errors import CohortError, ModelError, SegmentationError
from cohort.segment.measure import TumourMeasurements, measure_mask
from cohort.segment.model import Interpolator, Manifest, ModelSpec
from cohort.segment.postprocess import Component, PostprocessSettings, output_probabilities, postprocess
from cohort.segment.runtime import Backend, BackendOptions, Outcome, get_session, infer_volume, run_pipelined

#: Smallest |cosine| between the slice normal and the patient's z axis for a series to count as axial.
AXIAL_TOLERANCE = 0.99

PreprocessStep = Callable[[sitk.Image, Mapping[str, Any]], sitk.Image]
ParamCheck = Callable[[Mapping[str, Any]], None]


@dataclass(frozen=True)
class _Step:
    run: PreprocessStep
    check: ParamCheck


_STEPS: dict[str, _Step] = {}


def register_step(name: str, run: PreprocessStep, check: ParamCheck | None = None) -> None:
    """Make ``name`` usable in a manifest's ``preprocessing`` chain.

    ``run(image, params)`` takes and returns an HU image on the same grid;
    ``check(params)`` raises (any exception) when the parameters are invalid and
    is called by :func:`~cohort.segment.model.load_model`.
    """
    _STEPS[name] = _Step(run=run, check=check or (lambda params: None))


def registered_steps() -> list[str]:
    return sorted(_STEPS)


def check_preprocessing(manifest: Manifest, subject: str = "") -> None:
    """Every step of the chain is registered and accepts its parameters; else :class:`ModelError`."""
    for position, spec in enumerate(manifest.preprocessing):
        step = _STEPS.get(spec.step)
        if step is None:
            raise ModelError(
                f"preprocessing[{position}]: unknown step {spec.step!r}; known steps: {registered_steps()}",
                subject=subject or manifest.name,
            )
        try:
            step.check(spec.params)
        except (TypeError, ValueError, CohortError) as exc:
            reason = exc.reason if isinstance(exc, CohortError) else str(exc)
            raise ModelError(
                f"preprocessing[{position}] ({spec.step}): invalid params: {reason}",
                subject=subject or manifest.name,
            ) from exc


def _lung_settings(params: Mapping[str, Any]) -> Any:
    from cohort.segment.lung import LungIsolationSettings

    return LungIsolationSettings(**dict(params))


def _isolate_lungs(image: sitk.Image, params: Mapping[str, Any]) -> sitk.Image:
    from cohort.segment.lung import isolate_lungs

    return isolate_lungs(image, _lung_settings(params)).image


register_step("isolate_lungs", _isolate_lungs, _lung_settings)


# -- model grid ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelGrid:
    """The grid the network sees: (x, y, z) origin, spacing, size; axes along L, P, S."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]

    def image(self, array: np.ndarray) -> sitk.Image:
        """A SimpleITK image of ``array`` (z, y, x) on this grid."""
        if array.shape != (self.size[2], self.size[1], self.size[0]):
            raise SegmentationError(f"array shape {array.shape} is not the grid's {self.size[::-1]}")
        out = sitk.GetImageFromArray(array)
        out.SetOrigin(self.origin)
        out.SetSpacing(self.spacing)
        return out


def _check_axial(image: sitk.Image, subject: str) -> None:
    if image.GetDimension() != 3:
        raise SegmentationError(f"a 3D image is needed, got {image.GetDimension()}D", subject=subject)
    normal_z = abs(float(np.asarray(image.GetDirection()).reshape(3, 3)[2, 2]))
    if normal_z < AXIAL_TOLERANCE:
        raise SegmentationError(
            f"the slices are not axial (|cos| between slice normal and patient z = {normal_z:.3f}); "
            "the model is slice-wise 2D on axial slices: resample the series to an axial grid first",
            subject=subject,
        )


def model_grid(image: sitk.Image, manifest: Manifest) -> ModelGrid:
    """The model's grid for ``image``: centred on the image in-plane, one plane per image slice."""
    geometry = manifest.geometry
    nx, ny, nz = image.GetSize()
    centre = np.array(
        image.TransformContinuousIndexToPhysicalPoint(((nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2))
    )
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    slice_step = float(abs(direction[2, 2]) * image.GetSpacing()[2])
    rows, cols = geometry.size
    spacing = (float(geometry.spacing_mm[0]), float(geometry.spacing_mm[1]), slice_step)
    half = np.array([(cols - 1) / 2 * spacing[0], (rows - 1) / 2 * spacing[1], (nz - 1) / 2 * spacing[2]])
    origin = centre - half
    return ModelGrid(
        origin=(float(origin[0]), float(origin[1]), float(origin[2])), spacing=spacing, size=(cols, rows, nz)
    )


_INTERPOLATORS = {
    Interpolator.LINEAR: sitk.sitkLinear,
    Interpolator.BSPLINE: sitk.sitkBSpline,
    Interpolator.NEAREST: sitk.sitkNearestNeighbor,
}


def resample_to_grid(image: sitk.Image, grid: ModelGrid, manifest: Manifest) -> np.ndarray:
    """``image`` (HU) on ``grid``: float32 (z, y, x), outside the image ``fill_hu``."""
    out = sitk.Resample(
        image,
        list(grid.size),
        sitk.Transform(),
        _INTERPOLATORS[manifest.geometry.interpolator],
        grid.origin,
        grid.spacing,
        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        float(manifest.geometry.fill_hu),
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(out)


def model_input(hu: np.ndarray, manifest: Manifest) -> np.ndarray:
    """One windowed plane per input channel: (N, C, H, W) in the input dtype."""
    planes = [channel.window.apply(hu) for channel in manifest.input.channels]
    stacked = np.stack(planes, axis=1)
    return stacked.astype(manifest.input.dtype.numpy, copy=False)


def preprocess(image: sitk.Image, manifest: Manifest, subject: str = "") -> sitk.Image:
    """Run the manifest's preprocessing chain on an HU image."""
    for spec in manifest.preprocessing:
        step = _STEPS.get(spec.step)
        if step is None:
            raise ModelError(f"unknown preprocessing step {spec.step!r}", subject=subject or manifest.name)
        image = step.run(image, spec.params)
    return image


# -- one case -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedCase:
    subject: str
    reference: sitk.Image  # the original image (its grid is where the mask goes)
    grid: ModelGrid
    inputs: np.ndarray  # (N, C, H, W)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SegmentationResult:
    """One segmented case. ``mask``: UInt8 labels on the original grid, 1 = primary tumour (GTV-1)."""

    subject: str
    mask: sitk.Image
    components: tuple[Component, ...]
    measurements: TumourMeasurements | None  # None when nothing reached the threshold
    threshold: float
    label_name: str
    provenance: dict[str, str]
    seconds: dict[str, float]

    @property
    def found(self) -> bool:
        return self.measurements is not None

    def as_row(self) -> dict[str, Any]:
        """Flat columns for a results table (measurements, counts, timings, model provenance)."""
        row: dict[str, Any] = {"subject": self.subject, "label": self.label_name, "found": self.found}
        row["components"] = len(self.components)
        row["threshold"] = self.threshold
        if self.measurements is not None:
            row |= self.measurements.as_row()
        row |= {f"seconds_{k}": v for k, v in self.seconds.items()}
        return row | self.provenance


def prepare_case(image: sitk.Image, model: ModelSpec, subject: str = "") -> PreparedCase:
    """CPU part before inference: preprocessing chain, model grid, windows (module docstring)."""
    subject = subject or model.name
    _check_axial(image, subject)
    manifest = model.manifest
    grid = model_grid(image, manifest)
    t0 = time.perf_counter()
    if manifest.geometry.preprocess_on == "model_grid":
        on_grid = grid.image(resample_to_grid(image, grid, manifest))
        t1 = time.perf_counter()
        hu = sitk.GetArrayFromImage(preprocess(on_grid, manifest, subject))  # a copy: the image is temporary
        t2 = time.perf_counter()
        seconds = {"model_grid": t1 - t0, "preprocess": t2 - t1}
    else:
        processed = preprocess(image, manifest, subject)
        t1 = time.perf_counter()
        hu = resample_to_grid(processed, grid, manifest)
        t2 = time.perf_counter()
        seconds = {"preprocess": t1 - t0, "model_grid": t2 - t1}
    t3 = time.perf_counter()
    inputs = model_input(hu, manifest)
    seconds["model_grid"] += time.perf_counter() - t3
    return PreparedCase(subject=subject, reference=image, grid=grid, inputs=inputs, seconds=seconds)


def infer_case(prepared: PreparedCase, backend: Backend, batch_size: int = 16) -> np.ndarray:
    return infer_volume(prepared.inputs, backend, batch_size)


def finish_case(
    prepared: PreparedCase,
    output: np.ndarray,
    model: ModelSpec,
    settings: PostprocessSettings | None = None,
    *,
    label: int | None = None,
) -> SegmentationResult:
    """CPU part after inference: probabilities, mask on the original grid, components, measurements."""
    settings = settings or PostprocessSettings()
    manifest = model.manifest
    label = label if label is not None else manifest.primary_label
    t0 = time.perf_counter()
    probability = output_probabilities(output, manifest.output, manifest.label_channel(label))
    post = postprocess(
        prepared.grid.image(probability), prepared.reference, settings, manifest.output.threshold
    )
    t1 = time.perf_counter()
    measurements = measure_mask(post.mask, 1) if post.primary is not None else None
    t2 = time.perf_counter()
    return SegmentationResult(
        subject=prepared.subject,
        mask=post.mask,
        components=post.components,
        measurements=measurements,
        threshold=post.threshold,
        label_name=manifest.labels[label],
        provenance=model.provenance(),
        seconds=prepared.seconds | {"postprocess": t1 - t0, "measure": t2 - t1},
    )


def segment_case(
    image: sitk.Image,
    model: ModelSpec,
    backend: Backend | None = None,
    *,
    batch_size: int = 16,
    settings: PostprocessSettings | None = None,
    subject: str = "",
) -> SegmentationResult:
    """Segment one HU image (preprocess -> infer -> post-process -> measure).

    ``backend``: default the cached ONNX Runtime session of this process
    (:func:`~cohort.segment.runtime.get_session`).
    """
    backend = backend or get_session(model)
    prepared = prepare_case(image, model, subject)
    t0 = time.perf_counter()
    output = infer_case(prepared, backend, batch_size)
    infer_s = time.perf_counter() - t0
    result = finish_case(prepared, output, model, settings)
    return _with_seconds(result, {"infer": infer_s})


def _with_seconds(result: SegmentationResult, extra: Mapping[str, float]) -> SegmentationResult:
    return SegmentationResult(**{**result.__dict__, "seconds": result.seconds | dict(extra)})


@dataclass(frozen=True)
class CaseInput:
    """One case for :func:`segment_cases`: a name and how to load its HU image (called on a CPU thread)."""

    subject: str
    load: Callable[[], sitk.Image]


def segment_cases(
    cases: Iterable[CaseInput],
    model: ModelSpec,
    *,
    options: BackendOptions | None = None,
    backend: Backend | None = None,
    batch_size: int = 16,
    settings: PostprocessSettings | None = None,
    prefetch: int = 2,
    prepare_workers: int = 1,
    finish_workers: int = 1,
    overlap: bool = True,
) -> Iterator[Outcome[CaseInput, SegmentationResult]]:
    """Segment many cases with loading + preprocessing of the next cases and post-processing of the
    previous one running on CPU threads while the current one is inferred (``overlap=False``: one
    after the other, for comparison). One outcome per case, in order; a failing case carries its
    error and the others go on.
    """
    run = backend or get_session(model, options)

    def prepare(case: CaseInput) -> PreparedCase:
        t0 = time.perf_counter()
        image = case.load()
        loaded = time.perf_counter() - t0
        prepared = prepare_case(image, model, case.subject)
        return PreparedCase(**{**prepared.__dict__, "seconds": {"load": loaded, **prepared.seconds}})

    def infer(prepared: PreparedCase) -> np.ndarray:
        return infer_case(prepared, run, batch_size)

    def finish(prepared: PreparedCase, output: np.ndarray) -> SegmentationResult:
        return finish_case(prepared, output, model, settings)

    if overlap:
        for outcome in run_pipelined(
            cases,
            prepare,
            infer,
            finish,
            prefetch=prefetch,
            prepare_workers=prepare_workers,
            finish_workers=finish_workers,
        ):
            yield _add_infer_seconds(outcome)
        return
    for case in cases:
        try:
            ready = prepare(case)
            t0 = time.perf_counter()
            raw = infer(ready)
            seconds = {"infer": time.perf_counter() - t0}
            yield Outcome(item=case, value=_with_seconds(finish(ready, raw), seconds), seconds=seconds)
        except Exception as exc:  # recorded in the case's Outcome
            yield Outcome(item=case, error=exc)


def _add_infer_seconds(
    outcome: Outcome[CaseInput, SegmentationResult],
) -> Outcome[CaseInput, SegmentationResult]:
    if outcome.value is None:
        return outcome
    return Outcome(
        item=outcome.item, value=_with_seconds(outcome.value, outcome.seconds), seconds=outcome.seconds
    )


__all__ = [
    "AXIAL_TOLERANCE",
    "CaseInput",
    "ModelGrid",
    "PreparedCase",
    "SegmentationResult",
    "check_preprocessing",
    "finish_case",
    "infer_case",
    "model_grid",
    "model_input",
    "prepare_case",
    "preprocess",
    "register_step",
    "registered_steps",
    "resample_to_grid",
    "segment_case",
    "segment_cases",
]
