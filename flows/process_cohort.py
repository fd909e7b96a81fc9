"""The ``process-cohort`` flow: archive -> index -> selection -> shards -> feature store.

Task bodies only call the library. One Prefect task per *shard* of series (a
Prefect task on Dask costs tens of milliseconds of bookkeeping on its own), and
each shard writes its own feature and failure part files straight from the
worker, so nothing large travels back through the flow.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from cohort.analysis.stability import IccForm, feature_icc
from cohort.curate.report import CaseOverlay, case_overlays, curation_summary_markdown, write_curation_report
from cohort.curate.select import CurationPlan, WorkItem, plan_cohort
from cohort.errors import Stage
from cohort.index import (
    ArchiveSource,
    FileEntry,
    IndexUpdate,
    ReadResult,
    commit_update,
    plan_update,
    read_entries,
    read_instances,
    read_quarantine,
)
from cohort.index.incremental import IndexChangedError
from cohort.radiomics.extract import feature_set_name
from cohort.run import RunSummary, add_seconds, remaining_work
from cohort.shard import (
    FAILURE_SCHEMA,
    KEY_COLUMNS,
    STABILITY_KEY_SCHEMA,
    VERSION_COLUMNS,
    AutoSegmentation,
    ShardSettings,
    StabilitySettings,
    SubvolumeRule,
    make_shards,
    patient_identity,
    process_shard,
    roi_keys,
)
from cohort.spec import CohortSpec, build_spec, settings_hash
from cohort.store.layout import StoreLayout
from cohort.store.location import Location
from cohort.store.objects import FeatureTable, open_table
from cohort.store.parquet import read_table, write_part, write_table_atomic
from cohort.store.results import write_shard_result
from cohort.store.table import COMPACT_AFTER_PARTS
from flows.progress import report
from flows.runtime import gpu_placement, prefect_api, task_runner_for

#: Plans of an index update before giving up when other runs keep committing first.
INDEX_ATTEMPTS = 5
#: Files per index task.
INDEX_CHUNK = 1500


def _keys(items: Sequence[WorkItem]) -> list[str]:
    """Part-file keys of a shard: one per RTSTRUCT ROI it was asked to process."""
    return [f"{i.series_uid}|{i.rtstruct_uid}|{r.source_name}" for i in items for r in i.rois]


@task(name="index-files", cache_policy=NO_CACHE, retries=1)
def index_files_task(archive: ArchiveSource, entries: list[FileEntry]) -> ReadResult:
    return read_entries(archive, entries)


def index_archive(
    spec: CohortSpec, layout: StoreLayout, logger: Any
) -> tuple[pa.Table, pa.Table, IndexUpdate]:
    """Update the archive's index: unchanged files cost a stat; new and changed files are read
    (headers only) in chunks on the workers; deletions are recorded. Returns instances
    (absolute paths), quarantine and what changed."""
    index_root = index_folder(layout)
    for attempt in range(INDEX_ATTEMPTS):
        index_plan = plan_update(spec.archive, index_root)
        report("index", 0, len(index_plan.to_read))
        futures = [index_files_task.submit(index_plan.archive, c) for c in index_plan.chunks(INDEX_CHUNK)]
        results: list[ReadResult] = []
        for index_future in as_completed(futures):
            results.append(index_future.result())
            done = sum(r.instances.num_rows + r.quarantine.num_rows for r in results)
            report("index", done, len(index_plan.to_read))
        try:
            update = commit_update(index_plan, results)
            break
        except IndexChangedError:  # another run updated the index meanwhile: plan again
            if attempt == INDEX_ATTEMPTS - 1:
                raise
            logger.info("the index changed under this run (another run?); planning again")
    instances = read_instances(index_root, absolute_paths=True)
    quarantine = read_quarantine(index_root)
    if not layout.root.is_local:  # the index lives on local disk; the store gets a snapshot
        write_table_atomic(instances, layout.instances / "part-0.parquet")
        write_table_atomic(quarantine, layout.quarantine / "part-0.parquet")
    logger.info(
        "index: %d files listed, %d added, %d changed, %d deleted, %d unchanged (%d read); "
        "%d DICOM instances, %d quarantined",
        update.listed,
        update.added,
        update.changed,
        update.deleted,
        update.unchanged,
        update.files_read,
        update.instances,
        update.quarantined,
    )
    return instances, quarantine, update


#: Cases drawn (image + first GTV contour) in the curation report.
OVERLAY_CASES = 12


@task(name="curation-overlays", cache_policy=NO_CACHE)
def curation_overlays_task(items: list[WorkItem]) -> list[CaseOverlay]:
    return case_overlays(items, max_cases=OVERLAY_CASES)


def curation_report(
    spec: CohortSpec, instances: pa.Table, quarantine: pa.Table, plan: CurationPlan, path: Location
) -> str:
    """The run's curation report (HTML in the store) and its summary as Prefect artifacts."""
    annotated = [i for i in plan.items if not i.automatic]  # automatic masks do not exist before the run
    overlays = [] if spec.executor.noop_stages else curation_overlays_task.submit(annotated).result()
    url = write_curation_report(
        instances, quarantine, plan, path, overlays=overlays, archive_root=str(spec.archive)
    )
    link = f"file://{url}" if path.is_local else url
    create_link_artifact(key="cohort-curation-report", link=link, description="curation report (HTML)")
    create_markdown_artifact(
        key="cohort-curation",
        description="curation summary",
        markdown=curation_summary_markdown(instances, quarantine, plan, report_url=link),
    )
    return url


def index_folder(layout: StoreLayout) -> Path:
    """Where the incremental index lives: in the store when local, else in a local cache per store."""
    if layout.root.is_local:
        return layout.index_dir.local_path()
    digest = hashlib.sha256(layout.root.url.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("COHORT_CACHE") or Path.home() / ".cache" / "cohort")
    return cache / "index" / digest


@task(name="process-shard", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=1)
def process_shard_task(items: list[WorkItem], settings: ShardSettings, store: str) -> dict[str, Any]:
    result = process_shard(items, settings)
    written = write_shard_result(StoreLayout.at(store), settings, result, _keys(items))
    ok_series = set(result.features.column("series_uid").to_pylist()) if result.features.num_rows else set()
    return {
        "items": len(items),
        "worker": worker_name(),
        "cases_ok": sum(1 for i in items if i.series_uid in ok_series),
        "rows": written.rows_written,
        "replaced": written.rows_replaced,
        "failures": result.failures.num_rows,
        "seconds": dict(result.seconds),
    }


def worker_name() -> str:
    """Where this task runs: the Dask worker's address, else host and process."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except ValueError:  # not on a Dask worker (threads, Ray)
        return f"{socket.gethostname()}:{os.getpid()}"


SHARD_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("placement", pa.string()),  # cpu | gpu (segmentation.gpu: automatic items)
        ("items", pa.int32()),
        ("automatic_items", pa.int32()),
        ("slices", pa.int64()),
        ("worker", pa.string()),
        ("rows", pa.int64()),
        ("failures", pa.int64()),
        ("seconds", pa.float64()),  # stage seconds inside the task
        ("error", pa.string()),  # the task failed as a whole (after retries)
    ]
)


def _shard_failure_rows(
    items: Sequence[WorkItem], run_id: str, exc: BaseException, identity: Callable[[str], str]
) -> pa.Table:
    """When a whole shard task fails (after retries), every ROI in it gets a failure row."""
    from datetime import UTC, datetime

    rows = [
        {
            "run_id": run_id,
            "patient_id": identity(i.patient_id),
            "series_uid": i.series_uid,
            "rtstruct_uid": i.rtstruct_uid,
            "roi_source": r.source_name,
            "stage": Stage.STORE.value,
            "error_type": type(exc).__name__,
            "subject": f"shard of {len(items)} case(s)",
            "reason": f"shard task failed: {exc}",
            "input_path": i.rtstruct_path,
            "failed_at": datetime.now(UTC),
        }
        for i in items
        for r in i.rois
    ]
    return pa.Table.from_pylist(rows, schema=FAILURE_SCHEMA)


def shard_settings(
    spec: CohortSpec, params: dict[str, Any], digest: str, feature_set: str, run_id: str
) -> ShardSettings:
    """The picklable settings every shard gets, from the spec."""
    radiomics = spec.radiomics
    rules = tuple(
        SubvolumeRule(roi, rule.threshold, rule.solid or f"{roi}_solid", rule.rest or f"{roi}_ggo")
        for roi, rule in radiomics.subvolumes.items()
    )
    stability = None
    if radiomics.stability.enabled:
        stability = StabilitySettings(
            tuple(radiomics.stability.perturbations), radiomics.stability.noise_sd, radiomics.stability.seed
        )
    auto = None
    if spec.segmentation.model is not None:
        segmentation = spec.segmentation_settings()
        auto = AutoSegmentation(
            model=spec.segmentation.model,
            model_sha256=segmentation["model_sha256"],
            backend=spec.segmentation.backend,
            batch_size=spec.segmentation.batch_size,
            threshold=spec.segmentation.threshold,
            max_volume_ml=spec.segmentation.max_volume_ml,
            pipelined=spec.segmentation.gpu,
            outputs=tuple(spec.segmentation.outputs),
            outputs_root=(StoreLayout.at(spec.store).root / "masks" / feature_set).url,
        )
    return ShardSettings(
        params,
        digest,
        feature_set,
        run_id,
        crop=radiomics.crop,
        max_case_mb=radiomics.max_case_mb,
        subvolumes=rules,
        stability=stability,
        interpolation=radiomics.interpolation,
        noop=spec.executor.noop_stages,
        pseudonymise_env=spec.privacy.secret_env if spec.privacy.patient_ids == "pseudonymise" else None,
        harmonise=tuple(step.model_dump(mode="json") for step in spec.harmonise),
        segmentation=auto,
    )


def stability_icc(layout: StoreLayout, feature_set: str, form: IccForm) -> pa.Table | None:
    """Per-feature ICC across the unperturbed rows and every perturbation in the store."""
    perturbed = read_table(layout.stability(feature_set))
    features = open_table(layout.features(feature_set)).read()
    if perturbed is None or features is None:
        return None
    subject = ["series_uid", "rtstruct_uid", "roi_source"]
    names = [n for n in perturbed.schema.names if n not in STABILITY_KEY_SCHEMA.names]
    base = features.select([*subject, *names]).to_pandas().assign(perturbation="none")
    long = pd.concat([base, perturbed.select([*subject, "perturbation", *names]).to_pandas()])
    return pa.Table.from_pandas(
        feature_icc(long, subject=subject, rater="perturbation", features=names, form=form),
        preserve_index=False,
    )


RUN_ARTIFACT_KEY = "cohort-run"
FAILURES_ARTIFACT_KEY = "cohort-failures"
#: Failure rows shown in the run's table artifact (all of them stay in the store).
MAX_FAILURE_ROWS_SHOWN = 500


def _attach_artifacts(summary: RunSummary, layout: StoreLayout) -> None:
    """Counts and failures of the run, visible on the run's page in the Prefect UI."""
    counts = {
        "cases selected": summary.cases_selected,
        "cases processed": summary.cases_processed,
        "cases failed": summary.cases_failed,
        "cases already in store": summary.cases_skipped,
        "feature rows written": summary.rows_written,
        "feature rows replaced (inputs changed)": summary.rows_replaced,
        "failure rows": summary.failures,
        "files quarantined": summary.files_quarantined,
        "feature table": summary.feature_table,
    }
    rows = "\n".join(f"| {key} | {value} |" for key, value in counts.items())
    create_markdown_artifact(
        key=RUN_ARTIFACT_KEY,
        description="what this cohort run did",
        markdown=f"# Cohort run {summary.run_id}\n\n| | |\n|---|---|\n{rows}\n",
    )
    failures = read_table(layout.failures(summary.run_id))
    if failures is not None and failures.num_rows:
        shown = failures.slice(0, MAX_FAILURE_ROWS_SHOWN).drop_columns(["failed_at"]).to_pylist()
        create_table_artifact(
            key=FAILURES_ARTIFACT_KEY,
            table=shown,
            description=f"{failures.num_rows} failure(s): stage, reason, input",
        )


def compact_if_fragmented(table: FeatureTable, key_columns: Sequence[str], logger: Any) -> None:
    """Compact a table holding many small parts (reads then parse one footer instead of hundreds)."""
    if table.exists() and table.part_count() > COMPACT_AFTER_PARTS:
        result = table.compact(key_columns, version_columns=VERSION_COLUMNS)
        logger.info("compacted %s: %d parts -> 1 (%d rows)", table.url, result.parts_before, result.rows)


def _current_run_id() -> str:
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    return str(run_id) if run_id else uuid.uuid4().hex


@flow(name="process-cohort")
def process_cohort(spec: dict[str, Any]) -> dict[str, Any]:
    """Process a cohort described by a (validated) cohort spec mapping."""
    cohort_spec = build_spec(spec, environ={})
    logger = get_run_logger()
    run_id = _current_run_id()
    layout = StoreLayout.at(cohort_spec.store)
    seconds: dict[str, float] = {}

    # 1. Bring the archive index up to date (only new and changed files are read).
    t0 = time.perf_counter()
    instances, quarantine, update = index_archive(cohort_spec, layout, logger)
    seconds["index"] = time.perf_counter() - t0

    # 2. Select series and link structure sets (index only, no pixel reads).
    plan = plan_cohort(instances, cohort_spec)
    items, decisions = list(plan.items), plan.decisions
    write_table_atomic(decisions, layout.run_dir(run_id) / "selection.parquet")
    write_table_atomic(plan.qc, layout.run_dir(run_id) / "qc.parquet")
    write_table_atomic(plan.links, layout.run_dir(run_id) / "links.parquet")
    report_url = curation_report(
        cohort_spec, instances, quarantine, plan, layout.run_dir(run_id) / "curation.html"
    )
    logger.info("curation report: %s", report_url)
    params = cohort_spec.radiomics_params()
    digest = settings_hash(cohort_spec.feature_settings())
    feature_set = feature_set_name(digest)
    settings = shard_settings(cohort_spec, params, digest, feature_set, run_id)
    identity = patient_identity(settings)  # fails at once when the pseudonym key is missing
    done = open_table(layout.features(feature_set)).key_versions(KEY_COLUMNS, VERSION_COLUMNS)
    todo, rows_skipped = remaining_work(
        items, done, lambda source, canonical: roi_keys(source, canonical, settings.subvolumes)
    )
    logger.info(
        "%d case(s) selected, %d to process, %d ROI row(s) already in %s",
        len(items),
        len(todo),
        rows_skipped,
        feature_set,
    )

    # 3. Process shards on the workers; each writes its own part files.
    t0 = time.perf_counter()
    executor = cohort_spec.executor
    min_shards = 2 * executor.n_workers * executor.threads_per_worker
    gpu = cohort_spec.segmentation.gpu
    # With GPU segmentation the automatic items are sharded apart and go to GPU workers only.
    on_cpu = [i for i in todo if not (gpu and i.automatic)]
    on_gpu = [i for i in todo if gpu and i.automatic]
    shards = make_shards(on_cpu, cohort_spec.shard_slices, min_shards=min_shards)
    gpu_shards = make_shards(on_gpu, cohort_spec.shard_slices, min_shards=min_shards)
    report("process", 0, len(todo))
    shard_task = process_shard_task.with_options(retries=executor.retries)
    placed = [("cpu", shard) for shard in shards] + [("gpu", shard) for shard in gpu_shards]
    pending = {}
    for number, (placement, shard) in enumerate(placed):
        with gpu_placement(executor, placement == "gpu"):
            pending[shard_task.submit(shard, settings, layout.root.url)] = number
    cases_done = cases_ok = rows = replaced = failures = 0
    stage_seconds: dict[str, float] = {}
    shard_rows: list[dict[str, Any]] = []
    for shard_future in as_completed(list(pending)):
        number = pending[shard_future]
        placement, shard = placed[number]
        record: dict[str, Any] = {
            "shard": number,
            "placement": placement,
            "items": len(shard),
            "automatic_items": sum(1 for i in shard if i.automatic),
            "slices": sum(i.n_slices for i in shard),
        }
        try:
            outcome = shard_future.result()
        except Exception as exc:
            logger.error("shard of %d case(s) failed after retries: %s", len(shard), exc)
            table = _shard_failure_rows(shard, run_id, exc, identity)
            write_part(table, layout.failures(run_id), ["shard-failure", *_keys(shard)])
            failures += table.num_rows
            record |= {"failures": table.num_rows, "error": f"{type(exc).__name__}: {exc}"}
        else:
            cases_ok += outcome["cases_ok"]
            rows += outcome["rows"]
            replaced += outcome["replaced"]
            failures += outcome["failures"]
            add_seconds(stage_seconds, outcome["seconds"].items())
            record |= {
                "worker": outcome["worker"],
                "rows": outcome["rows"],
                "failures": outcome["failures"],
                "seconds": sum(outcome["seconds"].values()),
            }
        shard_rows.append(record)
        cases_done += len(shard)
        report("process", cases_done, len(todo))
    shard_rows.sort(key=lambda r: int(r["shard"]))
    write_table_atomic(
        pa.Table.from_pylist(shard_rows, schema=SHARD_SCHEMA), layout.run_dir(run_id) / "shards.parquet"
    )
    seconds["process"] = time.perf_counter() - t0
    compact_if_fragmented(open_table(layout.features(feature_set)), KEY_COLUMNS, logger)
    if settings.stability is not None:
        icc_table = stability_icc(layout, feature_set, cohort_spec.radiomics.stability.icc)
        if icc_table is not None:
            write_table_atomic(icc_table, layout.stability_icc(feature_set))
            logger.info(
                "stability: ICC of %d features written to %s",
                icc_table.num_rows,
                layout.stability_icc(feature_set),
            )
    seconds.update({f"stage_{k}": v for k, v in stage_seconds.items()})

    summary = RunSummary(
        run_id=run_id,
        store=layout.root.url,
        feature_set=feature_set,
        feature_table=layout.features(feature_set).url,
        files_seen=update.listed,
        files_quarantined=quarantine.num_rows,
        image_series=len(set(decisions.column("series_uid").to_pylist())),
        cases_selected=len(items),
        cases_processed=cases_ok,
        cases_failed=len(todo) - cases_ok,
        cases_skipped=len(items) - len(todo),
        rows_written=rows,
        rows_replaced=replaced,
        rows_skipped=rows_skipped,
        failures=failures,
        shards=len(placed),
        seconds=seconds,
    )
    summary.write(layout.run_dir(run_id))
    _attach_artifacts(summary, layout)
    logger.info(
        "run %s: %d row(s) written, %d failure(s); table %s", run_id, rows, failures, summary.feature_table
    )
    return {"summary": summary.to_json()}


def run_cohort(spec: CohortSpec, *, prefect_home: Path | None = None) -> RunSummary:
    """Run ``process-cohort`` for a spec with its executor, against a Prefect API.

    Starts a local Prefect server for the run unless ``PREFECT_API_URL`` is set.
    """
    import json

    payload = spec.model_dump(mode="json")
    with prefect_api(prefect_home):
        runner = task_runner_for(spec.executor)
        result = process_cohort.with_options(task_runner=runner)(payload)
    return RunSummary.from_dict(json.loads(result["summary"]))
