from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cohort.analysis.stability import concordance_correlation, feature_icc, icc, stable_features

#: Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges.
SHROUT_FLEISS = np.array(
    [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
)


@pytest.mark.parametrize("form, published", [("ICC(1,1)", 0.17), ("ICC(2,1)", 0.29), ("ICC(3,1)", 0.71)])
def test_icc_reproduces_shrout_and_fleiss(form: str, published: float) -> None:
    assert icc(SHROUT_FLEISS, form) == pytest.approx(published, abs=0.005)  # type: ignore[arg-type]


def test_icc_from_mean_squares_by_hand() -> None:
    # BMS = 11.24, WMS = 6.26, JMS = 32.49, EMS = 1.02 (Shrout & Fleiss, Table 3); n = 6, k = 4.
    bms, wms, jms, ems, n, k = 11.2417, 6.2639, 32.4861, 1.0194, 6, 4
    assert icc(SHROUT_FLEISS, "ICC(1,1)") == pytest.approx((bms - wms) / (bms + (k - 1) * wms), abs=1e-4)
    assert icc(SHROUT_FLEISS, "ICC(2,1)") == pytest.approx(
        (bms - ems) / (bms + (k - 1) * ems + k * (jms - ems) / n), abs=1e-4
    )
    assert icc(SHROUT_FLEISS, "ICC(3,1)") == pytest.approx((bms - ems) / (bms + (k - 1) * ems), abs=1e-4)


def test_perfect_agreement_is_one_and_bad_input_is_refused() -> None:
    x = np.arange(10.0)
    assert icc(np.column_stack([x, x, x]), "ICC(2,1)") == pytest.approx(1.0)
    assert concordance_correlation(x, x) == pytest.approx(1.0)
    assert concordance_correlation(x, x + 1) < 1.0
    with pytest.raises(ValueError, match="NaN"):
        icc(np.array([[1.0, np.nan], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="at least 2 subjects"):
        icc(np.array([[1.0, 2.0]]))


def test_lin_ccc_matches_its_definition() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=200)
    y = 0.8 * x + rng.normal(0.2, 0.3, size=200)
    sxy = np.mean((x - x.mean()) * (y - y.mean()))
    expected = 2 * sxy / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)
    assert concordance_correlation(x, y) == pytest.approx(expected, rel=1e-12)


def test_feature_icc_and_filter_on_a_long_table() -> None:
    rng = np.random.default_rng(0)
    subjects = np.repeat(np.arange(30), 4)
    raters = np.tile(["none", "erode", "dilate", "noise"], 30)
    truth = rng.normal(size=30)[subjects]
    table = pd.DataFrame(
        {
            "case": subjects,
            "perturbation": raters,
            "stable": truth + rng.normal(0, 0.05, size=120),
            "noisy": rng.normal(size=120),
        }
    )
    result = feature_icc(table, subject=["case"], rater="perturbation", features=["stable", "noisy"])
    by_feature = result.set_index("feature")
    assert by_feature.loc["stable", "icc"] > 0.95 and by_feature.loc["noisy", "icc"] < 0.3
    assert by_feature.loc["stable", "n_subjects"] == 30 and by_feature.loc["stable", "n_raters"] == 4
    assert stable_features(result, 0.9) == ["stable"]
