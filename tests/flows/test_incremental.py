"""Incremental reprocessing: nothing changed → no image work; new studies, changed inputs, new settings."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pydicom
import pytest

from cohort.spec import build_spec
from cohort.synth.archive import write_demo_archive
from flows.process_cohort import run_cohort

pytestmark = pytest.mark.slow

N_PATIENTS = 20
KEYS = ["series_uid", "rtstruct_uid", "roi_source"]


def _image_work(summary) -> float:  # type: ignore[no-untyped-def]
    """Seconds the shard workers spent reading series and extracting features."""
    return sum(v for k, v in summary.seconds.items() if k.startswith("stage_"))


def _move_gtv(rtstruct: Path, shift_mm: float) -> None:
    """Edit the GTV contours of a structure set (as a re-contouring would)."""
    ds = pydicom.dcmread(rtstruct)
    number = next(r.ROINumber for r in ds.StructureSetROISequence if "gtv" in str(r.ROIName).lower())
    contours = next(c for c in ds.ROIContourSequence if c.ReferencedROINumber == number)
    for contour in contours.ContourSequence:
        points = [float(v) for v in contour.ContourData]
        contour.ContourData = [v + shift_mm if i % 3 == 0 else v for i, v in enumerate(points)]
    ds.save_as(rtstruct)


def test_reruns_process_only_what_is_new_or_changed(prefect_server: str, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write_demo_archive(archive, N_PATIENTS, seed=5, matrix=64)
    base = {"archive": str(archive), "store": str(tmp_path / "store"), "executor": {"kind": "threads"}}
    spec = build_spec(base, environ={})

    first = run_cohort(spec)
    assert (first.cases_processed, first.rows_written) == (N_PATIENTS, N_PATIENTS)

    # 1. Nothing changed: no image work at all.
    again = run_cohort(spec)
    assert (again.cases_processed, again.cases_skipped, again.rows_written) == (0, N_PATIENTS, 0)
    assert _image_work(again) == 0.0 and again.shards == 0

    # 2. 5 % new studies arrive (fresh UIDs): exactly those are processed.
    write_demo_archive(archive / "arrived-today", 1, seed=99, matrix=64, fresh_uids=True)
    grown = run_cohort(spec)
    assert (grown.cases_processed, grown.cases_skipped, grown.rows_written) == (1, N_PATIENTS, 1)

    # 3. A structure set is re-contoured: that case is redone and its row replaced, not duplicated.
    edited = sorted(archive.glob("*/RS/RS.dcm"))[3]
    _move_gtv(edited, 2.0)
    redone = run_cohort(spec)
    assert (redone.cases_processed, redone.rows_written, redone.rows_replaced) == (1, 0, 1)
    table = pd.read_parquet(redone.feature_table)
    assert len(table) == N_PATIENTS + 1 and not table.duplicated(KEYS).any()
    patient = edited.parent.parent.name
    row = table[table["patient_id"] == patient]
    assert len(row) == 1 and row["run_id"].iloc[0] == redone.run_id
    assert (table["run_id"] == redone.run_id).sum() == 1  # every other row is untouched

    # 4. Other radiomics settings: a new feature set computed for every case; the old table stays.
    rebinned = build_spec({**base, "radiomics": {"params": {"setting": {"binWidth": 50}}}}, environ={})
    other = run_cohort(rebinned)
    assert other.feature_set != first.feature_set
    assert (other.cases_processed, other.rows_written) == (N_PATIENTS + 1, N_PATIENTS + 1)
    pd.testing.assert_frame_equal(pd.read_parquet(redone.feature_table), table)
