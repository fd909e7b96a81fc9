"""Write a realistic synthetic thoracic CT archive: CT series + RTSTRUCT + clinical CSV.

Each patient is an analytic phantom in patient coordinates (LPS, mm): air, an
elliptic body of soft tissue, two ellipsoid lungs, a vertebral body, a couch
and an ellipsoid tumour with texture in one lung. The RTSTRUCT holds the body,
both lungs, the GTV (as closed planar polygons on every slice that cuts the
shape) and an isocentre POINT ROI, referencing the CT series. Scanner metadata
(manufacturer, model, kernel, slice thickness, pixel spacing, kVp) varies
between patients, as do ROI names, as in a real multi-site archive. Noise level
and a small HU offset depend on the scanner, so batch effects exist to be
harmonised. Survival times depend on tumour volume.

:func:`write_demo_archive` writes the small, fixed demo cohort (four scanners).
:func:`write_scale_archive` writes thousands of such patients for scale tests and
benchmarks: more scanners and kernels, a process pool, per-patient random streams
(the archive does not depend on the number of workers) and, on request, one long
series (e.g. 1,000 slices of 512 x 512) for memory measurements.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
import secrets
import struct
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"


@dataclass(frozen=True)
class Scanner:
    manufacturer: str
    model: str
    kernel: str
    slice_thickness: float
    pixel_spacing: float
    kvp: float
    institution: str
    noise_hu: float
    offset_hu: float


SCANNERS: tuple[Scanner, ...] = (
    Scanner("SIEMENS", "Biograph 40", "B19f", 3.0, 0.9765625, 120, "Site A", 12.0, 0.0),
    Scanner("GE MEDICAL SYSTEMS", "LightSpeed VCT", "STANDARD", 2.5, 0.9375, 120, "Site B", 18.0, 8.0),
    Scanner("Philips", "Brilliance 64", "B", 5.0, 1.171875, 120, "Site C", 10.0, -6.0),
    Scanner("TOSHIBA", "Aquilion", "FC13", 2.0, 0.78125, 100, "Site D", 22.0, 4.0),
)

_GTV_NAMES = ("GTV-1", "GTV1", "gtv_primary", "GTV")
_LUNG_NAMES = (("Lung L", "Lung R"), ("Lung-Left", "Lung-Right"), ("LUNG_L", "LUNG_R"))


@dataclass(frozen=True)
class PatientTruth:
    """What the generator put into one patient (for tests and the clinical CSV)."""

    patient_id: str
    scanner: Scanner
    n_slices: int
    gtv_name: str
    tumour_centre: tuple[float, float, float]
    tumour_radii: tuple[float, float, float]
    tumour_volume_mm3: float
    survival_days: int
    event: int


@dataclass(frozen=True)
class DemoArchive:
    root: Path
    clinical_csv: Path
    patients: tuple[PatientTruth, ...]


def _uid(*parts: object) -> UID:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _ellipse_polygon(cx: float, cy: float, a: float, b: float, n: int = 96) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([cx + a * np.cos(t), cy + b * np.sin(t)])


def _section(radius_z: float, dz: float) -> float:
    """Scale of an ellipsoid's cross-section at distance dz from its centre (0 if none)."""
    r = 1.0 - (dz / radius_z) ** 2
    return math.sqrt(r) if r > 0 else 0.0


def _base_dataset(meta_class: str, sop_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(meta_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta_class
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    return ds


def _patient_study(ds: Dataset, pid: str, study_uid: str, study_date: str, scanner: Scanner) -> None:
    ds.PatientName = f"Demo^{pid}"
    ds.PatientID = pid
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study_date
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = scanner.manufacturer
    ds.InstitutionName = scanner.institution


def write_demo_archive(
    root: str | Path,
    n_patients: int = 10,
    *,
    seed: int = 0,
    matrix: int = 256,
    fresh_uids: bool = False,
    scanners: Sequence[Scanner] = SCANNERS,
) -> DemoArchive:
    """Write ``n_patients`` synthetic CT + RTSTRUCT studies under ``root``.

    Layout: ``<root>/<PatientID>/CT/IM0001`` … (no file extension, as many PACS
    exports) and ``<root>/<PatientID>/RS/RS.dcm``, plus ``<root>/clinical.csv``.
    With the same seed the archive is identical, UIDs included, unless
    ``fresh_uids`` is set.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    uid_salt = int(rng.integers(1 << 62)) if fresh_uids else 0
    patients = []
    for i in range(n_patients):
        pid = f"DEMO-{i + 1:03d}"
        scanner = scanners[i % len(scanners)]
        patients.append(_write_patient(root, pid, scanner, rng, seed, uid_salt, matrix, i))
    clinical = root / "clinical.csv"
    with clinical.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["PatientID", "age", "sex", "stage", "survival_days", "event"])
        for p in patients:
            stage = "I" if p.tumour_volume_mm3 < 8e3 else "II" if p.tumour_volume_mm3 < 2e4 else "III"
            age = int(rng.integers(45, 85))
            writer.writerow(
                [p.patient_id, age, rng.choice(["male", "female"]), stage, p.survival_days, p.event]
            )
    return DemoArchive(root=root, clinical_csv=clinical, patients=tuple(patients))


def _write_patient(
    root: Path,
    pid: str,
    scanner: Scanner,
    rng: np.random.Generator,
    seed: int,
    salt: int,
    matrix: int,
    index: int,
) -> PatientTruth:
    thickness = scanner.slice_thickness
    spacing = scanner.pixel_spacing * 512 / matrix  # same field of view at any matrix
    n_slices = round(rng.uniform(150.0, 200.0) / thickness)
    scale = rng.uniform(0.85, 1.1)
    body_a, body_b = 150 * scale, 105 * scale
    lung_c = 0.5 * n_slices * thickness * 0.95
    lungs = [
        (-70 * scale, -5.0, 0.0, 52 * scale, 68 * scale, lung_c),
        (70 * scale, -5.0, 0.0, 55 * scale, 70 * scale, lung_c),
    ]
    side = int(rng.integers(2))
    lx, ly, _, la, lb, lc = lungs[side]
    r0, r1, r2 = (float(r) for r in rng.uniform(8.0, 22.0, size=3))
    radii = (r0, r1, r2)
    centre = (
        lx + rng.uniform(-0.3, 0.3) * (la - radii[0]),
        ly + rng.uniform(-0.3, 0.3) * (lb - radii[1]),
        rng.uniform(-0.3, 0.3) * (lc - radii[2]),
    )
    volume = 4.0 / 3.0 * math.pi * radii[0] * radii[1] * radii[2]

    # Survival: exponential, hazard rising with tumour volume; administrative censoring.
    hazard = 1.0 / 900.0 * math.exp(0.9 * math.log(volume / 1.0e4))
    time_to_event = rng.exponential(1.0 / hazard)
    censor = rng.uniform(365.0, 2500.0)
    survival_days, event = (int(time_to_event) + 1, 1) if time_to_event < censor else (int(censor), 0)

    study_uid = _uid(seed, salt, pid, "study")
    series_uid = _uid(seed, salt, pid, "ct-series")
    frame_uid = _uid(seed, salt, pid, "frame")
    study_date = (date(2015, 1, 1) + timedelta(days=int(rng.integers(0, 2500)))).strftime("%Y%m%d")

    half = matrix * spacing / 2
    x0, y0 = -half + spacing / 2, -half + spacing / 2
    z_positions = (np.arange(n_slices) - (n_slices - 1) / 2) * thickness
    coords = x0 + np.arange(matrix) * spacing
    yy, xx = np.meshgrid(coords, coords, indexing="ij")

    # Tumour texture: smoothed noise, fixed per patient.
    texture = ndimage.gaussian_filter(rng.normal(size=(n_slices, matrix, matrix)), sigma=(0.7, 1.5, 1.5))
    texture /= texture.std() + 1e-12

    ct_dir = root / pid / "CT"
    ct_dir.mkdir(parents=True, exist_ok=True)
    sop_uids: list[str] = []
    gtv_polys: dict[int, np.ndarray] = {}
    lung_polys: list[dict[int, np.ndarray]] = [{}, {}]
    body_polys: dict[int, np.ndarray] = {}
    for k, z in enumerate(z_positions):
        hu = np.full((matrix, matrix), -1000.0)
        body = (xx / body_a) ** 2 + (yy / body_b) ** 2 <= 1.0
        hu[body] = 40.0
        couch = (np.abs(xx) < 180) & (yy > body_b + 15) & (yy < body_b + 25)
        hu[couch] = 150.0
        spine = (xx**2 + (yy - 0.7 * body_b) ** 2) <= (18 * scale) ** 2
        hu[spine] = 450.0
        body_polys[k] = _ellipse_polygon(0.0, 0.0, body_a, body_b)
        for j, (cx, cy, _cz, a, b, c) in enumerate(lungs):
            s = _section(c, z)
            if s > 0:
                inside = ((xx - cx) / (a * s)) ** 2 + ((yy - cy) / (b * s)) ** 2 <= 1.0
                hu[inside] = -850.0
                lung_polys[j][k] = _ellipse_polygon(cx, cy, a * s, b * s)
        s = _section(radii[2], z - centre[2])
        if s > 0:
            tumour = ((xx - centre[0]) / (radii[0] * s)) ** 2 + (
                (yy - centre[1]) / (radii[1] * s)
            ) ** 2 <= 1.0
            hu[tumour] = 30.0 + 25.0 * texture[k][tumour]
            gtv_polys[k] = _ellipse_polygon(centre[0], centre[1], radii[0] * s, radii[1] * s, n=64)
        hu += scanner.offset_hu + rng.normal(0.0, scanner.noise_hu, size=hu.shape)
        stored = np.clip(np.round(hu + 1024.0), 0, 4095).astype(np.uint16)

        sop_uid = _uid(seed, salt, pid, "ct", k)
        sop_uids.append(sop_uid)
        ds = _base_dataset(CT_IMAGE_STORAGE, sop_uid)
        _patient_study(ds, pid, study_uid, study_date, scanner)
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.SeriesDescription = "THORAX"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ManufacturerModelName = scanner.model
        ds.ConvolutionKernel = scanner.kernel
        ds.KVP = scanner.kvp
        ds.XRayTubeCurrent = int(rng.integers(80, 300))
        ds.Exposure = int(rng.integers(50, 250))
        ds.SliceThickness = thickness
        ds.BodyPartExamined = "CHEST"
        ds.PatientPosition = "HFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(x0), float(y0), float(z)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceLocation = float(z)
        ds.PixelSpacing = [spacing, spacing]
        ds.Rows = matrix
        ds.Columns = matrix
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        ds.PixelData = stored.tobytes()
        ds.save_as(ct_dir / f"IM{k + 1:04d}", enforce_file_format=True)

    gtv_name = _GTV_NAMES[index % len(_GTV_NAMES)]
    lung_names = _LUNG_NAMES[index % len(_LUNG_NAMES)]
    rois: list[tuple[str, dict[int, np.ndarray] | None, tuple[int, int, int]]] = [
        ("BODY", body_polys, (0, 255, 0)),
        (lung_names[0], lung_polys[0] if lungs[0][0] > 0 else lung_polys[1], (0, 0, 255)),
        (lung_names[1], lung_polys[1] if lungs[0][0] > 0 else lung_polys[0], (0, 128, 255)),
        (gtv_name, gtv_polys, (255, 0, 0)),
        ("Isocenter 1", None, (255, 255, 0)),
    ]
    _write_rtstruct(
        root / pid / "RS" / "RS.dcm",
        pid,
        scanner,
        seed,
        salt,
        study_uid,
        study_date,
        series_uid,
        frame_uid,
        sop_uids,
        z_positions,
        rois,
        centre,
    )
    return PatientTruth(
        pid,
        scanner,
        n_slices,
        gtv_name,
        (float(centre[0]), float(centre[1]), float(centre[2])),
        radii,
        volume,
        survival_days,
        event,
    )


#: (7FE0,0010) Pixel Data.
PIXEL_DATA = Tag(0x7FE0, 0x0010)
#: Value representations whose explicit-VR header has a 4-byte length.
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"})


def _element(tag: int, vr: str, value: bytes) -> bytes:
    """One data element, explicit VR little endian, padded to even length as PS3.5 says."""
    if len(value) % 2:
        value += b"\x00" if vr == "UI" else b" "
    group, number = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, number, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr.encode(), len(value)) + value


def _item(body: bytes) -> bytes:
    """A sequence item of defined length."""
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


def _raw_sequence(tag: int, items: Sequence[bytes]) -> RawDataElement:
    """A sequence element whose items are already encoded (explicit VR little endian)."""
    value = b"".join(items)
    return RawDataElement(Tag(tag), "SQ", len(value), value, 0, False, True)


def _image_reference(sop_uid: str) -> bytes:
    return _item(
        _element(0x00081150, "UI", CT_IMAGE_STORAGE.encode()) + _element(0x00081155, "UI", sop_uid.encode())
    )


def _contour_item(sop_uid: str, points: np.ndarray) -> bytes:
    """A CLOSED_PLANAR contour on one image; coordinates as DS with 4 decimals."""
    values = points.ravel().tolist()
    text = "\\".join(["%.4f"] * len(values)) % tuple(values)
    return _item(
        _element(0x30060016, "SQ", _image_reference(sop_uid))
        + _element(0x30060042, "CS", b"CLOSED_PLANAR")
        + _element(0x30060046, "IS", str(len(points)).encode())
        + _element(0x30060050, "DS", text.encode("ascii"))
    )


def _keep_raw(ds: Dataset, character_set: str | list[str] = default_encoding) -> None:
    """Write ``ds``'s raw elements as they are (they are explicit VR little endian already).

    pydicom re-encodes a dataset (and walks its raw sequences, decoding them) unless its
    original encoding and character set equal those it writes with; ``character_set`` is the
    Python codec name(s) of the dataset's Specific Character Set (items inherit the default).
    """
    ds.set_original_encoding(False, True, character_set)


def _write_rtstruct(
    path: Path,
    pid: str,
    scanner: Scanner,
    seed: int,
    salt: int,
    study_uid: str,
    study_date: str,
    series_uid: str,
    frame_uid: str,
    sop_uids: list[str],
    z_positions: np.ndarray,
    rois: list[tuple[str, dict[int, np.ndarray] | None, tuple[int, int, int]]],
    isocentre: tuple[float, float, float],
    *,
    raw_contours: bool = False,
    strict: bool = False,
) -> None:
    """The structure set. ``raw_contours`` encodes the contour and image-reference sequences
    directly (coordinates with 4 decimals), ~15x faster than through pydicom.
    ``strict`` adds the Frame of Reference module and rounds the isocentre to a valid DS, so
    that dciodvfy finds no error (the demo archive keeps its original bytes without it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _base_dataset(RT_STRUCTURE_SET_STORAGE, _uid(seed, salt, pid, "rtstruct"))
    _patient_study(ds, pid, study_uid, study_date, scanner)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = _uid(seed, salt, pid, "rtstruct-series")
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    ds.ManufacturerModelName = "cohort.synth"
    ds.OperatorsName = ""
    ds.StructureSetLabel = "RS"
    ds.StructureSetDate = study_date
    ds.StructureSetTime = "120000"
    if strict:
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""

    contour_images = DicomSequence()
    for uid in [] if raw_contours else sop_uids:
        item = Dataset()
        item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
        item.ReferencedSOPInstanceUID = uid
        contour_images.append(item)
    series_item = Dataset()
    series_item.SeriesInstanceUID = series_uid
    if raw_contours:
        series_item[0x30060016] = _raw_sequence(0x30060016, [_image_reference(uid) for uid in sop_uids])
        _keep_raw(series_item)
    else:
        series_item.ContourImageSequence = contour_images
    study_item = Dataset()
    study_item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study_item.ReferencedSOPInstanceUID = study_uid
    study_item.RTReferencedSeriesSequence = DicomSequence([series_item])
    frame_item = Dataset()
    frame_item.FrameOfReferenceUID = frame_uid
    frame_item.RTReferencedStudySequence = DicomSequence([study_item])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_item])

    roi_seq, contour_seq, obs_seq = DicomSequence(), DicomSequence(), DicomSequence()
    for number, (name, polys, colour) in enumerate(rois, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        roi_seq.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ROIDisplayColor = list(colour)
        contours = DicomSequence()
        if polys is None:
            c = Dataset()
            c.ContourGeometricType = "POINT"
            c.NumberOfContourPoints = 1
            c.ContourData = [round(float(v), 4) if strict else float(v) for v in isocentre]
            contours.append(c)
        elif raw_contours:
            rc[0x30060040] = _raw_sequence(
                0x30060040,
                [
                    _contour_item(sop_uids[k], np.column_stack([poly, np.full(len(poly), z_positions[k])]))
                    for k, poly in sorted(polys.items())
                ],
            )
            _keep_raw(rc)
        else:
            for k, poly in sorted(polys.items()):
                c = Dataset()
                image_ref = Dataset()
                image_ref.ReferencedSOPClassUID = CT_IMAGE_STORAGE
                image_ref.ReferencedSOPInstanceUID = sop_uids[k]
                c.ContourImageSequence = DicomSequence([image_ref])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(poly)
                pts = np.column_stack([poly, np.full(len(poly), z_positions[k])])
                c.ContourData = [round(float(v), 4) for v in pts.ravel()]
                contours.append(c)
        if not (raw_contours and polys is not None):
            rc.ContourSequence = contours
        contour_seq.append(rc)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = (
            "MARKER"
            if polys is None
            else ("EXTERNAL" if name == "BODY" else "GTV" if "gtv" in name.lower() else "ORGAN")
        )
        obs.ROIInterpreter = ""
        obs_seq.append(obs)
    ds.StructureSetROISequence = roi_seq
    ds.ROIContourSequence = contour_seq
    ds.RTROIObservationsSequence = obs_seq
    if raw_contours:  # else pydicom walks (and decodes) every raw sequence looking for ambiguous VRs
        _keep_raw(ds, convert_encodings(ds.SpecificCharacterSet))
        for holder in (frame_item, study_item):
            _keep_raw(holder)
    ds.save_as(path, enforce_file_format=True)


# ------------------------------------------------------------------------------------------ scale archive

#: Scanners of the scale archive: vendors, models, kernels, slice thicknesses and sites vary, as in a
#: multi-site retrospective archive (the demo's four come first, so its scanners are a subset).
SCALE_SCANNERS: tuple[Scanner, ...] = (
    *SCANNERS,
    Scanner("SIEMENS", "SOMATOM Definition AS", "B31f", 3.0, 0.9765625, 120, "Site A", 14.0, -2.0),
    Scanner("SIEMENS", "SOMATOM Force", "Br40d", 2.0, 0.78125, 110, "Site E", 16.0, 3.0),
    Scanner("GE MEDICAL SYSTEMS", "Discovery CT750 HD", "LUNG", 1.25, 0.703125, 120, "Site B", 30.0, 6.0),
    Scanner("GE MEDICAL SYSTEMS", "Revolution CT", "BONE", 2.5, 0.9765625, 100, "Site F", 26.0, 10.0),
    Scanner("Philips", "iCT 256", "C", 3.0, 0.9765625, 120, "Site C", 11.0, -4.0),
    Scanner("Philips", "Ingenuity CT", "YA", 2.0, 0.859375, 140, "Site G", 9.0, -8.0),
    Scanner("TOSHIBA", "Aquilion ONE", "FC08", 2.0, 0.78125, 120, "Site D", 20.0, 2.0),
    Scanner("CANON MEDICAL SYSTEMS", "Aquilion Prime SP", "FC52", 3.0, 0.87890625, 120, "Site H", 24.0, -1.0),
)

#: Scanner of the long series (thin slices: 1,000 of them cover 625 mm).
LONG_SERIES_SCANNER = Scanner(
    "GE MEDICAL SYSTEMS", "Revolution CT", "STANDARD", 0.625, 0.9765625, 120, "Site F", 15.0, 2.0
)

#: Craniocaudal extent (mm) of a scale patient's CT when ``slices`` is not given, as the demo's.
SCALE_EXTENT_MM = (150.0, 200.0)
#: Largest half-height (mm) of a lung: a long series covers more than the chest.
_MAX_LUNG_HALF_HEIGHT = 130.0


@dataclass(frozen=True)
class ScaleArchive:
    """What :func:`write_scale_archive` wrote."""

    root: Path
    clinical_csv: Path
    patients: tuple[PatientTruth, ...]
    long_series: PatientTruth | None
    matrix: int
    files: int
    bytes: int

    @property
    def series(self) -> int:
        """CT series (one per patient, the long series included)."""
        return len(self.patients) + (self.long_series is not None)


@dataclass(frozen=True)
class _PatientJob:
    """Everything one worker needs to write one patient (picklable)."""

    root: Path
    patient_id: str
    index: int
    seed: int
    salt: int
    scanner: Scanner
    matrix: int
    n_slices: int | None
    gtv_name: str
    lung_names: tuple[str, str]


@dataclass(frozen=True)
class _Written:
    truth: PatientTruth
    files: int
    bytes: int


def _slice_count(slices: int | tuple[int, int] | None, rng: np.random.Generator) -> int | None:
    if slices is None:
        return None
    if isinstance(slices, int):
        return slices
    low, high = slices
    return int(rng.integers(low, high + 1))


def _span(coords: np.ndarray, low: float, high: float) -> slice:
    """Indices of the sorted grid ``coords`` inside ``[low, high]``."""
    return slice(int(np.searchsorted(coords, low)), int(np.searchsorted(coords, high, side="right")))


def _ellipse_in_box(
    coords: np.ndarray, cx: float, cy: float, a: float, b: float
) -> tuple[slice, slice, np.ndarray]:
    """The ellipse's bounding box on the (square) grid and its inside mask there."""
    rows, cols = _span(coords, cy - b, cy + b), _span(coords, cx - a, cx + a)
    yy, xx = coords[rows][:, None], coords[cols][None, :]
    return rows, cols, ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1.0


def _ct_template(
    job: _PatientJob, study_uid: str, series_uid: str, frame_uid: str, study_date: str
) -> Dataset:
    """The attributes every slice of a patient's CT shares; slices change a few in place."""
    scanner = job.scanner
    spacing = scanner.pixel_spacing * 512 / job.matrix
    ds = _base_dataset(CT_IMAGE_STORAGE, series_uid)
    _patient_study(ds, job.patient_id, study_uid, study_date, scanner)
    ds.PatientName = f"Scale^{job.patient_id}"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.SeriesDescription = "THORAX"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ManufacturerModelName = scanner.model
    ds.ConvolutionKernel = scanner.kernel
    ds.KVP = scanner.kvp
    ds.SliceThickness = scanner.slice_thickness
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [spacing, spacing]
    ds.Rows = job.matrix
    ds.Columns = job.matrix
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    return ds


#: Elements that differ between the slices of one CT series (the rest is the template's).
_SLICE_KEYWORDS = (
    "SOPInstanceUID",
    "XRayTubeCurrent",
    "Exposure",
    "InstanceNumber",
    "ImagePositionPatient",
    "SliceLocation",
    "PixelData",
)


def _encode_element(element: DataElement, encodings: str | list[str] | None) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, element, encodings)
    return bytes(fp.getvalue())


class _SliceWriter:
    """Writes the slices of one series, byte for byte what ``Dataset.save_as`` writes, ~5x faster.

    The elements every slice shares are encoded once; per slice only the file meta
    and the :data:`_SLICE_KEYWORDS` elements are encoded (with pydicom's own
    element writer), and the pieces are joined in tag order.
    """

    def __init__(self, template: Dataset) -> None:
        self.file_meta = template.file_meta
        self._head_uid = str(self.file_meta.MediaStorageSOPInstanceUID)
        self._head = self._encode_head()
        self.encodings = template.get("SpecificCharacterSet")
        varying = {int(Tag(keyword)) for keyword in _SLICE_KEYWORDS}
        self.chunks: list[bytes] = []  # constant bytes before each varying tag, and after the last
        self.order = sorted(varying)
        pending = bytearray()
        constant = sorted(int(tag) for tag in template.keys() if int(tag) not in varying)
        points = iter(self.order)
        boundary = next(points, None)
        for tag in constant:
            while boundary is not None and boundary < tag:
                self.chunks.append(bytes(pending))
                pending = bytearray()
                boundary = next(points, None)
            pending += _encode_element(template[tag], self.encodings)
        while boundary is not None:
            self.chunks.append(bytes(pending))
            pending = bytearray()
            boundary = next(points, None)
        self.chunks.append(bytes(pending))

    def _encode_head(self) -> bytes:
        """Preamble, ``DICM`` and the file meta group."""
        head = DicomBytesIO()
        head.is_little_endian, head.is_implicit_VR = True, False
        head.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(head, self.file_meta, enforce_standard=True)
        return bytes(head.getvalue())

    def write(self, path: Path, values: dict[str, object]) -> int:
        """Write one slice with ``values`` for every :data:`_SLICE_KEYWORDS`; returns bytes written."""
        uid = str(values["SOPInstanceUID"])
        if len(uid) == len(self._head_uid):  # same length: only the UID's bytes change
            head = self._head.replace(self._head_uid.encode(), uid.encode(), 1)
        else:
            self.file_meta.MediaStorageSOPInstanceUID = UID(uid)
            head = self._encode_head()
        element = Dataset()
        for keyword in _SLICE_KEYWORDS[:-1]:
            setattr(element, keyword, values[keyword])
        element.add_new(PIXEL_DATA, "OW", values["PixelData"])  # 16 bits allocated: OW
        parts = [head, self.chunks[0]]
        for tag, chunk in zip(self.order, self.chunks[1:], strict=True):
            parts.append(_encode_element(element[tag], self.encodings))
            parts.append(chunk)
        data = b"".join(parts)
        path.write_bytes(data)
        return len(data)


def _write_scale_patient(job: _PatientJob) -> _Written:
    """One patient of the scale archive: a CT series and its RTSTRUCT (see the module docstring).

    The phantom is the demo's, drawn faster: the z-invariant anatomy is computed once,
    lungs and tumour only inside their bounding boxes, and the tumour texture only
    around the tumour, so a 1,000-slice 512 x 512 series fits in a few hundred MiB.
    """
    rng = np.random.default_rng([job.seed, job.index])
    scanner, matrix = job.scanner, job.matrix
    thickness = scanner.slice_thickness
    spacing = scanner.pixel_spacing * 512 / matrix  # same field of view at any matrix
    n_slices = job.n_slices or round(rng.uniform(*SCALE_EXTENT_MM) / thickness)
    extent = n_slices * thickness
    scale = rng.uniform(0.85, 1.1)
    body_a, body_b = 150 * scale, 105 * scale
    lung_c = min(0.5 * extent * 0.95, _MAX_LUNG_HALF_HEIGHT)
    lungs = [
        (-70 * scale, -5.0, 52 * scale, 68 * scale),
        (70 * scale, -5.0, 55 * scale, 70 * scale),
    ]
    side = int(rng.integers(2))
    lx, ly, la, lb = lungs[side]
    r0, r1, r2 = (float(r) for r in rng.uniform(8.0, 22.0, size=3))
    radii = (r0, r1, min(r2, 0.45 * lung_c))
    centre = (
        float(lx + rng.uniform(-0.3, 0.3) * (la - radii[0])),
        float(ly + rng.uniform(-0.3, 0.3) * (lb - radii[1])),
        float(rng.uniform(-0.3, 0.3) * (lung_c - radii[2])),
    )
    volume = 4.0 / 3.0 * math.pi * radii[0] * radii[1] * radii[2]
    hazard = 1.0 / 900.0 * math.exp(0.9 * math.log(volume / 1.0e4))
    time_to_event = rng.exponential(1.0 / hazard)
    censor = rng.uniform(365.0, 2500.0)
    survival_days, event = (int(time_to_event) + 1, 1) if time_to_event < censor else (int(censor), 0)

    pid, seed, salt = job.patient_id, job.seed, job.salt
    study_uid = _uid(seed, salt, pid, "study")
    series_uid = _uid(seed, salt, pid, "ct-series")
    frame_uid = _uid(seed, salt, pid, "frame")
    study_date = (date(2012, 1, 1) + timedelta(days=int(rng.integers(0, 4000)))).strftime("%Y%m%d")

    half = matrix * spacing / 2
    x0 = -half + spacing / 2
    coords = x0 + np.arange(matrix) * spacing
    z_positions = (np.arange(n_slices) - (n_slices - 1) / 2) * thickness
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    anatomy = np.full((matrix, matrix), -1000.0, dtype=np.float32)
    anatomy[(xx / body_a) ** 2 + (yy / body_b) ** 2 <= 1.0] = 40.0
    anatomy[(np.abs(xx) < 180) & (yy > body_b + 15) & (yy < body_b + 25)] = 150.0
    anatomy[(xx**2 + (yy - 0.7 * body_b) ** 2) <= (18 * scale) ** 2] = 450.0
    del yy, xx

    # Tumour texture: smoothed noise in the tumour's bounding box only.
    t_slices = _span(z_positions, centre[2] - radii[2], centre[2] + radii[2])
    t_rows = _span(coords, centre[1] - radii[1], centre[1] + radii[1])
    t_cols = _span(coords, centre[0] - radii[0], centre[0] + radii[0])
    box = tuple(max(s.stop - s.start, 1) for s in (t_slices, t_rows, t_cols))
    texture = ndimage.gaussian_filter(rng.normal(size=box), sigma=(0.7, 1.5, 1.5))
    texture /= texture.std() + 1e-12

    ct_dir = job.root / pid / "CT"
    ct_dir.mkdir(parents=True, exist_ok=True)
    writer = _SliceWriter(_ct_template(job, study_uid, series_uid, frame_uid, study_date))
    sop_uids: list[str] = []
    gtv_polys: dict[int, np.ndarray] = {}
    lung_polys: list[dict[int, np.ndarray]] = [{}, {}]
    body_polys: dict[int, np.ndarray] = {}
    body_poly = _ellipse_polygon(0.0, 0.0, body_a, body_b)
    n_bytes = 0
    for k, z in enumerate(z_positions):
        hu = anatomy.copy()
        body_polys[k] = body_poly
        for j, (cx, cy, a, b) in enumerate(lungs):
            s = _section(lung_c, float(z))
            if s > 0:
                rows, cols, inside = _ellipse_in_box(coords, cx, cy, a * s, b * s)
                hu[rows, cols][inside] = -850.0
                lung_polys[j][k] = _ellipse_polygon(cx, cy, a * s, b * s)
        s = _section(radii[2], float(z) - centre[2])
        if s > 0:
            rows, cols, inside = _ellipse_in_box(coords, centre[0], centre[1], radii[0] * s, radii[1] * s)
            local = k - t_slices.start
            if 0 <= local < texture.shape[0]:
                patch = texture[local][rows.start - t_rows.start :, cols.start - t_cols.start :]
                patch = patch[: inside.shape[0], : inside.shape[1]]
                if patch.shape == inside.shape:
                    hu[rows, cols][inside] = 30.0 + 25.0 * patch[inside]
                else:
                    hu[rows, cols][inside] = 30.0
            gtv_polys[k] = _ellipse_polygon(centre[0], centre[1], radii[0] * s, radii[1] * s, n=64)
        hu += scanner.offset_hu + 1024.0
        hu += scanner.noise_hu * rng.standard_normal(hu.shape, dtype=np.float32)
        stored = np.clip(np.rint(hu), 0, 4095).astype(np.uint16)

        sop_uid = _uid(seed, salt, pid, "ct", k)
        sop_uids.append(sop_uid)
        slice_values: dict[str, object] = {
            "SOPInstanceUID": sop_uid,
            "XRayTubeCurrent": int(rng.integers(80, 300)),
            "Exposure": int(rng.integers(50, 250)),
            "InstanceNumber": k + 1,
            "ImagePositionPatient": [float(x0), float(x0), float(z)],
            "SliceLocation": float(z),
            "PixelData": stored.tobytes(),
        }
        n_bytes += writer.write(ct_dir / f"IM{k + 1:04d}", slice_values)

    left, right = (0, 1) if lungs[0][0] > 0 else (1, 0)
    rois: list[tuple[str, dict[int, np.ndarray] | None, tuple[int, int, int]]] = [
        ("BODY", body_polys, (0, 255, 0)),
        (job.lung_names[0], lung_polys[left], (0, 0, 255)),
        (job.lung_names[1], lung_polys[right], (0, 128, 255)),
        (job.gtv_name, gtv_polys, (255, 0, 0)),
        ("Isocenter 1", None, (255, 255, 0)),
    ]
    rs_path = job.root / pid / "RS" / "RS.dcm"
    _write_rtstruct(
        rs_path,
        pid,
        scanner,
        seed,
        salt,
        study_uid,
        study_date,
        series_uid,
        frame_uid,
        sop_uids,
        z_positions,
        rois,
        centre,
        raw_contours=True,
        strict=True,
    )
    truth = PatientTruth(pid, scanner, n_slices, job.gtv_name, centre, radii, volume, survival_days, event)
    return _Written(truth, n_slices + 1, n_bytes + rs_path.stat().st_size)


def default_workers() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def write_scale_archive(
    root: str | Path,
    n_patients: int,
    *,
    slices: int | tuple[int, int] | None = None,
    matrix: int = 128,
    workers: int | None = None,
    seed: int = 0,
    fresh_uids: bool = False,
    scanners: Sequence[Scanner] = SCALE_SCANNERS,
    long_series: int = 0,
    long_matrix: int = 512,
    first_patient: int = 1,
) -> ScaleArchive:
    """Write ``n_patients`` synthetic CT + RTSTRUCT studies under ``root``, in parallel.

    Each patient is a demo phantom (body, lungs, vertebra, couch, textured tumour;
    RTSTRUCT with BODY, both lungs, the GTV and a POINT) on its own scanner, cycling
    through ``scanners``, with ROI names varying as in the demo. Layout as the demo:
    ``<root>/SCALE-00001/CT/IM0001`` … and ``<root>/SCALE-00001/RS/RS.dcm``, plus
    ``<root>/clinical.csv`` (patients numbered from ``first_patient``, so that
    several archives can share one root without clashing).

    ``slices``: the number of CT slices per patient — an int, an inclusive range
    ``(low, high)`` drawn per patient, or None for a 150–200 mm craniocaudal extent
    at the scanner's slice thickness (30–160 slices with :data:`SCALE_SCANNERS`).
    ``matrix``: rows and columns (the field of view is that of 512 x 512 at the
    scanner's pixel spacing). ``workers``: processes (default: the CPUs this process
    may use; 1 writes in this process). ``fresh_uids``: new UIDs on every call (else
    UIDs follow from ``seed`` and the patient ID). ``long_series``: when > 0, one more
    patient (``SCALE-LONG``) with that many slices of ``long_matrix`` x ``long_matrix``
    on :data:`LONG_SERIES_SCANNER`, for memory measurements.

    Pixel data and geometry depend only on ``seed`` and the patient number, never on
    ``workers``.
    """
    if n_patients < 0 or long_series < 0:
        raise ValueError("n_patients and long_series must be >= 0")
    if matrix < 16 or long_matrix < 16:
        raise ValueError(f"matrix {matrix} / long_matrix {long_matrix}: at least 16 pixels are needed")
    if isinstance(slices, tuple) and not 3 <= slices[0] <= slices[1]:
        raise ValueError(f"slices {slices}: expected (low, high) with 3 <= low <= high")
    if isinstance(slices, int) and slices < 3:
        raise ValueError(f"slices {slices}: at least 3 are needed")
    if not scanners:
        raise ValueError("scanners is empty")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    salt = secrets.randbits(62) if fresh_uids else 0
    count_rng = np.random.default_rng([seed, 1 << 20])
    jobs = []
    for i in range(n_patients):
        number = first_patient + i
        jobs.append(
            _PatientJob(
                root,
                f"SCALE-{number:05d}",
                number,
                seed,
                salt,
                scanners[number % len(scanners)],
                matrix,
                _slice_count(slices, count_rng),
                _GTV_NAMES[number % len(_GTV_NAMES)],
                _LUNG_NAMES[number % len(_LUNG_NAMES)],
            )
        )
    if long_series:
        jobs.append(
            _PatientJob(
                root,
                "SCALE-LONG",
                0,
                seed,
                salt,
                LONG_SERIES_SCANNER,
                long_matrix,
                long_series,
                _GTV_NAMES[0],
                _LUNG_NAMES[0],
            )
        )
    workers = max(1, min(workers or default_workers(), len(jobs)))
    if workers == 1:
        written = [_write_scale_patient(job) for job in jobs]
    else:
        # spawn, not fork: callers (benchmarks, flows) may hold threads and sockets.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            chunk = max(1, len(jobs) // (workers * 16))
            written = list(pool.map(_write_scale_patient, jobs, chunksize=chunk))
    regular = [w.truth for w in written[:n_patients]]
    clinical = root / "clinical.csv"
    _write_clinical(clinical, regular, np.random.default_rng([seed, 1 << 21]))
    return ScaleArchive(
        root=root,
        clinical_csv=clinical,
        patients=tuple(regular),
        long_series=written[-1].truth if long_series else None,
        matrix=matrix,
        files=sum(w.files for w in written),
        bytes=sum(w.bytes for w in written),
    )


def _write_clinical(path: Path, patients: Sequence[PatientTruth], rng: np.random.Generator) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["PatientID", "age", "sex", "stage", "survival_days", "event"])
        for p in patients:
            stage = "I" if p.tumour_volume_mm3 < 8e3 else "II" if p.tumour_volume_mm3 < 2e4 else "III"
            age = int(rng.integers(45, 85))
            writer.writerow(
                [p.patient_id, age, rng.choice(["male", "female"]), stage, p.survival_days, p.event]
            )


def read_clinical(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


__all__ = [
    "LONG_SERIES_SCANNER",
    "SCALE_SCANNERS",
    "SCANNERS",
    "DemoArchive",
    "PatientTruth",
    "ScaleArchive",
    "Scanner",
    "read_clinical",
    "write_demo_archive",
    "write_scale_archive",
]
