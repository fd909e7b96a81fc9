"""Shared fixtures: real reference data, generated archives, one Prefect API per session."""

from __future__ import annotations

import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Prefect reads its home and logging settings at import time: set them first.
_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="cohort-test-prefect-"))
os.environ.setdefault("PREFECT_HOME", str(_PREFECT_HOME))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("COHORT_DATA", REPO.parent / "shared" / "data"))
LUNG1_ARCHIVES = {
    "LUNG1-001": "LUNG1-001_20180209_CT.tar.xz",
    "LUNG1-002": "LUNG1-002_20180526_CT.tar.xz",
}


def require_data(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not found at {path} (set COHORT_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require_data()


@pytest.fixture(scope="session")
def lung1_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both real LUNG1 archives extracted side by side (one flat folder each)."""
    root = tmp_path_factory.mktemp("lung1")
    for name in LUNG1_ARCHIVES.values():
        with tarfile.open(require_data("nsclc-radiomics", name)) as tar:
            tar.extractall(root, filter="data")
    return root


@pytest.fixture(scope="session")
def lung1_reference(data_dir: Path):  # type: ignore[no-untyped-def]
    import pandas as pd

    return pd.read_csv(data_dir / "nsclc-radiomics" / "reference-features-original.csv").set_index(
        "PatientID"
    )


@pytest.fixture(scope="session")
def demo_archive(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A small synthetic archive (4 patients, 128 x 128 slices) shared by read-only tests."""
    from cohort.synth import write_demo_archive

    return write_demo_archive(tmp_path_factory.mktemp("demo") / "archive", 4, seed=7, matrix=128)


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """One real Prefect server on loopback for every flow test of the session."""
    from flows.runtime import prefect_api

    with prefect_api(_PREFECT_HOME) as url:
        yield url


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real S3 server (SeaweedFS) on loopback; clients reach it through the AWS environment."""
    from tests.s3server import seaweed_s3

    with seaweed_s3(tmp_path_factory.mktemp("seaweedfs")) as server:
        saved = {key: os.environ.get(key) for key in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
