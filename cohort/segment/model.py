"""Model registry: ``models/<name>/manifest.yaml`` + an ONNX file, validated before use.

A model is an ONNX file described by a manifest. The manifest says everything
that turns a CT into the network's input and its output back into a mask, so
that nothing model-specific is written in code:

* ``input``: tensor name, shape ``[batch, C, H, W]`` with a symbolic batch, dtype,
  and one ``channel`` per input plane, each a window (level/width, clipping,
  optional quantisation to ``levels`` grey levels, the seed's 8-bit packing);
* ``geometry``: in-plane spacing (mm), size ``[H, W]`` (crop or pad about the image
  centre with ``fill_hu``, air), interpolator; slices are kept as they are (the
  model is slice-wise 2D);
* ``preprocessing``: the chain of named steps run on the HU volume before that
  (e.g. ``isolate_lungs`` with its parameters);
* ``output``: tensor name, shape, activation (sigmoid: one channel per label;
  softmax: background + one per label), whether the graph ends in logits, and
  the probability threshold;
* ``labels`` (index -> name), licence, an honest training-data statement,
  intended use, and the sha256 of the ONNX file.

:func:`load_model` checks all of it (schema, file, hash, the ONNX graph's input
and output names, shapes and dtypes) and raises :class:`ModelError` naming the
manifest and what to change.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cohort.errors import ModelError

#: File name of a manifest inside a model folder.
MANIFEST_NAME = "manifest.yaml"
#: Environment variable that overrides the default registry folder.
REGISTRY_ENV = "COHORT_MODEL_REGISTRY"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_registry() -> Path:
    """``$COHORT_MODEL_REGISTRY`` if set, else the ``models/`` folder of the source tree."""
    env = os.environ.get(REGISTRY_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "models"


class Activation(StrEnum):
    """How the network's output channels become probabilities."""

    SIGMOID = "sigmoid"  # one independent channel per label
    SOFTMAX = "softmax"  # channel 0 background, then one channel per label


class TensorDType(StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"

    @property
    def onnx_type(self) -> str:
        """The type string ONNX Runtime reports (``tensor(float)``)."""
        return {"float32": "tensor(float)", "float16": "tensor(float16)"}[self.value]

    @property
    def numpy(self) -> np.dtype[Any]:
        return np.dtype(self.value)


class Interpolator(StrEnum):
    LINEAR = "linear"
    BSPLINE = "bspline"
    NEAREST = "nearest"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WindowSpec(_Model):
    """Intensity window: ``[level - width/2, level + width/2]`` HU maps to ``[0, 1]``."""

    level: float
    width: float = Field(gt=0)
    clip: bool = Field(True, description="Clip to the window (values outside become 0 or 1).")
    levels: int | None = Field(
        None, ge=2, le=65536, description="Quantise to this many grey levels (256: the seed's 8-bit bins)."
    )

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """Window ``hu`` (any float array) into float32, vectorised."""
        low = self.level - self.width / 2.0
        out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) * np.float32(1.0 / self.width)
        if self.clip:
            np.clip(out, 0.0, 1.0, out=out)
        if self.levels is not None:
            step = np.float32(self.levels - 1)
            out = np.floor(out * step + np.float32(0.5)) / step
        return out


class ChannelSpec(_Model):
    name: str = Field(min_length=1)
    window: WindowSpec


def _check_shape(shape: tuple[int | str, ...], what: str) -> tuple[int | str, ...]:
    if len(shape) != 4:
        raise ValueError(f"{what} shape must be [batch, channels, height, width], got {list(shape)}")
    if not isinstance(shape[0], str) or not shape[0]:
        raise ValueError(
            f"{what} batch dimension must be symbolic (a name such as 'batch'), got {shape[0]!r}"
        )
    if not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise ValueError(f"{what} channel, height and width must be positive integers, got {list(shape[1:])}")
    return shape


class InputSpec(_Model):
    name: str = Field(min_length=1)
    shape: tuple[int | str, ...]
    dtype: TensorDType = TensorDType.FLOAT32
    channels: tuple[ChannelSpec, ...] = Field(min_length=1)

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: tuple[int | str, ...]) -> tuple[int | str, ...]:
        return _check_shape(v, "input")

    @model_validator(mode="after")
    def _channels(self) -> InputSpec:
        if self.shape[1] != len(self.channels):
            raise ValueError(
                f"input shape has {self.shape[1]} channels but {len(self.channels)} are described"
            )
        return self


class OutputSpec(_Model):
    name: str = Field(min_length=1)
    shape: tuple[int | str, ...]
    dtype: TensorDType = TensorDType.FLOAT32
    activation: Activation
    from_logits: bool = Field(False, description="True: the graph ends before the activation.")
    threshold: float = Field(0.5, gt=0.0, lt=1.0)

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: tuple[int | str, ...]) -> tuple[int | str, ...]:
        return _check_shape(v, "output")


class GeometrySpec(_Model):
    spacing_mm: tuple[float, float] = Field(description="In-plane spacing (x = columns, y = rows), mm.")
    size: tuple[int, int] = Field(description="Input size [rows, columns] (crop or pad about the centre).")
    fill_hu: float = Field(-1000.0, description="Value of padded voxels (air).")
    interpolator: Interpolator = Interpolator.LINEAR
    preprocess_on: Literal["native", "model_grid"] = Field(
        "native",
        description="Where the preprocessing chain runs: on the image's own grid, then resampled to the "
        "model grid ('native'), or on the model grid after resampling ('model_grid', the seed's order: "
        "resample, then isolate the lungs; cheaper when the model's pixels are larger than the image's).",
    )

    @field_validator("spacing_mm")
    @classmethod
    def _spacing(cls, v: tuple[float, float]) -> tuple[float, float]:
        if min(v) <= 0:
            raise ValueError(f"spacing_mm must be > 0, got {list(v)}")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 1:
            raise ValueError(f"size must be >= 1, got {list(v)}")
        return v


class StepSpec(_Model):
    step: str = Field(min_length=1, description="Name of a registered preprocessing step.")
    params: dict[str, Any] = Field(default_factory=dict)


class Manifest(_Model):
    """The validated content of ``manifest.yaml``."""

    name: str
    version: str = Field(min_length=1)
    description: str = Field(min_length=1)
    file: str = Field(description="ONNX file name inside the model folder.")
    sha256: str
    input: InputSpec
    output: OutputSpec
    geometry: GeometrySpec
    preprocessing: tuple[StepSpec, ...] = ()
    labels: dict[int, str] = Field(min_length=1)
    primary_label: int = Field(1, description="The label whose largest component is the primary tumour.")
    licence: str = Field(min_length=1)
    training_data: str = Field(min_length=20, description="What the model was trained on, honestly.")
    intended_use: str = Field(min_length=1)
    references: tuple[str, ...] = ()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"name {v!r} must be letters, digits, '.', '_' or '-'")
        return v

    @field_validator("file")
    @classmethod
    def _file(cls, v: str) -> str:
        if "/" in v or "\\" in v or v in ("", ".", "..") or not v.endswith(".onnx"):
            raise ValueError(f"file must be a plain '.onnx' file name inside the model folder, got {v!r}")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not _SHA256.match(v):
            raise ValueError("sha256 must be 64 lower-case hex digits (`sha256sum model.onnx`)")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[int, str]) -> dict[int, str]:
        if min(v) < 1:
            raise ValueError("label indices start at 1 (0 is background)")
        if sorted(v) != list(range(1, len(v) + 1)):
            raise ValueError(f"label indices must be 1..{len(v)}, got {sorted(v)}")
        if len(set(v.values())) != len(v) or not all(v.values()):
            raise ValueError("label names must be unique and non-empty")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.primary_label not in self.labels:
            raise ValueError(
                f"primary_label {self.primary_label} is not one of the labels {sorted(self.labels)}"
            )
        if tuple(self.input.shape[2:]) != tuple(self.geometry.size):
            raise ValueError(
                f"input shape {list(self.input.shape[2:])} differs from "
                f"geometry.size {list(self.geometry.size)}"
            )
        if tuple(self.output.shape[2:]) != tuple(self.geometry.size):
            raise ValueError(
                f"output shape {list(self.output.shape[2:])} differs from "
                f"geometry.size {list(self.geometry.size)}"
            )
        expected = len(self.labels) + (1 if self.output.activation == Activation.SOFTMAX else 0)
        if self.output.shape[1] != expected:
            raise ValueError(
                f"output has {self.output.shape[1]} channels; {self.output.activation} with "
                f"{len(self.labels)} label(s) needs {expected}"
            )
        return self

    def label_channel(self, label: int) -> int:
        """Index of ``label``'s channel in the output tensor."""
        return label if self.output.activation == Activation.SOFTMAX else label - 1


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A loaded, checked model: its manifest and where its ONNX file is."""

    manifest: Manifest
    directory: Path
    onnx_path: Path

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def sha256(self) -> str:
        return self.manifest.sha256

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the model in caches: the ONNX file's path and its hash."""
        return (str(self.onnx_path), self.manifest.sha256)

    @property
    def manifest_sha256(self) -> str:
        """Hash of the manifest's content (canonical JSON): a changed window, grid or chain changes it."""
        canonical = json.dumps(self.manifest.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def provenance(self) -> dict[str, str]:
        """Fields for the provenance of every output row."""
        return {
            "model_name": self.name,
            "model_version": self.version,
            "model_sha256": self.sha256,
            "model_manifest_sha256": self.manifest_sha256,
        }


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, hex; cached per (path, size, mtime) so a worker hashes a model once."""
    p = Path(path)
    st = p.stat()
    return _sha256_cached(str(p.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_path(name_or_path: str | Path, registry: Path) -> Path:
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    if candidate.is_dir():
        return candidate / MANIFEST_NAME
    if isinstance(name_or_path, str) and _NAME.match(name_or_path):
        return registry / name_or_path / MANIFEST_NAME
    return candidate


def read_manifest(path: str | Path) -> Manifest:
    """Parse and validate one ``manifest.yaml``; raise :class:`ModelError` saying what is wrong."""
    path = Path(path)
    subject = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"cannot read the manifest ({exc.strerror})", subject=subject) from exc
    except yaml.YAMLError as exc:
        raise ModelError(f"the manifest is not valid YAML ({exc})", subject=subject) from exc
    if not isinstance(raw, Mapping):
        raise ModelError("the manifest must be a YAML mapping", subject=subject)
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
        )
        raise ModelError(f"invalid manifest: {problems}", subject=subject) from exc


def _dims_agree(manifest_shape: tuple[int | str, ...], onnx_shape: list[Any]) -> str | None:
    """None if they agree; else what differs."""
    if len(onnx_shape) != len(manifest_shape):
        return f"rank {len(onnx_shape)} in the ONNX graph, {len(manifest_shape)} in the manifest"
    batch = onnx_shape[0]
    if isinstance(batch, int) and batch > 0:
        return (
            f"the ONNX graph has a fixed batch of {batch}: re-export it with a dynamic batch axis "
            "(torch.onnx.export(..., dynamic_axes={'<input>': {0: 'batch'}, '<output>': {0: 'batch'}}))"
        )
    for axis, (want, got) in enumerate(zip(manifest_shape[1:], onnx_shape[1:], strict=True), start=1):
        if isinstance(got, int) and got > 0 and got != want:
            return f"axis {axis} is {got} in the ONNX graph and {want} in the manifest"
    return None


def check_onnx_io(manifest: Manifest, onnx_path: Path) -> None:
    """Compare the ONNX graph's input and output with the manifest (an ONNX Runtime CPU session,
    graph optimisations off, so it is cheap); raise :class:`ModelError` on any difference."""
    import onnxruntime as ort

    subject = str(onnx_path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable graphs
        raise ModelError(f"ONNX Runtime cannot load the model ({exc})", subject=subject) from exc
    for role, spec, nodes in (
        ("input", manifest.input, session.get_inputs()),
        ("output", manifest.output, session.get_outputs()),
    ):
        if len(nodes) != 1:
            names = [n.name for n in nodes]
            raise ModelError(
                f"the graph has {len(nodes)} {role}s {names}; exactly one is supported", subject=subject
            )
        node = nodes[0]
        if node.name != spec.name:
            raise ModelError(
                f"the graph's {role} is named {node.name!r}, the manifest says {spec.name!r}", subject=subject
            )
        if node.type != spec.dtype.onnx_type:
            raise ModelError(
                f"the graph's {role} is {node.type}, the manifest says {spec.dtype}", subject=subject
            )
        problem = _dims_agree(spec.shape, list(node.shape))
        if problem:
            raise ModelError(f"{role} {spec.name!r}: {problem}", subject=subject)


def load_model(
    name_or_path: str | Path, registry: str | Path | None = None, *, check_io: bool = True
) -> ModelSpec:
    """Load and check a model by name (``<registry>/<name>/manifest.yaml``), folder or manifest path.

    Checks, in order: the manifest exists and matches the schema; every
    preprocessing step is known and its parameters valid; the ONNX file exists;
    its sha256 equals the manifest's; its input/output names, dtypes and shapes
    agree with the manifest. Raises :class:`ModelError` with the reason.
    """
    registry_path = Path(registry) if registry is not None else default_registry()
    path = _manifest_path(name_or_path, registry_path)
    if not path.is_file():
        known = (
            sorted(p.parent.name for p in registry_path.glob(f"*/{MANIFEST_NAME}"))
            if registry_path.is_dir()
            else []
        )
        raise ModelError(
            f"no manifest at {path}; models in {registry_path}: {known or 'none'}", subject=str(name_or_path)
        )
    manifest = read_manifest(path)
    from cohort.segment.pipeline import check_preprocessing  # the step registry lives with the pipeline

    check_preprocessing(manifest, subject=str(path))
    onnx_path = path.parent / manifest.file
    if not onnx_path.is_file():
        raise ModelError(
            f"the ONNX file {manifest.file!r} named by the manifest is missing", subject=str(onnx_path)
        )
    actual = file_sha256(onnx_path)
    if actual != manifest.sha256:
        raise ModelError(
            f"sha256 mismatch: the file is {actual}, the manifest says {manifest.sha256}; "
            "the file was changed or the manifest is stale (recompute it with `sha256sum` only if the "
            "new file is the intended one)",
            subject=str(onnx_path),
        )
    if check_io:
        check_onnx_io(manifest, onnx_path)
    return ModelSpec(manifest=manifest, directory=path.parent, onnx_path=onnx_path)


def list_models(registry: str | Path | None = None) -> list[str]:
    """Names of the model folders (with a manifest) in the registry."""
    registry_path = Path(registry) if registry is not None else default_registry()
    return sorted(p.parent.name for p in registry_path.glob(f"*/{MANIFEST_NAME}"))


__all__ = [
    "MANIFEST_NAME",
    "REGISTRY_ENV",
    "Activation",
    "ChannelSpec",
    "GeometrySpec",
    "InputSpec",
    "Interpolator",
    "Manifest",
    "ModelSpec",
    "OutputSpec",
    "StepSpec",
    "TensorDType",
    "WindowSpec",
    "check_onnx_io",
    "default_registry",
    "file_sha256",
    "list_models",
    "load_model",
    "read_manifest",
]
