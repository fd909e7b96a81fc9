from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import PathPatch, Rectangle
from scipy.stats import mannwhitneyu, skew, spearmanr
from sklearn.metrics import roc_auc_score

from cohort.analysis.explore import (
    ExplorationError,
    correlated_pairs,
    figure_to_png_bytes,
    figure_to_svg,
    mann_whitney,
    plot_correlation_heatmap,
    plot_feature_boxplots,
    plot_roc_curves,
    plot_volume_correlation,
    spearman_matrix,
    summary_statistics,
    univariate_auc,
    volume_surrogates,
)
from cohort.errors import CohortError, Stage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TWO_YEARS = 730  # days


# ----------------------------------------------------------------------------- hand-made examples


def test_summary_statistics_by_hand() -> None:
    x = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0, 10.0, np.nan], "k": [5, 5, 5, 5, 5, 5]})
    stats = summary_statistics(x)
    a = stats.loc["a"]
    assert (a["n"], a["missing"]) == (5, 1)
    assert a["mean"] == pytest.approx(4.0)
    assert a["sd"] == pytest.approx(np.sqrt(((np.array([1, 2, 3, 4, 10]) - 4.0) ** 2).sum() / 4))
    assert (a["min"], a["q1"], a["median"], a["q3"], a["max"]) == (1.0, 2.0, 3.0, 4.0, 10.0)
    # G1 by its formula: sqrt(n (n-1)) / (n-2) * m3 / m2^1.5 with population moments m2, m3.
    d = np.array([1, 2, 3, 4, 10]) - 4.0
    g1 = np.sqrt(5 * 4) / 3 * (d**3).mean() / (d**2).mean() ** 1.5
    assert a["skewness"] == pytest.approx(g1, rel=1e-12)
    assert a["cv"] == pytest.approx(a["sd"] / 4.0)
    k = stats.loc["k"]  # a constant feature is described, not refused
    assert (k["sd"], k["cv"]) == (0.0, 0.0) and np.isnan(k["skewness"])
    assert list(stats.columns) == [
        "n", "missing", "mean", "sd", "min", "q1", "median", "q3", "max", "skewness", "cv",
    ]  # fmt: skip
    negative = summary_statistics(pd.DataFrame({"z": [-1.0, -2.0, -3.0], "zero": [-1.0, 0.0, 1.0]}))
    assert negative.loc["z", "cv"] == pytest.approx(1.0 / 2.0)  # sd / |mean|
    assert np.isnan(negative.loc["zero", "cv"])


def test_spearman_of_monotone_transforms_and_pairs() -> None:
    rng = np.random.default_rng(1)
    x = rng.lognormal(size=40)
    table = pd.DataFrame({"x": x, "exp": np.exp(x), "neg_cube": -(x**3), "noise": rng.normal(size=40)})
    rho = spearman_matrix(table)
    assert rho.loc["x", "exp"] == pytest.approx(1.0, abs=1e-12)
    assert rho.loc["x", "neg_cube"] == pytest.approx(-1.0, abs=1e-12)
    assert rho.loc["x", "noise"] == pytest.approx(spearmanr(x, table["noise"]).statistic, rel=1e-12)
    np.testing.assert_allclose(rho.to_numpy(), rho.to_numpy().T)
    pairs = correlated_pairs(table, threshold=0.95)
    assert list(zip(pairs["feature_a"], pairs["feature_b"], strict=True)) == [
        ("x", "exp"),
        ("x", "neg_cube"),
        ("exp", "neg_cube"),
    ]
    assert pairs["rho"].tolist() == pytest.approx([1.0, -1.0, -1.0])
    assert (pairs["abs_rho"] >= 0.95).all()
    assert len(correlated_pairs(table, threshold=1.0)) == 3


def test_spearman_with_missing_values_is_pairwise() -> None:
    table = pd.DataFrame({"a": [1, 2, np.nan, 4, 5, 3], "b": [2, 1, 3, np.nan, 7, 8], "c": range(6)})
    rho = spearman_matrix(table)
    assert rho.loc["a", "b"] == pytest.approx(spearmanr(table["a"], table["b"], nan_policy="omit").statistic)
    assert rho.loc["a", "b"] == pytest.approx(0.6)
    surrogates = volume_surrogates(table, volume_column="c")
    assert surrogates.loc["a", "n"] == 5
    assert surrogates.loc["a", "rho"] == pytest.approx(rho.loc["a", "c"], rel=1e-12)


def test_perfectly_separated_groups() -> None:
    rng = np.random.default_rng(2)
    low, high = rng.uniform(0, 1, 20), rng.uniform(2, 3, 20)
    table = pd.DataFrame(
        {"separates": np.r_[low, high], "inverse": -np.r_[low, high], "noise": rng.normal(size=40)}
    )
    outcome = np.r_[np.zeros(20, int), np.ones(20, int)]
    aucs = univariate_auc(table, outcome)
    assert aucs.loc["separates", "auc"] == 1.0 and aucs.loc["separates", "direction"] == "higher"
    assert aucs.loc["inverse", "auc"] == 0.0 and aucs.loc["inverse", "auc_max"] == 1.0
    assert aucs.loc["inverse", "direction"] == "lower"
    assert aucs.attrs["positive"] == 1 and aucs.attrs["dropped_rows"] == []
    flipped = univariate_auc(table, outcome, positive=0)
    assert flipped.loc["separates", "auc"] == 0.0
    assert flipped.loc["noise", "auc"] == pytest.approx(1 - aucs.loc["noise", "auc"])

    tests = mann_whitney(table, outcome)
    assert tests.loc["separates", "u"] == 0.0  # no value of group 0 exceeds one of group 1
    exact = mannwhitneyu(low, high, alternative="two-sided").pvalue  # normal approximation (n > 8)
    assert tests.loc["separates", "p"] == pytest.approx(exact, rel=1e-12)
    assert tests.loc["separates", "p"] < 1e-7
    assert tests.loc["separates", "p_bonferroni"] == pytest.approx(3 * exact, rel=1e-12)
    assert tests.loc[["separates", "inverse"], "significant"].all()
    assert tests.attrs["m"] == 3 and tests.attrs["groups"] == (0, 1)
    # U of group b over n_a n_b is the AUC with b positive (the Mann–Whitney / AUC identity).
    u_b = tests["n_a"] * tests["n_b"] - tests["u"]
    np.testing.assert_allclose(u_b / (tests["n_a"] * tests["n_b"]), aucs["auc"], rtol=1e-12)

    small = mann_whitney(pd.DataFrame({"v": [1.0, 2.0, 3.0, 4.0]}), ["a", "a", "b", "b"])
    assert small.loc["v", "p"] == pytest.approx(1 / 3)  # exact: 2 extreme of C(4,2)=6 orderings
    assert small.loc["v", "p_bonferroni"] == pytest.approx(1 / 3)
    assert not small.loc["v", "significant"]


def test_bonferroni_is_capped_at_one() -> None:
    rng = np.random.default_rng(5)
    table = pd.DataFrame(rng.normal(size=(30, 10)), columns=[f"f{i}" for i in range(10)])
    tests = mann_whitney(table, np.repeat(["x", "y"], 15))
    np.testing.assert_allclose(tests["p_bonferroni"], np.minimum(1.0, tests["p"] * 10))
    assert tests["p_bonferroni"].max() == 1.0


def test_outcome_alignment_drops_missing_rows_and_reports_them() -> None:
    table = pd.DataFrame({"v": [5.0, 1.0, 7.0, 2.0, 9.0, 3.0]}, index=["p1", "p2", "p3", "p4", "p5", "p6"])
    # Shuffled index, one missing outcome, one patient absent from the outcome, one extra patient.
    outcome = pd.Series({"p6": 0, "p5": 1, "p3": 1, "p2": 0, "p1": np.nan, "p9": 1})
    aucs = univariate_auc(table, outcome)
    assert aucs.attrs["dropped_rows"] == ["p1", "p4"]
    assert aucs.loc["v", ["n", "n_positive", "n_negative"]].tolist() == [4, 2, 2]
    assert aucs.loc["v", "auc"] == 1.0  # p3, p5 (7, 9) above p2, p6 (1, 3)
    assert mann_whitney(table, outcome).attrs["dropped_rows"] == ["p1", "p4"]
    # A positional sequence must have one value per row.
    with pytest.raises(ExplorationError, match="one value per feature row"):
        univariate_auc(table, [0, 1])
    with pytest.raises(ExplorationError, match="do the labels match"):
        univariate_auc(table, pd.Series([0, 1], index=["x", "y"]))


def test_refusals_name_the_column() -> None:
    good = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "b": [4.0, 3.0, 1.0, 2.0]})
    with pytest.raises(ExplorationError, match=r"constant features.*'k'") as constant:
        spearman_matrix(good.assign(k=7.0))
    assert constant.value.subject == "k" and constant.value.stage is Stage.ANALYSIS
    assert isinstance(constant.value, CohortError) and isinstance(constant.value, ValueError)
    for call in (
        lambda t: mann_whitney(t, [0, 0, 1, 1]),
        lambda t: univariate_auc(t, [0, 0, 1, 1]),
        lambda t: volume_surrogates(t, volume_column="a"),
    ):
        with pytest.raises(ExplorationError, match="constant"):
            call(good.assign(k=7.0))
    with pytest.raises(ExplorationError, match=r"non-numeric.*'PatientID'"):
        summary_statistics(good.assign(PatientID=["p1", "p2", "p3", "p4"]))
    with pytest.raises(ExplorationError, match=r"all missing.*'gone'"):
        summary_statistics(good.assign(gone=np.nan))
    with pytest.raises(ExplorationError, match=r"infinite.*'b'"):
        summary_statistics(good.assign(b=[1.0, np.inf, 2.0, 3.0]))
    with pytest.raises(ExplorationError, match=r"exactly two distinct.*found 3"):
        mann_whitney(good, ["x", "y", "z", "x"])
    with pytest.raises(ExplorationError, match=r"exactly two distinct.*found 1"):
        univariate_auc(good, [1, 1, 1, 1])
    with pytest.raises(ExplorationError, match="group 1 has no value") as empty:
        mann_whitney(good.assign(c=[1.0, 2.0, np.nan, np.nan]), [0, 0, 1, 1])
    assert empty.value.subject == "c"
    with pytest.raises(ExplorationError, match="volume column"):
        volume_surrogates(good)
    with pytest.raises(ExplorationError, match="positive label"):
        univariate_auc(good, [0, 0, 1, 1], positive=2)


# ----------------------------------------------------------------------------- plots


@pytest.fixture(scope="module")
def toy() -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(7)
    volume = rng.lognormal(3, 1, 60)
    outcome = (volume + rng.normal(0, 20, 60) > np.median(volume)).astype(int)
    table = pd.DataFrame(
        {
            "volume": volume,
            "energy": volume * rng.uniform(0.9, 1.1, 60),
            "sphericity": rng.uniform(0.4, 0.9, 60),
            "entropy": rng.normal(4, 1, 60) - outcome,
        }
    )
    return table, outcome


def test_heatmap_figure(toy: tuple[pd.DataFrame, np.ndarray]) -> None:
    table, _ = toy
    figure = plot_correlation_heatmap(table)
    assert isinstance(figure, Figure)
    assert len(figure.axes) == 2  # heat map + colour bar
    images = [artist for artist in figure.axes[0].get_children() if isinstance(artist, AxesImage)]
    assert len(images) == 1
    np.testing.assert_allclose(np.asarray(images[0].get_array()), np.abs(spearman_matrix(table).to_numpy()))
    assert [label.get_text() for label in figure.axes[0].get_xticklabels()] == list(table.columns)
    assert figure_to_png_bytes(figure).startswith(PNG_SIGNATURE)


def test_boxplot_figure(toy: tuple[pd.DataFrame, np.ndarray]) -> None:
    table, outcome = toy
    figure = plot_feature_boxplots(table, outcome, columns=["volume", "entropy", "sphericity"], ncols=2)
    assert len(figure.axes) == 3
    for axes in figure.axes:
        boxes = [patch for patch in axes.patches if isinstance(patch, PathPatch)]
        assert len(boxes) == 2  # one box per group
        assert [label.get_text() for label in axes.get_xticklabels()] == ["0", "1"]
    assert [axes.get_title() for axes in figure.axes] == ["volume", "entropy", "sphericity"]
    assert figure_to_png_bytes(figure).startswith(PNG_SIGNATURE)
    with pytest.raises(ExplorationError, match=r"not among the features.*'missing'"):
        plot_feature_boxplots(table, outcome, columns=["missing"])


def test_roc_figure(toy: tuple[pd.DataFrame, np.ndarray]) -> None:
    table, outcome = toy
    figure = plot_roc_curves(table, outcome, top_k=3)
    assert len(figure.axes) == 1
    lines = figure.axes[0].get_lines()
    assert len(lines) == 4  # three features + chance
    aucs = univariate_auc(table, outcome).sort_values("auc_max", ascending=False)
    for line, (name, row) in zip(lines[:3], aucs.head(3).iterrows(), strict=True):
        fpr, tpr = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        assert np.trapezoid(tpr, fpr) == pytest.approx(row["auc_max"], rel=1e-12)
        assert str(name) in str(line.get_label())
    assert figure_to_png_bytes(figure).startswith(PNG_SIGNATURE)


def test_volume_bar_figure_and_svg(toy: tuple[pd.DataFrame, np.ndarray]) -> None:
    table, _ = toy
    figure = plot_volume_correlation(table, volume_column="volume", threshold=0.8)
    axes = figure.axes[0]
    bars = [patch for patch in axes.patches if isinstance(patch, Rectangle)]
    assert len(figure.axes) == 1 and len(bars) == 4
    heights = [bar.get_width() for bar in bars]
    assert heights == sorted(heights, reverse=True) and heights[0] == pytest.approx(1.0)
    assert [label.get_text() for label in axes.get_yticklabels()][:2] == ["volume", "energy"]
    assert len(axes.get_lines()) == 1  # the threshold line
    svg = figure_to_svg(figure)
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    again = plot_volume_correlation(table, volume_column="volume", threshold=0.8)
    assert svg == figure_to_svg(again)  # deterministic text for reports
    assert len(plot_volume_correlation(table, volume_column="volume", top=2).axes[0].patches) == 2


def test_import_has_no_side_effects_and_plots_avoid_pyplot() -> None:
    code = (
        "import sys\n"
        "import cohort.analysis.explore as e\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported at import time'\n"
        "import pandas as pd\n"
        "t = pd.DataFrame({'a': [1.0, 2.0, 3.0, 5.0], 'b': [2.0, 1.0, 4.0, 3.0]})\n"
        "e.figure_to_png_bytes(e.plot_correlation_heatmap(t))\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


# ----------------------------------------------------------------------------- Lung1 (real data)


@pytest.fixture(scope="module")
def lung1(data_dir: Path) -> tuple[pd.DataFrame, pd.Series]:
    """The ``original_*`` Lung1 features (one row per patient) and "died within 2 years".

    The feature table has 145 rows for 144 patients: LUNG1-002 is listed twice under
    two series labels with identical features, so its first row is kept.

    Outcome (over all 422 clinical patients, matched to the features by PatientID):
    1 = died within two years (``Survival.time <= 730`` days and ``deadstatus.event
    == 1``), 0 = alive beyond two years (``Survival.time > 730``, event or not);
    a patient censored at or before 730 days has an unknown 2-year status and gets
    NaN, so the analyses drop (and report) them. None of the 144 patients with
    features is in that case in this release.
    """
    folder = data_dir / "nsclc-radiomics"
    raw = pd.read_csv(folder / "lung1-features-pyradiomics-2.2.0.csv.gz")
    assert len(raw) == 145
    columns = [column for column in raw.columns if column.startswith("original_")]
    duplicated = raw[raw["PatientID"].duplicated(keep=False)]
    assert set(duplicated["PatientID"]) == {"LUNG1-002"}
    assert (duplicated[columns].nunique() == 1).all()
    features = raw.drop_duplicates("PatientID").set_index("PatientID")[columns]
    clinical = pd.read_csv(folder / "lung1-clinical.csv").set_index("PatientID")
    days, event = clinical["Survival.time"], clinical["deadstatus.event"]
    died = pd.Series(np.nan, index=clinical.index)
    died[(days <= TWO_YEARS) & (event == 1)] = 1.0
    died[days > TWO_YEARS] = 0.0
    return features, died


def _lung1_aligned(lung1: tuple[pd.DataFrame, pd.Series]) -> tuple[pd.DataFrame, np.ndarray]:
    features, died = lung1
    y = died.reindex(features.index)
    keep = y.notna().to_numpy()
    return features[keep], y[keep].to_numpy(dtype=int)


def test_lung1_shape_and_summary(lung1: tuple[pd.DataFrame, pd.Series]) -> None:
    features, _ = lung1
    assert features.shape == (144, 100)
    stats = summary_statistics(features)
    assert stats.shape == (100, 11) and (stats["n"] == 144).all() and (stats["missing"] == 0).all()
    for name in ["original_shape_VoxelVolume", "original_firstorder_Energy", "original_glcm_Idm"]:
        x = features[name].to_numpy(dtype=float)
        row = stats.loc[name]
        assert row["mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert row["sd"] == pytest.approx(x.std(ddof=1), rel=1e-12)
        assert (row["min"], row["max"]) == (x.min(), x.max())
        q1, median, q3 = np.percentile(x, [25, 50, 75])
        assert (row["q1"], row["median"], row["q3"]) == pytest.approx((q1, median, q3), rel=1e-12)
        assert row["skewness"] == pytest.approx(skew(x, bias=False), rel=1e-9)
        assert row["cv"] == pytest.approx(x.std(ddof=1) / abs(x.mean()), rel=1e-12)
    # Tumour volumes are right-skewed: mean above median, positive skewness.
    volume = stats.loc["original_shape_VoxelVolume"]
    assert volume["mean"] > volume["median"] and volume["skewness"] > 1


def test_lung1_spearman_against_scipy(lung1: tuple[pd.DataFrame, pd.Series]) -> None:
    features, _ = lung1
    rho = spearman_matrix(features)
    direct = spearmanr(features.to_numpy(dtype=float)).statistic
    np.testing.assert_allclose(rho.to_numpy(), direct, rtol=0, atol=1e-12)
    energy_volume = spearmanr(features["original_firstorder_Energy"], features["original_shape_VoxelVolume"])
    assert rho.loc["original_firstorder_Energy", "original_shape_VoxelVolume"] == pytest.approx(
        energy_volume.statistic, rel=1e-12
    )
    pairs = correlated_pairs(features, threshold=0.95)
    upper = direct[np.triu_indices(100, k=1)]
    assert len(pairs) == int((np.abs(upper) >= 0.95).sum())
    found = set(zip(pairs["feature_a"], pairs["feature_b"], strict=True))
    assert ("original_shape_MeshVolume", "original_shape_VoxelVolume") in found


def test_lung1_mann_whitney_against_scipy(lung1: tuple[pd.DataFrame, pd.Series]) -> None:
    features, died = lung1
    x, y = _lung1_aligned(lung1)
    tests = mann_whitney(features, died)
    assert tests.attrs["m"] == 100 and tests.attrs["groups"] == (0.0, 1.0)
    assert tests.attrs["dropped_rows"] == []
    assert (tests["n_a"] == (y == 0).sum()).all() and (tests["n_b"] == (y == 1).sum()).all()
    for name in ["original_shape_VoxelVolume", "original_firstorder_Energy", "original_glcm_Idm"]:
        direct = mannwhitneyu(x.loc[y == 0, name], x.loc[y == 1, name], alternative="two-sided")
        assert tests.loc[name, "u"] == direct.statistic
        assert tests.loc[name, "p"] == pytest.approx(direct.pvalue, rel=1e-12)
        assert tests.loc[name, "p_bonferroni"] == pytest.approx(min(1.0, 100 * direct.pvalue), rel=1e-12)
        assert tests.loc[name, "significant"] == (min(1.0, 100 * direct.pvalue) <= 0.05)
    np.testing.assert_allclose(tests["p_bonferroni"], np.minimum(1.0, 100 * tests["p"]), rtol=1e-15)


def test_lung1_auc_against_sklearn(lung1: tuple[pd.DataFrame, pd.Series]) -> None:
    features, died = lung1
    x, y = _lung1_aligned(lung1)
    aucs = univariate_auc(features, died)
    assert aucs.attrs["positive"] == 1.0 and (aucs["n"] == len(y)).all()
    for name in ["original_shape_VoxelVolume", "original_firstorder_Energy", "original_glcm_Idm"]:
        direct = roc_auc_score(y, x[name])
        assert aucs.loc[name, "auc"] == pytest.approx(direct, rel=1e-12)
        assert aucs.loc[name, "auc_max"] == pytest.approx(max(direct, 1 - direct), rel=1e-12)
    assert (aucs["auc_max"] >= 0.5).all()
    # Larger tumours die sooner: volume ranks positives higher.
    assert aucs.loc["original_shape_VoxelVolume", "direction"] == "higher"
    top = aucs.sort_values("auc_max", ascending=False).head(5)
    print("\nLung1 2-year death, top 5 original_* features by max(AUC, 1-AUC):")
    print(top[["auc", "auc_max", "direction"]].to_string(float_format=lambda v: f"{v:.4f}"))


def test_lung1_volume_surrogates(lung1: tuple[pd.DataFrame, pd.Series]) -> None:
    features, _ = lung1
    surrogates = volume_surrogates(features)
    assert surrogates.loc["original_shape_VoxelVolume", "rho"] == pytest.approx(1.0, abs=1e-12)
    assert surrogates.loc["original_shape_MeshVolume", "rho"] > 0.99
    assert surrogates.loc[["original_shape_VoxelVolume", "original_shape_MeshVolume"], "surrogate"].all()
    volume = features["original_shape_VoxelVolume"]
    for name in ["original_firstorder_Energy", "original_shape_Sphericity", "original_glcm_Idm"]:
        direct = spearmanr(features[name], volume).statistic
        assert surrogates.loc[name, "rho"] == pytest.approx(direct, rel=1e-12)
        assert surrogates.loc[name, "surrogate"] == (abs(direct) >= 0.8)
    assert (surrogates["n"] == 144).all()
    figure = plot_volume_correlation(features, top=None)
    assert len(figure.axes[0].patches) == 100
    assert figure_to_png_bytes(figure).startswith(PNG_SIGNATURE)
