"""Survival analysis for radiomics cohorts: a thin, typed layer over lifelines and scikit-survival.

The statistics are computed by the libraries (lifelines ``KaplanMeierFitter``,
``logrank_test`` and ``CoxPHFitter``; scikit-survival ``concordance_index_censored``
and ``concordance_index_ipcw``); this module validates the inputs, fixes the
conventions below and returns tidy results.

Conventions
-----------
* **Inputs** are a time array and an event array (1/``True`` = event observed,
  0/``False`` = right-censored), matched by position with any score, group or
  covariate table passed beside them (the index of a pandas object is ignored).
  Times must be finite and non-negative (zero is allowed); events must be 0/1.
  Missing values are refused, never dropped silently.
* **Time units**: a week is 7 days, a year 365.25 days (Julian year) and a month
  a twelfth of a year, 30.4375 days. :func:`convert_time` converts between them.
* **Administrative censoring** at a horizon ``h`` (:func:`censor_at`): a time
  ``t > h`` becomes ``h`` with the event set to 0; an event exactly at ``h`` is kept.
* **Cut-off splits** (:func:`split_at_cutoff`): ``"high"`` = value strictly above
  the cut-off, ``"low"`` = at or below it. The default cut-off is the median.
* **Risk scores and concordance**: a higher risk score means *shorter* survival.
  A C-index above 0.5 means the score is prognostic in that direction (0.5 =
  random, 1 = perfect ranking). scikit-survival uses the same convention;
  ``lifelines.utils.concordance_index`` expects predicted *survival times*
  instead (higher = longer survival), so a risk score must be negated before it
  is passed there. :func:`harrell_c` and :func:`uno_c` take ``direction="survival"``
  for scores that are predicted survival times.
* **Cox models** use lifelines' ``CoxPHFitter`` (Efron ties). With
  ``standardise=True`` each covariate is z-scored with the mean and sample
  standard deviation (``ddof=1``) of the rows the model is fitted on, so a hazard
  ratio is per standard deviation; without it, per unit of the covariate.
* **Prognostic index** (:class:`RiskModel`): the Cox linear predictor
  ``PI = sum_j b_j (x_j - m_j) / s_j`` with the training means ``m_j`` (and the
  training standard deviations ``s_j`` when standardised, else 1), i.e. lifelines'
  ``predict_log_partial_hazard``. The risk-group cut-off is learned on the
  training rows (median PI by default) and applied unchanged to any other rows.

lifelines and scikit-survival are imported where they are used, so importing this
module is cheap and has no side effects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from cohort.errors import CohortError, Stage

if TYPE_CHECKING:
    from lifelines import CoxPHFitter

__all__ = [
    "DAYS_PER_UNIT",
    "HIGH",
    "LOW",
    "CoxResult",
    "EmptyGroupError",
    "LogRankResult",
    "RiskModel",
    "SurvivalDataError",
    "SurvivalError",
    "SurvivalModelError",
    "censor_at",
    "convert_time",
    "fit_cox",
    "harrell_c",
    "kaplan_meier",
    "logrank",
    "logrank_at_cutoff",
    "split_at_cutoff",
    "univariate_cox",
    "uno_c",
]

TimeUnit = Literal["days", "weeks", "months", "years"]
ScoreDirection = Literal["risk", "survival"]

#: Length of each time unit in days (Julian year; month = year / 12).
DAYS_PER_UNIT: Final[Mapping[str, float]] = MappingProxyType(
    {"days": 1.0, "weeks": 7.0, "months": 365.25 / 12.0, "years": 365.25}
)

#: Group labels of a cut-off split: "high" = above the cut-off, "low" = at or below.
HIGH: Final = "high"
LOW: Final = "low"

_TIME: Final = "__survival_time__"
_EVENT: Final = "__survival_event__"


# --------------------------------------------------------------------------- errors


class SurvivalError(CohortError):
    """Base class of the errors raised by the survival analyses."""

    stage = Stage.ANALYSIS


class SurvivalDataError(SurvivalError):
    """Times, events, scores or covariates are missing, malformed or unusable."""


class EmptyGroupError(SurvivalError):
    """A comparison group has no rows (e.g. nothing lies above the cut-off)."""


class SurvivalModelError(SurvivalError):
    """A model could not be fitted or evaluated (no convergence, no comparable pairs, ...)."""


# --------------------------------------------------------------------------- validation


def _float_array(values: npt.ArrayLike | pd.Series, what: str, subject: str) -> np.ndarray:
    try:
        if isinstance(values, pd.Series | pd.Index):
            array = values.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SurvivalDataError(f"{what} are not numeric ({exc})", subject=subject) from exc
    if array.ndim != 1:
        raise SurvivalDataError(f"{what} must be one-dimensional, got shape {array.shape}", subject=subject)
    return array


def _survival_arrays(
    time: npt.ArrayLike | pd.Series,
    event: npt.ArrayLike | pd.Series,
    *,
    require_events: bool = True,
    subject: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(time float64, event bool)``; raises :class:`SurvivalDataError`."""
    t = _float_array(time, "times", subject)
    e = _float_array(event, "events", subject)
    if t.size == 0:
        raise SurvivalDataError("no rows: times are empty", subject=subject)
    if t.shape != e.shape:
        raise SurvivalDataError(f"{t.size} times but {e.size} events", subject=subject)
    if (n := int(np.isnan(t).sum())) > 0:
        raise SurvivalDataError(f"{n} missing times; drop or complete those rows first", subject=subject)
    if (n := int(np.isnan(e).sum())) > 0:
        raise SurvivalDataError(
            f"{n} missing event indicators; drop or complete those rows first", subject=subject
        )
    if not np.isfinite(t).all():
        raise SurvivalDataError("times contain infinite values", subject=subject)
    if (n := int((t < 0).sum())) > 0:
        raise SurvivalDataError(f"{n} negative times (minimum {t.min():g})", subject=subject)
    if not np.isin(e, (0.0, 1.0)).all():
        bad = sorted(set(np.unique(e[~np.isin(e, (0.0, 1.0))]).tolist()))[:5]
        raise SurvivalDataError(f"events must be 0/1 (or boolean), found {bad}", subject=subject)
    events = e.astype(bool)
    if require_events and not events.any():
        raise SurvivalDataError(f"no events among {t.size} rows: nothing to estimate", subject=subject)
    return t, events


def _scores(values: npt.ArrayLike | pd.Series, n: int, what: str, subject: str) -> np.ndarray:
    s = _float_array(values, what, subject)
    if s.size != n:
        raise SurvivalDataError(f"{s.size} {what} for {n} rows", subject=subject)
    if (k := int((~np.isfinite(s)).sum())) > 0:
        raise SurvivalDataError(f"{k} missing or infinite {what}", subject=subject)
    return s


def _labels(groups: npt.ArrayLike | pd.Series, n: int, subject: str) -> np.ndarray:
    raw = (
        list(groups.tolist())
        if isinstance(groups, pd.Series | pd.Index)
        else list(np.asarray(groups).tolist())
    )
    if len(raw) != n:
        raise SurvivalDataError(f"{len(raw)} group labels for {n} rows", subject=subject)
    missing = int(pd.isna(pd.Series(raw, dtype=object)).sum())
    if missing:
        raise SurvivalDataError(f"{missing} missing group labels", subject=subject)
    return np.array([str(g) for g in raw], dtype=object)


# --------------------------------------------------------------------------- time


def convert_time(
    time: npt.ArrayLike | pd.Series, from_unit: TimeUnit, to_unit: TimeUnit
) -> npt.NDArray[np.float64]:
    """Convert times between days, weeks, months and years (see :data:`DAYS_PER_UNIT`)."""
    for unit in (from_unit, to_unit):
        if unit not in DAYS_PER_UNIT:
            raise SurvivalDataError(f"unknown time unit {unit!r}; use one of {sorted(DAYS_PER_UNIT)}")
    values = _float_array(time, "times", "")
    return values * (DAYS_PER_UNIT[from_unit] / DAYS_PER_UNIT[to_unit])


def censor_at(
    time: npt.ArrayLike | pd.Series, event: npt.ArrayLike | pd.Series, horizon: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Administrative censoring at ``horizon`` (same unit as ``time``).

    Rows followed beyond the horizon are censored at it (time = horizon, event =
    0), whatever happened later; rows at or before the horizon are unchanged (an
    event exactly at the horizon stays an event). Returns new arrays.
    """
    if not np.isfinite(horizon) or horizon <= 0:
        raise SurvivalDataError(f"the horizon must be a positive finite time, got {horizon!r}")
    t, e = _survival_arrays(time, event, require_events=False)
    beyond = t > horizon
    return np.where(beyond, float(horizon), t), e & ~beyond


# --------------------------------------------------------------------------- groups, KM, log-rank


def _split(values: np.ndarray, cutoff: float) -> np.ndarray:
    return np.where(values > cutoff, HIGH, LOW).astype(object)


def split_at_cutoff(
    values: npt.ArrayLike | pd.Series, cutoff: float | None = None, *, subject: str = ""
) -> tuple[np.ndarray, float]:
    """Label each value ``"high"`` (strictly above ``cutoff``) or ``"low"`` (at or below).

    ``cutoff`` defaults to the median of ``values``. Returns ``(labels, cutoff)``;
    raises :class:`EmptyGroupError` when either group is empty (for example a
    binary marker whose median equals its larger value: pass explicit groups to
    :func:`logrank` / :func:`kaplan_meier` instead).
    """
    v = _float_array(values, "values", subject)
    if v.size == 0:
        raise SurvivalDataError("no values to split", subject=subject)
    if (k := int((~np.isfinite(v)).sum())) > 0:
        raise SurvivalDataError(f"{k} missing or infinite values to split", subject=subject)
    cut = float(np.median(v)) if cutoff is None else float(cutoff)
    labels = _split(v, cut)
    for name in (LOW, HIGH):
        if not (labels == name).any():
            raise EmptyGroupError(
                f"group {name!r} is empty after splitting {v.size} values at {cut:g} "
                f"(range {v.min():g} to {v.max():g})",
                subject=subject,
            )
    return labels, cut


def kaplan_meier(
    time: npt.ArrayLike | pd.Series,
    event: npt.ArrayLike | pd.Series,
    groups: npt.ArrayLike | pd.Series | None = None,
    *,
    alpha: float = 0.05,
    subject: str = "",
) -> pd.DataFrame:
    """Kaplan–Meier estimate per group, as one tidy table.

    Columns: ``group`` (``str(label)``, ``"all"`` without groups), ``time`` (0 and
    every distinct observed time of the group), ``survival``, ``lower`` and
    ``upper`` (the pointwise ``1 - alpha`` band of lifelines: exponential
    Greenwood, i.e. log(-log) transformed), ``at_risk`` (rows still at risk just
    before ``time``). Groups come in sorted order. A group without events is
    allowed (its survival stays 1).
    """
    from lifelines import KaplanMeierFitter

    t, e = _survival_arrays(time, event, require_events=False, subject=subject)
    labels = np.full(t.size, "all", dtype=object) if groups is None else _labels(groups, t.size, subject)
    parts = []
    for name in sorted(set(labels.tolist())):
        rows = labels == name
        kmf = KaplanMeierFitter(alpha=alpha).fit(t[rows], e[rows], label="km")
        curve = kmf.survival_function_["km"]
        band = kmf.confidence_interval_survival_function_.reindex(curve.index)
        parts.append(
            pd.DataFrame(
                {
                    "group": name,
                    "time": curve.index.to_numpy(dtype=np.float64),
                    "survival": curve.to_numpy(dtype=np.float64),
                    "lower": band.iloc[:, 0].to_numpy(dtype=np.float64),
                    "upper": band.iloc[:, 1].to_numpy(dtype=np.float64),
                    "at_risk": kmf.event_table["at_risk"].reindex(curve.index).to_numpy(dtype=np.int64),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


@dataclass(frozen=True)
class LogRankResult:
    """Two-group log-rank test (1 degree of freedom).

    ``groups``, ``sizes`` and ``events`` are in the same order: ``("low", "high")``
    for a cut-off split, sorted labels otherwise. ``cutoff`` is ``None`` for
    explicit groups.
    """

    statistic: float
    p_value: float
    groups: tuple[str, str]
    sizes: tuple[int, int]
    events: tuple[int, int]
    cutoff: float | None = None


def _logrank(
    t: np.ndarray, e: np.ndarray, labels: np.ndarray, order: Sequence[str], subject: str
) -> LogRankResult:
    from lifelines.statistics import logrank_test

    a, b = (labels == order[0]), (labels == order[1])
    for name, rows in zip(order, (a, b), strict=True):
        if not rows.any():
            raise EmptyGroupError(f"group {name!r} has no rows", subject=subject)
    result = logrank_test(t[a], t[b], event_observed_A=e[a], event_observed_B=e[b])
    return LogRankResult(
        statistic=float(result.test_statistic),
        p_value=float(result.p_value),
        groups=(order[0], order[1]),
        sizes=(int(a.sum()), int(b.sum())),
        events=(int(e[a].sum()), int(e[b].sum())),
    )


def logrank(
    time: npt.ArrayLike | pd.Series,
    event: npt.ArrayLike | pd.Series,
    groups: npt.ArrayLike | pd.Series,
    *,
    subject: str = "",
) -> LogRankResult:
    """Log-rank test between exactly two explicit groups (e.g. a binary treatment)."""
    t, e = _survival_arrays(time, event, subject=subject)
    labels = _labels(groups, t.size, subject)
    names = sorted(set(labels.tolist()))
    if len(names) != 2:
        if len(names) < 2:
            raise EmptyGroupError(f"need two groups, all rows are in {names}", subject=subject)
        raise SurvivalDataError(f"need exactly two groups, found {len(names)}: {names[:10]}", subject=subject)
    return _logrank(t, e, labels, names, subject)


def logrank_at_cutoff(
    time: npt.ArrayLike | pd.Series,
    event: npt.ArrayLike | pd.Series,
    values: npt.ArrayLike | pd.Series,
    cutoff: float | None = None,
    *,
    subject: str = "",
) -> LogRankResult:
    """Log-rank test of ``"low"`` (at or below the cut-off) vs ``"high"`` (above it).

    ``cutoff`` defaults to the median of ``values``; the one used is returned.
    """
    t, e = _survival_arrays(time, event, subject=subject)
    v = _scores(values, t.size, "values", subject)
    labels, cut = split_at_cutoff(v, cutoff, subject=subject)
    result = _logrank(t, e, labels, (LOW, HIGH), subject)
    return LogRankResult(result.statistic, result.p_value, result.groups, result.sizes, result.events, cut)


# --------------------------------------------------------------------------- Cox


@dataclass(frozen=True, eq=False)
class CoxResult:
    """A fitted Cox proportional-hazards model (compared by identity: it holds tables).

    ``table`` has one row per covariate: ``covariate, coef, se, hr, hr_lower,
    hr_upper, p_value`` (``hr_*`` is the ``1 - alpha`` interval, Wald). ``centre``
    and ``scale`` are the standardisation applied before fitting (mean and SD per
    covariate when ``standardised``, else 0 and 1). ``fitter`` is the lifelines
    model, for plots and assumption checks.
    """

    table: pd.DataFrame
    log_likelihood: float
    concordance: float
    n: int
    events: int
    alpha: float
    standardised: bool
    centre: tuple[float, ...]
    scale: tuple[float, ...]
    fitter: CoxPHFitter = field(repr=False, compare=False)


def _covariate_matrix(covariates: pd.DataFrame, n: int | None, subject: str) -> pd.DataFrame:
    if not isinstance(covariates, pd.DataFrame):
        raise SurvivalDataError(
            f"covariates must be a DataFrame, got {type(covariates).__name__}", subject=subject
        )
    if covariates.shape[1] == 0:
        raise SurvivalDataError("no covariates", subject=subject)
    if n is not None and len(covariates) != n:
        raise SurvivalDataError(f"{len(covariates)} covariate rows for {n} times", subject=subject)
    names = [str(c) for c in covariates.columns]
    if len(set(names)) != len(names):
        raise SurvivalDataError("covariate names are not unique", subject=subject)
    if {_TIME, _EVENT} & set(names):
        raise SurvivalDataError(f"covariate names {_TIME!r} and {_EVENT!r} are reserved", subject=subject)
    not_numeric = [c for c in covariates.columns if not pd.api.types.is_numeric_dtype(covariates[c])]
    if not_numeric:
        raise SurvivalDataError(
            f"covariates are not numeric: {not_numeric}; encode them first", subject=subject
        )
    x = pd.DataFrame(
        {
            name: covariates[c].to_numpy(dtype=np.float64, na_value=np.nan)
            for name, c in zip(names, covariates, strict=True)
        }
    )
    bad = {c: int(k) for c, k in (~np.isfinite(x)).sum().items() if k}
    if bad:
        raise SurvivalDataError(
            f"missing or infinite covariate values {bad}; drop or impute first", subject=subject
        )
    return x


def _fit_cox(
    t: np.ndarray,
    e: np.ndarray,
    x: pd.DataFrame,
    *,
    standardise: bool,
    penalizer: float,
    alpha: float,
    subject: str,
) -> CoxResult:
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    if standardise:
        centre = x.mean(axis=0)
        scale = x.std(axis=0, ddof=1)
        constant = [str(c) for c, s in scale.items() if not np.isfinite(s) or s == 0]
        if constant:
            raise SurvivalDataError(f"cannot standardise constant covariates {constant}", subject=subject)
        x = (x - centre) / scale
    else:
        centre = pd.Series(0.0, index=x.columns)
        scale = pd.Series(1.0, index=x.columns)
    frame = x.assign(**{_TIME: t, _EVENT: e.astype(np.int64)})
    fitter = CoxPHFitter(penalizer=penalizer, alpha=alpha)
    try:
        fitter.fit(frame, duration_col=_TIME, event_col=_EVENT)
    except ConvergenceError as exc:
        raise SurvivalModelError(f"the Cox model did not converge: {exc}", subject=subject) from exc
    summary = fitter.summary
    lower = next(c for c in summary.columns if str(c).startswith("exp(coef) lower"))
    upper = next(c for c in summary.columns if str(c).startswith("exp(coef) upper"))
    table = pd.DataFrame(
        {
            "covariate": [str(c) for c in summary.index],
            "coef": summary["coef"].to_numpy(dtype=np.float64),
            "se": summary["se(coef)"].to_numpy(dtype=np.float64),
            "hr": summary["exp(coef)"].to_numpy(dtype=np.float64),
            "hr_lower": summary[lower].to_numpy(dtype=np.float64),
            "hr_upper": summary[upper].to_numpy(dtype=np.float64),
            "p_value": summary["p"].to_numpy(dtype=np.float64),
        }
    )
    return CoxResult(
        table=table,
        log_likelihood=float(fitter.log_likelihood_),
        concordance=float(fitter.concordance_index_),
        n=int(t.size),
        events=int(e.sum()),
        alpha=alpha,
        standardised=standardise,
        centre=tuple(float(v) for v in centre),
        scale=tuple(float(v) for v in scale),
        fitter=fitter,
    )


def fit_cox(
    time: npt.ArrayLike | pd.Series,
    event: npt.ArrayLike | pd.Series,
    covariates: pd.DataFrame,
    *,
    standardise: bool = False,
    penalizer: float = 0.0,
    alpha: float = 0.05,
    subject: str = "",
) -> CoxResult:
    """Multivariable Cox model of all columns of ``covariates`` (numeric, complete).

    ``log_likelihood`` is the maximised partial log-likelihood and
    ``concordance`` Harrell's C of the fitted linear predictor on these rows.
    """
    t, e = _survival_arrays(time, event, subject=subject)
    x = _covariate_matrix(covariates, t.size, subject)
    return _fit_cox(t, e, x, standardise=standardise, penalizer=penalizer, alpha=alpha, subject=subject)


def univariate_cox(
    time: npt.ArrayLike | pd.Series,
    event: npt.ArrayLike | pd.Series,
    covariates: pd.DataFrame,
    *,
    standardise: bool = False,
    penalizer: float = 0.0,
    alpha: float = 0.05,
    subject: str = "",
) -> pd.DataFrame:
    """One Cox model per covariate; the rows of each ``fit_cox`` table, stacked.

    Adds ``log_likelihood``, ``concordance``, ``n`` and ``events`` of each model.
    """
    t, e = _survival_arrays(time, event, subject=subject)
    x = _covariate_matrix(covariates, t.size, subject)
    rows = []
    for name in x.columns:
        result = _fit_cox(
            t, e, x[[name]], standardise=standardise, penalizer=penalizer, alpha=alpha, subject=subject
        )
        rows.append(
            result.table.assign(
                log_likelihood=result.log_likelihood,
                concordance=result.concordance,
                n=result.n,
                events=result.events,
            )
        )
    return pd.concat(rows, ignore_index=True)


# --------------------------------------------------------------------------- concordance


def _oriented(score: np.ndarray, direction: ScoreDirection) -> np.ndarray:
    if direction == "risk":
        return score
    if direction == "survival":
        return -score
    raise SurvivalDataError(f"direction must be 'risk' or 'survival', got {direction!r}")


def harrell_c(
    time: npt.ArrayLike | pd.Series,
    event: npt.ArrayLike | pd.Series,
    score: npt.ArrayLike | pd.Series,
    *,
    direction: ScoreDirection = "risk",
    subject: str = "",
) -> float:
    """Harrell's C-index (scikit-survival ``concordance_index_censored``).

    With ``direction="risk"`` (default) a higher score predicts shorter survival;
    with ``"survival"`` the score is a predicted survival time (higher = longer),
    as ``lifelines.utils.concordance_index`` expects. Tied scores count 1/2.
    """
    from sksurv.metrics import concordance_index_censored

    t, e = _survival_arrays(time, event, subject=subject)
    s = _oriented(_scores(score, t.size, "scores", subject), direction)
    try:
        return float(concordance_index_censored(e, t, s)[0])
    except ValueError as exc:  # sksurv's NoComparablePairException is a ValueError
        raise SurvivalModelError(f"Harrell's C is undefined: {exc}", subject=subject) from exc


def uno_c(
    time: npt.ArrayLike | pd.Series,
    event: npt.ArrayLike | pd.Series,
    score: npt.ArrayLike | pd.Series,
    *,
    train_time: npt.ArrayLike | pd.Series | None = None,
    train_event: npt.ArrayLike | pd.Series | None = None,
    tau: float | None = None,
    direction: ScoreDirection = "risk",
    subject: str = "",
) -> float:
    """Uno's IPCW C-index (scikit-survival ``concordance_index_ipcw``), same sign as :func:`harrell_c`.

    The censoring distribution is estimated by Kaplan–Meier on the training rows
    (``train_time``/``train_event``; by default the evaluated rows themselves).
    ``tau`` truncates the comparison to pairs with the shorter time below it; it
    is needed when the censoring survival drops to zero (e.g. everyone still at
    risk is censored at the end of follow-up, and events occur at that time).
    """
    from sksurv.metrics import concordance_index_ipcw
    from sksurv.util import Surv

    t, e = _survival_arrays(time, event, subject=subject)
    s = _oriented(_scores(score, t.size, "scores", subject), direction)
    if (train_time is None) != (train_event is None):
        raise SurvivalDataError("give both train_time and train_event, or neither", subject=subject)
    if train_time is not None and train_event is not None:
        tt, te = _survival_arrays(train_time, train_event, require_events=False, subject=subject)
    else:
        tt, te = t, e
    if tau is not None and (not np.isfinite(tau) or tau <= 0):
        raise SurvivalDataError(f"tau must be a positive finite time, got {tau!r}", subject=subject)
    try:
        return float(concordance_index_ipcw(Surv.from_arrays(te, tt), Surv.from_arrays(e, t), s, tau=tau)[0])
    except ValueError as exc:
        raise SurvivalModelError(
            f"Uno's C is undefined here ({exc}); pass a truncation time tau below the end of follow-up",
            subject=subject,
        ) from exc


# --------------------------------------------------------------------------- risk model


@dataclass(frozen=True)
class RiskModel:
    """Cox prognostic index with a risk-group cut-off, both learned on training rows.

    Build it with :meth:`fit`; :meth:`prognostic_index` and :meth:`apply` use the
    stored coefficients, centring, scaling and ``cutoff`` unchanged on any rows
    (nothing is re-estimated on validation data).
    """

    covariates: tuple[str, ...]
    coefficients: tuple[float, ...]
    centre: tuple[float, ...]
    scale: tuple[float, ...]
    cutoff: float
    cox: CoxResult = field(repr=False, compare=False)

    @classmethod
    def fit(
        cls,
        time: npt.ArrayLike | pd.Series,
        event: npt.ArrayLike | pd.Series,
        covariates: pd.DataFrame,
        *,
        standardise: bool = False,
        cutoff: float | None = None,
        quantile: float = 0.5,
        penalizer: float = 0.0,
        subject: str = "",
    ) -> RiskModel:
        """Fit the Cox model on training rows; the cut-off is ``cutoff`` if given,
        else the ``quantile`` (median by default) of the training prognostic index."""
        if not 0.0 < quantile < 1.0:
            raise SurvivalDataError(
                f"quantile must lie strictly between 0 and 1, got {quantile}", subject=subject
            )
        t, e = _survival_arrays(time, event, subject=subject)
        x = _covariate_matrix(covariates, t.size, subject)
        result = _fit_cox(t, e, x, standardise=standardise, penalizer=penalizer, alpha=0.05, subject=subject)
        params = result.fitter.params_
        # Centred at the training means, as lifelines' predict_log_partial_hazard (when
        # standardised, the z-scores have mean 0 and the centre is the same mean).
        model = cls(
            covariates=tuple(str(c) for c in x.columns),
            coefficients=tuple(float(params[c]) for c in x.columns),
            centre=tuple(float(m) for m in x.mean(axis=0)),
            scale=result.scale,
            cutoff=float("nan"),
            cox=result,
        )
        training_pi = model.prognostic_index(x).to_numpy()
        cut = float(np.quantile(training_pi, quantile)) if cutoff is None else float(cutoff)
        if not np.isfinite(cut):
            raise SurvivalDataError(f"the cut-off must be finite, got {cut}", subject=subject)
        return replace(model, cutoff=cut)

    def prognostic_index(self, covariates: pd.DataFrame) -> pd.Series:
        """The linear predictor ``sum_j b_j (x_j - m_j) / s_j`` (index kept from ``covariates``)."""
        missing = [c for c in self.covariates if c not in covariates.columns]
        if missing:
            raise SurvivalDataError(f"covariates missing from the table: {missing}")
        x = _covariate_matrix(covariates[list(self.covariates)], None, "")
        z = (x.to_numpy() - np.array(self.centre)) / np.array(self.scale)
        return pd.Series(z @ np.array(self.coefficients), index=covariates.index, name="pi")

    def apply(self, covariates: pd.DataFrame) -> pd.DataFrame:
        """``pi`` and ``risk_group`` (``"high"`` if ``pi > cutoff`` else ``"low"``) per row.

        The stored training cut-off is used as is; a group may be empty here.
        """
        pi = self.prognostic_index(covariates)
        return pd.DataFrame(
            {"pi": pi, "risk_group": _split(pi.to_numpy(), self.cutoff)}, index=covariates.index
        )
