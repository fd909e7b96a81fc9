"""Export a curated cohort: de-identified DICOM and/or NIfTI volumes with their ROI masks.

Everything written under the output root is named by pseudonyms and remapped
UIDs only (:mod:`cohort.curate.deid`); the pseudonym map and the list of source
files go to a separate folder, never under the output root::

    <out>/dicom/<pseudonym>/<study>/<MODALITY>_<series>/<sop>.dcm   (de-identified)
    <out>/nifti/<pseudonym>/<series>/image.nii.gz                    (HU, LPS geometry kept)
    <out>/nifti/<pseudonym>/<series>/<ROI>.nii.gz                    (uint8 masks)
    <map>/pseudonyms.csv, <map>/export-files.parquet                 (re-identification keys)
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cohort.curate.convert import write_mask, write_volume
from cohort.curate.deid import (
    DeidSettings,
    ExportFailure,
    ExportResult,
    PseudonymEntry,
    date_shift_days,
    export_deidentified,
    pseudonym_for,
    remap_uid,
    write_pseudonym_map,
)
from cohort.curate.rtstruct import rasterise_rtstruct, read_roi_infos
from cohort.curate.select import WorkItem
from cohort.curate.series import assemble_series
from cohort.errors import DeidentificationError
from cohort.index.source import read_dicom
from cohort.store.parquet import write_table_atomic

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class CohortExport:
    dicom: ExportResult | None
    volumes_written: int
    volume_failures: tuple[ExportFailure, ...]

    @property
    def failures(self) -> tuple[ExportFailure, ...]:
        return (*(self.dicom.failures if self.dicom else ()), *self.volume_failures)


def _safe_name(name: str) -> str:
    """An ROI name as a file name: kept when harmless, else a hash (never raw text in a path)."""
    return name if _SAFE_NAME.fullmatch(name) else "roi-" + hashlib.sha256(name.encode()).hexdigest()[:12]


def export_cohort(
    items: Sequence[WorkItem],
    out_root: str | Path,
    settings: DeidSettings,
    *,
    map_dir: str | Path,
    dicom: bool = True,
    volumes: bool = False,
) -> CohortExport:
    """Export the selected cases (images + their RTSTRUCT) de-identified, as DICOM and/or NIfTI.

    One case that cannot be read or written is recorded in the failures with its
    reason; the others are exported. The pseudonym map is merged into
    ``<map_dir>/pseudonyms.csv`` (one exporter at a time per map folder).
    """
    root = Path(out_root)
    if Path(map_dir).resolve().is_relative_to(root.resolve()):
        raise DeidentificationError(
            "the pseudonym map must be stored apart from the exported data: give a map folder outside it",
            subject=str(map_dir),
        )
    result = None
    if dicom:
        paths = sorted({p for item in items for p in (*item.image_paths, item.rtstruct_path) if p})
        result = export_deidentified(paths, root / "dicom", settings)
        write_table_atomic(result.to_table(), Path(map_dir) / "export-files.parquet")  # source paths: keys
    written, failures = 0, []
    if volumes:
        for item in items:
            try:
                written += _write_case_volumes(item, root / "nifti", settings)
            except Exception as exc:  # one case never stops the export: recorded with its reason
                failures.append(ExportFailure(item.series_uid, f"{type(exc).__name__}: {exc}"))
    patients = sorted({item.patient_id for item in items})
    entries = tuple(
        PseudonymEntry(p, pseudonym_for(p, settings), date_shift_days(p, settings)) for p in patients
    )
    write_pseudonym_map(ExportResult((), (), entries), map_dir)
    return CohortExport(result, written, tuple(failures))


def _write_case_volumes(item: WorkItem, root: Path, settings: DeidSettings) -> int:
    """The case's image and one mask per ROI, under pseudonymised names."""
    folder = root / pseudonym_for(item.patient_id, settings) / remap_uid(item.dicom_series_uid, settings)
    volume = assemble_series(item.image_paths, series_uid=item.series_uid, policy=item.read_policy)
    write_volume(volume.image, folder / "image.nii.gz")
    structure_set = read_dicom(item.rtstruct_path)
    numbers = {info.name: info.number for info in read_roi_infos(structure_set)}
    for roi in item.rois:
        rasterised = rasterise_rtstruct(structure_set, numbers[roi.source_name], volume.image)
        write_mask(rasterised.mask, folder / f"{_safe_name(roi.canonical)}.nii.gz")
    return 1 + len(item.rois)
