"""A self-contained HTML report of a cohort analysis (figures inline as SVG)."""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cohort.analysis.explore import figure_to_svg, plot_correlation_heatmap
from cohort.analysis.pipeline import AnalysisResult, describe

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.note { color: #555; } svg { max-width: 100%; height: auto; }
"""


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_kaplan_meier(km: pd.DataFrame, *, title: str, unit: str) -> Figure:
    """KM curves with their confidence bands, one per group."""
    figure = _figure(6.5, 4.0)
    axes = figure.add_subplot()
    for group, part in km.groupby("group", sort=True):
        line = axes.step(part["time"], part["survival"], where="post", label=str(group))[0]
        axes.fill_between(
            part["time"], part["lower"], part["upper"], step="post", alpha=0.2, color=line.get_color()
        )
    axes.set_xlabel(f"time ({unit})")
    axes.set_ylabel("survival probability")
    axes.set_ylim(0, 1.02)
    axes.set_title(title)
    axes.legend()
    return figure


def plot_forest(cox: pd.DataFrame, *, top_k: int) -> Figure:
    """Hazard ratios per SD with 95 % intervals, the ``top_k`` smallest p-values."""
    rows = cox.head(top_k).iloc[::-1]
    figure = _figure(7.0, 0.45 * len(rows) + 1.2)
    axes = figure.add_subplot()
    y = np.arange(len(rows))
    axes.errorbar(
        rows["hr"], y, xerr=[rows["hr"] - rows["hr_lower"], rows["hr_upper"] - rows["hr"]], fmt="o", capsize=3
    )
    axes.axvline(1.0, color="grey", linestyle="--")
    axes.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    axes.xaxis.set_major_locator(LogLocator(base=10, subs=(0.25, 0.5, 1.0, 2.0, 4.0)))
    axes.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes.xaxis.set_minor_formatter(FormatStrFormatter(""))
    axes.set_yticks(y, [str(c) for c in rows["covariate"]], fontsize=7)
    axes.set_xlabel("hazard ratio per SD (95 % CI)")
    axes.set_title("univariate Cox, standardised features")
    return figure


def _table(frame: pd.DataFrame, digits: int = 4) -> str:
    return frame.to_html(float_format=lambda v: f"{v:.{digits}g}", border=0, escape=True)


def render_report(result: AnalysisResult) -> str:
    """The analysis as one HTML page."""
    spec = result.spec
    head = describe(result)
    sections = [
        f"<h1>Cohort analysis: {html.escape(spec.name)}</h1>",
        f"<p class='note'>{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · ROI {html.escape(spec.roi)} · "
        f"table {html.escape(str(spec.table))} · "
        + " · ".join(html.escape(n) for n in result.notes)
        + "</p>",
        "<h2>Headline</h2>",
        _table(pd.DataFrame([head]).T.rename(columns={0: "value"})),
        f"<h2>Kaplan–Meier: {html.escape(spec.km_feature)} above vs at-or-below the median</h2>",
        figure_to_svg(
            plot_kaplan_meier(
                result.km, title=f"log-rank p = {result.logrank.p_value:.3g}", unit=spec.report_unit
            )
        ),
        "<h2>Univariate Cox (features standardised)</h2>",
        figure_to_svg(plot_forest(result.cox, top_k=spec.top_k)),
        _table(
            result.cox.head(spec.top_k)[["covariate", "hr", "hr_lower", "hr_upper", "p_value", "concordance"]]
        ),
    ]
    if result.batch_means_before is not None and result.batch_means_after is not None:
        shown = result.cox.head(5)["covariate"].tolist()
        sections += [
            f"<h2>ComBat over {html.escape(str(spec.batch))}: batch means of the top features</h2>",
            "<h3>before</h3>",
            _table(result.batch_means_before.loc[shown]),
            "<h3>after</h3>",
            _table(result.batch_means_after.loc[shown]),
        ]
    top = result.cox.head(spec.top_k)["covariate"].tolist()
    if len(top) >= 2:
        sections += [
            "<h2>Spearman correlation of the top features</h2>",
            figure_to_svg(plot_correlation_heatmap(result.table[top])),
        ]
    if not result.surrogates.empty:
        flagged = result.surrogates[result.surrogates["surrogate"]]
        sections += [
            f"<h2>Volume surrogates (|rho| with {html.escape(spec.km_feature)} ≥ 0.8): "
            f"{len(flagged)} of {len(result.surrogates)}</h2>",
            _table(flagged.head(30)),
        ]
    sections += ["<h2>Summary statistics</h2>", _table(result.summary.head(40))]
    body = "\n".join(sections)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(spec.name)}</title>"
        f"<style>{_CSS}</style></head><body>{body}</body></html>"
    )
