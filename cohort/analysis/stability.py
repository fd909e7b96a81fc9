"""Feature stability: intraclass correlation and Lin's concordance correlation.

ICC forms follow Shrout & Fleiss (1979) / McGraw & Wong (1996), single measures:

* ``ICC(1,1)``: one-way random effects (raters are not the same for every subject;
  the form Zwanenburg et al. 2019 use for perturbation-based stability);
* ``ICC(2,1)``: two-way random effects, absolute agreement;
* ``ICC(3,1)``: two-way mixed effects, consistency.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

IccForm = Literal["ICC(1,1)", "ICC(2,1)", "ICC(3,1)"]


def icc(ratings: np.ndarray, form: IccForm = "ICC(1,1)") -> float:
    """ICC of an (n subjects × k raters) matrix without missing values."""
    x = np.asarray(ratings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"need at least 2 subjects and 2 raters, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("ratings contain NaN or infinite values")
    n, k = x.shape
    grand = x.mean()
    ss_rows = k * ((x.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((x.mean(axis=0) - grand) ** 2).sum()
    ss_total = ((x - grand) ** 2).sum()
    ss_error = ss_total - ss_rows - ss_cols
    ms_rows = ss_rows / (n - 1)
    ms_cols = ss_cols / (k - 1)
    ms_within = (ss_total - ss_rows) / (n * (k - 1))
    ms_error = ss_error / ((n - 1) * (k - 1))
    if form == "ICC(1,1)":
        denominator = ms_rows + (k - 1) * ms_within
        numerator = ms_rows - ms_within
    elif form == "ICC(2,1)":
        denominator = ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n
        numerator = ms_rows - ms_error
    elif form == "ICC(3,1)":
        denominator = ms_rows + (k - 1) * ms_error
        numerator = ms_rows - ms_error
    else:
        raise ValueError(f"unknown ICC form {form!r}")
    if denominator == 0:
        return float("nan") if numerator == 0 else float(np.sign(numerator))
    return float(numerator / denominator)


def concordance_correlation(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Lin's concordance correlation coefficient (population moments, as Lin 1989)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        raise ValueError("need two equally long series of at least 2 values")
    covariance = ((a - a.mean()) * (b - b.mean())).mean()
    return float(2 * covariance / (a.var() + b.var() + (a.mean() - b.mean()) ** 2))


def feature_icc(
    table: pd.DataFrame,
    *,
    subject: Sequence[str],
    rater: str,
    features: Sequence[str],
    form: IccForm = "ICC(1,1)",
) -> pd.DataFrame:
    """Per-feature ICC over a long table (one row per subject × rater).

    Subjects with a missing rating for a feature are left out of that feature's
    ICC; the counts used are reported beside each value.
    """
    rows = []
    for feature in features:
        wide = table.pivot_table(index=list(subject), columns=rater, values=feature, aggfunc="first")
        wide = wide.dropna(axis=0, how="any")
        value = icc(wide.to_numpy(), form) if wide.shape[0] >= 2 and wide.shape[1] >= 2 else float("nan")
        rows.append(
            {
                "feature": feature,
                "icc": value,
                "form": form,
                "n_subjects": int(wide.shape[0]),
                "n_raters": int(wide.shape[1]),
            }
        )
    return pd.DataFrame(rows)


def stable_features(icc_table: pd.DataFrame, threshold: float = 0.75) -> list[str]:
    """Features whose ICC is at least ``threshold`` (NaN counts as unstable)."""
    keep = icc_table["icc"].fillna(-np.inf) >= threshold
    return [str(f) for f in icc_table.loc[keep, "feature"]]
