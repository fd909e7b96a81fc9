"""Feature-store benchmark: reading one feature column, appending a shard, compacting.

A synthetic feature table shaped like the real one (the metadata columns of
``cohort.shard.FEATURE_KEY_SCHEMA`` with DICOM-length UIDs and SHA-256 hashes,
then ``--features`` float64 columns with pyradiomics-style names, seeded numpy
values) of ``--rows`` rows is built once and stored as

* a plain file written with ``pyarrow.parquet.write_table`` (zstd, like the
  store): the **baseline**;
* a store table (``cohort.store.TableDir``) filled by ``--parts`` appends of
  equal slices, as that many shards would leave it, then compacted to one part
  (the 20-part version is kept by compaction and read through a second store
  root that links to it);
* optionally (``--many-parts``, 0 skips) the same rows as many small parts, the
  state ``--rows / --many-parts``-row shards leave before any compaction (the
  parts are written directly, not through ``append``, which would take far
  longer to build).

It then times, in the same run, interleaved per round (best round kept):

1. reading ONE feature column with ``pandas.read_parquet(path, columns=[...])``
   from each, and with ``cohort.store.open(root).read(columns=[...])`` (which
   adds the key columns and deduplicates), against the plain file; plus the
   footer parse of one file (``pq.ParquetFile(path).metadata``);
2. ``TableDir.append`` of one shard (``--shard-rows``) into tables holding
   0, 10 % and 100 % of the rows, against ``pq.write_table`` of the same shard;
   ``TableDir.keys`` (the key re-read under the lock) is timed on its own; each
   appended part is deleted again so the table is unchanged;
3. ``TableDir.compact`` of the ``--parts``-part table once, against reading the
   parts and writing one plain file.

All files live in a temporary folder that is removed at the end; they stay in
the page cache, so reads are warm (no disk latency). Run:
``.venv/bin/python benchmarks/bench_store.py [--rows N] [--features N] [--repeat N]``.
Results also go to ``benchmarks/results/store.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import cohort.store
from cohort.shard import FEATURE_KEY_SCHEMA, KEY_COLUMNS
from cohort.store.table import TableDir

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "store.json"
FEATURE_SET = "ct-original-0123abcd"
ROIS = (("GTV", "GTV-1"), ("lung", "Lung-Right"))  # (canonical, source): rows per series

IMAGE_TYPES = (
    "original",
    *(f"log-sigma-{s}-0-mm-3D" for s in (1, 2, 3, 4, 5)),
    *(f"wavelet-{b}" for b in ("LLH", "LHL", "LHH", "HLL", "HLH", "HHL", "HHH", "LLL")),
    "square",
    "squareroot",
    "logarithm",
)
FEATURE_CLASSES = {
    "firstorder": "Energy TotalEnergy Entropy Minimum 10Percentile 90Percentile Maximum Mean Median "
    "InterquartileRange Range MeanAbsoluteDeviation RobustMeanAbsoluteDeviation RootMeanSquared "
    "Skewness Kurtosis Variance Uniformity",
    "glcm": "Autocorrelation JointAverage ClusterProminence ClusterShade ClusterTendency Contrast "
    "Correlation DifferenceAverage DifferenceEntropy DifferenceVariance JointEnergy JointEntropy Imc1 "
    "Imc2 Idm Idmn Id Idn InverseVariance MaximumProbability SumAverage SumEntropy SumSquares MCC",
    "glrlm": "ShortRunEmphasis LongRunEmphasis GrayLevelNonUniformity GrayLevelNonUniformityNormalized "
    "RunLengthNonUniformity RunLengthNonUniformityNormalized RunPercentage GrayLevelVariance RunVariance "
    "RunEntropy LowGrayLevelRunEmphasis HighGrayLevelRunEmphasis ShortRunLowGrayLevelEmphasis "
    "ShortRunHighGrayLevelEmphasis LongRunLowGrayLevelEmphasis LongRunHighGrayLevelEmphasis",
    "gldm": "SmallDependenceEmphasis LargeDependenceEmphasis GrayLevelNonUniformity "
    "DependenceNonUniformity DependenceNonUniformityNormalized GrayLevelVariance DependenceVariance "
    "DependenceEntropy LowGrayLevelEmphasis HighGrayLevelEmphasis SmallDependenceLowGrayLevelEmphasis "
    "SmallDependenceHighGrayLevelEmphasis LargeDependenceLowGrayLevelEmphasis "
    "LargeDependenceHighGrayLevelEmphasis",
    "ngtdm": "Coarseness Contrast Busyness Complexity Strength",
}
SETTINGS_JSON = json.dumps(
    {
        "imageType": {"Original": {}},
        "setting": {
            "binWidth": 25,
            "interpolator": "sitkBSpline",
            "resampledPixelSpacing": [1, 1, 1],
            "voxelArrayShift": 1000,
            "normalize": False,
            "label": 1,
            "correctMask": True,
            "geometryTolerance": 1e-5,
        },
        "featureClass": {c: [] for c in ("shape", *FEATURE_CLASSES)},
    },
    sort_keys=True,
)
CONSTANTS = {
    "role": "planning",
    "modality": "CT",
    "series_description": "CT THORAX 3.0 B31f",
    "institution": "MAASTRO Clinic",
    "manufacturer": "SIEMENS",
    "manufacturer_model": "Biograph 40",
    "convolution_kernel": "B31f",
    "contrast_agent": "",
    "mask_notes": "",
    "feature_set": FEATURE_SET,
    "settings_hash": hashlib.sha256(SETTINGS_JSON.encode()).hexdigest(),
    "settings_json": SETTINGS_JSON,
    "cohort_version": "0.4.0",
    "pyradiomics_version": "3.1.0",
    "simpleitk_version": "2.4.1",
    "pydicom_version": "3.0.1",
    "numpy_version": np.__version__,
    "run_id": "20261127T101500Z-3f9c2a",
}


# -- data ----------------------------------------------------------------------------------------
def feature_names(n: int) -> list[str]:
    """``n`` pyradiomics-style column names (``wavelet-LHL_glcm_Correlation``)."""
    base = [
        f"{image}_{cls}_{name}"
        for image in IMAGE_TYPES
        for cls, names in FEATURE_CLASSES.items()
        for name in names.split()
    ]
    return [base[i % len(base)] + (f"_{i // len(base)}" if i >= len(base) else "") for i in range(n)]


def _uids(root: str, ids: np.ndarray, salt: int) -> list[str]:
    """DICOM-like UIDs (~60 characters), unique per id, the same for the same id."""
    return [f"{root}.{(int(i) * 6364136223846793005 + salt) % 10**20:020d}{int(i):07d}" for i in ids]


def _hashes(ids: np.ndarray, salt: str) -> list[str]:
    return [hashlib.sha256(f"{salt}{int(i)}".encode()).hexdigest() for i in ids]


def make_table(start: int, n: int, names: Sequence[str], seed: int) -> pa.Table:
    """Rows ``start .. start+n`` of the synthetic feature table (keys depend on the row number only)."""
    rng = np.random.default_rng(seed)
    idx = np.arange(start, start + n)
    series = idx // len(ROIS)
    roi = idx % len(ROIS)
    values: dict[str, Any] = {
        "patient_id": [f"LUNG1-{int(s):06d}" for s in series],
        "study_uid": _uids("1.3.6.1.4.1.32722.99.99.1", series, 1),
        "series_uid": _uids("1.3.6.1.4.1.32722.99.99.2", series, 2),
        "rtstruct_uid": _uids("1.3.6.1.4.1.32722.99.99.3", series, 3),
        "roi": [ROIS[r][0] for r in roi],
        "roi_source": [ROIS[r][1] for r in roi],
        "study_date": [f"20{8 + int(s) % 10:02d}{1 + int(s) % 12:02d}{1 + int(s) % 28:02d}" for s in series],
        "kvp": rng.choice([100.0, 120.0, 140.0], n),
        "exposure": rng.uniform(50, 400, n).round(),
        "tube_current": rng.uniform(50, 500, n).round(),
        "slice_thickness": rng.choice([1.0, 2.0, 3.0, 5.0], n),
        "pixel_spacing_row": rng.uniform(0.6, 1.0, n),
        "n_slices": rng.integers(80, 300, n).astype(np.int32),
        "mask_voxels": rng.integers(1_000, 2_000_000, n),
        "image_hash": _hashes(series, "image"),
        "rtstruct_hash": _hashes(series, "rtstruct"),
        "processed_at": (1_795_000_000_000_000 + idx * 1_000_000).astype(np.int64),
    }
    values["pixel_spacing_col"] = values["pixel_spacing_row"]
    arrays = []
    for field in FEATURE_KEY_SCHEMA:
        value = values.get(field.name, CONSTANTS.get(field.name))
        if isinstance(value, str):
            value = [value] * n
        arrays.append(pa.array(value, type=field.type))
    scales = 10.0 ** rng.uniform(-3, 6, len(names))
    for scale in scales:  # one column at a time: no second copy of the whole matrix
        arrays.append(pa.array(rng.standard_normal(n) * scale))
    schema = pa.schema([*FEATURE_KEY_SCHEMA, *(pa.field(name, pa.float64()) for name in names)])
    return pa.Table.from_arrays(arrays, schema=schema)


# -- timing --------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def best(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: min(values) for name, values in samples.items() if values}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the benchmark -------------------------------------------------------------------------------
def write_parts(table: pa.Table, folder: Path, size: int) -> int:
    """Write ``table`` as parts of ``size`` rows straight into ``folder`` (setup, two threads)."""
    count = -(-table.num_rows // size)

    def one(i: int) -> None:
        pq.write_table(table.slice(i * size, size), folder / f"part-{i:06d}.parquet", compression="zstd")

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(one, range(count)))
    return count


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(tmp: Path, table: pa.Table, parts: int, many_parts: int) -> dict[str, Any]:
    """Write the plain file and the store tables; time the appends and the compaction."""
    info: dict[str, Any] = {}
    plain = tmp / "plain.parquet"
    info["plain_write_s"], _ = timed(lambda: pq.write_table(table, plain, compression="zstd"))
    info["plain_bytes"] = plain.stat().st_size
    info["footer_bytes"] = pq.ParquetFile(plain).metadata.serialized_size
    log(f"plain file: {info['plain_write_s']:.1f} s, {info['plain_bytes'] / 2**20:.0f} MiB")

    store = TableDir(tmp / "store" / "features" / FEATURE_SET)
    step = -(-table.num_rows // parts)
    appends = []
    for i in range(parts):
        piece = table.slice(i * step, step)
        seconds, result = timed(lambda piece=piece: store.append(piece, KEY_COLUMNS))
        assert result.written == piece.num_rows, result
        appends.append({"rows_before": i * step, "rows": piece.num_rows, "seconds": seconds})
    info["build_appends"] = appends
    log(f"{parts} appends of {step} rows: {sum(a['seconds'] for a in appends):.1f} s")

    parts_dir = store.current()
    info["peak_rss_before_compact_mib"] = peak_rss_mib()
    info["compact_s"], compacted = timed(lambda: store.compact(KEY_COLUMNS))
    info["peak_rss_after_compact_mib"] = peak_rss_mib()
    assert compacted.parts_before == parts and compacted.rows == table.num_rows, compacted
    baseline = tmp / "rewrite.parquet"
    info["rewrite_s"], _ = timed(
        lambda: pq.write_table(pq.read_table(parts_dir), baseline, compression="zstd")
    )
    baseline.unlink()
    log(f"compact: {info['compact_s']:.1f} s (read + write one file: {info['rewrite_s']:.1f} s)")

    # A second store root whose table links to the version compaction kept (the parts).
    view = tmp / "store-parts" / "features" / FEATURE_SET
    view.parent.mkdir(parents=True)
    view.symlink_to(parts_dir, target_is_directory=True)

    if many_parts:
        many = TableDir(tmp / "store-many" / "features" / FEATURE_SET)
        folder = many.current()
        size = -(-table.num_rows // many_parts)
        seconds, _ = timed(lambda: write_parts(table, folder, size))
        log(f"{many_parts} parts of {size} rows written directly: {seconds:.1f} s")
        info["many_parts_write_s"] = seconds
    return info


def bench_reads(tmp: Path, names: Sequence[str], parts: int, many_parts: int, repeat: int) -> list[dict]:
    plain = tmp / "plain.parquet"
    roots = {"compacted": tmp / "store", f"{parts} parts": tmp / "store-parts"}
    if many_parts:
        roots[f"{many_parts} parts"] = tmp / "store-many"
    variants: dict[str, tuple[int, Callable[[str], Any]]] = {
        "plain file, pd.read_parquet": (1, lambda col: pd.read_parquet(plain, columns=[col]))
    }
    for label, root in roots.items():
        path = root / "features" / FEATURE_SET
        n_parts = len(TableDir(path).parts())
        variants[f"store {label}, pd.read_parquet"] = (
            n_parts,
            lambda col, path=path: pd.read_parquet(path, columns=[col]),
        )
    for label, root in roots.items():
        n_parts = len(TableDir(root / "features" / FEATURE_SET).parts())
        variants[f"store {label}, Store.read"] = (
            n_parts,
            lambda col, root=root: cohort.store.open(root).read(columns=[col]),
        )
    variants["footer parse, one plain file"] = (1, lambda col: pq.ParquetFile(plain).metadata)

    samples: dict[str, list[float]] = {name: [] for name in variants}
    for name in ("plain file, pd.read_parquet", "store compacted, Store.read"):
        variants[name][1](names[0])  # warm-up (imports, first-call costs), not timed
    for r in range(repeat):
        column = names[(len(names) // 2 + 97 * r) % len(names)]
        for name, (_, fn) in variants.items():
            seconds, frame = timed(lambda fn=fn, column=column: fn(column))
            if isinstance(frame, pd.DataFrame):
                assert list(frame.columns) == [column] and len(frame) > 0, (name, frame.shape)
            samples[name].append(seconds)
        log(f"read round {r + 1}/{repeat} done")
    base = min(samples["plain file, pd.read_parquet"])
    return [
        {
            "variant": name,
            "parts": variants[name][0],
            "seconds": min(v),
            "samples": v,
            "vs_plain": min(v) / base,
        }
        for name, v in samples.items()
    ]


def bench_appends(
    tmp: Path,
    names: Sequence[str],
    rows: int,
    parts: int,
    many_parts: int,
    shard_rows: Sequence[int],
    repeat: int,
) -> list[dict]:
    pool = make_table(rows, max(shard_rows), names, seed=2)  # keys beyond every table's rows
    small = int(rows * 0.1)
    tables: dict[str, tuple[int, TableDir]] = {}
    # N = 10 %: one part, and as shards of the many-parts size would leave it.
    one = TableDir(tmp / "small-1" / FEATURE_SET)
    full = pq.read_table(tmp / "plain.parquet").slice(0, small)
    one.append(full, KEY_COLUMNS)
    tables["10% in 1 part"] = (small, one)
    if many_parts:
        size = -(-rows // many_parts)
        split = TableDir(tmp / "small-n" / FEATURE_SET)
        write_parts(full, split.current(), size)
        tables[f"10% in {len(split.parts())} parts"] = (small, split)
    del full
    tables["100% in 1 part"] = (rows, TableDir(tmp / "store" / "features" / FEATURE_SET))
    tables[f"100% in {parts} parts"] = (rows, TableDir(tmp / "store-parts" / "features" / FEATURE_SET))
    if many_parts:
        tables[f"100% in {many_parts} parts"] = (
            rows,
            TableDir(tmp / "store-many" / "features" / FEATURE_SET),
        )

    plain = tmp / "shard.parquet"
    cases = [("empty", 0, None)] + [(label, n, t) for label, (n, t) in tables.items()]
    samples: dict[tuple[str, int], dict[str, list[float]]] = {
        (label, k): {"plain": [], "append": [], "keys": []} for label, _, _ in cases for k in shard_rows
    }
    for r in range(repeat):
        for label, _, table in cases:
            if table is not None:
                samples[(label, shard_rows[0])]["keys"].append(timed(lambda t=table: t.keys(KEY_COLUMNS))[0])
            for k in shard_rows:
                shard = pool.slice(0, k)
                s = samples[(label, k)]
                s["plain"].append(
                    timed(lambda shard=shard: pq.write_table(shard, plain, compression="zstd"))[0]
                )
                plain.unlink()
                target = table if table is not None else TableDir(tmp / f"empty-{r}-{k}" / FEATURE_SET)
                seconds, result = timed(lambda target=target, shard=shard: target.append(shard, KEY_COLUMNS))
                assert result.written == k, result
                s["append"].append(seconds)
                result.path.unlink()  # leave the table as it was
        log(f"append round {r + 1}/{repeat} done")
    out = []
    for label, n, table in cases:
        n_parts = 0 if table is None else len(table.parts())
        keys = min(samples[(label, shard_rows[0])]["keys"], default=0.0)
        for k in shard_rows:
            b = best(samples[(label, k)])
            out.append(
                {
                    "table": label,
                    "rows_before": n,
                    "parts": n_parts,
                    "shard_rows": k,
                    "plain_write_s": b["plain"],
                    "append_s": b["append"],
                    "keys_read_s": keys,
                    "overhead_s": b["append"] - b["plain"],
                    "vs_plain": b["append"] / b["plain"],
                    "samples": samples[(label, k)],
                }
            )
    return out


# -- output --------------------------------------------------------------------------------------
def render(args: argparse.Namespace, info: dict[str, Any], reads: list[dict], appends: list[dict]) -> str:
    lines = [
        f"read ONE feature column of {args.rows:,} rows x {args.features:,} float64 features "
        f"(plain file {info['plain_bytes'] / 2**20:,.0f} MiB, "
        f"footer {info['footer_bytes'] / 1024:,.0f} KiB), "
        f"best of {args.repeat}",
        f"{'variant':<40}{'parts':>7}{'seconds':>10}{'vs plain':>10}",
    ]
    for row in reads:
        lines.append(f"{row['variant']:<40}{row['parts']:>7}{row['seconds']:>10.3f}{row['vs_plain']:>9.2f}x")
    lines += [
        "",
        f"append one shard of {args.features:,} features (TableDir.append vs pq.write_table), "
        f"best of {args.repeat}",
        f"{'table holds':<22}{'rows':>8}{'parts':>7}{'shard':>7}{'plain':>9}{'append':>9}{'keys':>9}"
        f"{'overhead':>10}{'vs plain':>10}",
    ]
    for row in appends:
        lines.append(
            f"{row['table']:<22}{row['rows_before']:>8,}{row['parts']:>7}{row['shard_rows']:>7,}"
            f"{row['plain_write_s']:>9.3f}{row['append_s']:>9.3f}{row['keys_read_s']:>9.3f}"
            f"{row['overhead_s']:>10.3f}{row['vs_plain']:>9.2f}x"
        )
    build_appends = info["build_appends"]
    lines += [
        "",
        f"build: {len(build_appends)} appends of {build_appends[0]['rows']:,} rows took "
        f"{build_appends[0]['seconds']:.2f} s (first, empty table) .. {build_appends[-1]['seconds']:.2f} s "
        f"(last); pq.write_table of all {args.rows:,} rows {info['plain_write_s']:.2f} s",
        f"compact {len(build_appends)} parts -> 1 ({args.rows:,} rows): {info['compact_s']:.2f} s; "
        f"read the parts + write one plain file: {info['rewrite_s']:.2f} s "
        f"({info['compact_s'] / info['rewrite_s']:.2f}x), once; peak RSS "
        f"{info['peak_rss_before_compact_mib']:,.0f} MiB before compact, "
        f"{info['peak_rss_after_compact_mib']:,.0f} MiB after",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the big table (default 100000)")
    parser.add_argument("--features", type=int, default=1200, help="float64 feature columns (default 1200)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the best is kept (default 3)")
    parser.add_argument(
        "--parts", type=int, default=20, help="appends that fill the store table (default 20)"
    )
    parser.add_argument(
        "--many-parts", type=int, default=1000, help="parts of the uncompacted table (default 1000; 0 skips)"
    )
    parser.add_argument(
        "--shard-rows",
        type=int,
        nargs="+",
        default=[100, 1000],
        help="shard sizes to append (default 100 1000)",
    )
    parser.add_argument(
        "--tmp", type=Path, default=None, help="folder for the temporary files (default: system)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    names = feature_names(args.features)
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=args.tmp) as folder:
        tmp = Path(folder)
        seconds, table = timed(lambda: make_table(0, args.rows, names, seed=1))
        log(
            f"generated {args.rows:,} x {table.num_columns:,} table "
            f"({table.nbytes / 2**20:,.0f} MiB): {seconds:.1f} s"
        )
        info = build(tmp, table, args.parts, args.many_parts)
        del table
        reads = bench_reads(tmp, names, args.parts, args.many_parts, args.repeat)
        appends = bench_appends(
            tmp, names, args.rows, args.parts, args.many_parts, args.shard_rows, args.repeat
        )
    print(render(args, info, reads, appends))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "pyarrow": pa.__version__,
            "pandas": pd.__version__,
        },
        "build": info,
        "reads": reads,
        "appends": appends,
    }
    RESULTS.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
