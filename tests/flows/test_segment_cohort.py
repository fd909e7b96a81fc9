"""`segment-cohort`: the demo model over a cohort, measurements and metrics in the store, reruns skip."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cohort.spec import build_spec
from flows.segment_cohort import run_segmentation

pytestmark = pytest.mark.slow


def test_segmentation_flow_measures_compares_and_skips_done_cases(
    prefect_server: str, demo_archive, tmp_path: Path
) -> None:
    spec = build_spec(
        {
            "archive": str(demo_archive.root),
            "store": str(tmp_path / "store"),
            "executor": {"kind": "threads"},
        },
        environ={},
    )
    first = run_segmentation(spec)
    assert (first["cases"], first["segmented"], first["failures"]) == (4, 4, 0)
    rows = pd.read_parquet(first["table"])
    assert len(rows) == 4 and rows["found"].all()
    assert set(rows["model_name"]) == {"demo-lung-gtv"}
    assert (rows["volume_ml"] > 0).all() and (rows["recist_mm"] >= rows["volumetric_recist_mm"] * 0.5).all()
    assert rows["dice"].median() >= 0.8, rows[["patient_id", "dice", "hd95_mm", "surface_dice"]]
    metrics = pd.read_parquet(Path(spec.store) / "runs" / first["run_id"] / "segmentation-metrics.parquet")
    overall = metrics.set_index("stratum").loc["all"]
    assert overall["cases"] == 4 and overall["dice_median"] == pytest.approx(rows["dice"].median())
    again = run_segmentation(spec)
    assert (again["segmented"], again["skipped"]) == (0, 4)
