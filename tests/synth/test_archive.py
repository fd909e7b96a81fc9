from __future__ import annotations

import csv
import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import UID, generate_uid

from cohort.curate.rtstruct import rasterise_rtstruct, read_roi_infos
from cohort.curate.select import plan_cohort
from cohort.curate.series import read_series
from cohort.index.crawl import index_files, list_archive
from cohort.radiomics.extract import feature_set_name
from cohort.shard import ShardSettings, process_shard
from cohort.spec import CohortSpec, build_spec, settings_hash
from cohort.synth import SCANNERS
from cohort.synth.archive import (
    SCALE_SCANNERS,
    ScaleArchive,
    _ct_template,
    _PatientJob,
    _SliceWriter,
    write_scale_archive,
)


def test_demo_archive_is_real_dicom_with_linked_structure_sets(demo_archive) -> None:
    assert len(demo_archive.patients) == 4
    for truth in demo_archive.patients:
        ct = sorted((demo_archive.root / truth.patient_id / "CT").iterdir())
        assert len(ct) == truth.n_slices
        first = pydicom.dcmread(ct[0])
        assert first.Manufacturer == truth.scanner.manufacturer
        assert first.ConvolutionKernel == truth.scanner.kernel
        rs = pydicom.dcmread(demo_archive.root / truth.patient_id / "RS" / "RS.dcm")
        ref = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
        assert ref.RTReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
        names = [r.ROIName for r in rs.StructureSetROISequence]
        assert truth.gtv_name in names and "BODY" in names
    assert {p.scanner for p in demo_archive.patients} == set(SCANNERS)


def test_gtv_contours_rasterise_to_the_tumour_volume(demo_archive) -> None:
    for truth in demo_archive.patients:
        image = read_series([str(p) for p in sorted((demo_archive.root / truth.patient_id / "CT").iterdir())])
        rs = pydicom.dcmread(demo_archive.root / truth.patient_id / "RS" / "RS.dcm")
        number = next(r.number for r in read_roi_infos(rs) if r.name == truth.gtv_name)
        roi = rasterise_rtstruct(rs, number, image)
        voxel_mm3 = float(np.prod(image.GetSpacing()))
        # Slice sampling of an ellipsoid with 2-5 mm slices: within 12 % of the analytic volume.
        assert roi.voxel_count * voxel_mm3 == pytest.approx(truth.tumour_volume_mm3, rel=0.12)
        tumour_hu = sitk.GetArrayViewFromImage(image)[sitk.GetArrayViewFromImage(roi.mask) == 1]
        assert 0 < tumour_hu.mean() < 60  # soft tissue, not lung (-850) nor air


def test_clinical_table_has_one_row_per_patient(demo_archive) -> None:
    with demo_archive.clinical_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["PatientID"] for r in rows] == [p.patient_id for p in demo_archive.patients]
    assert all(
        int(r["survival_days"]) == p.survival_days and int(r["event"]) == p.event
        for r, p in zip(rows, demo_archive.patients, strict=True)
    )


# ------------------------------------------------------------------------------------- scale archive

SCALE_PATIENTS = 24


@pytest.fixture(scope="module")
def scale_archive(tmp_path_factory: pytest.TempPathFactory) -> ScaleArchive:
    """24 small patients (64 x 64, 16-24 slices) written by two processes with fresh UIDs."""
    root = tmp_path_factory.mktemp("scale") / "archive"
    return write_scale_archive(root, SCALE_PATIENTS, matrix=64, slices=(16, 24), workers=2, fresh_uids=True)


@pytest.fixture(scope="module")
def scale_index(scale_archive: ScaleArchive) -> tuple[pa.Table, pa.Table]:
    return index_files(list_archive(scale_archive.root))


def _spec(archive: Path, **executor: object) -> CohortSpec:
    return build_spec(
        {"archive": str(archive), "store": str(archive.parent / "store"), "executor": executor}, environ={}
    )


def test_scale_archive_writes_every_patient_and_counts_what_it_wrote(scale_archive: ScaleArchive) -> None:
    patients = scale_archive.patients
    assert [p.patient_id for p in patients] == [f"SCALE-{i:05d}" for i in range(1, SCALE_PATIENTS + 1)]
    for truth in patients:
        assert 16 <= truth.n_slices <= 24
        assert len(list((scale_archive.root / truth.patient_id / "CT").iterdir())) == truth.n_slices
    dicom_files = [p for p in scale_archive.root.rglob("*") if p.is_file() and p.name != "clinical.csv"]
    assert scale_archive.files == len(dicom_files) == sum(p.n_slices for p in patients) + SCALE_PATIENTS
    assert scale_archive.bytes == sum(p.stat().st_size for p in dicom_files)
    assert scale_archive.long_series is None and scale_archive.series == SCALE_PATIENTS
    with scale_archive.clinical_csv.open() as fh:
        assert [r["PatientID"] for r in csv.DictReader(fh)] == [p.patient_id for p in patients]


def test_scale_archive_is_indexed_with_unique_uids_and_varied_scanners(
    scale_archive: ScaleArchive, scale_index: tuple[pa.Table, pa.Table]
) -> None:
    instances, quarantine = scale_index
    df = instances.to_pandas()
    assert len(df) == scale_archive.files
    assert [Path(p).name for p in quarantine.column("path").to_pylist()] == ["clinical.csv"]
    # Unique UIDs across all patients: every instance, series and study.
    assert df["sop_instance_uid"].is_unique
    assert df.groupby("series_uid")["patient_id"].nunique().max() == 1
    assert df["series_uid"].nunique() == 2 * SCALE_PATIENTS  # one CT + one RTSTRUCT series each
    assert df["study_uid"].nunique() == df["patient_id"].nunique() == SCALE_PATIENTS
    # 24 patients cycle twice through the 12 scanners: every vendor, model and kernel appears.
    ct = df[df["modality"] == "CT"].drop_duplicates("series_uid")
    assert set(zip(ct["manufacturer"], ct["manufacturer_model"], ct["convolution_kernel"], strict=True)) == {
        (s.manufacturer, s.model, s.kernel) for s in SCALE_SCANNERS
    }
    assert ct["convolution_kernel"].nunique() == len(SCALE_SCANNERS) == 12
    assert ct["slice_thickness"].nunique() == len({s.slice_thickness for s in SCALE_SCANNERS})
    assert (ct["rows"] == 64).all() and (ct["columns"] == 64).all()


def test_plan_cohort_selects_every_scale_patient_with_its_gtv(
    scale_archive: ScaleArchive, scale_index: tuple[pa.Table, pa.Table]
) -> None:
    plan = plan_cohort(scale_index[0], _spec(scale_archive.root))
    truths = {p.patient_id: p for p in scale_archive.patients}
    assert len(plan.items) == SCALE_PATIENTS
    for item in plan.items:
        truth = truths[item.patient_id]
        assert item.n_slices == truth.n_slices
        assert [(r.source_name, r.canonical) for r in item.rois] == [(truth.gtv_name, "GTV")]
    assert plan.qc.column("passed").to_pylist() == [True] * SCALE_PATIENTS


def test_scale_items_run_through_the_shard_worker_and_noop_reads_nothing(
    scale_archive: ScaleArchive, scale_index: tuple[pa.Table, pa.Table]
) -> None:
    spec = _spec(scale_archive.root)
    items = plan_cohort(scale_index[0], spec).items[:2]
    digest = settings_hash(spec.feature_settings())
    settings = ShardSettings(spec.radiomics_params(), digest, feature_set_name(digest), "run-1")
    real = process_shard(items, settings)
    assert (real.features.num_rows, real.failures.num_rows) == (2, 0)
    assert real.features.column("roi").to_pylist() == ["GTV", "GTV"]

    # No-op: same items, nothing read (even paths that do not exist), no rows, no failures.
    gone = [
        dataclasses.replace(i, image_paths=("/nonexistent/IM1",), rtstruct_path="/nonexistent/RS")
        for i in items
    ]
    noop = process_shard(gone, dataclasses.replace(settings, noop=True))
    assert (noop.features.num_rows, noop.failures.num_rows, noop.n_items) == (0, 0, 2)
    assert sum(noop.seconds.values()) == 0.0


def test_executor_noop_stages_reaches_the_shard_settings(scale_archive: ScaleArchive) -> None:
    from flows.process_cohort import shard_settings

    for noop in (False, True):
        spec = _spec(scale_archive.root, noop_stages=noop)
        assert spec.executor.noop_stages is noop
        assert shard_settings(spec, {}, "d" * 64, "radiomics-x", "run").noop is noop
    # Benchmark mode is not a feature setting: the feature-set name does not change.
    assert settings_hash(_spec(scale_archive.root, noop_stages=True).feature_settings()) == settings_hash(
        _spec(scale_archive.root).feature_settings()
    )


def test_scale_archive_does_not_depend_on_workers_and_fresh_uids_are_fresh(tmp_path: Path) -> None:
    one = write_scale_archive(tmp_path / "one", 3, matrix=32, slices=6, workers=1, seed=5)
    two = write_scale_archive(tmp_path / "two", 3, matrix=32, slices=6, workers=2, seed=5)
    files = sorted(p.relative_to(one.root) for p in one.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two.root) for p in two.root.rglob("*") if p.is_file())
    assert all((one.root / f).read_bytes() == (two.root / f).read_bytes() for f in files)
    fresh = write_scale_archive(
        tmp_path / "fresh", 3, matrix=32, slices=6, workers=1, seed=5, fresh_uids=True
    )
    a = pydicom.dcmread(one.root / "SCALE-00001" / "CT" / "IM0001")
    b = pydicom.dcmread(fresh.root / "SCALE-00001" / "CT" / "IM0001")
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.StudyInstanceUID != b.StudyInstanceUID
    assert a.PixelData == b.PixelData  # only the UIDs are new


def test_scale_gtv_rasterises_to_the_tumour_volume(tmp_path: Path) -> None:
    archive = write_scale_archive(tmp_path / "a", 3, matrix=128, workers=1, seed=3)
    for truth in archive.patients:
        ct = sorted((archive.root / truth.patient_id / "CT").iterdir())
        image = read_series([str(p) for p in ct])
        rs = pydicom.dcmread(archive.root / truth.patient_id / "RS" / "RS.dcm")
        assert [r.name for r in read_roi_infos(rs)][0::3] == ["BODY", truth.gtv_name]
        number = next(r.number for r in read_roi_infos(rs) if r.name == truth.gtv_name)
        roi = rasterise_rtstruct(rs, number, image)
        voxel_mm3 = float(np.prod(image.GetSpacing()))
        assert roi.voxel_count * voxel_mm3 == pytest.approx(truth.tumour_volume_mm3, rel=0.2)
        tumour_hu = sitk.GetArrayViewFromImage(image)[sitk.GetArrayViewFromImage(roi.mask) == 1]
        assert 0 < tumour_hu.mean() < 60


def test_slice_writer_writes_what_pydicom_writes(tmp_path: Path) -> None:
    job = _PatientJob(tmp_path, "SCALE-00001", 1, 0, 0, SCALE_SCANNERS[5], 16, 3, "GTV", ("Lung L", "Lung R"))
    template = _ct_template(job, generate_uid(), generate_uid(), generate_uid(), "20200101")
    values: dict[str, object] = {
        "SOPInstanceUID": generate_uid(),
        "XRayTubeCurrent": 120,
        "Exposure": 77,
        "InstanceNumber": 3,
        "ImagePositionPatient": [-249.51171875, -249.51171875, -12.5],
        "SliceLocation": -12.5,
        "PixelData": np.arange(16 * 16, dtype=np.uint16).tobytes(),
    }
    _SliceWriter(template).write(tmp_path / "fast", values)
    for keyword, value in values.items():
        setattr(template, keyword, value)
    template.file_meta.MediaStorageSOPInstanceUID = UID(str(values["SOPInstanceUID"]))
    template.save_as(tmp_path / "pydicom", enforce_file_format=True)
    assert (tmp_path / "fast").read_bytes() == (tmp_path / "pydicom").read_bytes()


def test_cli_synth_writes_a_scale_archive_with_a_long_series(tmp_path: Path) -> None:
    from cohort.cli import main

    out = tmp_path / "archive"
    args = ["synth", str(out), "--patients", "2", "--matrix", "32", "--slices", "8-10", "--workers", "1"]
    assert main([*args, "--long-series", "12", "--fresh-uids"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "SCALE-00001",
        "SCALE-00002",
        "SCALE-LONG",
        "clinical.csv",
    ]
    long_ct = sorted((out / "SCALE-LONG" / "CT").iterdir())
    assert len(long_ct) == 12
    first = pydicom.dcmread(long_ct[0], stop_before_pixels=True)
    assert (first.Rows, first.Columns, float(first.SliceThickness)) == (512, 512, 0.625)
    assert main(["synth", str(tmp_path / "x"), "--demo", "--workers", "2"]) == 2  # scale-only option


def test_scale_archive_refuses_bad_arguments(tmp_path: Path) -> None:
    for kwargs in ({"slices": (5, 4)}, {"slices": 2}, {"matrix": 8}, {"scanners": ()}):
        with pytest.raises(ValueError):
            write_scale_archive(tmp_path, 1, workers=1, **kwargs)  # type: ignore[arg-type]


def test_scale_files_pass_dciodvfy(scale_archive: ScaleArchive) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    patient = scale_archive.root / scale_archive.patients[0].patient_id
    for path in (next((patient / "CT").iterdir()), patient / "RS" / "RS.dcm"):
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
        problems = [line for line in run.stderr.splitlines() if line.startswith(("Error", "Warning"))]
        assert problems == [], path
