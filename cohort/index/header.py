"""DICOM header -> index row: the columns, their tags, and two ways to find the elements.

The fast path walks the top-level elements of the bytes itself (explicit and
implicit VR, little and big endian, skipping sequences and private data by their
lengths) and stops at the pixel data, keeping only the raw bytes of the tags the
index needs. Anything it does not handle plainly (no file meta, deflate, an
unknown VR, a VR mismatch, structure sets and segmentations whose columns live
in sequences) goes to pydicom. Both paths hand the same raw ``(VR, bytes)`` pairs
to one set of converters, so they give the same row; a test checks that on
every file pydicom ships.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from io import BytesIO
from typing import Any, BinaryIO

import pydicom
from pydicom import uid as dicom_uid
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue

from cohort.errors import DicomReadError
from cohort.index.codecs import can_decode

#: Elements larger than this are not read into memory by the pydicom path.
DEFER_SIZE = 4096
#: SOP class of a DICOMDIR (Media Storage Directory Storage).
MEDIA_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Modalities whose index columns (ROI names, referenced series) live in sequences.
SEQUENCE_MODALITIES = frozenset({"RTSTRUCT", "SEG"})


class Kind(StrEnum):
    """How an element's values become a column value."""

    TEXT = "text"  # one string; several values joined with "\\"
    TEXTS = "texts"  # a list of strings
    FLOAT = "float"  # exactly one number
    INT = "int"  # exactly one integer (int32)
    FLOATS = "floats"  # a fixed number of numbers


@dataclass(frozen=True)
class Field:
    """One index column taken from one top-level element."""

    column: str
    keyword: str
    kind: Kind
    count: int = 0  # FLOATS: how many values

    @property
    def tag(self) -> int:
        return _tag(self.keyword)

    @property
    def vr(self) -> str:
        return _dictionary_vr(self.keyword)


@cache
def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:  # pragma: no cover - a typo in FIELDS
        raise KeyError(keyword)
    return int(tag)


@cache
def _dictionary_vr(keyword: str) -> str:
    return str(dictionary_VR(_tag(keyword))).split(" ")[0]


T, TS, F, N, FS = Kind.TEXT, Kind.TEXTS, Kind.FLOAT, Kind.INT, Kind.FLOATS
#: The index columns read from single top-level elements, in schema order.
FIELDS: tuple[Field, ...] = (
    Field("sop_class_uid", "SOPClassUID", T),
    Field("sop_instance_uid", "SOPInstanceUID", T),
    Field("patient_id", "PatientID", T),
    Field("patient_sex", "PatientSex", T),
    Field("patient_age", "PatientAge", T),
    Field("study_uid", "StudyInstanceUID", T),
    Field("study_date", "StudyDate", T),
    Field("study_time", "StudyTime", T),
    Field("study_description", "StudyDescription", T),
    Field("series_uid", "SeriesInstanceUID", T),
    Field("series_number", "SeriesNumber", N),
    Field("series_date", "SeriesDate", T),
    Field("series_time", "SeriesTime", T),
    Field("series_description", "SeriesDescription", T),
    Field("frame_of_reference_uid", "FrameOfReferenceUID", T),
    Field("modality", "Modality", T),
    Field("body_part_examined", "BodyPartExamined", T),
    Field("patient_position", "PatientPosition", T),
    Field("image_type", "ImageType", TS),
    Field("acquisition_number", "AcquisitionNumber", N),
    Field("acquisition_date", "AcquisitionDate", T),
    Field("acquisition_time", "AcquisitionTime", T),
    Field("content_date", "ContentDate", T),
    Field("instance_number", "InstanceNumber", N),
    Field("temporal_position_identifier", "TemporalPositionIdentifier", N),
    Field("number_of_frames", "NumberOfFrames", N),
    Field("institution", "InstitutionName", T),
    Field("station_name", "StationName", T),
    Field("manufacturer", "Manufacturer", T),
    Field("manufacturer_model", "ManufacturerModelName", T),
    Field("device_serial_number", "DeviceSerialNumber", T),
    Field("software_versions", "SoftwareVersions", T),
    Field("convolution_kernel", "ConvolutionKernel", T),
    Field("kvp", "KVP", F),
    Field("exposure", "Exposure", F),
    Field("exposure_time", "ExposureTime", F),
    Field("tube_current", "XRayTubeCurrent", F),
    Field("contrast_agent", "ContrastBolusAgent", T),
    Field("slice_thickness", "SliceThickness", F),
    Field("spacing_between_slices", "SpacingBetweenSlices", F),
    Field("reconstruction_diameter", "ReconstructionDiameter", F),
    Field("pixel_spacing", "PixelSpacing", FS, 2),
    Field("rows", "Rows", N),
    Field("columns", "Columns", N),
    Field("samples_per_pixel", "SamplesPerPixel", N),
    Field("photometric_interpretation", "PhotometricInterpretation", T),
    Field("bits_allocated", "BitsAllocated", N),
    Field("bits_stored", "BitsStored", N),
    Field("pixel_representation", "PixelRepresentation", N),
    Field("image_position", "ImagePositionPatient", FS, 3),
    Field("image_orientation", "ImageOrientationPatient", FS, 6),
    Field("rescale_slope", "RescaleSlope", F),
    Field("rescale_intercept", "RescaleIntercept", F),
)
del T, TS, F, N, FS

_FIELD_TAGS = tuple((f, f.tag) for f in FIELDS)
#: Top-level elements an RTSTRUCT/SEG row needs whole (sequences): Modality, Referenced Series
#: (SEG), Frame of Reference UID, Referenced Frame of Reference and Structure Set ROI sequences.
SPAN_TAGS = frozenset({0x00080060, 0x00081115, 0x00200052, 0x30060010, 0x30060020})
_FIELD_VRS = {f.keyword: f.vr for f in FIELDS}
CHARSET_TAG = 0x00080005
PIXEL_DATA_TAG = 0x7FE00010
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, PIXEL_DATA_TAG})  # float, double float, pixel data
WANTED_TAGS = frozenset({f.tag for f in FIELDS} | {CHARSET_TAG})

#: A raw element as found in the file: (VR or None when implicit, value bytes, little endian).
RawValue = tuple[str | None, bytes, bool]

_BINARY = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
_CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
_TEXT_DELIMS = {0x0D, 0x0A, 0x09, 0x0C}
_INT32 = 2**31


class _Unsupported(Exception):
    """The fast path cannot read this file plainly; pydicom decides."""


@dataclass(frozen=True)
class PixelInfo:
    """Where the pixel data element is and whether all of it is in the file."""

    tag: int
    encapsulated: bool
    length: int  # value length (defined length only; -1 when encapsulated)
    complete: bool | None  # None: not checked (the buffer did not cover the element)
    value_end: int  # offset just past the value (defined length only)


@dataclass(frozen=True)
class Header:
    """What the index needs from one file's header, before conversion to columns."""

    elements: dict[int, RawValue]
    transfer_syntax_uid: str | None
    media_sop_class_uid: str | None
    media_sop_instance_uid: str | None
    part10: bool
    pixel: PixelInfo | None
    reader: str  # "fast" or "pydicom"
    sequence_columns: dict[str, Any]  # RTSTRUCT/SEG columns read by pydicom


# -- converters ---------------------------------------------------------------


@cache
def _encodings(terms: tuple[str, ...]) -> tuple[str, ...]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuple(convert_encodings(list(terms)))


def _charset(raw: RawValue | None) -> tuple[str, ...]:
    if raw is None:
        return _encodings(())
    terms = tuple(t.strip(" \0") for t in raw[1].decode("latin-1").split("\\"))
    return _encodings(terms)


def _strings(vr: str, value: bytes, encodings: tuple[str, ...]) -> list[str]:
    if b"\\" not in value and (vr not in _CHARSET_VRS or value.isascii()) and b"\x1b" not in value:
        return [value.decode("latin-1").strip(" \0")]
    parts = value.split(b"\\")
    if vr in _CHARSET_VRS and not (value.isascii() and b"\x1b" not in value):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            texts = [decode_bytes(p, list(encodings), _TEXT_DELIMS) for p in parts]
    else:
        texts = [p.decode("latin-1") for p in parts]
    return [t.strip(" \0") for t in texts]


def _numbers(vr: str, value: bytes, little: bool, encodings: tuple[str, ...]) -> list[float]:
    code = _BINARY.get(vr)
    if code is not None:
        size = struct.calcsize(code)
        if len(value) % size:
            raise ValueError(f"{len(value)} bytes is not a multiple of {size}")
        return [float(v) for v in struct.unpack(f"{'<' if little else '>'}{len(value) // size}{code}", value)]
    texts = _strings(vr, value, encodings)
    if texts == [""]:
        return []
    return [float(t) for t in texts]


def _finish(field: Field, values: list[Any]) -> Any:
    """Column value from the element's values; ValueError when malformed."""
    kind = field.kind
    if kind in (Kind.TEXT, Kind.TEXTS):
        if not any(values):
            return None
        return "\\".join(values) if kind is Kind.TEXT else list(values)
    if not values:
        return None
    if any(not math.isfinite(v) for v in values):
        raise ValueError("not a finite number")
    if kind is Kind.FLOATS:
        if len(values) != field.count:
            raise ValueError(f"{len(values)} values, expected {field.count}")
        return list(values)
    if len(values) != 1:
        raise ValueError(f"{len(values)} values, expected 1")
    if kind is Kind.FLOAT:
        return values[0]
    if not float(values[0]).is_integer() or not -_INT32 <= values[0] < _INT32:
        raise ValueError("not an int32 integer")
    return int(values[0])


_NOT_TEXT = frozenset({*_BINARY, "SQ", "OB", "OW", "OF", "OD", "OL", "OV", "AT"})
_SINGLE_TEXT_VRS = frozenset("AE AS CS DA DS DT IS LO SH TM UI".split())
_US = {True: struct.Struct("<H"), False: struct.Struct(">H")}
_TEXT_KINDS = frozenset({Kind.TEXT, Kind.TEXTS})


def _convert_raw(field: Field, raw: RawValue, encodings: tuple[str, ...]) -> Any:
    vr, value, little = raw
    if vr is None or vr == "UN":
        vr = _FIELD_VRS[field.keyword]
    if not value:
        return None
    kind = field.kind
    # Fast paths for the common single-valued cases; the general path below gives the same values.
    if vr in _SINGLE_TEXT_VRS and b"\\" not in value and value.isascii() and b"\x1b" not in value:
        if kind is Kind.TEXT:
            return value.decode("ascii").strip(" \0") or None
        if kind is Kind.FLOAT or kind is Kind.INT:
            text = value.decode("ascii").strip(" \0")
            return _finish(field, [float(text)] if text else [])
    elif vr == "US" and len(value) == 2 and kind is Kind.INT:
        return _US[little].unpack(value)[0]
    if kind in _TEXT_KINDS:
        if vr in _NOT_TEXT:
            raise ValueError(f"VR {vr} is not text")
        return _finish(field, _strings(vr, value, encodings))
    if vr in _NOT_TEXT and vr not in _BINARY:
        raise ValueError(f"VR {vr} is not a number")
    return _finish(field, _numbers(vr, value, little, encodings))


def _convert_value(field: Field, value: Any) -> Any:
    """Column value from an element pydicom has already converted."""
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    items = [v for v in items if v is not None]
    if field.kind in (Kind.TEXT, Kind.TEXTS):
        return _finish(field, [str(v).strip(" \0") for v in items])
    numbers = [float(v) for v in items if not (isinstance(v, str) and not v.strip())]
    return _finish(field, numbers)


def columns_from_elements(get: Callable[[int], Any]) -> tuple[dict[str, Any], list[str]]:
    """(columns, keywords of malformed elements) from ``get(tag)``.

    ``get`` returns a :data:`RawValue`, an already converted Python value, or
    None when the element is absent.
    """
    charset = get(CHARSET_TAG)
    raw_charset = charset is None or isinstance(charset, tuple)
    encodings = _charset(charset) if raw_charset else _value_charset(charset)
    out: dict[str, Any] = {}
    invalid: list[str] = []
    for field, tag in _FIELD_TAGS:
        item = get(tag)
        if item is None:
            out[field.column] = None
            continue
        try:
            if isinstance(item, tuple):
                out[field.column] = _convert_raw(field, item, encodings)
            else:
                out[field.column] = _convert_value(field, item)
        except (ValueError, TypeError, UnicodeError, LookupError, struct.error, OverflowError):
            out[field.column] = None
            invalid.append(field.keyword)
    spacing = out.pop("pixel_spacing")
    out["pixel_spacing_row"], out["pixel_spacing_col"] = spacing if spacing else (None, None)
    return out, invalid


def _value_charset(value: Any) -> tuple[str, ...]:
    terms = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return _encodings(tuple(str(t).strip(" \0") for t in terms if t is not None))


# -- the fast path ------------------------------------------------------------

_ITEM, _ITEM_END, _SEQ_END, _UNDEFINED = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD, 0xFFFFFFFF
_LONG_VRS = frozenset(
    v.encode() for v in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV")
)
_SHORT_VRS = frozenset(
    v.encode() for v in ("AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US").split()
)
_VRS = _LONG_VRS | _SHORT_VRS
_H = {True: struct.Struct("<H"), False: struct.Struct(">H")}
_I = {True: struct.Struct("<I"), False: struct.Struct(">I")}
_HH = {True: struct.Struct("<HH"), False: struct.Struct(">HH")}
_HHI = {True: struct.Struct("<HHI"), False: struct.Struct(">HHI")}
_MAX_DEPTH = 32


class _Truncated(Exception):
    """The buffer ends inside an element (at ``tag``)."""

    def __init__(self, tag: int) -> None:
        self.tag = tag
        super().__init__(f"({tag >> 16:04X},{tag & 0xFFFF:04X})")


def _element_header(buf: bytes, pos: int, implicit: bool, little: bool) -> tuple[int, str | None, int, int]:
    """(tag, VR, value length, value start) of the element at ``pos``."""
    n = len(buf)
    if pos + 8 > n:
        raise _Truncated(0)
    group, elem = _HH[little].unpack_from(buf, pos)
    tag = group << 16 | elem
    if implicit or group == 0xFFFE:
        return tag, None, _I[little].unpack_from(buf, pos + 4)[0], pos + 8
    vr = buf[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        if pos + 12 > n:
            raise _Truncated(tag)
        return tag, vr.decode(), _I[little].unpack_from(buf, pos + 8)[0], pos + 12
    if vr in _SHORT_VRS:
        return tag, vr.decode(), _H[little].unpack_from(buf, pos + 6)[0], pos + 8
    raise _Unsupported(f"unknown VR {vr!r} in ({group:04X},{elem:04X})")


def _skip_sequence(buf: bytes, pos: int, implicit: bool, little: bool, depth: int) -> int:
    """Offset just past an undefined-length sequence whose first item starts at ``pos``.

    Iterative (a stack of open sequences and items) and inlined: structure sets
    hold tens of thousands of nested elements, all skipped here.
    """
    n = len(buf)
    # Each stack entry: (in an item?, implicit VR, little endian).
    stack: list[tuple[bool, bool, bool]] = [(False, implicit, little)]
    long_vrs, short_vrs = _LONG_VRS, _SHORT_VRS
    while stack:
        in_item, imp, lit = stack[-1]
        if pos + 8 > n:
            raise _Truncated(_ITEM)
        group, elem, length = _HHI[lit].unpack_from(buf, pos)
        tag = group << 16 | elem
        if not in_item:
            if tag == _SEQ_END:
                stack.pop()
                pos += 8
            elif tag != _ITEM:
                raise _Unsupported(f"({group:04X},{elem:04X}) where a sequence item was expected")
            elif length == _UNDEFINED:
                stack.append((True, imp, lit))
                pos += 8
            else:
                pos += 8 + length
                if pos > n:
                    raise _Truncated(_ITEM)
            continue
        if tag == _ITEM_END:
            stack.pop()
            pos += 8
            continue
        vr = b""
        start = pos + 8
        if not imp and group != 0xFFFE:
            vr = buf[pos + 4 : pos + 6]
            if vr in long_vrs:
                if pos + 12 > n:
                    raise _Truncated(tag)
                length = _I[lit].unpack_from(buf, pos + 8)[0]
                start = pos + 12
            elif vr in short_vrs:
                length = _H[lit].unpack_from(buf, pos + 6)[0]
            else:
                raise _Unsupported(f"unknown VR {vr!r} in ({group:04X},{elem:04X})")
        if length == _UNDEFINED:
            if vr not in (b"", b"SQ", b"UN"):
                raise _Unsupported(f"undefined length with VR {vr!r}")
            if len(stack) + depth > 2 * _MAX_DEPTH:
                raise _Unsupported("sequences nested too deeply")
            stack.append((False, imp or vr == b"UN", lit or vr == b"UN"))
            pos = start
        else:
            pos = start + length
            if pos > n:
                raise _Truncated(tag)
    return pos


def _pixel_info(buf: bytes, tag: int, length: int, start: int, little: bool, size: int) -> PixelInfo:
    if length != _UNDEFINED:
        end = start + length
        return PixelInfo(tag, False, length, end <= size, end)
    pos, n = start, len(buf)
    while True:  # basic offset table and fragments, each a defined-length item
        if pos + 8 > n:
            return PixelInfo(tag, True, -1, False if n >= size else None, -1)
        group, elem, item_length = _HHI[little].unpack_from(buf, pos)
        item = group << 16 | elem
        if item == _SEQ_END:
            return PixelInfo(tag, True, -1, True, pos + 8)
        if item != _ITEM or item_length == _UNDEFINED:
            raise _Unsupported("malformed encapsulated pixel data")
        pos += 8 + item_length


def _walk(
    buf: bytes, pos: int, implicit: bool, little: bool, size: int, spans: dict[int, tuple[int, int]]
) -> tuple[dict[int, RawValue], PixelInfo | None]:
    """Top-level elements from ``pos`` up to the pixel data: the wanted ones, raw.

    ``spans`` receives (start, end) of the whole elements in :data:`SPAN_TAGS`.
    """
    found: dict[int, RawValue] = {}
    n = len(buf)
    first = True
    while pos < n:
        if first and implicit and pos + 6 <= n and buf[pos + 4 : pos + 6] in _VRS:
            raise _Unsupported("implicit VR announced but the data look explicit")
        first = False
        element = pos
        tag, vr, length, start = _element_header(buf, pos, implicit, little)
        if tag in _PIXEL_TAGS:
            return found, _pixel_info(buf, tag, length, start, little, size)
        if tag >> 16 == 0xFFFE:
            raise _Unsupported("item or delimiter at the top level")
        if length == _UNDEFINED:
            if vr not in (None, "SQ", "UN"):
                raise _Unsupported(f"undefined length with VR {vr}")
            pos = _skip_sequence(buf, start, implicit or vr == "UN", little or vr == "UN", 1)
        else:
            pos = start + length
            if pos > n:
                raise _Truncated(tag)
            if tag in WANTED_TAGS:
                found[tag] = (vr, bytes(buf[start:pos]), little)
        if tag in SPAN_TAGS:
            spans[tag] = (element, pos)
    return found, None


def _meta(buf: bytes) -> tuple[dict[int, bytes], int]:
    """File meta elements (group 0002, explicit VR little endian) after the preamble."""
    meta: dict[int, bytes] = {}
    pos, n = 132, len(buf)
    while pos + 8 <= n and buf[pos : pos + 2] == b"\x02\x00":
        tag, _, length, start = _element_header(buf, pos, False, True)
        if length == _UNDEFINED:
            raise _Unsupported("undefined length in the file meta")
        pos = start + length
        if pos > n:
            raise _Truncated(tag)
        meta[tag] = bytes(buf[start:pos])
    return meta, pos


def _uid(value: bytes | None) -> str | None:
    text = value.decode("latin-1").strip(" \0") if value else ""
    return text or None


def parse_fast(buf: bytes, size: int) -> Header:
    """Header of a Part 10 file from its bytes (all of them, or its first ``len(buf)`` of ``size``).

    Raises ``_Unsupported`` for what pydicom must read, ``_Truncated`` when
    ``buf`` ends inside the header.
    """
    meta, pos = _meta(buf)
    ts = _uid(meta.get(0x00020010))
    if ts is None:
        raise _Unsupported("no transfer syntax in the file meta")
    if ts == dicom_uid.DeflatedExplicitVRLittleEndian:
        raise _Unsupported("deflated data set")
    implicit = ts == dicom_uid.ImplicitVRLittleEndian
    little = ts != dicom_uid.ExplicitVRBigEndian
    spans: dict[int, tuple[int, int]] = {}
    found, pixel = _walk(buf, pos, implicit, little, size, spans)
    sop_class, sop_instance = _uid(meta.get(0x00020002)), _uid(meta.get(0x00020003))
    header = Header(found, ts, sop_class, sop_instance, True, pixel, "fast", {})
    modality = _modality(header)
    if modality in SEQUENCE_MODALITIES:
        # pydicom reads only the sequences the columns need: file meta + those elements, in tag order
        small = buf[:pos] + b"".join(buf[a:b] for _, (a, b) in sorted(spans.items()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(BytesIO(small))
                columns = _sequence_columns(ds)
            except Exception as exc:  # let the whole-file pydicom path decide
                raise _Unsupported(f"sequences unreadable alone: {exc}") from exc
        header = dataclasses.replace(header, sequence_columns=columns)
    return header


# -- the pydicom path ---------------------------------------------------------

_ENCODING_UIDS = {
    (True, True): dicom_uid.ImplicitVRLittleEndian,
    (False, True): dicom_uid.ExplicitVRLittleEndian,
    (False, False): dicom_uid.ExplicitVRBigEndian,
}


def _element_raw(ds: pydicom.Dataset, tag: int) -> RawValue | Any:
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if isinstance(elem, RawDataElement):
        if elem.value is None:  # deferred: far too large for any column
            return ("OB", b"\0", True)
        return (elem.VR, bytes(elem.value), bool(elem.is_little_endian))
    return elem.value


def parse_pydicom(source: bytes | BinaryIO, size: int, *, part10: bool) -> Header:
    """Header read by pydicom (``force`` for raw data sets without file meta)."""
    fp = BytesIO(source) if isinstance(source, bytes | bytearray | memoryview) else source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(fp, force=not part10, defer_size=DEFER_SIZE)
        found = {tag: _element_raw(ds, tag) for tag in WANTED_TAGS}
        meta = getattr(ds, "file_meta", None)
        ts = _text_or_none(meta.get("TransferSyntaxUID") if meta is not None else None)
        if ts is None:
            implicit, little = ds.original_encoding
            if implicit is not None and little is not None:
                ts = str(_ENCODING_UIDS.get((bool(implicit), bool(little)), "")) or None
        sequence_columns = _sequence_columns(ds)
        pixel = _pydicom_pixel(ds, size, deflated=ts == dicom_uid.DeflatedExplicitVRLittleEndian)
        return Header(
            {t: v for t, v in found.items() if v is not None},
            ts,
            _text_or_none(meta.get("MediaStorageSOPClassUID") if meta is not None else None),
            _text_or_none(meta.get("MediaStorageSOPInstanceUID") if meta is not None else None),
            part10,
            pixel,
            "pydicom",
            sequence_columns,
        )


def _text_or_none(value: Any) -> str | None:
    text = "" if value is None else str(value).strip(" \0")
    return text or None


def _pydicom_pixel(ds: pydicom.Dataset, size: int, *, deflated: bool) -> PixelInfo | None:
    for tag in sorted(_PIXEL_TAGS):
        elem = ds.get_item(tag)
        if elem is None:
            continue
        if isinstance(elem, RawDataElement):
            length, tell = int(elem.length), elem.value_tell
        else:
            value = elem.value
            length = _UNDEFINED if elem.is_undefined_length else len(value) if value is not None else 0
            tell = None
        if length == _UNDEFINED:
            return PixelInfo(tag, True, -1, None, -1)
        if isinstance(tell, int) and not deflated:
            return PixelInfo(tag, False, length, tell + length <= size, tell + length)
        return PixelInfo(tag, False, length, None, -1)
    return None


def _sequence_columns(ds: pydicom.Dataset) -> dict[str, Any]:
    modality = ds.get("Modality")
    if modality not in SEQUENCE_MODALITIES:
        return {}
    return {
        "referenced_series_uids": _referenced_series(ds),
        "roi_names": _roi_names(ds) if modality == "RTSTRUCT" else None,
        "frame_of_reference_uid": _frame_of_reference(ds),
    }


def _referenced_series(ds: pydicom.Dataset) -> list[str]:
    uids: list[str] = []
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []) or []:
        for study in frame.get("RTReferencedStudySequence", []) or []:
            for series in study.get("RTReferencedSeriesSequence", []) or []:
                uid = series.get("SeriesInstanceUID")
                if uid and uid not in uids:
                    uids.append(str(uid))
    for series in ds.get("ReferencedSeriesSequence", []) or []:  # DICOM-SEG
        uid = series.get("SeriesInstanceUID")
        if uid and uid not in uids:
            uids.append(str(uid))
    return uids


def _roi_names(ds: pydicom.Dataset) -> list[str]:
    return [str(roi.get("ROIName", "")) for roi in ds.get("StructureSetROISequence", []) or []]


def _frame_of_reference(ds: pydicom.Dataset) -> str | None:
    uid = _text_or_none(ds.get("FrameOfReferenceUID"))
    if uid is None:
        frames = ds.get("ReferencedFrameOfReferenceSequence", []) or []
        if frames:
            uid = _text_or_none(frames[0].get("FrameOfReferenceUID"))
    return uid


# -- header -> row ------------------------------------------------------------


def _expected_pixel_bytes(columns: dict[str, Any]) -> int | None:
    dims: list[int] = []
    for key in ("rows", "columns", "samples_per_pixel", "bits_allocated"):
        value = columns.get(key)
        if value is None or value <= 0:
            return None
        dims.append(int(value))
    rows, cols, samples, bits = dims
    frames = max(int(columns.get("number_of_frames") or 1), 1)
    if columns.get("photometric_interpretation") == "YBR_FULL_422":  # two chroma samples per two pixels
        return (rows * cols * 2 * frames * bits + 7) // 8
    return (rows * cols * samples * frames * bits + 7) // 8


def row_from_header(header: Header, *, path: str) -> dict[str, Any]:
    """The index columns of one file (without path, size, mtime and hash).

    Raises :class:`DicomReadError` when the file is not an instance the index
    can hold: a DICOMDIR, no SOP Instance or Series UID, pixel data cut short.
    """
    if header.media_sop_class_uid == MEDIA_DIRECTORY_SOP_CLASS:
        raise DicomReadError("DICOMDIR (a media directory), not an instance", subject=path)
    columns, invalid = columns_from_elements(header.elements.get)
    columns["referenced_series_uids"] = columns["roi_names"] = None
    columns.update(header.sequence_columns)
    columns["sop_class_uid"] = columns["sop_class_uid"] or header.media_sop_class_uid
    columns["sop_instance_uid"] = columns["sop_instance_uid"] or header.media_sop_instance_uid
    if not columns["sop_instance_uid"] or not columns["series_uid"]:
        raise DicomReadError("header lacks SOPInstanceUID or SeriesInstanceUID", subject=path)
    pixel = header.pixel
    if pixel is not None and pixel.complete is False:
        raise DicomReadError("truncated: the file ends inside the pixel data", subject=path)
    if pixel is not None and pixel.tag == PIXEL_DATA_TAG and not pixel.encapsulated:
        expected = _expected_pixel_bytes(columns)
        if expected is not None and pixel.length < expected:
            raise DicomReadError(
                f"pixel data shorter than Rows x Columns x Samples x Frames x BitsAllocated "
                f"({pixel.length} < {expected} bytes)",
                subject=path,
            )
    columns["transfer_syntax_uid"] = header.transfer_syntax_uid
    columns["part10"] = header.part10
    has_pixels = pixel is not None and (pixel.encapsulated or pixel.length > 0)  # some write it empty
    columns["has_pixel_data"] = has_pixels
    columns["pixel_decodable"] = can_decode(header.transfer_syntax_uid) if has_pixels else None
    columns["invalid_tags"] = invalid or None
    return columns


def header_columns(data: bytes, *, size: int, part10: bool, path: str) -> tuple[dict[str, Any], str]:
    """(columns, reader) for the bytes of one file, fast path first, then pydicom.

    ``data`` is the whole file, or its beginning when ``len(data) < size`` (then
    a header longer than ``data`` raises :class:`NeedWholeFile`).
    """
    header: Header | None = None
    if part10:
        try:
            header = parse_fast(data, size)
        except _Unsupported:
            header = None
        except _Truncated as exc:
            if len(data) < size:
                raise NeedWholeFile() from exc
            reason = f"truncated: the file ends inside header element {exc}"
            raise DicomReadError(reason, subject=path) from exc
    if header is None:
        if len(data) < size:
            raise NeedWholeFile()
        header = read_with_pydicom(data, size, part10=part10, path=path)
    return row_from_header(header, path=path), header.reader


def read_with_pydicom(source: bytes | BinaryIO, size: int, *, part10: bool, path: str) -> Header:
    """:func:`parse_pydicom`, with any failure turned into a :class:`DicomReadError`."""
    try:
        return parse_pydicom(source, size, part10=part10)
    except Exception as exc:  # any input may fail in any way; the reason is recorded
        raise DicomReadError(f"unreadable DICOM header: {type(exc).__name__}: {exc}", subject=path) from exc


class NeedWholeFile(Exception):
    """The header does not fit in the bytes given: read it from the whole file."""


def _modality(header: Header) -> str | None:
    raw = header.elements.get(_tag("Modality"))
    return raw[1].decode("latin-1").strip(" \0") if raw is not None else None


def is_raw_dataset_start(head: bytes, size: int) -> bool:
    """True when ``head`` starts like a data set without preamble: group 0002 or 0008 first."""
    if len(head) < 8:
        return False
    for little in (True, False):
        group = _H[little].unpack_from(head, 0)[0]
        if group not in (0x0002, 0x0008) or (not little and group == 0x0002):
            continue
        if head[4:6] in _VRS:  # explicit VR
            return True
        if little and _I[True].unpack_from(head, 4)[0] <= size - 8:  # implicit VR, plausible length
            return True
    return False
