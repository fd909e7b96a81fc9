"""Foundation benchmark: platform overhead of the Prefect flow against a plain script.

On the two real NSCLC CT archives (LUNG1-001, LUNG1-002) it measures, in one run,
the time per case split by stage for

* a plain sequential script calling the library directly (no Prefect, no Dask),
* the ``process-cohort`` flow on the in-process thread runner with one worker
  (serial, so directly comparable with the plain script),
* the flow on a Dask LocalCluster with two worker processes,

and prints a table with the ratio of each to the plain script. One local Prefect
server is started up front (its start time is reported on its own) and every
flow run talks to it, so server start-up is not charged to the flow.

Run: ``.venv/bin/python benchmarks/bench_foundation.py [--repeat N]`` (or
``make bench``). ``COHORT_DATA`` may point at the ``data`` folder that holds
``nsclc-radiomics/``. Results also go to ``benchmarks/results/foundation.json``.
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pydicom

from cohort.curate.rtstruct import rasterise_rtstruct, read_roi_infos
from cohort.curate.select import WorkItem, plan_work
from cohort.curate.series import read_series
from cohort.index.crawl import index_files, list_archive
from cohort.radiomics.extract import extract_features
from cohort.spec import CohortSpec, build_spec

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "foundation.json"
ARCHIVES = ("LUNG1-001_20180209_CT.tar.xz", "LUNG1-002_20180526_CT.tar.xz")

#: Table columns (stages, per case) in print order.
STAGES = ("index", "read_series", "mask", "radiomics")
#: Stage timers behind the columns (``mask`` = read_rtstruct + rasterise).
STAGE_KEYS = ("index", "read_series", "read_rtstruct", "rasterise", "radiomics")

#: The Prefect/Dask environment, set before anything imports prefect or flows.
QUIET_ENV = {
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "DASK_LOGGING__DISTRIBUTED": "error",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


@dataclass(frozen=True)
class Timing:
    """One measured variant: seconds per case by stage, and the wall total per case."""

    label: str
    stages: dict[str, float]
    total: float
    cases: int
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------- data


def data_dir() -> Path:
    default = REPO.parent / "shared" / "data"
    return Path(os.environ.get("COHORT_DATA") or default) / "nsclc-radiomics"


def extract_archives(source: Path, target: Path) -> list[Path]:
    """Unpack each case tarball into ``target``; return the case folders."""
    folders = []
    for name in ARCHIVES:
        tarball = source / name
        if not tarball.is_file():
            sys.exit(f"missing {tarball}; set COHORT_DATA to the folder that holds nsclc-radiomics/")
        with tarfile.open(tarball) as tar:
            tar.extractall(target, filter="data")
        folders.append(target / name.removesuffix(".tar.xz"))
    return folders


def make_spec(archive: Path, store: Path, kind: str = "threads", n_workers: int = 1) -> CohortSpec:
    return build_spec(
        {"archive": str(archive), "store": str(store), "executor": {"kind": kind, "n_workers": n_workers}},
        environ={},
    )


def table_stages(seconds: dict[str, float], n: int) -> dict[str, float]:
    """Table columns per case from summed stage seconds keyed by :data:`STAGE_KEYS`."""
    per_case = {key: seconds.get(key, 0.0) / n for key in STAGE_KEYS}
    return {
        "index": per_case["index"],
        "read_series": per_case["read_series"],
        "mask": per_case["read_rtstruct"] + per_case["rasterise"],
        "radiomics": per_case["radiomics"],
    }


# ------------------------------------------------------------ plain script


class Stopwatch:
    """Accumulates seconds per stage name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def process_item_plainly(item: WorkItem, params: dict[str, Any], watch: Stopwatch) -> int:
    """read_series, RTSTRUCT masks and radiomics for one item; returns feature rows made."""
    with watch.stage("read_series"):
        image = read_series(item.image_paths, series_uid=item.series_uid)
    with watch.stage("read_rtstruct"):
        structure_set = pydicom.dcmread(item.rtstruct_path)
        numbers = {info.name: info.number for info in read_roi_infos(structure_set)}
    rows = 0
    for roi in item.rois:
        with watch.stage("rasterise"):
            mask = rasterise_rtstruct(structure_set, numbers[roi.source_name], image).mask
        with watch.stage("radiomics"):
            extract_features(image, mask, params)
        rows += 1
    return rows


def plain_case(case_dir: Path, spec: CohortSpec, params: dict[str, Any]) -> dict[str, float]:
    """Every step of the flow for one case folder, sequentially; seconds by stage."""
    watch = Stopwatch()
    with watch.stage("index"):
        instances, _quarantine = index_files(list_archive(case_dir))
    with watch.stage("plan"):
        items, _decisions = plan_work(instances, spec)
    if len(items) != 1:
        raise RuntimeError(f"{case_dir.name}: expected one work item, got {len(items)}")
    rois = process_item_plainly(items[0], params, watch)
    return {**watch.seconds, "rois": rois}


def measure_plain(cases: Sequence[Path], spec: CohortSpec) -> Timing:
    params = spec.radiomics_params()
    cpu, start = time.process_time(), time.perf_counter()
    per_case = {case.name: plain_case(case, spec, params) for case in cases}
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = len(cases)
    summed = {key: sum(c.get(key, 0.0) for c in per_case.values()) for key in STAGE_KEYS}
    extra = {
        "per_case": per_case,
        "plan_s_per_case": sum(c["plan"] for c in per_case.values()) / n,
        "main_cpu_s": cpu,
    }
    return Timing("plain script", table_stages(summed, n), wall / n, n, extra)


# -------------------------------------------------------------------- flow


def flow_stages(seconds: dict[str, float], n: int) -> dict[str, float]:
    """Per-case columns from ``RunSummary.seconds``; worker stages are summed over shards."""
    return table_stages({key.removeprefix("stage_"): value for key, value in seconds.items()}, n)


def prefect_server_cpu() -> float:
    """CPU seconds used so far by the Prefect server this process started (0 if none)."""
    for child in psutil.Process().children(recursive=True):
        try:
            if "server" in child.cmdline() and "prefect" in " ".join(child.cmdline()):
                times = child.cpu_times()
                return float(times.user + times.system)
        except psutil.Error:
            continue
    return 0.0


def measure_flow(label: str, archive: Path, scratch: Path, kind: str, n_workers: int) -> Timing:
    """One ``run_cohort`` into a fresh store (nothing skipped), timed from outside."""
    from flows.process_cohort import run_cohort

    spec = make_spec(archive, Path(tempfile.mkdtemp(prefix="store-", dir=scratch)), kind, n_workers)
    server_cpu, cpu, start = prefect_server_cpu(), time.process_time(), time.perf_counter()
    summary = run_cohort(spec)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    server_cpu = prefect_server_cpu() - server_cpu
    n = summary.cases_processed
    if n == 0 or summary.cases_failed or summary.failures:
        raise RuntimeError(f"{label}: flow did not process every case cleanly: {summary}")
    seconds = dict(summary.seconds)
    outside = wall - seconds.get("index", 0.0) - seconds.get("process", 0.0)
    extra = {
        "wall_s": wall,
        # CPU of this process (flow, client, and with threads also the tasks) and of the server.
        "main_cpu_s": cpu,
        "prefect_server_cpu_s": server_cpu,
        "rows_written": summary.rows_written,
        "shards": summary.shards,
        "summary_seconds": seconds,
        # Flow start/finish, plan_work and writes outside the two timed phases.
        "outside_phases_s": outside,
        # Process phase minus the stage time inside it (task bookkeeping, part files,
        # and with parallel workers negative, since stages overlap).
        "process_minus_stages_s": seconds.get("process", 0.0)
        - sum(v for k, v in seconds.items() if k.startswith("stage_")),
    }
    return Timing(label, flow_stages(seconds, n), wall / n, n, extra)


# ---------------------------------------------------------------- repeats


def best_of_interleaved(repeat: int, variants: Sequence[Callable[[], Timing]]) -> list[Timing]:
    """Run every variant once per round, ``repeat`` rounds; keep each one's fastest run.

    Rounds interleave the variants so that slow drift of the machine does not
    favour whichever ran first. The fastest run is picked by total per case and
    kept whole, so its stage split stays consistent.
    """
    rounds = []
    for i in range(repeat):
        rounds.append([measure() for measure in variants])
        done = ", ".join(f"{t.label} {t.total:.2f} s/case" for t in rounds[-1])
        print(f"  round {i + 1}/{repeat}: {done}", flush=True)
    best = []
    for runs in zip(*rounds, strict=True):
        fastest = min(runs, key=lambda t: t.total)
        totals = [t.total for t in runs]
        best.append(
            Timing(
                fastest.label,
                fastest.stages,
                fastest.total,
                fastest.cases,
                {**fastest.extra, "totals_all_repeats": totals},
            )
        )
    return best


# ------------------------------------------------------------------ report


def render_table(rows: Sequence[Timing]) -> str:
    baseline = rows[0].total
    header = f"{'variant':<18}" + "".join(f"{s:>13}" for s in STAGES) + f"{'total/case':>13}{'vs plain':>10}"
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = "".join(f"{row.stages[s]:>13.2f}" for s in STAGES)
        lines.append(f"{row.label:<18}{cells}{row.total:>13.2f}{row.total / baseline:>9.2f}x")
    return "\n".join(lines)


def render_notes(plain: Timing, threads: Timing, server_s: float) -> str:
    overhead = 100.0 * (threads.total / plain.total - 1.0)
    verdict = "OK" if overhead <= 10.0 else "ABOVE TARGET"
    per_case = threads.cases
    return "\n".join(
        [
            "Seconds per case. Flow stage columns are worker time summed over shards / cases;",
            "'total/case' is wall time / cases (for dask x2 stages overlap, so they may add up to more).",
            f"mask = read RTSTRUCT + rasterise; the plain total also holds plan_work "
            f"({plain.extra['plan_s_per_case']:.2f} s/case).",
            f"Flow threads x1 overhead vs plain: {overhead:+.1f} %  (target <= 10 %: {verdict})",
            f"  outside the index/process phases (flow start/end, plan, writes): "
            f"{threads.extra['outside_phases_s'] / per_case:.2f} s/case",
            f"  process phase minus stage time (tasks, part files): "
            f"{threads.extra['process_minus_stages_s'] / per_case:.2f} s/case",
            f"  CPU s/case, this process: plain {plain.extra['main_cpu_s'] / plain.cases:.2f}, "
            f"flow {threads.extra['main_cpu_s'] / per_case:.2f}; "
            f"Prefect server during the flow: {threads.extra['prefect_server_cpu_s'] / per_case:.2f}",
            f"Prefect server start (once, in no row): {server_s:.2f} s",
            spread_line([plain, threads]),
        ]
    )


def spread_line(rows: Sequence[Timing]) -> str:
    """Run-to-run noise: slowest over fastest total per case, per variant."""
    parts = []
    for row in rows:
        totals = row.extra["totals_all_repeats"]
        parts.append(f"{row.label} {100.0 * (max(totals) / min(totals) - 1.0):.0f} %")
    n_rounds = len(rows[0].extra["totals_all_repeats"])
    return f"Run-to-run spread of total/case over {n_rounds} round(s): " + ", ".join(parts)


def write_json(path: Path, rows: Sequence[Timing], server_s: float, repeat: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "foundation",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "repeat": repeat,
        "prefect_server_start_s": server_s,
        "overhead_threads_vs_plain_pct": 100.0 * (rows[1].total / rows[0].total - 1.0),
        "rows": [{**asdict(r), "ratio_vs_plain": r.total / rows[0].total} for r in rows],
    }
    path.write_text(json.dumps(payload, indent=2, default=str))


# -------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=1, help="repetitions per variant; the minimum is kept")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cohort-bench-") as tmp:
        scratch = Path(tmp)
        os.environ.update({**QUIET_ENV, "PREFECT_HOME": str(scratch / "prefect")})
        from flows.runtime import prefect_api  # after the environment is set

        archive = scratch / "archive"
        cases = extract_archives(data_dir(), archive)
        spec = make_spec(archive, scratch / "unused-store")  # also warms the extractor cache
        print(f"{len(cases)} case(s) extracted under {archive}; repeat={args.repeat}", flush=True)

        start = time.perf_counter()
        with prefect_api(home=scratch / "prefect"):  # the plain script runs beside the idle server too
            server_s = time.perf_counter() - start
            rows = best_of_interleaved(
                args.repeat,
                [
                    lambda: measure_plain(cases, spec),
                    lambda: measure_flow("flow threads x1", archive, scratch, "threads", 1),
                    lambda: measure_flow("flow dask x2", archive, scratch, "dask", 2),
                ],
            )
        plain, threads = rows[0], rows[1]
    print()
    print(render_table(rows))
    print()
    print(render_notes(plain, threads, server_s))
    write_json(RESULTS, rows, server_s, args.repeat)
    print(f"\nwrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
