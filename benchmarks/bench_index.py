"""Archive-index benchmark: first crawl, re-crawl, against a naive crawl and the I/O floor.

An archive of ``--files`` DICOM files is built under ``--root`` (default
``/tmp/cohort-bench-index``) from the two real NSCLC-Radiomics series in the
shared data (CT slices, RTSTRUCT, RTPLAN, RTDOSE): each copy of a patient gets a
new PatientID and fresh UIDs, replaced byte for byte with strings of the same
length, so every copy is a valid, distinct study. The archive is kept for the
next run (``--rebuild`` makes a new one).

Then, in the same run, each of these crawls every file:

* **index xW / x1**: ``cohort.index.update_index`` into an empty index folder
  (reads and hashes every file, parses its header, writes the partitioned
  Parquet index), with W worker processes (spawned, start-up included) and
  with one process;
* **naive**: one process, ``pydicom.dcmread`` of each whole file, a sha256 of
  the file, and the same row columns from the dataset, then one Arrow table;
* **floor**: one process reading the first 8 KiB of every file (os.walk);
* **re-crawl**: ``update_index`` again on the unchanged archive (stat only).

Warm: the page cache holds the archive (it was just read). Cold: the page cache
is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``) before each
measurement; where that is not permitted the cold rows are left out and the
output says so. Results also go to ``benchmarks/results/index.json``.

``.venv/bin/python benchmarks/bench_index.py [--files 5000] [--workers 2] [--repeat 1]``
(about 4 minutes per round at 5,000 files; the naive crawls take most of it).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pydicom

from cohort.index import INSTANCE_SCHEMA, read_runs, update_index
from cohort.index.header import columns_from_elements, parse_fast

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("COHORT_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results" / "index.json"
SERIES = ("LUNG1-001_20180209_CT.tar.xz", "LUNG1-002_20180526_CT.tar.xz")


# -- the archive --------------------------------------------------------------


#: UID-like tokens in the bytes of a file (DICOM's own 1.2.840.10008 UIDs are left alone).
_UID_TOKEN = re.compile(rb"[1-9][0-9]*(?:\.(?:0|[1-9][0-9]*)){3,}")


def _same_length_uid(uid: str, copy: int) -> str:
    """A new UID of the same length (only digits of the last components change)."""
    digest = hashlib.sha256(f"{uid}|{copy}".encode()).hexdigest()
    digits = str(int(digest, 16))
    tail = min(20, len(uid) - uid.find(".", 8) - 1)
    out = list(uid)
    d = 0
    for i in range(len(uid) - tail, len(uid)):
        if out[i] != ".":
            first = i == 0 or out[i - 1] == "."
            out[i] = digits[d] if not (first and digits[d] == "0") else "1"
            d += 1
    return "".join(out)


def build_archive(root: Path, n_files: int) -> Path:
    """``n_files`` files (whole patient copies, the last one cut short) under ``root / archive``."""
    archive = root / "archive"
    stamp = root / "archive.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("files") == n_files:
        return archive
    shutil.rmtree(root, ignore_errors=True)
    source = root / "source"
    source.mkdir(parents=True)
    for name in SERIES:
        with tarfile.open(DATA / "nsclc-radiomics" / name) as tar:
            tar.extractall(source, filter="data")
    patients = []
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        files = [(f.name, f.read_bytes()) for f in sorted(folder.iterdir())]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pid = str(pydicom.dcmread(folder / files[0][0], stop_before_pixels=True).PatientID)
        patients.append((folder.name, pid, files))
    written, copy = 0, 0
    while written < n_files:
        for series, pid, files in patients:
            new_pid = f"S{copy:04d}{pid[-4:]}"[: len(pid)].ljust(len(pid), "0")
            mapping: dict[bytes, bytes] = {}

            def fresh(match: re.Match[bytes], mapping: dict[bytes, bytes] = mapping, n: int = copy) -> bytes:
                uid = match.group(0)
                if uid.startswith(b"1.2.840.10008.") or len(uid) < 16:
                    return uid
                if uid not in mapping:
                    mapping[uid] = _same_length_uid(uid.decode(), n).encode()
                return mapping[uid]

            target = archive / new_pid / series.replace(pid, new_pid)
            target.mkdir(parents=True, exist_ok=True)
            for name, data in files:
                if written >= n_files:
                    break
                data = _UID_TOKEN.sub(fresh, data).replace(pid.encode(), new_pid.encode())
                (target / name).write_bytes(data)
                written += 1
        copy += 1
    shutil.rmtree(source)
    stamp.write_text(json.dumps({"files": n_files, "copies": copy}))
    return archive


# -- the crawls ---------------------------------------------------------------


def naive_crawl(archive: Path) -> pa.Table:
    """What a plain script does: read each whole file with pydicom, hash it, build the rows."""
    rows = []
    for folder, _dirs, names in os.walk(archive):
        for name in names:
            path = os.path.join(folder, name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
            with open(path, "rb") as fh:
                sha = hashlib.sha256(fh.read()).hexdigest()

            def value(tag: int, ds: pydicom.Dataset = ds) -> Any:
                return ds[tag].value if tag in ds else None

            columns, _invalid = columns_from_elements(value)
            st = os.stat(path)
            file_columns = {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
            rows.append({**file_columns, **columns})
    return pa.Table.from_pylist(rows, schema=INSTANCE_SCHEMA)


def floor_crawl(archive: Path) -> int:
    """Read the first 8 KiB of every file: the least any header crawl must do."""
    total = 0
    for folder, _dirs, names in os.walk(archive):
        for name in names:
            with open(os.path.join(folder, name), "rb") as fh:
                total += len(fh.read(8192))
    return total


def drop_caches() -> str | None:
    """Drop the page cache; the reason when that is not permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _cpu() -> float:
    """CPU seconds of this process and its finished children (worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds, result): CPU time is what a busy shared machine distorts least."""
    c0, t0 = _cpu(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, _cpu() - c0, out


def header_parse_micro(archive: Path, n: int = 200) -> dict[str, float]:
    """Milliseconds per header (bytes already in memory) for each way to stop before the pixels."""
    paths = sorted(archive.rglob("*.dcm"))[:n]
    blobs = [p.read_bytes() for p in paths]
    tags = ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality", "PixelSpacing", "Rows"]

    def pydicom_read(**kwargs: Any) -> Callable[[bytes], Any]:
        def read(blob: bytes) -> Any:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return pydicom.dcmread(io.BytesIO(blob), **kwargs)

        return read

    variants: dict[str, Callable[[bytes], Any]] = {
        "pydicom whole file": pydicom_read(),
        "pydicom stop_before_pixels": pydicom_read(stop_before_pixels=True),
        "pydicom defer_size=4 KiB": pydicom_read(defer_size=4096),
        "pydicom specific_tags (6)": pydicom_read(specific_tags=tags),
        "cohort fast path (+ columns)": lambda b: columns_from_elements(parse_fast(b, len(b)).elements.get),
    }
    out = {}
    for name, fn in variants.items():
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for blob in blobs:
                fn(blob)
            best = min(best, (time.perf_counter() - t0) / len(blobs) * 1e3)
        out[name] = best
    return out


# -- main -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "cohort-bench-index")
    parser.add_argument("--rebuild", action="store_true", help="build a new archive even if one is there")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache rounds")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the fastest of each is kept")
    args = parser.parse_args(argv)
    if args.rebuild:
        shutil.rmtree(args.root, ignore_errors=True)
    t0 = time.perf_counter()
    archive = build_archive(args.root, args.files)
    build_s = time.perf_counter() - t0
    n = sum(1 for _ in archive.rglob("*") if _.is_file())
    size = sum(p.stat().st_size for p in archive.rglob("*") if p.is_file())
    print(f"archive: {n} files, {size / 2**30:.2f} GiB under {archive} (built in {build_s:.0f} s)")
    load_before = os.getloadavg()[0]
    indexes = args.root / "indexes"

    def index(workers: int) -> Callable[[], Any]:
        def run() -> Any:
            where = indexes / f"w{workers}-{time.monotonic_ns()}"
            update = update_index(archive, where, workers=workers)
            assert update.instances == n and update.files_read == n
            return where

        return run

    best: dict[tuple[str, str], dict[str, Any]] = {}  # (cache, variant) -> fastest round
    cold_note = None if not args.no_cold else "skipped (--no-cold)"
    floor_crawl(archive)  # warm the page cache

    def record(cache: str, name: str, workers: int, seconds: float, cpu: float) -> None:
        key = (cache, name)
        if key not in best or seconds < best[key]["seconds"]:
            best[key] = {"cache": cache, "variant": name, "workers": workers, "seconds": seconds, "cpu": cpu}

    for _round in range(args.repeat):  # rounds interleave the variants; the fastest of each is kept
        for cache in ("warm", "cold"):
            if cache == "cold" and cold_note:
                break
            first_index: Path | None = None
            variants: list[tuple[str, int, Callable[[], Any]]] = [
                ("floor: first 8 KiB of each file", 1, lambda: floor_crawl(archive)),
                ("naive: pydicom whole file + sha256", 1, lambda: naive_crawl(archive)),
                ("index, 1 process", 1, index(1)),
                (f"index, {args.workers} worker processes", args.workers, index(args.workers)),
            ]
            for name, workers, fn in variants:
                if cache == "cold":
                    cold_note = drop_caches()
                    if cold_note:
                        break
                seconds, cpu, out = timed(fn)
                if isinstance(out, Path) and workers == args.workers:
                    first_index = out
                record(cache, name, workers, seconds, cpu)
            if first_index is not None:
                if cache == "cold":
                    drop_caches()
                seconds, cpu, _ = timed(partial(update_index, archive, first_index, workers=args.workers))
                runs = read_runs(first_index).to_pylist()
                assert runs[-1]["files_read"] == 0 and runs[-1]["unchanged"] == n
                record(cache, "re-crawl, unchanged archive", 1, seconds, cpu)
            shutil.rmtree(indexes, ignore_errors=True)
    rows = list(best.values())
    micro = header_parse_micro(archive)

    naive = {r["cache"]: r for r in rows if r["variant"].startswith("naive")}
    first = {r["cache"]: r["seconds"] for r in rows if r["variant"].startswith(f"index, {args.workers}")}
    print()
    print(
        f"{'cache':6} {'variant':42} {'workers':>7} {'wall s':>7} {'files/s':>8} {'vs naive':>9}"
        f" {'CPU s':>7} {'vs naive':>9}"
    )
    for r in rows:
        base = naive.get(r["cache"])
        r["files_per_s"] = n / r["seconds"]
        r["speedup_vs_naive"] = base["seconds"] / r["seconds"] if base else None
        r["cpu_speedup_vs_naive"] = base["cpu"] / r["cpu"] if base and r["cpu"] > 0 else None
        if r["variant"].startswith("re-crawl"):
            r["share_of_first_crawl"] = r["seconds"] / first[r["cache"]]
        wall_ratio = f"{r['speedup_vs_naive']:.2f}x" if r["speedup_vs_naive"] else ""
        cpu_ratio = f"{r['cpu_speedup_vs_naive']:.2f}x" if r["cpu_speedup_vs_naive"] else ""
        print(
            f"{r['cache']:6} {r['variant']:42} {r['workers']:>7} {r['seconds']:>7.2f} "
            f"{r['files_per_s']:>8.0f} {wall_ratio:>9} {r['cpu']:>7.2f} {cpu_ratio:>9}"
        )
    for r in rows:
        if "share_of_first_crawl" in r:
            print(f"{r['cache']}: re-crawl took {100 * r['share_of_first_crawl']:.1f} % of the first crawl")
    if cold_note:
        print(f"cold cache: not measured ({cold_note})")
    load_after = os.getloadavg()[0]
    print(f"load average (1 min): {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs")
    print("\nheader parse, bytes in memory, best of 3 over 200 files (ms per file):")
    for name, ms in micro.items():
        print(f"  {name:32} {ms:7.3f}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": sys.version.split()[0],
                    "platform": platform.platform(),
                    "load": os.getloadavg(),
                },
                "archive": {"files": n, "bytes": size, "root": str(archive)},
                "cold_cache": cold_note or "dropped before each measurement",
                "rows": rows,
                "header_parse_ms": micro,
                "git": subprocess.run(
                    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
                ).stdout.strip(),
            },
            indent=1,
        )
    )
    print(f"\nwritten {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
