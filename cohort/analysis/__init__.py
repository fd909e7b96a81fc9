"""Analyses on feature tables: stability (ICC, CCC)."""

from cohort.analysis.stability import concordance_correlation, feature_icc, icc, stable_features

__all__ = ["concordance_correlation", "feature_icc", "icc", "stable_features"]
