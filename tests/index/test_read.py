"""Robust reading: every file pydicom ships, and files broken on purpose, end up indexed or quarantined."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cohort.errors import DicomReadError
from cohort.index.header import (
    SEQUENCE_MODALITIES,
    Header,
    _Truncated,
    _Unsupported,
    parse_fast,
    parse_pydicom,
    row_from_header,
)
from cohort.index.read import FileRead, read_entries, read_entry
from cohort.index.source import FileEntry, LocalArchive
from tests.index.files import CORPUS_FOLDERS, CT_SMALL, PYDICOM_DATA, corpus_files

TEST_FILES = PYDICOM_DATA / "test_files"
EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"


def _reasons(quarantine: pa.Table) -> dict[str, str]:
    paths, reasons = quarantine.column("path").to_pylist(), quarantine.column("reason").to_pylist()
    return dict(zip(paths, reasons, strict=True))


def _read_corpus(root: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], int, int]:
    archive = LocalArchive(root)
    entries = [e for e in archive.walk() if e.path.split("/")[0] in CORPUS_FOLDERS]
    result = read_entries(archive, entries)
    rows = {r["path"]: r for r in result.instances.to_pylist()}
    reasons = _reasons(result.quarantine)
    return rows, reasons, len(entries), result.fast_path


def test_every_pydicom_test_file_is_indexed_or_quarantined_with_a_reason(pydicom_corpus: Path) -> None:
    rows, reasons, listed, fast = _read_corpus(pydicom_corpus)
    expected = {p.relative_to(pydicom_corpus).as_posix() for p in corpus_files(pydicom_corpus)}
    assert listed == len(expected) and set(rows) | set(reasons) == expected and not set(rows) & set(reasons)
    assert not [r for r in reasons.values() if r.startswith("unexpected error")]  # zero crashes
    assert (len(rows), len(reasons)) == (161, 42)
    assert fast >= 150  # the fast path reads nearly all; pydicom the rest

    def reason(name: str) -> str:
        return reasons[f"test_files/{name}"]

    for name in ("DICOMDIR", "DICOMDIR-bigEnd", "DICOMDIR-implicit", "TINY_ALPHA/DICOMDIR"):
        assert reason(f"dicomdirtests/{name}") == "DICOMDIR (a media directory), not an instance"
    for name in ("README.txt", "zipMR.gz", "crayons.icc", "rtplan.dump", "test1.json"):
        assert reason(name).startswith("not DICOM: no DICM marker at byte 128")
    assert reason("MR_truncated.dcm") == "truncated: the file ends inside the pixel data"
    assert reason("rtplan_truncated.dcm") == "truncated: the file ends inside header element (300A,00B0)"
    # Raw data sets without preamble and file meta, read with force; big endian too.
    for name, ts, modality in (
        ("ExplVR_BigEndNoMeta.dcm", EXPLICIT_BE, "RTPLAN"),
        ("ExplVR_LitEndNoMeta.dcm", EXPLICIT_LE, "RTPLAN"),
        ("rtstruct.dcm", IMPLICIT_LE, "RTSTRUCT"),
    ):
        row = rows[f"test_files/{name}"]
        assert (row["part10"], row["transfer_syntax_uid"], row["modality"]) == (False, ts, modality)
    assert rows["test_files/rtstruct.dcm"]["roi_names"][:2] == ["patient", "Isocenter 1"]
    # One header, several encodings: the same columns from each.
    reference = rows["test_files/MR_small.dcm"]
    same = ("sop_instance_uid", "series_uid", "rows", "columns", "pixel_spacing_row", "image_position", "kvp")
    for name in ("MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_RLE.dcm"):
        row = rows[f"test_files/{name}"]
        assert {k: row[k] for k in same} == {k: reference[k] for k in same}, name
    assert reference["image_position"] == [-83.9063, -91.2, 6.6406] and reference["rows"] == 64
    ct = rows["test_files/CT_small.dcm"]
    assert (ct["modality"], ct["kvp"], ct["has_pixel_data"]) == ("CT", 120.0, True) and ct["pixel_decodable"]
    assert ct["image_type"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    deflated = rows["test_files/image_dfl.dcm"]
    assert deflated["transfer_syntax_uid"] == "1.2.840.10008.1.2.1.99" and deflated["has_pixel_data"]
    bad = rows["test_files/badVR.dcm"]  # NumberOfFrames "1A": the column is null and the tag named
    assert (bad["invalid_tags"], bad["number_of_frames"], bad["rows"]) == (["NumberOfFrames"], None, 10)
    sr = rows["test_files/reportsi.dcm"]
    assert (sr["modality"], sr["has_pixel_data"], sr["pixel_decodable"]) == ("SR", False, None)


def _row_or_reason(header: Header) -> dict[str, Any] | str:
    try:
        return row_from_header(header, path="x")
    except DicomReadError as exc:
        return "quarantined: " + exc.reason.split(":")[0]


def test_fast_path_gives_the_rows_pydicom_gives(pydicom_corpus: Path) -> None:
    compared = 0
    differ = []
    for path in corpus_files(pydicom_corpus):
        data = path.read_bytes()
        if data[128:132] != b"DICM":
            continue
        try:
            fast = parse_fast(data, len(data))
        except (_Unsupported, _Truncated):
            continue
        slow = parse_pydicom(data, len(data), part10=True)
        a, b = _row_or_reason(fast), _row_or_reason(slow)
        if isinstance(a, dict) and isinstance(b, dict) and a["modality"] in SEQUENCE_MODALITIES:
            for column in slow.sequence_columns:  # read from sequences: always by pydicom
                a.pop(column), b.pop(column)
        compared += 1
        if isinstance(a, str) and isinstance(b, str):
            continue  # both quarantine (reasons may be worded differently)
        if a != b:
            differ.append(path.name)
    assert compared >= 170 and differ == []


@pytest.fixture
def broken_archive(tmp_path: Path, lung1_archive: Path) -> Path:
    """Good files beside files broken in every way an archive breaks them."""
    root = tmp_path / "archive"
    good = sorted(next(lung1_archive.glob("LUNG1-001_*")).iterdir())[5]
    data = good.read_bytes()
    (root / "p1").mkdir(parents=True)
    shutil.copy(good, root / "p1" / "good.dcm")
    (root / "p1" / "empty.dcm").write_bytes(b"")
    (root / "p1" / "notes.dcm").write_text("a text file named .dcm\n")
    (root / "p1" / "cut-in-header.dcm").write_bytes(data[:600])
    (root / "p1" / "cut-in-pixels.dcm").write_bytes(data[: len(data) - 1000])
    (root / "p1" / "preamble-only.dcm").write_bytes(data[:132])
    flipped = bytearray(data)
    for i in range(140, 1400, 7):
        flipped[i] ^= 0xFF
    (root / "p1" / "flipped.dcm").write_bytes(bytes(flipped))
    shutil.copy(TEST_FILES / "dicomdirtests" / "DICOMDIR", root / "DICOMDIR")
    shutil.copy(TEST_FILES / "no_meta.dcm", root / "p1" / "no_meta.dcm")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(good, outside / "secret.dcm")
    (root / "p1" / "link-out.dcm").symlink_to(outside / "secret.dcm")
    (root / "linked-folder").symlink_to(outside, target_is_directory=True)
    os.mkfifo(root / "p1" / "pipe")
    return root


def test_broken_files_never_stop_a_crawl_and_links_are_never_followed(broken_archive: Path) -> None:
    archive = LocalArchive(broken_archive)
    entries = list(archive.walk())
    result = read_entries(archive, entries)
    assert [r["path"] for r in result.instances.to_pylist()] == ["p1/good.dcm"]
    reasons = _reasons(result.quarantine)
    assert len(entries) == 12 and len(reasons) == 11
    assert reasons["p1/empty.dcm"] == "empty file (0 bytes)"
    assert reasons["p1/notes.dcm"].startswith("not DICOM")
    assert reasons["p1/cut-in-header.dcm"].startswith("truncated: the file ends inside header element")
    assert reasons["p1/cut-in-pixels.dcm"] == "truncated: the file ends inside the pixel data"
    assert reasons["p1/preamble-only.dcm"] == "header lacks SOPInstanceUID or SeriesInstanceUID"
    assert reasons["DICOMDIR"].startswith("DICOMDIR")
    assert reasons["p1/link-out.dcm"] == reasons["linked-folder"] == "symbolic link, not followed"
    assert reasons["p1/pipe"].startswith("not a regular file")
    assert reasons["p1/flipped.dcm"].startswith(("unreadable DICOM header", "truncated", "header lacks"))
    # Only regular files were opened: the link targets were never read.
    regular = [p for p in broken_archive.rglob("*") if p.is_file() and not p.is_symlink()]
    assert result.files_read == 8 and result.bytes_read == sum(p.stat().st_size for p in regular)


def _read_bytes(tmp_path: Path, data: bytes) -> FileRead:
    path = tmp_path / "f.dcm"
    path.write_bytes(data)
    return read_entry(LocalArchive(tmp_path), FileEntry("f.dcm", len(data), 0))


def test_every_truncation_of_a_file_is_quarantined(tmp_path: Path) -> None:
    data = CT_SMALL.read_bytes()
    cuts = [*range(0, 3000, 37), *range(3000, len(data), 1999)]
    outcomes = [_read_bytes(tmp_path, data[:cut]) for cut in cuts]
    assert all(o.quarantined for o in outcomes)
    reasons = {o.row["reason"].split(":")[0] for o in outcomes}
    assert reasons <= {
        "empty file (0 bytes)",
        "not DICOM",
        "truncated",
        "header lacks SOPInstanceUID or SeriesInstanceUID",
        "unreadable DICOM header",
    }
    assert not _read_bytes(tmp_path, data).quarantined


_SAMPLES = [CT_SMALL, TEST_FILES / "MR_small_implicit.dcm", TEST_FILES / "MR_small_bigendian.dcm"]
_SAMPLES += [TEST_FILES / "JPEG2000.dcm", TEST_FILES / "rtstruct.dcm", TEST_FILES / "priv_SQ.dcm"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sample=st.sampled_from(_SAMPLES),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=6),
)
def test_corrupt_bytes_never_crash_the_reader(
    tmp_path: Path, sample: Path, flips: list[tuple[float, int]]
) -> None:
    data = bytearray(sample.read_bytes())
    header_end = min(len(data) - 1, 2000)
    for where, mask in flips:
        data[math.floor(where * header_end)] ^= mask
    outcome = _read_bytes(tmp_path, bytes(data))
    if outcome.quarantined:
        assert not outcome.row["reason"].startswith("unexpected error"), outcome.row["reason"]
    else:
        assert outcome.row["sop_instance_uid"] and outcome.row["series_uid"]
