"""Several image series per patient with roles, sharing one structure set."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from cohort.curate.select import plan_work
from cohort.index.crawl import index_files, list_archive
from cohort.radiomics.extract import feature_set_name
from cohort.shard import ShardSettings, process_shard
from cohort.spec import build_spec, settings_hash
from cohort.store.views import wide_by_role


def _add_second_series(archive: Path, patient: str, description: str) -> str:
    """Copy a patient's CT as a second series (new UIDs, same study and frame of reference)."""
    source = archive / patient / "CT"
    target = archive / patient / "CT2"
    shutil.copytree(source, target)
    series_uid = generate_uid()
    for path in target.iterdir():
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesDescription = description
        ds.PixelData = (ds.pixel_array + 7).astype(ds.pixel_array.dtype).tobytes()  # a different "contrast"
        ds.save_as(path)
    return str(series_uid)


def test_roles_share_the_structure_set_and_pivot_to_prefixed_features(tmp_path: Path, demo_archive) -> None:
    archive = tmp_path / "archive"
    shutil.copytree(demo_archive.root, archive)
    second = _add_second_series(archive, "DEMO-001", "THORAX POST")
    spec = build_spec(
        {
            "archive": str(archive),
            "store": "unused",
            "selection": {"roles": {"Post": "post", "Pre": "thorax"}},
        },
        environ={},
    )
    instances, _ = index_files(list_archive(archive))
    items, decisions = plan_work(instances, spec)
    demo1 = sorted((i.role, i.series_uid) for i in items if i.patient_id == "DEMO-001")
    assert [role for role, _ in demo1] == ["Post", "Pre"] and demo1[0][1] == second
    assert len(items) == 5
    post = decisions.to_pandas().set_index("series_uid").loc[second]
    assert post["selected"] and "contours of the structure set on series" in post["reason"]

    params = spec.radiomics_params()
    digest = settings_hash(spec.feature_settings())
    result = process_shard(
        [i for i in items if i.patient_id == "DEMO-001"],
        ShardSettings(params, digest, feature_set_name(digest), "t"),
    )
    table = result.features.to_pandas()
    assert sorted(table["role"]) == ["Post", "Pre"]
    wide = wide_by_role(table)
    assert len(wide) == 1
    assert wide.loc[0, "Post_series_uid"] == second
    # Same mask on the same grid; the "post" series is 7 HU brighter everywhere.
    assert wide.loc[0, "Post_original_shape_VoxelVolume"] == wide.loc[0, "Pre_original_shape_VoxelVolume"]
    shift = wide.loc[0, "Post_original_firstorder_Median"] - wide.loc[0, "Pre_original_firstorder_Median"]
    assert abs(shift - 7) < 0.5


def test_without_a_role_a_series_is_not_selected_and_says_why(tmp_path: Path, demo_archive) -> None:
    spec = build_spec(
        {"archive": str(demo_archive.root), "store": "unused", "selection": {"roles": {"T2": "t2"}}},
        environ={},
    )
    items, decisions = plan_work(index_files(list_archive(demo_archive.root))[0], spec)
    assert items == []
    table = decisions.to_pandas()
    assert table["reason"].str.contains("'THORAX' matches no role").all()
