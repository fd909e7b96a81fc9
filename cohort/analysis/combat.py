"""ComBat harmonisation of feature tables (Johnson, Li & Rabinovic 2007).

The semantics are those of ``sva::ComBat`` and of Fortin's ``neuroCombat`` (R), which
agree with each other; the outputs reproduce the R implementation to about 1e-13 on
the ComBatHarmonization test set. Everything is computed in float64.

Model, for feature ``g`` of sample ``j`` in batch ``i`` with covariates ``x_j``::

    y_ijg = alpha_g + x_j' beta_g + gamma_ig + delta_ig * eps_ijg,   eps ~ N(0, sigma_g^2)

* ``alpha_g`` (grand mean) and ``beta_g`` come from one least-squares fit of each feature
  on batch indicators plus covariates; the grand mean is the sample-size weighted mean
  of the batch intercepts, or the reference batch's intercept when there is one.
* ``sigma_g^2`` (``var_pooled``) is the mean of the squared residuals, i.e. with a
  ``1/n`` denominator, not ``1/(n - p)``: sva computes ``resid^2 %*% rep(1/n, n)`` and
  neuroCombat ``rowVars(resid) / (n / (n - 1))``, which is the same number. With a
  reference batch the residuals (of the fit on all samples) are averaged over the
  reference batch only.
* The data are standardised, ``z = (y - alpha - x' beta) / sigma``; ``gamma_hat`` and
  ``delta_hat`` are the per-batch mean and (``n - 1``) variance of ``z``. With empirical
  Bayes they are shrunk towards priors estimated across features: parametric (normal /
  inverse-gamma priors, solved by the same fixed-point iteration as R, tolerance 1e-4)
  or non-parametric (each feature's estimate is a likelihood-weighted average of the
  other features' estimates). ``mean_only`` fixes ``delta`` to 1.
* Harmonised value: ``(z - gamma*) / sqrt(delta*) * sigma + alpha + x' beta``, so the
  covariate effects are kept. Rows of the reference batch are returned unchanged.

Given the fitted parameters the adjustment is row-wise, so :meth:`CombatModel.apply`
harmonises new rows (of batches seen at fit time) exactly as the fit rows were.

Unlike the R code, which silently replaces zero variances by a median or by 1, this
module refuses inputs that would need such patches (missing values, constant
features, single-sample batches, confounded designs) with a :class:`CombatError`
naming the culprit, and never returns NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pandas as pd

from cohort.errors import CohortError, Stage

__all__ = [
    "CombatError",
    "CombatModel",
    "CovariateEncoding",
    "Method",
    "fit_combat",
    "harmonise_combat",
]

Method = Literal["parametric", "nonparametric", "none"]
#: A batch label, a categorical covariate level or a feature name: JSON-representable scalars.
Label = str | int | float

_METHODS: tuple[str, ...] = ("parametric", "nonparametric", "none")
_FORMAT = "cohort.analysis.combat"
_VERSION = 1
#: Convergence tolerance of the parametric fixed-point iteration (R's ``it.sol``: ``conv=.0001``).
_CONV = 1e-4
_MAX_ITERATIONS = 10_000
#: A feature whose residual standard deviation is below this fraction of its magnitude is constant.
_CONSTANT_RTOL = 1e-12
#: Memory budget (number of float64 values) of one block of the non-parametric integration.
_BLOCK_VALUES = 4_000_000


class CombatError(CohortError, ValueError):
    """The data, batches or covariates cannot be harmonised (or a stored model is invalid)."""

    stage = Stage.ANALYSIS


# --------------------------------------------------------------------------- labels


def _label(value: object, what: str) -> Label:
    """``value`` as a plain Python str / int / float (numpy scalars unwrapped), or an error."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CombatError(f"{what} must not be missing or infinite", subject=what)
        return value
    raise CombatError(
        f"{what} must be strings or numbers (JSON-representable), got {type(value).__name__} {value!r}",
        subject=what,
    )


def _sorted_levels(values: Sequence[Label]) -> tuple[Label, ...]:
    unique = list(dict.fromkeys(values))
    try:
        return tuple(sorted(unique))  # type: ignore[type-var]
    except TypeError:  # mixed str and numbers
        return tuple(sorted(unique, key=lambda v: (type(v).__name__, str(v))))


def _name(label: Hashable) -> str:
    return str(label)


def _batch(label: Label) -> str:
    """The subject of an error about one batch, e.g. ``batch 2`` or ``batch 'site-a'``."""
    return f"batch {label!r}"


# --------------------------------------------------------------------------- input checks


def _numeric_matrix(data: pd.DataFrame, what: str = "data") -> np.ndarray:
    """The samples × features values as float64, refusing missing or infinite values."""
    if not isinstance(data, pd.DataFrame):
        raise CombatError(f"{what} must be a pandas DataFrame (rows = samples, columns = features)")
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise CombatError(f"{what} is empty (shape {data.shape})", subject=what)
    if not data.index.is_unique:
        dup = data.index[data.index.duplicated()][0]
        raise CombatError(f"sample labels must be unique; {dup!r} appears more than once", subject=_name(dup))
    if not data.columns.is_unique:
        dup = data.columns[data.columns.duplicated()][0]
        raise CombatError(f"feature names must be unique; {dup!r} appears more than once", subject=_name(dup))
    for column, dtype in data.dtypes.items():
        if (
            not pd.api.types.is_numeric_dtype(dtype)
            or pd.api.types.is_bool_dtype(dtype)
            or pd.api.types.is_complex_dtype(dtype)
        ):
            raise CombatError(f"feature {column!r} is not numeric (dtype {dtype})", subject=_name(column))
    values = data.to_numpy(dtype=np.float64, copy=True)
    bad = ~np.isfinite(values)
    if bad.any():
        rows, cols = np.nonzero(bad)
        feature, sample = data.columns[cols[0]], data.index[rows[0]]
        kind = "missing" if np.isnan(values[rows[0], cols[0]]) else "infinite"
        raise CombatError(
            f"feature {feature!r} is {kind} for sample {sample!r} ({bad.sum()} non-finite value(s) in all); "
            "ComBat needs complete data: impute or drop them first",
            subject=_name(feature),
        )
    return values


def _aligned(values: pd.Series | pd.DataFrame, index: pd.Index, what: str) -> Any:
    """``values`` reordered to ``index`` (they must carry a label for every sample)."""
    if values.index.equals(index):
        return values
    if not values.index.is_unique:
        raise CombatError(f"{what} has duplicate sample labels", subject=what)
    missing = index.difference(values.index)
    if len(missing):
        raise CombatError(
            f"{what} has no entry for sample {missing[0]!r} ({len(missing)} sample(s) missing); "
            "it must be indexed like the data rows",
            subject=_name(missing[0]),
        )
    return values.reindex(index)


def _batch_labels(batch: pd.Series, index: pd.Index) -> list[Label]:
    if not isinstance(batch, pd.Series):
        raise CombatError("batch must be a pandas Series indexed like the data rows", subject="batch")
    batch = _aligned(batch, index, "batch")
    labels: list[Label] = []
    for sample, value in zip(index, batch.to_numpy(dtype=object), strict=True):
        if value is None or (isinstance(value, float | np.floating) and not np.isfinite(value)):
            raise CombatError(f"batch is missing for sample {sample!r}", subject=_name(sample))
        labels.append(_label(value, "batch labels"))
    return labels


# --------------------------------------------------------------------------- covariates


@dataclass(frozen=True)
class CovariateEncoding:
    """How covariates become design columns.

    Categorical covariates are treatment-coded (R's ``model.matrix`` default): one 0/1
    column per level except the first (sorted) level. Continuous covariates enter as is.
    """

    categorical: tuple[tuple[str, tuple[Label, ...]], ...] = ()
    continuous: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.categorical) + self.continuous

    @property
    def columns(self) -> tuple[str, ...]:
        """Names of the design columns, e.g. ``site[T.b]`` or ``age``."""
        cols = [f"{name}[T.{level}]" for name, levels in self.categorical for level in levels[1:]]
        return (*cols, *self.continuous)

    @classmethod
    def fit(
        cls,
        covariates: pd.DataFrame | None,
        categorical: Sequence[str],
        continuous: Sequence[str],
        index: pd.Index,
    ) -> CovariateEncoding:
        for names, what in ((categorical, "categorical"), (continuous, "continuous")):
            if isinstance(names, str):
                raise CombatError(f"{what} must be a sequence of column names, not a string", subject=names)
        categorical, continuous = tuple(categorical), tuple(continuous)
        if covariates is None:
            if categorical or continuous:
                raise CombatError(
                    "categorical/continuous covariates are named but no covariates table was given",
                    subject=", ".join((*categorical, *continuous)),
                )
            return cls()
        if not (categorical or continuous):
            raise CombatError(
                "a covariates table was given but no column is named in categorical= or continuous="
            )
        both = set(categorical) & set(continuous)
        if both:
            name = sorted(both)[0]
            raise CombatError("covariate is named both categorical and continuous", subject=name)
        for name in (*categorical, *continuous):
            if len([n for n in (*categorical, *continuous) if n == name]) > 1:
                raise CombatError("covariate is named twice", subject=name)
            if name not in covariates.columns:
                raise CombatError("covariate not found in the covariates table", subject=name)
        table = _aligned(covariates, index, "covariates")
        encoded = []
        for name in categorical:
            values = cls._categorical_values(table[name], name)
            encoded.append((name, _sorted_levels(values)))
        encoding = cls(tuple(encoded), continuous)
        encoding.encode(table, index)  # validates the continuous columns
        return encoding

    @staticmethod
    def _categorical_values(column: pd.Series, name: str) -> list[Label]:
        values: list[Label] = []
        for sample, value in zip(column.index, column.to_numpy(dtype=object), strict=True):
            if value is None or (isinstance(value, float | np.floating) and not np.isfinite(value)):
                raise CombatError(f"categorical covariate is missing for sample {sample!r}", subject=name)
            values.append(_label(value, f"levels of covariate {name!r}"))
        return values

    def encode(self, covariates: pd.DataFrame | None, index: pd.Index) -> np.ndarray:
        """The (samples × design columns) covariate block of the design matrix."""
        n = len(index)
        if not self.names:
            return np.zeros((n, 0), dtype=np.float64)
        if covariates is None:
            raise CombatError(
                "the model was fitted with covariates; pass them for the new rows",
                subject=", ".join(self.names),
            )
        if not isinstance(covariates, pd.DataFrame):
            raise CombatError("covariates must be a pandas DataFrame indexed like the data rows")
        for name in self.names:
            if name not in covariates.columns:
                raise CombatError("covariate not found in the covariates table", subject=name)
        table = _aligned(covariates, index, "covariates")
        blocks: list[np.ndarray] = []
        for name, levels in self.categorical:
            values = self._categorical_values(table[name], name)
            position = {level: k for k, level in enumerate(levels)}
            codes = np.empty(n, dtype=np.intp)
            for row, (sample, value) in enumerate(zip(index, values, strict=True)):
                if value not in position:
                    raise CombatError(
                        f"level {value!r} (sample {sample!r}) was not seen at fit time; "
                        f"known levels: {list(levels)}",
                        subject=name,
                    )
                codes[row] = position[value]
            block = np.zeros((n, len(levels) - 1), dtype=np.float64)
            for k in range(1, len(levels)):
                block[codes == k, k - 1] = 1.0
            blocks.append(block)
        for name in self.continuous:
            column = table[name]
            if not pd.api.types.is_numeric_dtype(column.dtype) or pd.api.types.is_bool_dtype(column.dtype):
                raise CombatError(
                    f"continuous covariate is not numeric (dtype {column.dtype}); "
                    "name it in categorical= instead",
                    subject=name,
                )
            values_f = column.to_numpy(dtype=np.float64)
            bad = ~np.isfinite(values_f)
            if bad.any():
                sample = index[int(np.argmax(bad))]
                raise CombatError(
                    f"continuous covariate is missing or infinite for sample {sample!r}", subject=name
                )
            blocks.append(values_f[:, None])
        return np.hstack(blocks) if blocks else np.zeros((n, 0), dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "categorical": [{"name": name, "levels": list(levels)} for name, levels in self.categorical],
            "continuous": list(self.continuous),
        }

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> CovariateEncoding:
        try:
            categorical = tuple(
                (str(item["name"]), tuple(_label(v, "covariate levels") for v in item["levels"]))
                for item in payload["categorical"]
            )
            continuous = tuple(str(name) for name in payload["continuous"])
        except (KeyError, TypeError) as exc:
            raise CombatError(f"malformed covariate encoding: {exc!r}", subject="covariates") from exc
        return cls(categorical, continuous)


# --------------------------------------------------------------------------- the model


def _frozen_array(values: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    array = np.array(values, dtype=np.float64, copy=True)
    if array.shape != shape:
        raise CombatError(f"{what} has shape {array.shape}, expected {shape}", subject=what)
    if not np.isfinite(array).all():
        raise CombatError(f"{what} contains non-finite values", subject=what)
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class CombatModel:
    """A fitted ComBat model: everything :meth:`apply` needs, JSON-serialisable.

    Arrays are float64 and read-only: ``grand_mean``, ``var_pooled`` (features,),
    ``covariate_coef`` (design covariate columns × features), ``gamma_star`` and
    ``delta_star`` (batches × features, in ``batch_levels`` order; the reference batch,
    if any, has ``gamma* = 0``, ``delta* = 1`` and its rows are passed through).
    """

    features: tuple[Label, ...]
    batch_levels: tuple[Label, ...]
    batch_sizes: tuple[int, ...]
    method: Method
    mean_only: bool
    reference_batch: Label | None
    covariates: CovariateEncoding
    grand_mean: np.ndarray
    covariate_coef: np.ndarray
    var_pooled: np.ndarray
    gamma_star: np.ndarray
    delta_star: np.ndarray
    _position: dict[Label, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        p, b, k = len(self.features), len(self.batch_levels), len(self.covariates.columns)
        if self.method not in _METHODS:
            raise CombatError(f"unknown method {self.method!r}; choose one of {_METHODS}", subject="method")
        if len(self.batch_sizes) != b:
            raise CombatError("batch_sizes and batch_levels differ in length", subject="batch_sizes")
        if len(set(self.features)) != p:
            raise CombatError("feature names must be unique", subject="features")
        if len(set(self.batch_levels)) != b:
            raise CombatError("batch levels must be unique", subject="batch_levels")
        if self.reference_batch is not None and self.reference_batch not in self.batch_levels:
            raise CombatError(
                "reference batch is not one of the batch levels", subject=str(self.reference_batch)
            )
        for name, shape in (
            ("grand_mean", (p,)),
            ("covariate_coef", (k, p)),
            ("var_pooled", (p,)),
            ("gamma_star", (b, p)),
            ("delta_star", (b, p)),
        ):
            object.__setattr__(self, name, _frozen_array(getattr(self, name), shape, name))
        if (self.var_pooled <= 0).any() or (self.delta_star <= 0).any():
            raise CombatError("variances must be positive", subject="var_pooled/delta_star")
        object.__setattr__(self, "_position", {level: i for i, level in enumerate(self.batch_levels)})

    @property
    def reference_index(self) -> int | None:
        return None if self.reference_batch is None else self._position[self.reference_batch]

    def apply(
        self, data: pd.DataFrame, batch: pd.Series, covariates: pd.DataFrame | None = None
    ) -> pd.DataFrame:
        """Harmonise rows (samples × the fitted features, any column order) of seen batches.

        Returns a new float64 frame with the same index and columns as ``data``; rows of
        the reference batch are returned unchanged.
        """
        values = _numeric_matrix(data)
        present = list(data.columns)
        if set(present) != set(self.features):
            missing = [f for f in self.features if f not in set(present)]
            extra = [f for f in present if f not in set(self.features)]
            culprit = missing[0] if missing else extra[0]
            raise CombatError(
                f"data columns must be the {len(self.features)} fitted features; "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})",
                subject=_name(culprit),
            )
        where = {f: c for c, f in enumerate(present)}
        order = [where[f] for f in self.features] if present != list(self.features) else None
        y = values[:, order] if order is not None else values
        codes = self._batch_codes(_batch_labels(batch, data.index), data.index)
        x = self.covariates.encode(covariates, data.index)
        out = _adjust(y, codes, x, self)
        ref = self.reference_index
        if ref is not None:
            rows = codes == ref
            out[rows] = y[rows]
        if not np.isfinite(out).all():  # cannot happen with a valid model and finite data
            raise CombatError("harmonisation produced non-finite values")
        if order is not None:
            out = out[:, np.argsort(order)]
        return pd.DataFrame(out, index=data.index.copy(), columns=data.columns.copy())

    def _batch_codes(self, labels: Sequence[Label], index: pd.Index) -> np.ndarray:
        codes = np.empty(len(labels), dtype=np.intp)
        for row, label in enumerate(labels):
            code = self._position.get(label)
            if code is None:
                raise CombatError(
                    f"sample {index[row]!r} is in a batch not seen at fit time; "
                    f"fitted batches: {list(self.batch_levels)}",
                    subject=_batch(label),
                )
            codes[row] = code
        return codes

    # ---- serialisation

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (floats round-trip exactly through :mod:`json`)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "method": self.method,
            "mean_only": self.mean_only,
            "reference_batch": self.reference_batch,
            "features": list(self.features),
            "batch_levels": list(self.batch_levels),
            "batch_sizes": list(self.batch_sizes),
            "covariates": self.covariates.to_dict(),
            "covariate_columns": list(self.covariates.columns),
            "grand_mean": self.grand_mean.tolist(),
            "covariate_coef": self.covariate_coef.tolist(),
            "var_pooled": self.var_pooled.tolist(),
            "gamma_star": self.gamma_star.tolist(),
            "delta_star": self.delta_star.tolist(),
        }

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> CombatModel:
        if payload.get("format") != _FORMAT:
            raise CombatError(f"not a ComBat model (format {payload.get('format')!r})", subject="format")
        if payload.get("version") != _VERSION:
            raise CombatError(
                f"unsupported ComBat model version {payload.get('version')!r}", subject="version"
            )
        try:
            covariates = CovariateEncoding.from_dict(payload["covariates"])
            k = len(covariates.columns)
            ref = payload["reference_batch"]
            mean_only = payload["mean_only"]
            if not isinstance(mean_only, bool):
                raise TypeError("mean_only must be a boolean")
            coef = payload["covariate_coef"]
            return cls(
                features=tuple(_label(f, "feature names") for f in payload["features"]),
                batch_levels=tuple(_label(b, "batch labels") for b in payload["batch_levels"]),
                batch_sizes=tuple(int(n) for n in payload["batch_sizes"]),
                method=cast(Method, payload["method"]),
                mean_only=mean_only,
                reference_batch=None if ref is None else _label(ref, "reference batch"),
                covariates=covariates,
                grand_mean=np.asarray(payload["grand_mean"], dtype=np.float64),
                covariate_coef=np.asarray(coef, dtype=np.float64).reshape(k, len(payload["features"])),
                var_pooled=np.asarray(payload["var_pooled"], dtype=np.float64),
                gamma_star=np.asarray(payload["gamma_star"], dtype=np.float64),
                delta_star=np.asarray(payload["delta_star"], dtype=np.float64),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CombatError):
                raise
            raise CombatError(f"malformed ComBat model: {exc!r}", subject="model") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, indent=1) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the model as JSON; returns the path."""
        target = Path(path)
        target.write_text(self.to_json(), encoding="utf-8")
        return target

    @classmethod
    def load(cls, path: str | Path) -> CombatModel:
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CombatError(f"not valid JSON: {exc}", subject=str(path)) from exc
        if not isinstance(payload, dict):
            raise CombatError("not a ComBat model (expected a JSON object)", subject=str(path))
        return cls.from_dict(payload)


# --------------------------------------------------------------------------- estimation


def _stand_mean(grand_mean: np.ndarray, coef: np.ndarray, x: np.ndarray) -> np.ndarray:
    """alpha + x' beta for every row: the part of the data ComBat keeps."""
    mean = np.broadcast_to(grand_mean, (x.shape[0], grand_mean.shape[0]))
    return mean + x @ coef if coef.shape[0] else mean.copy()


def _standardise(
    y: np.ndarray, x: np.ndarray, model_like: CombatModel | _Fit
) -> tuple[np.ndarray, np.ndarray]:
    stand = _stand_mean(model_like.grand_mean, model_like.covariate_coef, x)
    return (y - stand) / np.sqrt(model_like.var_pooled), stand


def _adjust(y: np.ndarray, codes: np.ndarray, x: np.ndarray, model: CombatModel) -> np.ndarray:
    z, stand = _standardise(y, x, model)
    adjusted = (z - model.gamma_star[codes]) / np.sqrt(model.delta_star[codes])
    return adjusted * np.sqrt(model.var_pooled) + stand


@dataclass(frozen=True)
class _Fit:
    grand_mean: np.ndarray
    covariate_coef: np.ndarray
    var_pooled: np.ndarray


def _postmean(g_hat: np.ndarray, g_bar: float, n: float, d_star: np.ndarray, t2: float) -> np.ndarray:
    return (t2 * n * g_hat + d_star * g_bar) / (t2 * n + d_star)


def _postvar(sum2: np.ndarray, n: float, a: float, b: float) -> np.ndarray:
    return (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)


def _priors(delta_hat: np.ndarray, level: Label) -> tuple[float, float]:
    """Method-of-moments inverse-gamma prior (``aprior``/``bprior`` in R)."""
    m = float(delta_hat.mean())
    s2 = float(delta_hat.var(ddof=1))
    if not (s2 > 0 and math.isfinite(s2)):
        raise CombatError(
            "the within-batch variances are identical across features: the inverse-gamma prior of the "
            "parametric empirical Bayes step is undefined; use method='nonparametric' or 'none'",
            subject=_batch(level),
        )
    return (2 * s2 + m**2) / s2, (m * s2 + m**3) / s2


def _it_sol(
    z: np.ndarray,
    g_hat: np.ndarray,
    d_hat: np.ndarray,
    g_bar: float,
    t2: float,
    a: float,
    b: float,
    level: Label,
) -> tuple[np.ndarray, np.ndarray]:
    """Parametric EB fixed point, as R's ``it.sol`` (including its convergence test)."""
    n = float(z.shape[0])
    g_old, d_old = g_hat, d_hat
    for _ in range(_MAX_ITERATIONS):
        g_new = _postmean(g_hat, g_bar, n, d_old, t2)
        sum2 = ((z - g_new) ** 2).sum(axis=0)
        d_new = _postvar(sum2, n, a, b)
        with np.errstate(divide="ignore", invalid="ignore"):
            # R: max(abs(g.new-g.old)/g.old, abs(d.new-d.old)/d.old): the denominator keeps its sign.
            ratios = np.concatenate((np.abs(g_new - g_old) / g_old, np.abs(d_new - d_old) / d_old))
        ratios = ratios[~np.isnan(ratios)]  # 0/0: no change
        change = float(ratios.max()) if ratios.size else 0.0
        g_old, d_old = g_new, d_new
        if not change > _CONV:
            return g_new, d_new
    raise CombatError(
        f"parametric empirical Bayes did not converge in {_MAX_ITERATIONS} iterations", subject=_batch(level)
    )


def _int_eprior(
    z: np.ndarray, g_hat: np.ndarray, d_hat: np.ndarray, level: Label
) -> tuple[np.ndarray, np.ndarray]:
    """Non-parametric EB (R's ``int.eprior``): each feature's batch parameters are the
    likelihood-weighted average of the other features' estimates. Computed in log space,
    which gives the same weights without the underflow of R's ``exp``."""
    n, p = z.shape
    g_star = np.empty(p)
    d_star = np.empty(p)
    log_norm = np.full(p, -np.inf)
    positive = d_hat > 0
    log_norm[positive] = -0.5 * n * np.log(2.0 * np.pi * d_hat[positive])
    safe_d = np.where(positive, d_hat, 1.0)
    block = max(1, _BLOCK_VALUES // max(1, p * n))
    for start in range(0, p, block):
        stop = min(p, start + block)
        x = z[:, start:stop].T  # (features in block, n)
        resid = x[:, None, :] - g_hat[None, :, None]  # (block, p, n)
        sum2 = (resid**2).sum(axis=2)
        log_lh = log_norm[None, :] - sum2 / (2.0 * safe_d[None, :])
        log_lh[:, ~positive] = -np.inf
        rows = np.arange(stop - start)
        log_lh[rows, start + rows] = -np.inf  # leave the feature itself out
        top = log_lh.max(axis=1, keepdims=True)
        if not np.isfinite(top).all():
            culprit = start + int(np.argmin(np.isfinite(top[:, 0])))
            raise CombatError(
                f"non-parametric empirical Bayes has no usable feature to borrow from for feature #{culprit}",
                subject=_batch(level),
            )
        weights = np.exp(log_lh - top)
        total = weights.sum(axis=1)
        g_star[start:stop] = weights @ g_hat / total
        d_star[start:stop] = weights @ d_hat / total
    return g_star, d_star


def fit_combat(
    data: pd.DataFrame,
    batch: pd.Series,
    *,
    covariates: pd.DataFrame | None = None,
    categorical: Sequence[str] = (),
    continuous: Sequence[str] = (),
    method: Method = "parametric",
    mean_only: bool = False,
    reference_batch: Label | None = None,
) -> CombatModel:
    """Fit ComBat on ``data`` (rows = samples, columns = features).

    ``batch`` and ``covariates`` are indexed like the rows of ``data``. Covariate columns
    named in ``categorical`` are treatment-coded, those in ``continuous`` enter linearly;
    other columns of ``covariates`` are ignored. ``method`` is the empirical Bayes flavour
    (``"none"``: plain location/scale estimates). With ``reference_batch``, the other
    batches are mapped onto that batch, whose rows stay unchanged.
    """
    if method not in _METHODS:
        raise CombatError(f"unknown method {method!r}; choose one of {_METHODS}", subject="method")
    y = _numeric_matrix(data)
    features = tuple(_label(f, "feature names") for f in data.columns)
    labels = _batch_labels(batch, data.index)
    levels = _sorted_levels(labels)
    n_samples, n_features = y.shape
    if len(levels) < 2:
        raise CombatError(f"need at least two batches to harmonise, found {list(levels)}", subject="batch")
    position = {level: i for i, level in enumerate(levels)}
    codes = np.array([position[label] for label in labels], dtype=np.intp)
    sizes = np.bincount(codes, minlength=len(levels))
    if not mean_only:
        for level, size in zip(levels, sizes, strict=True):
            if size < 2:
                raise CombatError(
                    "a single sample: its variance cannot be estimated "
                    "(mean_only=True adjusts the location only and accepts it)",
                    subject=_batch(level),
                )
    ref: int | None = None
    if reference_batch is not None:
        ref_label = _label(reference_batch, "reference batch")
        if ref_label not in position:
            raise CombatError(
                f"reference batch not present; batches are {list(levels)}", subject=_batch(ref_label)
            )
        ref = position[ref_label]
    encoding = CovariateEncoding.fit(covariates, categorical, continuous, data.index)
    x = encoding.encode(covariates, data.index)

    # Design: batch indicators (the reference batch's column is all ones: an intercept) + covariates.
    batch_design = np.zeros((n_samples, len(levels)))
    batch_design[np.arange(n_samples), codes] = 1.0
    if ref is not None:
        batch_design[:, ref] = 1.0
    design = np.hstack((batch_design, x))
    if n_samples <= design.shape[1]:
        raise CombatError(
            f"{n_samples} samples are too few for {len(levels)} batches and {x.shape[1]} covariate column(s)"
        )
    _check_design(design, batch_design, x, encoding)
    b_hat = np.linalg.solve(design.T @ design, design.T @ y)
    if ref is not None:
        grand_mean = b_hat[ref].copy()
    else:
        grand_mean = (sizes / n_samples) @ b_hat[: len(levels)]
    coef = b_hat[len(levels) :].copy()
    resid = y - design @ b_hat
    pooled_rows = codes == ref if ref is not None else np.ones(n_samples, dtype=bool)
    # The 1/n pooled variance of sva/neuroCombat (over the reference batch only when there is one).
    var_pooled = (resid[pooled_rows] ** 2).mean(axis=0)
    _check_constant(var_pooled, y, pooled_rows, features, None if ref is None else levels[ref])

    fit = _Fit(grand_mean, coef, var_pooled)
    z, _ = _standardise(y, x, fit)
    gamma_star = np.zeros((len(levels), n_features))
    delta_star = np.ones((len(levels), n_features))
    if method != "none" and n_features < 2:
        raise CombatError("empirical Bayes needs at least two features; use method='none'", subject="method")
    for i, level in enumerate(levels):
        if i == ref:
            continue  # gamma* = 0, delta* = 1, rows passed through
        zi = z[codes == i]
        g_hat = zi.mean(axis=0)
        d_hat = np.ones(n_features) if mean_only else zi.var(axis=0, ddof=1)
        zero = np.flatnonzero(d_hat <= 0)
        if method == "none" and zero.size:
            raise CombatError(
                f"feature {features[zero[0]]!r} is constant within batch {level!r}: "
                "its scale cannot be adjusted without empirical Bayes (use mean_only=True or EB)",
                subject=_name(features[zero[0]]),
            )
        if method == "none":
            g_star, d_star = g_hat, d_hat
        elif method == "parametric":
            g_bar, t2 = float(g_hat.mean()), float(g_hat.var(ddof=1))
            if mean_only:  # as R: postmean(g.hat, g.bar, n = 1, d.star = 1, t2), not n = batch size
                g_star, d_star = _postmean(g_hat, g_bar, 1.0, np.ones(n_features), t2), d_hat
            else:
                a, b = _priors(d_hat, level)
                g_star, d_star = _it_sol(zi, g_hat, d_hat, g_bar, t2, a, b, level)
        else:
            g_star, d_star = _int_eprior(zi, g_hat, d_hat, level)
        if not (np.isfinite(g_star).all() and np.isfinite(d_star).all() and (d_star > 0).all()):
            bad = np.flatnonzero(~(np.isfinite(g_star) & np.isfinite(d_star) & (d_star > 0)))[0]
            raise CombatError(
                f"batch {level!r}: the {method} estimate for feature {features[bad]!r} is degenerate",
                subject=_name(features[bad]),
            )
        gamma_star[i], delta_star[i] = g_star, d_star

    return CombatModel(
        features=features,
        batch_levels=levels,
        batch_sizes=tuple(int(s) for s in sizes),
        method=method,
        mean_only=bool(mean_only),
        reference_batch=None if ref is None else levels[ref],
        covariates=encoding,
        grand_mean=grand_mean,
        covariate_coef=coef,
        var_pooled=var_pooled,
        gamma_star=gamma_star,
        delta_star=delta_star,
    )


def _check_design(
    design: np.ndarray, batch_design: np.ndarray, x: np.ndarray, encoding: CovariateEncoding
) -> None:
    """Refuse a rank-deficient design, naming the covariate column that makes it so."""
    if np.linalg.matrix_rank(design) == design.shape[1]:
        return
    if x.shape[1] and np.linalg.matrix_rank(x) < x.shape[1]:
        raise CombatError("the covariates are confounded with each other (collinear design columns)")
    columns = encoding.columns
    for k in range(x.shape[1]):
        partial = np.hstack((batch_design, x[:, : k + 1]))
        if np.linalg.matrix_rank(partial) < partial.shape[1]:
            raise CombatError(
                "covariate is confounded with batch (the design is singular): its effect cannot be told "
                "apart from the batch effect; remove it",
                subject=columns[k],
            )
    raise CombatError("the design matrix is singular (covariates confounded with batch)")


def _check_constant(
    var_pooled: np.ndarray, y: np.ndarray, rows: np.ndarray, features: Sequence[Label], ref: Label | None
) -> None:
    """A feature with no residual variance cannot be standardised: name it."""
    scale = np.abs(y[rows]).max(axis=0)
    flat = np.sqrt(var_pooled) <= _CONSTANT_RTOL * scale
    if not flat.any():
        return
    k = int(np.argmax(flat))
    feature = features[k]
    where = f"in reference batch {ref!r}" if ref is not None else "across samples"
    if np.ptp(y[rows, k]) == 0:
        reason = (
            f"feature {feature!r} is constant {where} ({flat.sum()} such feature(s)); drop it before ComBat"
        )
    else:
        reason = (
            f"feature {feature!r} has no variance left {where} once batch and covariate effects are "
            f"removed ({flat.sum()} such feature(s)); drop it before ComBat"
        )
    raise CombatError(reason, subject=_name(feature))


def harmonise_combat(
    data: pd.DataFrame,
    batch: pd.Series,
    *,
    covariates: pd.DataFrame | None = None,
    categorical: Sequence[str] = (),
    continuous: Sequence[str] = (),
    method: Method = "parametric",
    mean_only: bool = False,
    reference_batch: Label | None = None,
) -> pd.DataFrame:
    """Fit ComBat on ``data`` and harmonise the same rows (see :func:`fit_combat`)."""
    model = fit_combat(
        data,
        batch,
        covariates=covariates,
        categorical=categorical,
        continuous=continuous,
        method=method,
        mean_only=mean_only,
        reference_batch=reference_batch,
    )
    return model.apply(data, batch, covariates)
