"""The ``process-cohort`` flow writing its store to a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pandas as pd
import pytest

import cohort.store
from cohort.spec import build_spec
from flows.process_cohort import run_cohort
from tests.s3server import S3Server, bucket_url

pytestmark = [pytest.mark.slow, pytest.mark.s3]

RUN_COLUMNS = ["run_id", "processed_at"]


def test_a_cohort_on_dask_writes_its_store_to_s3_and_a_rerun_adds_nothing(
    prefect_server: str, s3_server: S3Server, demo_archive, tmp_path: Path
) -> None:
    url = bucket_url(s3_server, "cohort-flows", f"store-{uuid.uuid4().hex[:8]}")
    spec = build_spec(
        {"archive": str(demo_archive.root), "store": url, "executor": {"kind": "dask", "n_workers": 2}},
        environ={},
    )
    first = run_cohort(spec)
    assert first.store == url and first.feature_table.startswith(url)
    assert (first.cases_processed, first.failures) == (4, 0)
    again = run_cohort(spec)
    assert (again.cases_skipped, again.rows_written) == (4, 0)

    on_s3 = pd.read_parquet(first.feature_table)  # plain pandas, credentials from the AWS environment
    assert len(on_s3) == 4 and not on_s3.duplicated(["series_uid", "rtstruct_uid", "roi_source"]).any()
    store = cohort.store.open(url)
    assert len(store.runs()) == 2 and len(store.instances()) == first.files_seen - first.files_quarantined
    local_spec = {
        "archive": str(demo_archive.root),
        "store": str(tmp_path / "local"),
        "executor": {"kind": "threads"},
    }
    local = run_cohort(build_spec(local_spec, environ={}))
    a = on_s3.drop(columns=RUN_COLUMNS).sort_values("series_uid").reset_index(drop=True)
    b = pd.read_parquet(local.feature_table).drop(columns=RUN_COLUMNS).sort_values("series_uid")
    pd.testing.assert_frame_equal(a, b.reset_index(drop=True), check_exact=True)


def test_an_archive_on_s3_is_indexed_and_processed_like_the_same_folder_on_disk(
    prefect_server: str, s3_server: S3Server, demo_archive, tmp_path: Path
) -> None:
    archive = bucket_url(s3_server, "cohort-archives", f"archive-{uuid.uuid4().hex[:8]}")
    fs = s3_server.filesystem()
    fs.put(str(demo_archive.root), archive.removeprefix("s3://"), recursive=True)
    store = tmp_path / "store"
    data = {"archive": archive, "store": str(store), "executor": {"kind": "dask", "n_workers": 2}}
    first = run_cohort(build_spec(data, environ={}))
    assert (first.cases_processed, first.failures, first.files_quarantined) == (4, 0, 1)  # clinical.csv
    manifest = json.loads((store / "index" / "manifest.json").read_text())
    assert manifest["archive"] == archive  # the index is of the bucket, paths relative to it
    assert len(cohort.store.open(str(store)).instances()) == first.files_seen - 1
    # The second run lists the bucket and reads no object again.
    again = run_cohort(build_spec(data, environ={}))
    assert (again.cases_skipped, again.rows_written) == (4, 0)
    index_runs = pd.read_parquet(store / "index" / "runs.parquet")
    assert list(index_runs["files_read"]) == [first.files_seen, 0]

    local = run_cohort(
        build_spec(
            {
                "archive": str(demo_archive.root),
                "store": str(tmp_path / "local"),
                "executor": {"kind": "threads"},
            },
            environ={},
        )
    )
    a = pd.read_parquet(first.feature_table).drop(columns=RUN_COLUMNS).sort_values("series_uid")
    b = pd.read_parquet(local.feature_table).drop(columns=RUN_COLUMNS).sort_values("series_uid")
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=True)
