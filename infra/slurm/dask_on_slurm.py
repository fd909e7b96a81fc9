"""Run a cohort on a SLURM cluster: dask-jobqueue submits the Dask workers as batch jobs.

Run this on a login node (``pip install dask-jobqueue==0.9.0`` beside cohort):

    python infra/slurm/dask_on_slurm.py cohort.yaml --jobs 16 --partition cpu
    python infra/slurm/dask_on_slurm.py cohort.yaml --jobs 16 --gpu-jobs 1 --gpu-partition gpu

Each job is one worker process with one thread (radiomics is single-threaded;
more cores per job just means more jobs). GPU jobs advertise ``GPU=1`` so only
segmentation tasks go there. The flow reports to ``PREFECT_API_URL`` if set, else
to a local Prefect server it starts on the login node.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

GPU_JOB = Path(__file__).with_name("gpu-worker.sbatch")


def main() -> None:
    from dask_jobqueue import SLURMCluster

    from cohort.spec import load_spec
    from flows.process_cohort import run_cohort

    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--memory", default="8GB")
    parser.add_argument("--walltime", default="04:00:00")
    parser.add_argument("--gpu-jobs", type=int, default=0)
    parser.add_argument("--gpu-partition", default=None)
    args = parser.parse_args()

    cpu = SLURMCluster(
        queue=args.partition,
        cores=1,
        processes=1,
        memory=args.memory,
        walltime=args.walltime,
        job_name="cohort-cpu",
        worker_extra_args=["--nthreads", "1"],
    )
    cpu.scale(jobs=args.jobs)
    if args.gpu_jobs:
        # dask-jobqueue clusters are homogeneous: GPU workers join this scheduler as plain
        # batch jobs that advertise GPU=1 (see gpu-worker.sbatch).
        for _ in range(args.gpu_jobs):
            command = ["sbatch", f"--partition={args.gpu_partition}", str(GPU_JOB), cpu.scheduler_address]
            subprocess.run(command, check=True)
    spec = load_spec(args.spec, overrides={"executor": {"kind": "dask", "address": cpu.scheduler_address}})
    summary = run_cohort(spec)
    print(f"{summary.cases_processed} processed, {summary.cases_failed} failed")
    print(f"features: {summary.feature_table}")
    cpu.close()  # GPU jobs exit when their scheduler goes away


if __name__ == "__main__":
    main()
