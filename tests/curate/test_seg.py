"""DICOM-SEG round trips: a known mask written with highdicom reads back identical on the image grid."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from cohort.curate.rtstruct import rasterise_rtstruct, read_roi_infos
from cohort.curate.seg import SegReadError, read_seg, read_segment_infos
from cohort.curate.series import read_series
from tests.helpers import write_ct_slices


def _source_datasets(paths: list[Path] | list[str]) -> list[pydicom.Dataset]:
    datasets: list[pydicom.Dataset] = [pydicom.dcmread(p) for p in paths]
    for k, ds in enumerate(datasets):  # the patient/study module a SEG copies from its sources
        name = str(ds.get("PatientName") or "Test^Patient")
        ds.PatientName = name if "^" in name else name + "^"  # one-component names are ambiguous
        ds.StudyDate = ds.get("StudyDate") or "20200101"
        ds.StudyTime = ds.get("StudyTime") or "120000"
        ds.InstanceNumber = ds.get("InstanceNumber") or k + 1
        for keyword in (
            "PatientBirthDate",
            "PatientSex",
            "StudyID",
            "AccessionNumber",
            "ReferringPhysicianName",
        ):
            if keyword not in ds:
                setattr(ds, keyword, "")
        ds.SeriesNumber = ds.get("SeriesNumber") or 1
    return datasets


def _write_seg(
    path: Path, sources: list[pydicom.Dataset], masks: np.ndarray, labels: list[str]
) -> pydicom.Dataset:
    """A binary SEG of ``masks`` (slices in the order of ``sources``, segments on the last axis)."""
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, label in enumerate(labels)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=100,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="cohort",
        manufacturer_model_name="cohort tests",
        software_versions="0",
        device_serial_number="0",
    )
    seg.save_as(path)
    return seg


def test_generated_oblique_seg_reads_back_identical_per_segment(tmp_path: Path) -> None:
    c, s = np.cos(0.4), np.sin(0.4)
    volume = (np.arange(6 * 8 * 10).reshape(6, 8, 10) % 300 + 900).astype(np.uint16)
    paths = write_ct_slices(
        tmp_path / "ct",
        volume,
        origin=(5, -3, 20),
        spacing=(0.8, 0.7, 2.5),
        row_cosine=(c, s, 0),
        col_cosine=(-s, c, 0),
    )
    image = read_series([str(p) for p in paths])
    gtv = np.zeros(volume.shape, bool)
    gtv[1:4, 2:6, 3:8] = True
    gtv[2, 3, 4] = False  # a hole
    node = np.zeros(volume.shape, bool)
    node[4, 0:2, 0:3] = True  # on one slice: the SEG omits the empty frames
    seg = _write_seg(
        tmp_path / "seg.dcm", _source_datasets(paths), np.stack([gtv, node], axis=-1), ["GTV", "node"]
    )
    assert int(seg.NumberOfFrames) == 4

    masks = read_seg(tmp_path / "seg.dcm", image)
    assert [(m.number, m.label, m.voxel_count, m.notes) for m in masks] == [
        (1, "GTV", 59, ()),
        (2, "node", 6, ()),
    ]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(masks[0].mask), gtv)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(masks[1].mask), node)
    for mask in masks:
        assert mask.mask.GetOrigin() == image.GetOrigin() and mask.mask.GetSpacing() == image.GetSpacing()
        assert mask.mask.GetDirection() == image.GetDirection()
    assert [i.label for i in read_segment_infos(pydicom.dcmread(tmp_path / "seg.dcm"))] == ["GTV", "node"]
    (only,) = read_seg(pydicom.dcmread(tmp_path / "seg.dcm"), image, segment_numbers=[2])
    assert only.label == "node"
    with pytest.raises(SegReadError, match=r"no segment number\(s\) \[3\]"):
        read_seg(tmp_path / "seg.dcm", image, segment_numbers=[3])


def test_seg_off_the_image_grid_is_resampled_with_a_note(tmp_path: Path) -> None:
    volume = np.full((4, 8, 8), 1000, np.uint16)
    paths = write_ct_slices(tmp_path / "ct", volume)
    mask = np.zeros(volume.shape, bool)
    mask[1:3, 2:6, 2:6] = True
    _write_seg(tmp_path / "seg.dcm", _source_datasets(paths), mask[..., None], ["GTV"])
    shifted = read_series([str(p) for p in paths])
    shifted.SetOrigin((0.25, 0.0, 0.0))  # a quarter voxel off: nearest neighbour keeps the same voxels
    (segment,) = read_seg(tmp_path / "seg.dcm", shifted)
    assert segment.notes == ("SEG frames are not on the image grid; resampled (nearest neighbour)",)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(segment.mask), mask)


def test_not_a_seg_is_refused(tmp_path: Path) -> None:
    paths = write_ct_slices(tmp_path, np.zeros((2, 4, 4), np.uint16))
    with pytest.raises(SegReadError, match="not a readable DICOM-SEG"):
        read_seg(paths[0], read_series([str(p) for p in paths]))


@pytest.mark.slow
def test_real_lung1_gtv_mask_to_seg_and_back_is_identical(  # type: ignore[no-untyped-def]
    lung1_archive: Path, lung1_reference, tmp_path: Path
) -> None:
    folder = next(lung1_archive.glob("LUNG1-001_*"))
    headers = {str(p): pydicom.dcmread(p, stop_before_pixels=True) for p in folder.iterdir()}
    ct = [p for p, h in headers.items() if h.Modality == "CT"]
    rs = pydicom.dcmread(next(p for p, h in headers.items() if h.Modality == "RTSTRUCT"))
    image = read_series(ct)
    number = next(r.number for r in read_roi_infos(rs) if r.name == "GTV-1")
    gtv = sitk.GetArrayFromImage(rasterise_rtstruct(rs, number, image).mask).astype(bool)
    assert int(gtv.sum()) == int(lung1_reference.loc["LUNG1-001", "diagnostics_Mask-original_VoxelNum"])

    # The SEG's frames follow the source images, given here sorted along the normal as the image is.
    sources = _source_datasets(sorted(ct, key=lambda p: float(headers[p].ImagePositionPatient[2])))
    _write_seg(tmp_path / "gtv-seg.dcm", sources, gtv[..., None], ["GTV-1"])
    (segment,) = read_seg(tmp_path / "gtv-seg.dcm", image)
    assert segment.notes == () and segment.voxel_count == int(gtv.sum())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(segment.mask).astype(bool), gtv)
