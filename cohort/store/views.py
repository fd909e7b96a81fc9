"""Reshaped views of a feature table for analysis."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from cohort.shard import FEATURE_KEY_SCHEMA

#: One wide row per (study, structure set, ROI) when several series roles are pivoted.
ROLE_KEYS = ("patient_id", "study_uid", "rtstruct_uid", "roi", "roi_source")


def feature_columns(table: pd.DataFrame) -> list[str]:
    """The feature columns of a feature table (everything after the fixed schema)."""
    fixed = set(FEATURE_KEY_SCHEMA.names)
    return [c for c in table.columns if c not in fixed]


def wide_by_role(table: pd.DataFrame, keys: Sequence[str] = ROLE_KEYS) -> pd.DataFrame:
    """One row per ROI with features prefixed by series role (``T1c_original_firstorder_Mean``).

    Each role also contributes ``<role>_series_uid``. Raises ``ValueError`` when a
    row has no role or a role occurs twice for the same ROI.
    """
    if table["role"].isna().any():
        raise ValueError("rows without a role: set selection.roles in the cohort spec")
    if table.duplicated([*keys, "role"]).any():
        raise ValueError("a role occurs more than once for the same ROI")
    features = feature_columns(table)
    wide: pd.DataFrame | None = None
    for role, part in table.groupby("role", sort=True):
        renamed = part[[*keys, "series_uid", *features]].rename(
            columns={c: f"{role}_{c}" for c in ["series_uid", *features]}
        )
        wide = renamed if wide is None else wide.merge(renamed, on=list(keys), how="outer")
    assert wide is not None
    return wide.reset_index(drop=True)
