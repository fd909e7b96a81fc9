"""The committed demo model: it loads through the registry checks, says what it is, and segments
held-out synthetic phantoms (a seed it was not trained or validated on) through the whole pipeline."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from cohort.curate.rtstruct import rasterise_rtstruct, read_roi_infos
from cohort.curate.series import read_series
from cohort.segment.measure import measure_mask
from cohort.segment.metrics import dice
from cohort.segment.model import default_registry, load_model
from cohort.segment.pipeline import segment_case
from cohort.segment.runtime import BackendKind, BackendOptions, Device, TorchBackend, get_session
from cohort.synth.archive import DemoArchive, PatientTruth, write_demo_archive

MODEL = "demo-lung-gtv"
HELD_OUT_SEED = 4242  # training used seeds 0 and 128/256-offset ones; the script's evaluation 1000 and 2000


def test_demo_model_loads_and_states_what_it_is() -> None:
    spec = load_model(MODEL)
    assert spec.directory == default_registry() / MODEL
    assert spec.onnx_path.stat().st_size <= 5 * 2**20
    manifest = spec.manifest
    assert "synthetic" in manifest.training_data.lower() and "no patient data" in manifest.training_data
    assert "not for clinical use" in manifest.intended_use.lower()
    assert [s.step for s in manifest.preprocessing] == ["isolate_lungs"]
    assert manifest.geometry.spacing_mm == (2.0, 2.0) and manifest.geometry.size == (256, 256)
    assert manifest.labels == {1: "GTV"}


def _case(archive: DemoArchive, patient: PatientTruth) -> tuple[sitk.Image, np.ndarray]:
    folder = Path(archive.root) / patient.patient_id
    image = read_series(sorted(str(p) for p in (folder / "CT").iterdir()))
    ds = pydicom.dcmread(folder / "RS" / "RS.dcm")
    number = next(r.number for r in read_roi_infos(ds) if r.name == patient.gtv_name)
    reference = sitk.GetArrayFromImage(rasterise_rtstruct(ds, number, image).mask) > 0
    return image, reference


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> DemoArchive:
    return write_demo_archive(tmp_path_factory.mktemp("held-out"), 3, seed=HELD_OUT_SEED, matrix=256)


@pytest.mark.slow
def test_held_out_phantoms_dice_and_measurements(held_out: DemoArchive) -> None:
    spec = load_model(MODEL)
    backend = get_session(spec, BackendOptions(device=Device.CPU))
    for patient in held_out.patients:
        image, reference = _case(held_out, patient)
        result = segment_case(image, spec, backend, subject=patient.patient_id)
        predicted = sitk.GetArrayViewFromImage(result.mask) == 1
        score = dice(reference, predicted)
        assert score >= 0.85, (patient.patient_id, score)
        assert result.found and result.measurements is not None
        reference_image = sitk.GetImageFromArray(reference.astype(np.uint8))
        reference_image.CopyInformation(image)
        truth = measure_mask(reference_image)
        m = result.measurements
        spacing = image.GetSpacing()
        expected_volume = int(reference.sum()) * math.prod(spacing)
        assert abs(m.volume_mm3 / expected_volume - 1) < 0.08, (m.volume_mm3, expected_volume)
        assert abs(m.volume_mm3 / patient.tumour_volume_mm3 - 1) < 0.1
        pixel_diagonal = math.hypot(spacing[0], spacing[1])
        assert abs(m.recist_mm - truth.recist_mm) <= 2 * pixel_diagonal, (m.recist_mm, truth.recist_mm)
        assert m.volumetric_recist_mm == pytest.approx((6 * m.volume_mm3 / math.pi) ** (1 / 3))
        assert result.provenance["model_name"] == MODEL


@pytest.mark.slow
@pytest.mark.skipif(not TorchBackend.is_available(), reason="torch/onnx not installed (cohort[torch])")
def test_torch_backend_gives_the_onnxruntime_mask(held_out: DemoArchive) -> None:
    spec = load_model(MODEL)
    image, _ = _case(held_out, held_out.patients[0])
    ort_mask = sitk.GetArrayFromImage(segment_case(image, spec, get_session(spec)).mask)
    torch_backend = TorchBackend(spec, BackendOptions(kind=BackendKind.TORCH, device=Device.CPU))
    torch_mask = sitk.GetArrayFromImage(segment_case(image, spec, torch_backend).mask)
    assert dice(ort_mask == 1, torch_mask == 1) >= 0.99
