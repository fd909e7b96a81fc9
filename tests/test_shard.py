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


def _automatic(demo_root: Path, **segmentation: object) -> tuple[list[WorkItem], ShardSettings]:
    from flows.process_cohort import shard_settings

    auto = {"model": "demo-lung-gtv", **segmentation}
    spec = build_spec({"archive": str(demo_root), "store": "unused", "segmentation": auto}, environ={})
    items, _ = plan_work(index_files(list_archive(demo_root))[0], spec)
    digest = settings_hash(spec.feature_settings())
    return items, shard_settings(spec, spec.radiomics_params(), digest, feature_set_name(digest), "test-run")


def test_automatic_mask_follows_a_harmonised_grid_and_a_foreign_model_file_fails_the_case(
    demo_archive,
) -> None:
    items, settings = _automatic(demo_archive.root)
    first = [i for i in items if i.series_uid == items[0].series_uid]  # the RTSTRUCT item and its twin
    assert [i.automatic for i in first] == [False, True]
    rows = {r["roi"]: r for r in process_shard(first, settings).features.to_pylist()}
    assert set(rows) == {"GTV", "GTV_auto"}
    steps = ({"op": "resample", "spacing": [2.0, 2.0, None]},)
    resampled = dataclasses.replace(settings, harmonise=steps)
    after = process_shard(first[1:], resampled).features.to_pylist()[0]
    # Segmented on the original grid, carried to the 2 mm grid: same tumour, fewer voxels.
    area = rows["GTV_auto"]["pixel_spacing_row"] * rows["GTV_auto"]["pixel_spacing_col"]
    assert after["mask_voxels"] == pytest.approx(rows["GTV_auto"]["mask_voxels"] * area / 4.0, rel=0.15)
    assert after["measure_volume_ml"] == pytest.approx(rows["GTV_auto"]["measure_volume_ml"], rel=0.15)

    assert settings.segmentation is not None
    foreign = dataclasses.replace(
        settings, segmentation=dataclasses.replace(settings.segmentation, model_sha256="0" * 64)
    )
    result = process_shard(first, foreign)
    assert [r["roi"] for r in result.features.to_pylist()] == ["GTV"]  # the RTSTRUCT row still comes
    (failure,) = result.failures.to_pylist()
    assert (failure["stage"], failure["roi_source"], failure["rtstruct_uid"]) == (
        "segment",
        "model:demo-lung-gtv",
        "",
    )
    assert "give every worker the same models/ folder" in failure["reason"]


def _erase_tumour(patient_dir: Path, gtv_name: str) -> None:
    """Paint the GTV (grown by 3 voxels in-plane) over with lung HU in every CT slice of the patient."""
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage as ndi

    from cohort.curate.rtstruct import rasterise_rtstruct, read_roi_infos
    from cohort.curate.series import assemble_series

    paths = sorted(str(p) for p in (patient_dir / "CT").iterdir())
    image = assemble_series(paths).image
    rs = pydicom.dcmread(patient_dir / "RS" / "RS.dcm")
    number = next(i.number for i in read_roi_infos(rs) if i.name == gtv_name)
    mask = sitk.GetArrayFromImage(rasterise_rtstruct(rs, number, image).mask).astype(bool)
    grown = ndi.binary_dilation(mask, np.ones((1, 7, 7), dtype=bool))
    for path in paths:
        ds = pydicom.dcmread(path)
        k = image.TransformPhysicalPointToIndex([float(v) for v in ds.ImagePositionPatient])[2]
        stored = ds.pixel_array.copy()
        lung = round((-850.0 - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))
        stored[grown[k]] = lung
        ds.PixelData = stored.astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(path)


def test_a_model_that_finds_nothing_is_a_failure_row_not_an_empty_row(demo_archive, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    shutil.copytree(demo_archive.root, archive)
    _erase_tumour(archive / "DEMO-001", demo_archive.patients[0].gtv_name)
    items, settings = _automatic(archive)
    auto = [i for i in items if i.automatic and i.patient_id in {"DEMO-001", "DEMO-002"}]
    result = process_shard(auto, settings)
    assert [r["patient_id"] for r in result.features.to_pylist()] == ["DEMO-002"]
    (failure,) = result.failures.to_pylist()
    assert (failure["patient_id"], failure["stage"], failure["error_type"]) == (
        "DEMO-001",
        "segment",
        "SegmentationError",
    )
    assert "the model found no tumour" in failure["reason"]


def test_an_implausibly_large_automatic_tumour_is_refused_with_the_setting_named(demo_archive) -> None:
    volumes = {p.patient_id: p.tumour_volume_mm3 / 1000 for p in demo_archive.patients}
    small, large = sorted(volumes, key=volumes.__getitem__)[:: len(volumes) - 1]
    limit = (volumes[small] + volumes[large]) / 2  # the smallest tumour passes, the largest does not
    items, settings = _automatic(demo_archive.root, max_volume_ml=limit)
    auto = [i for i in items if i.automatic and i.patient_id in {small, large}]
    result = process_shard(auto, settings)
    assert [r["patient_id"] for r in result.features.to_pylist()] == [small]
    (failure,) = result.failures.to_pylist()
    assert (failure["patient_id"], failure["stage"]) == (large, "segment")
    assert f"more than segmentation.max_volume_ml = {limit:g}" in failure["reason"]


def test_pipelined_automatic_items_give_the_rows_of_one_by_one_and_keep_failures_per_case(
    demo_archive, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    shutil.copytree(demo_archive.root, archive)
    make_pixels_undecodable(sorted((archive / "DEMO-002" / "CT").iterdir())[5])  # a case that cannot be read
    items, settings = _automatic(archive)
    auto = [i for i in items if i.automatic]
    one_by_one = process_shard(auto, settings)
    pipelined = process_shard(
        auto,
        dataclasses.replace(
            settings, segmentation=dataclasses.replace(settings.segmentation, pipelined=True)
        ),
    )  # type: ignore[arg-type]
    drop = ["processed_at"]
    a = one_by_one.features.drop_columns(drop).to_pylist()
    b = pipelined.features.drop_columns(drop).to_pylist()
    assert sorted(r["patient_id"] for r in b) == ["DEMO-001", "DEMO-003", "DEMO-004"]
    assert sorted(a, key=lambda r: r["series_uid"]) == sorted(b, key=lambda r: r["series_uid"])
    (failure,) = pipelined.failures.to_pylist()
    assert (failure["patient_id"], failure["stage"], failure["roi_source"]) == (
        "DEMO-002",
        "curate",
        "model:demo-lung-gtv",
    )
    assert pipelined.seconds["segment"] > 0 and pipelined.seconds["radiomics"] > 0
