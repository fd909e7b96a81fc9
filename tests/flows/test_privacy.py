"""privacy.patient_ids: pseudonymise — no archive patient ID enters the feature store."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cohort.curate.deid import DeidSettings, pseudonym_for
from cohort.errors import SpecError
from cohort.spec import build_spec
from flows.process_cohort import run_cohort

pytestmark = pytest.mark.slow
SECRET = "a-private-key-for-the-test-store!"


def test_pseudonymised_runs_store_keyed_pseudonyms_only(
    prefect_server: str, demo_archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = {
        "archive": str(demo_archive.root),
        "store": str(tmp_path / "store"),
        "executor": {"kind": "threads"},
        "privacy": {"patient_ids": "pseudonymise"},
    }
    spec = build_spec(data, environ={})
    assert spec.feature_settings()["patient_ids"] == "pseudonymise"  # its own table, never mixed
    monkeypatch.delenv("COHORT_DEID_SECRET", raising=False)
    with pytest.raises(SpecError, match="COHORT_DEID_SECRET"):
        run_cohort(spec)
    monkeypatch.setenv("COHORT_DEID_SECRET", SECRET)
    summary = run_cohort(spec)
    features = pd.read_parquet(summary.feature_table)
    key = DeidSettings(secret=SECRET.encode())
    expected = sorted(pseudonym_for(p.patient_id, key) for p in demo_archive.patients)
    assert sorted(features["patient_id"]) == expected
    real = {p.patient_id for p in demo_archive.patients}
    assert not real & set(features.astype(str).to_numpy().ravel())
