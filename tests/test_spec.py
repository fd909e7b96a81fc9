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
    assert spec.archive == tmp_path / "data" / "archive"
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
