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
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
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
) -> None:
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

    contour_images = DicomSequence()
    for uid in sop_uids:
        item = Dataset()
        item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
        item.ReferencedSOPInstanceUID = uid
        contour_images.append(item)
    series_item = Dataset()
    series_item.SeriesInstanceUID = series_uid
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
            c.ContourData = [float(v) for v in isocentre]
            contours.append(c)
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
    ds.save_as(path, enforce_file_format=True)


def read_clinical(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


__all__ = ["SCANNERS", "DemoArchive", "PatientTruth", "Scanner", "read_clinical", "write_demo_archive"]
