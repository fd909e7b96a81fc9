"""The runtime around a flow: a Prefect API to talk to, and the task runner.

With Dask worker *processes*, Prefect's ephemeral mode starts one temporary API
server per worker on the same SQLite file (seconds and hundreds of MiB each, and
lock contention). So unless ``PREFECT_API_URL`` points at a server already, the
platform starts one local Prefect server (SQLite under ``PREFECT_HOME``) on a
free loopback port for the duration of the run, and every process uses it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cohort.errors import CohortError
from cohort.spec import ExecutorSpec

SERVER_START_TIMEOUT = 90.0


def default_prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".cache" / "cohort" / "prefect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def parent_death_signal(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to signal the server (SIGTERM) when its parent dies.

    Without it, a CLI killed with SIGKILL leaves the server running. Everything the
    hook needs is resolved here, in the parent, so the forked child runs no import.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig, number = 1, int(sig)

    def hook() -> None:
        prctl(pr_set_pdeathsig, number)

    return hook


@contextmanager
def local_prefect_server(
    home: Path | None = None, *, host: str = "127.0.0.1", port: int | None = None, ui: bool = False
) -> Iterator[str]:
    """Start ``prefect server start`` (a free loopback port by default); yield its API URL.

    Without the UI the server also runs without its background services (a cohort
    run needs none); with the UI (``cohort serve``) the services run too, since the
    scheduler that turns cron schedules into runs is one of them.
    """
    home = home or default_prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://{host}:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "true" if ui else "false",
        "PREFECT_API_URL": url,
    }
    log = (home / "server.log").open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            host,
            "--port",
            str(port),
            *([] if ui else ["--no-services"]),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=parent_death_signal(),
    )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not _healthy(url):
            if proc.poll() is not None:
                raise CohortError(
                    f"the local Prefect server exited with code {proc.returncode}; see {home / 'server.log'}"
                )
            if time.monotonic() > deadline:
                raise CohortError(
                    f"the local Prefect server did not answer within {SERVER_START_TIMEOUT:.0f} s; "
                    f"see {home / 'server.log'}"
                )
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextmanager
def prefect_api(home: Path | None = None) -> Iterator[str]:
    """Use ``PREFECT_API_URL`` if set, else a local server started for this block.

    Inside the block ``PREFECT_API_URL`` is set in this process's settings and in
    ``os.environ``, so worker processes started inside it inherit it.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    existing = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if existing:
        yield existing
        return
    with local_prefect_server(home) as url:
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            with temporary_settings(updates={PREFECT_API_URL: url}):
                yield url
        finally:
            _drain_prefect_workers()
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous


def _drain_prefect_workers(timeout: float = 10.0) -> None:
    """Send queued logs and events before the server they go to is stopped."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception:  # nothing queued or already stopped: nothing to lose
            pass


def task_runner_for(executor: ExecutorSpec) -> Any:
    """The Prefect task runner for an executor spec."""
    if executor.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=executor.n_workers * executor.threads_per_worker)
    if executor.kind == "ray":
        return ray_task_runner(executor)
    from prefect_dask import DaskTaskRunner

    if executor.address:
        return DaskTaskRunner(address=executor.address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": executor.n_workers,
            "threads_per_worker": executor.threads_per_worker,
            "processes": True,
            "memory_limit": executor.memory_limit,
            "dashboard_address": ":0",
        },
    )


def ray_task_runner(executor: ExecutorSpec) -> Any:
    """A Prefect task runner on Ray: a local Ray instance, or an existing cluster at ``executor.address``.

    Ray 2.60 turns on token authentication and writes ``~/.ray`` by default: a local
    instance here runs without auth, under a short temporary folder, without its
    dashboard, with ``n_workers × threads_per_worker`` CPUs.
    """
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:
        raise CohortError("executor.kind 'ray' needs the ray extra: pip install 'cohort[ray]'") from exc
    if executor.address:
        return RayTaskRunner(address=executor.address)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp = Path(tempfile.gettempdir()) / f"ray-cohort-{os.getpid()}"
    return RayTaskRunner(
        init_kwargs={
            "num_cpus": executor.n_workers * executor.threads_per_worker,
            "include_dashboard": False,
            "_temp_dir": str(temp),
            "logging_level": "error",
            "log_to_driver": False,
        }
    )


@contextmanager
def gpu_placement(executor: ExecutorSpec, gpu: bool = True) -> Iterator[None]:
    """Tasks submitted inside go to GPU workers only: Dask ``resources={"GPU": 1}``, Ray ``num_gpus=1``.

    With ``gpu=False`` or the thread runner, it places nothing.
    """
    if not gpu or executor.kind == "threads":
        yield
        return
    if executor.kind == "ray":
        from prefect_ray.context import remote_options

        with remote_options(num_gpus=1):
            yield
        return
    import dask

    from cohort.segment.runtime import GPU_TASK_RESOURCES

    with dask.annotate(resources=dict(GPU_TASK_RESOURCES)):
        yield
