"""Masks written as DICOM-SEG and RTSTRUCT read back as the same masks, referencing their source series."""

from __future__ import annotations

import functools
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cohort.curate.rtstruct import rasterise_contours, rasterise_rtstruct, read_roi_infos
from cohort.curate.seg import read_seg
from cohort.curate.series import read_series
from cohort.errors import SegmentationError
from cohort.segment.outputs import (
    AlgorithmInfo,
    RTROIInterpretedType,
    coding_for_label,
    slice_contours,
    source_grid,
    write_rtstruct,
    write_seg,
)
from tests.helpers import write_ct_slices

ALGORITHM = AlgorithmInfo("cohort-test-unet", "1.2.3")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


def rasterise_back(path: Path, image: sitk.Image) -> dict[str, np.ndarray]:
    rs = pydicom.dcmread(path)
    return {
        info.name: sitk.GetArrayFromImage(rasterise_rtstruct(rs, info.number, image).mask).astype(bool)
        for info in read_roi_infos(rs)
    }


def seg_back(path: Path, image: sitk.Image) -> dict[str, np.ndarray]:
    return {m.label: sitk.GetArrayFromImage(m.mask).astype(bool) for m in read_seg(path, image)}


def dciodvfy_findings(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dicom3tools' dciodvfy reports for ``path``."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False)
    lines = [line.strip() for line in (run.stdout + run.stderr).splitlines()]
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


# --------------------------------------------------------------------------- contours


def _fill(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise (column, row) polygons with the curation rasteriser on a unit grid."""
    reference = sitk.Image(shape[1], shape[0], 1, sitk.sitkUInt8)
    mask, notes = rasterise_contours([np.column_stack([p, np.zeros(len(p))]) for p in polygons], reference)
    assert notes == []
    return mask[0]


@settings(max_examples=150, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 14), st.integers(1, 14))))
def test_rasterised_contours_of_any_slice_mask_give_the_mask_back(mask: np.ndarray) -> None:
    """rasterise ∘ contour = identity, whatever the mask: diagonal neighbours, borders, holes, islands."""
    polygons = slice_contours(mask)
    assert all(len(p) >= 3 for p in polygons)
    if not mask.any():
        assert polygons == []
        return
    np.testing.assert_array_equal(_fill(polygons, mask.shape), mask)


def test_a_hole_and_two_islands_are_four_polygons_and_a_square_has_four_vertices() -> None:
    mask = np.zeros((20, 24), bool)
    mask[2:14, 2:14] = True
    mask[5:9, 5:9] = False  # hole
    mask[6, 6] = True  # an island inside the hole
    mask[16:19, 16:22] = True  # island outside
    polygons = slice_contours(mask)
    assert len(polygons) == 4
    np.testing.assert_array_equal(_fill(polygons, mask.shape), mask)
    square = np.zeros((6, 6), bool)
    square[1:4, 2:5] = True
    (only,) = slice_contours(square)
    # Collinear vertices are merged: an octagon whose corners cut the square's corners by half a pixel.
    assert len(only) == 8


# --------------------------------------------------------------------------- synthetic series


@pytest.fixture()
def oblique_series(tmp_path: Path) -> tuple[list[pydicom.Dataset], sitk.Image]:
    """An oblique, anisotropic CT series written as single slices, its datasets (shuffled) and image."""
    c, s = np.cos(0.3), np.sin(0.3)
    volume = np.full((5, 24, 28), 1000, np.uint16)
    paths = write_ct_slices(
        tmp_path / "ct",
        volume,
        origin=(12.5, -40.25, 100.0),
        spacing=(0.8, 0.7, 2.5),
        row_cosine=(c, s, 0),
        col_cosine=(-s, c, 0),
    )
    datasets: list[pydicom.Dataset] = [pydicom.dcmread(p) for p in paths]
    return datasets[::-1], read_series([str(p) for p in paths])


def _synthetic_masks() -> dict[str, np.ndarray]:
    gtv = np.zeros((5, 24, 28), bool)
    gtv[1:4, 3:15, 4:16] = True
    gtv[2, 6:11, 7:12] = False  # a hole on the middle slice
    gtv[2, 8, 9] = True  # an island in the hole
    gtv[2, 18:21, 20:25] = True  # and one outside
    gtv[2, 0:2, 26:28] = True  # touching the image corner
    lung = np.zeros_like(gtv)
    lung[0:5, 10:22, 2:9] = True
    return {"GTV-1": gtv, "Lung L": lung}


def test_synthetic_masks_round_trip_exactly_through_rtstruct(
    oblique_series: tuple[list[pydicom.Dataset], sitk.Image], tmp_path: Path
) -> None:
    datasets, image = oblique_series
    masks = _synthetic_masks()
    as_images = {}
    for label, array in masks.items():
        mask = sitk.GetImageFromArray(array.astype(np.uint8))
        mask.CopyInformation(image)
        as_images[label] = mask
    path = write_rtstruct(as_images, datasets, tmp_path / "rs.dcm", algorithm=ALGORITHM)
    back = rasterise_back(path, image)
    assert list(back) == ["GTV-1", "Lung L"]
    for label, array in masks.items():
        np.testing.assert_array_equal(back[label], array)

    rs = pydicom.dcmread(path)
    gtv_contours = rs.ROIContourSequence[0].ContourSequence
    grid = source_grid(datasets)
    middle = str(grid.datasets[2].SOPInstanceUID)
    on_middle = [c for c in gtv_contours if c.ContourImageSequence[0].ReferencedSOPInstanceUID == middle]
    assert len(on_middle) == 5  # outer, hole, island in the hole, island, corner island
    assert len(gtv_contours) == 5 + 2  # one polygon on each of the two other slices
    for contour in gtv_contours:  # every contour lies in the plane of the slice it references
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        assert int(contour.NumberOfContourPoints) == len(points)
        k = [str(d.SOPInstanceUID) for d in grid.datasets].index(
            contour.ContourImageSequence[0].ReferencedSOPInstanceUID
        )
        assert np.abs((points - grid.positions[k]) @ grid.normal).max() < 1e-3
    observations = {int(o.ReferencedROINumber): o.RTROIInterpretedType for o in rs.RTROIObservationsSequence}
    assert observations == {1: "GTV", 2: "ORGAN"}
    assert rs.ROIContourSequence[1].ROIDisplayColor == [0, 200, 120]


def test_synthetic_masks_round_trip_exactly_through_seg_with_codes(
    oblique_series: tuple[list[pydicom.Dataset], sitk.Image], tmp_path: Path
) -> None:
    datasets, image = oblique_series
    masks = _synthetic_masks()
    path = write_seg(masks, datasets, tmp_path / "seg.dcm", algorithm=ALGORITHM)
    back = seg_back(path, image)
    assert list(back) == ["GTV-1", "Lung L"]
    for label, array in masks.items():
        np.testing.assert_array_equal(back[label], array)
    seg = pydicom.dcmread(path)
    assert int(seg.NumberOfFrames) == 3 + 5  # empty frames omitted: GTV on 3 slices, lung on 5
    gtv, lung = seg.SegmentSequence
    assert gtv.SegmentAlgorithmType == "AUTOMATIC" and gtv.SegmentAlgorithmName == "cohort-test-unet"
    assert gtv.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "1.2.3"
    category, kind = gtv.SegmentedPropertyCategoryCodeSequence[0], gtv.SegmentedPropertyTypeCodeSequence[0]
    assert (category.CodeValue, kind.CodeValue, kind.CodeMeaning) == (
        "49755003",
        "372087000",
        "Neoplasm, Primary",
    )
    lung_type = lung.SegmentedPropertyTypeCodeSequence[0]
    assert (lung_type.CodeValue, lung_type.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning) == (
        "39607008",
        "Left",
    )


def test_writers_refuse_what_they_cannot_write_faithfully(
    oblique_series: tuple[list[pydicom.Dataset], sitk.Image], tmp_path: Path
) -> None:
    datasets, image = oblique_series
    gtv = _synthetic_masks()["GTV-1"]
    out = tmp_path / "x.dcm"
    with pytest.raises(SegmentationError, match="must be binary"):
        write_seg({"GTV-1": gtv.astype(np.uint8) * 2}, datasets, out, algorithm=ALGORITHM)
    with pytest.raises(SegmentationError, match="is empty"):
        write_rtstruct({"GTV-1": np.zeros_like(gtv)}, datasets, out, algorithm=ALGORITHM)
    with pytest.raises(SegmentationError, match=r"mask shape \(4, 24, 28\)"):
        write_rtstruct({"GTV-1": gtv[1:]}, datasets, out, algorithm=ALGORITHM)
    with pytest.raises(SegmentationError, match="no segmented property codes"):
        write_seg({"Spleen": gtv}, datasets, out, algorithm=ALGORITHM)
    shifted = sitk.GetImageFromArray(gtv.astype(np.uint8))
    shifted.CopyInformation(image)
    shifted.SetOrigin(tuple(np.asarray(image.GetOrigin()) + 0.3))
    with pytest.raises(SegmentationError, match="do not fall on slices of the mask grid"):
        write_rtstruct({"GTV-1": shifted}, datasets, out, algorithm=ALGORITHM)
    other = pydicom.dcmread(datasets[0].filename)
    other.SeriesInstanceUID = "1.2.3.999"
    with pytest.raises(SegmentationError, match="share one non-empty SeriesInstanceUID"):
        write_seg({"GTV-1": gtv}, [*datasets[1:], other], out, algorithm=ALGORITHM)
    assert not out.exists()


def test_a_mask_on_a_grid_with_a_missing_source_slice_is_written_only_where_slices_exist(
    oblique_series: tuple[list[pydicom.Dataset], sitk.Image], tmp_path: Path
) -> None:
    """A mask on the regular grid read_series builds over a gap: the gap slice has no slice to reference."""
    datasets, image = oblique_series
    grid = source_grid(datasets)
    without_middle = [d for d in datasets if d.SOPInstanceUID != grid.datasets[2].SOPInstanceUID]
    gtv = _synthetic_masks()["GTV-1"]
    mask = sitk.GetImageFromArray(gtv.astype(np.uint8))
    mask.CopyInformation(image)
    with pytest.raises(SegmentationError, match=r"mask slices \[2\] hold voxels but have no source slice"):
        write_rtstruct({"GTV-1": mask}, without_middle, tmp_path / "rs.dcm", algorithm=ALGORITHM)
    gtv[2] = False
    mask = sitk.GetImageFromArray(gtv.astype(np.uint8))
    mask.CopyInformation(image)
    path = write_rtstruct({"GTV-1": mask}, without_middle, tmp_path / "rs.dcm", algorithm=ALGORITHM)
    np.testing.assert_array_equal(rasterise_back(path, image)["GTV-1"], gtv)


def test_labels_find_their_codes_and_explicit_codings_win() -> None:
    assert coding_for_label("GTV-1").interpreted_type == RTROIInterpretedType.GTV
    right = coding_for_label("Lung R").modifier
    assert right is not None and right.meaning == "Right"
    assert coding_for_label("lungs").modifier is None
    custom = coding_for_label("GTV-1")
    assert coding_for_label("Spleen", {"Spleen": custom}) is custom


# --------------------------------------------------------------------------- real data


@functools.cache  # read once per session; the writers never modify their inputs
def _lung1(lung1_archive: Path, patient: str) -> tuple[list[pydicom.Dataset], sitk.Image, sitk.Image]:
    folder = next(lung1_archive.glob(f"{patient}_*"))
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())}
    ct: list[pydicom.Dataset] = [h for h in headers.values() if h.Modality == "CT"]
    rs = pydicom.dcmread(next(p for p, h in headers.items() if h.Modality == "RTSTRUCT"))
    image = read_series([str(p) for p, h in headers.items() if h.Modality == "CT"])
    number = next(r.number for r in read_roi_infos(rs) if r.name == "GTV-1")
    return ct, image, rasterise_rtstruct(rs, number, image).mask


def _assert_references_source(ds: pydicom.Dataset, ct: list[pydicom.Dataset]) -> None:
    source_uids = {str(h.SOPInstanceUID) for h in ct}
    referenced = {
        str(e.value)
        for e in ds.iterall()
        if e.keyword == "ReferencedSOPInstanceUID" and e.value in source_uids
    }
    others = {
        str(e.value)
        for e in ds.iterall()
        if e.keyword == "ReferencedSOPInstanceUID"
        and e.value not in source_uids
        and e.value != ct[0].StudyInstanceUID
    }
    assert referenced and not others  # every referenced instance is a source slice (or, for RT, the study)
    assert (
        ds.StudyInstanceUID == ct[0].StudyInstanceUID and ds.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
    )
    assert ds.PatientID == ct[0].PatientID
    assert ds.SeriesInstanceUID != ct[0].SeriesInstanceUID and ds.SOPInstanceUID not in source_uids


@pytest.mark.slow
@pytest.mark.parametrize("patient", ["LUNG1-001", "LUNG1-002"])
def test_real_gtv_round_trips_through_rtstruct_and_seg(
    lung1_archive: Path, tmp_path: Path, patient: str
) -> None:
    ct, image, gtv = _lung1(lung1_archive, patient)
    original = sitk.GetArrayFromImage(gtv).astype(bool)

    started = time.perf_counter()
    rs_path = write_rtstruct({"GTV-1": gtv}, ct, tmp_path / "rs.dcm", algorithm=ALGORITHM)
    rs_seconds = time.perf_counter() - started
    started = time.perf_counter()
    seg_path = write_seg({"GTV-1": gtv}, ct, tmp_path / "seg.dcm", algorithm=ALGORITHM)
    seg_seconds = time.perf_counter() - started

    from_rtstruct = rasterise_back(rs_path, image)["GTV-1"]
    assert dice(from_rtstruct, original) >= 0.98
    assert int((from_rtstruct ^ original).sum()) == 0  # measured: exact, by construction of the contours
    np.testing.assert_array_equal(seg_back(seg_path, image)["GTV-1"], original)

    rs, seg = pydicom.dcmread(rs_path), pydicom.dcmread(seg_path)
    _assert_references_source(rs, ct)
    _assert_references_source(seg, ct)
    rt_series = (
        rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    )
    assert rt_series.SeriesInstanceUID == ct[0].SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in rt_series.ContourImageSequence} == {
        str(h.SOPInstanceUID) for h in ct
    }
    assert rs.StructureSetROISequence[0].ROIGenerationAlgorithm == "AUTOMATIC"
    assert rs.RTROIObservationsSequence[0].RTROIInterpretedType == "GTV"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct[0].SeriesInstanceUID
    slices_with_gtv = int(original.reshape(original.shape[0], -1).any(axis=1).sum())
    assert int(seg.NumberOfFrames) == slices_with_gtv
    # Generous bounds on a shared 2-core machine: measured about 0.3 s (RTSTRUCT) and 0.5-2 s (SEG).
    assert rs_seconds < 10 and seg_seconds < 30


@pytest.mark.slow
def test_written_objects_pass_dciodvfy_without_errors(lung1_archive: Path, tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip(
            "dciodvfy (dicom3tools) is not on PATH; install the dicom3tools package to run this check"
        )
    ct, _, gtv = _lung1(lung1_archive, "LUNG1-001")
    paths = [
        write_rtstruct({"GTV-1": gtv}, ct, tmp_path / "rs.dcm", algorithm=ALGORITHM),
        write_seg({"GTV-1": gtv}, ct, tmp_path / "seg.dcm", algorithm=ALGORITHM),
    ]
    for path in paths:
        errors, warnings = dciodvfy_findings(path)
        assert errors == [], f"{path.name}: {errors}"
        # Only warnings about what the source itself carries (an empty StudyID, a one-component
        # patient name, the de-identification scheme "XNAT" of its coded method) are expected.
        assert all(("Study ID" in w or "Person Name" in w or "<XNAT>" in w) for w in warnings), warnings
