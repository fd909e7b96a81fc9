"""Scale benchmark: the ``process-cohort`` flow on a synthetic archive of >= 1,000 patients.

One command measures, in one run, on a Dask ``LocalCluster`` of 2 worker processes
(one thread each) against one local Prefect server started up front:

* **synth**: writing the archive (``write_scale_archive``: small CTs of 128 x 128 by
  default, 12 scanners/kernels, an RTSTRUCT each, fresh UIDs, ``--synth-workers``
  processes);
* **no-op flow**: ``run_cohort`` with ``executor.noop_stages`` (the same index,
  selection, shards and tasks, no image read, no feature): orchestration overhead
  per series = (flow wall time - index phase) / series, target <= 10 ms;
* **real flow**: ``run_cohort`` with the real stages (CT preset) on the first
  ``--real-patients`` patients (default all): cases/hour;
* **single-process baseline**, in this process: ``index_files`` and ``plan_cohort``
  on the real flow's whole archive (measured), ``process_shard`` on a random sample
  of ``--sample`` cases (extrapolated by case count, after one warm-up case, without
  the store writes): parallel efficiency =
  (single-process time / 2) / real flow wall time, target >= 90 % on 2 cores;
* **memory**: a child process runs ``process_shard`` on one 1,000-slice 512 x 512
  CT (after a warm-up case); peak = ``VmHWM`` above the RSS before it.

Run: ``.venv/bin/python benchmarks/bench_scale.py --patients 1000`` (``make bench``
runs it); ``--patients 200`` for a short run. About 25-30 minutes at 1,000 patients
on 2 busy cores. Results also go to ``benchmarks/results/scale.json``. The archive
lives under ``--workdir`` (default: a temporary folder, deleted afterwards); with
``--workdir`` it is kept and reused by the next run with the same archive options.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "scale.json"

#: The Prefect/Dask environment, set before anything imports prefect or flows.
QUIET_ENV = {
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "DASK_LOGGING__DISTRIBUTED": "error",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
#: Dask workers of both flows (the machine this was written for has 2 cores).
FLOW_WORKERS = 2
OVERHEAD_TARGET_MS = 10.0
EFFICIENCY_TARGET = 0.90


@dataclass(frozen=True)
class ArchiveInfo:
    """The archives one run uses (written now or reused from ``--workdir``)."""

    root: Path  # every patient: the no-op flow's archive
    real_root: Path  # the first --real-patients patients: the real flow's archive
    long_root: Path | None  # one warm-up patient + the long series
    patients: int
    real_patients: int
    files: int
    bytes: int
    synth_seconds: float | None  # measured when written (by an earlier run when reused)
    long_synth_seconds: float | None
    reused: bool
    options: dict[str, Any]


@dataclass(frozen=True)
class FlowRun:
    """One ``run_cohort`` timed from outside."""

    label: str
    wall_s: float
    files: int
    series: int
    cases_selected: int
    cases_processed: int
    failures: int
    rows_written: int
    shards: int
    seconds: dict[str, float]
    load_before: tuple[float, float, float]


@dataclass(frozen=True)
class Baseline:
    """Single-process time of the whole cohort: index and plan measured, processing extrapolated."""

    sample_cases: int
    total_cases: int
    files: int
    index_s: float
    plan_s: float
    process_sample_s: float
    stage_sample_s: dict[str, float]
    warmup_s: float

    @property
    def process_s(self) -> float:
        return self.process_sample_s / self.sample_cases * self.total_cases

    @property
    def total_s(self) -> float:
        return self.index_s + self.plan_s + self.process_s


@dataclass(frozen=True)
class Memory:
    """Peak RSS of the process running ``process_shard`` on the long series."""

    slices: int
    matrix: int
    rss_before_mib: float
    peak_mib: float
    seconds: float
    rows: int
    failures: int
    reset_ok: bool

    @property
    def delta_mib(self) -> float:
        return self.peak_mib - self.rss_before_mib


@dataclass(frozen=True)
class Result:
    archive: dict[str, Any]
    noop: FlowRun
    real: FlowRun
    baseline: Baseline
    memory: Memory | None
    cluster_start_s: float
    prefect_server_start_s: float
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- archive


def archive_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "patients": args.patients,
        "real_patients": args.real_patients or args.patients,
        "matrix": args.matrix,
        "seed": args.seed,
        "long_slices": 0 if args.skip_memory else args.long_slices,
        "long_matrix": args.long_matrix,
    }


def prepare_archives(workdir: Path, args: argparse.Namespace) -> ArchiveInfo:
    """Write the archives (or reuse those of an earlier run with the same options)."""
    from cohort.synth.archive import write_scale_archive

    options = archive_options(args)
    manifest = workdir / "archive.json"
    root, long_root = workdir / "archive", workdir / "long"
    real_root = root / "real"
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        if saved["options"] == options:
            print(f"reusing the archive in {root}", flush=True)
            return ArchiveInfo(
                root,
                real_root,
                long_root if options["long_slices"] else None,
                options["patients"],
                options["real_patients"],
                saved["files"],
                saved["bytes"],
                saved.get("synth_seconds"),
                saved.get("long_synth_seconds"),
                True,
                options,
            )
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(long_root, ignore_errors=True)
    n_real = options["real_patients"]
    print(f"writing {options['patients']} patients under {root} ...", flush=True)
    start = time.perf_counter()
    common = {"matrix": args.matrix, "workers": args.synth_workers, "seed": args.seed, "fresh_uids": True}
    real = write_scale_archive(real_root, n_real, **common)
    files, size = real.files, real.bytes
    if options["patients"] > n_real:
        rest = write_scale_archive(
            root / "rest", options["patients"] - n_real, first_patient=n_real + 1, **common
        )
        files, size = files + rest.files, size + rest.bytes
    synth_s = time.perf_counter() - start
    print(f"  {files:,} files, {size / 2**30:.2f} GiB in {synth_s:.0f} s", flush=True)
    long_s = None
    if options["long_slices"]:
        start = time.perf_counter()
        write_scale_archive(
            long_root,
            1,
            matrix=64,
            slices=16,
            workers=1,
            seed=args.seed,
            fresh_uids=True,
            long_series=options["long_slices"],
            long_matrix=options["long_matrix"],
        )
        long_s = time.perf_counter() - start
        print(f"  long series: {options['long_slices']} slices in {long_s:.0f} s", flush=True)
    manifest.write_text(
        json.dumps(
            {
                "options": options,
                "files": files,
                "bytes": size,
                "synth_seconds": synth_s,
                "long_synth_seconds": long_s,
            }
        )
    )
    return ArchiveInfo(
        root,
        real_root,
        long_root if options["long_slices"] else None,
        options["patients"],
        n_real,
        files,
        size,
        synth_s,
        long_s,
        False,
        options,
    )


# --------------------------------------------------------------------------------------------- phases


class PhaseLog:
    """Each measured phase, saved as soon as it is measured (``<workdir>/phases.json``).

    With ``--resume`` a rerun on the same workdir and archive options reuses the phases
    recorded there (and the flows' stores) instead of measuring them again.
    """

    def __init__(self, path: Path, options: dict[str, Any], resume: bool) -> None:
        self.path, self.options = path, options
        saved = json.loads(path.read_text()) if resume and path.exists() else {}
        self.phases: dict[str, Any] = saved.get("phases", {}) if saved.get("options") == options else {}
        self.reused: list[str] = []

    def get(self, name: str) -> Any:
        if name in self.phases:
            self.reused.append(name)
            print(f"{name}: reused from {self.path}", flush=True)
        return self.phases.get(name)

    def put(self, name: str, value: dict[str, Any]) -> None:
        self.phases[name] = value
        self.path.write_text(json.dumps({"options": self.options, "phases": self.phases}, default=str))


# ---------------------------------------------------------------------------------------------- flows


def make_spec(archive: Path, store: Path, *, noop: bool) -> Any:
    from cohort.spec import build_spec

    executor = {"kind": "dask", "n_workers": FLOW_WORKERS, "threads_per_worker": 1, "noop_stages": noop}
    return build_spec({"archive": str(archive), "store": str(store), "executor": executor}, environ={})


def measure_flow(label: str, archive: Path, store: Path, *, noop: bool) -> FlowRun:
    """One ``run_cohort`` into a fresh store, timed from outside (cluster start and stop included)."""
    from flows.process_cohort import run_cohort

    spec = make_spec(archive, store, noop=noop)
    load = os.getloadavg()
    print(f"{label}: running (load {load[0]:.1f}) ...", flush=True)
    start = time.perf_counter()
    summary = run_cohort(spec)
    wall = time.perf_counter() - start
    run = FlowRun(
        label,
        wall,
        summary.files_seen,
        summary.image_series,
        summary.cases_selected,
        summary.cases_processed,
        summary.failures,
        summary.rows_written,
        summary.shards,
        dict(summary.seconds),
        load,
    )
    print(f"  {wall:.1f} s; {summary.cases_selected} cases, {summary.rows_written} rows", flush=True)
    return run


def measure_cluster_start() -> float:
    """Start and close a LocalCluster like the flow's, alone (part of every flow's wall time)."""
    from distributed import Client, LocalCluster

    start = time.perf_counter()
    with (
        LocalCluster(
            n_workers=FLOW_WORKERS, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(FLOW_WORKERS)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------- baseline


def measure_baseline(archive: Path, sample_size: int) -> Baseline:
    """Single-process time: index_files and plan_cohort on everything, process_shard on a sample."""
    from cohort.curate.select import plan_cohort
    from cohort.index.crawl import index_files, list_archive
    from cohort.radiomics.extract import feature_set_name
    from cohort.shard import process_shard
    from cohort.spec import settings_hash
    from flows.process_cohort import shard_settings

    spec = make_spec(archive, archive.parent / "unused-store", noop=False)
    print(f"single-process baseline (load {os.getloadavg()[0]:.1f}) ...", flush=True)
    start = time.perf_counter()
    files = list_archive(archive)
    instances, _ = index_files(files)
    index_s = time.perf_counter() - start
    start = time.perf_counter()
    items = list(plan_cohort(instances, spec).items)
    plan_s = time.perf_counter() - start
    rng = random.Random(0)
    picked = rng.sample(range(len(items)), min(len(items), sample_size + 1))
    warmup, sample = items[picked[0]], [items[i] for i in picked[1:]]

    params = spec.radiomics_params()
    digest = settings_hash(spec.feature_settings())
    settings = shard_settings(spec, params, digest, feature_set_name(digest), "baseline")
    start = time.perf_counter()
    process_shard([warmup], settings)  # imports, the extractor cache: once per worker in the flow too
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    result = process_shard(sample, settings)
    process_sample_s = time.perf_counter() - start
    if result.failures.num_rows:
        reasons = result.failures.column("reason").to_pylist()[:3]
        raise RuntimeError(f"baseline: {result.failures.num_rows} failure(s) in the sample, e.g. {reasons}")
    print(
        f"  index {len(files):,} files {index_s:.1f} s, plan {plan_s:.1f} s, "
        f"{len(sample)} cases {process_sample_s:.1f} s",
        flush=True,
    )
    return Baseline(
        len(sample),
        len(items),
        len(files),
        index_s,
        plan_s,
        process_sample_s,
        dict(result.seconds),
        warmup_s,
    )


# --------------------------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset this process' RSS high-water mark (``VmHWM``); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(archive: str, out: str) -> None:
    """In a fresh process: warm up on the small case, then process_shard on the long series.

    ``VmHWM`` (not ``ru_maxrss``: on Linux a child's ``ru_maxrss`` starts at its parent's
    peak) after a reset, against ``VmRSS`` just before.
    """
    import gc

    import pydicom

    from cohort.curate.select import plan_cohort
    from cohort.index.crawl import index_files, list_archive
    from cohort.radiomics.extract import feature_set_name
    from cohort.shard import process_shard
    from cohort.spec import settings_hash
    from flows.process_cohort import shard_settings

    spec = make_spec(Path(archive), Path(archive) / "unused-store", noop=False)
    instances, _ = index_files(list_archive(archive))
    items = sorted(plan_cohort(instances, spec).items, key=lambda item: item.n_slices)
    small, long = items[0], items[-1]
    params = spec.radiomics_params()
    digest = settings_hash(spec.feature_settings())
    settings = shard_settings(spec, params, digest, feature_set_name(digest), "memory")
    process_shard([small], settings)
    del instances
    gc.collect()
    rss_before = proc_status_kib("VmRSS")
    reset_ok = reset_peak_rss()
    start = time.perf_counter()
    result = process_shard([long], settings)
    seconds = time.perf_counter() - start
    peak = proc_status_kib("VmHWM")
    matrix = int(pydicom.dcmread(long.image_paths[0], stop_before_pixels=True).Rows)
    Path(out).write_text(
        json.dumps(
            {
                "slices": long.n_slices,
                "matrix": matrix,
                "rss_before_mib": rss_before / 1024,
                "peak_mib": peak / 1024,
                "seconds": seconds,
                "rows": result.features.num_rows,
                "failures": result.failures.num_rows,
                "reset_ok": reset_ok,
            }
        )
    )


def measure_memory(long_root: Path, scratch: Path) -> Memory:
    out = scratch / "memory.json"
    print(
        f"memory: process_shard on the long series in a child (load {os.getloadavg()[0]:.1f}) ...", flush=True
    )
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(long_root), str(out)],
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    memory = Memory(**json.loads(out.read_text()))
    print(f"  peak {memory.peak_mib:.0f} MiB (+{memory.delta_mib:.0f}) in {memory.seconds:.1f} s", flush=True)
    return memory


# --------------------------------------------------------------------------------------------- report


def overhead_ms(noop: FlowRun) -> float:
    return (noop.wall_s - noop.seconds.get("index", 0.0)) / noop.series * 1e3


def efficiency(result: Result) -> float:
    return (result.baseline.total_s / FLOW_WORKERS) / result.real.wall_s


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def render(result: Result) -> str:
    a, noop, real, base = result.archive, result.noop, result.real, result.baseline
    per_series = overhead_ms(noop)
    eff = efficiency(result)
    noop_rest = noop.wall_s - noop.seconds.get("index", 0.0) - noop.seconds.get("process", 0.0)
    real_rest = real.wall_s - real.seconds.get("index", 0.0) - real.seconds.get("process", 0.0)
    stages = ", ".join(f"{k} {v / base.sample_cases:.2f}" for k, v in base.stage_sample_s.items() if v)
    synth = "?" if a["synth_seconds"] is None else f"{a['synth_seconds']:.0f}"
    if a["reused"]:
        synth += " (earlier run)"
    rows = [
        ("phase", "seconds", "per series / case", "note"),
        (
            f"synth: {a['patients']} patients, {a['files']:,} files, {a['bytes'] / 2**30:.2f} GiB",
            synth,
            "",
            f"{a['options']['matrix']}x{a['options']['matrix']}, fresh UIDs",
        ),
        (f"no-op flow ({noop.series} series, {noop.shards} shards)", f"{noop.wall_s:.1f}", "", ""),
        (
            "  index phase",
            f"{noop.seconds.get('index', 0):.1f}",
            "",
            f"{noop.files / noop.seconds['index']:.0f} files/s",
        ),
        ("  shard phase (no image work)", f"{noop.seconds.get('process', 0):.1f}", "", ""),
        ("  rest: cluster, flow, plan, writes", f"{noop_rest:.1f}", "", ""),
        (
            "  orchestration overhead (wall - index)",
            f"{noop.wall_s - noop.seconds.get('index', 0):.1f}",
            f"{per_series:.1f} ms",
            f"target <= {OVERHEAD_TARGET_MS:.0f} ms: {verdict(per_series <= OVERHEAD_TARGET_MS)}",
        ),
        (f"real flow ({real.cases_processed}/{real.cases_selected} cases)", f"{real.wall_s:.1f}", "", ""),
        ("  index phase", f"{real.seconds.get('index', 0):.1f}", "", ""),
        ("  shard phase", f"{real.seconds.get('process', 0):.1f}", "", ""),
        ("  rest: cluster, flow, plan, writes", f"{real_rest:.1f}", "", ""),
        ("  cases/hour", "", f"{3600 * real.cases_processed / real.wall_s:,.0f}", ""),
        (f"single process ({base.sample_cases}-case sample, extrapolated)", f"{base.total_s:.1f}", "", ""),
        ("  index_files (all files)", f"{base.index_s:.1f}", "", f"{base.files / base.index_s:.0f} files/s"),
        ("  plan_cohort (whole index)", f"{base.plan_s:.1f}", "", ""),
        (
            f"  process_shard ({base.sample_cases} cases, x {base.total_cases / base.sample_cases:.1f})",
            f"{base.process_s:.1f}",
            f"{base.process_sample_s / base.sample_cases:.2f} s",
            "",
        ),
        ("  cases/hour, one process", "", f"{3600 * base.total_cases / base.total_s:,.0f}", ""),
        (
            f"parallel efficiency (single / {FLOW_WORKERS}) / flow",
            "",
            f"{100 * eff:.0f} %",
            f"target >= {100 * EFFICIENCY_TARGET:.0f} %: {verdict(eff >= EFFICIENCY_TARGET)}",
        ),
    ]
    if result.memory is not None:
        m = result.memory
        rows.append(
            (
                f"peak worker RSS, {m.slices} x {m.matrix} x {m.matrix} CT",
                f"{m.seconds:.1f}",
                f"{m.peak_mib:,.0f} MiB",
                f"+{m.delta_mib:,.0f} MiB over {m.rss_before_mib:,.0f} MiB before",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip())
        if i == 0:
            lines.append("-" * len(lines[0]))
    in_flow = {
        key.removeprefix("stage_"): value / max(real.cases_processed, 1)
        for key, value in real.seconds.items()
        if key.startswith("stage_") and value
    }
    notes = [
        "Per-case stage seconds inside the real flow's workers: "
        + ", ".join(f"{k} {v:.2f}" for k, v in in_flow.items())
        + f" (sum {sum(in_flow.values()):.2f}; single process "
        f"{sum(base.stage_sample_s.values()) / base.sample_cases:.2f}).",
        f"Per-case stage seconds, single process: {stages}; "
        f"warm-up case {base.warmup_s:.1f} s (not counted).",
        f"Dask LocalCluster of {FLOW_WORKERS} started and closed alone: {result.cluster_start_s:.1f} s "
        "(inside each flow's 'rest').",
        f"Prefect server start (once, in no row): {result.prefect_server_start_s:.1f} s.",
        f"Long series ({a['options']['long_slices']} slices of {a['options']['long_matrix']}^2) written in "
        f"{a['long_synth_seconds'] or 0:.0f} s by one process.",
        f"Load average before: no-op {noop.load_before[0]:.1f}, real {real.load_before[0]:.1f} "
        f"on {os.cpu_count()} CPUs (others share the machine: read ratios, not absolutes).",
    ]
    if result.extra.get("reused_phases"):
        notes.append(f"Reused from an earlier run (--resume): {', '.join(result.extra['reused_phases'])}.")
    return "\n".join([*lines, "", *notes])


def write_json(result: Result, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "scale",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_after": os.getloadavg(),
        },
        "orchestration_overhead_ms_per_series": overhead_ms(result.noop),
        "cases_per_hour": 3600 * result.real.cases_processed / result.real.wall_s,
        "single_process_s": result.baseline.total_s,
        "parallel_efficiency": efficiency(result),
        "peak_worker_rss_mib": result.memory.peak_mib if result.memory else None,
        **asdict(result),
    }
    path.write_text(json.dumps(payload, indent=2, default=str))


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--patients", type=int, default=1000, help="patients of the archive (no-op flow)")
    parser.add_argument(
        "--real-patients", type=int, help="patients of the real flow: the first N (default: all)"
    )
    parser.add_argument("--matrix", type=int, default=128, help="rows = columns of the CTs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synth-workers", type=int, default=2, help="processes writing the archive")
    parser.add_argument("--sample", type=int, default=100, help="cases of the single-process sample (>= 50)")
    parser.add_argument("--long-slices", type=int, default=1000, help="slices of the memory case")
    parser.add_argument("--long-matrix", type=int, default=512, help="rows = columns of the memory case")
    parser.add_argument("--skip-memory", action="store_true", help="no long series, no memory measurement")
    parser.add_argument("--workdir", type=Path, help="keep (and reuse) the archive and stores here")
    parser.add_argument(
        "--resume", action="store_true", help="reuse phases measured by an earlier run in --workdir"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results")
    parser.add_argument("--memory-child", nargs=2, metavar=("ARCHIVE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is None:
        if args.real_patients and not 0 < args.real_patients <= args.patients:
            parser.error("--real-patients must be between 1 and --patients")
        if args.sample < 1:
            parser.error("--sample must be >= 1 (>= 50 for a usable extrapolation)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    if args.resume and args.workdir is None:
        sys.exit("--resume needs --workdir")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cohort-bench-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    stores = workdir / "stores"
    try:
        os.environ.update({**QUIET_ENV, "PREFECT_HOME": str(scratch / "prefect")})
        from flows.runtime import prefect_api  # after the environment is set

        archive = prepare_archives(workdir, args)
        log = PhaseLog(workdir / "phases.json", {**archive.options, "sample": args.sample}, args.resume)
        setup, noop_saved, real_saved = log.get("setup"), log.get("noop"), log.get("real")
        if setup is None or noop_saved is None or real_saved is None:
            start = time.perf_counter()
            with prefect_api(home=scratch / "prefect"):
                server_s = time.perf_counter() - start
                print(f"Prefect server up in {server_s:.1f} s", flush=True)
                log.put("setup", {"server_s": server_s, "cluster_s": measure_cluster_start()})
                setup = log.phases["setup"]
                for name, folder, noop_stages in (
                    ("noop", archive.root, True),
                    ("real", archive.real_root, False),
                ):
                    if log.phases.get(name) is None:
                        shutil.rmtree(stores / name, ignore_errors=True)
                        run = measure_flow(f"{name} flow", folder, stores / name, noop=noop_stages)
                        log.put(name, asdict(run))
        noop = flow_run(log.phases["noop"])
        real = flow_run(log.phases["real"])
        saved_baseline = log.get("baseline")
        if saved_baseline is None:
            baseline = measure_baseline(archive.real_root, args.sample)
            log.put("baseline", asdict(baseline))
        else:
            baseline = Baseline(**saved_baseline)
        memory = None
        if archive.long_root:
            saved_memory = log.get("memory")
            memory = Memory(**saved_memory) if saved_memory else measure_memory(archive.long_root, scratch)
            log.put("memory", asdict(memory))
        result = Result(
            {
                "patients": archive.patients,
                "real_patients": archive.real_patients,
                "files": archive.files,
                "bytes": archive.bytes,
                "synth_seconds": archive.synth_seconds,
                "long_synth_seconds": archive.long_synth_seconds,
                "reused": archive.reused,
                "synth_workers": args.synth_workers,
                "options": archive.options,
            },
            noop,
            real,
            baseline,
            memory,
            setup["cluster_s"],
            setup["server_s"],
            {"reused_phases": log.reused},
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(render(result))
    problems = [
        f"{run.label}: {what}"
        for run, what in (
            (noop, f"{noop.failures} failure row(s)" if noop.failures else ""),
            (real, f"{real.failures} failure row(s)" if real.failures else ""),
            (real, "not every case processed" if real.cases_processed != real.cases_selected else ""),
        )
        if what
    ]
    if problems:
        print("\nWARNING: " + "; ".join(problems))
    write_json(result, args.out)
    print(f"\nwrote {args.out}")


def flow_run(saved: dict[str, Any]) -> FlowRun:
    return FlowRun(**{**saved, "load_before": tuple(saved["load_before"])})


if __name__ == "__main__":
    main()
