"""End-to-end runs of the ``process-cohort`` flow against a real Prefect server."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cohort.spec import build_spec
from flows.process_cohort import run_cohort
from tests.helpers import make_pixels_undecodable

pytestmark = pytest.mark.slow

#: Columns that legitimately differ between two runs of the same cohort.
RUN_COLUMNS = ["run_id", "processed_at"]


def _latest_artifacts() -> dict[str, Any]:
    """The latest artifact of each key, read back through the Prefect API."""
    import asyncio
    import json

    from prefect.client.orchestration import get_client

    async def read() -> dict[str, Any]:
        async with get_client() as client:
            found = await client.read_latest_artifacts()
            return {a.key: a.data for a in found if a.key}

    data = asyncio.run(read())
    return {k: json.loads(v) if isinstance(v, str) and v.startswith("[{") else v for k, v in data.items()}


def _spec(archive: Path, store: Path, **executor: object):  # type: ignore[no-untyped-def]
    return build_spec({"archive": str(archive), "store": str(store), "executor": executor}, environ={})


def test_real_lung1_features_reproduce_the_published_reference(
    prefect_server: str, lung1_archive: Path, lung1_reference: pd.DataFrame, tmp_path: Path
) -> None:
    summary = run_cohort(_spec(lung1_archive, tmp_path / "store", kind="dask", n_workers=2))
    assert (summary.cases_selected, summary.cases_processed, summary.failures) == (2, 2, 0)
    features = pd.read_parquet(summary.feature_table).set_index("patient_id")
    assert list(features["roi_source"]) == ["GTV-1", "GTV-1"]
    reference_columns = [c for c in lung1_reference.columns if c.startswith("original_")]
    assert len(reference_columns) == 78
    rel = pd.DataFrame(
        {
            pid: (
                features.loc[pid, reference_columns].astype(float)
                - lung1_reference.loc[pid, reference_columns].astype(float)
            ).abs()
            / lung1_reference.loc[pid, reference_columns].astype(float).abs()
            for pid in ["LUNG1-001", "LUNG1-002"]
        }
    )
    worst = rel.max(axis=1).sort_values(ascending=False)
    print("\nworst relative differences against reference-features-original.csv:")
    print(worst.head(8).to_string())
    assert rel.loc["original_shape_VoxelVolume"].max() <= 1e-3
    assert worst.max() <= 5e-3
    # Masks are bit-identical to the reference's, so agreement is at rounding level.
    assert worst.max() <= 1e-9


def test_dask_cluster_and_single_process_give_the_same_rows(
    prefect_server: str, demo_archive, tmp_path: Path
) -> None:
    on_dask = run_cohort(_spec(demo_archive.root, tmp_path / "dask", kind="dask", n_workers=2))
    serial = run_cohort(_spec(demo_archive.root, tmp_path / "serial", kind="threads", n_workers=1))
    assert on_dask.shards >= 2  # the work really was spread over the workers
    a = pd.read_parquet(on_dask.feature_table).drop(columns=RUN_COLUMNS).sort_values("series_uid")
    b = pd.read_parquet(serial.feature_table).drop(columns=RUN_COLUMNS).sort_values("series_uid")
    assert len(a) == len(demo_archive.patients) == 4
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=True)


def test_failed_case_is_recorded_rest_completes_and_rerun_adds_no_duplicates(
    prefect_server: str, demo_archive, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    shutil.copytree(demo_archive.root, archive)
    broken = sorted((archive / "DEMO-003" / "CT").iterdir())[3]
    original = make_pixels_undecodable(broken)
    spec = _spec(archive, tmp_path / "store", kind="dask", n_workers=2)

    first = run_cohort(spec)
    assert (first.cases_selected, first.cases_processed, first.cases_failed) == (4, 3, 1)
    failures = pd.read_parquet(Path(first.store) / "failures" / first.run_id)
    assert list(failures["patient_id"]) == ["DEMO-003"]
    assert failures.loc[0, "stage"] == "curate" and "cannot decode pixel data" in failures.loc[0, "reason"]
    assert len(pd.read_parquet(first.feature_table)) == 3
    shown = _latest_artifacts()
    assert shown["cohort-failures"][0]["patient_id"] == "DEMO-003" and len(shown["cohort-failures"]) == 1
    assert "| cases failed | 1 |" in shown["cohort-run"]
    assert shown["cohort-curation-report"].endswith("curation.html)")  # a link to the run's curation report
    report = (Path(first.store) / "runs" / first.run_id / "curation.html").read_text()
    assert "DEMO-003" not in report and report.count("data:image/png;base64,") >= 4

    # Unchanged archive: the done cases are skipped, the failed one is tried (and fails) again.
    second = run_cohort(spec)
    assert (second.cases_skipped, second.cases_failed, second.rows_written) == (3, 1, 0)

    # The slice is repaired: only the missing case is processed; one row per case in the end.
    broken.write_bytes(original)
    third = run_cohort(spec)
    assert (third.cases_skipped, third.cases_processed, third.rows_written) == (3, 1, 1)
    final = pd.read_parquet(third.feature_table)
    assert sorted(final["patient_id"]) == ["DEMO-001", "DEMO-002", "DEMO-003", "DEMO-004"]
    assert not final.duplicated(["series_uid", "rtstruct_uid", "roi_source"]).any()
    selection = pd.read_parquet(Path(third.store) / "runs" / third.run_id / "selection.parquet")
    assert selection["selected"].sum() == 4


def _demo_spec(demo_archive, store: Path, radiomics: dict) -> Any:  # type: ignore[no-untyped-def]
    return build_spec(
        {
            "archive": str(demo_archive.root),
            "store": str(store),
            "executor": {"kind": "dask", "n_workers": 2},
            "radiomics": radiomics,
        },
        environ={},
    )


def test_solid_and_ground_glass_subvolumes_through_the_flow(
    prefect_server: str, demo_archive, tmp_path: Path
) -> None:
    spec = _demo_spec(demo_archive, tmp_path / "store", {"subvolumes": {"GTV": {"threshold": 30}}})
    summary = run_cohort(spec)
    assert (summary.rows_written, summary.failures) == (12, 0)
    rows = pd.read_parquet(summary.feature_table)
    assert sorted(rows["roi"].value_counts().items()) == [("GTV", 4), ("GTV_ggo", 4), ("GTV_solid", 4)]
    volumes = rows.pivot_table(index="series_uid", columns="roi", values="mask_voxels")
    assert (volumes["GTV_solid"] + volumes["GTV_ggo"] == volumes["GTV"]).all()
    # A second run finds every ROI and sub-volume done.
    again = run_cohort(spec)
    assert (again.cases_skipped, again.rows_written) == (4, 0)


def test_perturbation_stability_gives_per_feature_icc(
    prefect_server: str, demo_archive, tmp_path: Path
) -> None:
    spec = _demo_spec(
        demo_archive,
        tmp_path / "store",
        {"stability": {"enabled": True, "perturbations": ["shift_x", "noise"], "noise_sd": 20}},
    )
    summary = run_cohort(spec)
    assert (summary.rows_written, summary.failures) == (4, 0)
    perturbed = pd.read_parquet(Path(summary.store) / "stability" / summary.feature_set)
    assert len(perturbed) == 4 * 2
    assert sorted(perturbed["perturbation"].unique()) == ["noise", "shift_x"]
    icc = pd.read_parquet(Path(summary.store) / "stability-icc" / f"{summary.feature_set}.parquet")
    icc = icc.set_index("feature")
    assert len(icc) == 107 and (icc["n_subjects"] == 4).all() and (icc["n_raters"] == 3).all()
    print("\nICC(1,1) over shift/noise:", icc["icc"].describe().round(3).to_dict())
    # Noise leaves the mask alone and a one-voxel shift keeps its voxel count; only the
    # 1 mm resampling grid, anchored to the mask's bounding box, moves a few voxels.
    assert icc.loc["original_shape_VoxelVolume", "icc"] > 0.99
    base = pd.read_parquet(summary.feature_table).set_index("roi_source")
    noisy = perturbed[perturbed["perturbation"] == "noise"].set_index("roi_source")
    assert (
        noisy["original_firstorder_Variance"] > base.loc[noisy.index, "original_firstorder_Variance"]
    ).all()
    assert icc.loc["original_firstorder_Variance", "icc"] < 1.0


def test_analysis_flow_writes_harmonised_table_model_report_and_artifacts(
    prefect_server: str, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client

    from cohort.analysis.combat import CombatModel
    from cohort.analysis.pipeline import AnalysisSpec
    from cohort.synth import write_demo_archive
    from flows.analyse_cohort import ARTIFACT_KEY, run_analysis_flow

    archive = write_demo_archive(tmp_path / "archive", 8, seed=11, matrix=128)  # 2 patients per scanner
    store = tmp_path / "store"
    run_cohort(_spec(archive.root, store, kind="threads", n_workers=2))
    spec = AnalysisSpec(
        store=store,
        clinical=archive.clinical_csv,
        time="survival_days",
        event="event",
        batch="manufacturer",
        combat={"method": "none", "mean_only": True},
    )
    head = run_analysis_flow(spec)
    out = store / "analysis" / "analysis"
    harmonised = pd.read_parquet(out / "harmonised.parquet")
    assert len(harmonised) == 8 and head["patients"] == 8
    # mean-only ComBat: every scanner's mean of a feature ends on the same value.
    means = harmonised.groupby("manufacturer")["original_firstorder_Mean"].mean()
    assert means.max() - means.min() < 1e-6
    model = CombatModel.load(out / "combat-model.json")
    assert sorted(model.batch_levels) == sorted(harmonised["manufacturer"].unique())
    assert (out / "report.html").read_text().count("<svg") >= 2

    async def artifacts() -> list[str]:
        async with get_client() as client:
            found = await client.read_latest_artifacts()
            return [a.key for a in found if a.key]

    import asyncio

    keys = asyncio.run(artifacts())
    assert ARTIFACT_KEY in keys and f"{ARTIFACT_KEY}-cox" in keys
