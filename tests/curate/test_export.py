"""`cohort export`: de-identified DICOM and NIfTI of the selected cases, nothing identifying in the output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from cohort.cli import main
from cohort.synth.archive import write_demo_archive

pytestmark = pytest.mark.slow


def test_export_writes_pseudonymised_dicom_and_nifti_and_keeps_the_map_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = write_demo_archive(tmp_path / "archive", 2, seed=4, matrix=64)
    spec = tmp_path / "cohort.yaml"
    spec.write_text(yaml.safe_dump({"archive": str(archive.root), "store": str(tmp_path / "store")}))
    out, keys = tmp_path / "export", tmp_path / "keys"
    monkeypatch.delenv("COHORT_DEID_SECRET", raising=False)
    assert main(["export", str(spec), "--out", str(out), "--map-dir", str(keys)]) == 2  # no key: refused
    monkeypatch.setenv("COHORT_DEID_SECRET", "0123456789abcdef0123456789abcdef")
    assert main(["export", str(spec), "--out", str(out), "--map-dir", str(out / "keys")]) == 2  # map inside
    assert main(["export", str(spec), "--out", str(out), "--map-dir", str(keys), "--format", "both"]) == 0

    sources = [p for p in archive.root.rglob("*") if p.is_file() and p.name != "clinical.csv"]
    dicom = sorted((out / "dicom").rglob("*.dcm"))
    assert len(dicom) == len(sources)  # every CT slice and both structure sets
    images = sorted((out / "nifti").rglob("image.nii.gz"))
    masks = sorted((out / "nifti").rglob("GTV.nii.gz"))
    assert len(images) == len(masks) == 2
    for mask_path in masks:
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path)))
        image = sitk.ReadImage(str(mask_path.with_name("image.nii.gz")))
        assert mask.shape == sitk.GetArrayFromImage(image).shape and 0 < int(np.sum(mask)) < mask.size

    patient_ids = [p.patient_id for p in archive.patients]
    names = [str(p.relative_to(out)) for p in out.rglob("*")]
    assert not any(pid in name for pid in patient_ids for name in names)
    for path in [*dicom[:5], *images]:
        assert not any(pid.encode() in path.read_bytes() for pid in patient_ids)
    pseudonyms = pd.read_csv(keys / "pseudonyms.csv")
    assert sorted(pseudonyms["original_patient_id"]) == sorted(patient_ids)
    assert {p.name for p in (out / "nifti").iterdir()} == set(pseudonyms["pseudonym"])
