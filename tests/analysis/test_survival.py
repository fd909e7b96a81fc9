"""Survival analysis: published rossi numbers, real Lung1 outcomes, sign conventions, frozen cut-offs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.datasets import load_rossi
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw
from sksurv.util import Surv

from cohort.analysis.survival import (
    DAYS_PER_UNIT,
    EmptyGroupError,
    RiskModel,
    SurvivalDataError,
    SurvivalModelError,
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
from cohort.errors import CohortError

# ----------------------------------------------------------------------------- rossi (published numbers)

#: Rossi et al. recidivism data, Cox on all covariates (lifelines docs; Fox & Weisberg, R `survival`).
ROSSI_COEF = {
    "fin": -0.379,
    "age": -0.057,
    "race": 0.314,
    "wexp": -0.150,
    "mar": -0.434,
    "paro": -0.085,
    "prio": 0.091,
}


@pytest.fixture(scope="module")
def rossi() -> pd.DataFrame:
    return load_rossi()


def test_rossi_cox_reproduces_published_numbers(rossi: pd.DataFrame) -> None:
    result = fit_cox(rossi["week"], rossi["arrest"], rossi.drop(columns=["week", "arrest"]))
    table = result.table.set_index("covariate")
    assert list(table.index) == list(ROSSI_COEF)
    for name, coef in ROSSI_COEF.items():
        assert table.loc[name, "coef"] == pytest.approx(coef, abs=5e-4), name
    assert np.allclose(table["hr"], np.exp(table["coef"]))
    assert (table["hr_lower"] < table["hr"]).all() and (table["hr"] < table["hr_upper"]).all()
    assert table.loc["prio", "p_value"] < 0.01 < table.loc["race", "p_value"]
    assert result.log_likelihood == pytest.approx(-658.748, abs=5e-4)
    assert result.concordance == pytest.approx(0.6403, abs=5e-5)
    assert (result.n, result.events) == (432, 114)
    # Harrell's C through sksurv on the linear predictor (higher = riskier) is the same number.
    pi = result.fitter.predict_log_partial_hazard(rossi)
    assert harrell_c(rossi["week"], rossi["arrest"], pi) == pytest.approx(0.6403, abs=5e-5)


def test_rossi_logrank_on_financial_aid(rossi: pd.DataFrame) -> None:
    by_group = logrank(rossi["week"], rossi["arrest"], rossi["fin"])
    assert by_group.p_value == pytest.approx(0.0501, abs=5e-5)
    assert by_group.groups == ("0", "1")
    assert by_group.sizes == (216, 216)
    assert by_group.cutoff is None
    # fin is 0/1 with median 0.5: the median split gives the same two groups, in "low", "high" order.
    by_cut = logrank_at_cutoff(rossi["week"], rossi["arrest"], rossi["fin"])
    assert by_cut.cutoff == 0.5
    assert by_cut.groups == ("low", "high")
    assert by_cut.statistic == pytest.approx(by_group.statistic, rel=1e-12)
    assert by_cut.events == by_group.events == (66, 48)


def test_standardised_cox_is_per_sd_and_keeps_the_linear_predictor(rossi: pd.DataFrame) -> None:
    x = rossi[["age", "prio"]]
    raw = fit_cox(rossi["week"], rossi["arrest"], x)
    std = fit_cox(rossi["week"], rossi["arrest"], x, standardise=True)
    sd = x.std(ddof=1).to_numpy()
    assert np.allclose(std.table["coef"], raw.table["coef"] * sd, rtol=1e-6)
    assert np.allclose(std.table["p_value"], raw.table["p_value"], rtol=1e-6)
    assert std.log_likelihood == pytest.approx(raw.log_likelihood, rel=1e-9)
    assert std.centre == pytest.approx(tuple(x.mean())) and std.scale == pytest.approx(tuple(sd))
    m_raw = RiskModel.fit(rossi["week"], rossi["arrest"], x)
    m_std = RiskModel.fit(rossi["week"], rossi["arrest"], x, standardise=True)
    assert np.allclose(m_raw.prognostic_index(x), m_std.prognostic_index(x), atol=1e-6)
    # The prognostic index is lifelines' (centred) log partial hazard.
    assert np.allclose(m_raw.prognostic_index(x), m_raw.cox.fitter.predict_log_partial_hazard(x), atol=1e-10)


def test_univariate_cox_is_one_model_per_covariate(rossi: pd.DataFrame) -> None:
    table = univariate_cox(rossi["week"], rossi["arrest"], rossi[["age", "prio"]])
    assert list(table["covariate"]) == ["age", "prio"]
    for _, row in table.iterrows():
        direct = CoxPHFitter().fit(rossi[["week", "arrest", row["covariate"]]], "week", "arrest")
        assert row["coef"] == pytest.approx(direct.params_.iloc[0], rel=1e-10)
        assert row["log_likelihood"] == pytest.approx(direct.log_likelihood_, rel=1e-10)
        assert row["concordance"] == pytest.approx(direct.concordance_index_, rel=1e-10)


def test_uno_c_needs_tau_when_censoring_survival_reaches_zero(rossi: pd.DataFrame) -> None:
    # Everyone still at risk is censored at week 52, where events also happen: G(52) = 0.
    pi = fit_cox(rossi["week"], rossi["arrest"], rossi[["prio"]]).fitter.predict_log_partial_hazard(rossi)
    with pytest.raises(SurvivalModelError, match="tau"):
        uno_c(rossi["week"], rossi["arrest"], pi)
    y = Surv.from_arrays(rossi["arrest"].astype(bool), rossi["week"].astype(float))
    direct = concordance_index_ipcw(y, y, pi.to_numpy(), tau=52)[0]
    assert uno_c(rossi["week"], rossi["arrest"], pi, tau=52) == pytest.approx(direct, rel=1e-12)


# ----------------------------------------------------------------------------- Lung1 (real outcomes)


@pytest.fixture(scope="module")
def lung1(data_dir: Path) -> pd.DataFrame:
    """Lung1 clinical outcomes joined with the GTV volume, one row per patient.

    The feature table has one row per GTV mask (145 rows, 144 patients). A patient
    with several rows keeps the largest GTV (primary tumour); in this release the
    only duplicate, LUNG1-002, is the same GTV-1 listed under two series labels with
    identical features, so the choice does not change any number below.
    """
    folder = data_dir / "nsclc-radiomics"
    clinical = pd.read_csv(folder / "lung1-clinical.csv")
    features = pd.read_csv(
        folder / "lung1-features-pyradiomics-2.2.0.csv.gz",
        usecols=["PatientID", "Patient", "original_shape_VoxelVolume"],
    )
    assert len(features) == 145
    duplicated = features[features["PatientID"].duplicated(keep=False)]
    assert set(duplicated["PatientID"]) == {"LUNG1-002"}
    assert duplicated["original_shape_VoxelVolume"].nunique() == 1
    largest = features.sort_values("original_shape_VoxelVolume", ascending=False, kind="stable")
    largest = largest.drop_duplicates("PatientID").sort_values("PatientID")
    cohort = largest.merge(clinical, on="PatientID", how="inner", validate="one_to_one")
    assert len(cohort) == 144 and cohort["Survival.time"].notna().all()
    return pd.DataFrame(
        {
            "patient": cohort["PatientID"].to_numpy(),
            "days": cohort["Survival.time"].to_numpy(dtype=np.float64),
            "event": cohort["deadstatus.event"].to_numpy(dtype=np.int64),
            "volume": cohort["original_shape_VoxelVolume"].to_numpy(dtype=np.float64),
        }
    )


def test_lung1_km_and_logrank_at_median_volume(lung1: pd.DataFrame) -> None:
    t, e, v = lung1["days"].to_numpy(), lung1["event"].to_numpy(), lung1["volume"].to_numpy()
    labels, cut = split_at_cutoff(v)
    assert cut == np.median(v)
    km = kaplan_meier(t, e, labels)
    assert sorted(km["group"].unique()) == ["high", "low"]
    high = v > cut
    for name, rows in (("high", high), ("low", ~high)):
        curve = km[km["group"] == name]
        direct = KaplanMeierFitter().fit(t[rows], e[rows])
        assert np.array_equal(curve["time"], direct.survival_function_.index.to_numpy())
        assert np.allclose(curve["survival"], direct.survival_function_.iloc[:, 0], rtol=0, atol=1e-12)
        assert np.allclose(curve["lower"], direct.confidence_interval_.iloc[:, 0], rtol=0, atol=1e-12)
        assert np.allclose(curve["upper"], direct.confidence_interval_.iloc[:, 1], rtol=0, atol=1e-12)
        assert curve["at_risk"].iloc[0] == rows.sum()
        assert ((curve["lower"] <= curve["survival"]) & (curve["survival"] <= curve["upper"])).all()
    result = logrank_at_cutoff(t, e, v)
    direct_lr = logrank_test(t[~high], t[high], e[~high], e[high])
    assert result.statistic == pytest.approx(direct_lr.test_statistic, rel=1e-12)
    assert result.p_value == pytest.approx(direct_lr.p_value, rel=1e-12)
    assert result.sizes == (int((~high).sum()), int(high.sum()))
    # Larger tumours die sooner: the "high" curve lies below the "low" one at 2 years.
    at_2y = {
        name: km[(km["group"] == name) & (km["time"] <= 2 * DAYS_PER_UNIT["years"])]["survival"].iloc[-1]
        for name in ("low", "high")
    }
    assert at_2y["high"] < at_2y["low"]
    print(
        f"\nLung1 n={len(t)} events={int(e.sum())} median volume={cut:.1f} mm3; "
        f"log-rank low {result.sizes[0]} ({result.events[0]} deaths) vs high {result.sizes[1]} "
        f"({result.events[1]} deaths): chi2={result.statistic:.3f} p={result.p_value:.4f}; "
        f"2-year OS low={at_2y['low']:.3f} high={at_2y['high']:.3f}"
    )


def test_lung1_cox_and_c_index_on_log_volume(lung1: pd.DataFrame) -> None:
    t, e = lung1["days"].to_numpy(), lung1["event"].to_numpy()
    log_volume = np.log(lung1["volume"].to_numpy())
    result = fit_cox(t, e, pd.DataFrame({"log_volume": log_volume}))
    row = result.table.iloc[0]
    direct = CoxPHFitter().fit(pd.DataFrame({"t": t, "e": e, "log_volume": log_volume}), "t", "e")
    summary = direct.summary.loc["log_volume"]
    assert row["coef"] == pytest.approx(summary["coef"], rel=1e-10)
    assert row["hr"] == pytest.approx(summary["exp(coef)"], rel=1e-10)
    assert row["hr_lower"] == pytest.approx(summary["exp(coef) lower 95%"], rel=1e-10)
    assert row["hr_upper"] == pytest.approx(summary["exp(coef) upper 95%"], rel=1e-10)
    assert row["p_value"] == pytest.approx(summary["p"], rel=1e-8)
    assert result.log_likelihood == pytest.approx(direct.log_likelihood_, rel=1e-12)
    assert row["hr"] > 1 and row["p_value"] < 0.05

    # The Cox partial likelihood depends on the order of the times only: the time unit does not matter.
    in_years = fit_cox(convert_time(t, "days", "years"), e, pd.DataFrame({"log_volume": log_volume}))
    assert in_years.table["coef"].iloc[0] == pytest.approx(row["coef"], rel=1e-8)

    c_harrell = harrell_c(t, e, log_volume)
    direct_c = concordance_index_censored(e.astype(bool), t, log_volume)[0]
    assert c_harrell == pytest.approx(direct_c, rel=1e-12)
    # lifelines wants predicted survival times: the same C with the score negated.
    assert c_harrell == pytest.approx(concordance_index(t, -log_volume, e), rel=1e-12)
    assert c_harrell == pytest.approx(result.concordance, rel=1e-12)
    assert c_harrell > 0.5
    y = Surv.from_arrays(e.astype(bool), t)
    c_uno = uno_c(t, e, log_volume)
    assert c_uno == pytest.approx(concordance_index_ipcw(y, y, log_volume)[0], rel=1e-12)
    five_years = 5 * DAYS_PER_UNIT["years"]
    c_uno_5y = uno_c(t, e, log_volume, tau=five_years)
    assert c_uno_5y == pytest.approx(concordance_index_ipcw(y, y, log_volume, tau=five_years)[0], rel=1e-12)
    print(
        f"\nLung1 Cox log(volume): n={result.n} events={result.events} HR={row['hr']:.3f} "
        f"[{row['hr_lower']:.3f}, {row['hr_upper']:.3f}] p={row['p_value']:.4g} "
        f"logL={result.log_likelihood:.3f}; Harrell C={c_harrell:.4f}; Uno C={c_uno:.4f} "
        f"(tau 5 y: {c_uno_5y:.4f})"
    )


# ----------------------------------------------------------------------------- sign convention


def test_c_index_sign_convention() -> None:
    rng = np.random.default_rng(11)
    t = rng.exponential(100.0, size=60)
    e = np.ones(60, dtype=int)
    # A risk score of -time ranks every uncensored pair correctly.
    assert harrell_c(t, e, -t) == pytest.approx(1.0)
    assert uno_c(t, e, -t) == pytest.approx(1.0)
    assert harrell_c(t, e, t) == pytest.approx(0.0)
    # The same ranking given as predicted survival times: lifelines and direction="survival" agree.
    assert concordance_index(t, t, e) == pytest.approx(1.0)
    assert harrell_c(t, e, t, direction="survival") == pytest.approx(1.0)
    # With censoring and a noisy score, the two libraries agree once the sign is handled.
    e = rng.random(60) < 0.7
    risk = -np.log(t) + rng.normal(0, 1.0, size=60)
    ours = harrell_c(t, e, risk)
    assert 0.5 < ours < 1.0
    assert ours == pytest.approx(concordance_index(t, -risk, e), rel=1e-12)
    assert ours == pytest.approx(harrell_c(t, e, -risk, direction="survival"), rel=1e-12)
    assert concordance_index(t, risk, e) == pytest.approx(1 - ours, rel=1e-12)
    with pytest.raises(SurvivalDataError, match="direction"):
        harrell_c(t, e, risk, direction="hazard")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- risk groups


def _simulated(rng: np.random.Generator, x: np.ndarray, beta: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    event_time = rng.exponential(365.0 / np.exp(beta * x))
    censor_time = rng.uniform(100.0, 1500.0, size=x.size)
    return np.minimum(event_time, censor_time), (event_time <= censor_time).astype(int)


def test_risk_cut_off_is_learned_on_training_and_applied_unchanged() -> None:
    rng = np.random.default_rng(5)
    x_train = rng.normal(size=200)
    t_train, e_train = _simulated(rng, x_train)
    train = pd.DataFrame({"marker": x_train})
    model = RiskModel.fit(t_train, e_train, train)
    pi_train = model.prognostic_index(train)
    assert model.cutoff == pytest.approx(float(np.median(pi_train)), abs=1e-12)
    assert model.coefficients[0] == pytest.approx(0.8, abs=0.25)

    # Validation rows shifted upwards: their own median PI is far from the training cut-off.
    validation = pd.DataFrame({"marker": rng.normal(size=100) + 1.5}, index=np.arange(1000, 1100))
    applied = model.apply(validation)
    pi_val = applied["pi"].to_numpy()
    assert np.median(pi_val) > model.cutoff + 0.5
    assert list(applied.index) == list(validation.index)
    assert (applied["risk_group"] == np.where(pi_val > model.cutoff, "high", "low")).all()
    assert (applied["risk_group"] != np.where(pi_val > np.median(pi_val), "high", "low")).any()
    assert (applied["risk_group"] == "high").mean() > 0.8
    frozen = model.cutoff
    model.apply(validation)
    assert model.cutoff == frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.cutoff = 0.0  # type: ignore[misc]

    # A fixed cut-off is kept as given; another quantile moves it on training rows only.
    assert RiskModel.fit(t_train, e_train, train, cutoff=0.25).cutoff == 0.25
    q75 = RiskModel.fit(t_train, e_train, train, quantile=0.75)
    assert q75.cutoff == pytest.approx(float(np.quantile(pi_train, 0.75)), abs=1e-12)
    # Training groups separate in the right direction (high risk dies sooner).
    groups = model.apply(train)["risk_group"]
    assert logrank(t_train, e_train, groups).p_value < 0.01
    with pytest.raises(SurvivalDataError, match="missing from the table"):
        model.apply(pd.DataFrame({"other": [1.0]}))


# ----------------------------------------------------------------------------- units, horizon, KM by hand


def test_time_unit_conversion() -> None:
    assert DAYS_PER_UNIT["years"] == 365.25
    assert DAYS_PER_UNIT["months"] == 30.4375
    assert convert_time([365.25, 730.5], "days", "years") == pytest.approx([1.0, 2.0])
    assert convert_time([30.4375], "days", "months") == pytest.approx([1.0])
    assert convert_time([14.0], "days", "weeks") == pytest.approx([2.0])
    assert convert_time([1.0], "years", "months") == pytest.approx([12.0])
    assert convert_time([1.0], "years", "weeks") == pytest.approx([365.25 / 7])
    assert convert_time(pd.Series([6.0]), "months", "days") == pytest.approx([182.625])
    days = np.array([0.0, 1.0, 400.0])
    assert np.allclose(convert_time(convert_time(days, "days", "months"), "months", "days"), days)
    with pytest.raises(SurvivalDataError, match="unknown time unit"):
        convert_time([1.0], "days", "fortnights")  # type: ignore[arg-type]


def test_administrative_censoring_at_a_horizon() -> None:
    time = np.array([1.0, 5.0, 10.0, 12.0, 30.0])
    event = np.array([1, 1, 1, 1, 0])
    t, e = censor_at(time, event, 10.0)
    assert t.tolist() == [1.0, 5.0, 10.0, 10.0, 10.0]
    assert e.tolist() == [True, True, True, False, False]  # the event at exactly 10 stays an event
    t, e = censor_at(time, event, 4.0)
    assert t.tolist() == [1.0, 4.0, 4.0, 4.0, 4.0]
    assert e.tolist() == [True, False, False, False, False]
    assert time.tolist() == [1.0, 5.0, 10.0, 12.0, 30.0]  # inputs untouched
    # Horizon in another unit: convert first (5 years of follow-up on day times).
    t, e = censor_at([100.0, 2000.0], [1, 1], 5 * DAYS_PER_UNIT["years"])
    assert t.tolist() == [100.0, 1826.25] and e.tolist() == [True, False]
    with pytest.raises(SurvivalDataError, match="horizon"):
        censor_at(time, event, 0.0)


def test_kaplan_meier_by_hand() -> None:
    km = kaplan_meier([1.0, 2.0, 3.0, 4.0], [1, 1, 0, 1])
    assert km["group"].unique().tolist() == ["all"]
    assert km["time"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert km["survival"].tolist() == pytest.approx([1.0, 0.75, 0.5, 0.5, 0.0])
    assert km["at_risk"].tolist() == [4, 4, 3, 2, 1]
    grouped = kaplan_meier([1.0, 2.0, 3.0, 4.0], [1, 0, 0, 0], ["a", "a", "b", "b"])
    assert grouped["group"].tolist() == ["a", "a", "a", "b", "b", "b"]
    assert grouped[grouped["group"] == "b"]["survival"].tolist() == [1.0, 1.0, 1.0]  # no events: allowed


# ----------------------------------------------------------------------------- explicit errors


def test_explicit_errors() -> None:
    t, e = [1.0, 2.0, 3.0, 4.0], [1, 0, 1, 0]
    with pytest.raises(SurvivalDataError, match="2 missing times") as info:
        harrell_c([1.0, np.nan, np.nan, 4.0], e, [1, 2, 3, 4], subject="LUNG1")
    assert isinstance(info.value, CohortError) and info.value.subject == "LUNG1"
    with pytest.raises(SurvivalDataError, match="missing event"):
        logrank(t, pd.Series([1, None, 1, 0], dtype="Float64"), ["a", "a", "b", "b"])
    with pytest.raises(SurvivalDataError, match="negative times"):
        kaplan_meier([1.0, -2.0], [1, 1])
    with pytest.raises(SurvivalDataError, match="0/1"):
        kaplan_meier([1.0, 2.0], [1, 2])
    with pytest.raises(SurvivalDataError, match="no events"):
        fit_cox(t, [0, 0, 0, 0], pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0]}))
    with pytest.raises(SurvivalDataError, match="no events"):
        logrank(t, [0, 0, 0, 0], ["a", "a", "b", "b"])
    with pytest.raises(SurvivalDataError, match="4 times but 3 events"):
        harrell_c(t, [1, 0, 1], [1, 2, 3, 4])
    with pytest.raises(SurvivalDataError, match="missing or infinite scores"):
        harrell_c(t, e, [1.0, np.nan, 3.0, 4.0])
    with pytest.raises(SurvivalDataError, match="missing or infinite covariate"):
        fit_cox(t, e, pd.DataFrame({"x": [1.0, np.nan, 3.0, 4.0]}))
    with pytest.raises(SurvivalDataError, match="not numeric"):
        fit_cox(t, e, pd.DataFrame({"x": ["a", "b", "c", "d"]}))
    with pytest.raises(SurvivalDataError, match="constant"):
        fit_cox(t, e, pd.DataFrame({"x": [1.0, 1.0, 1.0, 1.0]}), standardise=True)
    # Empty groups: a cut-off above every value, a binary marker whose median is its top value.
    with pytest.raises(EmptyGroupError, match="'high' is empty"):
        logrank_at_cutoff(t, e, [1.0, 2.0, 3.0, 4.0], cutoff=10.0)
    with pytest.raises(EmptyGroupError, match="'high' is empty"):
        split_at_cutoff([0, 1, 1, 1])
    with pytest.raises(EmptyGroupError, match="two groups"):
        logrank(t, e, ["a", "a", "a", "a"])
    with pytest.raises(SurvivalDataError, match="exactly two groups"):
        logrank(t, e, ["a", "b", "c", "c"])
    with pytest.raises(SurvivalDataError, match="missing group labels"):
        kaplan_meier(t, e, ["a", None, "b", "b"])
