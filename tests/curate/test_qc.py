"""Quality checks, selection rules and structure-set linking on the index (no pixel reads)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid

from cohort.curate.qc import QC_SCHEMA, QcCheck
from cohort.curate.select import DECISION_SCHEMA, LINK_SCHEMA, DecisionStep, LinkMethod, plan_cohort
from cohort.index.crawl import index_files, list_archive
from cohort.spec import CohortSpec, build_spec


def _spec(archive: Path, **sections: Any) -> CohortSpec:
    return build_spec({"archive": str(archive), "store": "unused", **sections}, environ={})


@pytest.fixture(scope="module")
def lung1_index(lung1_archive: Path) -> pd.DataFrame:
    instances, _ = index_files(list_archive(lung1_archive))
    return instances.to_pandas()


def _ct_qc(plan_qc: Any) -> pd.DataFrame:
    table = plan_qc.to_pandas()
    return table[table["modality"] == "CT"].set_index("patient_id")


def test_defaults_pass_every_check_and_keep_the_lung1_selection(
    lung1_index: pd.DataFrame, lung1_archive: Path
) -> None:
    plan = plan_cohort(lung1_index, _spec(lung1_archive))
    assert plan.qc.schema == QC_SCHEMA and plan.decisions.schema == DECISION_SCHEMA
    assert plan.links.schema == LINK_SCHEMA
    assert sorted((i.patient_id, i.n_slices, i.link) for i in plan.items) == [
        ("LUNG1-001", 134, "referenced_series"),
        ("LUNG1-002", 111, "referenced_series"),
    ]
    qc = _ct_qc(plan.qc)
    assert qc["passed"].all() and all(qc[f"qc_{c}"].all() for c in QcCheck)
    assert list(qc["qc_geometry_reason"]) == ["regular", "regular"]
    assert qc.loc["LUNG1-001", "qc_kernel_reason"] == "B19f (no limit)"
    assert qc.loc["LUNG1-002", "slice_thickness"] == 3.0 and qc.loc["LUNG1-002", "n_slices"] == 111
    # One QC row per image series (CT, RTDOSE, RTPLAN of two patients), one column and reason per check.
    assert plan.qc.num_rows == 6
    assert {f"qc_{c}_reason" for c in QcCheck} <= set(plan.qc.schema.names)
    decisions = plan.decisions.to_pandas()
    ct = decisions[decisions["modality"] == "CT"]
    assert list(ct["reason"]) == ["ROIs GTV-1 -> GTV", "ROIs GTV-1 -> GTV"]
    assert set(ct["step"]) == {"selected"} and ct["qc_passed"].all()
    assert (ct["series_key"] == ct["series_uid"]).all() and ct["part"].isna().all()


def test_each_check_fails_with_its_reason(lung1_index: pd.DataFrame, lung1_archive: Path) -> None:
    spec = _spec(
        lung1_archive,
        qc={
            "orientation": ["axial"],
            "slice_thickness": {"min": 1.0, "max": 2.5},
            "slice_count": {"min": 120},
            "pixel_spacing": {"max": 0.977},
            "in_plane_size": {"min": 512, "max": 512},
            "kernels": [r"B\d+f"],
            "require_rescale": True,
            "contrast": "with",
        },
    )
    plan = plan_cohort(lung1_index, spec)
    qc = _ct_qc(plan.qc)
    first, second = qc.loc["LUNG1-001"], qc.loc["LUNG1-002"]
    assert first["qc_orientation"] and first["qc_orientation_reason"] == "axial accepted"
    assert (
        not first["qc_slice_thickness"]
        and first["qc_slice_thickness_reason"] == "SliceThickness 3 mm outside [1, 2.5]"
    )
    assert first["qc_slice_count"] and not second["qc_slice_count"]
    assert second["qc_slice_count_reason"] == "slice count 111 slices outside [120, inf]"
    assert first["qc_pixel_spacing"] and second["qc_pixel_spacing"]  # 0.9766 and 0.977 <= 0.977
    assert first["qc_in_plane_size_reason"] == "512 x 512 pixels in [512, 512]"
    assert first["qc_kernel"] and first["qc_kernel_reason"] == "B19f accepted"
    assert not second["qc_kernel"] and second["qc_kernel_reason"] == r"no ConvolutionKernel; accepted: B\d+f"
    assert first["qc_rescale"] and second["qc_rescale"]
    assert not first["qc_contrast"] and first["qc_contrast_reason"] == (
        "no contrast agent recorded; required: with contrast"
    )
    assert first["reason"] == (
        "slice_thickness: SliceThickness 3 mm outside [1, 2.5]; "
        "contrast: no contrast agent recorded; required: with contrast"
    )
    assert plan.items == ()
    decisions = plan.decisions.to_pandas()
    ct = decisions[decisions["modality"] == "CT"].set_index("patient_id")
    assert set(ct["step"]) == {"qc"} and not ct["qc_passed"].any()
    assert ct.loc["LUNG1-002", "reason"].startswith("QC failed: slice_thickness: SliceThickness 3 mm outside")


def test_contrast_without_and_a_coronal_only_rule(lung1_index: pd.DataFrame, lung1_archive: Path) -> None:
    without = plan_cohort(lung1_index, _spec(lung1_archive, qc={"contrast": "without"}))
    assert len(without.items) == 2
    marked = lung1_index.copy()
    marked.loc[marked["modality"] == "CT", "contrast_agent"] = "OMNIPAQUE"
    refused = _ct_qc(plan_cohort(marked, _spec(lung1_archive, qc={"contrast": "without"})).qc)
    assert refused.loc["LUNG1-001", "qc_contrast_reason"] == (
        "ContrastBolusAgent 'OMNIPAQUE'; required: without contrast"
    )
    marked.loc[marked["modality"] == "CT", "contrast_agent"] = "None"  # a no-contrast value
    assert len(plan_cohort(marked, _spec(lung1_archive, qc={"contrast": "without"})).items) == 2
    coronal = _ct_qc(plan_cohort(lung1_index, _spec(lung1_archive, qc={"orientation": ["coronal"]})).qc)
    assert coronal.loc["LUNG1-001", "qc_orientation_reason"] == "axial; accepted: coronal"


def test_a_damaged_series_is_not_selected_unless_the_spec_repairs_it(
    lung1_index: pd.DataFrame, lung1_archive: Path
) -> None:
    ct = lung1_index[(lung1_index["modality"] == "CT") & lung1_index["patient_id"].eq("LUNG1-001")]
    z = ct["image_position"].map(lambda p: p[2]).sort_values()
    damaged = lung1_index.drop(index=z.index[50])
    plan = plan_cohort(damaged, _spec(lung1_archive))
    assert [i.patient_id for i in plan.items] == ["LUNG1-002"]
    decisions = plan.decisions.to_pandas().set_index("patient_id")
    row = decisions[decisions["modality"] == "CT"].loc["LUNG1-001"]
    assert row["step"] == "qc" and "missing slices: 1 missing at median spacing 3.000 mm" in row["reason"]
    assert "set qc.geometry.irregular_spacing: resample" in row["reason"]

    repaired = plan_cohort(damaged, _spec(lung1_archive, qc={"geometry": {"irregular_spacing": "resample"}}))
    item = next(i for i in repaired.items if i.patient_id == "LUNG1-001")
    assert item.n_slices == 133 and item.read_policy.irregular_spacing == "resample"
    qc = _ct_qc(repaired.qc)
    assert qc.loc["LUNG1-001", "geometry_flags"].tolist() == ["missing_slices"]
    assert qc.loc["LUNG1-001", "qc_geometry_reason"].endswith("(repaired when read)")


def test_two_acquisitions_become_sub_series_with_their_own_decisions(
    lung1_index: pd.DataFrame, lung1_archive: Path
) -> None:
    ct = lung1_index[(lung1_index["modality"] == "CT") & lung1_index["patient_id"].eq("LUNG1-001")]
    second = ct.assign(
        acquisition_number=3,
        sop_instance_uid=ct["sop_instance_uid"] + ".3",
        path=ct["path"] + ".acq3",
    )
    index = pd.concat([lung1_index.assign(acquisition_number=2), second], ignore_index=True)
    plan = plan_cohort(index, _spec(lung1_archive))
    uid = str(ct["series_uid"].iloc[0])
    items = sorted(i.series_uid for i in plan.items if i.patient_id == "LUNG1-001")
    assert items == [f"{uid}#acq2", f"{uid}#acq3"]
    decisions = plan.decisions.to_pandas()
    parts = decisions[decisions["series_uid"] == uid]
    assert list(parts["part"]) == ["acq2", "acq3"] and parts["selected"].all()
    assert (
        parts["reason"].str.startswith("sub-series acq2 (2 acquisitions (AcquisitionNumber) that cover").any()
    )

    thinnest = plan_cohort(index, _spec(lung1_archive, selection={"per_patient": "thinnest"}))
    chosen = [i.series_uid for i in thinnest.items if i.patient_id == "LUNG1-001"]
    assert chosen == [f"{uid}#acq2"]  # equal in every respect: the first key wins
    table = thinnest.decisions.to_pandas().set_index("series_key")
    assert table.loc[f"{uid}#acq3", "step"] == "per_patient"
    assert table.loc[f"{uid}#acq3", "reason"] == (
        f"per_patient thinnest: {uid}#acq2 chosen (3 mm, 134 slices; this one 3 mm, 134 slices)"
    )


def _add_thin_series(archive: Path, patient: str, thickness: float) -> str:
    """A second CT of the patient (same positions, claimed thinner) with its own structure set."""
    source, target = archive / patient / "CT", archive / patient / "CT-thin"
    shutil.copytree(source, target)
    series_uid = generate_uid()
    for path in target.iterdir():
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SliceThickness = thickness
        ds.save_as(path)
    rs_path = next((archive / patient / "RS").iterdir())
    rs = pydicom.dcmread(rs_path)
    rs.SOPInstanceUID = rs.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for frame in rs.ReferencedFrameOfReferenceSequence:
        for study in frame.RTReferencedStudySequence:
            for series in study.RTReferencedSeriesSequence:
                series.SeriesInstanceUID = series_uid
    rs.save_as(archive / patient / "RS" / "RS-thin.dcm")
    return str(series_uid)


def test_per_patient_thinnest_keeps_one_series_and_says_why(tmp_path: Path, demo_archive: Any) -> None:
    archive = tmp_path / "archive"
    shutil.copytree(demo_archive.root, archive)
    thick = demo_archive.patients[0].scanner.slice_thickness
    thin = _add_thin_series(archive, "DEMO-001", thick / 2)
    instances, _ = index_files(list_archive(archive))

    everything = plan_cohort(instances, _spec(archive))
    assert len(everything.items) == 5  # today's default: every eligible series

    plan = plan_cohort(instances, _spec(archive, selection={"per_patient": "thinnest"}))
    assert len(plan.items) == 4
    chosen = next(i for i in plan.items if i.patient_id == "DEMO-001")
    assert chosen.series_uid == thin
    decisions = plan.decisions.to_pandas()
    demo1 = decisions[(decisions["patient_id"] == "DEMO-001") & (decisions["modality"] == "CT")]
    winner = demo1[demo1["selected"]].iloc[0]
    loser = demo1[~demo1["selected"]].iloc[0]
    assert winner["reason"].endswith(
        f"; per_patient thinnest: chosen of 2 ({thick / 2:g} mm, {chosen.n_slices} slices)"
    )
    assert loser["step"] == DecisionStep.PER_PATIENT
    assert loser["reason"].startswith(f"per_patient thinnest: {thin} chosen ({thick / 2:g} mm")

    most = plan_cohort(instances, _spec(archive, selection={"per_patient": "most_slices"}))
    assert len(most.items) == 4


def test_demo_archive_defaults_select_every_patient(demo_archive: Any) -> None:
    instances, _ = index_files(list_archive(demo_archive.root))
    plan = plan_cohort(instances, _spec(demo_archive.root))
    assert sorted(i.patient_id for i in plan.items) == [p.patient_id for p in demo_archive.patients]
    assert [i.n_slices for i in sorted(plan.items, key=lambda i: i.patient_id)] == [
        p.n_slices for p in demo_archive.patients
    ]
    assert plan.qc.to_pandas()["passed"].all()


def test_structure_set_without_series_reference_links_by_frame_of_reference(
    lung1_index: pd.DataFrame, lung1_archive: Path
) -> None:
    index = lung1_index.copy()
    is_rs = index["modality"] == "RTSTRUCT"
    index.loc[is_rs, "referenced_series_uids"] = pd.Series([[]] * int(is_rs.sum()), index=index.index[is_rs])
    plan = plan_cohort(index, _spec(lung1_archive))
    assert [i.link for i in plan.items] == ["frame_of_reference", "frame_of_reference"]
    links = plan.links.to_pandas()
    assert set(links["link"]) == {LinkMethod.FRAME_OF_REFERENCE}
    assert set(links["note"]) == {"references no series; linked by its frame of reference"}
    decisions = plan.decisions.to_pandas()
    ct = decisions[decisions["modality"] == "CT"]
    assert (
        ct["reason"]
        .str.endswith("RTSTRUCT linked by its frame of reference (it references no series of the archive)")
        .all()
    )

    # A second image series in the same frame of reference makes the link ambiguous: recorded, not guessed.
    ct_rows = index[(index["modality"] == "CT") & index["patient_id"].eq("LUNG1-002")]
    copy = ct_rows.assign(
        series_uid="1.2.3.copy",
        sop_instance_uid=ct_rows["sop_instance_uid"] + ".c",
        path=ct_rows["path"] + "c",
    )
    plan = plan_cohort(pd.concat([index, copy], ignore_index=True), _spec(lung1_archive))
    assert [i.patient_id for i in plan.items] == ["LUNG1-001"]
    links = plan.links.to_pandas().set_index("annotation_path")
    note = links[links["series_uid"].isna()]["note"].iloc[0]
    assert note == "references no series; its frame of reference holds 2 image series: ambiguous"
    row = plan.decisions.to_pandas().set_index("series_key").loc["1.2.3.copy"]
    assert row["step"] == "link" and "ambiguous" in row["reason"]


def test_a_seg_with_labels_links_like_an_rtstruct(lung1_index: pd.DataFrame, lung1_archive: Path) -> None:
    rs = lung1_index[(lung1_index["modality"] == "RTSTRUCT") & lung1_index["patient_id"].eq("LUNG1-001")]
    seg = rs.assign(
        modality="SEG", sop_instance_uid="1.2.3.seg", path="/seg.dcm", roi_names=[["GTV-1", "Lung"]]
    )
    plan = plan_cohort(pd.concat([lung1_index, seg], ignore_index=True), _spec(lung1_archive))
    kinds = sorted((i.patient_id, i.annotation_modality) for i in plan.items)
    assert kinds == [("LUNG1-001", "RTSTRUCT"), ("LUNG1-001", "SEG"), ("LUNG1-002", "RTSTRUCT")]
    row = plan.decisions.to_pandas().set_index("rtstruct_uid").loc["1.2.3.seg"]
    assert row["annotation_modality"] == "SEG" and row["reason"] == "ROIs GTV-1 -> GTV; from a SEG"
