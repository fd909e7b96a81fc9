"""Segmentation-stage benchmark: inference throughput, CPU pre/post-processing per case, cases/hour.

Three tables, one command:

1. **Inference** of a registry model (default ``demo-lung-gtv``) on random input
   of its shape: slices/s by backend (ONNX Runtime CPU with 1 thread and with all
   cores; PyTorch CPU when ``cohort[torch]`` is installed; PyTorch CUDA fp16 when a
   GPU is present) and batch size.
2. **One case, one core**: the real 134-slice LUNG1-001 planning CT through
   ``segment_case``'s parts with every library on one thread (ITK, BLAS/OpenMP,
   ONNX Runtime): read the DICOM series, preprocessing chain (lung isolation),
   model grid (in-plane resampling + window), inference (ONNX Runtime CPU, 1
   thread), post-processing (back to the original grid, components), measurements;
   once with the chain on the native grid before resampling and once on the model
   grid after it (``geometry.preprocess_on``; the demo manifest uses the latter).
   ``cpu_pre_post_after_read`` is the issue's "CPU pre/post-processing per case"
   (target <= 2 s on one core).
3. **The stage**: ``--cases`` cases (LUNG1-001 and LUNG1-002 alternately) through
   ``segment_cases``, overlapped (loading + preprocessing of the next cases and
   post-processing of the previous one on CPU threads while one is inferred) vs
   one after the other, in cases/hour, with (a) ONNX Runtime on the CPU and (b) a
   stand-in for a GPU: a backend that sleeps ``--gpu-ms-per-slice`` per slice (the
   seed's 0.2-0.3 s per case on a GPU is ~2 ms per slice) so the CPU side is what
   is measured, as on a GPU worker.
4. **The chained stage**: ``process-cohort``'s automatic items in one shard
   (``process_shard``: read, segment, measure, radiomics of the model's mask) on
   ``--cases`` demo phantoms of 512 x 512, one by one vs pipelined (what GPU shards
   do: reading, preprocessing, post-processing and radiomics on CPU threads while
   the current case is inferred), with ONNX Runtime on the CPU and with a GPU
   stand-in that replays the model's recorded outputs after sleeping
   ``--gpu-ms-per-slice`` per slice.

Run: ``.venv/bin/python benchmarks/bench_inference.py [--cases 4] [--repeat 2]``.
``COHORT_DATA`` may point at the ``data`` folder that holds ``nsclc-radiomics/``.
Results also go to ``benchmarks/results/inference.json``.
"""

from __future__ import annotations

import os

# One thread per library for the per-case numbers: set before numpy and friends are imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "inference.json"
ARCHIVES = ("LUNG1-001_20180209_CT.tar.xz", "LUNG1-002_20180526_CT.tar.xz")

from cohort.curate.series import read_series  # noqa: E402
from cohort.segment.model import ModelSpec, load_model  # noqa: E402
from cohort.segment.pipeline import CaseInput, finish_case, prepare_case, segment_cases  # noqa: E402
from cohort.segment.runtime import (  # noqa: E402
    Backend,
    BackendKind,
    BackendOptions,
    Device,
    TorchBackend,
    infer_volume,
    make_backend,
)


def data_dir() -> Path:
    default = REPO.parent / "shared" / "data"
    return Path(os.environ.get("COHORT_DATA") or default) / "nsclc-radiomics"


def ct_paths(folder: Path) -> list[str]:
    import pydicom

    paths = []
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
        if getattr(ds, "Modality", "") == "CT":
            paths.append(str(path))
    return paths


def extract(target: Path) -> list[list[str]]:
    cases = []
    for name in ARCHIVES:
        tarball = data_dir() / name
        if not tarball.is_file():
            sys.exit(f"missing {tarball}; set COHORT_DATA to the folder that holds nsclc-radiomics/")
        with tarfile.open(tarball) as tar:
            tar.extractall(target, filter="data")
        cases.append(ct_paths(target / name.removesuffix(".tar.xz")))
    return cases


class SleepingBackend:
    """Stands in for a GPU: returns zeros after sleeping ``seconds_per_slice`` per slice (no CPU use)."""

    name = "simulated-gpu"

    def __init__(self, seconds_per_slice: float, output_shape: Sequence[int]) -> None:
        self.seconds = seconds_per_slice
        self.shape = tuple(output_shape)

    @property
    def providers(self) -> tuple[str, ...]:
        return (f"sleep {1000 * self.seconds:.1f} ms/slice",)

    def run(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds * batch.shape[0])
        return np.zeros((batch.shape[0], *self.shape), dtype=np.float32)


class ReplayingBackend:
    """Stands in for a GPU that computes the real model: the first call of each batch runs ``real`` and
    records its output; later calls sleep ``seconds_per_slice`` per slice and return the recording."""

    name = "replayed-gpu"

    def __init__(self, real: Backend, seconds_per_slice: float) -> None:
        self.real, self.seconds = real, seconds_per_slice
        self.recorded: dict[bytes, np.ndarray] = {}
        self.replaying = False

    @property
    def providers(self) -> tuple[str, ...]:
        return (f"replay, sleep {1000 * self.seconds:.1f} ms/slice",)

    def run(self, batch: np.ndarray) -> np.ndarray:
        key = hashlib.blake2b(np.ascontiguousarray(batch).tobytes(), digest_size=16).digest()
        if not self.replaying:
            self.recorded[key] = self.real.run(batch)
            return self.recorded[key]
        time.sleep(self.seconds * batch.shape[0])
        return self.recorded[key]


def chained_table(model: ModelSpec, n_cases: int, gpu_ms: float, workdir: Path) -> list[dict[str, Any]]:
    """process-cohort's automatic items (segmentation + measurements + radiomics of the mask) in one
    shard, one by one vs pipelined, on demo phantoms (512 x 512, where the demo model finds the tumour)."""
    import cohort.shard as shard_module
    from cohort.curate.select import plan_work
    from cohort.index.crawl import index_files, list_archive
    from cohort.radiomics.extract import feature_set_name
    from cohort.spec import build_spec, settings_hash
    from cohort.synth import write_demo_archive
    from flows.process_cohort import shard_settings

    archive = write_demo_archive(workdir / "phantoms", n_cases, seed=11, matrix=512).root
    spec = build_spec(
        {"archive": str(archive), "store": str(workdir / "store"), "segmentation": {"model": model.name}},
        environ={},
    )
    items = [i for i in plan_work(index_files(list_archive(archive))[0], spec)[0] if i.automatic]
    digest = settings_hash(spec.feature_settings())
    base = shard_settings(spec, spec.radiomics_params(), digest, feature_set_name(digest), "bench")
    assert base.segmentation is not None
    replay = ReplayingBackend(make_backend(model, BackendOptions(device=Device.CPU)), gpu_ms / 1000)
    original_session = shard_module._session
    rows = []
    try:
        shard_module._session = lambda model, auto: replay  # type: ignore[assignment]
        shard_module.process_shard(items, base)  # records the outputs (and warms up)
        for label, replaying in (
            ("onnxruntime cpu (all cores)", False),
            (f"GPU stand-in {gpu_ms:g} ms/slice", True),
        ):
            replay.replaying = replaying
            for mode, pipelined in (("one by one", False), ("pipelined", True)):
                settings = dataclasses.replace(
                    base, segmentation=dataclasses.replace(base.segmentation, pipelined=pipelined)
                )
                t0 = time.perf_counter()
                result = shard_module.process_shard(items, settings)
                seconds = time.perf_counter() - t0
                rows.append(
                    {
                        "backend": label,
                        "mode": mode,
                        "cases": len(items),
                        "rows": result.features.num_rows,
                        "failures": result.failures.num_rows,
                        "seconds": seconds,
                        "cases_per_hour": 3600 * len(items) / seconds,
                        "stage_seconds": dict(result.seconds),
                    }
                )
                print(
                    f"  {label:32s} {mode:11s}: {3600 * len(items) / seconds:7.0f} cases/h ({seconds:.1f} s, "
                    f"{result.features.num_rows} rows, {result.failures.num_rows} failures)",
                    flush=True,
                )
    finally:
        shard_module._session = original_session  # type: ignore[assignment]
    return rows


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, value = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def inference_table(
    model: ModelSpec, batch_sizes: Sequence[int], n_slices: int, repeat: int
) -> list[dict[str, Any]]:
    shape = tuple(int(d) for d in model.manifest.input.shape[1:])
    slices = np.random.default_rng(0).uniform(0, 1, size=(n_slices, *shape)).astype(np.float32)
    cores = os.cpu_count() or 1
    configs: list[tuple[str, BackendOptions]] = [
        ("onnxruntime cpu 1 thread", BackendOptions(device=Device.CPU, threads=1)),
        (f"onnxruntime cpu {cores} threads", BackendOptions(device=Device.CPU, threads=cores)),
    ]
    if TorchBackend.is_available():
        configs.append(
            (f"torch cpu {cores} threads", BackendOptions(BackendKind.TORCH, Device.CPU, threads=cores))
        )
        if TorchBackend.cuda_available():
            configs.append(("torch cuda fp16", BackendOptions(BackendKind.TORCH, Device.CUDA, fp16=True)))
    rows = []
    for label, options in configs:
        backend = make_backend(model, options)
        for batch in batch_sizes:
            infer_volume(slices[: min(batch, n_slices)], backend, batch)  # warm-up
            seconds, _ = best_of(repeat, lambda b=backend, k=batch: infer_volume(slices, b, k))
            rows.append(
                {"backend": label, "batch": batch, "slices": n_slices, "slices_per_s": n_slices / seconds}
            )
            print(f"  {label:28s} batch {batch:3d}: {n_slices / seconds:8.1f} slices/s", flush=True)
    return rows


def with_preprocess_on(model: ModelSpec, where: str) -> ModelSpec:
    """The same model with its preprocessing chain on the native grid or on the model grid."""
    geometry = model.manifest.geometry.model_copy(update={"preprocess_on": where})
    return dataclasses.replace(model, manifest=model.manifest.model_copy(update={"geometry": geometry}))


def one_case_table(model: ModelSpec, paths: list[str], repeat: int) -> dict[str, float]:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    backend = make_backend(model, BackendOptions(device=Device.CPU, threads=1))
    stages: dict[str, float] = {}
    for _ in range(repeat):
        t0 = time.perf_counter()
        image = read_series(paths)
        t1 = time.perf_counter()
        prepared = prepare_case(image, model, "LUNG1-001")
        t2 = time.perf_counter()
        output = infer_volume(prepared.inputs, backend, 16)
        t3 = time.perf_counter()
        result = finish_case(prepared, output, model)
        t4 = time.perf_counter()
        seconds = {
            "read_series": t1 - t0,
            "preprocess": prepared.seconds["preprocess"],
            "model_grid": prepared.seconds["model_grid"],
            "infer_cpu_1_thread": t3 - t2,
            "postprocess": result.seconds["postprocess"],
            "measure": result.seconds["measure"],
            "total": t4 - t0,
        }
        stages = {k: min(v, stages.get(k, float("inf"))) for k, v in seconds.items()}
    stages["slices"] = float(image.GetSize()[2])
    stages["cpu_pre_post"] = stages["total"] - stages["infer_cpu_1_thread"]
    stages["cpu_pre_post_after_read"] = stages["cpu_pre_post"] - stages["read_series"]
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(os.cpu_count() or 1)
    return stages


def stage_table(
    model: ModelSpec, cases: list[list[str]], n_cases: int, gpu_ms: float
) -> list[dict[str, Any]]:
    paths = [cases[i % len(cases)] for i in range(n_cases)]
    inputs = [CaseInput(f"case-{i}", lambda p=p: read_series(p)) for i, p in enumerate(paths)]
    out_shape = tuple(int(d) for d in model.manifest.output.shape[1:])
    backends: list[tuple[str, Backend]] = [
        ("onnxruntime cpu (all cores)", make_backend(model, BackendOptions(device=Device.CPU))),
        (f"simulated GPU {gpu_ms:g} ms/slice", SleepingBackend(gpu_ms / 1000, out_shape)),
    ]
    rows = []
    for label, backend in backends:
        for mode, kwargs in (
            ("sequential", {"overlap": False}),
            ("overlapped, 1 prepare thread", {"prepare_workers": 1}),
            ("overlapped, 2 prepare threads", {"prepare_workers": 2, "prefetch": 3}),
        ):
            t0 = time.perf_counter()
            outcomes = list(segment_cases(inputs, model, backend=backend, batch_size=16, **kwargs))  # type: ignore[arg-type]
            seconds = time.perf_counter() - t0
            failed = [o.item.subject for o in outcomes if not o.ok]
            rows.append(
                {
                    "backend": label,
                    "mode": mode,
                    "cases": n_cases,
                    "seconds": seconds,
                    "cases_per_hour": 3600 * n_cases / seconds,
                    "failed": failed,
                }
            )
            print(
                f"  {label:30s} {mode:30s}: {3600 * n_cases / seconds:7.0f} cases/h ({seconds:.1f} s)",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="demo-lung-gtv")
    parser.add_argument("--batch-sizes", default="1,4,16,32")
    parser.add_argument("--slices", type=int, default=64, help="slices per inference measurement")
    parser.add_argument("--cases", type=int, default=4, help="cases for the stage table")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--gpu-ms-per-slice", type=float, default=2.0)
    parser.add_argument("--skip-stage", action="store_true")
    parser.add_argument("--skip-chain", action="store_true")
    args = parser.parse_args(argv)

    model = load_model(args.model)
    print(
        f"model {model.name} {model.version} ({model.onnx_path.stat().st_size / 1e6:.1f} MB), "
        f"input {list(model.manifest.input.shape)}; {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}"
    )
    print("\n1. inference on random input")
    inference = inference_table(
        model, [int(b) for b in args.batch_sizes.split(",")], args.slices, args.repeat
    )
    with tempfile.TemporaryDirectory(prefix="cohort-bench-inference-") as tmp:
        cases = extract(Path(tmp))
        print(f"\n2. one case on one core: LUNG1-001 ({len(cases[0])} slices), by where the chain runs")
        orders = ("native", "model_grid")
        by_order = {
            where: one_case_table(with_preprocess_on(model, where), cases[0], args.repeat) for where in orders
        }
        print(f"  {'':24s} {'native grid':>12s} {'model grid':>12s}")
        for key in by_order["native"]:
            values = "".join(f"{by_order[w][key]:12.2f}{'' if key == 'slices' else ' s'}" for w in orders)
            print(f"  {key:24s}{values}")
        one = {f"{where}.{key}": value for where, stages in by_order.items() for key, value in stages.items()}
        stage: list[dict[str, Any]] = []
        if not args.skip_stage:
            print(f"\n3. segment stage, {args.cases} cases")
            stage = stage_table(model, cases, args.cases, args.gpu_ms_per_slice)
        chained: list[dict[str, Any]] = []
        if not args.skip_chain:
            print(f"\n4. chained stage in one shard (segmentation + radiomics), {args.cases} phantoms")
            chained = chained_table(model, args.cases, args.gpu_ms_per_slice, Path(tmp))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "model": model.provenance(),
                "machine": {"cores": os.cpu_count(), "processor": platform.processor() or platform.machine()},
                "inference": inference,
                "one_case_one_core": one,
                "stage": stage,
                "chained": chained,
            },
            indent=2,
        )
    )
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
