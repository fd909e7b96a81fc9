"""Radiomics benchmark: the platform's extraction stage against pyradiomics' own defaults.

On the two real NSCLC planning CTs (LUNG1-001, LUNG1-002, ROI ``GTV-1``) and four
parameter sets it times, in the same run,

* **pyradiomics defaults**: a fresh ``RadiomicsFeatureExtractor(params)`` per case,
  as a script would build it, diagnostics on (``additionalInfo``: image and mask
  hashing), the whole image handed over;
* **platform**: ``cohort.radiomics.extract.extract_features`` (cropped to the ROI,
  extractor cached per process and warmed once, diagnostics off),

and prints seconds, the speed-up, peak memory and the largest relative difference
between the two feature vectors, so speed is never bought with wrong numbers.

Every measurement runs in a fresh child process (this script with a hidden
``--child`` argument) that loads the image and mask the parent built with the
platform (``read_series`` + ``rasterise_rtstruct``), runs one extraction on a
tiny phantom (warming the platform's extractor cache; for pyradiomics only the
process' one-time costs, with an extractor that is then thrown away), resets the
peak-RSS counter and times the real case. Memory is the peak RSS during the
extraction, absolute and above the RSS after loading.

Run: ``.venv/bin/python benchmarks/bench_radiomics.py [--repeat N]``; the minimum
time over repeats is kept. ``COHORT_DATA`` may point at the ``data`` folder that
holds ``nsclc-radiomics/``. Results also go to ``benchmarks/results/radiomics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench_foundation import data_dir, extract_archives  # the script's folder is on sys.path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "radiomics.json"
ROI_NAME = "GTV-1"
VARIANTS = ("pyradiomics", "platform")
MIB = 2**20

#: Settings of the two parameter sets without resampling (pyradiomics' default geometry).
NATIVE_SETTINGS = {"binWidth": 25, "voxelArrayShift": 1000, "label": 1}
FILTERS = {"Original": {}, "LoG": {"sigma": [1.0, 2.0, 3.0, 4.0, 5.0]}, "Wavelet": {}}


@dataclass(frozen=True)
class ParamSet:
    name: str
    params: dict[str, Any]
    filtered: bool  # targets: filtered >= 5x faster; Original within 1.1x


def param_sets() -> list[ParamSet]:
    from cohort.spec import load_preset

    return [
        ParamSet("ct-original", load_preset("ct-original"), False),
        ParamSet("ct-filters", load_preset("ct-filters"), True),
        ParamSet("original-native", {"setting": NATIVE_SETTINGS, "imageType": {"Original": {}}}, False),
        ParamSet("filters-native", {"setting": NATIVE_SETTINGS, "imageType": FILTERS}, True),
    ]


@dataclass(frozen=True)
class Case:
    name: str
    image: Path  # .mha files written by the parent, read by every child
    mask: Path
    size: tuple[int, ...]
    roi_voxels: int


@dataclass
class Row:
    """One parameter set × case: both variants, best time over repeats."""

    params: str
    case: str
    seconds: dict[str, list[float]]  # variant -> time of every repeat
    build_s: dict[str, float]  # extractor construction inside the time (pyradiomics only)
    peak_mib: dict[str, float]  # variant -> peak RSS above the loaded state (max over repeats)
    peak_abs_mib: dict[str, float]
    max_rel_diff: float
    worst_feature: str
    n_features: int
    n_identical: int
    peak_reset: bool = True  # False: the peak-RSS counter could not be reset, peaks include loading

    def best(self, variant: str) -> float:
        return min(self.seconds[variant])

    @property
    def speedup(self) -> float:
        return self.best("pyradiomics") / self.best("platform")


# ------------------------------------------------------------------- inputs


def build_cases(source: Path, scratch: Path) -> list[Case]:
    """Extract the archives, build image and GTV-1 mask with the platform, save both."""
    import pydicom
    import SimpleITK as sitk

    from cohort.curate.rtstruct import rasterise_rtstruct, read_roi_infos
    from cohort.curate.series import read_series

    cases = []
    for folder in extract_archives(source, scratch / "archive"):
        by_modality: dict[str, list[str]] = {}
        for path in sorted(folder.iterdir()):
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
            by_modality.setdefault(str(ds.Modality), []).append(str(path))
        image = read_series(by_modality["CT"])
        structure_set = pydicom.dcmread(by_modality["RTSTRUCT"][0])
        number = {info.name: info.number for info in read_roi_infos(structure_set)}[ROI_NAME]
        roi = rasterise_rtstruct(structure_set, number, image)
        name = folder.name.split("_")[0]
        image_path, mask_path = scratch / f"{name}-image.mha", scratch / f"{name}-mask.mha"
        sitk.WriteImage(image, str(image_path))
        sitk.WriteImage(roi.mask, str(mask_path))
        cases.append(Case(name, image_path, mask_path, tuple(image.GetSize()), roi.voxel_count))
    return cases


# -------------------------------------------------------------------- child


def phantom() -> tuple[Any, Any]:
    """A 40 mm noisy cube with a 6 mm sphere: enough for every filter, fast to extract."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    grid = np.indices((40, 40, 40)) - 20
    image = sitk.GetImageFromArray(rng.integers(-100, 100, (40, 40, 40)).astype(np.int16))
    mask = sitk.GetImageFromArray(((grid**2).sum(axis=0) <= 36).astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


def reset_peak_rss() -> bool:
    """Reset this process' RSS high-water mark (``VmHWM``); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    """``VmHWM`` in bytes, not ``ru_maxrss``: on Linux a child's ``ru_maxrss`` starts at
    the parent's peak at exec time (kept in the signal struct, which no reset clears)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def run_child(job_path: str) -> None:
    """Measure one (variant, parameter set, case) and write the result next to the job."""
    import gc

    import SimpleITK as sitk
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    from cohort.radiomics.extract import extract_features

    job = json.loads(Path(job_path).read_text())
    params = job["params"]
    image, mask = sitk.ReadImage(job["image"]), sitk.ReadImage(job["mask"])
    small_image, small_mask = phantom()

    def pyradiomics_defaults(img: Any, msk: Any) -> tuple[dict[str, float], float]:
        start = time.perf_counter()
        extractor = RadiomicsFeatureExtractor(params)  # fresh per case, additionalInfo left on
        built = time.perf_counter() - start
        result = extractor.execute(img, msk)
        return {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}, built

    def platform_stage(img: Any, msk: Any) -> tuple[dict[str, float], float]:
        return extract_features(img, msk, params), 0.0

    extract: Callable[[Any, Any], tuple[dict[str, float], float]] = (
        platform_stage if job["variant"] == "platform" else pyradiomics_defaults
    )
    extract(small_image, small_mask)  # warm-up: imports, lazy init, (platform) the extractor cache
    gc.collect()
    loaded = current_rss()
    reset = reset_peak_rss()
    start = time.perf_counter()
    features, built = extract(image, mask)
    seconds = time.perf_counter() - start
    peak = peak_rss()
    result = {
        "seconds": seconds,
        "build_s": built,
        "rss_loaded": loaded,
        "peak_rss": peak,
        "peak_reset": reset,
        "features": features,
    }
    Path(job["out"]).write_text(json.dumps(result))


# ------------------------------------------------------------------- parent


def measure(variant: str, pset: ParamSet, case: Case, scratch: Path) -> dict[str, Any]:
    """Run one child process; return its result."""
    stem = scratch / f"{variant}-{pset.name}-{case.name}"
    out = Path(f"{stem}.out.json")
    job: dict[str, Any] = {
        "variant": variant,
        "params": pset.params,
        "image": str(case.image),
        "mask": str(case.mask),
        "out": str(out),
    }
    Path(f"{stem}.job.json").write_text(json.dumps(job))
    done = subprocess.run(
        [sys.executable, __file__, "--child", f"{stem}.job.json"], capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"child {variant}/{pset.name}/{case.name} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def relative_difference(a: float, b: float) -> float:
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


def compare(reference: dict[str, float], other: dict[str, float]) -> tuple[float, str, int]:
    """Largest relative difference, the feature where it occurs, and how many are bit-equal."""
    if reference.keys() != other.keys():
        missing = sorted(reference.keys() ^ other.keys())
        sys.exit(f"feature names differ between the variants: {missing[:10]}")
    diffs = {name: relative_difference(reference[name], other[name]) for name in reference}
    worst = max(diffs, key=lambda name: diffs[name])
    return diffs[worst], worst, sum(d == 0.0 for d in diffs.values())


def new_row(params: str, case: str, results: dict[str, dict[str, Any]]) -> Row:
    worst, name, same = compare(results["pyradiomics"]["features"], results["platform"]["features"])
    n = len(results["platform"]["features"])
    return Row(params, case, {v: [] for v in VARIANTS}, {}, {}, {}, worst, name, n, same)


def run_all(cases: Sequence[Case], sets: Sequence[ParamSet], scratch: Path, repeat: int) -> list[Row]:
    rows: dict[tuple[str, str], Row] = {}
    for r in range(repeat):
        for pset in sets:
            for case in cases:
                results = {variant: measure(variant, pset, case, scratch) for variant in VARIANTS}
                key = (pset.name, case.name)
                if key not in rows:  # features are deterministic: compare the first round's
                    rows[key] = new_row(pset.name, case.name, results)
                row = rows[key]
                for variant, res in results.items():
                    row.seconds[variant].append(res["seconds"])
                    if res["seconds"] == row.best(variant):
                        row.build_s[variant] = res["build_s"]
                    extra = (res["peak_rss"] - res["rss_loaded"]) / MIB
                    row.peak_mib[variant] = max(row.peak_mib.get(variant, 0.0), extra)
                    row.peak_abs_mib[variant] = max(row.peak_abs_mib.get(variant, 0.0), res["peak_rss"] / MIB)
                    row.peak_reset = row.peak_reset and res["peak_reset"]
                times = ", ".join(f"{v} {results[v]['seconds']:.2f} s" for v in VARIANTS)
                print(f"  round {r + 1}/{repeat} {pset.name:<16} {case.name}: {times}", flush=True)
    return list(rows.values())


# ------------------------------------------------------------------- report


def render_table(rows: Sequence[Row]) -> str:
    header = (
        f"{'params':<16}{'case':<11}{'pyradiomics s':>14}{'platform s':>12}{'speed-up':>10}"
        f"{'pyrad peak MiB':>17}{'platform peak MiB':>19}{'max rel diff':>14}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        peaks = [f"+{row.peak_mib[v]:.0f} ({row.peak_abs_mib[v]:.0f})" for v in VARIANTS]
        lines.append(
            f"{row.params:<16}{row.case:<11}{row.best('pyradiomics'):>14.2f}{row.best('platform'):>12.2f}"
            f"{row.speedup:>9.2f}x{peaks[0]:>17}{peaks[1]:>19}{row.max_rel_diff:>14.1e}"
        )
    return "\n".join(lines)


def summarise(sets: Sequence[ParamSet], rows: Sequence[Row]) -> list[dict[str, Any]]:
    summary = []
    for pset in sets:
        mine = [row for row in rows if row.params == pset.name]
        mean = sum(row.speedup for row in mine) / len(mine)
        if pset.filtered:
            target, met = ">= 5x faster", mean >= 5.0
        else:
            target = "platform <= 1.1x pyradiomics time"
            met = all(row.best("platform") <= 1.1 * row.best("pyradiomics") for row in mine)
        summary.append(
            {
                "params": pset.name,
                "mean_speedup": mean,
                "target": target,
                "met": met,
                "max_rel_diff": max(row.max_rel_diff for row in mine),
                "identical": f"{sum(r.n_identical for r in mine)}/{sum(r.n_features for r in mine)}",
            }
        )
    return summary


def render_summary(summary: Sequence[dict[str, Any]]) -> str:
    lines = []
    for s in summary:
        verdict = "OK" if s["met"] else "MISSED"
        lines.append(
            f"{s['params']:<16} mean speed-up {s['mean_speedup']:6.2f}x  (target {s['target']}: {verdict}); "
            f"max rel diff {s['max_rel_diff']:.1e}, bit-identical features {s['identical']}"
        )
    return "\n".join(lines)


def write_json(cases: Sequence[Case], rows: Sequence[Row], summary: Any, repeat: int) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "radiomics",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "repeat": repeat,
        "cases": [{"name": c.name, "size": c.size, "roi_voxels": c.roi_voxels} for c in cases],
        "params": {p.name: p.params for p in param_sets()},
        "rows": [{**asdict(row), "speedup": row.speedup} for row in rows],
        "summary": summary,
    }
    RESULTS.write_text(json.dumps(payload, indent=2))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the minimum is kept")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement in this process
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args.child)
        return
    sets = param_sets()
    with tempfile.TemporaryDirectory(prefix="cohort-bench-radiomics-") as tmp:
        scratch = Path(tmp)
        cases = build_cases(data_dir(), scratch)
        for case in cases:
            print(f"{case.name}: image {'x'.join(map(str, case.size))}, {ROI_NAME} {case.roi_voxels} voxels")
        print(f"repeat={args.repeat}; one child process per measurement", flush=True)
        rows = run_all(cases, sets, scratch, args.repeat)
    summary = summarise(sets, rows)
    print()
    print(render_table(rows))
    print()
    build = max(row.build_s["pyradiomics"] for row in rows)
    print(f"Seconds: best of repeats; pyradiomics times include building its extractor (<= {build:.2f} s).")
    print("Peak MiB: RSS peak during the extraction above the RSS after loading (absolute in brackets).")
    if not all(row.peak_reset for row in rows):
        print("  (the peak-RSS counter could not be reset here: peaks include loading and warm-up)")
    print(render_summary(summary))
    write_json(cases, rows, summary, args.repeat)
    print(f"\nwrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
