"""The cohort analysis on the real Lung1 features and clinical outcomes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cohort.analysis.pipeline import AnalysisError, AnalysisSpec, run_analysis
from cohort.analysis.report import render_report
from cohort.analysis.survival import harrell_c, logrank_at_cutoff


@pytest.fixture(scope="module")
def lung1(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    folder = data_dir / "nsclc-radiomics"
    raw = pd.read_csv(folder / "lung1-features-pyradiomics-2.2.0.csv.gz")
    features = raw[["PatientID", *[c for c in raw.columns if c.startswith("original_")]]].rename(
        columns={"PatientID": "patient_id"}
    )
    features = features.assign(
        roi="GTV",
        mask_voxels=features["original_shape_VoxelVolume"],
        site=np.where(np.arange(len(features)) % 2 == 0, "A", "B"),
    )
    return features, pd.read_csv(folder / "lung1-clinical.csv")


def _spec(**overrides: object) -> AnalysisSpec:
    base = {
        "store": "unused",
        "clinical": "unused",
        "time": "Survival.time",
        "event": "deadstatus.event",
        "batch": None,
    }
    return AnalysisSpec.model_validate({**base, **overrides})


def test_lung1_analysis_matches_the_survival_functions_called_directly(lung1) -> None:  # type: ignore[no-untyped-def]
    features, clinical = lung1
    result = run_analysis(features, clinical, _spec())
    assert len(result.table) == 144  # 145 rows, LUNG1-002 twice: one row per patient
    table = result.table
    months = table["Survival.time"] / (365.25 / 12)
    direct = logrank_at_cutoff(months, table["deadstatus.event"], table["original_shape_VoxelVolume"])
    assert result.logrank.p_value == pytest.approx(direct.p_value, rel=1e-12)
    assert result.logrank.p_value == pytest.approx(0.0048, abs=5e-4)
    assert result.c_index == pytest.approx(
        harrell_c(months, table["deadstatus.event"], table["original_shape_VoxelVolume"]), rel=1e-12
    )
    assert result.c_index == pytest.approx(0.6228, abs=1e-4)
    assert len(result.cox) == len(result.features) and result.cox["p_value"].is_monotonic_increasing
    assert sorted(result.km["group"].unique()) == ["high", "low"]
    html = render_report(result)
    assert html.count("<svg") == 3 and "log-rank p = 0.00" in html


def test_combat_over_a_site_column_equalises_site_means(lung1) -> None:  # type: ignore[no-untyped-def]
    features, clinical = lung1
    shifted = features.copy()
    shifted.loc[shifted["site"] == "B", "original_firstorder_Mean"] += 50.0
    # Without empirical Bayes shrinkage, location/scale ComBat puts every site on the pooled mean.
    result = run_analysis(shifted, clinical, _spec(batch="site", combat={"method": "none"}))
    assert result.combat is not None
    after = result.batch_means_after.loc["original_firstorder_Mean"]  # type: ignore[union-attr]
    before = result.batch_means_before.loc["original_firstorder_Mean"]  # type: ignore[union-attr]
    assert abs(before["B"] - before["A"]) > 20
    assert after["B"] == pytest.approx(after["A"], abs=1e-6)
    # The KM split uses the volume as extracted, not harmonised.
    assert result.logrank.cutoff == pytest.approx(
        features["original_shape_VoxelVolume"].iloc[1:].median(), rel=0.05
    )


def test_missing_columns_are_explicit_errors(lung1) -> None:  # type: ignore[no-untyped-def]
    features, clinical = lung1
    with pytest.raises(AnalysisError, match="no column 'days'"):
        run_analysis(features, clinical, _spec(time="days"))
    with pytest.raises(AnalysisError, match="no rows for ROI 'Lung'"):
        run_analysis(features, clinical, _spec(roi="Lung"))
    with pytest.raises(AnalysisError, match="batch column 'scanner'"):
        run_analysis(features, clinical, _spec(batch="scanner"))
