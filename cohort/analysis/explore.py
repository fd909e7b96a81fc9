"""Feature exploration: the feature statistics of the precision-medicine-toolbox, typed and testable.

The precision-medicine-toolbox (``pmtool.AnalysisBox``) explores a radiomics
feature table with descriptive statistics, a Spearman correlation matrix,
Bonferroni-corrected Mann–Whitney U tests, univariate ROC AUCs and the Spearman
correlation of every feature with tumour volume. This module computes the same
quantities on a pandas DataFrame of samples (rows) × features (columns) and
returns tidy DataFrames (one row per feature, indexed by feature name, in the
input column order) instead of writing HTML/Excel files; the plots are
:class:`matplotlib.figure.Figure` objects rendered with the Agg backend, never
through ``pyplot``'s global state.

Conventions
-----------
* **Features** must be numeric (bool and nullable integer columns are read as
  float64). A non-numeric column, a column that is entirely missing, a column
  with an infinite value or a duplicated column name is refused with an
  :class:`ExplorationError` naming the column(s). Every function except
  :func:`summary_statistics` also refuses a *constant* feature (one distinct
  non-missing value): its correlation is undefined and its test is vacuous;
  drop such columns first. Other missing feature values are left out feature by
  feature (pairwise for correlations), and the counts used are reported.
* **Outcomes / groups** (:func:`mann_whitney`, :func:`univariate_auc` and the
  plots that use them): a :class:`pandas.Series` is matched to the feature rows
  **by index label** (a row whose label is absent from the series counts as
  missing); a list or array is matched by position and must have one value per
  row. Rows with a missing outcome are dropped, never silently mis-aligned; their
  index labels are listed in the result's ``attrs["dropped_rows"]``. The outcome
  must have exactly two distinct values, each present in at least one row.
* **Label order**: the two labels are sorted (``0 < 1``, ``False < True``,
  alphabetical for strings); the first is group ``a``, the second group ``b``.
  For the AUC the *positive* class defaults to the second label (1, ``True``).
* **Spearman's rho** is the Pearson correlation of average ranks (ties share
  their mean rank), on the rows where both values are present; it is NaN when
  fewer than 3 such rows remain or one side is constant on them.

lifelines-free, statsmodels-free: only numpy, pandas, scipy and scikit-learn.
matplotlib is imported inside the plot functions, so importing this module has
no side effects.
"""

from __future__ import annotations

import io
import math
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_complex_dtype, is_numeric_dtype

from cohort.errors import CohortError, Stage

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_VOLUME_COLUMN",
    "ExplorationError",
    "correlated_pairs",
    "figure_to_png_bytes",
    "figure_to_svg",
    "mann_whitney",
    "plot_correlation_heatmap",
    "plot_feature_boxplots",
    "plot_roc_curves",
    "plot_volume_correlation",
    "spearman_matrix",
    "summary_statistics",
    "univariate_auc",
    "volume_surrogates",
]

#: The PyRadiomics voxel-count volume (mm³), the toolbox's usual volume feature.
DEFAULT_VOLUME_COLUMN = "original_shape_VoxelVolume"

#: A binary outcome or group labels: a Series (aligned by index) or a sequence (by position).
Labels: TypeAlias = "pd.Series | Sequence[Any] | np.ndarray"

_SUMMARY_COLUMNS = ["n", "missing", "mean", "sd", "min", "q1", "median", "q3", "max", "skewness", "cv"]


class ExplorationError(CohortError, ValueError):
    """A feature table, outcome or option cannot be explored as asked."""

    stage = Stage.ANALYSIS


# --------------------------------------------------------------------------- validation


def _names(labels: Sequence[Hashable], limit: int = 10) -> str:
    shown = ", ".join(repr(str(label)) for label in list(labels)[:limit])
    extra = len(labels) - limit
    return f"{shown} and {extra} more" if extra > 0 else shown


def _refuse(columns: Sequence[Hashable], reason: str) -> ExplorationError:
    subject = str(columns[0]) if len(columns) == 1 else f"{len(columns)} columns"
    return ExplorationError(f"{reason}: {_names(columns)}", subject=subject)


def _numeric(features: pd.DataFrame, *, allow_constant: bool) -> pd.DataFrame:
    """Validate a samples × features table and return it as float64 (a copy)."""
    if not isinstance(features, pd.DataFrame):
        raise ExplorationError(f"expected a pandas DataFrame of samples × features, got {type(features)}")
    if features.shape[1] == 0:
        raise ExplorationError("the feature table has no columns")
    if features.shape[0] == 0:
        raise ExplorationError("the feature table has no rows")
    duplicated = features.columns[features.columns.duplicated()].unique()
    if len(duplicated):
        raise _refuse(list(duplicated), "duplicated feature column names")
    non_numeric = [
        column
        for column in features.columns
        if not (is_numeric_dtype(features[column]) or is_bool_dtype(features[column]))
        or is_complex_dtype(features[column])
    ]
    if non_numeric:
        raise _refuse(non_numeric, "non-numeric feature columns (select the feature columns first)")
    table = features.astype("float64")
    values = table.to_numpy()
    infinite = table.columns[np.isinf(values).any(axis=0)]
    if len(infinite):
        raise _refuse(list(infinite), "features with infinite values")
    empty = table.columns[table.isna().all(axis=0).to_numpy()]
    if len(empty):
        raise _refuse(list(empty), "features with no values (all missing)")
    if not allow_constant:
        constant = table.columns[(table.nunique(dropna=True) <= 1).to_numpy()]
        if len(constant):
            raise _refuse(
                list(constant), "constant features (a single distinct value; drop them before this analysis)"
            )
    return table


def _sorted_labels(values: pd.Series) -> list[Any]:
    unique = list(pd.unique(values))
    try:
        return sorted(unique)
    except TypeError:
        return sorted(unique, key=str)


def _align(features: pd.DataFrame, outcome: Labels, what: str) -> tuple[pd.DataFrame, pd.Series, list[Any]]:
    """Match ``outcome`` to the rows of ``features``; drop rows without one.

    Returns the kept rows, the outcome on them and the index labels of the dropped rows.
    """
    if isinstance(outcome, pd.Series):
        if not outcome.index.is_unique:
            duplicated = outcome.index[outcome.index.duplicated()].unique()
            raise ExplorationError(
                f"the {what} series has duplicated index labels: {_names(list(duplicated))}"
            )
        aligned = outcome.reindex(features.index)
    else:
        array = np.asarray(outcome, dtype=object)
        if array.ndim != 1 or len(array) != len(features):
            raise ExplorationError(
                f"the {what} has shape {array.shape}; expected one value per feature row ({len(features)}), "
                "or pass a pandas Series to match rows by index label"
            )
        aligned = pd.Series(list(array), index=features.index, dtype=object)
    missing = aligned.isna().to_numpy()
    dropped = list(features.index[missing])
    kept = ~missing
    if not kept.any():
        raise ExplorationError(
            f"no feature row has a {what} value (a Series is matched by index label: do the labels match?)"
        )
    return features.loc[kept], aligned.loc[kept], dropped


def _binary(labels: pd.Series, what: str) -> tuple[Any, Any]:
    found = _sorted_labels(labels)
    if len(found) != 2:
        raise ExplorationError(
            f"the {what} must have exactly two distinct non-missing values, "
            f"found {len(found)}: {found[:10]!r}"
        )
    return found[0], found[1]


def _check_threshold(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ExplorationError(f"{name} must lie in [0, 1], got {value}")


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Spearman's rho on the rows where both are present, and that number of rows."""
    from scipy.stats import spearmanr

    both = ~(np.isnan(x) | np.isnan(y))
    n = int(both.sum())
    a, b = x[both], y[both]
    if n < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan"), n
    return float(spearmanr(a, b).statistic), n


# --------------------------------------------------------------------------- statistics


def summary_statistics(features: pd.DataFrame) -> pd.DataFrame:
    """Descriptive statistics of every feature (one row per feature).

    Columns, each computed on the feature's non-missing values:

    * ``n``: number of non-missing values; ``missing``: number of missing values;
    * ``mean``: arithmetic mean;
    * ``sd``: sample standard deviation (``ddof=1``; NaN when ``n < 2``);
    * ``min``, ``max``;
    * ``q1``, ``median``, ``q3``: the 25th, 50th and 75th percentiles with linear
      interpolation between order statistics (numpy's default, Hyndman & Fan
      type 7);
    * ``skewness``: the adjusted Fisher–Pearson standardised third moment
      ``G1 = sqrt(n (n - 1)) / (n - 2) * m3 / m2**1.5`` (``scipy.stats.skew(x,
      bias=False)``, pandas' ``skew``); NaN when ``n < 3`` or the feature is constant;
    * ``cv``: coefficient of variation ``sd / |mean|`` (unitless; NaN when the mean
      is 0). It is only meaningful for ratio-scale features (e.g. volumes, energies),
      not for features that can be negative or have an arbitrary zero.

    Constant features are accepted here (``sd = 0``); non-numeric and all-missing
    columns are refused.
    """
    table = _numeric(features, allow_constant=True)
    n = table.count()
    mean = table.mean()
    sd = table.std(ddof=1)
    quartiles = table.quantile([0.25, 0.5, 0.75], interpolation="linear")
    skewness = table.skew().where((n >= 3) & (sd > 0))
    absolute_mean = mean.abs()
    cv = (sd / absolute_mean.where(absolute_mean > 0)).astype("float64")
    result = pd.DataFrame(
        {
            "n": n.astype("int64"),
            "missing": table.isna().sum().astype("int64"),
            "mean": mean,
            "sd": sd,
            "min": table.min(),
            "q1": quartiles.loc[0.25],
            "median": quartiles.loc[0.5],
            "q3": quartiles.loc[0.75],
            "max": table.max(),
            "skewness": skewness,
            "cv": cv,
        },
        columns=_SUMMARY_COLUMNS,
    )
    result.index.name = "feature"
    return result


def spearman_matrix(features: pd.DataFrame) -> pd.DataFrame:
    """Pairwise Spearman rho between all features (a symmetric features × features matrix).

    Missing values are handled pairwise: each pair is ranked on the rows where both
    features are present (pandas ``corr(method="spearman")``, which matches
    ``scipy.stats.spearmanr(..., nan_policy="omit")`` pair by pair).
    """
    table = _numeric(features, allow_constant=False)
    rho = table.corr(method="spearman", min_periods=3)
    rho.index.name = "feature"
    rho.columns.name = "feature"
    return rho


def correlated_pairs(features: pd.DataFrame, threshold: float = 0.95) -> pd.DataFrame:
    """Feature pairs whose Spearman correlation is at least ``threshold`` in absolute value.

    One row per unordered pair (``feature_a`` before ``feature_b`` in column order)
    with ``rho`` and ``abs_rho``, strongest first (ties in column order). These are
    the redundant pairs one would prune before modelling (the toolbox's default
    strong-correlation cut-offs are 0.75 to 0.95).
    """
    _check_threshold(threshold, "threshold")
    rho = spearman_matrix(features)
    values = rho.to_numpy()
    upper_i, upper_j = np.triu_indices(len(rho), k=1)
    r = values[upper_i, upper_j]
    with np.errstate(invalid="ignore"):
        keep = np.abs(r) >= threshold
    names = np.asarray(rho.columns, dtype=object)
    pairs = pd.DataFrame(
        {
            "feature_a": names[upper_i[keep]],
            "feature_b": names[upper_j[keep]],
            "rho": r[keep],
            "abs_rho": np.abs(r[keep]),
        }
    )
    pairs = pairs.sort_values("abs_rho", ascending=False, kind="stable").reset_index(drop=True)
    pairs.attrs["threshold"] = threshold
    return pairs


def mann_whitney(features: pd.DataFrame, groups: Labels, alpha: float = 0.05) -> pd.DataFrame:
    """Two-sided Mann–Whitney U test of every feature between two groups, Bonferroni-corrected.

    ``scipy.stats.mannwhitneyu(a, b, alternative="two-sided")`` with its defaults
    (``method="auto"``: exact for samples of at most 8 without ties, otherwise the
    normal approximation with tie correction and continuity correction), feature
    by feature on the non-missing values of each group.

    Columns: ``n_a``, ``n_b`` (values used per group), ``median_a``, ``median_b``,
    ``u`` (the U statistic of group ``a``, i.e. the number of (a, b) pairs with
    ``a > b``, ties counting one half), ``p`` (raw two-sided p-value),
    ``p_bonferroni = min(1, p × m)`` with ``m`` the number of features tested (the
    number of columns), and ``significant = p_bonferroni <= alpha`` (as
    statsmodels' ``multipletests(method="bonferroni")`` used by the toolbox).

    ``attrs`` holds ``groups`` (the labels ``a``, ``b``), ``m``, ``alpha`` and
    ``dropped_rows`` (rows without a group). Raises :class:`ExplorationError` when
    the groups are not exactly two or a group has no value for a feature.
    """
    from scipy.stats import mannwhitneyu

    _check_threshold(alpha, "alpha")
    table = _numeric(features, allow_constant=True)
    table, labels, dropped = _align(table, groups, "groups")
    table = _numeric(table, allow_constant=False)
    label_a, label_b = _binary(labels, "groups")
    in_a = (labels == label_a).to_numpy()
    m = table.shape[1]
    rows = []
    for column in table.columns:
        x = table[column].to_numpy()
        a = x[in_a & ~np.isnan(x)]
        b = x[~in_a & ~np.isnan(x)]
        if len(a) == 0 or len(b) == 0:
            empty = label_a if len(a) == 0 else label_b
            raise ExplorationError(f"group {empty!r} has no value for this feature", subject=str(column))
        test = mannwhitneyu(a, b, alternative="two-sided")
        p = float(test.pvalue)
        rows.append((len(a), len(b), float(np.median(a)), float(np.median(b)), float(test.statistic), p))
    result = pd.DataFrame(
        rows, index=table.columns, columns=["n_a", "n_b", "median_a", "median_b", "u", "p"]
    ).astype({"n_a": "int64", "n_b": "int64"})
    result["p_bonferroni"] = np.minimum(1.0, result["p"] * m)
    result["significant"] = result["p_bonferroni"] <= alpha
    result.index.name = "feature"
    result.attrs.update(groups=(label_a, label_b), m=m, alpha=alpha, dropped_rows=dropped)
    return result


def univariate_auc(features: pd.DataFrame, outcome: Labels, positive: Any = None) -> pd.DataFrame:
    """ROC AUC of every feature, used alone as a score, for a binary outcome.

    ``auc`` is ``sklearn.metrics.roc_auc_score(outcome == positive, feature)``: the
    probability that a random positive row has a higher value than a random
    negative one (ties count one half). ``auc > 0.5`` means higher values go with
    the positive class, ``auc < 0.5`` lower values. ``auc_max = max(auc, 1 - auc)``
    is the orientation-free discrimination (the AUC of the feature or of its
    negation, whichever is better; 0.5 = none, 1 = perfect separation), which is
    what the toolbox's univariate ROC reports. Choosing the orientation on the same
    data biases ``auc_max`` upwards, so it is for ranking features, not a validated
    performance. ``direction`` says which side is positive (``"higher"`` if
    ``auc >= 0.5``, else ``"lower"``).

    ``positive`` defaults to the second of the two sorted labels (1, ``True``).
    Missing feature values are left out per feature (``n``, ``n_positive``,
    ``n_negative`` are the counts used). ``attrs`` holds ``positive``,
    ``negative`` and ``dropped_rows`` (rows without an outcome).
    """
    from sklearn.metrics import roc_auc_score

    table = _numeric(features, allow_constant=True)
    table, labels, dropped = _align(table, outcome, "outcome")
    table = _numeric(table, allow_constant=False)
    first, second = _binary(labels, "outcome")
    if positive is None:
        positive = second
    elif positive not in (first, second):
        raise ExplorationError(
            f"positive label {positive!r} is not one of the outcome values {[first, second]!r}"
        )
    negative = first if positive == second else second
    is_positive = (labels == positive).to_numpy()
    rows = []
    for column in table.columns:
        x = table[column].to_numpy()
        present = ~np.isnan(x)
        y = is_positive[present]
        n_positive = int(y.sum())
        n_negative = int(len(y) - n_positive)
        if n_positive == 0 or n_negative == 0:
            empty = positive if n_positive == 0 else negative
            raise ExplorationError(f"class {empty!r} has no value for this feature", subject=str(column))
        auc = float(roc_auc_score(y.astype(int), x[present]))
        rows.append(
            (len(y), n_positive, n_negative, auc, max(auc, 1.0 - auc), "higher" if auc >= 0.5 else "lower")
        )
    result = pd.DataFrame(
        rows, index=table.columns, columns=["n", "n_positive", "n_negative", "auc", "auc_max", "direction"]
    ).astype({"n": "int64", "n_positive": "int64", "n_negative": "int64"})
    result.index.name = "feature"
    result.attrs.update(positive=positive, negative=negative, dropped_rows=dropped)
    return result


def volume_surrogates(
    features: pd.DataFrame, volume_column: str = DEFAULT_VOLUME_COLUMN, threshold: float = 0.8
) -> pd.DataFrame:
    """Spearman rho of every feature with tumour volume, flagging volume surrogates.

    Many radiomic features (energies, sizes, some texture features) mostly restate
    the tumour volume; a "prognostic signature" made of them is a volume model in
    disguise (a known radiomics pitfall, cf. Welch et al. 2019). Columns: ``n``
    (rows with both values), ``rho``, ``abs_rho`` and ``surrogate =
    abs_rho >= threshold`` (NaN rho is never a surrogate). The volume column
    itself is included (``rho = 1``) as a sanity anchor.
    """
    _check_threshold(threshold, "threshold")
    table = _numeric(features, allow_constant=False)
    if volume_column not in table.columns:
        raise ExplorationError("volume column not among the features", subject=str(volume_column))
    volume = table[volume_column].to_numpy()
    rows = [_spearman(table[column].to_numpy(), volume) for column in table.columns]
    result = pd.DataFrame(
        {
            "n": np.array([n for _, n in rows], dtype=np.int64),
            "rho": [rho for rho, _ in rows],
        },
        index=table.columns,
    )
    result["abs_rho"] = result["rho"].abs()
    result["surrogate"] = (result["abs_rho"] >= threshold).to_numpy(dtype=bool)
    result.index.name = "feature"
    result.attrs.update(volume_column=volume_column, threshold=threshold)
    return result


# --------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_correlation_heatmap(
    features: pd.DataFrame, *, absolute: bool = True, max_tick_labels: int = 60
) -> Figure:
    """Heat map of the Spearman correlation matrix (|rho| on [0, 1] by default, as the toolbox).

    One image axes plus a colour-bar axes. Feature names label the ticks when there
    are at most ``max_tick_labels`` features.
    """
    rho = spearman_matrix(features)
    n = len(rho)
    side = min(4.0 + 0.18 * n, 24.0)
    figure = _new_figure(side + 1.5, side)
    axes = figure.add_subplot()
    values = rho.to_numpy()
    if absolute:
        image = axes.imshow(np.abs(values), vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    else:
        image = axes.imshow(values, vmin=-1.0, vmax=1.0, cmap="RdBu_r", interpolation="nearest")
    figure.colorbar(image, ax=axes, label="|Spearman rho|" if absolute else "Spearman rho", shrink=0.8)
    if n <= max_tick_labels:
        names = [str(column) for column in rho.columns]
        fontsize = 8 if n <= 20 else 6
        axes.set_xticks(range(n), names, rotation=90, fontsize=fontsize)
        axes.set_yticks(range(n), names, fontsize=fontsize)
    else:
        axes.set_xticks([])
        axes.set_yticks([])
    axes.set_title(f"Feature correlation (Spearman, {n} features)")
    return figure


def plot_feature_boxplots(
    features: pd.DataFrame,
    groups: Labels,
    columns: Sequence[str] | None = None,
    *,
    ncols: int = 4,
    max_features: int = 48,
) -> Figure:
    """Box plots of each feature by group: one axes per feature, one box per group label.

    ``columns`` picks the features (default: all, at most ``max_features``). Rows
    without a group are left out (as in :func:`mann_whitney`); missing feature
    values are left out per feature.
    """
    table = _numeric(features, allow_constant=True)
    if columns is not None:
        unknown = [column for column in columns if column not in table.columns]
        if unknown:
            raise _refuse(unknown, "columns not among the features")
        table = table[list(columns)]
    if table.shape[1] > max_features:
        raise ExplorationError(
            f"{table.shape[1]} features to plot, more than max_features={max_features}; pass columns"
        )
    if ncols < 1:
        raise ExplorationError(f"ncols must be at least 1, got {ncols}")
    table, labels, dropped = _align(table, groups, "groups")
    found = _sorted_labels(labels)
    count = table.shape[1]
    cols = min(ncols, count)
    nrows = math.ceil(count / cols)
    figure = _new_figure(3.2 * cols, 2.8 * nrows)
    tick_labels = [str(label) for label in found]
    for position, column in enumerate(table.columns, start=1):
        axes = figure.add_subplot(nrows, cols, position)
        x = table[column]
        data = [x[(labels == label).to_numpy()].dropna().to_numpy() for label in found]
        axes.boxplot(data, tick_labels=tick_labels, patch_artist=True, widths=0.6)
        axes.set_title(str(column), fontsize=8)
        axes.tick_params(labelsize=7)
    if dropped:
        figure.suptitle(f"{len(dropped)} rows without a group left out", fontsize=8)
    return figure


def plot_roc_curves(features: pd.DataFrame, outcome: Labels, top_k: int = 5, positive: Any = None) -> Figure:
    """ROC curves of the ``top_k`` features with the highest orientation-free AUC, on one axes.

    A feature whose AUC is below 0.5 is plotted negated (lower values predict the
    positive class), so every curve lies above the chance diagonal; the legend
    gives ``auc_max`` and marks those curves "(lower)". One line per feature plus
    the dashed chance line.
    """
    from sklearn.metrics import roc_curve

    if top_k < 1:
        raise ExplorationError(f"top_k must be at least 1, got {top_k}")
    aucs = univariate_auc(features, outcome, positive=positive)
    top = aucs.sort_values("auc_max", ascending=False, kind="stable").head(top_k)
    table, labels, _ = _align(_numeric(features, allow_constant=True), outcome, "outcome")
    is_positive = (labels == aucs.attrs["positive"]).to_numpy()
    figure = _new_figure(6.5, 6.0)
    axes = figure.add_subplot()
    for column, row in top.iterrows():
        x = table[column].to_numpy()
        present = ~np.isnan(x)
        sign = 1.0 if row["direction"] == "higher" else -1.0
        fpr, tpr, _ = roc_curve(is_positive[present].astype(int), sign * x[present])
        suffix = "" if sign > 0 else " (lower)"
        axes.plot(fpr, tpr, linewidth=1.5, label=f"{column}{suffix}: AUC {row['auc_max']:.3f}")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_aspect("equal")
    axes.set_xlabel("False positive rate")
    axes.set_ylabel("True positive rate")
    axes.set_title(f"Univariate ROC, top {len(top)} features (positive = {aucs.attrs['positive']!r})")
    axes.legend(loc="lower right", fontsize=7)
    return figure


def plot_volume_correlation(
    features: pd.DataFrame,
    volume_column: str = DEFAULT_VOLUME_COLUMN,
    threshold: float = 0.8,
    *,
    top: int | None = 40,
) -> Figure:
    """Horizontal bar chart of |Spearman rho| with volume, strongest first, with the threshold line.

    Bars of volume surrogates (``|rho| >= threshold``) are purple, the others
    orange (the toolbox's colours). ``top`` limits the number of bars (``None``:
    all features); features with an undefined rho are not drawn.
    """
    result = volume_surrogates(features, volume_column, threshold).dropna(subset=["rho"])
    result = result.sort_values("abs_rho", ascending=False, kind="stable")
    if top is not None:
        if top < 1:
            raise ExplorationError(f"top must be at least 1 or None, got {top}")
        result = result.head(top)
    count = len(result)
    figure = _new_figure(8.0, 1.5 + 0.22 * count)
    axes = figure.add_subplot()
    colours = ["tab:purple" if flag else "tab:orange" for flag in result["surrogate"]]
    positions = np.arange(count)
    axes.barh(positions, result["abs_rho"].to_numpy(), color=colours)
    axes.set_yticks(positions, [str(name) for name in result.index], fontsize=7)
    axes.invert_yaxis()
    axes.axvline(threshold, color="black", linestyle="--", linewidth=1)
    axes.set_xlim(0, 1.0)
    axes.set_xlabel(f"|Spearman rho| with {volume_column}")
    flagged = int(result["surrogate"].sum())
    axes.set_title(f"Volume correlation: {flagged} of {count} shown at |rho| >= {threshold:g}")
    return figure


# --------------------------------------------------------------------------- export


def figure_to_png_bytes(figure: Figure, *, dpi: int = 100) -> bytes:
    """Render a figure to PNG bytes (Agg), e.g. for a ``data:image/png;base64,...`` URI in HTML."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def figure_to_svg(figure: Figure) -> str:
    """Render a figure to an inline ``<svg>`` element (text), ready to paste into an HTML report.

    The XML declaration and DOCTYPE are stripped; the date is omitted and element
    ids are salted with a fixed string, so the same plot call on the same data gives
    the same text (a figure drawn twice may differ in its clip-path ids, as
    constrained layout can move the axes by rounding errors between draws).
    """
    from matplotlib import rc_context

    buffer = io.StringIO()
    with rc_context({"svg.hashsalt": "cohort-explore"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    start = text.find("<svg")
    return text[start:] if start >= 0 else text
