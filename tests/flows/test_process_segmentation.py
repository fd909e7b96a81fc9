"""Automatic segmentation inside `process-cohort`: radiomics and measurements on the model's mask."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from cohort.radiomics.extract import feature_set_name
from cohort.shard import MEASUREMENT_COLUMNS
from cohort.spec import build_spec, settings_hash
from flows.process_cohort import run_cohort

pytestmark = pytest.mark.slow


def test_chained_segmentation_writes_auto_rows_beside_rtstruct_rows_on_dask(
    prefect_server: str, demo_archive, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    shutil.copytree(demo_archive.root, archive)
    shutil.rmtree(archive / "DEMO-004" / "RS")  # one patient without a structure set
    data = {
        "archive": str(archive),
        "store": str(tmp_path / "store"),
        "segmentation": {"model": "demo-lung-gtv", "outputs": ["nifti", "seg", "rtstruct"]},
        "executor": {"kind": "dask", "n_workers": 2},
    }
    spec = build_spec(data, environ={})
    summary = run_cohort(spec)
    assert (summary.cases_selected, summary.cases_processed, summary.failures) == (7, 7, 0)
    # Another model file or none at all is another feature set: never mixed in one table.
    without = build_spec({**data, "segmentation": {}}, environ={})
    assert summary.feature_set != feature_set_name(settings_hash(without.feature_settings()))

    rows = pd.read_parquet(summary.feature_table)
    auto = rows[rows["roi"] == "GTV_auto"].set_index("patient_id").sort_index()
    manual = rows[rows["roi"] == "GTV"].set_index("patient_id").sort_index()
    assert list(auto.index) == ["DEMO-001", "DEMO-002", "DEMO-003", "DEMO-004"]
    assert list(manual.index) == ["DEMO-001", "DEMO-002", "DEMO-003"]
    assert set(auto["roi_source"]) == {"model:demo-lung-gtv"} and set(auto["rtstruct_uid"]) == {""}
    assert auto["mask_notes"].str.startswith("automatic: demo-lung-gtv 1.1.0").all()
    # The demo model on its own kind of phantom: the automatic tumour is the contoured one.
    both = auto.loc[manual.index]
    relative = (both["measure_volume_ml"] - manual["measure_volume_ml"]).abs() / manual["measure_volume_ml"]
    assert relative.max() < 0.10, pd.concat([both["measure_volume_ml"], manual["measure_volume_ml"]], axis=1)
    pixel_diagonal = (manual["pixel_spacing_row"] ** 2 + manual["pixel_spacing_col"] ** 2) ** 0.5
    assert ((both["measure_recist_mm"] - manual["measure_recist_mm"]).abs() <= 2 * pixel_diagonal).all()
    # Measurements sit beside radiomics on every row; RECIST >= the equal-volume sphere's diameter
    # for any compact tumour, and volumes agree with pyradiomics' own (1 mm resampled) within 10 %.
    assert rows[list(MEASUREMENT_COLUMNS)].notna().all().all()
    assert (rows["measure_recist_mm"] >= 0.9 * rows["measure_volumetric_recist_mm"]).all()
    pyrad = rows["original_shape_VoxelVolume"] / 1000.0
    assert ((rows["measure_volume_ml"] - pyrad).abs() / pyrad).max() < 0.10
    # The unannotated patient was selected for the automatic ROI alone, and the decision says so.
    decisions = pd.read_parquet(Path(spec.store) / "runs" / summary.run_id / "selection.parquet")
    demo4 = decisions[(decisions["patient_id"] == "DEMO-004") & (decisions["modality"] == "CT")]
    assert demo4["selected"].all() and demo4["reason"].str.contains("automatic segmentation only").all()

    # The automatic masks as files a viewer or a planning system opens: SEG, RTSTRUCT, NIfTI.
    _check_mask_files(Path(spec.store) / "masks" / summary.feature_set, auto, archive)

    again = run_cohort(spec)
    assert (again.cases_processed, again.rows_written, again.cases_skipped) == (0, 0, 7)
    assert len(pd.read_parquet(summary.feature_table)) == 7


def _check_mask_files(folder: Path, auto: pd.DataFrame, archive: Path) -> None:
    import numpy as np
    import pydicom
    import SimpleITK as sitk

    from cohort.curate.rtstruct import rasterise_rtstruct, read_roi_infos
    from cohort.curate.seg import read_seg
    from cohort.curate.series import read_series
    from cohort.segment.metrics import dice

    assert len(list(folder.glob("*.seg.dcm"))) == len(auto) == len(list(folder.glob("*.rtstruct.dcm")))
    row = auto.loc["DEMO-004"]  # the patient without a structure set of its own
    assert f"seg: masks/{folder.name}/" in row["mask_notes"]
    image = read_series(sorted(str(p) for p in (archive / "DEMO-004" / "CT").iterdir()))
    seg = pydicom.dcmread(folder / f"{row['series_uid']}.seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == row["series_uid"]
    from_seg = sitk.GetArrayFromImage(read_seg(seg, image)[0].mask).astype(bool)
    assert int(from_seg.sum()) == row["mask_voxels"]
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{row['series_uid']}.nii.gz"))).astype(bool)
    np.testing.assert_array_equal(nifti, from_seg)
    rs = pydicom.dcmread(folder / f"{row['series_uid']}.rtstruct.dcm")
    (info,) = read_roi_infos(rs)
    from_rtstruct = sitk.GetArrayFromImage(rasterise_rtstruct(rs, info.number, image).mask).astype(bool)
    assert dice(from_seg, from_rtstruct) >= 0.95


def test_gpu_segmentation_shards_run_only_on_the_worker_that_advertises_a_gpu(
    prefect_server: str, demo_archive, tmp_path: Path
) -> None:
    from distributed import Client, Nanny, Scheduler, SpecCluster

    # A real two-worker Dask cluster: one plain worker, one started with the resource GPU=1 (the tag a GPU
    # worker gets; no real GPU here, so ONNX Runtime falls back to its CPU provider, as logged).
    workers = {
        "cpu": {"cls": Nanny, "options": {"nthreads": 1}},
        "gpu": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        infos = client.scheduler_info()["workers"]
        (gpu_worker,) = [address for address, info in infos.items() if info["resources"].get("GPU")]
        data = {
            "archive": str(demo_archive.root),
            "store": str(tmp_path / "store"),
            "segmentation": {"model": "demo-lung-gtv", "gpu": True},
            "executor": {"kind": "dask", "address": cluster.scheduler_address},
        }
        spec = build_spec(data, environ={})
        summary = run_cohort(spec)
    assert (summary.cases_processed, summary.failures) == (8, 0)
    shards = pd.read_parquet(Path(spec.store) / "runs" / summary.run_id / "shards.parquet")
    gpu, cpu = shards[shards["placement"] == "gpu"], shards[shards["placement"] == "cpu"]
    assert gpu["automatic_items"].sum() == 4 and cpu["automatic_items"].sum() == 0
    assert set(gpu["worker"]) == {gpu_worker}, shards
    assert shards["items"].sum() == 8 and shards["rows"].sum() == 8
