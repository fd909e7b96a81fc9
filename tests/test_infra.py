"""The infra files parse and agree with the code (they cannot be run here: no Docker/Kubernetes/SLURM)."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from cohort.spec import build_spec

INFRA = Path(__file__).resolve().parents[1] / "infra"


def test_compose_stack_wires_prefect_dask_minio_and_serve() -> None:
    compose = yaml.safe_load((INFRA / "compose" / "compose.yaml").read_text())
    services = compose["services"]
    assert {
        "prefect-server",
        "minio",
        "dask-scheduler",
        "dask-worker-cpu",
        "dask-worker-gpu",
        "cohort-serve",
    } <= set(services)
    assert "GPU=1" in services["dask-worker-gpu"]["command"] and services["dask-worker-gpu"]["profiles"] == [
        "gpu"
    ]
    assert "GPU" not in services["dask-worker-cpu"]["command"]
    assert services["cohort-serve"]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    spec = build_spec(yaml.safe_load((INFRA / "compose" / "specs" / "cohort.yaml").read_text()), environ={})
    assert spec.store == "s3://cohort/store" and spec.executor.address == "tcp://dask-scheduler:8786"


def test_kubernetes_manifests_route_gpu_work_by_resources() -> None:
    dask = list(yaml.safe_load_all((INFRA / "k8s" / "dask-cluster.yaml").read_text()))
    assert [d["kind"] for d in dask] == ["DaskCluster", "DaskWorkerGroup"]
    gpu_args = dask[1]["spec"]["worker"]["spec"]["containers"][0]["args"]
    assert gpu_args[gpu_args.index("--resources") + 1] == "GPU=1"
    ray = yaml.safe_load((INFRA / "k8s" / "ray-cluster.yaml").read_text())
    groups = {g["groupName"]: g["rayStartParams"] for g in ray["spec"]["workerGroupSpecs"]}
    assert groups["gpu"]["num-gpus"] == "1" and "num-gpus" not in groups["cpu"]
    assert yaml.safe_load((INFRA / "k8s" / "prefect-worker-values.yaml").read_text())["worker"]["config"][
        "workPool"
    ]


def test_slurm_example_is_python_that_parses() -> None:
    ast.parse((INFRA / "slurm" / "dask_on_slurm.py").read_text())
    assert "--resources GPU=1" in (INFRA / "slurm" / "gpu-worker.sbatch").read_text()
