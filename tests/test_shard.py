from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import pyarrow as pa
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cohort.curate.select import RoiSelection, WorkItem, plan_work
from cohort.index.crawl import index_files, list_archive
from cohort.radiomics.extract import feature_set_name
from cohort.shard import (
    FAILURE_SCHEMA,
    FEATURE_KEY_SCHEMA,
    ShardSettings,
    check_features_schema,
    make_shards,
    process_shard,
)
from cohort.spec import build_spec, settings_hash
from tests.helpers import make_pixels_undecodable


def _item(i: int, slices: int) -> WorkItem:
    return WorkItem(
        patient_id=f"P{i}",
        study_uid="s",
        series_uid=f"1.{i}",
        modality="CT",
        image_paths=tuple(f"/x/{i}/{k}" for k in range(slices)),
        image_hash="h",
        rtstruct_path="/x/rs",
        rtstruct_uid=f"2.{i}",
        rtstruct_hash="h",
        rois=(RoiSelection("GTV-1", "GTV"),),
    )


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 1200), min_size=0, max_size=60),
    target=st.integers(50, 3000),
    min_shards=st.integers(1, 8),
)
def test_shards_cover_every_item_exactly_once_and_balance_slices(
    sizes: list[int], target: int, min_shards: int
) -> None:
    items = [_item(i, n) for i, n in enumerate(sizes)]
    shards = make_shards(items, target, min_shards=min_shards)
    flat = [it.series_uid for shard in shards for it in shard]
    assert sorted(flat) == sorted(it.series_uid for it in items)
    assert len(flat) == len(set(flat))
    if items:
        loads = [sum(it.n_slices for it in shard) for shard in shards]
        # Greedy LPT: the heaviest shard exceeds the lightest by at most the largest item.
        assert max(loads) - min(loads) <= max(sizes)
        assert len(shards) >= min(min_shards, len(items))


def _settings(spec_archive: Path) -> tuple[list[WorkItem], ShardSettings]:
    spec = build_spec({"archive": str(spec_archive), "store": "unused"}, environ={})
    instances, _ = index_files(list_archive(spec_archive))
    items, _ = plan_work(instances, spec)
    params = spec.radiomics_params()
    digest = settings_hash(params)
    return items, ShardSettings(params, digest, feature_set_name(digest), "test-run")


def test_one_broken_case_becomes_failure_rows_and_the_others_complete(tmp_path: Path, demo_archive) -> None:
    archive = tmp_path / "archive"
    shutil.copytree(demo_archive.root, archive)
    # DEMO-002: a CT slice whose compressed pixel data is junk (its header still indexes fine).
    make_pixels_undecodable(sorted((archive / "DEMO-002" / "CT").iterdir())[5])
    # DEMO-003: the GTV contours moved 5 m away, off the image grid.
    rs_path = archive / "DEMO-003" / "RS" / "RS.dcm"
    rs = pydicom.dcmread(rs_path)
    gtv = next(r for r in rs.StructureSetROISequence if "gtv" in r.ROIName.lower())
    for rc in rs.ROIContourSequence:
        if rc.ReferencedROINumber == gtv.ROINumber:
            for contour in rc.ContourSequence:
                pts = [float(v) for v in contour.ContourData]
                contour.ContourData = [v + 5000.0 if i % 3 == 0 else v for i, v in enumerate(pts)]
    rs.save_as(rs_path)

    items, shard_settings = _settings(archive)
    result = process_shard(items, shard_settings)
    check_features_schema(result.features)
    assert result.failures.schema == FAILURE_SCHEMA
    assert sorted(result.features.column("patient_id").to_pylist()) == ["DEMO-001", "DEMO-004"]
    failures = {row["patient_id"]: row for row in result.failures.to_pylist()}
    assert set(failures) == {"DEMO-002", "DEMO-003"}
    assert failures["DEMO-002"]["stage"] == "curate"
    assert failures["DEMO-002"]["error_type"] == "SeriesAssemblyError"
    assert "cannot decode pixel data" in failures["DEMO-002"]["reason"]
    assert failures["DEMO-003"]["stage"] == "mask"
    assert "entirely outside the image" in failures["DEMO-003"]["reason"]
    assert failures["DEMO-003"]["roi_source"] == demo_archive.patients[2].gtv_name


def test_feature_rows_carry_keys_metadata_and_provenance(demo_archive) -> None:
    items, shard_settings = _settings(demo_archive.root)
    result = process_shard(items[:1], shard_settings)
    row = result.features.to_pylist()[0]
    truth = next(p for p in demo_archive.patients if p.patient_id == row["patient_id"])
    assert row["roi"] == "GTV" and row["roi_source"] == truth.gtv_name
    assert row["manufacturer"] == truth.scanner.manufacturer
    assert row["convolution_kernel"] == truth.scanner.kernel
    assert row["slice_thickness"] == truth.scanner.slice_thickness
    assert row["n_slices"] == truth.n_slices
    assert row["settings_hash"] == shard_settings.settings_hash and len(row["image_hash"]) == 64
    assert row["pyradiomics_version"] and row["simpleitk_version"]
    assert result.features.schema.names[: len(FEATURE_KEY_SCHEMA)] == FEATURE_KEY_SCHEMA.names
    assert all(
        result.features.schema.field(n).type == pa.float64()
        for n in result.features.schema.names[len(FEATURE_KEY_SCHEMA) :]
    )


def test_schema_check_rejects_non_float_features() -> None:
    table = pa.Table.from_pylist([], schema=FEATURE_KEY_SCHEMA.append(pa.field("original_x", pa.string())))
    with pytest.raises(ValueError, match="not float64"):
        check_features_schema(table)


@pytest.mark.slow
def test_several_rois_per_series_and_a_too_small_roi_fails_alone(tmp_path: Path, demo_archive) -> None:
    archive = tmp_path / "archive"
    shutil.copytree(demo_archive.root, archive)
    # DEMO-001 gets a second GTV of one voxel: a contour smaller than a pixel around one centre.
    rs_path = archive / "DEMO-001" / "RS" / "RS.dcm"
    rs = pydicom.dcmread(rs_path)
    gtv_roi = next(r for r in rs.StructureSetROISequence if r.ROIName == "GTV-1")
    gtv_contours = next(c for c in rs.ROIContourSequence if c.ReferencedROINumber == gtv_roi.ROINumber)
    contour = gtv_contours.ContourSequence[len(gtv_contours.ContourSequence) // 2]
    x, y, z = (float(v) for v in contour.ContourData[:3])
    ct = pydicom.dcmread(sorted((archive / "DEMO-001" / "CT").iterdir())[0])
    sx = float(ct.PixelSpacing[1])
    x0 = float(ct.ImagePositionPatient[0]) + round((x - float(ct.ImagePositionPatient[0])) / sx) * sx
    y0 = float(ct.ImagePositionPatient[1]) + round((y - float(ct.ImagePositionPatient[1])) / sx) * sx
    tiny = copy.deepcopy(gtv_roi)
    tiny.ROINumber, tiny.ROIName = 99, "GTV-2"
    rs.StructureSetROISequence.append(tiny)
    tiny_contours = copy.deepcopy(gtv_contours)
    tiny_contours.ReferencedROINumber = 99
    tiny_contours.ContourSequence = tiny_contours.ContourSequence[:1]
    tiny_contours.ContourSequence[0].ContourData = [
        x0 - 0.3 * sx,
        y0 - 0.3 * sx,
        z,
        x0 + 0.3 * sx,
        y0 - 0.3 * sx,
        z,
        x0,
        y0 + 0.3 * sx,
        z,
    ]
    tiny_contours.ContourSequence[0].NumberOfContourPoints = 3
    rs.ROIContourSequence.append(tiny_contours)
    rs.save_as(rs_path)

    spec = build_spec(
        {
            "archive": str(archive),
            "store": "unused",
            "rois": {
                "GTV": ["gtv[-_ ]?1", "gtv", "gtv_primary"],
                "GTV2": ["gtv[-_ ]?2"],
                "Lung_L": ["lung[- _]?l(eft)?"],
                "Lung_R": ["lung[- _]?r(ight)?"],
            },
        },
        environ={},
    )
    instances, _ = index_files(list_archive(archive))
    items, _ = plan_work(instances, spec)
    params = spec.radiomics_params()
    digest = settings_hash(spec.feature_settings())
    result = process_shard(
        [i for i in items if i.patient_id == "DEMO-001"],
        ShardSettings(params, digest, feature_set_name(digest), "t"),
    )
    assert sorted(result.features.column("roi").to_pylist()) == ["GTV", "Lung_L", "Lung_R"]
    (failure,) = result.failures.to_pylist()
    assert (failure["roi_source"], failure["stage"]) == ("GTV-2", "radiomics")
    assert "1 segmented voxel" in failure["reason"]


def test_harmonisation_steps_from_the_spec_change_the_image_the_hash_and_the_notes(demo_archive) -> None:
    plain = build_spec({"archive": str(demo_archive.root), "store": "unused"}, environ={})
    steps = [{"op": "resample", "spacing": [2.0, 2.0, None]}, {"op": "clip", "lower": -1000, "upper": 400}]
    harmonised = build_spec(
        {"archive": str(demo_archive.root), "store": "unused", "harmonise": steps}, environ={}
    )
    assert settings_hash(plain.feature_settings()) != settings_hash(harmonised.feature_settings())
    items, base = _settings(demo_archive.root)
    with_steps = dataclasses.replace(
        base, harmonise=tuple(s.model_dump(mode="json") for s in harmonised.harmonise)
    )
    before = process_shard(items[:1], base).features.to_pylist()[0]
    after = process_shard(items[:1], with_steps).features.to_pylist()[0]
    assert "harmonised (2 steps" in after["mask_notes"]
    # Rasterised on the 2 mm in-plane grid: voxels scale with the pixel area, the physical volume stays.
    area = before["pixel_spacing_row"] * before["pixel_spacing_col"]
    assert after["mask_voxels"] == pytest.approx(before["mask_voxels"] * area / 4.0, rel=0.1)
    assert after["original_shape_MeshVolume"] == pytest.approx(before["original_shape_MeshVolume"], rel=0.1)
