"""De-identification: identifiers planted in copies of the real LUNG1-001 CT + RTSTRUCT, exported, scanned."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from cohort.curate.deid import (
    DESCRIPTOR_KEYWORDS,
    EXPORT_SCHEMA,
    PSEUDONYM_FILE,
    UID_MAP_FILE,
    Action,
    DateOption,
    DeidSettings,
    DescriptorOption,
    ExportResult,
    PrivateTagOption,
    basic_profile,
    clean_text,
    date_shift_days,
    deidentify_dataset,
    export_deidentified,
    identifier_pattern,
    pseudonym_for,
    remap_uid,
    resolve_action,
)
from cohort.errors import DeidentificationError
from tests.helpers import write_ct_slices

SECRET = b"test-secret-0123456789abcdef-xyz"
SETTINGS = DeidSettings(secret=SECRET)

#: Identifiers planted into every copied object; none may survive the export.
PLANTED = (
    "Doe",
    "Jane",
    "Quincy",
    "MRN-8675309",
    "19450317",
    "17.03.1945",
    "ALTID-4242",
    "ACC99887766",
    "Wallaby",
    "Sydney",
    "Elsewhere",
    "Harbour",
    "Springfield",
    "House",
    "Gregory",
    "Ratched",
    "Kildare",
    "REQ-55501",
    "SPS-77",
    "LUNG1-001",
    "20180209",  # the study date of LUNG1-001: dates are shifted
)


def _plant(ds: Dataset) -> None:
    ds.PatientName = "Doe^Jane^Quincy"
    ds.PatientID = "MRN-8675309"
    ds.PatientBirthDate = "19450317"
    ds.PatientAddress = "42 Wallaby Way, Sydney"
    ds.OtherPatientIDs = "ALTID-4242"
    ds.AccessionNumber = "ACC99887766"
    ds.InstitutionName = "St Elsewhere Hospital"
    ds.InstitutionAddress = "12 Harbour Road, Springfield"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.OperatorsName = "Ratched^Mildred"
    ds.PerformingPhysicianName = "Kildare^James"
    ds.StudyDescription = "CT chest for Jane DOE (MRN-8675309)"
    ds.SeriesDescription = "Doe, Jane 17.03.1945 St Elsewhere"
    ds.PatientComments = "Jane Doe, born 1945-03-17, ALTID-4242, seen by Dr House"
    request = Dataset()
    request.RequestedProcedureID = "REQ-55501"
    request.ScheduledProcedureStepID = "SPS-77"
    request.RequestedProcedureDescription = "Chest CT for Quincy Doe"
    ds.RequestAttributesSequence = [request]
    block = ds.private_block(0x0011, "PHI CREATOR", create=True)
    block.add_new(0x01, "LO", "Doe^Jane")
    block.add_new(0x02, "LO", "MRN-8675309")
    if ds.Modality == "RTSTRUCT":
        ds.StructureSetLabel = "DOE-RT"
        for item in ds.RTROIObservationsSequence:
            item.ROIInterpreter = "House^Gregory"
        gtv = next(i for i in ds.StructureSetROISequence if i.ROIName == "GTV-1")
        gtv.ROIDescription = "GTV drawn by Dr House for Jane Doe"
    else:
        ds.ImageComments = "Quincy says hi from Springfield"


@dataclass(frozen=True)
class Planted:
    folder: Path
    paths: tuple[str, ...]
    originals: Mapping[str, Dataset]  # path -> the planted copy


@pytest.fixture(scope="module")
def planted(lung1_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Planted:
    """The LUNG1-001 CT slices and RTSTRUCT, copied and stuffed with identifiers."""
    source = next(lung1_archive.glob("LUNG1-001_*"))
    folder = tmp_path_factory.mktemp("planted")
    paths, originals = [], {}
    for path in sorted(source.iterdir()):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        if header.Modality not in ("CT", "RTSTRUCT"):
            continue
        ds = pydicom.dcmread(path)
        _plant(ds)
        target = folder / path.name
        ds.save_as(target)
        paths.append(str(target))
        originals[str(target)] = ds
    return Planted(folder, tuple(paths), originals)


@dataclass(frozen=True)
class Exported:
    root: Path
    map_dir: Path
    result: ExportResult


@pytest.fixture(scope="module")
def exported(planted: Planted, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    base = tmp_path_factory.mktemp("export")
    settings = DeidSettings(secret=SECRET, record_uid_map=True)
    result = export_deidentified(planted.paths, base / "out", settings, map_dir=base / "keys")
    return Exported(base / "out", base / "keys", result)


_NUMERIC = frozenset(
    {"DS", "IS", "FL", "FD", "SL", "SS", "UL", "US", "SV", "UV", "AT", "OF", "OD", "OL", "OV"}
)


def _texts(ds: Dataset) -> Iterator[tuple[BaseTag, str]]:
    """Every non-numeric value, recursively, as text (numbers are left to the byte scan)."""
    for key in list(ds.keys()):
        raw = ds.get_item(key)
        vr = raw.VR or ("UN" if Tag(key).is_private else dictionary_VR(key))
        if vr in _NUMERIC or Tag(key) == Tag("PixelData"):
            continue
        elem = ds[key]
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _texts(item)
        elif isinstance(elem.value, bytes):
            yield elem.tag, elem.value.decode("latin-1")
        else:
            yield elem.tag, str(elem.value)


@pytest.mark.slow
def test_every_planted_identifier_is_gone_from_every_element_and_byte(
    planted: Planted, exported: Exported
) -> None:
    result = exported.result
    assert result.failures == ()
    assert len(result.files) == len(planted.paths) == 135
    assert sorted(f.modality for f in result.files).count("CT") == 134
    needles = [n.lower() for n in PLANTED]
    for record in result.files:
        ds = pydicom.dcmread(record.output)
        texts = [*_texts(ds.file_meta), *_texts(ds)]
        assert len(texts) > 40
        for tag, text in texts:
            assert not [n for n in needles if n in text.lower()], (record.output, tag, text)
            assert not tag.is_private, (record.output, tag)
        data = Path(record.output).read_bytes().lower()
        assert [n for n in needles if n.encode() in data] == [], record.output
        assert ds.PatientIdentityRemoved == "YES"
        assert [
            i.CodeValue for i in ds.DeidentificationMethodCodeSequence if i.CodingSchemeDesignator == "DCM"
        ][-3:] == ["113100", "113105", "113107"]
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"


@pytest.mark.slow
def test_no_original_uid_survives_and_references_resolve(planted: Planted, exported: Exported) -> None:
    originals = planted.originals
    original_uids = {
        str(v)
        for ds in originals.values()
        for e in ds.iterall()
        if e.VR == "UI"
        for v in (e.value if isinstance(e.value, list | pydicom.multival.MultiValue) else [e.value])
        if v and not str(v).startswith("1.2.840.10008.")
    }
    assert len(original_uids) > 134  # every slice's SOP UID, plus study/series/frame of reference
    pattern = re.compile(
        "|".join(re.escape(u) for u in sorted(original_uids, key=len, reverse=True)).encode()
    )
    by_modality: dict[str, list[Dataset]] = {}
    for record in exported.result.files:
        data = Path(record.output).read_bytes()
        assert pattern.search(data) is None, record.output
        by_modality.setdefault(record.modality, []).append(pydicom.dcmread(record.output))
    (rs,) = by_modality["RTSTRUCT"]
    cts = by_modality["CT"]
    ct_sops = {str(c.SOPInstanceUID) for c in cts}
    assert len(ct_sops) == 134
    assert {str(c.SeriesInstanceUID) for c in cts} == {cts[0].SeriesInstanceUID}
    assert all(re.fullmatch(r"2\.25\.\d{1,39}", u) for u in ct_sops)

    (frame,) = rs.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == cts[0].FrameOfReferenceUID
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == cts[0].StudyInstanceUID == rs.StudyInstanceUID
    (series,) = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == cts[0].SeriesInstanceUID
    referenced = [str(i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence]
    assert len(referenced) == 134 and set(referenced) == ct_sops
    assert {i.ReferencedFrameOfReferenceUID for i in rs.StructureSetROISequence} == {
        cts[0].FrameOfReferenceUID
    }

    # The contours' own image references: in this TCIA object they name UIDs that the
    # archive's de-identification did not remap (0 of 680 resolve). Export keeps that
    # exactly: each is the keyed remap of the original reference, none resolves.
    (source_rs,) = [d for d in originals.values() if d.Modality == "RTSTRUCT"]
    source_ct = {str(d.SOPInstanceUID) for d in originals.values() if d.Modality == "CT"}

    def contour_refs(ds: Dataset) -> list[str]:
        return [
            str(image.ReferencedSOPInstanceUID)
            for roi in ds.ROIContourSequence
            for contour in roi.get("ContourSequence", [])
            for image in contour.get("ContourImageSequence", [])
        ]

    before, after = contour_refs(source_rs), contour_refs(rs)
    assert len(after) == len(before) == 680
    assert after == [remap_uid(u, SETTINGS) for u in before]
    assert sum(u in source_ct for u in before) == sum(u in ct_sops for u in after) == 0


@pytest.mark.slow
def test_roi_names_and_geometry_survive_and_dates_shift_consistently(
    planted: Planted, exported: Exported
) -> None:
    shift = date_shift_days("MRN-8675309", SETTINGS)
    assert -365 <= shift <= -1
    expected_date = (dt.date(2018, 2, 9) + dt.timedelta(days=shift)).strftime("%Y%m%d")
    for record in exported.result.files:
        out = pydicom.dcmread(record.output, stop_before_pixels=True)
        source = planted.originals[record.source]
        assert out.StudyDate == expected_date
        assert out.StudyTime == source.StudyTime  # whole-day shift: times of day kept
        assert out.PatientBirthDate == "" and "PatientAddress" not in out
        assert out.PatientID == out.PatientName == pseudonym_for("MRN-8675309", SETTINGS)
        if out.Modality == "CT":
            assert out.ImagePositionPatient == source.ImagePositionPatient
            assert out.DateOfLastCalibration == expected_date  # not in Table E.1-1, still shifted
        else:
            names = [i.ROIName for i in out.StructureSetROISequence]
            assert names == [i.ROIName for i in source.StructureSetROISequence]
            assert "GTV-1" in names and "Lung L" in names
            gtv = next(i for i in out.StructureSetROISequence if i.ROIName == "GTV-1")
            assert gtv.ROIDescription == "GTV drawn by Dr for"
            assert out.StructureSetLabel == "RT"
            assert out.StructureSetDate == expected_date
    ct = next(r for r in exported.result.files if r.modality == "CT")
    np.testing.assert_array_equal(
        pydicom.dcmread(ct.output).pixel_array, planted.originals[ct.source].pixel_array
    )


@pytest.mark.slow
def test_map_is_written_apart_and_a_second_export_is_identical(
    planted: Planted, exported: Exported, tmp_path: Path
) -> None:
    rows = (exported.map_dir / PSEUDONYM_FILE).read_text().splitlines()
    pseudonym = pseudonym_for("MRN-8675309", SETTINGS)
    shift = date_shift_days("MRN-8675309", SETTINGS)
    assert rows == ["original_patient_id,pseudonym,date_shift_days", f"MRN-8675309,{pseudonym},{shift}"]
    uid_rows = (exported.map_dir / UID_MAP_FILE).read_text().splitlines()[1:]
    assert len(uid_rows) == len(exported.result.uid_map) >= 134 + 3
    assert not list(exported.root.rglob("*.csv"))
    assert sorted(p.name for p in exported.root.iterdir()) == [pseudonym]

    subset = [p for p in planted.paths if planted.originals[p].Modality == "RTSTRUCT"] + list(
        planted.paths[:3]
    )
    again = export_deidentified(
        subset, tmp_path / "again", DeidSettings(secret=SECRET), map_dir=exported.map_dir
    )
    first = {r.source: Path(r.output) for r in exported.result.files}
    for record in again.files:
        out = Path(record.output)
        assert out.relative_to(tmp_path / "again") == first[record.source].relative_to(exported.root)
        assert out.read_bytes() == first[record.source].read_bytes()
    assert (exported.map_dir / PSEUDONYM_FILE).read_text().splitlines() == rows
    with pytest.raises(DeidentificationError, match="was the secret changed"):
        export_deidentified(
            subset[:1],
            tmp_path / "other",
            DeidSettings(secret=b"another-secret-0123456789"),
            map_dir=exported.map_dir,
        )
    table = exported.result.to_table()
    assert table.schema == EXPORT_SCHEMA and table.num_rows == 135


# --- dciodvfy ---------------------------------------------------------------------------------


def _dciodvfy_errors(path: str) -> set[str]:
    run = subprocess.run(["dciodvfy", path], capture_output=True, text=True, timeout=60, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    normalised = set()
    for line in lines:
        if not line.startswith("Error"):
            continue
        line = re.sub(r"= <[^>]*>", "= <value>", line)
        line = re.sub(r"\d+(\.\d+){2,}", "<uid>", line)
        normalised.add(line)
    return normalised


@pytest.mark.slow
def test_dciodvfy_finds_no_new_errors(planted: Planted, exported: Exported) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not on PATH (Debian/Ubuntu: apt-get install -y dicom3tools)")
    records = [r for r in exported.result.files if r.modality == "RTSTRUCT"]
    records += [r for r in exported.result.files if r.modality == "CT"][:3]
    checked = 0
    for record in records:
        before, after = _dciodvfy_errors(record.source), _dciodvfy_errors(record.output)
        assert after <= before, (record.modality, sorted(after - before))
        checked += 1
    assert checked == 4


# --- small synthetic objects ----------------------------------------------------------------------


def _slices(folder: Path, n: int = 2, **tags: str) -> list[Path]:
    paths = write_ct_slices(folder, np.zeros((n, 4, 4), dtype=np.uint16))
    for path in paths:
        ds = pydicom.dcmread(path)
        with pydicom.config.disable_value_validation():  # hostile values are invalid on purpose
            for keyword, value in tags.items():
                setattr(ds, keyword, value)
        ds.save_as(path)
    return paths


@pytest.mark.parametrize("hostile", ["../../x", "a/b", "/etc/passwd", "..", "C:\\evil", "x\x00y"])
def test_hostile_patient_id_and_modality_stay_inside_the_root(
    tmp_path: Path, hostile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    paths = _slices(tmp_path / "in", PatientID=hostile, Modality="../../evil")
    root = tmp_path / "deep" / "out"
    result = export_deidentified(paths, root, SETTINGS)
    assert result.failures == ()
    assert len(result.files) == 2
    for record in result.files:
        out = Path(record.output).resolve()
        assert out.is_relative_to(root.resolve())
        assert out.relative_to(root.resolve()).parts[0] == pseudonym_for(hostile, SETTINGS)
        assert out.parent.name.startswith("OT_2.25.")
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["out"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "in"]


def test_map_inside_the_output_root_is_refused(tmp_path: Path) -> None:
    paths = _slices(tmp_path / "in")
    with pytest.raises(DeidentificationError, match="apart from the de-identified outputs"):
        export_deidentified(paths, tmp_path / "out", SETTINGS, map_dir=tmp_path / "out" / "keys")
    assert not (tmp_path / "out").exists()


def test_failures_are_recorded_with_their_reason(tmp_path: Path) -> None:
    good = _slices(tmp_path / "in")
    burned = _slices(tmp_path / "burned", 1, BurnedInAnnotation="YES")
    nameless = _slices(tmp_path / "noid", 1, PatientID="")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    result = export_deidentified([*good, good[0], *burned, *nameless, junk], tmp_path / "out", SETTINGS)
    assert len(result.files) == 2
    assert result.failures[0].reason.startswith(f"same SOPInstanceUID as {good[0]}")
    reasons = {Path(f.source).parent.name + "/" + Path(f.source).name: f.reason for f in result.failures[1:]}
    assert len(reasons) == 3
    assert "BurnedInAnnotation" in reasons["burned/slice000.dcm"]
    assert "no PatientID" in reasons["noid/slice000.dcm"]
    assert "not readable as DICOM" in reasons[f"{tmp_path.name}/junk.dcm"]


@pytest.fixture
def small(tmp_path: Path) -> Dataset:
    """One small CT slice with the identifiers planted and real-looking dates."""
    ds = pydicom.dcmread(_slices(tmp_path / "small", 1)[0])
    _plant(ds)
    ds.StudyDate = ds.AcquisitionDate = ds.ContentDate = "20180209"
    return ds


def test_date_options(small: Dataset) -> None:
    ds = small
    shift = date_shift_days("MRN-8675309", SETTINGS)
    shifted = (dt.date(2018, 2, 9) + dt.timedelta(days=shift)).strftime("%Y%m%d")
    out = deidentify_dataset(ds, SETTINGS)
    assert (out.StudyDate, out.AcquisitionDate, out.ContentDate) == (shifted,) * 3
    kept = deidentify_dataset(ds, DeidSettings(secret=SECRET, dates=DateOption.KEEP))
    assert (kept.StudyDate, kept.AcquisitionDate, kept.PatientBirthDate or "") == ("20180209", "20180209", "")
    assert [c.CodeValue for c in kept.DeidentificationMethodCodeSequence] == ["113100", "113105", "113106"]
    removed = deidentify_dataset(ds, DeidSettings(secret=SECRET, dates=DateOption.REMOVE))
    # Study Date Z, Acquisition Date X/Z -> Z, Content Date Z/D -> D (a dummy, never the real date)
    assert (removed.StudyDate or "", removed.AcquisitionDate or "", removed.ContentDate) == (
        "",
        "",
        "19000101",
    )
    assert removed.LongitudinalTemporalInformationModified == "REMOVED"
    assert ds.StudyDate == "20180209" and ds.PatientName == "Doe^Jane^Quincy"  # input untouched


def test_descriptor_and_private_options(small: Dataset) -> None:
    ds = small
    cleaned = deidentify_dataset(ds, SETTINGS)
    assert cleaned.StudyDescription == "CT chest for ( )"
    assert cleaned.SeriesDescription == "St"
    assert cleaned.RequestAttributesSequence[0].RequestedProcedureDescription == "Chest CT for"
    assert "RequestedProcedureID" not in cleaned.RequestAttributesSequence[0]
    kept = deidentify_dataset(ds, DeidSettings(secret=SECRET, descriptors=DescriptorOption.KEEP))
    assert kept.StudyDescription == "CT chest for Jane DOE (MRN-8675309)"  # KEEP is not PHI-safe
    assert "113105" not in [c.CodeValue for c in kept.DeidentificationMethodCodeSequence]
    removed = deidentify_dataset(ds, DeidSettings(secret=SECRET, descriptors=DescriptorOption.REMOVE))
    assert "StudyDescription" not in removed and "SeriesDescription" not in removed
    assert [e.tag for e in cleaned if e.tag.is_private] == []
    private = deidentify_dataset(ds, DeidSettings(secret=SECRET, private_tags=PrivateTagOption.KEEP))
    assert private.private_block(0x0011, "PHI CREATOR")[0x01].value == "Doe^Jane"


def test_clean_text_cuts_whole_words_only() -> None:
    pattern = identifier_pattern(["Li", "Wu", "20180209", "2018-02-09"])
    assert clean_text("Lung L for Li, scan 2018-02-09; lipid", pattern) == "Lung L for , scan ; lipid"
    assert clean_text("LUNG1-001_20180209_CT", pattern) == "LUNG1-001_ _CT"


def test_uids_are_keyed_deterministic_and_well_known_ones_kept(small: Dataset) -> None:
    uid = "1.3.6.1.4.1.40744.29.239341353911714368772597187099978969331"
    new = remap_uid(uid, SETTINGS)
    assert new == remap_uid(uid, DeidSettings(secret=SECRET, dates=DateOption.KEEP))
    assert new != remap_uid(uid, DeidSettings(secret=b"another-secret-0123456789"))
    assert re.fullmatch(r"2\.25\.[1-9]\d*", new) and len(new) <= 64
    ds = small
    out = deidentify_dataset(ds, SETTINGS)
    assert out.SOPClassUID == ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert out.SOPInstanceUID == remap_uid(ds.SOPInstanceUID, SETTINGS)
    assert out.FrameOfReferenceUID == remap_uid("1.2.3.4", SETTINGS)


def test_table_actions_follow_ps315_basic_profile() -> None:
    codes = {
        kw: basic_profile().code(Tag(kw)) for kw in ("PatientName", "StudyInstanceUID", "InstitutionName")
    }
    assert codes == {"PatientName": "Z", "StudyInstanceUID": "U", "InstitutionName": "X/Z/D"}
    assert basic_profile().code(Tag(0x6002, 0x3000)) == "X"  # Overlay Data, repeating group
    basic = DeidSettings(secret=SECRET, dates=DateOption.REMOVE, descriptors=DescriptorOption.REMOVE)
    expected = {
        "PatientName": Action.EMPTY,
        "PatientBirthDate": Action.EMPTY,
        "PatientAddress": Action.REMOVE,
        "InstitutionName": Action.DUMMY,
        "ReferencedSOPInstanceUID": Action.UID,
        "ReferencedImageSequence": Action.RECURSE,
        "ReferencedStudySequence": Action.EMPTY,
        "SeriesDescription": Action.REMOVE,
        "ROIName": Action.EMPTY,
        "StudyDate": Action.EMPTY,
        "Modality": Action.KEEP,
        "ContourData": Action.KEEP,
        "ROIContourSequence": Action.RECURSE,
    }
    for keyword, action in expected.items():
        tag = Tag(keyword)
        assert resolve_action(tag, dictionary_VR(tag), basic) is action, keyword
    assert len(DESCRIPTOR_KEYWORDS) == len(set(DESCRIPTOR_KEYWORDS)) == 106
    assert [k for k in DESCRIPTOR_KEYWORDS if tag_for_keyword(k) is None] == []
    assert resolve_action(Tag("ROIName"), "LO", SETTINGS) is Action.CLEAN
    assert resolve_action(Tag("StudyDate"), "DA", SETTINGS) is Action.SHIFT
    assert resolve_action(Tag("PatientBirthDate"), "DA", SETTINGS) is Action.EMPTY


def test_settings_refuse_a_short_secret_and_never_show_it() -> None:
    with pytest.raises(DeidentificationError, match="at least 16"):
        DeidSettings(secret=b"short")
    assert "secret" not in repr(SETTINGS)
    provenance = SETTINGS.provenance()
    assert provenance["deid_dates"] == "shift" and provenance["deid_descriptors"] == "clean"
    assert SECRET.decode() not in str(provenance)
    other = DeidSettings(secret=b"another-secret-0123456789").provenance()
    assert re.fullmatch(r"[0-9a-f]{12}", str(provenance["deid_secret_id"]))
    assert other["deid_secret_id"] != provenance["deid_secret_id"]
    assert DeidSettings(secret=SECRET, dates="keep").dates is DateOption.KEEP  # type: ignore[arg-type]


def test_seg_references_follow_their_images(small: Dataset) -> None:
    ct = small
    seg = Dataset()
    seg.PatientID = ct.PatientID
    seg.Modality = "SEG"
    seg.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    seg.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    seg.FrameOfReferenceUID = ct.FrameOfReferenceUID
    instance = Dataset()
    instance.ReferencedSOPClassUID = ct.SOPClassUID
    instance.ReferencedSOPInstanceUID = ct.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = ct.SeriesInstanceUID
    series.ReferencedInstanceSequence = [instance]
    seg.ReferencedSeriesSequence = [series]
    source = Dataset()
    source.ReferencedSOPClassUID = ct.SOPClassUID
    source.ReferencedSOPInstanceUID = ct.SOPInstanceUID
    derivation = Dataset()
    derivation.SourceImageSequence = [source]
    frame = Dataset()
    frame.DerivationImageSequence = [derivation]
    seg.PerFrameFunctionalGroupsSequence = [frame]
    segment = Dataset()
    segment.SegmentLabel = "GTV"
    seg.SegmentSequence = [segment]

    out_ct, out_seg = deidentify_dataset(ct, SETTINGS), deidentify_dataset(seg, SETTINGS)
    (ref_series,) = out_seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == out_ct.SeriesInstanceUID != ct.SeriesInstanceUID
    assert ref_series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == out_ct.SOPInstanceUID
    (frame_out,) = out_seg.PerFrameFunctionalGroupsSequence
    image = frame_out.DerivationImageSequence[0].SourceImageSequence[0]
    assert image.ReferencedSOPInstanceUID == out_ct.SOPInstanceUID
    assert image.ReferencedSOPClassUID == ct.SOPClassUID
    assert out_seg.FrameOfReferenceUID == out_ct.FrameOfReferenceUID
    assert out_seg.SOPClassUID == seg.SOPClassUID
    assert out_seg.SegmentSequence[0].SegmentLabel == "GTV"
    assert out_seg.PatientID == out_ct.PatientID
