"""Segmentation CPU benchmark: lung isolation per case, and metrics on the union box vs the whole volume.

On the two real NSCLC planning CTs (LUNG1-001, LUNG1-002) it

* times :func:`cohort.segment.lung.isolate_lungs` per case (best of ``--repeat``)
  and scores it: Dice of the lung mask before mirroring and margin (``lungs``)
  and of the mirrored mask (``mirrored``, the mask before the safety margin)
  against the union of the RTSTRUCT ROIs ``Lung L`` and ``Lung R``, the share of
  ``GTV-1`` voxels inside the final mask, and the final mask's volume relative
  to the reference lungs;
* times :func:`cohort.segment.metrics.segmentation_metrics` of ``GTV-1`` against a
  perturbed copy (shifted by (1, 2, −2) voxels in z, y, x and dilated by one
  voxel), on the union bounding box (the default) and on the whole volume
  (``crop=False``), and checks that both give the same numbers.

The seed's lung isolation took ~6.4 s per case (its own report, not measured here).

Run: ``.venv/bin/python benchmarks/bench_segment_cpu.py [--repeat N]``. ``COHORT_DATA``
may point at the ``data`` folder that holds ``nsclc-radiomics/``. Results also go
to ``benchmarks/results/segment_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from scipy import ndimage as ndi

from cohort.curate.rtstruct import rasterise_rtstruct, read_roi_infos
from cohort.curate.series import read_series
from cohort.segment.lung import isolate_lungs
from cohort.segment.metrics import dice, segmentation_metrics

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "segment_cpu.json"
CASES = {"LUNG1-001": "LUNG1-001_20180209_CT.tar.xz", "LUNG1-002": "LUNG1-002_20180526_CT.tar.xz"}
ROIS = ("Lung L", "Lung R", "GTV-1")
SEED_SECONDS = 6.4
PERTURB_SHIFT = (1, 2, -2)


@dataclass(frozen=True)
class CaseResult:
    case: str
    slices: int
    load_s: float
    isolate_s: float
    isolate_cpu_s: float
    dice_lungs: float
    dice_mirrored: float
    gtv_inside: float
    mask_over_reference: float
    metrics_box_ms: float
    metrics_full_ms: float
    metrics_equal: bool
    gtv_dice: float
    gtv_hd95_mm: float
    gtv_surface_dice: float
    gtv_apl_mm: float


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Best wall-clock and best CPU seconds (this process, all threads) over ``repeat`` runs."""
    best, best_cpu, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return best, best_cpu, result


def load_case(folder: Path) -> tuple[sitk.Image, dict[str, np.ndarray]]:
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in folder.iterdir()}
    ct = read_series([str(p) for p, h in headers.items() if h.Modality == "CT"])
    rs = pydicom.dcmread(next(p for p, h in headers.items() if h.Modality == "RTSTRUCT"))
    numbers = {r.name: r.number for r in read_roi_infos(rs)}
    masks = {
        name: sitk.GetArrayFromImage(rasterise_rtstruct(rs, numbers[name], ct).mask).astype(bool)
        for name in ROIS
    }
    return ct, masks


def run_case(name: str, folder: Path, repeat: int) -> CaseResult:
    start = time.perf_counter()
    ct, masks = load_case(folder)
    load_s = time.perf_counter() - start
    isolate_s, isolate_cpu_s, isolation = best_of(repeat, lambda: isolate_lungs(ct))
    reference = masks["Lung L"] | masks["Lung R"]
    lungs = sitk.GetArrayViewFromImage(isolation.lungs).astype(bool)
    mirrored = sitk.GetArrayViewFromImage(isolation.mirrored).astype(bool)
    mask = sitk.GetArrayViewFromImage(isolation.mask).astype(bool)
    gtv = masks["GTV-1"]

    perturbed = ndi.binary_dilation(np.roll(gtv, PERTURB_SHIFT, axis=(0, 1, 2)))
    sx, sy, sz = ct.GetSpacing()
    spacing = (sz, sy, sx)
    box_s, _, box = best_of(repeat, lambda: segmentation_metrics(gtv, perturbed, spacing))
    full_s, _, full = best_of(repeat, lambda: segmentation_metrics(gtv, perturbed, spacing, crop=False))
    return CaseResult(
        case=name,
        slices=ct.GetSize()[2],
        load_s=load_s,
        isolate_s=isolate_s,
        isolate_cpu_s=isolate_cpu_s,
        dice_lungs=dice(lungs, reference),
        dice_mirrored=dice(mirrored, reference),
        gtv_inside=float(np.count_nonzero(gtv & mask) / np.count_nonzero(gtv)),
        mask_over_reference=float(np.count_nonzero(mask) / np.count_nonzero(reference)),
        metrics_box_ms=1000 * box_s,
        metrics_full_ms=1000 * full_s,
        metrics_equal=box == full,
        gtv_dice=box.dice,
        gtv_hd95_mm=box.hd95_mm,
        gtv_surface_dice=box.surface_dice,
        gtv_apl_mm=box.apl_mm,
    )


def print_table(results: list[CaseResult], repeat: int) -> None:
    print(
        f"lung isolation (best of {repeat}; wall seconds, and CPU seconds of all threads; "
        f"seed ~{SEED_SECONDS} s per case, its own report)"
    )
    header = (
        f"{'case':<10} {'slices':>6} {'load s':>7} {'isolate s':>9} {'CPU s':>6} {'vs seed':>8} "
        f"{'Dice lungs':>10} {'Dice mirrored':>13} {'GTV inside':>10} {'mask/ref vol':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.case:<10} {r.slices:>6} {r.load_s:>7.2f} {r.isolate_s:>9.2f} {r.isolate_cpu_s:>6.2f} "
            f"{SEED_SECONDS / r.isolate_s:>7.2f}x {r.dice_lungs:>10.4f} {r.dice_mirrored:>13.4f} "
            f"{100 * r.gtv_inside:>9.2f}% {r.mask_over_reference:>12.2f}"
        )
    print()
    print(f"metrics, GTV-1 vs a copy shifted {PERTURB_SHIFT} voxels and dilated by 1 (best of {repeat})")
    header = (
        f"{'case':<10} {'union box ms':>12} {'full ms':>9} {'speed-up':>9} {'same':>5} "
        f"{'Dice':>7} {'HD95 mm':>8} {'sDice@1.18':>10} {'APL mm':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.case:<10} {r.metrics_box_ms:>12.1f} {r.metrics_full_ms:>9.1f} "
            f"{r.metrics_full_ms / r.metrics_box_ms:>8.1f}x {'yes' if r.metrics_equal else 'NO':>5} "
            f"{r.gtv_dice:>7.4f} {r.gtv_hd95_mm:>8.2f} {r.gtv_surface_dice:>10.4f} {r.gtv_apl_mm:>8.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement; the best is kept")
    args = parser.parse_args(argv)
    source = Path(os.environ.get("COHORT_DATA") or REPO.parent / "shared" / "data") / "nsclc-radiomics"
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-segment-") as tmp:
        for name, archive in CASES.items():
            tarball = source / archive
            if not tarball.is_file():
                sys.exit(f"missing {tarball}; set COHORT_DATA to the folder that holds nsclc-radiomics/")
            with tarfile.open(tarball) as tar:
                tar.extractall(tmp, filter="data")
            results.append(run_case(name, Path(tmp) / archive.removesuffix(".tar.xz"), args.repeat))
    print_table(results, args.repeat)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "repeat": args.repeat,
                "cases": [asdict(r) for r in results],
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
