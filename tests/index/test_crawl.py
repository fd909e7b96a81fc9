from __future__ import annotations

import os
from pathlib import Path

import pytest

from cohort.errors import DicomReadError
from cohort.index.crawl import index_files, list_archive, read_index_row
from cohort.index.schema import INSTANCE_SCHEMA, QUARANTINE_SCHEMA


def test_real_archive_index_counts_every_object(lung1_archive: Path) -> None:
    files = list_archive(lung1_archive)
    instances, quarantine = index_files(files)
    assert instances.schema == INSTANCE_SCHEMA and quarantine.schema == QUARANTINE_SCHEMA
    df = instances.to_pandas()
    counts = df.groupby(["patient_id", "modality"]).size().to_dict()
    assert counts == {
        ("LUNG1-001", "CT"): 134,
        ("LUNG1-001", "RTDOSE"): 1,
        ("LUNG1-001", "RTPLAN"): 1,
        ("LUNG1-001", "RTSTRUCT"): 1,
        ("LUNG1-002", "CT"): 111,
        ("LUNG1-002", "RTDOSE"): 1,
        ("LUNG1-002", "RTPLAN"): 1,
        ("LUNG1-002", "RTSTRUCT"): 1,
    }
    assert df["sha256"].str.len().eq(64).all() and df["sop_instance_uid"].is_unique
    assert df["part10"].all() and df.loc[df.modality == "CT", "pixel_decodable"].all()
    assert df.loc[df.modality == "RTSTRUCT", "has_pixel_data"].eq(False).all()
    ct1 = df[(df.patient_id == "LUNG1-001") & (df.modality == "CT")].iloc[0]
    assert (ct1.manufacturer, ct1.convolution_kernel, ct1.slice_thickness) == ("SIEMENS", "B19f", 3.0)
    # LUNG1-002 is implicit VR little endian, written by a planning system.
    ct2 = df[(df.patient_id == "LUNG1-002") & (df.modality == "CT")].iloc[0]
    assert ct2.transfer_syntax_uid == "1.2.840.10008.1.2"
    rs = df[(df.patient_id == "LUNG1-001") & (df.modality == "RTSTRUCT")].iloc[0]
    ct_series = df[(df.patient_id == "LUNG1-001") & (df.modality == "CT")].series_uid.iloc[0]
    assert list(rs.referenced_series_uids) == [ct_series]
    assert "GTV-1" in list(rs.roi_names) and "Lung L" in list(rs.roi_names)


def test_bad_files_are_quarantined_with_a_reason_and_never_stop_the_crawl(
    tmp_path: Path, lung1_archive: Path
) -> None:
    good = next(p for p in sorted(next(lung1_archive.glob("LUNG1-001_*")).iterdir()))
    data = good.read_bytes()
    (tmp_path / "good.dcm").write_bytes(data)
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not dicom")
    (tmp_path / "truncated.dcm").write_bytes(data[:300])
    (tmp_path / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(500))
    instances, quarantine = index_files(list_archive(tmp_path))
    assert instances.column("path").to_pylist() == [str(tmp_path / "good.dcm")]
    reasons = dict(
        zip(quarantine.column("path").to_pylist(), quarantine.column("reason").to_pylist(), strict=True)
    )
    assert set(reasons) == {
        str(tmp_path / n) for n in ("empty.dcm", "notes.txt", "truncated.dcm", "garbage.dcm")
    }
    assert reasons[str(tmp_path / "empty.dcm")] == "empty file (0 bytes)"
    assert reasons[str(tmp_path / "notes.txt")].startswith("not DICOM: no DICM marker at byte 128")
    assert reasons[str(tmp_path / "truncated.dcm")].startswith("truncated: the file ends inside header")


def test_symlinks_are_not_followed(tmp_path: Path, lung1_archive: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "outside").symlink_to(next(lung1_archive.glob("LUNG1-001_*")), target_is_directory=True)
    (archive / "one.dcm").symlink_to(next(next(lung1_archive.glob("LUNG1-001_*")).iterdir()))
    assert list_archive(archive) == []


def test_missing_archive_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DicomReadError, match="does not exist"):
        list_archive(tmp_path / "nope")


def test_read_index_row_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"hello")
    with pytest.raises(DicomReadError) as info:
        read_index_row(str(path))
    assert info.value.subject == str(path)


def test_index_files_never_opens_a_fifo_or_follows_a_link(tmp_path: Path, lung1_archive: Path) -> None:
    os.mkfifo(tmp_path / "pipe.dcm")
    (tmp_path / "link.dcm").symlink_to(next(next(lung1_archive.glob("LUNG1-001_*")).iterdir()))
    instances, quarantine = index_files([str(tmp_path / "pipe.dcm"), str(tmp_path / "link.dcm")])
    paths, why = quarantine.column("path").to_pylist(), quarantine.column("reason").to_pylist()
    reasons = dict(zip(paths, why, strict=True))
    assert instances.num_rows == 0
    assert reasons[str(tmp_path / "pipe.dcm")].startswith("not a regular file")
    assert reasons[str(tmp_path / "link.dcm")] == "symbolic link, not followed"
