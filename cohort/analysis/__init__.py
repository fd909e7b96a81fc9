"""Analyses on feature tables: ComBat, stability, survival, exploration."""

from cohort.analysis.combat import CombatError, CombatModel, fit_combat, harmonise_combat
from cohort.analysis.explore import (
    correlated_pairs,
    mann_whitney,
    spearman_matrix,
    summary_statistics,
    univariate_auc,
    volume_surrogates,
)
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
    "correlated_pairs",
    "feature_icc",
    "fit_combat",
    "fit_cox",
    "harmonise_combat",
    "harrell_c",
    "icc",
    "kaplan_meier",
    "logrank",
    "logrank_at_cutoff",
    "mann_whitney",
    "spearman_matrix",
    "split_at_cutoff",
    "stable_features",
    "summary_statistics",
    "univariate_auc",
    "univariate_cox",
    "uno_c",
    "volume_surrogates",
]
