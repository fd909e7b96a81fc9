from __future__ import annotations

from pathlib import Path

import pytest

from cohort.curate.select import harmonise_roi_name, plan_work
from cohort.index.crawl import index_files, list_archive
from cohort.spec import DEFAULT_ROIS, build_spec


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("GTV-1", "GTV"),
        ("gtv1", "GTV"),
        ("GTV", "GTV"),
        ("gtv_primary", "GTV"),
        ("  GTV  1 ", "GTV"),
        ("GTV-2", None),
        ("PTV-1", None),
        ("1,SUV_primair", None),
    ],
)
def test_default_roi_harmonisation(name: str, canonical: str | None) -> None:
    assert harmonise_roi_name(name, DEFAULT_ROIS) == canonical


def test_first_matching_canonical_name_wins() -> None:
    rois = {"Lung_L": ["lung[ -_]?l(eft)?"], "Lung": ["lung.*"]}
    assert harmonise_roi_name("Lung-Left", rois) == "Lung_L"
    assert harmonise_roi_name("Lung R", rois) == "Lung"


def test_real_archive_selects_each_ct_with_its_gtv_and_explains_the_rest(lung1_archive: Path) -> None:
    instances, quarantine = index_files(list_archive(lung1_archive))
    spec = build_spec({"archive": str(lung1_archive), "store": "unused"}, environ={})
    items, decisions = plan_work(instances, spec)
    assert quarantine.num_rows == 0
    assert sorted(i.patient_id for i in items) == ["LUNG1-001", "LUNG1-002"]
    assert sorted(i.n_slices for i in items) == [111, 134]
    assert all([(r.source_name, r.canonical) for r in i.rois] == [("GTV-1", "GTV")] for i in items)
    # The RTDOSE grid is an image-like series, never selected, and said why.
    table = decisions.to_pandas()
    dose = table[table["modality"] == "RTDOSE"]
    assert len(dose) == 2 and not dose["selected"].any()
    assert set(dose["reason"]) == {"modality RTDOSE is not CT"}


def test_series_without_a_matching_roi_is_recorded_not_selected(lung1_archive: Path) -> None:
    instances, _ = index_files(list_archive(lung1_archive))
    spec = build_spec(
        {
            "archive": str(lung1_archive),
            "store": "unused",
            "rois": {"Heart": ["heart"]},
            "selection": {"require_roi": "Heart"},
        },
        environ={},
    )
    items, decisions = plan_work(instances, spec)
    table = decisions.to_pandas()
    ct = table[table["modality"] == "CT"].set_index("patient_id")
    # LUNG1-002 contours the heart, LUNG1-001 does not.
    assert [i.patient_id for i in items] == ["LUNG1-002"]
    assert not ct.loc["LUNG1-001", "selected"]
    assert "no ROI harmonised to 'Heart'" in ct.loc["LUNG1-001", "reason"]


def test_automatic_segmentation_adds_one_model_item_per_series_and_takes_unannotated_series(
    lung1_archive: Path,
) -> None:
    instances, _ = index_files(list_archive(lung1_archive))
    base = {
        "archive": str(lung1_archive),
        "store": "unused",
        "rois": {"Heart": ["heart"], "GTV": ["gtv[-_ ]?1"]},
        "selection": {"require_roi": "Heart"},
        "segmentation": {"model": "demo-lung-gtv", "roi": "GTV_auto"},
    }
    items, decisions = plan_work(instances, build_spec(base, environ={}))
    by_kind = {(i.patient_id, i.automatic): i for i in items}
    # LUNG1-002 contours the heart: its RTSTRUCT item, then its automatic twin; LUNG1-001 does not:
    # it is selected for the automatic ROI alone, and the decision says so.
    assert sorted(by_kind) == [("LUNG1-001", True), ("LUNG1-002", False), ("LUNG1-002", True)]
    auto = by_kind[("LUNG1-001", True)]
    assert (auto.rtstruct_uid, auto.rtstruct_hash, auto.annotation_modality) == ("", "", "MODEL")
    assert [(r.source_name, r.canonical) for r in auto.rois] == [("model:demo-lung-gtv", "GTV_auto")]
    assert auto.n_slices == 134 and len(auto.image_hash) == 64
    twin, annotated = by_kind[("LUNG1-002", True)], by_kind[("LUNG1-002", False)]
    assert (twin.series_uid, twin.image_paths) == (annotated.series_uid, annotated.image_paths)
    table = decisions.to_pandas()
    ct = table[table["modality"] == "CT"].set_index("patient_id")
    assert ct.loc["LUNG1-001"]["selected"].any()
    assert "automatic segmentation only (model:demo-lung-gtv)" in " ".join(ct.loc["LUNG1-001"]["reason"])

    # unannotated: false keeps the structure-set rule for selection; selected series still get the model.
    strict = {**base, "segmentation": {**base["segmentation"], "unannotated": False}}
    items, _ = plan_work(instances, build_spec(strict, environ={}))
    assert sorted((i.patient_id, i.automatic) for i in items) == [("LUNG1-002", False), ("LUNG1-002", True)]
