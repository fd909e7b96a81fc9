from __future__ import annotations

from pathlib import Path

import pytest

from cohort.errors import SpecError
from cohort.spec import build_spec, load_preset, load_spec, settings_hash


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cohort.yaml"
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_the_spec_folder(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, "archive: data/archive\nstore: out\n"), environ={})
    assert spec.archive == str(tmp_path / "data" / "archive")
    assert spec.store == str(tmp_path / "out")
    assert spec.executor.kind == "dask" and spec.executor.n_workers == 2
    assert spec.radiomics_params() == load_preset("ct-original")


def test_layering_defaults_file_environment_then_explicit(tmp_path: Path) -> None:
    path = _write(tmp_path, "archive: a\nstore: s\nexecutor:\n  n_workers: 3\nshard_slices: 100\n")
    env = {"COHORT_EXECUTOR__N_WORKERS": "5", "COHORT_SHARD_SLICES": "200", "UNRELATED": "x"}
    spec = load_spec(path, environ=env, overrides={"shard_slices": 300})
    assert spec.executor.n_workers == 5
    assert spec.shard_slices == 300


def test_unknown_keys_and_bad_values_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"executor\.n_wrokers"):
        load_spec(_write(tmp_path, "archive: a\nstore: s\nexecutor:\n  n_wrokers: 3\n"), environ={})
    with pytest.raises(SpecError, match=r"selection\.require_roi"):
        load_spec(_write(tmp_path, "archive: a\nstore: s\nselection:\n  require_roi: '('\n"), environ={})
    with pytest.raises(SpecError, match="archive"):
        load_spec(_write(tmp_path, "store: s\n"), environ={})


def test_radiomics_parameters_are_validated_by_pyradiomics(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="rejected by pyradiomics"):
        build_spec(
            {"archive": "a", "store": "s", "radiomics": {"params": {"setting": {"binWidht": 25}}}}, environ={}
        )
    with pytest.raises(SpecError, match="unknown radiomics preset 'ct-fancy'"):
        build_spec({"archive": "a", "store": "s", "radiomics": {"preset": "ct-fancy"}}, environ={})
    params = tmp_path / "params.yaml"
    params.write_text("setting:\n  binWidth: 10\nimageType:\n  Original: {}\n")
    spec = load_spec(
        _write(tmp_path, "archive: a\nstore: s\nradiomics:\n  params_file: params.yaml\n"), environ={}
    )
    assert spec.radiomics_params()["setting"]["binWidth"] == 10


def test_settings_hash_is_stable_and_order_free() -> None:
    a = {"setting": {"binWidth": 25, "label": 1}, "imageType": {"Original": {}}}
    b = {"imageType": {"Original": {}}, "setting": {"label": 1, "binWidth": 25}}
    assert settings_hash(a) == settings_hash(b)
    assert settings_hash(a) != settings_hash({**a, "setting": {"binWidth": 10, "label": 1}})


def test_qc_section_defaults_check_only_geometry() -> None:
    spec = build_spec({"archive": "a", "store": "s"}, environ={})
    assert spec.selection.per_patient == "all"
    assert spec.qc.modality is None and spec.qc.kernels == [] and spec.qc.contrast == "any"
    assert not spec.qc.slice_thickness.limited and not spec.qc.slice_count.limited
    geometry = spec.qc.geometry
    assert (geometry.split, geometry.irregular_spacing, geometry.gantry_tilt) == (True, "refuse", "refuse")
    assert geometry.duplicate_positions == "refuse" and geometry.max_spacing_deviation == 0.05


def test_qc_section_from_yaml_with_environment_overriding_one_bound(tmp_path: Path) -> None:
    text = (
        "archive: a\nstore: s\n"
        "selection:\n  per_patient: thinnest\n  require_roi: GTV\n"
        "qc:\n  orientation: [axial]\n  slice_thickness: {min: 1, max: 3}\n  slice_count: {min: 50}\n"
        "  kernels: ['B\\d+f', 'STANDARD']\n  contrast: without\n"
        "  geometry:\n    irregular_spacing: resample\n"
    )
    spec = load_spec(_write(tmp_path, text), environ={"COHORT_QC__SLICE_THICKNESS__MAX": "2.5"})
    assert spec.selection.per_patient == "thinnest"
    assert (spec.qc.slice_thickness.min, spec.qc.slice_thickness.max) == (1.0, 2.5)
    assert spec.qc.slice_count.contains(50) and not spec.qc.slice_count.contains(49)
    assert str(spec.qc.slice_count) == "[50, inf]"
    assert spec.qc.kernels == [r"B\d+f", "STANDARD"] and spec.qc.contrast == "without"
    assert spec.qc.orientation == ["axial"] and spec.qc.geometry.irregular_spacing == "resample"


@pytest.mark.parametrize(
    "qc, field",
    [
        ({"slice_thickness": {"min": 3, "max": 1}}, r"qc\.slice_thickness: .*min 3 is above max 1"),
        ({"kernels": ["("]}, r"qc\.kernels: .*not a regular expression"),
        ({"contrast": "maybe"}, r"qc\.contrast"),
        ({"geometry": {"gantry_tilt": "ignore"}}, r"qc\.geometry\.gantry_tilt"),
        ({"slice_count": [1, 2]}, r"qc\.slice_count"),
    ],
)
def test_bad_qc_values_name_the_field(qc: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError, match=field):
        build_spec({"archive": "a", "store": "s", "qc": qc}, environ={})
    with pytest.raises(SpecError, match=r"selection\.per_patient"):
        build_spec({"archive": "a", "store": "s", "selection": {"per_patient": "best"}}, environ={})


def test_segmentation_model_is_checked_at_once_and_its_file_hash_names_the_feature_set(
    tmp_path: Path,
) -> None:
    with pytest.raises(SpecError, match=r"segmentation\.model: no manifest at .*models in .*demo-lung-gtv"):
        load_spec(
            _write(tmp_path, "archive: a\nstore: s\nsegmentation:\n  model: no-such-model\n"), environ={}
        )
    # A model folder relative to the spec file, copied with another file hash, is another feature set.
    import shutil

    from cohort.segment.model import default_registry

    shutil.copytree(default_registry() / "demo-lung-gtv", tmp_path / "mine")
    mine = load_spec(_write(tmp_path, "archive: a\nstore: s\nsegmentation:\n  model: ./mine\n"), environ={})
    assert mine.segmentation.model == str(tmp_path / "mine")
    demo = build_spec({"archive": "a", "store": "s", "segmentation": {"model": "demo-lung-gtv"}}, environ={})
    plain = build_spec({"archive": "a", "store": "s"}, environ={})
    assert settings_hash(mine.feature_settings()) == settings_hash(demo.feature_settings())  # same file
    assert settings_hash(demo.feature_settings()) != settings_hash(plain.feature_settings())
    other = build_spec(
        {"archive": "a", "store": "s", "segmentation": {"model": "demo-lung-gtv", "threshold": 0.3}},
        environ={},
    )
    assert settings_hash(other.feature_settings()) != settings_hash(demo.feature_settings())
