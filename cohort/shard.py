"""The shard worker: a plain function from work items to Arrow tables.

``process_shard`` runs every stage for each work item (read series, rasterise
each ROI, extract features) and returns a features table whose fixed columns
follow :data:`FEATURE_KEY_SCHEMA` (all remaining columns are float64 features)
and a failures table following :data:`FAILURE_SCHEMA`. A failure of one case or
one ROI becomes a failure row; it never stops the shard.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pydicom
import SimpleITK as sitk

import cohort
from cohort.curate.rtstruct import RoiMask, rasterise_rtstruct, read_roi_infos
from cohort.curate.select import METADATA_COLUMNS, RoiSelection, WorkItem
from cohort.curate.series import assemble_series
from cohort.errors import CohortError, RadiomicsError, RTStructError, SegmentationError, SpecError, Stage
from cohort.harmonise.chain import apply_chain
from cohort.index.source import read_dicom
from cohort.radiomics.crop import same_grid
from cohort.radiomics.extract import extract_features
from cohort.radiomics.perturb import perturb
from cohort.radiomics.subvolumes import split_solid
from cohort.segment.measure import measure_mask
from cohort.segment.postprocess import BackInterpolation, resample_mask

if TYPE_CHECKING:
    from cohort.segment.model import ModelSpec
    from cohort.segment.pipeline import SegmentationResult

#: Key columns of a feature row: one row per (series, RTSTRUCT, ROI) and feature set.
KEY_COLUMNS = ("series_uid", "rtstruct_uid", "roi_source")
#: Input content hashes of a row: a stored row with other values is stale and is replaced.
VERSION_COLUMNS = ("image_hash", "rtstruct_hash")

_str, _f64 = pa.string(), pa.float64()
FEATURE_KEY_SCHEMA = pa.schema(
    [
        ("patient_id", _str),
        ("study_uid", _str),
        ("series_uid", _str),
        ("rtstruct_uid", _str),
        ("roi", _str),
        ("roi_source", _str),
        ("role", _str),
        ("modality", _str),
        ("series_description", _str),
        ("study_date", _str),
        ("institution", _str),
        ("manufacturer", _str),
        ("manufacturer_model", _str),
        ("convolution_kernel", _str),
        ("kvp", _f64),
        ("exposure", _f64),
        ("tube_current", _f64),
        ("contrast_agent", _str),
        ("slice_thickness", _f64),
        ("pixel_spacing_row", _f64),
        ("pixel_spacing_col", _f64),
        ("n_slices", pa.int32()),
        ("mask_voxels", pa.int64()),
        ("mask_notes", _str),
        ("feature_set", _str),
        ("settings_hash", _str),
        ("settings_json", _str),
        ("image_hash", _str),
        ("rtstruct_hash", _str),
        ("cohort_version", _str),
        ("pyradiomics_version", _str),
        ("simpleitk_version", _str),
        ("pydicom_version", _str),
        ("numpy_version", _str),
        ("run_id", _str),
        ("processed_at", pa.timestamp("us", tz="UTC")),
    ]
)

FAILURE_SCHEMA = pa.schema(
    [
        ("run_id", _str),
        ("patient_id", _str),
        ("series_uid", _str),
        ("rtstruct_uid", _str),
        ("roi_source", _str),
        ("stage", _str),
        ("error_type", _str),
        ("subject", _str),
        ("reason", _str),
        ("input_path", _str),
        ("failed_at", pa.timestamp("us", tz="UTC")),
    ]
)

STAGE_TIMERS = (
    "read_series",
    "segment",
    "harmonise",
    "read_rtstruct",
    "rasterise",
    "measure",
    "radiomics",
    "stability",
)

#: Measurement columns of every row of a feature set made with automatic segmentation (the mask the
#: row's features come from: the model's or the RTSTRUCT's), before the radiomics features.
MEASUREMENT_COLUMNS = (
    "measure_volume_ml",
    "measure_recist_mm",
    "measure_volumetric_recist_mm",
    "measure_max_3d_diameter_mm",
)

#: Fixed columns of the perturbed-feature (stability) table; features follow as float64.
STABILITY_KEY_SCHEMA = pa.schema(
    [
        ("patient_id", _str),
        ("series_uid", _str),
        ("rtstruct_uid", _str),
        ("roi", _str),
        ("roi_source", _str),
        ("perturbation", _str),
        ("feature_set", _str),
        ("run_id", _str),
    ]
)


@dataclass(frozen=True)
class SubvolumeRule:
    """Split the ROI harmonised to ``roi`` at ``threshold`` into two named parts."""

    roi: str
    threshold: float
    solid: str
    rest: str


@dataclass(frozen=True)
class StabilitySettings:
    perturbations: tuple[str, ...]
    noise_sd: float
    seed: int


@dataclass(frozen=True)
class AutoSegmentation:
    """Automatic segmentation in the shard (``segmentation:`` of the spec)."""

    model: str  # registry name or folder
    model_sha256: str  # the file the feature set was planned with; another file on a worker is refused
    backend: Literal["onnxruntime", "torch"] = "onnxruntime"
    batch_size: int = 16
    threshold: float | None = None
    max_volume_ml: float | None = None
    #: Overlap reading, preprocessing, post-processing and radiomics with inference (GPU workers).
    pipelined: bool = False
    outputs: tuple[str, ...] = ()  # nifti | seg | rtstruct
    outputs_root: str = ""  # store folder (local path or URL) the mask files go to


@dataclass(frozen=True)
class ShardSettings:
    """What every shard needs besides its items; small and picklable."""

    radiomics_params: Mapping[str, Any]
    settings_hash: str
    feature_set: str
    run_id: str
    crop: bool = True
    max_case_mb: float | None = None
    interpolation: Literal["pyradiomics", "ibsi"] = "pyradiomics"
    subvolumes: tuple[SubvolumeRule, ...] = ()
    stability: StabilitySettings | None = None
    #: Benchmarking: run the orchestration (shards, tasks, result hand-off) without reading images or
    #: extracting features; every item then yields no row and no failure.
    noop: bool = False
    #: Environment variable with the pseudonym key when patient IDs are pseudonymised (else None).
    pseudonymise_env: str | None = None
    #: Harmonisation steps (JSON mappings, see cohort.harmonise) applied to each image before its masks.
    harmonise: tuple[Mapping[str, Any], ...] = ()
    #: Automatic segmentation of the items marked automatic; also adds MEASUREMENT_COLUMNS to every row.
    segmentation: AutoSegmentation | None = None

    def subvolume_rule(self, canonical: str) -> SubvolumeRule | None:
        return next((rule for rule in self.subvolumes if rule.roi == canonical), None)


def roi_keys(source_name: str, canonical: str, subvolumes: Sequence[SubvolumeRule]) -> list[str]:
    """The ``roi_source`` keys one RTSTRUCT ROI produces: itself and its sub-volumes."""
    rule = next((r for r in subvolumes if r.roi == canonical), None)
    if rule is None:
        return [source_name]
    return [source_name, f"{source_name}#solid", f"{source_name}#rest"]


@dataclass(frozen=True)
class ShardResult:
    features: pa.Table
    failures: pa.Table
    stability: pa.Table | None = None
    seconds: Mapping[str, float] = field(default_factory=dict)
    n_items: int = 0


@functools.cache
def library_versions() -> dict[str, str]:
    return {
        "cohort_version": cohort.__version__,
        "pyradiomics_version": version("pyradiomics-bhklab"),
        "simpleitk_version": version("SimpleITK"),
        "pydicom_version": version("pydicom"),
        "numpy_version": version("numpy"),
    }


def make_shards(
    items: Sequence[WorkItem], target_slices: int, *, min_shards: int = 1
) -> list[list[WorkItem]]:
    """Split items into shards of about ``target_slices`` slices, balanced by work.

    At least ``min_shards`` shards are made when there are that many items, so
    that every worker has something to do on a small cohort.

    Longest-processing-time-first: items sorted by slice count (largest first)
    go to the currently lightest shard, so shards carry similar numbers of
    slices (not of series). Each item lands in exactly one shard.
    """
    if not items:
        return []
    total = sum(max(item.n_slices, 1) for item in items)
    n_shards = max(1, min_shards, -(-total // max(target_slices, 1)))
    n_shards = min(len(items), n_shards)
    heap: list[tuple[int, int]] = [(0, i) for i in range(n_shards)]
    shards: list[list[WorkItem]] = [[] for _ in range(n_shards)]
    for item in sorted(items, key=lambda it: (-it.n_slices, it.series_uid, it.rtstruct_uid)):
        load, i = heapq.heappop(heap)
        shards[i].append(item)
        heapq.heappush(heap, (load + max(item.n_slices, 1), i))
    return [shard for shard in shards if shard]


class _Clock:
    """Seconds per stage, summed over items (and over the threads of a pipelined shard)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGE_TIMERS, 0.0)
        self._lock = threading.Lock()

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[stage] += time.perf_counter() - start


def _failure(
    item: WorkItem,
    settings: ShardSettings,
    exc: Exception,
    *,
    stage: Stage,
    roi_source: str | None,
    input_path: str,
) -> dict[str, Any]:
    if isinstance(exc, CohortError):
        stage, subject, reason = exc.stage, exc.subject or input_path, exc.reason
    else:
        subject, reason = input_path, str(exc)
    return {
        "run_id": settings.run_id,
        "patient_id": item.patient_id,
        "series_uid": item.series_uid,
        "rtstruct_uid": item.rtstruct_uid,
        "roi_source": roi_source,
        "stage": stage.value,
        "error_type": type(exc).__name__,
        "subject": subject,
        "reason": reason,
        "input_path": input_path,
        "failed_at": datetime.now(UTC),
    }


@dataclass
class ItemResult:
    """What one work item produced: feature rows, failure rows, perturbed-feature rows."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    perturbed: list[dict[str, Any]] = field(default_factory=list)


def process_item(item: WorkItem, settings: ShardSettings, clock: _Clock | None = None) -> ItemResult:
    """All stages for one work item; every ROI ends as a feature row or a failure row.

    With ``settings.noop`` nothing is read and nothing is produced (orchestration benchmarks).
    """
    if settings.noop:
        return ItemResult()
    clock = clock or _Clock()
    try:
        loaded = _load(item, settings, clock)
    except Exception as exc:  # any failure here fails the whole case, recorded per ROI
        return _case_failure(item, settings, exc, Stage.CURATE)
    if not item.automatic:
        return _rtstruct_result(item, settings, loaded, clock)
    try:
        if settings.segmentation is None:
            raise SegmentationError(
                "an automatic work item but no segmentation settings", subject=item.series_uid
            )
        with clock.time("segment"):
            result = segment_image(loaded.original, settings.segmentation, subject=_auto_subject(item))
    except Exception as exc:
        return _case_failure(item, settings, exc, Stage.SEGMENT)
    return _automatic_result(item, settings, loaded, result, clock)


@dataclass(frozen=True)
class _Loaded:
    """A read series: the image as read (segmentation input), as harmonised (radiomics input), notes."""

    original: sitk.Image
    image: sitk.Image
    actions: tuple[str, ...]


def _load(item: WorkItem, settings: ShardSettings, clock: _Clock) -> _Loaded:
    with clock.time("read_series"):
        volume = assemble_series(item.image_paths, series_uid=item.series_uid, policy=item.read_policy)
    image, actions = volume.image, list(volume.actions)
    if settings.harmonise:
        with clock.time("harmonise"):
            chain = apply_chain(image, settings.harmonise)
        image = chain.image  # masks are rasterised on the harmonised grid
        actions.append(f"harmonised ({len(chain.records)} steps, chain {chain.digest[:12]})")
    return _Loaded(volume.image, image, tuple(actions))


def _series_dir(item: WorkItem) -> str:
    return item.image_paths[0].rsplit("/", 1)[0] if item.image_paths else ""


def _auto_subject(item: WorkItem) -> str:
    return f"{item.series_uid} / {item.rois[0].source_name}" if item.rois else item.series_uid


def _case_failure(item: WorkItem, settings: ShardSettings, exc: BaseException, stage: Stage) -> ItemResult:
    """Every ROI of the item fails with the same reason (the series or the model could not be used)."""
    path = _series_dir(item) if stage is not Stage.MASK else item.rtstruct_path
    error = exc if isinstance(exc, Exception) else RuntimeError(str(exc))
    return ItemResult(
        failures=[
            _failure(item, settings, error, stage=stage, roi_source=r.source_name, input_path=path)
            for r in item.rois
        ]
    )


def _rtstruct_result(item: WorkItem, settings: ShardSettings, loaded: _Loaded, clock: _Clock) -> ItemResult:
    try:
        with clock.time("read_rtstruct"):
            structure_set = read_dicom(item.rtstruct_path)
            infos = read_roi_infos(structure_set)
    except Exception as exc:
        return _case_failure(item, settings, exc, Stage.MASK)
    out = ItemResult()
    masks: list[MaskTarget] = []
    for roi in item.rois:
        try:
            numbers = [info.number for info in infos if info.name == roi.source_name]
            if len(numbers) != 1:
                raise RTStructError(
                    f"{len(numbers)} ROIs named {roi.source_name!r} in the structure set; expected 1",
                    subject=item.rtstruct_path,
                )
            with clock.time("rasterise"):
                masks.append((roi, rasterise_rtstruct(structure_set, numbers[0], loaded.image)))
        except Exception as exc:
            out.failures.append(_roi_failure(item, settings, exc, roi.source_name, Stage.MASK))
    return _item_rows(item, settings, loaded, masks, clock, out)


def _automatic_result(
    item: WorkItem, settings: ShardSettings, loaded: _Loaded, result: SegmentationResult, clock: _Clock
) -> ItemResult:
    """The model's primary tumour, on the (harmonised) image's grid, as the item's one ROI."""
    (roi,) = item.rois
    subject = _auto_subject(item)
    try:
        assert settings.segmentation is not None
        if not result.found:
            raise SegmentationError(
                f"the model found no tumour (no voxel at or above the threshold {result.threshold:g})",
                subject=subject,
            )
        limit = settings.segmentation.max_volume_ml
        if limit is not None and result.measurements is not None and result.measurements.volume_ml > limit:
            raise SegmentationError(
                f"the model's tumour is {result.measurements.volume_ml:.0f} ml "
                f"({len(result.components)} component(s)), more than segmentation.max_volume_ml = {limit:g}; "
                "is the model meant for images like this one?",
                subject=subject,
            )
        tumour = sitk.Cast(result.mask == 1, sitk.sitkUInt8)  # the primary tumour, on the original grid
        provenance = result.provenance
        notes = (
            f"automatic: {provenance['model_name']} {provenance['model_version']} "
            f"(sha256 {provenance['model_sha256'][:12]}), threshold {result.threshold:g}, "
            f"largest of {len(result.components)} component(s)",
            *_write_outputs(item, settings.segmentation, result, tumour),
        )
        primary = tumour
        if not same_grid(tumour, loaded.image):  # harmonised onto another grid: the mask follows
            primary = resample_mask(tumour, loaded.image, BackInterpolation.NEAREST)
        voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(primary)))
    except Exception as exc:
        return _case_failure(item, settings, exc, Stage.SEGMENT)
    return _item_rows(item, settings, loaded, [(roi, RoiMask(primary, voxels, notes))], clock, ItemResult())


def _roi_failure(
    item: WorkItem, settings: ShardSettings, exc: Exception, roi_source: str, stage: Stage
) -> dict[str, Any]:
    path = item.rtstruct_path or _series_dir(item)
    return _failure(item, settings, exc, stage=stage, roi_source=roi_source, input_path=path)


MaskTarget = tuple[RoiSelection, RoiMask]


def _item_rows(
    item: WorkItem,
    settings: ShardSettings,
    loaded: _Loaded,
    masks: Sequence[MaskTarget],
    clock: _Clock,
    out: ItemResult,
) -> ItemResult:
    """Feature rows (or failure rows) of each mask and its sub-volumes, added to ``out``."""
    image = loaded.image
    common = {
        "patient_id": item.patient_id,
        "study_uid": item.study_uid,
        "series_uid": item.series_uid,
        "rtstruct_uid": item.rtstruct_uid,
        "role": item.role,
        "modality": item.modality,
        **{key: item.metadata.get(key) for key in METADATA_COLUMNS},
        "n_slices": item.n_slices,
        "feature_set": settings.feature_set,
        "settings_hash": settings.settings_hash,
        "settings_json": json.dumps(settings.radiomics_params, sort_keys=True),
        "image_hash": item.image_hash,
        "rtstruct_hash": item.rtstruct_hash,
        **library_versions(),
        "run_id": settings.run_id,
    }

    def fail(exc: Exception, roi_source: str, stage: Stage = Stage.RADIOMICS) -> None:
        out.failures.append(_roi_failure(item, settings, exc, roi_source, stage))

    for roi, roi_mask in masks:
        # What the reader did to the image (resampled an irregular stack, ...) travels with every row.
        notes = "; ".join([*(f"image: {action}" for action in loaded.actions), *roi_mask.notes]) or None
        targets = [(roi.canonical, roi.source_name, roi_mask.mask, roi_mask.voxel_count, notes)]
        rule = settings.subvolume_rule(roi.canonical)
        if rule is not None:
            parts = split_solid(
                image, roi_mask.mask, rule.threshold, solid_name=rule.solid, rest_name=rule.rest
            )
            targets += [
                (
                    p.name,
                    f"{roi.source_name}#{p.suffix}",
                    p.mask,
                    p.voxel_count,
                    f"{p.suffix} part of {roi.source_name} at threshold {rule.threshold:g}",
                )
                for p in parts
            ]
        for canonical, source, mask, voxels, target_notes in targets:
            subject = f"{item.series_uid} / {source}"
            try:
                if voxels == 0:
                    raise RadiomicsError(f"{canonical} is empty ({target_notes})", subject=subject)
                measures = {}
                if settings.segmentation is not None:
                    with clock.time("measure"):
                        measures = measurement_columns(mask)
                with clock.time("radiomics"):
                    features = measures | _extract(settings, image, mask, subject)
            except Exception as exc:
                fail(exc, source)
                continue
            out.rows.append(
                {
                    **common,
                    "roi": canonical,
                    "roi_source": source,
                    "mask_voxels": voxels,
                    "mask_notes": target_notes,
                    "processed_at": datetime.now(UTC),
                    **features,
                }
            )
            if settings.stability is not None:
                out.perturbed += _perturbed_rows(item, settings, image, mask, canonical, source, clock, fail)
    return out


def process_automatic_pipelined(
    items: Sequence[WorkItem], settings: ShardSettings, clock: _Clock | None = None
) -> Iterator[ItemResult]:
    """Automatic items with the next cases read and prepared, and the previous ones post-processed and
    extracted, on CPU threads while the current one is inferred (a GPU worker's inference never waits
    for radiomics). Same rows as :func:`process_item` one by one; results in the order of ``items``.
    """
    from cohort.segment.pipeline import finish_case, infer_case, prepare_case
    from cohort.segment.postprocess import PostprocessSettings
    from cohort.segment.runtime import run_pipelined

    clock = clock or _Clock()
    auto = settings.segmentation
    if auto is None:
        raise SegmentationError("automatic work items but no segmentation settings")
    model = _checked_model(auto, subject=items[0].series_uid if items else "")
    backend = _session(model, auto)
    post = PostprocessSettings(threshold=auto.threshold)

    def prepare(item: WorkItem) -> tuple[_Loaded, Any]:
        try:
            loaded = _load(item, settings, clock)
        except Exception as exc:
            raise _StageFailure(Stage.CURATE, exc) from exc
        with clock.time("segment"):
            return loaded, prepare_case(loaded.original, model, _auto_subject(item))

    def infer(ready: tuple[_Loaded, Any]) -> Any:
        with clock.time("segment"):
            return infer_case(ready[1], backend, auto.batch_size)

    def finish(ready: tuple[_Loaded, Any], output: Any) -> tuple[_Loaded, SegmentationResult]:
        with clock.time("segment"):
            return ready[0], finish_case(ready[1], output, model, post)

    for outcome in run_pipelined(items, prepare, infer, finish, prefetch=2):
        item = outcome.item
        if outcome.error is not None:
            error = outcome.error
            stage = Stage.SEGMENT
            if isinstance(error, _StageFailure):
                stage, error = error.stage, error.cause
            yield _case_failure(item, settings, error, stage)
            continue
        assert outcome.value is not None
        loaded, result = outcome.value
        yield _automatic_result(item, settings, loaded, result, clock)


class _StageFailure(Exception):
    """Carries the stage a pipelined case failed in (reading the series vs segmenting it)."""

    def __init__(self, stage: Stage, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.stage, self.cause = stage, cause


def _write_outputs(
    item: WorkItem, auto: AutoSegmentation, result: SegmentationResult, tumour: sitk.Image
) -> list[str]:
    """The automatic mask ``tumour`` (on the original grid) as NIfTI / DICOM-SEG / RTSTRUCT files under
    ``auto.outputs_root``.

    Returns notes for the row: where each file went, or why it could not be written (the features
    of the mask are still extracted: a viewer file is a by-product, not the case).
    """
    if not auto.outputs:
        return []
    import tempfile
    from pathlib import Path

    from cohort.curate.convert import write_mask
    from cohort.segment.outputs import AlgorithmInfo, write_rtstruct, write_seg
    from cohort.store.location import Location

    target = Location.parse(auto.outputs_root)
    stem = item.series_uid.replace("#", "_")
    algorithm = AlgorithmInfo(result.provenance["model_name"], result.provenance["model_version"])
    notes: list[str] = []
    sources: list[pydicom.Dataset] | None = None
    with tempfile.TemporaryDirectory(prefix="cohort-masks-") as tmp:
        for kind in auto.outputs:
            name = {"nifti": f"{stem}.nii.gz", "seg": f"{stem}.seg.dcm", "rtstruct": f"{stem}.rtstruct.dcm"}[
                kind
            ]
            local = Path(tmp) / name
            try:
                if kind == "nifti":
                    write_mask(tumour, local)
                else:
                    if sources is None:
                        sources = [read_dicom(p, stop_before_pixels=True) for p in item.image_paths]
                    writer = write_seg if kind == "seg" else write_rtstruct
                    writer({result.label_name: tumour}, sources, local, algorithm=algorithm)
                (target / name).write_bytes_atomic(local.read_bytes())
                notes.append(f"{kind}: masks/{target.name}/{name}")
            except Exception as exc:  # the row stands; the note says what is missing and why
                reason = exc.reason if isinstance(exc, CohortError) else str(exc)
                notes.append(f"{kind} not written: {reason}")
    return notes


def segment_image(image: sitk.Image, auto: AutoSegmentation, subject: str = "") -> SegmentationResult:
    """Segment one HU image with the (cached) model session of this worker process."""
    from cohort.segment.pipeline import segment_case
    from cohort.segment.postprocess import PostprocessSettings

    model = _checked_model(auto, subject)
    return segment_case(
        image,
        model,
        _session(model, auto),
        batch_size=auto.batch_size,
        settings=PostprocessSettings(threshold=auto.threshold),
        subject=subject,
    )


def _checked_model(auto: AutoSegmentation, subject: str) -> ModelSpec:
    """This worker's copy of the model, refused when its file is not the one the run was planned with."""
    model = _loaded_model(auto.model)
    if model.sha256 != auto.model_sha256:  # a long-lived worker may hold an older copy: look again
        _loaded_model.cache_clear()
        model = _loaded_model(auto.model)
    if model.sha256 != auto.model_sha256:
        raise SegmentationError(
            f"this worker's model file has sha256 {model.sha256[:12]}, the run was planned with "
            f"{auto.model_sha256[:12]}: give every worker the same models/ folder",
            subject=subject,
        )
    return model


def _session(model: ModelSpec, auto: AutoSegmentation) -> Any:
    from cohort.segment.runtime import BackendKind, BackendOptions, get_session

    return get_session(model, BackendOptions(kind=BackendKind(auto.backend)))


@functools.cache
def _loaded_model(name: str) -> ModelSpec:
    from cohort.segment.model import load_model

    return load_model(name)


def measurement_columns(mask: sitk.Image) -> dict[str, float]:
    """Volume, RECIST, volumetric RECIST and 3D diameter of a binary mask (MEASUREMENT_COLUMNS)."""
    m = measure_mask(mask, 1)
    values = (m.volume_ml, m.recist_mm, m.volumetric_recist_mm, m.max_3d_diameter_mm)
    return dict(zip(MEASUREMENT_COLUMNS, (float(v) for v in values), strict=True))


def _extract(settings: ShardSettings, image: Any, mask: Any, subject: str) -> dict[str, float]:
    return extract_features(
        image,
        mask,
        settings.radiomics_params,
        subject=subject,
        crop=settings.crop,
        max_case_mb=settings.max_case_mb,
        interpolation=settings.interpolation,
    )


def _perturbed_rows(
    item: WorkItem,
    settings: ShardSettings,
    image: Any,
    mask: Any,
    canonical: str,
    source: str,
    clock: _Clock,
    fail: Any,
) -> list[dict[str, Any]]:
    """Features of one ROI under each perturbation of the stability settings."""
    assert settings.stability is not None
    stability = settings.stability
    seed = stability.seed + int(item.image_hash[:8], 16)
    out = []
    for name, p_image, p_mask in perturb(
        image, mask, stability.perturbations, noise_sd=stability.noise_sd, seed=seed
    ):
        subject = f"{item.series_uid} / {source} / perturbation {name}"
        try:
            with clock.time("stability"):
                features = _extract(settings, p_image, p_mask, subject)
        except Exception as exc:
            fail(exc, f"{source}@{name}")
            continue
        out.append(
            {
                "patient_id": item.patient_id,
                "series_uid": item.series_uid,
                "rtstruct_uid": item.rtstruct_uid,
                "roi": canonical,
                "roi_source": source,
                "perturbation": name,
                "feature_set": settings.feature_set,
                "run_id": settings.run_id,
                **features,
            }
        )
    return out


def features_table(rows: Sequence[Mapping[str, Any]], key_schema: pa.Schema = FEATURE_KEY_SCHEMA) -> pa.Table:
    """Rows to a table: the fixed key/provenance schema, then float64 features in order."""
    if not rows:
        return pa.Table.from_pylist([], schema=key_schema)
    fixed = set(key_schema.names)
    feature_names = [k for k in rows[0] if k not in fixed]
    for row in rows[1:]:
        if [k for k in row if k not in fixed] != feature_names:
            raise ValueError("feature rows of one feature set disagree on their feature names")
    schema = key_schema
    for name in feature_names:
        schema = schema.append(pa.field(name, pa.float64()))
    return pa.Table.from_pylist(list(rows), schema=schema)


def check_features_schema(table: pa.Table) -> None:
    """Raise if ``table`` does not follow the declared feature-table schema."""
    head = table.schema.names[: len(FEATURE_KEY_SCHEMA)]
    if head != FEATURE_KEY_SCHEMA.names:
        raise ValueError(f"feature table key columns {head} != {FEATURE_KEY_SCHEMA.names}")
    for f in FEATURE_KEY_SCHEMA:
        if table.schema.field(f.name).type != f.type:
            raise ValueError(f"column {f.name}: {table.schema.field(f.name).type} != {f.type}")
    for f in list(table.schema)[len(FEATURE_KEY_SCHEMA) :]:
        if f.type != pa.float64():
            raise ValueError(f"feature column {f.name} is {f.type}, not float64")


def _check_every_roi_accounted(
    items: Sequence[WorkItem],
    settings: ShardSettings,
    rows: list[dict[str, Any]],
    failures: list[dict[str, Any]],
) -> None:
    """Every ROI asked for ends as a feature row or a failure row: no case is lost silently."""
    seen = {(r["series_uid"], r["rtstruct_uid"], r["roi_source"]) for r in rows}
    failed_keys = {(f["series_uid"], f["rtstruct_uid"], f["roi_source"]) for f in failures}
    for item in items:
        for roi in item.rois:
            for key in roi_keys(roi.source_name, roi.canonical, settings.subvolumes):
                full = (item.series_uid, item.rtstruct_uid, key)
                main = (item.series_uid, item.rtstruct_uid, roi.source_name)
                if full not in seen and full not in failed_keys and main not in failed_keys:
                    raise AssertionError(f"{full} has neither a feature row nor a failure row")


def patient_identity(settings: ShardSettings) -> Callable[[str], str]:
    """What the store records as a patient's ID: the ID itself, or its keyed pseudonym."""
    if settings.pseudonymise_env is None:
        return lambda patient_id: patient_id
    from cohort.curate.deid import DeidSettings, pseudonym_for

    secret = os.environ.get(settings.pseudonymise_env)
    if not secret:
        raise SpecError(
            f"privacy.patient_ids is pseudonymise but {settings.pseudonymise_env} is not set on this worker",
            subject=settings.pseudonymise_env,
        )
    key = DeidSettings(secret=secret.encode())
    return lambda patient_id: pseudonym_for(patient_id, key)


def process_shard(items: Sequence[WorkItem], settings: ShardSettings) -> ShardResult:
    """Process every item of a shard; one item's failure never stops the others."""
    clock = _Clock()
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    perturbed: list[dict[str, Any]] = []
    identity = patient_identity(settings)
    named = [dataclasses.replace(item, patient_id=identity(item.patient_id)) for item in items]
    auto = settings.segmentation
    pipelined = [i for i in named if i.automatic] if auto and auto.pipelined and not settings.noop else []
    results = [process_item(item, settings, clock) for item in named if not (pipelined and item.automatic)]
    if pipelined:
        try:
            results += list(process_automatic_pipelined(pipelined, settings, clock))
        except Exception as exc:  # the model cannot be used on this worker: every automatic item fails
            results += [_case_failure(item, settings, exc, Stage.SEGMENT) for item in pipelined]
    for result in results:
        rows += result.rows
        failures += result.failures
        perturbed += result.perturbed
    if not settings.noop:
        _check_every_roi_accounted(items, settings, rows, failures)
    table = features_table(rows)
    check_features_schema(table)
    return ShardResult(
        features=table,
        failures=pa.Table.from_pylist(failures, schema=FAILURE_SCHEMA),
        stability=features_table(perturbed, STABILITY_KEY_SCHEMA) if settings.stability else None,
        seconds=dict(clock.seconds),
        n_items=len(items),
    )
