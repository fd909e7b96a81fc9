"""The ``analyse-cohort`` flow: store table + clinical table -> harmonised table + report.

Writes, under ``<store>/analysis/<name>/``: ``harmonised.parquet`` (keys,
clinical columns and ComBat-harmonised features, one row per patient's ROI),
``combat-model.json`` (the fitted model, to harmonise new rows later with
``CombatModel.load(...).apply(...)``), ``cox.parquet`` and ``report.html``; and
attaches the headline numbers and the top Cox table to the Prefect run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from cohort.analysis.pipeline import AnalysisSpec, describe, run_analysis
from cohort.analysis.report import render_report
from cohort.store.api import open_store
from cohort.store.parquet import write_table_atomic
from flows.runtime import prefect_api

ARTIFACT_KEY = "cohort-analysis"


@task(name="analyse", cache_policy=NO_CACHE)
def analyse_task(spec: AnalysisSpec) -> dict[str, Any]:
    store = open_store(spec.store)
    features = store.read(spec.table)
    clinical = pd.read_csv(spec.clinical)
    result = run_analysis(features, clinical, spec)
    out = store.root / "analysis" / spec.name
    write_table_atomic(pa.Table.from_pandas(result.table, preserve_index=False), out / "harmonised.parquet")
    write_table_atomic(pa.Table.from_pandas(result.cox, preserve_index=False), out / "cox.parquet")
    if result.combat is not None:
        (out / "combat-model.json").write_bytes_atomic(result.combat.to_json().encode())
    (out / "report.html").write_bytes_atomic(render_report(result).encode())
    head = describe(result)
    head["report"] = (out / "report.html").url
    top = result.cox.head(spec.top_k)[["covariate", "hr", "hr_lower", "hr_upper", "p_value"]]
    head["top_cox"] = top.to_dict(orient="records")
    return head


@flow(name="analyse-cohort")
def analyse_cohort(spec: dict[str, Any]) -> dict[str, Any]:
    """Analyse one ROI of a store's feature table with its clinical table."""
    analysis = AnalysisSpec.model_validate(spec)
    logger = get_run_logger()
    head = analyse_task(analysis)
    rows = "\n".join(f"| {k} | {v} |" for k, v in head.items() if k != "top_cox")
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        description="headline numbers",
        markdown=f"# Cohort analysis {analysis.name}\n\n| | |\n|---|---|\n{rows}\n",
    )
    create_table_artifact(key=f"{ARTIFACT_KEY}-cox", table=head["top_cox"], description="top univariate Cox")
    logger.info("report written to %s", head["report"])
    return json.loads(json.dumps(head, default=float))


def run_analysis_flow(spec: AnalysisSpec, *, prefect_home: Path | None = None) -> dict[str, Any]:
    """Run ``analyse-cohort`` against a Prefect API (a local server when none is set)."""
    with prefect_api(prefect_home):
        return analyse_cohort(spec.model_dump(mode="json"))
