"""The cohort spec: one YAML file that says what to process and how.

Layering, lowest to highest precedence: the defaults below, the YAML file,
environment variables (``COHORT_<FIELD>`` with ``__`` between nested names, e.g.
``COHORT_EXECUTOR__ADDRESS=tcp://10.0.0.5:8786``), then explicit overrides passed
by the caller (the CLI's ``--store`` and friends). Relative paths in a file are
resolved against the file's folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cohort.errors import SpecError
from cohort.harmonise.spec import HarmoniseStep

ENV_PREFIX = "COHORT_"

#: Default ROI-name harmonisation: canonical name -> case-insensitive patterns
#: that must match the whole RTSTRUCT ROI name.
DEFAULT_ROIS: dict[str, list[str]] = {
    "GTV": [r"gtv[-_ ]?1", r"gtv", r"gtv[-_ ]?p(rimary)?"],
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def store_root(value: Any) -> Any:
    """A store or archive root as a spec keeps it: local folders absolute, URLs (``s3://...``) as given."""
    if isinstance(value, str | os.PathLike):
        text = os.fspath(value)
        return text.rstrip("/") if "://" in text else str(Path(text).absolute())
    return value


class SelectionSpec(_Model):
    """Which image series enter the cohort."""

    modality: str = Field("CT", description="Modality of the image series to process.")
    require_roi: str = Field(
        "GTV",
        description="Regular expression; a series is selected only if an RTSTRUCT that "
        "references it has an ROI whose harmonised name fully matches it.",
    )

    per_patient: Literal["all", "thinnest", "most_slices"] = Field(
        "all",
        description="Which of a patient's eligible series to keep (per role when roles are given): "
        "'all'; 'thinnest' (smallest slice thickness, then most slices, then finest pixel spacing); "
        "'most_slices'. Eligible = passes qc, has a role if roles are given, and an RTSTRUCT with "
        "require_roi. Losers are recorded in the decision table with the winner.",
    )

    roles: dict[str, str] = Field(
        default_factory=dict,
        description="Series role -> regular expression searched (case-insensitive) in the series "
        "description, e.g. {T1c: 't1.*(post|gd|\\+c)', T2: 't2'}. With roles, each selected series "
        "gets a role, and series of the same study and frame of reference share structure sets.",
    )

    @field_validator("require_roi")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from exc
        return value

    @field_validator("roles")
    @classmethod
    def _role_patterns_compile(cls, value: dict[str, str]) -> dict[str, str]:
        for role, pattern in value.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", role):
                raise ValueError(f"role name {role!r} must be letters and digits (it prefixes feature names)")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"roles.{role}: not a regular expression: {exc}") from exc
        return value


class RangeSpec(_Model):
    """An inclusive range; a missing bound is no limit. YAML: ``{min: 1, max: 5}``.

    (A mapping, not a pair, so that ``COHORT_QC__SLICE_THICKNESS__MAX`` overrides one bound.)
    """

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> RangeSpec:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        return self

    @property
    def limited(self) -> bool:
        return self.min is not None or self.max is not None

    def contains(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def __str__(self) -> str:
        lo = "-inf" if self.min is None else f"{self.min:g}"
        hi = "inf" if self.max is None else f"{self.max:g}"
        return f"[{lo}, {hi}]"


class GeometryQcSpec(_Model):
    """How series with geometry defects are split, repaired or refused (headers checked at indexing)."""

    split: bool = Field(
        True,
        description="Read a series of mixed geometries, or of several acquisitions / temporal positions "
        "that each cover the stack, as one sub-series each (<SeriesInstanceUID>#geo1, #acq2, #t3).",
    )
    irregular_spacing: Literal["refuse", "resample"] = Field(
        "refuse",
        description="Missing slices or irregular spacing: refuse the series, or resample it along the "
        "normal onto a regular grid at the median spacing (linear; acquired slices kept exactly).",
    )
    gantry_tilt: Literal["refuse", "resample"] = Field(
        "refuse",
        description="A stack leaning from the slice normal (sheared grid): refuse, or shift each slice "
        "in-plane onto an orthogonal grid (linear interpolation).",
    )
    duplicate_positions: Literal["refuse", "keep_first"] = Field(
        "refuse", description="Several slices at one position: refuse, or keep the lowest InstanceNumber."
    )
    max_spacing_deviation: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Largest gap deviation from the median spacing (relative) of a regular series.",
    )
    missing_slice_factor: float = Field(
        1.5, gt=1, description="A gap longer than this many median spacings holds missing slices."
    )
    max_tilt_pixels: float = Field(
        0.25,
        gt=0,
        description="Largest in-plane offset of a slice from the stack axis (pixels) of an untilted stack.",
    )


#: ContrastBolusAgent values that mean "no contrast" (compared case-insensitively).
DEFAULT_NO_CONTRAST = ["", "none", "no", "n/a", "na", "0", "no contrast", "without"]


class QcSpec(_Model):
    """Quality checks: every image series gets pass/fail per check with a reason; a failing series
    is not selected. Unset limits pass everything (the defaults check nothing but geometry)."""

    modality: list[str] | None = Field(
        None, description="Accepted modalities; default: [selection.modality]."
    )
    orientation: list[Literal["axial", "coronal", "sagittal"]] | None = Field(
        None, description="Accepted orientations (the patient axis nearest to the slice normal)."
    )
    max_obliquity_deg: float | None = Field(
        None, ge=0, description="Largest angle between the slice normal and its nearest patient axis."
    )
    slice_thickness: RangeSpec = Field(default_factory=RangeSpec, description="SliceThickness (mm).")
    slice_count: RangeSpec = Field(default_factory=RangeSpec, description="Number of slice positions.")
    pixel_spacing: RangeSpec = Field(default_factory=RangeSpec, description="Both PixelSpacing values (mm).")
    in_plane_size: RangeSpec = Field(default_factory=RangeSpec, description="Both Rows and Columns (pixels).")
    kernels: list[str] = Field(
        default_factory=list,
        description="Accepted ConvolutionKernel values: regular expressions matched in full, "
        "case-insensitive; empty accepts any (and a missing kernel).",
    )
    require_rescale: bool = Field(
        False, description="Every instance must carry RescaleSlope and RescaleIntercept."
    )
    contrast: Literal["any", "without", "with"] = Field(
        "any", description="ContrastBolusAgent: any, without (absent or a no-contrast value) or with."
    )
    no_contrast_values: list[str] = Field(
        default_factory=lambda: list(DEFAULT_NO_CONTRAST),
        description="ContrastBolusAgent values that mean no contrast (case-insensitive).",
    )
    geometry: GeometryQcSpec = GeometryQcSpec()

    @field_validator("kernels")
    @classmethod
    def _kernel_patterns_compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from exc
        return value


Perturbation = Literal["erode", "dilate", "shift_x", "shift_y", "noise", "translate"]
PERTURBATIONS: tuple[Perturbation, ...] = ("erode", "dilate", "shift_x", "shift_y", "noise", "translate")


class SubvolumeSpec(_Model):
    """Split an ROI into a solid part (>= threshold) and the rest (ground glass)."""

    threshold: float = Field(description="Intensity (HU for CT) at or above which a voxel is solid.")
    solid: str | None = Field(None, description="Name of the solid part; default <ROI>_solid.")
    rest: str | None = Field(None, description="Name of the remainder; default <ROI>_ggo.")


class StabilitySpec(_Model):
    """Repeated extraction under small perturbations, for per-feature ICC."""

    enabled: bool = False
    perturbations: list[Perturbation] = Field(default_factory=lambda: list(PERTURBATIONS))
    noise_sd: float = Field(10.0, gt=0, description="Sd of the Gaussian noise added to the image.")
    seed: int = 0
    icc: Literal["ICC(1,1)", "ICC(2,1)", "ICC(3,1)"] = "ICC(1,1)"


class RadiomicsSpec(_Model):
    """pyradiomics parameters: a shipped preset, a parameter file, or inline."""

    preset: str | None = Field("ct-original", description="Name of a shipped preset.")
    params_file: Path | None = Field(None, description="A pyradiomics parameter file (YAML/JSON).")
    params: dict[str, Any] | None = Field(None, description="Inline pyradiomics parameters.")
    crop: bool = Field(True, description="Crop to the ROI with a safe margin before extraction.")
    interpolation: Literal["pyradiomics", "ibsi"] = Field(
        "pyradiomics",
        description="Who resamples to resampledPixelSpacing: pyradiomics (corner-anchored grid, "
        "nearest-neighbour mask) or the platform, as the IBSI manual prescribes (centred grid, "
        "linear mask >= 0.5, rounded intensities).",
    )
    max_case_mb: float | None = Field(
        8192, gt=0, description="Refuse an ROI whose estimated extraction memory exceeds this (MiB)."
    )
    subvolumes: dict[str, SubvolumeSpec] = Field(
        default_factory=dict, description="Harmonised ROI name -> solid/ground-glass split."
    )
    stability: StabilitySpec = StabilitySpec()

    @model_validator(mode="after")
    def _one_source(self) -> RadiomicsSpec:
        given = [x is not None for x in (self.params_file, self.params)]
        if all(given):
            raise ValueError("give either radiomics.params_file or radiomics.params, not both")
        return self

    def resolve(self) -> dict[str, Any]:
        """The pyradiomics parameter dictionary this spec stands for."""
        if self.params is not None:
            return copy.deepcopy(self.params)
        if self.params_file is not None:
            return _read_yaml(self.params_file)
        if self.preset is None:
            raise SpecError("radiomics: set one of preset, params_file or params")
        return load_preset(self.preset)


class ExecutorSpec(_Model):
    """Where shards run."""

    kind: Literal["dask", "ray", "threads"] = Field(
        "dask",
        description="'dask' (LocalCluster or an existing scheduler), 'ray' (a local Ray instance or an "
        "existing cluster; needs the 'ray' extra) or 'threads' (in-process).",
    )
    address: str | None = Field(
        None,
        description="Address of an existing Dask scheduler (tcp://host:8786) or Ray cluster (ray://host:10001).",
    )
    n_workers: int = Field(2, ge=1, description="Local worker processes (Dask LocalCluster; Ray CPUs).")
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = Field("auto", description="Per-worker memory limit of the LocalCluster.")
    retries: int = Field(
        1,
        ge=0,
        description="Retries of a shard whose task failed as a whole (a lost worker, a transient error).",
    )
    noop_stages: bool = Field(
        False,
        description="Benchmarking: run the orchestration without reading images or extracting features "
        "(same index, selection, shards and tasks; shards produce no rows and no failures).",
    )


class PrivacySpec(_Model):
    """Whether patient IDs enter the feature store."""

    patient_ids: Literal["keep", "pseudonymise"] = Field(
        "keep",
        description="keep: the archive's PatientID in feature and failure rows (joins clinical tables "
        "keyed by it); pseudonymise: a keyed pseudonym instead, the same one `cohort export` gives "
        "(join clinical tables with Store.join_clinical(..., pseudonymise=True)).",
    )
    secret_env: str = Field(
        "COHORT_DEID_SECRET",
        pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="Environment variable holding the pseudonym key (never the key itself).",
    )


class SegmentationSpec(_Model):
    """Automatic segmentation inside ``process-cohort``: radiomics and measurements on the model's mask."""

    model: str | None = Field(
        None,
        description="A registry model name (models/<name>, or $COHORT_MODEL_REGISTRY) or a model folder; "
        "null: no automatic segmentation. Its file hash is part of the feature-set hash.",
    )
    roi: str = Field(
        "GTV_auto",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Canonical ROI name of the automatic mask in the feature table (roi_source is "
        "'model:<model name>').",
    )
    unannotated: bool = Field(
        True,
        description="Also select image series that have no usable structure set (no RTSTRUCT, or none "
        "with selection.require_roi): they get the automatic ROI only.",
    )
    gpu: bool = Field(
        False,
        description="Segmentation shards ask Dask for resources={'GPU': 1} (only workers started with "
        "--resources GPU=1 take them) and Ray for num_gpus=1.",
    )
    backend: Literal["onnxruntime", "torch"] = Field(
        "onnxruntime",
        description="onnxruntime (TensorRT -> CUDA -> CPU, the first available) or torch (the same ONNX "
        "model on PyTorch, CUDA when present; needs the 'torch' extra).",
    )
    batch_size: int = Field(16, ge=1, description="Slices per inference batch.")
    threshold: float | None = Field(
        None, gt=0, lt=1, description="Probability threshold; null: the model manifest's."
    )
    outputs: list[Literal["nifti", "seg", "rtstruct"]] = Field(
        default_factory=list,
        description="Write each automatic mask to masks/<feature set>/ in the store: 'nifti' "
        "(<series>.nii.gz), 'seg' (<series>.seg.dcm, DICOM-SEG) and/or 'rtstruct' (<series>.rtstruct.dcm); "
        "both DICOM objects reference the source series, for a viewer or a treatment planning system.",
    )
    max_volume_ml: float | None = Field(
        None,
        gt=0,
        description="Refuse an automatic tumour larger than this (ml) as a failure row instead of "
        "extracting features from it: a model applied to data unlike its training data can return "
        "most of a lung, and radiomics of a 2-litre mask takes minutes. null: no limit.",
    )


class CohortSpec(_Model):
    """A whole cohort run."""

    name: str = Field("cohort", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    archive: str = Field(
        description="Root of the DICOM archive: a local folder or an object-store URL (s3://bucket/prefix)."
    )
    store: str = Field(
        description="Root of the feature store: a local folder or an object-store URL (s3://bucket/prefix)."
    )
    selection: SelectionSpec = SelectionSpec()
    qc: QcSpec = QcSpec()
    rois: dict[str, list[str]] = Field(default_factory=lambda: copy.deepcopy(DEFAULT_ROIS))
    radiomics: RadiomicsSpec = RadiomicsSpec()
    executor: ExecutorSpec = ExecutorSpec()
    privacy: PrivacySpec = PrivacySpec()
    segmentation: SegmentationSpec = SegmentationSpec()
    harmonise: list[HarmoniseStep] = Field(
        default_factory=list,
        description="Image harmonisation before radiomics, in order (resample, window, clip, zscore, n4, "
        "histogram_equalise, bin_fixed_width, crop_pad, ...; see cohort.harmonise). Part of the "
        "feature-set hash.",
    )
    shard_slices: int = Field(
        1500, ge=1, description="Target number of CT slices per shard (one Prefect task each)."
    )

    _store_root = field_validator("store", mode="before")(store_root)
    _archive_root = field_validator("archive", mode="before")(store_root)

    @field_validator("rois")
    @classmethod
    def _patterns_compile(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, patterns in value.items():
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"rois.{name}: {pattern!r} is not a regular expression: {exc}") from exc
        return value

    def radiomics_params(self) -> dict[str, Any]:
        return self.radiomics.resolve()

    def feature_settings(self) -> dict[str, Any]:
        """Everything that changes a feature value: hashed into the feature-set name."""
        settings: dict[str, Any] = {"pyradiomics": self.radiomics_params(), "crop": self.radiomics.crop}
        if self.radiomics.interpolation != "pyradiomics":  # keeps existing feature-set names
            settings["interpolation"] = self.radiomics.interpolation
        if self.harmonise:
            settings["harmonise"] = [step.model_dump(mode="json") for step in self.harmonise]
        if self.segmentation.model is not None:
            settings["segmentation"] = self.segmentation_settings()
        if self.privacy.patient_ids != "keep":  # never mix real IDs and pseudonyms in one table
            settings["patient_ids"] = self.privacy.patient_ids
        geometry = self.qc.geometry
        repairs = {
            "irregular_spacing": geometry.irregular_spacing,
            "gantry_tilt": geometry.gantry_tilt,
            "duplicate_positions": geometry.duplicate_positions,
        }
        if repairs != {
            "irregular_spacing": "refuse",
            "gantry_tilt": "refuse",
            "duplicate_positions": "refuse",
        }:
            settings["geometry_repairs"] = repairs  # repaired images have other voxel values
        return settings

    def segmentation_settings(self) -> dict[str, Any]:
        """What of the segmentation changes a mask: the model file (by hash), threshold, ROI name."""
        from cohort.segment.model import load_model  # local: keeps import light

        if self.segmentation.model is None:
            return {}
        model = load_model(self.segmentation.model, check_io=False)  # names and hashes; build_spec checks I/O
        return {
            "model": model.name,
            "model_sha256": model.sha256,
            "manifest_sha256": model.manifest_sha256,
            "threshold": self.segmentation.threshold,
            "roi": self.segmentation.roi,
        }


def load_preset(name: str) -> dict[str, Any]:
    """Load a shipped radiomics preset by name (``cohort/radiomics/presets/<name>.yaml``)."""
    folder = resources.files("cohort.radiomics") / "presets"
    available = sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))
    if name not in available:
        raise SpecError(f"unknown radiomics preset {name!r}; available: {', '.join(available)}")
    data = yaml.safe_load((folder / f"{name}.yaml").read_text())
    assert isinstance(data, dict)
    return data


def settings_hash(params: Mapping[str, Any]) -> str:
    """A stable hash of result-changing parameters (canonical JSON, sha256)."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise SpecError(f"file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"not valid YAML: {exc}", subject=str(path)) from exc
    if not isinstance(data, dict):
        raise SpecError("expected a mapping at the top level", subject=str(path))
    return data


def _set_nested(target: dict[str, Any], dotted: list[str], value: Any) -> None:
    for key in dotted[:-1]:
        node = target.get(key)
        if not isinstance(node, dict):
            node = {}
            target[key] = node
        target = node
    target[dotted[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Spec overrides from ``COHORT_*`` variables (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == "COHORT_DATA":
            continue
        path = [part.lower() for part in key[len(ENV_PREFIX) :].split("__")]
        if path[0] not in CohortSpec.model_fields:
            continue
        _set_nested(out, path, yaml.safe_load(raw) if raw else raw)
    return out


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    for key in ("archive", "store"):
        if isinstance(data.get(key), str) and "://" in data[key]:
            continue
        if isinstance(data.get(key), str | Path) and not Path(data[key]).is_absolute():
            data[key] = str((base / data[key]).resolve())
    segmentation = data.get("segmentation")
    if isinstance(segmentation, dict) and isinstance(segmentation.get("model"), str):
        model = segmentation["model"]  # a folder (has a slash) relative to the spec; a bare name: registry
        if "/" in model and not Path(model).is_absolute():
            segmentation["model"] = str((base / model).resolve())
    radiomics = data.get("radiomics")
    if isinstance(radiomics, dict) and isinstance(radiomics.get("params_file"), str):
        if not Path(radiomics["params_file"]).is_absolute():
            radiomics["params_file"] = str((base / radiomics["params_file"]).resolve())
    return data


def build_spec(
    data: Mapping[str, Any],
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    source: str = "<spec>",
) -> CohortSpec:
    """Validate a spec from a mapping, layering environment and explicit overrides."""
    layered = _merge(dict(data), env_overrides(os.environ if environ is None else environ))
    layered = _merge(layered, overrides or {})
    try:
        spec = CohortSpec.model_validate(layered)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in exc.errors()
        )
        raise SpecError(f"invalid cohort spec: {problems}", subject=source) from exc
    from cohort.radiomics.extract import validate_params  # local: keeps import light

    validate_params(spec.radiomics_params(), source=source)
    if spec.segmentation.model is not None:  # a missing or broken model fails here, not on a worker
        from cohort.errors import ModelError
        from cohort.segment.model import load_model

        try:
            load_model(spec.segmentation.model)  # schema, file hash and the ONNX graph's inputs/outputs
        except ModelError as exc:
            raise SpecError(f"segmentation.model: {exc.reason}", subject=source) from exc
    return spec


def load_spec(
    path: str | Path,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> CohortSpec:
    """Read, layer and validate a cohort spec YAML file."""
    path = Path(path)
    data = _resolve_paths(_read_yaml(path), path.parent.resolve())
    return build_spec(data, overrides=overrides, environ=environ, source=str(path))
