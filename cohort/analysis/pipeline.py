"""The cohort analysis: feature table + clinical table -> ComBat, survival, exploration.

Pure computation on DataFrames; the ``analyse-cohort`` flow reads the store,
calls :func:`run_analysis`, and writes the harmonised table, the fitted ComBat
model and the HTML report back to the store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cohort.analysis.combat import CombatModel, fit_combat
from cohort.analysis.explore import summary_statistics, volume_surrogates
from cohort.analysis.survival import (
    LogRankResult,
    SurvivalError,
    censor_at,
    convert_time,
    harrell_c,
    kaplan_meier,
    logrank_at_cutoff,
    univariate_cox,
)
from cohort.errors import CohortError, Stage
from cohort.spec import store_root

TimeUnit = Literal["days", "weeks", "months", "years"]


class AnalysisError(CohortError):
    stage = Stage.ANALYSIS


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CombatSpec(_Model):
    method: Literal["parametric", "nonparametric", "none"] = "parametric"
    mean_only: bool = False
    reference_batch: str | None = None
    categorical: list[str] = Field(default_factory=list, description="Covariates to preserve (categorical).")
    continuous: list[str] = Field(default_factory=list, description="Covariates to preserve (continuous).")


class AnalysisSpec(_Model):
    """What to analyse: one ROI of one feature table, joined with a clinical table."""

    name: str = Field("analysis", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    store: str = Field(description="Store root: a local folder or an object-store URL (s3://bucket/prefix).")
    _store_root = field_validator("store", mode="before")(store_root)
    table: str | None = Field(None, description="Feature table; default: the only one in the store.")
    roi: str = "GTV"
    clinical: Path
    clinical_key: str = "PatientID"
    time: str = Field(description="Clinical column with the follow-up time.")
    event: str = Field(description="Clinical column with the event indicator (1 = event).")
    time_unit: TimeUnit = "days"
    report_unit: TimeUnit = "months"
    horizon: float | None = Field(None, gt=0, description="Administrative censoring, in report units.")
    features: str = Field("^original_", description="Regex selecting the feature columns analysed.")
    batch: str | None = Field("manufacturer", description="Batch column for ComBat; null: no ComBat.")
    combat: CombatSpec = CombatSpec()
    km_feature: str = "original_shape_VoxelVolume"
    top_k: int = Field(10, ge=1)


@dataclass
class AnalysisResult:
    spec: AnalysisSpec
    table: pd.DataFrame  # keys + clinical + harmonised features, one row per patient's ROI
    features: list[str]
    dropped_constant: list[str]
    combat: CombatModel | None
    batch_means_before: pd.DataFrame | None
    batch_means_after: pd.DataFrame | None
    km: pd.DataFrame
    logrank: LogRankResult
    c_index: float
    cox: pd.DataFrame
    summary: pd.DataFrame
    surrogates: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def select_rows(features: pd.DataFrame, clinical: pd.DataFrame, spec: AnalysisSpec) -> pd.DataFrame:
    """One row per patient for the ROI, joined with the clinical table."""
    rows = features[features["roi"] == spec.roi]
    if rows.empty:
        raise AnalysisError(f"no rows for ROI {spec.roi!r}", subject=spec.table or "features")
    if rows["patient_id"].duplicated().any():
        # Several series or structure sets per patient: keep the largest ROI, as is usual.
        order = "mask_voxels" if "mask_voxels" in rows.columns else rows.columns[0]
        rows = rows.sort_values(order, ascending=False).drop_duplicates("patient_id")
    for column in (spec.clinical_key, spec.time, spec.event):
        if column not in clinical.columns:
            raise AnalysisError(f"clinical table has no column {column!r}", subject=str(spec.clinical))
    joined = rows.merge(clinical, left_on="patient_id", right_on=spec.clinical_key, how="inner")
    if joined.empty:
        raise AnalysisError(
            "no patient of the feature table is in the clinical table", subject=str(spec.clinical)
        )
    return joined.sort_values("patient_id").reset_index(drop=True)


def run_analysis(features: pd.DataFrame, clinical: pd.DataFrame, spec: AnalysisSpec) -> AnalysisResult:
    """ComBat (optional), survival and exploration for one ROI."""
    table = select_rows(features, clinical, spec)
    notes: list[str] = [f"{len(table)} patients with ROI {spec.roi} and clinical data"]
    pattern = re.compile(spec.features)
    columns = [c for c in table.columns if pattern.search(str(c)) and pd.api.types.is_float_dtype(table[c])]
    if not columns:
        raise AnalysisError(f"no feature column matches {spec.features!r}")
    constant = [c for c in columns if table[c].nunique(dropna=True) <= 1]
    columns = [c for c in columns if c not in constant]
    if constant:
        notes.append(f"{len(constant)} constant feature(s) left out: {', '.join(constant[:10])}")
    matrix = table[columns].astype(np.float64)
    if spec.km_feature not in table.columns:
        raise AnalysisError(f"KM feature {spec.km_feature!r} is not in the table")
    # The KM split uses the value as extracted: volume is geometry, not a scanner effect.
    km_values = table[spec.km_feature].to_numpy(dtype=float)

    model = None
    before = after = None
    if spec.batch is not None:
        if spec.batch not in table.columns:
            raise AnalysisError(f"batch column {spec.batch!r} is not in the joined table")
        batch = table[spec.batch].astype(str)
        covariate_names = [*spec.combat.categorical, *spec.combat.continuous]
        covariates = table[covariate_names] if covariate_names else None
        model = fit_combat(
            matrix,
            batch,
            covariates=covariates,
            categorical=spec.combat.categorical,
            continuous=spec.combat.continuous,
            method=spec.combat.method,
            mean_only=spec.combat.mean_only,
            reference_batch=spec.combat.reference_batch,
        )
        harmonised = model.apply(matrix, batch, covariates)
        before = matrix.groupby(batch).mean().T
        after = harmonised.groupby(batch).mean().T
        matrix = harmonised
        table = table.assign(**{c: matrix[c] for c in columns})
        notes.append(
            f"ComBat ({spec.combat.method}{', mean only' if spec.combat.mean_only else ''}) over "
            f"{batch.nunique()} batches of {spec.batch}"
        )

    time = convert_time(table[spec.time].to_numpy(dtype=float), spec.time_unit, spec.report_unit)
    event = table[spec.event].to_numpy(dtype=int)
    if spec.horizon is not None:
        time, event = censor_at(time, event, spec.horizon)
        notes.append(f"administratively censored at {spec.horizon:g} {spec.report_unit}")
    rank = logrank_at_cutoff(time, event, km_values)
    groups = np.where(km_values > rank.cutoff, "high", "low")
    km = kaplan_meier(time, event, groups)
    c_index = harrell_c(time, event, km_values)
    cox, unfitted = _univariate_cox_per_feature(time, event, matrix)
    if unfitted:
        notes.append(f"{len(unfitted)} feature(s) without a Cox fit: " + "; ".join(unfitted[:5]))
    return AnalysisResult(
        spec=spec,
        table=table,
        features=columns,
        dropped_constant=constant,
        combat=model,
        batch_means_before=before,
        batch_means_after=after,
        km=km,
        logrank=rank,
        c_index=c_index,
        cox=cox,
        summary=summary_statistics(matrix),
        surrogates=volume_surrogates(matrix, spec.km_feature)
        if spec.km_feature in columns
        else pd.DataFrame(),
        notes=notes,
    )


def _univariate_cox_per_feature(
    time: np.ndarray, event: np.ndarray, matrix: pd.DataFrame
) -> tuple[pd.DataFrame, list[str]]:
    """Standardised univariate Cox per feature; a feature whose model fails is reported, not fatal."""
    tables, unfitted = [], []
    for name in matrix.columns:
        try:
            tables.append(univariate_cox(time, event, matrix[[name]], standardise=True))
        except SurvivalError as exc:
            unfitted.append(f"{name}: {exc.reason}")
    if not tables:
        raise AnalysisError("no feature could be fitted by a Cox model: " + "; ".join(unfitted[:3]))
    cox = pd.concat(tables, ignore_index=True).sort_values("p_value").reset_index(drop=True)
    return cox, unfitted


def describe(result: AnalysisResult) -> dict[str, Any]:
    """Headline numbers of an analysis, for summaries and artifacts."""
    top = result.cox.iloc[0] if not result.cox.empty else None
    return {
        "patients": len(result.table),
        "features": len(result.features),
        "logrank_p": result.logrank.p_value,
        "km_feature": result.spec.km_feature,
        "km_cutoff": result.logrank.cutoff,
        "c_index": result.c_index,
        "top_cox_feature": None if top is None else str(top["covariate"]),
        "top_cox_hr_per_sd": None if top is None else float(top["hr"]),
        "top_cox_p": None if top is None else float(top["p_value"]),
    }
