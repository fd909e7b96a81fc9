"""Faults on a real Dask cluster: a worker killed mid-run, the whole run killed and started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from cohort.spec import build_spec
from cohort.synth.archive import write_demo_archive
from flows.process_cohort import run_cohort
from flows.progress import progress_hook

pytestmark = pytest.mark.slow

KEYS = ["series_uid", "rtstruct_uid", "roi_source"]
N_PATIENTS = 8


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fault-archive")
    write_demo_archive(root, N_PATIENTS, seed=3, matrix=96)
    return root


def _dask_worker_processes() -> list[psutil.Process]:
    """Worker processes of a LocalCluster started by this process (spawned by its nannies)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "spawn_main" in cmdline or "forkserver" in cmdline:
            found.append(child)
    return found


def _cohort_run(archive: Path, store: Path, api: str, *, stderr: int) -> subprocess.Popen[bytes]:
    """`cohort run` in its own process (and session) on one thread."""
    spec_file = store.parent / f"cohort-{os.urandom(4).hex()}.yaml"
    executor = {"kind": "threads", "n_workers": 1}
    spec_file.write_text(yaml.safe_dump({"archive": str(archive), "store": str(store), "executor": executor}))
    return subprocess.Popen(
        [sys.executable, "-m", "cohort", "run", str(spec_file)],
        env={**os.environ, "PREFECT_API_URL": api},
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,
    )


def test_a_worker_killed_mid_run_loses_no_case(prefect_server: str, archive: Path, tmp_path: Path) -> None:
    killed: list[int] = []

    def kill_a_worker(stage: str, done: int, total: int) -> None:
        if stage == "process" and done >= 1 and not killed and done < total:
            workers = _dask_worker_processes()
            assert workers, "no Dask worker process found"
            workers[0].send_signal(signal.SIGKILL)
            killed.append(workers[0].pid)

    spec = build_spec(
        {"archive": str(archive), "store": str(tmp_path / "store"), "executor": {"n_workers": 2}},
        environ={},
    )
    token = progress_hook.set(kill_a_worker)
    try:
        summary = run_cohort(spec)
    finally:
        progress_hook.reset(token)
    assert killed, "the run finished before a worker could be killed"
    assert (summary.cases_processed, summary.failures) == (N_PATIENTS, 0)
    features = pd.read_parquet(summary.feature_table)
    assert len(features) == N_PATIENTS and not features.duplicated(KEYS).any()


def test_a_run_killed_mid_way_and_started_again_redoes_nothing_and_duplicates_nothing(
    prefect_server: str, archive: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    run = _cohort_run(archive, store, prefect_server, stderr=subprocess.DEVNULL)
    table_glob = "features/radiomics-*/*.parquet"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(store.glob(table_glob)):
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    before = pd.read_parquet(next(store.glob("features/radiomics-*")), columns=KEYS)
    assert 0 < len(before) < N_PATIENTS, "kill the run between its first and its last case"
    assert not before.duplicated().any()

    spec = build_spec(
        {"archive": str(archive), "store": str(store), "executor": {"kind": "threads"}}, environ={}
    )
    again = run_cohort(spec)
    assert again.cases_skipped == len(before)  # finished work is not redone
    assert again.cases_processed == N_PATIENTS - len(before)
    after = pd.read_parquet(again.feature_table, columns=KEYS)
    assert len(after) == N_PATIENTS and not after.duplicated().any()


def test_two_runs_at_once_on_one_store_leave_one_row_per_case(
    prefect_server: str, archive: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    runs = [_cohort_run(archive, store, prefect_server, stderr=subprocess.PIPE) for _ in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err.decode()[-2000:]
    features = pd.read_parquet(next(store.glob("features/radiomics-*")), columns=KEYS)
    assert len(features) == N_PATIENTS and not features.duplicated().any()
