"""`cohort serve`: deployments on a real Prefect server, a run started through the API."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from flows.deployments import cohort_spec_from_parameters

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_ui_parameters_layer_over_the_spec_file(tmp_path: Path) -> None:
    spec_file = tmp_path / "cohort.yaml"
    spec_file.write_text("archive: a\nstore: s\nexecutor: {n_workers: 3}\nradiomics: {crop: false}\n")
    spec = cohort_spec_from_parameters(str(tmp_path / "arch"), "s3://bucket/x", str(spec_file), "threads")
    assert spec.archive == str(tmp_path / "arch") and spec.store == "s3://bucket/x"
    assert (spec.executor.kind, spec.executor.n_workers, spec.radiomics.crop) == ("threads", 3, False)
    plain = cohort_spec_from_parameters("/data/a", "/data/s", n_workers=4, scheduler_address="tcp://h:8786")
    assert (plain.executor.n_workers, plain.executor.address) == (4, "tcp://h:8786")
    assert plain.segmentation.model is None
    # The UI's model field turns segmentation on over a spec without it, and 'none' turns the spec's off.
    spec_file.write_text("archive: a\nstore: s\nsegmentation: {model: demo-lung-gtv, roi: Tumour_auto}\n")
    on = cohort_spec_from_parameters("/a", "/s", segmentation_model="demo-lung-gtv")
    assert on.segmentation.model == "demo-lung-gtv"
    off = cohort_spec_from_parameters("/a", "/s", str(spec_file), segmentation_model="none")
    assert (off.segmentation.model, off.segmentation.roi) == (None, "Tumour_auto")


async def _wait_for_deployments(names: list[str], timeout: float) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            found = {}
            for name in names:
                try:
                    found[name] = await client.read_deployment_by_name(name)
                except Exception:  # not registered yet
                    break
            if len(found) == len(names):
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"deployments {names} not registered within {timeout:.0f} s")
            await asyncio.sleep(1)


async def _artifacts_of(flow_run_id: Any) -> dict[str, Any]:
    """Artifacts of a flow run and of its sub-flow runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    async with get_client() as client:
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        ids = [flow_run_id, *(c.id for c in children)]
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
        )
        return {a.key: a.data for a in found if a.key}


def test_serve_registers_the_deployments_and_runs_one_started_through_the_api(
    prefect_server: str, demo_archive, tmp_path: Path
) -> None:
    from prefect.deployments import run_deployment

    store = tmp_path / "store"
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    serve = subprocess.Popen(
        [sys.executable, "-m", "cohort", "serve", "--archive", str(demo_archive.root), "--store", str(store)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        names = ["cohort-run/cohort", "cohort-analysis/analysis", "cohort-run/nightly"]
        deployments = asyncio.run(_wait_for_deployments(names, timeout=120))
        nightly = deployments["cohort-run/nightly"]
        assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]  # type: ignore[union-attr]
        assert nightly.parameters == {"archive": str(demo_archive.root), "store": str(store)}
        assert {"archive", "store", "executor"} <= set(
            deployments["cohort-run/cohort"].parameter_openapi_schema["properties"]
        )

        run = run_deployment(
            "cohort-run/cohort",
            parameters={"archive": str(demo_archive.root), "store": str(store), "executor": "threads"},
            timeout=600,
            poll_interval=2,
        )
        assert run.state is not None and run.state.is_completed(), run.state
        artifacts = asyncio.run(_artifacts_of(run.id))
        assert "| cases processed | 4 |" in artifacts["cohort-run"]
        features = pd.read_parquet(next((store / "features").glob("radiomics-*")))
        assert len(features) == 4
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
