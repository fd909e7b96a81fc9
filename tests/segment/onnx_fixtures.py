"""Tiny ONNX models and manifests made per test (no model files from outside the test)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

#: The tiny "segmenter": p = sigmoid(GAIN * (x - 0.5)) per pixel, i.e. bright in the window = tumour.
GAIN = 40.0


def bright_pixel_model(
    path: Path,
    *,
    size: int = 16,
    batch: int | str = "batch",
    input_name: str = "ct",
    output_name: str = "prob",
    output_size: int | None = None,
) -> Path:
    """An ONNX graph Conv(1x1, weight GAIN, bias -GAIN/2) -> Sigmoid on (batch, 1, size, size)."""
    out_size = output_size or size
    weight = numpy_helper.from_array(np.full((1, 1, 1, 1), GAIN, dtype=np.float32), "w")
    bias = numpy_helper.from_array(np.array([-GAIN / 2], dtype=np.float32), "b")
    nodes = [
        helper.make_node("Conv", [input_name, "w", "b"], ["logit"], kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["logit"], [output_name]),
    ]
    graph = helper.make_graph(
        nodes,
        "bright",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 1, size, size])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, 1, out_size, out_size])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_dict(
    onnx_path: Path, *, size: int = 16, spacing: float = 2.0, **overrides: Any
) -> dict[str, Any]:
    """A valid manifest for :func:`bright_pixel_model`: window 0 +- 100 HU, ``spacing`` mm, ``size`` px."""
    manifest: dict[str, Any] = {
        "name": "tiny-bright",
        "version": "0.0.1",
        "description": "Marks pixels brighter than 0 HU; for tests only.",
        "file": onnx_path.name,
        "sha256": sha256(onnx_path),
        "input": {
            "name": "ct",
            "shape": ["batch", 1, size, size],
            "dtype": "float32",
            "channels": [{"name": "soft", "window": {"level": 0, "width": 200}}],
        },
        "output": {
            "name": "prob",
            "shape": ["batch", 1, size, size],
            "activation": "sigmoid",
            "threshold": 0.5,
        },
        "geometry": {"spacing_mm": [spacing, spacing], "size": [size, size], "fill_hu": -1000},
        "preprocessing": [],
        "labels": {1: "GTV"},
        "licence": "CC0-1.0",
        "training_data": "None: a fixed threshold written as a 1x1 convolution, for tests.",
        "intended_use": "tests",
    }
    for key, value in overrides.items():
        manifest[key] = value
    return manifest


def write_model(folder: Path, *, size: int = 16, spacing: float = 2.0, **overrides: Any) -> Path:
    """``folder/model.onnx`` + ``folder/manifest.yaml``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = bright_pixel_model(folder / "model.onnx", size=size)
    manifest = manifest_dict(onnx_path, size=size, spacing=spacing, **overrides)
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return folder
