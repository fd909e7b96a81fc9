"""Model registry: manifest schema, file, hash and ONNX input/output checks, each failure explained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from cohort.errors import ModelError, Stage
from cohort.segment.model import (
    Activation,
    ModelSpec,
    WindowSpec,
    file_sha256,
    list_models,
    load_model,
    read_manifest,
)
from tests.segment.onnx_fixtures import bright_pixel_model, manifest_dict, sha256, write_model


def _rewrite(folder: Path, **changes: Any) -> Path:
    path = folder / "manifest.yaml"
    manifest = yaml.safe_load(path.read_text())
    manifest.update(changes)
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return folder


def test_load_model_by_name_folder_and_manifest_path(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "registry" / "tiny-bright")
    by_name = load_model("tiny-bright", registry=tmp_path / "registry")
    by_folder = load_model(folder)
    by_path = load_model(folder / "manifest.yaml")
    for spec in (by_name, by_folder, by_path):
        assert isinstance(spec, ModelSpec)
        assert spec.onnx_path == folder / "model.onnx"
        assert spec.sha256 == sha256(folder / "model.onnx")
        assert spec.manifest.output.activation == Activation.SIGMOID
        assert spec.manifest.label_channel(1) == 0
    assert by_name.provenance() == {
        "model_name": "tiny-bright",
        "model_version": "0.0.1",
        "model_sha256": sha256(folder / "model.onnx"),
        "model_manifest_sha256": by_folder.manifest_sha256,
    }
    assert by_path.manifest_sha256 == by_folder.manifest_sha256
    assert list_models(tmp_path / "registry") == ["tiny-bright"]
    # Same ONNX file, another preprocessing grid: the manifest hash (and so the feature set) changes.
    manifest = yaml.safe_load((folder / "manifest.yaml").read_text())
    before = by_folder.manifest_sha256
    _rewrite(folder, geometry={**manifest["geometry"], "preprocess_on": "model_grid"})
    moved = load_model(folder)
    assert moved.sha256 == by_folder.sha256 and moved.manifest_sha256 != before


def test_unknown_name_lists_the_registry(tmp_path: Path) -> None:
    write_model(tmp_path / "reg" / "tiny-bright")
    with pytest.raises(ModelError, match=r"no manifest .*models in .*\['tiny-bright'\]") as info:
        load_model("nope", registry=tmp_path / "reg")
    assert info.value.subject == "nope"
    assert info.value.stage == Stage.SEGMENT


def test_hash_mismatch_is_refused(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")
    bright_pixel_model(folder / "model.onnx", size=16, output_name="prob")  # same graph ...
    with (folder / "model.onnx").open("ab") as fh:
        fh.write(b"\0")  # ... one byte more
    with pytest.raises(ModelError, match="sha256 mismatch") as info:
        load_model(folder)
    assert info.value.subject.endswith("model.onnx")


def test_missing_onnx_file(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")
    (folder / "model.onnx").unlink()
    with pytest.raises(ModelError, match=r"'model\.onnx' named by the manifest is missing"):
        load_model(folder)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"licence": ""}, r"licence: String should have at least 1 character"),
        ({"training_data": "synthetic"}, r"training_data: String should have at least 20"),
        ({"sha256": "abc"}, r"sha256: Value error, sha256 must be 64 lower-case hex"),
        ({"file": "../model.onnx"}, r"file: Value error, file must be a plain '.onnx' file name"),
        ({"labels": {0: "GTV"}}, r"label indices start at 1"),
        ({"labels": {1: "GTV", 3: "Node"}}, r"label indices must be 1..2"),
        ({"primary_label": 2}, r"primary_label 2 is not one of the labels"),
        ({"unknown_field": 1}, r"unknown_field: Extra inputs are not permitted"),
    ],
)
def test_schema_errors_name_the_field(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    folder = _rewrite(write_model(tmp_path / "m"), **changes)
    with pytest.raises(ModelError, match=message) as info:
        load_model(folder)
    assert info.value.reason.startswith("invalid manifest")
    assert info.value.subject.endswith("manifest.yaml")


def test_shape_rules(tmp_path: Path) -> None:
    base = manifest_dict(bright_pixel_model(tmp_path / "model.onnx"))
    cases = [
        ({**base["input"], "shape": [1, 1, 16, 16]}, "input", "batch dimension must be symbolic"),
        ({**base["input"], "shape": ["batch", 2, 16, 16]}, "input", "2 channels but 1 are described"),
        (
            {**base["input"], "shape": ["batch", 1, 16]},
            "input",
            r"must be \[batch, channels, height, width\]",
        ),
        (
            {**base["input"], "shape": ["batch", 1, 32, 32]},
            "input",
            r"input shape \[32, 32\] differs from geometry",
        ),
        ({**base["output"], "activation": "softmax"}, "output", "softmax with 1 label.s. needs 2"),
    ]
    for value, key, message in cases:
        (tmp_path / "manifest.yaml").write_text(yaml.safe_dump({**base, key: value}))
        with pytest.raises(ModelError, match=message):
            read_manifest(tmp_path / "manifest.yaml")


def test_manifest_that_is_not_yaml_or_not_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "manifest.yaml").write_text("name: [unclosed")
    with pytest.raises(ModelError, match="not valid YAML"):
        read_manifest(tmp_path / "manifest.yaml")
    (tmp_path / "manifest.yaml").write_text("- a list")
    with pytest.raises(ModelError, match="must be a YAML mapping"):
        read_manifest(tmp_path / "manifest.yaml")


def test_onnx_names_must_match_the_manifest(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")
    bright_pixel_model(folder / "model.onnx", input_name="image")
    _rewrite(folder, sha256=sha256(folder / "model.onnx"))
    with pytest.raises(ModelError, match="the graph's input is named 'image', the manifest says 'ct'"):
        load_model(folder)


def test_onnx_fixed_batch_is_refused_with_the_fix(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")
    bright_pixel_model(folder / "model.onnx", batch=1)
    _rewrite(folder, sha256=sha256(folder / "model.onnx"))
    with pytest.raises(ModelError, match=r"fixed batch of 1: re-export it with a dynamic batch axis"):
        load_model(folder)


def test_onnx_spatial_shape_must_match(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")
    bright_pixel_model(folder / "model.onnx", size=32)
    _rewrite(folder, sha256=sha256(folder / "model.onnx"))
    with pytest.raises(ModelError, match="input 'ct': axis 2 is 32 in the ONNX graph and 16 in the manifest"):
        load_model(folder)


def test_unreadable_onnx(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")
    (folder / "model.onnx").write_bytes(b"not a model")
    _rewrite(folder, sha256=sha256(folder / "model.onnx"))
    with pytest.raises(ModelError, match="ONNX Runtime cannot load the model"):
        load_model(folder)
    assert load_model(folder, check_io=False).onnx_path.name == "model.onnx"


def test_preprocessing_steps_are_checked(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", preprocessing=[{"step": "denoise", "params": {}}])
    with pytest.raises(
        ModelError, match=r"preprocessing\[0\]: unknown step 'denoise'; known steps: .*isolate_lungs"
    ):
        load_model(folder)
    _rewrite(folder, preprocessing=[{"step": "isolate_lungs", "params": {"margin_radius": 5}}])
    with pytest.raises(
        ModelError, match=r"preprocessing\[0\] \(isolate_lungs\): invalid params: .*margin_radius"
    ):
        load_model(folder)
    _rewrite(folder, preprocessing=[{"step": "isolate_lungs", "params": {"spine_alpha": 2.0}}])
    with pytest.raises(ModelError, match="spine_alpha must be in"):
        load_model(folder)
    _rewrite(folder, preprocessing=[{"step": "isolate_lungs", "params": {"margin_radius_mm": 4.0}}])
    assert load_model(folder).manifest.preprocessing[0].params == {"margin_radius_mm": 4.0}


def test_file_sha256_is_cached_but_sees_changes(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    first = file_sha256(path)
    assert first == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    path.write_bytes(b"abcd")
    assert file_sha256(path) == "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"


def test_window_maps_level_and_width_to_unit_range() -> None:
    hu = np.array([-1000.0, -600 - 750, -600.0, -600 + 750, 500.0])
    lung = WindowSpec(level=-600, width=1500)
    np.testing.assert_allclose(lung.apply(hu), [350 / 1500, 0.0, 0.5, 1.0, 1.0], atol=1e-7)
    unclipped = WindowSpec(level=-600, width=1500, clip=False)
    np.testing.assert_allclose(unclipped.apply(np.array([-1350.0, 1650.0])), [0.0, 2.0], atol=1e-6)
    packed = WindowSpec(level=-600, width=1500, levels=256)
    values = packed.apply(np.linspace(-1400, 200, 1001))
    assert len(np.unique(values)) == 256
    np.testing.assert_allclose(np.unique(values * 255), np.arange(256), atol=1e-4)
    assert packed.apply(hu).dtype == np.float32
