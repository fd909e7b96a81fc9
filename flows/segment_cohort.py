"""The ``segment-cohort`` flow: archive -> index -> selection -> segmentation shards -> store.

Each selected CT is segmented by an ONNX model from the registry; volume, RECIST
and volumetric RECIST go to ``segmentation/<model>-<sha12>`` in the store (``sha12``: of
the ONNX file's and the manifest's hashes; one row
per series and model file, replaced when the image changes), and where the case's
structure set has the reference ROI, Dice / HD95 / surface Dice / added path
length against it. The run attaches the metric distribution (median, IQR; by
slice thickness and tumour size) as an artifact. With ``gpu=True`` the shards ask
Dask for ``resources={"GPU": 1}``, so only workers started with
``--resources GPU=1`` take them.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from cohort.curate.select import WorkItem, plan_cohort
from cohort.segment.cohort import SEGMENT_KEY_COLUMNS, SegmentSettings, segment_items, summarise_metrics
from cohort.segment.model import load_model
from cohort.shard import make_shards
from cohort.spec import CohortSpec, build_spec
from cohort.store.layout import StoreLayout
from cohort.store.location import Location
from cohort.store.objects import open_table
from cohort.store.parquet import write_part, write_table_atomic
from flows.process_cohort import _current_run_id, index_archive
from flows.runtime import gpu_placement, prefect_api, task_runner_for

#: Version columns of a segmentation row: a changed image series is segmented again.
SEGMENT_VERSION_COLUMNS = ("image_hash",)


def segmentation_location(layout: StoreLayout, table: str) -> Location:
    """Where a model's segmentation table lives: ``segmentation/<model>-<sha12>``."""
    return layout.root / "segmentation" / table


@task(name="segment-shard", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=1)
def segment_shard_task(
    items: list[WorkItem], settings: SegmentSettings, store: str, table: str
) -> dict[str, int]:
    result = segment_items(items, settings)
    layout = StoreLayout.at(store)
    written = 0
    if result.rows:
        appended = open_table(segmentation_location(layout, table)).append(
            pa.Table.from_pylist(result.rows), SEGMENT_KEY_COLUMNS, SEGMENT_VERSION_COLUMNS
        )
        written = appended.written + appended.replaced
    if result.failures:
        keys = [f"segment|{i.series_uid}" for i in items]
        write_part(pa.Table.from_pylist(result.failures), layout.failures(settings.run_id), keys)
    return {"rows": written, "failures": len(result.failures)}


@flow(name="segment-cohort")
def segment_cohort(
    spec: dict[str, Any], model: str = "demo-lung-gtv", compare_to: str | None = "GTV", gpu: bool = False
) -> dict[str, Any]:
    """Segment the selected CTs of a cohort spec with a registry model; measure and compare."""
    cohort_spec = build_spec(spec, environ={})
    logger = get_run_logger()
    run_id = _current_run_id()
    layout = StoreLayout.at(cohort_spec.store)
    t0 = time.perf_counter()
    instances, _quarantine, _update = index_archive(cohort_spec, layout, logger)
    items = list(plan_cohort(instances, cohort_spec).items)
    spec_model = load_model(model)  # fails here, clearly, before any shard
    # One table per model file and manifest (window, grid, chain): another of either is another table.
    fingerprint = hashlib.sha256((spec_model.sha256 + spec_model.manifest_sha256).encode()).hexdigest()
    table_name = f"{spec_model.name}-{fingerprint[:12]}"
    table = open_table(segmentation_location(layout, table_name))
    done = table.key_versions(SEGMENT_KEY_COLUMNS, SEGMENT_VERSION_COLUMNS)
    todo = [i for i in items if done.get((i.series_uid, spec_model.sha256)) not in {(i.image_hash,), ()}]
    settings = SegmentSettings(model=model, run_id=run_id, compare_to=compare_to)
    executor = cohort_spec.executor
    shards = make_shards(todo, cohort_spec.shard_slices, min_shards=2 * executor.n_workers)
    with gpu_placement(executor, gpu):
        futures = [segment_shard_task.submit(s, settings, layout.root.url, table_name) for s in shards]
    rows = failures = 0
    for future in as_completed(futures):
        outcome = future.result()
        rows, failures = rows + outcome["rows"], failures + outcome["failures"]
    stored = table.read()
    summary = summarise_metrics(stored.to_pandas()) if stored is not None else None
    if summary is not None:
        write_table_atomic(
            pa.Table.from_pandas(summary, preserve_index=False),
            layout.run_dir(run_id) / "segmentation-metrics.parquet",
        )
        create_markdown_artifact(
            key="cohort-segmentation",
            description=f"{spec_model.name} {spec_model.version} against {compare_to}",
            markdown=_markdown_table(summary.round(3)),
        )
    logger.info(
        "segmented %d of %d case(s) (%d already done), %d failure(s), %.1f s",
        rows,
        len(todo),
        len(items) - len(todo),
        failures,
        time.perf_counter() - t0,
    )
    return {
        "run_id": run_id,
        "table": segmentation_location(layout, table_name).url,
        "cases": len(items),
        "segmented": rows,
        "skipped": len(items) - len(todo),
        "failures": failures,
    }


def _markdown_table(frame: Any) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def run_segmentation(
    spec: CohortSpec,
    *,
    model: str = "demo-lung-gtv",
    compare_to: str | None = "GTV",
    gpu: bool = False,
    prefect_home: Path | None = None,
) -> dict[str, Any]:
    """Run ``segment-cohort`` with the spec's executor against a Prefect API (a local server when none)."""
    with prefect_api(prefect_home):
        runner = task_runner_for(spec.executor)
        flow_fn = segment_cohort.with_options(task_runner=runner)
        return flow_fn(spec.model_dump(mode="json"), model=model, compare_to=compare_to, gpu=gpu)
