"""GPU check of the segmentation stage: the seed's 31 M-parameter 2D U-Net at 512 x 512 through the
torch backend on CUDA in fp16, batched, and the whole stage on the real CT.

One prepared script for a GPU machine (PyTorch + CUDA + onnx + CPU onnxruntime, no onnxruntime-gpu);
it also runs without a GPU, skipping the GPU parts and saying so, so it can be smoke-tested anywhere.

1. **Model**: the classic U-Net (Ronneberger 2015: 64 base channels, 4 downsamplings, double 3x3
   conv + BN + ReLU, 2x2 transposed-conv up, 1 input and 1 output channel, sigmoid) from
   ``scripts/train_demo_model.py``, random weights (seeded), parameter count checked against
   31.0 M, exported to ONNX (dynamic batch) with a manifest (1 mm, 512 x 512, lung window, lung
   isolation), and loaded through the registry check (hash, schema, ONNX I/O) when pydantic is there.
2. **Converter check**: ONNX Runtime (CPU) against the torch backend (CUDA fp16, or CPU fp32 without
   a GPU) on the same slices: largest absolute difference of the output probabilities.
3. **Throughput** (GPU only): ``infer_volume`` on ``--slices`` slices at batch sizes ``--batch-sizes``
   in fp16 (and fp32 at one batch size): slices/s end to end (host -> GPU -> host), the pure GPU rate
   (CUDA events around the forward pass of a batch already on the GPU), the busy fraction
   (end-to-end / pure) and the mean GPU utilisation sampled by NVML (or nvidia-smi) meanwhile.
4. **Stage on the real CT** (GPU only, and only where ``nsclc-radiomics/LUNG1-00{1,2}`` archives are
   found under ``$COHORT_DATA`` or ``--data``, and SimpleITK, pydicom and pydantic import): one case
   through ``segment_case`` with a per-part breakdown, then ``--cases`` cases through
   ``segment_cases`` one after the other and overlapped (1, 2 and 4 preparing threads): cases/hour and
   GPU utilisation. The random-weight network finds nothing meaningful; the timings are what count.

Prints tables; writes ``$OUT/gpu_segment.json`` when ``OUT`` is set (else next to this file's
``results/``).

On the lent GPU machines (Python 3.12; torch, onnx, onnxruntime, numpy, scipy, PyYAML present),
pydantic, SimpleITK and pydicom are not installed and nothing can be downloaded there. ``make gpu-kit``
(``scripts/gpu_kit.sh``) writes their wheels to ``.whl/`` and the LUNG1-001 archive to ``.gpu-data/``
(both ignored by git) and prints the two device calls: together they exceed the 64 MiB carry limit, so
the first installs the wheels into ``.gpu-site/`` and runs ``--parts 1,2,3``, the second (made at once,
while the machine is warm and ``.gpu-site/`` still there) carries the CT and runs ``--parts 1,4``.
Without them, parts 1-3 still run (without the registry check).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for folder in (REPO, REPO / "scripts"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from cohort.segment.runtime import BackendKind, BackendOptions, Device, TorchBackend, infer_volume  # noqa: E402

ARCHIVES = ("LUNG1-001_20180209_CT.tar.xz", "LUNG1-002_20180526_CT.tar.xz")
SEED_PARAMETERS = 31.0e6  # the classic U-Net with 1 input and 1 output channel: 31.04 M


def has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


class GpuSampler:
    """Samples GPU utilisation (%) every ``interval`` s in a thread: NVML, else nvidia-smi, else nothing."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read: Callable[[], float] | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            self.source = "nvml"
        except Exception:  # no NVML: try the command line
            if shutil.which("nvidia-smi"):
                self._read = self._smi
                self.source = "nvidia-smi"
            else:
                self.source = "none"

    @staticmethod
    def _smi() -> float:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        )
        return float(out.stdout.split()[0])

    def __enter__(self) -> GpuSampler:
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        assert self._read is not None
        while not self._stop.is_set():
            try:
                self.samples.append(self._read())
            except Exception:  # a failed sample is skipped, the mean uses the others
                pass
            self._stop.wait(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def manifest_for(onnx_path: Path, size: int) -> dict[str, Any]:
    import hashlib

    return {
        "name": "seed-unet-random",
        "version": "0.0.0",
        "description": "The seed's 31 M-parameter U-Net with random weights: for timing only.",
        "file": onnx_path.name,
        "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "input": {
            "name": "ct",
            "shape": ["batch", 1, size, size],
            "dtype": "float32",
            "channels": [{"name": "lung_window", "window": {"level": -600, "width": 1500, "clip": True}}],
        },
        "output": {"name": "gtv_probability", "shape": ["batch", 1, size, size], "activation": "sigmoid"},
        "geometry": {"spacing_mm": [1.0, 1.0], "size": [size, size], "fill_hu": -1000},
        "preprocessing": [{"step": "isolate_lungs", "params": {}}],
        "labels": {1: "GTV"},
        "licence": "none (random weights)",
        "training_data": "None: random weights, seeded; the network is for timing only.",
        "intended_use": "benchmarks only",
    }


def part_model(work: Path, size: int) -> dict[str, Any]:
    import torch
    import yaml
    from train_demo_model import build_unet, export_onnx

    torch.manual_seed(0)
    net = build_unet(base=64, downsamplings=4).eval()
    params = sum(p.numel() for p in net.parameters())
    t0 = time.perf_counter()
    folder = work / "seed-unet-random"
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(net, onnx_path, size)
    export_s = time.perf_counter() - t0
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest_for(onnx_path, size), sort_keys=False))
    report: dict[str, Any] = {
        "parameters": params,
        "parameters_vs_seed": params / SEED_PARAMETERS,
        "onnx_mb": onnx_path.stat().st_size / 1e6,
        "export_s": export_s,
        "folder": str(folder),
        "onnx": str(onnx_path),
    }
    if has("pydantic", "yaml", "onnxruntime"):
        from cohort.segment.model import load_model

        t0 = time.perf_counter()
        load_model(folder)
        report["registry_check"] = f"ok ({time.perf_counter() - t0:.2f} s: schema, sha256, ONNX I/O)"
    else:
        report["registry_check"] = "skipped: pydantic is not installed here"
    print(
        f"  U-Net base 64, 4 downsamplings: {params:,} parameters ({params / 1e6:.2f} M; seed 31.0 M), "
        f"ONNX {report['onnx_mb']:.1f} MB, export {export_s:.1f} s; registry: {report['registry_check']}"
    )
    return report


def part_converter(onnx_path: Path, size: int, gpu: bool) -> dict[str, Any]:
    import onnxruntime as ort

    batch = np.random.default_rng(1).uniform(0, 1, size=(2, 1, size, size)).astype(np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    t0 = time.perf_counter()
    expected = session.run(None, {"ct": batch})[0]
    ort_s = time.perf_counter() - t0
    device = Device.CUDA if gpu else Device.CPU
    backend = TorchBackend(onnx_path, BackendOptions(BackendKind.TORCH, device, fp16=gpu))
    got = backend.run(batch)
    diff = float(np.abs(got - expected).max())
    label = "torch cuda fp16" if gpu else "torch cpu fp32"
    print(
        f"  onnxruntime cpu vs {label}: max |diff| {diff:.2e} on 2 slices (ORT CPU {2 / ort_s:.2f} slices/s)"
    )
    return {"against": label, "max_abs_diff": diff, "onnxruntime_cpu_slices_per_s": 2 / ort_s}


def part_throughput(onnx_path: Path, size: int, batch_sizes: list[int], n: int) -> list[dict[str, Any]]:
    import torch

    slices = np.random.default_rng(2).uniform(0, 1, size=(n, 1, size, size)).astype(np.float32)
    rows = []
    configs = [(b, True) for b in batch_sizes] + [(16, False)]
    backends = {
        fp16: TorchBackend(onnx_path, BackendOptions(BackendKind.TORCH, Device.CUDA, fp16=fp16))
        for fp16 in (True, False)
    }
    for batch, fp16 in configs:
        backend = backends[fp16]
        infer_volume(slices[: 2 * batch], backend, batch)  # warm-up (cudnn autotuning)
        with GpuSampler() as sampler:
            t0 = time.perf_counter()
            infer_volume(slices, backend, batch)
            wall = time.perf_counter() - t0
        x = torch.from_numpy(slices[:batch]).cuda()
        x = (x.half() if fp16 else x).contiguous(memory_format=torch.channels_last)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.inference_mode():
            backend.module(x)
            torch.cuda.synchronize()
            start.record()
            reps = max(1, n // batch)
            for _ in range(reps):
                backend.module(x)
            end.record()
            torch.cuda.synchronize()
        pure = reps * batch / (start.elapsed_time(end) / 1000)
        row = {
            "precision": "fp16" if fp16 else "fp32",
            "batch": batch,
            "slices": n,
            "slices_per_s": n / wall,
            "gpu_only_slices_per_s": pure,
            "busy_fraction": (n / wall) / pure,
            "gpu_utilisation_pct": sampler.mean,
            "utilisation_source": sampler.source,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
        rows.append(row)
        util = "n/a" if sampler.mean is None else f"{sampler.mean:.0f} %"
        print(
            f"  {row['precision']} batch {batch:3d}: {n / wall:8.1f} slices/s end to end, "
            f"{pure:8.1f} on the GPU alone (busy {row['busy_fraction']:.2f}; utilisation {util}), "
            f"peak {row['peak_memory_gib']:.1f} GiB"
        )
    return rows


def _ct_paths(folder: Path) -> list[str]:
    import pydicom

    return [
        str(p)
        for p in sorted(folder.iterdir())
        if getattr(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["Modality"]), "Modality", "")
        == "CT"
    ]


def part_stage(folder: Path, data: Path, work: Path, n_cases: int, batch: int) -> dict[str, Any]:
    from cohort.curate.series import read_series
    from cohort.segment.model import load_model
    from cohort.segment.pipeline import CaseInput, segment_case, segment_cases

    cases = []
    for name in [a for a in ARCHIVES if (data / a).is_file()]:  # one archive is enough (carry limits)
        with tarfile.open(data / name) as tar:
            tar.extractall(work, filter="data")
        cases.append(_ct_paths(work / name.removesuffix(".tar.xz")))
    model = load_model(folder)
    backend = TorchBackend(model, BackendOptions(BackendKind.TORCH, Device.CUDA, fp16=True))
    image = read_series(cases[0])
    segment_case(image, model, backend, batch_size=batch)  # warm-up
    t0 = time.perf_counter()
    image = read_series(cases[0])
    read_s = time.perf_counter() - t0
    result = segment_case(image, model, backend, batch_size=batch, subject="LUNG1-001")
    one = {"read_series": read_s, **result.seconds, "slices": image.GetSize()[2]}
    print("  LUNG1-001, one case: " + ", ".join(f"{k} {v:.2f}" for k, v in one.items()))
    n = len(cases)
    inputs = [CaseInput(f"case-{i}", lambda p=cases[i % n]: read_series(p)) for i in range(n_cases)]
    rows = []
    for mode, kwargs in (
        ("sequential", {"overlap": False}),
        ("overlapped, 1 prepare thread", {"prepare_workers": 1}),
        ("overlapped, 2 prepare threads", {"prepare_workers": 2, "prefetch": 3}),
        ("overlapped, 4 prepare threads", {"prepare_workers": 4, "prefetch": 5, "finish_workers": 2}),
    ):
        with GpuSampler() as sampler:
            t0 = time.perf_counter()
            outcomes = list(segment_cases(inputs, model, backend=backend, batch_size=batch, **kwargs))  # type: ignore[arg-type]
            seconds = time.perf_counter() - t0
        rows.append(
            {
                "mode": mode,
                "cases": n_cases,
                "seconds": seconds,
                "cases_per_hour": 3600 * n_cases / seconds,
                "gpu_utilisation_pct": sampler.mean,
                "failed": [f"{o.item.subject}: {o.error}" for o in outcomes if not o.ok],
            }
        )
        util = "n/a" if sampler.mean is None else f"{sampler.mean:.0f} %"
        print(
            f"  {mode:32s} {3600 * n_cases / seconds:7.0f} cases/h ({seconds:.1f} s), GPU utilisation {util}"
        )
    return {"one_case": one, "stage": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-sizes", default="8,16,32,64")
    parser.add_argument("--slices", type=int, default=256)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--stage-batch", type=int, default=32)
    parser.add_argument("--data", type=Path, default=None, help="folder holding the LUNG1 archives")
    parser.add_argument(
        "--parts", default="1,2,3,4", help="parts to run (e.g. '1,2,3' in one call, '1,4' in the next)"
    )
    args = parser.parse_args(argv)

    import torch

    gpu = torch.cuda.is_available()
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if gpu else "none",
        "cpu_cores": os.cpu_count(),
    }
    if has("onnxruntime"):
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["onnxruntime_providers"] = ort.get_available_providers()
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    if not gpu:
        print("NO CUDA DEVICE: parts 3 (throughput) and 4 (stage) are skipped; parts 1-2 run on the CPU")
    report: dict[str, Any] = {"environment": env}
    with tempfile.TemporaryDirectory(prefix="cohort-gpu-segment-") as tmp:
        work = Path(tmp)
        print("\n1. model")
        report["model"] = part_model(work, args.size)
        onnx_path = Path(report["model"]["onnx"])
        parts = {p.strip() for p in args.parts.split(",")}
        if "2" in parts:
            print("\n2. converter check")
            report["converter"] = part_converter(onnx_path, args.size, gpu)
        if "3" not in parts:
            report["throughput"] = "skipped: --parts"
        elif gpu:
            print(f"\n3. throughput, {args.slices} slices of {args.size} x {args.size}")
            report["throughput"] = part_throughput(
                onnx_path, args.size, [int(b) for b in args.batch_sizes.split(",")], args.slices
            )
        else:
            report["throughput"] = "skipped: no CUDA device"
        data = (
            args.data
            or Path(os.environ.get("COHORT_DATA") or REPO.parent / "shared" / "data") / "nsclc-radiomics"
        )
        missing = [m for m in ("SimpleITK", "pydicom", "pydantic", "scipy") if not has(m)]
        found = (data / ARCHIVES[0]).is_file()
        if "4" not in parts:
            report["stage"] = "skipped: --parts"
        elif not gpu:
            report["stage"] = "skipped: no CUDA device"
        elif missing or not found:
            why = f"missing modules {missing}" if missing else f"no LUNG1 archives in {data}"
            report["stage"] = f"skipped: {why}"
        else:
            print(f"\n4. segment stage on the real CT, {args.cases} cases")
            report["stage"] = part_stage(
                Path(report["model"]["folder"]), data, work, args.cases, args.stage_batch
            )
        if isinstance(report["stage"], str):
            print(f"\n4. stage {report['stage']}")
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_segment.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out / 'gpu_segment.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
