from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cohort.analysis.combat import CombatError, CombatModel, Method, fit_combat, harmonise_combat
from cohort.errors import CohortError, Stage

# ---------------------------------------------------------------- the R reference set (ComBatHarmonization)

#: testdata_combat_{parametric|nonparametric}_{adjusted|unadjusted}[_noeb][_meanonly][_batchref]_r.csv
REFERENCE_FILES = [
    "_".join(["testdata_combat", method, adjusted, *flags, "r"]) + ".csv"
    for method, adjusted in itertools.product(("parametric", "nonparametric"), ("adjusted", "unadjusted"))
    for flags in (
        [f for f, keep in zip(("noeb", "meanonly", "batchref"), mask, strict=True) if keep]
        for mask in itertools.product((False, True), repeat=3)
    )
]
#: A misspelt copy (identical content) that ships with the reference set.
REFERENCE_FILES.append("testdata_combat_nonparametric_unadjusted_meanonl_batchref_r.csv")
BATCH = [1, 1, 1, 1, 1, 2, 2, 2, 2, 2]
PHENO = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]


def settings_from_name(name: str) -> dict[str, Any]:
    """fit_combat keyword arguments for one reference file name."""
    tokens = name.removesuffix(".csv").split("_")
    assert tokens[:2] == ["testdata", "combat"] and tokens[-1] == "r", name
    method, adjusted, *flags = tokens[2:-1]
    assert method in ("parametric", "nonparametric") and adjusted in ("adjusted", "unadjusted"), name
    assert set(flags) <= {"noeb", "meanonly", "meanonl", "batchref"}, name
    kwargs: dict[str, Any] = {
        # R ignores `parametric` without EB: the noeb files are identical for both methods.
        "method": "none" if "noeb" in flags else method,
        "mean_only": "meanonly" in flags or "meanonl" in flags,
        "reference_batch": 1 if "batchref" in flags else None,
    }
    if adjusted == "adjusted":
        kwargs["categorical"] = ["pheno"]
    return kwargs


@pytest.fixture(scope="module")
def combat_dir(data_dir: Path) -> Path:
    path = data_dir / "combat"
    if not (path / "testdata.csv").exists():
        pytest.skip(f"ComBat reference set not found at {path}")
    return path


@pytest.fixture(scope="module")
def testdata(combat_dir: Path) -> tuple[pd.DataFrame, pd.Series, pd.DataFrame]:
    """The 10 samples × 200 features test matrix, its batches and the `pheno` covariate."""
    raw = pd.read_csv(combat_dir / "testdata.csv")  # features × samples (V1..V10)
    data = raw.T
    data.columns = [f"feature{i + 1:03d}" for i in range(raw.shape[0])]
    batch = pd.Series(BATCH, index=data.index, name="batch")
    covariates = pd.DataFrame({"pheno": PHENO}, index=data.index)
    return data, batch, covariates


def _kwargs(name: str, covariates: pd.DataFrame) -> dict[str, Any]:
    """Settings of a reference file, with the covariates table when the design uses it."""
    kwargs = settings_from_name(name)
    return {**kwargs, "covariates": covariates} if "categorical" in kwargs else kwargs


def test_every_reference_file_is_tested(combat_dir: Path) -> None:
    present = sorted(p.name for p in (combat_dir / "outputData").glob("*.csv"))
    assert len(present) == len(REFERENCE_FILES) == 33
    assert present == sorted(REFERENCE_FILES)
    for name in present:
        settings_from_name(name)


@pytest.mark.parametrize("name", REFERENCE_FILES)
def test_reproduces_r_output(name: str, combat_dir: Path, testdata: Any) -> None:
    data, batch, covariates = testdata
    expected = pd.read_csv(combat_dir / "outputData" / name).T.to_numpy()
    out = harmonise_combat(data, batch, **_kwargs(name, covariates))
    assert out.shape == data.shape and out.index.equals(data.index) and out.columns.equals(data.columns)
    assert out.dtypes.eq(np.float64).all()
    assert np.abs(out.to_numpy() - expected).max() < 1e-10
    if settings_from_name(name)["reference_batch"] is not None:
        assert np.array_equal(out.to_numpy()[:5], data.to_numpy()[:5])  # reference batch bit for bit
        assert not np.allclose(out.to_numpy()[5:], data.to_numpy()[5:])


def test_binary_covariate_as_continuous_gives_the_same_result(testdata: Any) -> None:
    data, batch, covariates = testdata
    as_factor = harmonise_combat(data, batch, covariates=covariates, categorical=["pheno"])
    as_number = harmonise_combat(data, batch, covariates=covariates, continuous=["pheno"])
    assert np.abs(as_factor.to_numpy() - as_number.to_numpy()).max() < 1e-12


@pytest.mark.parametrize(
    "name",
    [
        "testdata_combat_parametric_adjusted_r.csv",
        "testdata_combat_nonparametric_adjusted_batchref_r.csv",
        "testdata_combat_parametric_adjusted_noeb_meanonly_r.csv",
    ],
)
def test_fit_then_apply_equals_harmonise_and_is_row_wise(name: str, combat_dir: Path, testdata: Any) -> None:
    data, batch, covariates = testdata
    kwargs = _kwargs(name, covariates)
    model = fit_combat(data, batch, **kwargs)
    full = harmonise_combat(data, batch, **kwargs)
    assert np.array_equal(model.apply(data, batch, covariates).to_numpy(), full.to_numpy())

    # Three samples of each batch, shuffled, with the features in another order: the same rows
    # come out (a model that forgot the covariate effects at apply time would fail here).
    rows = ["V7", "V2", "V9", "V3", "V6", "V1"]
    columns = list(reversed(data.columns))
    part = model.apply(data.loc[rows, columns], batch.loc[rows], covariates.loc[rows])
    assert list(part.index) == rows and list(part.columns) == columns
    assert np.abs(part.to_numpy() - full.loc[rows, columns].to_numpy()).max() < 1e-12
    expected = pd.read_csv(combat_dir / "outputData" / name).T.set_axis(data.columns, axis=1)
    assert np.abs(part.to_numpy() - expected.loc[rows, columns].to_numpy()).max() < 1e-10
    # batch and covariates are aligned on the index, whatever their order
    again = model.apply(data.loc[rows], batch.iloc[::-1], covariates.iloc[::-1])
    assert np.array_equal(again.to_numpy(), part.loc[rows, data.columns].to_numpy())


@pytest.mark.parametrize(
    "name",
    ["testdata_combat_parametric_adjusted_r.csv", "testdata_combat_nonparametric_unadjusted_batchref_r.csv"],
)
def test_save_load_round_trip(name: str, testdata: Any, tmp_path: Path) -> None:
    data, batch, covariates = testdata
    model = fit_combat(data, batch, **_kwargs(name, covariates))
    path = model.save(tmp_path / "combat.json")
    loaded = CombatModel.load(path)
    from_json = CombatModel.from_dict(json.loads(json.dumps(model.to_dict())))
    expected = model.apply(data, batch, covariates).to_numpy()
    for other in (loaded, from_json):
        assert other.features == model.features and other.batch_levels == model.batch_levels
        assert other.reference_batch == model.reference_batch and other.covariates == model.covariates
        for field in ("grand_mean", "covariate_coef", "var_pooled", "gamma_star", "delta_star"):
            assert np.array_equal(getattr(other, field), getattr(model, field)), field
        assert np.array_equal(other.apply(data, batch, covariates).to_numpy(), expected)
    with pytest.raises(ValueError):
        model.grand_mean[0] = 0.0  # read-only


# ---------------------------------------------------------------- synthetic cohorts


def _cohort(
    seed: int = 0, n_per_batch: tuple[int, ...] = (25, 20, 30), n_features: int = 12
) -> tuple[pd.DataFrame, pd.Series, pd.DataFrame, np.ndarray]:
    """Batches with their own shifts and scales, a planted age effect and a sex effect.

    Age differs between batches (older patients on the third scanner), so a model that
    ignores it would remove part of the age effect together with the batch effect.
    """
    rng = np.random.default_rng(seed)
    sites = [f"site-{chr(ord('a') + i)}" for i in range(len(n_per_batch))]
    batch = np.repeat(sites, n_per_batch)
    n = batch.size
    age = rng.uniform(30, 60, n) + 15.0 * (batch == sites[-1])
    sex = rng.choice(["F", "M"], n)
    slopes = rng.uniform(0.05, 0.3, n_features)
    base = rng.normal(10, 3, n_features)
    shift = rng.normal(0, 2, (len(sites), n_features))
    scale = rng.uniform(0.5, 2.0, (len(sites), n_features))
    site = np.searchsorted(sites, batch)
    noise = rng.normal(0, 0.5, (n, n_features)) * scale[site]
    values = base + np.outer(age, slopes) + 0.8 * (sex == "M")[:, None] + shift[site] + noise
    index = pd.Index([f"P{i:03d}" for i in range(n)], name="patient")
    data = pd.DataFrame(values, index=index, columns=[f"f{j}" for j in range(n_features)])
    covariates = pd.DataFrame({"age": age, "sex": sex, "unused": "x"}, index=index)
    return data, pd.Series(batch, index=index), covariates, slopes


def _age_slopes(table: pd.DataFrame, covariates: pd.DataFrame, batch: pd.Series | None = None) -> np.ndarray:
    """OLS slope of every feature on age (adjusting for sex, and for batch when given)."""
    columns = [covariates["age"].to_numpy(), covariates["sex"].eq("M").to_numpy(float)]
    if batch is None:
        columns.append(np.ones(len(table)))
    else:
        columns.extend((batch == level).to_numpy(float) for level in batch.unique())
    coef, *_ = np.linalg.lstsq(np.column_stack(columns), table.to_numpy(), rcond=None)
    return np.asarray(coef[0])


@pytest.mark.parametrize("method", ["parametric", "nonparametric", "none"])
def test_continuous_covariate_effect_survives(method: Method) -> None:
    data, batch, covariates, planted = _cohort()
    kwargs: dict[str, Any] = {"covariates": covariates, "categorical": ["sex"], "continuous": ["age"]}
    model = fit_combat(data, batch, method=method, **kwargs)
    assert model.covariates.columns == ("sex[T.M]", "age")
    harmonised = model.apply(data, batch, covariates)
    # within batches the planted age slope is kept, whatever the empirical Bayes flavour ...
    assert np.abs(_age_slopes(harmonised, covariates, batch) - planted).max() < 0.03
    if method != "nonparametric":
        # ... and across batches too, the batch effects being gone. (Non-parametric EB borrows
        # each feature's batch shift from the other features' shifts: with 12 unrelated features
        # it leaves part of them, which the older site turns into a pooled age slope.)
        assert np.abs(_age_slopes(harmonised, covariates) - planted).max() < 0.03
    # without the covariate, ComBat takes the older site's age effect for a batch effect
    naive = harmonise_combat(data, batch, method=method)
    assert np.abs(_age_slopes(naive, covariates) - planted).max() > 0.05
    # and new patients are harmonised with their own covariates
    rows = data.index[[0, 30, 50, 70, 5]]
    part = model.apply(data.loc[rows], batch.loc[rows], covariates.loc[rows])
    assert np.abs(part.to_numpy() - harmonised.loc[rows].to_numpy()).max() < 1e-12


def test_reference_batch_with_string_labels_and_covariates(tmp_path: Path) -> None:
    data, batch, covariates, _ = _cohort(seed=3)
    model = fit_combat(
        data, batch, covariates=covariates, categorical=["sex"], continuous=["age"], reference_batch="site-b"
    )
    out = model.apply(data, batch, covariates)
    reference = (batch == "site-b").to_numpy()
    assert np.array_equal(out.to_numpy()[reference], data.to_numpy()[reference])
    assert np.array_equal(model.gamma_star[1], np.zeros(data.shape[1]))
    loaded = CombatModel.load(model.save(tmp_path / "m.json"))
    assert loaded.reference_batch == "site-b"
    assert np.array_equal(loaded.apply(data, batch, covariates).to_numpy(), out.to_numpy())


def test_single_sample_batch_is_accepted_location_only() -> None:
    data, batch, _, _ = _cohort(n_per_batch=(10, 10, 1))
    out = harmonise_combat(data, batch, mean_only=True)
    assert np.isfinite(out.to_numpy()).all()


def test_nonparametric_is_finite_with_large_batches() -> None:
    # R's int.eprior multiplies (2 pi d)^(-n/2) by exp(...), which underflows to 0/0 for large
    # batches; the log-space weights do not.
    assert (2 * np.pi) ** (-900 / 2) == 0.0
    data, batch, _, _ = _cohort(n_per_batch=(900, 800), n_features=15)
    model = fit_combat(data, batch, method="nonparametric")
    assert (model.delta_star > 0).all()
    assert np.isfinite(model.apply(data, batch).to_numpy()).all()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    sizes=st.lists(st.integers(2, 8), min_size=2, max_size=4),
    n_features=st.integers(2, 6),
    scale=st.floats(1e-3, 1e3),
)
def test_batch_shifts_are_removed(seed: int, sizes: list[int], n_features: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    batch = pd.Series(np.repeat(np.arange(len(sizes)), sizes))
    base = pd.DataFrame(rng.normal(0, scale, (batch.size, n_features)))
    shifts = rng.normal(0, 10 * scale, (len(sizes), n_features))
    shifted = base + shifts[batch.to_numpy()]
    out = harmonise_combat(shifted, batch, method="none")
    # every batch ends on the grand mean ...
    means = out.groupby(batch).mean().to_numpy()
    tol = 1e-9 * (scale + np.abs(shifts).max())
    assert np.abs(means - means[0]).max() < tol
    # ... and what is left does not depend on the shifts (up to one common offset per feature)
    plain = harmonise_combat(base, batch, method="none")
    offset = (out - plain).to_numpy()
    assert np.abs(offset - offset[0]).max() < tol
    # with a reference batch, shifting the other batches changes nothing at all
    moved = base + shifts[batch.to_numpy()] * (batch.to_numpy() != 0)[:, None]
    assert (
        np.abs(
            harmonise_combat(moved, batch, method="none", reference_batch=0).to_numpy()
            - harmonise_combat(base, batch, method="none", reference_batch=0).to_numpy()
        ).max()
        < tol
    )


# ---------------------------------------------------------------- explicit errors


def test_missing_value_names_feature_and_sample(testdata: Any) -> None:
    data, batch, _ = testdata
    bad = data.copy()
    bad.loc["V4", "feature017"] = np.nan
    with pytest.raises(CombatError, match=r"'feature017' is missing for sample 'V4'") as info:
        fit_combat(bad, batch)
    assert isinstance(info.value, ValueError) and isinstance(info.value, CohortError)
    assert info.value.stage == Stage.ANALYSIS
    assert info.value.subject == "feature017"
    model = fit_combat(data, batch)
    with pytest.raises(CombatError, match=r"'feature017' is missing for sample 'V4'"):
        model.apply(bad, batch)
    bad.loc["V4", "feature017"] = np.inf
    with pytest.raises(CombatError, match=r"'feature017' is infinite for sample 'V4'"):
        fit_combat(bad, batch)


def test_single_sample_batch_is_refused() -> None:
    data, batch, _, _ = _cohort(n_per_batch=(10, 10, 1))
    with pytest.raises(CombatError, match=r"batch 'site-c': a single sample.*mean_only=True") as info:
        fit_combat(data, batch)
    assert info.value.subject == "batch 'site-c'"


def test_constant_features_are_named(testdata: Any) -> None:
    data, batch, covariates = testdata
    constant = data.assign(feature042=3.5)
    with pytest.raises(CombatError, match=r"'feature042' is constant across samples") as info:
        fit_combat(constant, batch)
    assert info.value.subject == "feature042"
    # not constant, but nothing left once the batch (and pheno) effects are removed
    explained = data.assign(feature007=np.where(batch == 1, 1.0, 4.0) + 0.5 * covariates["pheno"])
    harmonise_combat(explained, batch)  # fine without the covariate ...
    with pytest.raises(CombatError, match=r"'feature007' has no variance left"):
        fit_combat(explained, batch, covariates=covariates, categorical=["pheno"])
    # with a reference batch, the pooled variance comes from that batch only
    flat_ref = data.assign(feature100=np.where(batch == 1, 2.0, data["feature100"]))
    harmonise_combat(flat_ref, batch, reference_batch=2)
    with pytest.raises(CombatError, match=r"'feature100' is constant in reference batch 1"):
        fit_combat(flat_ref, batch, reference_batch=1)
    # constant within one batch only: fine with EB, refused for a plain L/S scale adjustment
    flat_one = data.assign(feature100=np.where(batch == 2, 2.0, data["feature100"]))
    assert np.isfinite(harmonise_combat(flat_one, batch).to_numpy()).all()
    assert np.isfinite(harmonise_combat(flat_one, batch, method="nonparametric").to_numpy()).all()
    with pytest.raises(CombatError, match=r"'feature100' is constant within batch 2"):
        fit_combat(flat_one, batch, method="none")


def test_unseen_batch_and_levels_at_apply(testdata: Any) -> None:
    data, batch, covariates = testdata
    model = fit_combat(data, batch, covariates=covariates, categorical=["pheno"])
    other = batch.where(batch.index != "V8", 3)
    with pytest.raises(CombatError, match=r"batch 3: sample 'V8' is in a batch not seen") as info:
        model.apply(data, other, covariates)
    assert info.value.subject == "batch 3"
    with pytest.raises(CombatError, match=r"batch '1': sample 'V1' is in a batch not seen"):
        model.apply(data, batch.astype(str), covariates)  # "1" is not 1
    new_level = covariates.assign(pheno=covariates["pheno"].where(covariates.index != "V2", 7))
    with pytest.raises(CombatError, match=r"level 7 \(sample 'V2'\) was not seen"):
        model.apply(data, batch, new_level)
    with pytest.raises(CombatError, match="pass them for the new rows"):
        model.apply(data, batch)
    with pytest.raises(CombatError, match="1 missing"):
        model.apply(data.drop(columns="feature003"), batch, covariates)
    with pytest.raises(CombatError, match="no entry for sample 'V10'"):
        model.apply(data, batch.iloc[:9], covariates)


def test_reference_batch_must_exist(testdata: Any) -> None:
    data, batch, _ = testdata
    with pytest.raises(CombatError, match=r"batch 3: reference batch not present.*\[1, 2\]") as info:
        fit_combat(data, batch, reference_batch=3)
    assert info.value.subject == "batch 3"
    with pytest.raises(CombatError, match=r"batch '1': reference batch not present"):
        fit_combat(data, batch, reference_batch="1")  # the labels are integers


def test_confounded_covariates_are_refused(testdata: Any) -> None:
    data, batch, covariates = testdata
    confounded = covariates.assign(scanner=np.where(batch == 1, "old", "new"), dose=batch * 2.0)
    with pytest.raises(CombatError, match="confounded with batch") as info:
        fit_combat(data, batch, covariates=confounded, categorical=["scanner"])
    assert info.value.subject == "scanner[T.old]"
    with pytest.raises(CombatError, match="confounded with batch") as info:
        fit_combat(data, batch, covariates=confounded, categorical=["pheno"], continuous=["dose"])
    assert info.value.subject == "dose"
    twice = covariates.assign(copy=covariates["pheno"])
    with pytest.raises(CombatError, match="confounded with each other"):
        fit_combat(data, batch, covariates=twice, continuous=["pheno", "copy"])


def test_bad_arguments_are_refused(testdata: Any) -> None:
    data, batch, covariates = testdata
    with pytest.raises(CombatError, match="at least two batches"):
        fit_combat(data, pd.Series(1, index=data.index))
    with pytest.raises(CombatError, match="no column is named"):
        fit_combat(data, batch, covariates=covariates)
    with pytest.raises(CombatError, match="not found"):
        fit_combat(data, batch, covariates=covariates, categorical=["age"])
    with pytest.raises(CombatError, match="unknown method"):
        fit_combat(data, batch, method="bayes")  # type: ignore[arg-type]
    with pytest.raises(CombatError, match="not numeric"):
        fit_combat(data.assign(feature001="a"), batch)
    with pytest.raises(CombatError, match="batch is missing for sample 'V3'"):
        fit_combat(data, batch.where(batch.index != "V3"))
    with pytest.raises(CombatError, match="too few"):
        fit_combat(data.iloc[[0, 5]], batch.iloc[[0, 5]], mean_only=True)
    with pytest.raises(CombatError, match="not a ComBat model"):
        CombatModel.from_dict({"format": "something else"})
