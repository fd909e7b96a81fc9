"""Geometry QC from index rows: each defect made on purpose is flagged with its value."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid

from cohort.curate.geometry import (
    GeometryFlag,
    Orientation,
    ReadPolicy,
    SpacingAction,
    check_series_geometry,
    split_series,
)
from cohort.index.crawl import index_files, list_archive
from tests.helpers import write_ct_slices


def _volume(nz: int = 8, ny: int = 4, nx: int = 6) -> np.ndarray:
    return (np.arange(nz * ny * nx).reshape(nz, ny, nx) % 400 + 1000).astype(np.uint16)


def _index(paths: list[Path] | list[str]) -> pd.DataFrame:
    instances, quarantine = index_files([str(p) for p in paths])
    assert quarantine.num_rows == 0
    return instances.to_pandas()


def _edit(path: Path | str, **attributes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if "SOPInstanceUID" in attributes:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path)


def _copy_slice(source: Path, target: Path, **attributes: object) -> Path:
    shutil.copy(source, target)
    _edit(target, SOPInstanceUID=generate_uid(), **attributes)
    return target


def test_a_healthy_series_has_no_flag(tmp_path: Path) -> None:
    rows = _index(write_ct_slices(tmp_path, _volume(), spacing=(0.7, 0.8, 2.5), series_uid="1.2.9"))
    geometry = check_series_geometry(rows)
    assert geometry.issues == () and geometry.healthy and geometry.describe() == "regular"
    assert geometry.series_uid == "1.2.9"
    assert (geometry.n_instances, geometry.n_slices) == (8, 8)
    assert geometry.orientation == Orientation.AXIAL and geometry.obliquity_deg == 0.0
    assert geometry.slice_spacing == pytest.approx(2.5) and geometry.extent_mm == pytest.approx(17.5)
    assert (geometry.rows, geometry.columns, geometry.pixel_spacing) == (4, 6, (0.8, 0.7))


def test_missing_slices_are_counted_and_located(tmp_path: Path) -> None:
    paths = write_ct_slices(tmp_path, _volume(nz=10))  # z = 0, 2, ..., 18
    del paths[7]
    del paths[3:5]  # z = 6 and 8 missing (2 slices), then z = 14 (1 slice)
    geometry = check_series_geometry(_index(paths))
    assert geometry.flags == (GeometryFlag.MISSING_SLICES,)
    issue = geometry.issue(GeometryFlag.MISSING_SLICES)
    assert issue is not None and issue.value == 3 and issue.unit == "slices"
    assert issue.positions == (4.0, 12.0)  # the gaps start after z = 4 and z = 12
    assert "2 between 4.00 and 10.00 mm" in issue.detail and "1 between 12.00 and 16.00 mm" in issue.detail
    assert geometry.slice_spacing == 2.0


def test_duplicate_position_is_flagged(tmp_path: Path) -> None:
    paths = write_ct_slices(tmp_path / "ct", _volume())
    _copy_slice(paths[3], tmp_path / "ct" / "copy.dcm")
    geometry = check_series_geometry(_index(list_archive(tmp_path)))
    assert geometry.flags == (GeometryFlag.DUPLICATE_POSITIONS,)
    issue = geometry.issue(GeometryFlag.DUPLICATE_POSITIONS)
    assert issue is not None and issue.value == 1 and issue.positions == (6.0,)
    assert geometry.n_instances == 9 and geometry.n_slices == 8


def test_an_exact_copy_of_an_instance_is_only_noted(tmp_path: Path) -> None:
    paths = write_ct_slices(tmp_path / "ct", _volume())
    shutil.copy(paths[2], tmp_path / "ct" / "again.dcm")  # same SOPInstanceUID
    geometry = check_series_geometry(_index(list_archive(tmp_path)))
    assert geometry.flags == (GeometryFlag.DUPLICATE_INSTANCES,)
    assert ReadPolicy().blocking(geometry) == ()


def test_irregular_spacing_reports_the_largest_deviation(tmp_path: Path) -> None:
    paths = write_ct_slices(tmp_path, _volume())
    _edit(paths[3], ImagePositionPatient=[0.0, 0.0, 6.6])  # gaps 2.6 and 1.4 around it
    geometry = check_series_geometry(_index(paths))
    assert geometry.flags == (GeometryFlag.IRREGULAR_SPACING,)
    issue = geometry.issue(GeometryFlag.IRREGULAR_SPACING)
    assert issue is not None and issue.value == pytest.approx(0.6) and issue.unit == "mm"
    assert issue.positions == (4.0, 6.6)
    assert ReadPolicy().blocking(geometry) == (issue,)
    assert ReadPolicy(irregular_spacing=SpacingAction.RESAMPLE).blocking(geometry) == ()


def test_gantry_tilt_gives_the_angle(tmp_path: Path) -> None:
    # A scanner's tilted acquisition: column cosine tilted by 15 degrees, slices stacked along z.
    tilt = math.radians(15.0)
    paths = write_ct_slices(tmp_path, _volume(), col_cosine=(0.0, math.cos(tilt), math.sin(tilt)))
    for k, path in enumerate(paths):
        _edit(path, ImagePositionPatient=[0.0, 0.0, 2.0 * k])
    geometry = check_series_geometry(_index(paths))
    assert set(geometry.flags) == {GeometryFlag.GANTRY_TILT, GeometryFlag.OBLIQUE}
    assert geometry.issue(GeometryFlag.GANTRY_TILT).value == pytest.approx(15.0)  # type: ignore[union-attr]
    assert geometry.issue(GeometryFlag.OBLIQUE).value == pytest.approx(15.0)  # type: ignore[union-attr]
    assert geometry.orientation == Orientation.AXIAL
    assert geometry.slice_spacing == pytest.approx(2.0 * math.cos(tilt))
    assert [i.flag for i in ReadPolicy().blocking(geometry)] == [GeometryFlag.GANTRY_TILT]


def test_oblique_series_stacked_along_its_normal_is_not_tilted(tmp_path: Path) -> None:
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    paths = write_ct_slices(tmp_path, _volume(), row_cosine=(c, 0.0, -s), col_cosine=(0.0, 1.0, 0.0))
    geometry = check_series_geometry(_index(paths))
    assert geometry.flags == (GeometryFlag.OBLIQUE,)
    assert geometry.obliquity_deg == pytest.approx(20.0)
    assert ReadPolicy().blocking(geometry) == ()


def test_mixed_sizes_and_orientations_are_flagged_and_split_per_geometry(tmp_path: Path) -> None:
    write_ct_slices(tmp_path / "axial", _volume(), series_uid="1.2.7")
    write_ct_slices(tmp_path / "small", _volume(nz=3, ny=3, nx=3), series_uid="1.2.7")
    write_ct_slices(
        tmp_path / "sagittal",
        _volume(nz=2),
        series_uid="1.2.7",
        row_cosine=(0.0, 1.0, 0.0),
        col_cosine=(0.0, 0.0, -1.0),
    )
    rows = _index(list_archive(tmp_path))
    geometry = check_series_geometry(rows)
    assert geometry.flags == (GeometryFlag.MIXED_ORIENTATIONS, GeometryFlag.MIXED_SIZES)
    assert geometry.issue(GeometryFlag.MIXED_ORIENTATIONS).value == 2  # type: ignore[union-attr]
    assert "mixed slice sizes: 3x3 and 4x6" in str(geometry.issue(GeometryFlag.MIXED_SIZES))

    split = split_series(rows)
    assert split.is_split
    assert [p.key for p in split.parts] == ["1.2.7#geo1", "1.2.7#geo2", "1.2.7#geo3"]
    assert [len(p.paths) for p in split.parts] == [8, 3, 2]  # largest first
    assert [p.geometry.orientation for p in split.parts] == [
        Orientation.AXIAL,
        Orientation.AXIAL,
        Orientation.SAGITTAL,
    ]
    assert all(p.geometry.healthy for p in split.parts)
    assert "geo1 = 8 axial 4x6 at 1x1 mm" in split.parts[0].reason


def test_mixed_pixel_spacing_is_flagged(tmp_path: Path) -> None:
    paths = write_ct_slices(tmp_path, _volume())
    _edit(paths[5], PixelSpacing=[0.9, 0.9])
    geometry = check_series_geometry(_index(paths))
    assert geometry.flags == (GeometryFlag.MIXED_PIXEL_SPACING,)
    assert "0.9x0.9 mm and 1x1 mm" in geometry.describe()


def _with_acquisitions(tmp_path: Path, acquisitions: list[int], *, z_offset: list[float]) -> pd.DataFrame:
    """One series written as several stacks, each with its AcquisitionNumber."""
    for n, (acquisition, offset) in enumerate(zip(acquisitions, z_offset, strict=True)):
        paths = write_ct_slices(
            tmp_path / f"acq{n}", _volume(nz=4), series_uid="1.2.8", origin=(0.0, 0.0, offset)
        )
        for path in paths:
            _edit(path, AcquisitionNumber=acquisition)
    rows = _index(list_archive(tmp_path))
    # The index column (cohort.index.schema: acquisition_number); filled from the headers
    # so that this test does not depend on the crawler version.
    rows["acquisition_number"] = [int(pydicom.dcmread(p).AcquisitionNumber) for p in rows["path"]]
    return rows


def test_two_full_acquisitions_are_flagged_and_split(tmp_path: Path) -> None:
    rows = _with_acquisitions(tmp_path, [1, 2], z_offset=[0.0, 0.0])
    whole = check_series_geometry(rows)
    assert whole.flags == (GeometryFlag.MULTIPLE_ACQUISITIONS, GeometryFlag.DUPLICATE_POSITIONS)
    assert whole.issue(GeometryFlag.MULTIPLE_ACQUISITIONS).value == 2  # type: ignore[union-attr]
    assert whole.issue(GeometryFlag.DUPLICATE_POSITIONS).value == 4  # type: ignore[union-attr]
    assert "they share 8 slice positions" in whole.describe()

    split = split_series(rows)
    assert [(p.key, p.part, len(p.paths)) for p in split.parts] == [
        ("1.2.8#acq1", "acq1", 4),
        ("1.2.8#acq2", "acq2", 4),
    ]
    assert all(p.geometry.healthy for p in split.parts)
    assert "2 acquisitions (AcquisitionNumber) that cover the same positions" in split.parts[1].reason
    assert split_series(rows, split=False).parts[0].key == "1.2.8"


def test_acquisitions_that_tile_the_stack_are_read_as_one(tmp_path: Path) -> None:
    rows = _with_acquisitions(tmp_path, [1, 2], z_offset=[0.0, 8.0])
    whole = check_series_geometry(rows)
    assert whole.flags == (GeometryFlag.MULTIPLE_ACQUISITIONS,)
    assert "tile the stack without overlap" in whole.describe()
    assert ReadPolicy().blocking(whole) == ()
    split = split_series(rows)
    assert not split.is_split and split.parts[0].key == "1.2.8" and len(split.parts[0].paths) == 8


def test_temporal_positions_are_split_like_acquisitions() -> None:
    rows = [
        {
            "path": f"/x/{t}/{k}",
            "sop_instance_uid": f"1.{t}.{k}",
            "series_uid": "1.5",
            "image_position": [0.0, 0.0, 3.0 * k],
            "image_orientation": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            "pixel_spacing_row": 1.0,
            "pixel_spacing_col": 1.0,
            "rows": 8,
            "columns": 8,
            "temporal_position_identifier": t,
        }
        for t in (1, 2, 3)
        for k in range(5)
    ]
    whole = check_series_geometry(rows)
    assert whole.issue(GeometryFlag.MULTIPLE_TEMPORAL_POSITIONS).value == 3  # type: ignore[union-attr]
    assert [p.key for p in split_series(rows).parts] == ["1.5#t1", "1.5#t2", "1.5#t3"]


def test_enhanced_multi_frame_rows_are_flagged_and_checked_when_read() -> None:
    row = {
        "path": "/x/mf.dcm",
        "sop_instance_uid": "1.9",
        "series_uid": "1.8",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2.1",
        "rows": 64,
        "columns": 64,
        "number_of_frames": 40,
    }
    geometry = check_series_geometry([row])
    assert geometry.flags == (GeometryFlag.MULTI_FRAME,)
    assert geometry.issue(GeometryFlag.MULTI_FRAME).value == 40  # type: ignore[union-attr]
    assert geometry.n_slices == 40
    assert ReadPolicy().blocking(geometry) == ()
    dose = {**row, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.481.2"}  # RT Dose: frames without groups
    assert check_series_geometry([dose]).flags == (GeometryFlag.UNSUPPORTED_MULTI_FRAME,)


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def lung1_rows(lung1_archive: Path) -> pd.DataFrame:
    instances, _ = index_files(
        list_archive(lung1_archive / next(p.name for p in lung1_archive.glob("LUNG1-001_*")))
    )
    df = instances.to_pandas()
    return df[df["modality"] == "CT"].sort_values("path").reset_index(drop=True)


def _by_z(rows: pd.DataFrame) -> pd.DataFrame:
    z = rows["image_position"].map(lambda p: p[2])
    return rows.assign(z=z).sort_values("z").reset_index(drop=True)


def test_real_lung1_series_is_healthy(lung1_rows: pd.DataFrame) -> None:
    geometry = check_series_geometry(lung1_rows)
    assert geometry.issues == ()
    assert (geometry.n_slices, geometry.slice_spacing, geometry.slice_thickness) == (134, 3.0, 3.0)
    assert geometry.pixel_spacing == (0.9765625, 0.9765625)
    assert not split_series(lung1_rows).is_split


def test_real_lung1_series_damaged_on_purpose(lung1_rows: pd.DataFrame) -> None:
    rows = _by_z(lung1_rows)
    z = rows["z"].to_numpy()

    dropped = rows.drop(index=[40, 41]).drop(columns="z")
    issue = check_series_geometry(dropped).issue(GeometryFlag.MISSING_SLICES)
    assert issue is not None and issue.value == 2 and issue.positions == (z[39],)

    duplicate = pd.concat([rows, rows.iloc[[10]].assign(sop_instance_uid="9.9.9", path="/dup.dcm")])
    geometry = check_series_geometry(duplicate.drop(columns="z"))
    assert geometry.flags == (GeometryFlag.DUPLICATE_POSITIONS,)
    assert geometry.issue(GeometryFlag.DUPLICATE_POSITIONS).positions == (z[10],)  # type: ignore[union-attr]

    # Shear the stack by 10 degrees in y: each slice moves 3 mm * tan(10°) further.
    sheared = rows.copy()
    sheared["image_position"] = [
        [p[0], p[1] + (p[2] - z[0]) * math.tan(math.radians(10.0)), p[2]] for p in rows["image_position"]
    ]
    geometry = check_series_geometry(sheared.drop(columns="z"))
    assert geometry.flags == (GeometryFlag.GANTRY_TILT,)
    assert geometry.issue(GeometryFlag.GANTRY_TILT).value == pytest.approx(10.0)  # type: ignore[union-attr]

    resized = rows.copy()
    resized.loc[5, "rows"] = 256
    assert check_series_geometry(resized.drop(columns="z")).flags == (GeometryFlag.MIXED_SIZES,)

    twice = pd.concat(
        [
            rows.assign(acquisition_number=1),
            rows.assign(
                acquisition_number=2,
                sop_instance_uid=rows["sop_instance_uid"] + ".2",
                path=rows["path"] + "b",
            ),
        ]
    ).drop(columns="z")
    split = split_series(twice)
    assert [p.key.split("#")[1] for p in split.parts] == ["acq1", "acq2"]
    assert [p.geometry.n_slices for p in split.parts] == [134, 134]
    assert all(p.geometry.healthy for p in split.parts)
