"""The same cohort on Ray and on Dask gives identical feature rows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cohort.spec import build_spec
from flows.process_cohort import run_cohort

pytestmark = pytest.mark.slow
pytest.importorskip("prefect_ray", reason="the ray extra is not installed")

RUN_COLUMNS = ["run_id", "processed_at"]


def test_ray_and_dask_give_identical_rows(prefect_server: str, demo_archive, tmp_path: Path) -> None:
    def run(kind: str):  # type: ignore[no-untyped-def]
        spec = build_spec(
            {"archive": str(demo_archive.root), "store": str(tmp_path / kind), "executor": {"kind": kind}},
            environ={},
        )
        summary = run_cohort(spec)
        assert (summary.cases_processed, summary.failures) == (len(demo_archive.patients), 0)
        frame = pd.read_parquet(summary.feature_table).drop(columns=RUN_COLUMNS)
        return frame.sort_values("series_uid").reset_index(drop=True)

    on_ray = run("ray")
    on_dask = run("dask")
    assert len(on_ray) == len(demo_archive.patients)
    pd.testing.assert_frame_equal(on_ray, on_dask, check_exact=True)
