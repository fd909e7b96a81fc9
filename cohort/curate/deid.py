"""De-identification of DICOM objects that leave the platform (DICOM PS3.15 Annex E).

The action for each attribute is that of the Basic Application Confidentiality
Profile, PS3.15 Table E.1-1, as tabulated from the standard by the
``dicom-anonymizer`` package (edition :data:`PROFILE_EDITION`). On top of it, three
options of the same table, chosen in :class:`DeidSettings`:

* dates (:class:`DateOption`): *Retain Longitudinal Temporal Information* with
  modified dates (every date of a patient shifted by one keyed per-patient number of
  days, the same in all of that patient's objects), with full dates, or removed as
  the basic profile says;
* descriptors (:class:`DescriptorOption`): the *Clean Descriptors Option* (free
  text kept after the identifiers found elsewhere in the same object are cut out
  of it), kept as they are, or removed;
* private attributes (:class:`PrivateTagOption`): removed, or all kept.

UIDs are replaced by a keyed hash (HMAC-SHA256 with the caller's secret) written
as ``2.25.<decimal>``, so the same original UID always gets the same new UID:
an RTSTRUCT or SEG exported with its images still references them, and a patient
exported twice gets the same UIDs and pseudonym. Well-known UIDs (SOP classes,
transfer syntaxes, coding schemes) are kept.

Output file names are built from pseudonyms and remapped UIDs only, never from
raw tag values. The pseudonym map (original PatientID -> pseudonym) is written
to a folder the caller names, which must lie outside the output root.

Not done (the corresponding options are not claimed in the output): cleaning of
pixel data (objects that declare burned-in annotation are refused), of structured
content and of graphics (overlays are removed).
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import hashlib
import hmac
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache, partial
from pathlib import Path

import pyarrow as pa
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, UID_dictionary

from cohort.errors import DeidentificationError
from cohort.index.source import read_dicom

#: Edition of PS3.15 Table E.1-1 used for the basic profile (a module of dicom-anonymizer).
PROFILE_EDITION = "dicomfields_2026c"
#: Root of the UIDs we make: UUID-derived UIDs (PS3.5 B.2), here from a keyed hash.
UID_ROOT = "2.25."
#: Shortest secret accepted for the keyed hashes.
MIN_SECRET_BYTES = 16

_DUMMY_TEXT = "REMOVED"
_DUMMY_PERSON = "ANONYMOUS"
_DUMMY_DATE = "19000101"
_DUMMY_TIME = "000000"
_DUMMY_DATETIME = "19000101000000"

_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "AS"})
_NUMBER_VRS = frozenset({"FL", "FD", "SL", "SS", "UL", "US", "SV", "UV"})
_DATE_VRS = frozenset({"DA", "DT", "TM"})
_SAFE_PSEUDONYM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_SAFE_MODALITY = re.compile(r"^[A-Z0-9]{1,16}$")
_SAFE_UID = re.compile(r"^[0-9]{1,39}(\.[0-9]{1,39}){1,31}$")


class DateOption(StrEnum):
    """What happens to dates and times (PS3.15 Table E.1-1 option columns)."""

    SHIFT = "shift"  # Retain Longitudinal Temporal Information, Modified Dates Option
    KEEP = "keep"  # Retain Longitudinal Temporal Information, Full Dates Option
    REMOVE = "remove"  # basic profile


class DescriptorOption(StrEnum):
    """What happens to descriptions, comments and labels (ROI names among them)."""

    CLEAN = "clean"  # Clean Descriptors Option: identifiers found in the object are cut out
    KEEP = "keep"  # kept verbatim: outside the profile, for data known to hold no free-text PHI
    REMOVE = "remove"  # basic profile (removes ROI names too)


class PrivateTagOption(StrEnum):
    """What happens to private attributes."""

    REMOVE = "remove"  # basic profile
    KEEP = "keep"  # all kept unchanged: outside the profile, private UIDs are not remapped


class Action(StrEnum):
    """Resolved action for one attribute (PS3.15 E.1.1 action codes, plus ours)."""

    KEEP = "K"
    REMOVE = "X"
    EMPTY = "Z"
    DUMMY = "D"
    UID = "U"
    CLEAN = "C"
    RECURSE = "recurse"  # a sequence whose items are de-identified with the same rules
    SHIFT = "shift"


@dataclass(frozen=True)
class DeidSettings:
    """Every parameter that changes de-identified output.

    ``secret`` keys the hashes that make pseudonyms, UIDs and date shifts: keep it
    out of specs and outputs (read it from the environment); the same secret gives
    the same pseudonyms across runs, another secret gives unrelated ones.
    """

    secret: bytes = field(repr=False)
    dates: DateOption = DateOption.SHIFT
    descriptors: DescriptorOption = DescriptorOption.CLEAN
    private_tags: PrivateTagOption = PrivateTagOption.REMOVE
    pseudonym_prefix: str = "SUBJ"
    max_date_shift_days: int = 365
    record_uid_map: bool = False

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_SECRET_BYTES:
            raise DeidentificationError(
                f"the de-identification secret has {len(self.secret)} bytes; give at least "
                f"{MIN_SECRET_BYTES} random bytes (e.g. from `python -c 'import secrets; "
                "print(secrets.token_hex(32))'`)",
                subject="secret",
            )
        object.__setattr__(self, "dates", DateOption(self.dates))
        object.__setattr__(self, "descriptors", DescriptorOption(self.descriptors))
        object.__setattr__(self, "private_tags", PrivateTagOption(self.private_tags))
        if not re.fullmatch(r"[A-Za-z0-9]{1,16}", self.pseudonym_prefix):
            raise DeidentificationError(
                "pseudonym_prefix must be 1-16 letters or digits", subject=self.pseudonym_prefix
            )
        if not 1 <= self.max_date_shift_days <= 36500:
            raise DeidentificationError(
                "max_date_shift_days must lie in [1, 36500]", subject=str(self.max_date_shift_days)
            )

    def provenance(self) -> dict[str, str | int | bool]:
        """What to record with every output: the options, and an ID of the secret (not the secret)."""
        return {
            "deid_profile": PROFILE_EDITION,
            "deid_dates": self.dates.value,
            "deid_descriptors": self.descriptors.value,
            "deid_private_tags": self.private_tags.value,
            "deid_pseudonym_prefix": self.pseudonym_prefix,
            "deid_max_date_shift_days": self.max_date_shift_days,
            "deid_secret_id": _digest(self, "secret-id", "").hex()[:12],
        }


# --- the action table ---------------------------------------------------------------------------

#: PS3.15 Table E.1-1, column "Clean Desc. Opt." (attributes marked C): descriptors
#: that the Clean Descriptors Option keeps after cleaning.
DESCRIPTOR_KEYWORDS: tuple[str, ...] = (
    "AcquisitionComments", "AcquisitionDeviceProcessingDescription", "AcquisitionFieldOfViewLabel",
    "AcquisitionProtocolDescription", "AdditionalPatientHistory", "AdmittingDiagnosesCodeSequence",
    "AdmittingDiagnosesDescription", "Allergies", "BeamDescription", "BolusDescription",
    "ClinicalTrialSeriesDescription", "ClinicalTrialTimePointDescription", "CommentsOnRadiationDose",
    "CommentsOnThePerformedProcedureStep", "CompensatorDescription", "ConceptualVolumeCombinationDescription",
    "ConceptualVolumeDescription", "ContainerDescription", "ContrastBolusAgent", "ContributionDescription",
    "DecompositionDescription", "DerivationDescription", "DeviceSettingDescription",
    "DischargeDiagnosisDescription", "DoseReferenceDescription", "EntityDescription", "EntityLabel",
    "EntityLongLabel", "EntityName", "EquipmentFrameOfReferenceDescription", "FixationDeviceDescription",
    "FractionationNotes", "FractionGroupDescription", "FrameComments", "IdentifyingComments", "ImageComments",
    "ImagingServiceRequestComments", "Impressions", "InterlockDescription", "InterlockOriginDescription",
    "InterpretationDiagnosisDescription", "InterpretationText", "LabelText", "LongDeviceDescription",
    "MakerNote", "MedicalAlerts", "MultienergyAcquisitionDescription", "Occupation", "PatientComments",
    "PatientState", "PerformedProcedureStepDescription", "PrescriptionDescription", "PrescriptionNotes",
    "PrescriptionNotesSequence", "PriorTreatmentDoseDescription", "ProtocolName",
    "RadiationDoseIdentificationLabel", "RadiationDoseInVivoMeasurementLabel",
    "RadiationGenerationModeDescription", "RadiationGenerationModeLabel", "ReasonForOmissionDescription",
    "ReasonForRequestedProcedureCodeSequence", "ReasonForStudy", "ReasonForSuperseding",
    "ReasonForTheImagingServiceRequest", "ReasonForTheRequestedProcedure", "ReasonForVisit",
    "ReasonForVisitCodeSequence", "RequestAttributesSequence", "RequestedContrastAgent",
    "RequestedProcedureComments", "RequestedProcedureDescription", "RequestedSeriesDescription",
    "RespiratoryMotionCompensationTechniqueDescription", "ResultsComments", "ROIDescription",
    "ROIGenerationDescription", "ROIName", "ROIObservationDescription", "ROIObservationLabel",
    "RTPhysicianIntentNarrative", "RTPlanDescription", "RTPlanLabel", "RTPlanName", "RTPrescriptionLabel",
    "RTToleranceSetLabel", "RTTreatmentApproachLabel", "ScheduledProcedureStepDescription",
    "SeriesDescription", "ServiceEpisodeDescription", "SetupTechniqueDescription",
    "ShieldingDeviceDescription", "SpecimenDetailedDescription", "SpecimenShortDescription",
    "StructureSetDescription", "StructureSetLabel", "StructureSetName", "StudyComments", "StudyDescription",
    "TreatmentPositionGroupLabel", "TreatmentSite", "TreatmentTechniqueNotes",
    "TreatmentToleranceViolationDescription", "UserContentLabel", "UserContentLongLabel", "VisitComments",
)  # fmt: skip

#: Dates that no date option retains (PS3.15 Table E.1-1 gives them no option column).
_BIRTH_TAGS = frozenset({Tag("PatientBirthDate"), Tag("PatientBirthTime")})

#: The dicom-anonymizer category for each combined action code of Table E.1-1.
_CATEGORIES = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}


@dataclass(frozen=True)
class ProfileTable:
    """Basic-profile action codes by tag, plus masked entries for repeating groups."""

    exact: Mapping[int, str]
    masked: tuple[tuple[int, int, int, int, str], ...]  # (group, element, group mask, element mask, code)

    def code(self, tag: BaseTag) -> str | None:
        found = self.exact.get(int(tag))
        if found is not None:
            return found
        for group, element, gmask, emask, code in self.masked:
            if (tag.group & gmask) == group and (tag.element & emask) == element:
                return code
        return None


@cache
def basic_profile() -> ProfileTable:
    """PS3.15 Table E.1-1 basic-profile column, edition :data:`PROFILE_EDITION`."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    tables = dicom_anonymization_database_selector(PROFILE_EDITION)
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, code in _CATEGORIES.items():
        for entry in tables[category]:
            if len(entry) == 2:
                exact[int(Tag(entry[0], entry[1]))] = code
            else:
                group, element, gmask, emask = entry
                masked.append((group, element, gmask, emask, code))
    return ProfileTable(exact=exact, masked=tuple(masked))


@cache
def _descriptor_tags() -> frozenset[int]:
    tags = set()
    for keyword in DESCRIPTOR_KEYWORDS:
        tag = tag_for_keyword(keyword)
        if tag is None:  # pragma: no cover - guarded by a test against pydicom's dictionary
            raise DeidentificationError("unknown DICOM keyword in the descriptor list", subject=keyword)
        tags.add(int(tag))
    return frozenset(tags)


def _most_retaining(code: str) -> str:
    """One action of a combined code (X/Z, X/D, Z/D, X/Z/D, X/Z/U*).

    Table E.1-1 lets the choice depend on the attribute's Type in the IOD; without the
    IOD at hand we take the one that keeps the object valid in every IOD (D keeps Type 1
    attributes, Z Type 2) and that still holds no identifying value.
    """
    options = code.split("/")
    for preferred in ("U*", "D", "Z", "X", "U"):
        if preferred in options:
            return preferred
    raise DeidentificationError("unknown action code in the profile table", subject=code)


def resolve_action(tag: BaseTag, vr: str, settings: DeidSettings) -> Action:
    """The action applied to a public attribute under ``settings``."""
    descriptor = int(tag) in _descriptor_tags()
    if descriptor and settings.descriptors is not DescriptorOption.REMOVE:
        if vr == "SQ":  # coded descriptors: items are de-identified like any other
            return Action.RECURSE
        return Action.KEEP if settings.descriptors is DescriptorOption.KEEP else Action.CLEAN
    code = basic_profile().code(tag)
    if vr in _DATE_VRS and tag not in _BIRTH_TAGS:
        if settings.dates is DateOption.KEEP:
            return Action.KEEP
        if settings.dates is DateOption.SHIFT:
            return Action.KEEP if vr == "TM" else Action.SHIFT
        if code is None:  # a date the table does not list (e.g. Date of Last Calibration)
            return Action.KEEP if vr == "TM" else Action.EMPTY
    if vr == "UI":
        return Action.UID if code is None or "U" in code else _basic(code, vr)
    if code is None:
        return Action.RECURSE if vr == "SQ" else Action.KEEP
    return _basic(code, vr)


def _basic(code: str, vr: str) -> Action:
    chosen = _most_retaining(code)
    if chosen == "U*":
        return Action.RECURSE if vr == "SQ" else Action.UID
    if vr == "SQ":
        # A dummy sequence is an empty one: its items (codes, IDs) could identify.
        return Action.REMOVE if chosen == "X" else Action.EMPTY
    return {"D": Action.DUMMY, "Z": Action.EMPTY, "X": Action.REMOVE, "U": Action.UID}[chosen]


# --- keyed hashes -------------------------------------------------------------------------------


def _digest(settings: DeidSettings, domain: str, value: str) -> bytes:
    return hmac.new(settings.secret, f"{domain}\x00{value}".encode(), hashlib.sha256).digest()


def pseudonym_for(patient_id: str, settings: DeidSettings) -> str:
    """The pseudonym of one original PatientID (a keyed hash, safe as a folder name)."""
    return f"{settings.pseudonym_prefix}-{_digest(settings, 'patient', patient_id.strip()).hex()[:16]}"


def date_shift_days(patient_id: str, settings: DeidSettings) -> int:
    """Days added to every date of a patient: in [-max_date_shift_days, -1], keyed per patient."""
    h = int.from_bytes(_digest(settings, "date-shift", patient_id.strip())[:8], "big")
    return -(1 + h % settings.max_date_shift_days)


def remap_uid(uid: str, settings: DeidSettings) -> str:
    """The new UID of an original one: ``2.25.`` and a 128-bit keyed hash, at most 44 characters."""
    return UID_ROOT + str(int.from_bytes(_digest(settings, "uid", uid.strip())[:16], "big"))


def _is_well_known(uid: str, keyword: str) -> bool:
    return uid in UID_dictionary or keyword.endswith(("ClassUID", "SyntaxUID"))


# --- cleaning free text -------------------------------------------------------------------------


def _date_spellings(value: str) -> list[str]:
    """A DA value as it may be typed in free text."""
    if not re.fullmatch(r"\d{8}", value):
        return []
    y, m, d = value[:4], value[4:6], value[6:]
    return [value, f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{y}/{m}/{d}"]


def _identifier_fragments(value: str, vr: str) -> list[str]:
    value = value.strip()
    if not value:
        return []
    if vr == "DA":
        return _date_spellings(value)
    if vr == "DT":
        return _date_spellings(value[:8])
    if vr == "PN":
        words = [w for w in re.split(r"[\^=\s,]+", value) if len(w) >= 2]
        return [value.replace("^", " ").strip(), *words]
    words = [w for w in re.split(r"[^0-9A-Za-z]+", value) if len(w) >= 3]
    return [value, *words] if len(value) >= 2 else words


def _element_vr(ds: Dataset, tag: BaseTag) -> str:
    """The VR of an element without converting its value (ContourData alone has ~10^5 numbers)."""
    vr = ds.get_item(tag).VR
    if vr is None or vr == "UN":  # implicit VR, or UN that pydicom would replace with the known VR
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = "UN"
    return str(vr)


def _collect_identifiers(ds: Dataset, settings: DeidSettings, found: set[str]) -> None:
    """Values the profile removes or replaces: the words that cleaning cuts out of descriptors."""
    for key in list(ds.keys()):
        tag = Tag(key)
        if tag.is_private or tag.group == 0x0002:
            continue
        vr = _element_vr(ds, tag)
        if vr == "SQ":
            for item in ds[tag].value or ():
                _collect_identifiers(item, settings, found)
            continue
        if vr not in _TEXT_VRS | {"DA", "DT"}:
            continue
        if resolve_action(tag, vr, settings) in (Action.KEEP, Action.CLEAN):
            continue
        elem = ds[tag]
        if elem.value in (None, ""):
            continue
        values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
        for value in values:
            found.update(_identifier_fragments(str(value), elem.VR))


def identifier_pattern(identifiers: Iterable[str]) -> re.Pattern[str] | None:
    """A pattern matching any of ``identifiers`` as a whole word, case-insensitive."""
    words = sorted({w for w in identifiers if w.strip()}, key=len, reverse=True)
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in words)
    return re.compile(rf"(?<![0-9A-Za-z])(?:{alternatives})(?![0-9A-Za-z])", re.IGNORECASE)


def clean_text(text: str, pattern: re.Pattern[str] | None) -> str:
    """``text`` with every identifier of ``pattern`` cut out, separators tidied."""
    if pattern is None:
        return text
    cleaned = pattern.sub(" ", text)
    return re.sub(r"\s+", " ", cleaned).strip(" _-.,;:/^")


# --- de-identifying one dataset -----------------------------------------------------------------


@dataclass
class _Context:
    settings: DeidSettings
    shift_days: int
    cleaner: re.Pattern[str] | None
    uid_map: dict[str, str]


def _shift_date(value: str, days: int) -> str:
    try:
        return (dt.datetime.strptime(value[:8], "%Y%m%d").date() + dt.timedelta(days=days)).strftime("%Y%m%d")
    except ValueError:
        return ""


def _shift(value: str, vr: str, days: int) -> str:
    value = value.strip()
    if len(value) < 8 or not value[:8].isdigit():
        return ""  # a partial or malformed date cannot be shifted: it is removed
    shifted = _shift_date(value, days)
    return shifted + value[8:] if shifted and vr == "DT" else shifted


def _dummy(vr: str) -> object:
    if vr == "PN":
        return _DUMMY_PERSON
    if vr == "DA":
        return _DUMMY_DATE
    if vr == "TM":
        return _DUMMY_TIME
    if vr == "DT":
        return _DUMMY_DATETIME
    if vr in ("IS", "DS"):
        return "0"
    if vr in _NUMBER_VRS:
        return 0
    if vr in _TEXT_VRS:
        return _DUMMY_TEXT
    return None  # binary and other values: empty


def _map_values(elem: DataElement, fn: Callable[[str], str]) -> None:
    if elem.value is None or elem.value == "":
        return
    if isinstance(elem.value, MultiValue | list):
        elem.value = [fn(str(v)) for v in elem.value]
    else:
        elem.value = fn(str(elem.value))


def _apply(ds: Dataset, ctx: _Context) -> None:
    settings = ctx.settings
    for tag in list(ds.keys()):
        tag = Tag(tag)
        if tag.is_private:
            if settings.private_tags is PrivateTagOption.REMOVE:
                del ds[tag]
            continue
        if tag.element == 0 or (0x5000 <= tag.group <= 0x50FF) or (0x6000 <= tag.group <= 0x60FF):
            # Group lengths (retired); curves and overlays (Table E.1-1: X; Clean Graphics not done).
            del ds[tag]
            continue
        action = resolve_action(tag, _element_vr(ds, tag), settings)
        if action is Action.KEEP:
            continue  # not even converted: most of an RTSTRUCT is kept as read
        elem = ds[tag]
        if action is Action.REMOVE:
            del ds[tag]
        elif action is Action.EMPTY:
            elem.value = DicomSequence() if elem.VR == "SQ" else None
        elif action is Action.DUMMY:
            if elem.value not in (None, ""):
                elem.value = _dummy(elem.VR)
        elif action is Action.RECURSE:
            for item in elem.value or ():
                _apply(item, ctx)
        elif action is Action.UID:
            _map_values(elem, partial(_new_uid, keyword=elem.keyword, ctx=ctx))
        elif action is Action.SHIFT:
            _map_values(elem, partial(_shift, vr=elem.VR, days=ctx.shift_days))
        elif action is Action.CLEAN:
            if elem.VR in _TEXT_VRS:
                _map_values(elem, lambda v: clean_text(v, ctx.cleaner))
            else:  # binary descriptors (Maker Note): nothing to clean safely
                elem.value = None


def _new_uid(uid: str, keyword: str, ctx: _Context) -> str:
    uid = uid.strip().rstrip("\x00")
    if not uid or _is_well_known(uid, keyword):
        return uid
    new = remap_uid(uid, ctx.settings)
    if ctx.settings.record_uid_map:
        ctx.uid_map[uid] = new
    return new


_METHOD_CODES = {
    "113100": "Basic Application Confidentiality Profile",
    "113105": "Clean Descriptors Option",
    "113106": "Retain Longitudinal Temporal Information Full Dates Option",
    "113107": "Retain Longitudinal Temporal Information Modified Dates Option",
}


def _method_codes(settings: DeidSettings) -> list[str]:
    codes = ["113100"]
    if settings.descriptors is DescriptorOption.CLEAN:
        codes.append("113105")
    if settings.dates is DateOption.KEEP:
        codes.append("113106")
    elif settings.dates is DateOption.SHIFT:
        codes.append("113107")
    return codes


def _method_text(settings: DeidSettings) -> list[str]:
    return [
        f"cohort: PS3.15 E.1 basic profile ({PROFILE_EDITION})",
        f"dates {settings.dates.value}; descriptors {settings.descriptors.value}",
        f"private attributes {settings.private_tags.value}; UIDs keyed hash",
    ]


def _record_method(ds: Dataset, settings: DeidSettings) -> None:
    ds.PatientIdentityRemoved = "YES"
    previous = ds.get("DeidentificationMethod")
    texts = list(previous) if isinstance(previous, MultiValue) else ([previous] if previous else [])
    ds.DeidentificationMethod = [*texts, *_method_text(settings)]
    items = list(ds.get("DeidentificationMethodCodeSequence", []))
    present = {(str(i.get("CodeValue", "")), str(i.get("CodingSchemeDesignator", ""))) for i in items}
    for code in _method_codes(settings):
        if (code, "DCM") not in present:
            item = Dataset()
            item.CodeValue = code
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = _METHOD_CODES[code]
            items.append(item)
    ds.DeidentificationMethodCodeSequence = DicomSequence(items)
    if settings.dates is DateOption.SHIFT:
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
    elif settings.dates is DateOption.REMOVE:
        ds.LongitudinalTemporalInformationModified = "REMOVED"
    elif "LongitudinalTemporalInformationModified" not in ds:
        ds.LongitudinalTemporalInformationModified = "UNMODIFIED"


def original_patient_id(ds: Dataset, *, subject: str = "") -> str:
    """The PatientID that keys pseudonym and date shift; refuses objects without one."""
    value = ds.get("PatientID", "")
    # A backslash in an LO value reads as several values: join them back into the text as stored.
    patient_id = (
        "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value or "")
    ).strip()
    if not patient_id:
        raise DeidentificationError(
            "no PatientID: the pseudonym and date shift are keyed on it; fill it in before export",
            subject=subject,
        )
    return patient_id


def deidentify_dataset(
    ds: Dataset, settings: DeidSettings, *, uid_map: dict[str, str] | None = None, subject: str = ""
) -> Dataset:
    """A de-identified copy of ``ds`` (``ds`` itself is not changed).

    ``uid_map``, when given and ``settings.record_uid_map`` is set, receives every
    original -> new UID replaced. Raises :class:`DeidentificationError` for objects
    that cannot be made safe here (no PatientID, burned-in annotation).
    """
    out = copy.deepcopy(ds)
    _deidentify_in_place(out, settings, uid_map if uid_map is not None else {}, subject)
    return out


def _deidentify_in_place(ds: Dataset, settings: DeidSettings, uid_map: dict[str, str], subject: str) -> None:
    patient_id = original_patient_id(ds, subject=subject)
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        raise DeidentificationError(
            "BurnedInAnnotation is YES: pixel data would need cleaning, which is not done here; "
            "leave this object out of the export",
            subject=subject,
        )
    identifiers: set[str] = {patient_id}
    _collect_identifiers(ds, settings, identifiers)
    ctx = _Context(
        settings=settings,
        shift_days=date_shift_days(patient_id, settings),
        cleaner=identifier_pattern(identifiers) if settings.descriptors is DescriptorOption.CLEAN else None,
        uid_map=uid_map,
    )
    _apply(ds, ctx)
    pseudonym = pseudonym_for(patient_id, settings)
    ds.PatientID = pseudonym
    ds.PatientName = pseudonym
    _record_method(ds, settings)


# --- exporting files ----------------------------------------------------------------------------

EXPORT_SCHEMA = pa.schema(
    [
        pa.field("source_path", pa.string(), nullable=False),
        pa.field("output_path", pa.string()),
        pa.field("pseudonym", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("sop_instance_uid", pa.string()),
        pa.field("series_instance_uid", pa.string()),
        pa.field("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class ExportedFile:
    """One de-identified object written out (UIDs are the new ones)."""

    source: str
    output: str
    pseudonym: str
    modality: str
    sop_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class ExportFailure:
    """One input that was not exported, and why."""

    source: str
    reason: str


@dataclass(frozen=True)
class PseudonymEntry:
    """A line of the pseudonym map: the key to re-identification, kept apart from outputs."""

    original_patient_id: str
    pseudonym: str
    date_shift_days: int


@dataclass(frozen=True)
class ExportResult:
    files: tuple[ExportedFile, ...]
    failures: tuple[ExportFailure, ...]
    pseudonyms: tuple[PseudonymEntry, ...]
    uid_map: tuple[tuple[str, str], ...] = ()

    def to_table(self) -> pa.Table:
        """One row per input (exported or failed), in :data:`EXPORT_SCHEMA`."""
        rows = [
            {
                "source_path": f.source,
                "output_path": f.output,
                "pseudonym": f.pseudonym,
                "modality": f.modality,
                "sop_instance_uid": f.sop_instance_uid,
                "series_instance_uid": f.series_instance_uid,
                "error": None,
            }
            for f in self.files
        ]
        rows += [{"source_path": f.source, "error": f.reason} for f in self.failures]
        return pa.Table.from_pylist(rows, schema=EXPORT_SCHEMA)


def _safe_component(value: str, pattern: re.Pattern[str], fallback: str) -> str:
    return value if pattern.fullmatch(value) else fallback


def _inside(root: Path, path: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def output_path(out_root: Path, ds: Dataset) -> Path:
    """Where a de-identified object goes: ``<pseudonym>/<study>/<MODALITY>_<series>/<sop>.dcm``.

    Only the pseudonym and remapped UIDs (checked against strict patterns) name the
    folders; any other value falls back to a fixed name, and the result must lie
    inside ``out_root``.
    """
    pseudonym = str(ds.PatientID)
    if not _SAFE_PSEUDONYM.fullmatch(pseudonym):
        raise DeidentificationError("pseudonym is not a safe folder name", subject=pseudonym)
    study = _safe_component(str(ds.get("StudyInstanceUID", "")), _SAFE_UID, "unknown-study")
    series = _safe_component(str(ds.get("SeriesInstanceUID", "")), _SAFE_UID, "unknown-series")
    sop = str(ds.get("SOPInstanceUID", ""))
    if not _SAFE_UID.fullmatch(sop):
        raise DeidentificationError("no valid SOPInstanceUID to name the output file", subject=sop)
    modality = _safe_component(str(ds.get("Modality", "")).upper(), _SAFE_MODALITY, "OT")
    path = out_root / pseudonym / study / f"{modality}_{series}" / f"{sop}.dcm"
    if not _inside(out_root, path):  # defence in depth: the patterns above already forbid it
        raise DeidentificationError("output path would leave the output root", subject=str(path))
    return path


def _file_meta(ds: Dataset, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    return meta


def _write_atomic(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_deidentified(
    paths: Sequence[str | Path],
    out_root: str | Path,
    settings: DeidSettings,
    *,
    map_dir: str | Path | None = None,
) -> ExportResult:
    """De-identify the DICOM files ``paths`` into ``out_root``.

    A file that cannot be read or made safe is recorded in ``failures`` with its
    reason; the others are exported. With ``map_dir`` (which must lie outside
    ``out_root``) the pseudonym map, and with ``settings.record_uid_map`` the UID
    map, are merged into the CSV files there (see :func:`write_pseudonym_map`).
    """
    root = Path(out_root)
    if map_dir is not None and _inside(root, Path(map_dir)):
        raise DeidentificationError(
            "the pseudonym map must be stored apart from the de-identified outputs; "
            "give a map folder outside the output root",
            subject=str(map_dir),
        )
    files: list[ExportedFile] = []
    failures: list[ExportFailure] = []
    entries: dict[str, PseudonymEntry] = {}
    uid_map: dict[str, str] = {}
    written: dict[Path, str] = {}
    for source in paths:
        source = str(source)
        try:
            ds = read_dicom(source)
        except (InvalidDicomError, OSError, ValueError) as exc:
            failures.append(ExportFailure(source, f"not readable as DICOM ({exc})"))
            continue
        try:
            patient_id = original_patient_id(ds, subject=source)
            transfer_syntax = ds.file_meta.TransferSyntaxUID
            out = ds  # read for this export alone: de-identified in place, no copy
            _deidentify_in_place(out, settings, uid_map, source)
            target = output_path(root, out)
            if target in written:
                raise DeidentificationError(
                    f"same SOPInstanceUID as {written[target]}: a duplicate instance, not exported twice",
                    subject=source,
                )
        except DeidentificationError as exc:
            failures.append(ExportFailure(source, exc.reason))
            continue
        written[target] = source
        out.file_meta = _file_meta(out, transfer_syntax)
        _write_atomic(out, target)
        entries[patient_id] = PseudonymEntry(
            patient_id, str(out.PatientID), date_shift_days(patient_id, settings)
        )
        files.append(
            ExportedFile(
                source=source,
                output=str(target),
                pseudonym=str(out.PatientID),
                modality=str(out.get("Modality", "")),
                sop_instance_uid=str(out.SOPInstanceUID),
                series_instance_uid=str(out.get("SeriesInstanceUID", "")),
            )
        )
    result = ExportResult(
        files=tuple(files),
        failures=tuple(failures),
        pseudonyms=tuple(sorted(entries.values(), key=lambda e: e.pseudonym)),
        uid_map=tuple(sorted(uid_map.items())),
    )
    if map_dir is not None:
        write_pseudonym_map(result, map_dir)
    return result


PSEUDONYM_FILE = "pseudonyms.csv"
UID_MAP_FILE = "uids.csv"


def _read_csv(path: Path) -> Iterator[dict[str, str]]:
    if path.exists():
        with path.open(newline="", encoding="utf-8") as handle:
            yield from csv.DictReader(handle)


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_pseudonym_map(result: ExportResult, map_dir: str | Path) -> Path:
    """Merge ``result``'s pseudonyms (and UID map, if recorded) into the CSV files in ``map_dir``.

    Refuses an existing entry that disagrees (a patient with another pseudonym means
    another secret was used). One writer per folder: shards should hand their results
    to one task that writes the map.
    """
    folder = Path(map_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PSEUDONYM_FILE
    merged = {row["original_patient_id"]: row for row in _read_csv(path)}
    for entry in result.pseudonyms:
        old = merged.get(entry.original_patient_id)
        if old is not None and old["pseudonym"] != entry.pseudonym:
            raise DeidentificationError(
                f"the pseudonym map holds {old['pseudonym']} for this patient, the export made "
                f"{entry.pseudonym}: was the secret changed? Use the original secret or a new map folder",
                subject=str(path),
            )
        merged[entry.original_patient_id] = {
            "original_patient_id": entry.original_patient_id,
            "pseudonym": entry.pseudonym,
            "date_shift_days": str(entry.date_shift_days),
        }
    _write_csv(
        path,
        ("original_patient_id", "pseudonym", "date_shift_days"),
        ((r["original_patient_id"], r["pseudonym"], r["date_shift_days"]) for _, r in sorted(merged.items())),
    )
    if result.uid_map:
        uid_path = folder / UID_MAP_FILE
        uids = {row["original_uid"]: row["new_uid"] for row in _read_csv(uid_path)}
        uids.update(result.uid_map)
        _write_csv(uid_path, ("original_uid", "new_uid"), sorted(uids.items()))
    return path
