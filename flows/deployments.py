"""Deployments: the cohort and analysis flows as forms in the Prefect UI, and a nightly run.

``cohort serve`` (see :func:`serve_deployments`) registers three deployments with
a Prefect server and serves them from this process (Prefect's ``serve``: flow
runs start as subprocesses here, no work pool needed):

* ``cohort-run/cohort`` — parameters a user fills in the UI: archive, store, an
  optional cohort spec file, executor (``dask``/``threads``), workers, the address
  of an existing Dask scheduler, a segmentation model (``none`` turns the spec's off);
* ``cohort-analysis/analysis`` — store, clinical CSV, time/event columns, ROI,
  an optional analysis spec file;
* ``cohort-run/nightly`` — the cohort run with fixed parameters on a cron
  schedule (02:00 by default). Every run indexes the archive again and processes
  only the (series, RTSTRUCT, ROI) keys its feature table does not hold yet, so a
  nightly run on an unchanged archive does no image work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow

from cohort.spec import CohortSpec, build_spec, load_spec
from flows.analyse_cohort import analyse_cohort
from flows.process_cohort import process_cohort
from flows.runtime import task_runner_for

NIGHTLY_CRON = "0 2 * * *"


def cohort_spec_from_parameters(
    archive: str,
    store: str,
    spec_file: str | None = None,
    executor: Literal["dask", "threads"] | None = None,
    n_workers: int | None = None,
    scheduler_address: str | None = None,
    segmentation_model: str | None = None,
) -> CohortSpec:
    """The cohort spec a deployment run uses: the spec file (or defaults) with the UI's fields on top."""
    overrides: dict[str, Any] = {"archive": archive, "store": store}
    if segmentation_model:
        off = segmentation_model.strip().lower() == "none"
        overrides["segmentation"] = {"model": None if off else segmentation_model}
    runner: dict[str, Any] = {}
    if executor:
        runner["kind"] = executor
    if n_workers:
        runner["n_workers"] = n_workers
    if scheduler_address:
        runner["address"] = scheduler_address
    if runner:
        overrides["executor"] = runner
    if spec_file:
        return load_spec(Path(spec_file), overrides=overrides)
    return build_spec({}, overrides=overrides, source="<deployment parameters>")


@flow(name="cohort-run", log_prints=False)
def cohort_run(
    archive: str,
    store: str,
    spec_file: str | None = None,
    executor: Literal["dask", "threads"] | None = None,
    n_workers: int | None = None,
    scheduler_address: str | None = None,
    segmentation_model: str | None = None,
) -> dict[str, Any]:
    """Index an archive and process what its store does not hold yet (the UI's entry point).

    ``segmentation_model``: a model of the registry (``demo-lung-gtv``) or a model folder to segment every
    selected CT with (radiomics of its mask beside the RTSTRUCT's); ``none`` turns off the spec's model.
    """
    spec = cohort_spec_from_parameters(
        archive, store, spec_file, executor, n_workers, scheduler_address, segmentation_model
    )
    runner = task_runner_for(spec.executor)
    return process_cohort.with_options(task_runner=runner)(spec.model_dump(mode="json"))


@flow(name="cohort-analysis")
def cohort_analysis(
    store: str,
    clinical: str,
    time: str,
    event: str,
    roi: str = "GTV",
    table: str | None = None,
    spec_file: str | None = None,
) -> dict[str, Any]:
    """ComBat, survival and exploration on a feature table (the UI's entry point)."""
    from cohort.cli import load_analysis_spec

    fields = {"store": store, "clinical": clinical, "time": time, "event": event, "roi": roi, "table": table}
    if spec_file:
        analysis = load_analysis_spec(Path(spec_file))
        spec = analysis.model_copy(update={k: v for k, v in fields.items() if v is not None})
        payload = spec.model_dump(mode="json")
    else:
        payload = {k: v for k, v in fields.items() if v is not None}
    return analyse_cohort(payload)


def build_deployments(
    *,
    nightly_archive: str | None = None,
    nightly_store: str | None = None,
    nightly_spec: str | None = None,
    cron: str = NIGHTLY_CRON,
) -> list[Any]:
    """The deployments ``cohort serve`` registers (the nightly one when an archive and store are given)."""
    deployments = [
        cohort_run.to_deployment(
            name="cohort",
            description="Process a DICOM archive into the feature store (only what is not there yet).",
            tags=["cohort"],
        ),
        cohort_analysis.to_deployment(
            name="analysis",
            description="ComBat, survival analysis and feature exploration on a feature table.",
            tags=["cohort"],
        ),
    ]
    if nightly_archive and nightly_store:
        parameters: dict[str, Any] = {"archive": nightly_archive, "store": nightly_store}
        if nightly_spec:
            parameters["spec_file"] = nightly_spec
        deployments.append(
            cohort_run.to_deployment(
                name="nightly",
                cron=cron,
                parameters=parameters,
                description=f"Nightly reprocessing of {nightly_archive} ({cron}).",
                tags=["cohort", "nightly"],
            )
        )
    return deployments


def serve_deployments(deployments: list[Any], *, limit: int | None = None) -> None:
    """Register the deployments and run their flow runs from this process until interrupted."""
    from prefect import serve

    serve(*deployments, limit=limit, print_starting_message=False)
