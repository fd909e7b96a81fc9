"""Analyses on feature tables: ComBat, stability (ICC, CCC), survival (KM, log-rank, Cox, C-index)."""

from cohort.analysis.combat import CombatError, CombatModel, fit_combat, harmonise_combat
from cohort.analysis.stability import concordance_correlation, feature_icc, icc, stable_features
from cohort.analysis.survival import (
    RiskModel,
    censor_at,
    convert_time,
    fit_cox,
    harrell_c,
    kaplan_meier,
    logrank,
    logrank_at_cutoff,
    split_at_cutoff,
    univariate_cox,
    uno_c,
)

__all__ = [
    "CombatError",
    "CombatModel",
    "RiskModel",
    "censor_at",
    "concordance_correlation",
    "convert_time",
    "feature_icc",
    "fit_combat",
    "fit_cox",
    "harmonise_combat",
    "harrell_c",
    "icc",
    "kaplan_meier",
    "logrank",
    "logrank_at_cutoff",
    "split_at_cutoff",
    "stable_features",
    "univariate_cox",
    "uno_c",
]
