from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from cohort.curate.rtstruct import rasterise_rtstruct, read_roi_infos
from cohort.curate.series import read_series
from cohort.synth import SCANNERS


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
