"""Inference runtime: provider choice, cached sessions, batching, overlap of CPU work with inference."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cohort.errors import ModelError, SegmentationError
from cohort.segment.model import ModelSpec, load_model
from cohort.segment.pipeline import CaseInput, segment_case, segment_cases
from cohort.segment.runtime import (
    GPU_TASK_RESOURCES,
    GPU_WORKER_RESOURCES,
    Backend,
    BackendKind,
    BackendOptions,
    Device,
    OnnxRuntimeBackend,
    TorchBackend,
    clear_sessions,
    get_session,
    infer_volume,
    onnx_to_torch,
    run_pipelined,
    select_providers,
)
from tests.segment.onnx_fixtures import GAIN, write_model

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@pytest.fixture
def tiny(tmp_path: Path) -> ModelSpec:
    return load_model(write_model(tmp_path / "tiny"))


def _expected(batch: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-GAIN * (batch - 0.5)))


def test_provider_preference_and_logged_fallback(caplog: pytest.LogCaptureFixture) -> None:
    assert select_providers([CPU, CUDA, TRT]) == (TRT, CUDA, CPU)
    assert select_providers([CUDA, CPU, "AzureExecutionProvider"]) == (CUDA, CPU)
    assert select_providers([CPU, CUDA], Device.CPU) == (CPU,)
    assert select_providers([CPU, CUDA], Device.CUDA) == (CUDA, CPU)
    with caplog.at_level(logging.INFO, logger="cohort.segment.runtime"):
        assert select_providers([CPU, "AzureExecutionProvider"]) == (CPU,)
    assert "offers no GPU provider" in caplog.text
    with pytest.raises(ModelError, match="a GPU was asked for but ONNX Runtime offers only"):
        select_providers([CPU], Device.CUDA)
    assert dict(GPU_WORKER_RESOURCES) == {"GPU": 1} and dict(GPU_TASK_RESOURCES) == {"GPU": 1}


def test_onnxruntime_backend_runs_the_graph(tiny: ModelSpec) -> None:
    backend = OnnxRuntimeBackend(tiny, BackendOptions(device=Device.CPU, threads=1))
    assert isinstance(backend, Backend)
    assert backend.name == "onnxruntime" and backend.providers == (CPU,)
    batch = np.random.default_rng(0).uniform(0, 1, size=(5, 1, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(backend.run(batch), _expected(batch), rtol=1e-5, atol=1e-6)


def test_get_session_reuses_one_backend_per_model_and_options(tiny: ModelSpec) -> None:
    clear_sessions()
    first = get_session(tiny)
    assert get_session(tiny) is first
    assert get_session(load_model(tiny.directory)) is first  # same file, same hash: same session
    other = get_session(tiny, BackendOptions(threads=1))
    assert other is not first
    clear_sessions()
    assert get_session(tiny) is not first


def test_get_session_is_thread_safe(tiny: ModelSpec) -> None:
    clear_sessions()
    seen: list[Backend] = []
    threads = [threading.Thread(target=lambda: seen.append(get_session(tiny))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(b) for b in seen}) == 1


class _Recorder:
    """A backend that records batch sizes and sleeps per batch (a stand-in for a GPU)."""

    name = "recorder"
    providers = ("fake",)

    def __init__(self, seconds_per_batch: float = 0.0) -> None:
        self.batches: list[int] = []
        self.seconds = seconds_per_batch

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.shape[0])
        if self.seconds:
            time.sleep(self.seconds)
        return _expected(batch).astype(np.float32)


def test_infer_volume_batches_the_slices() -> None:
    slices = np.random.default_rng(1).uniform(size=(10, 1, 8, 8)).astype(np.float32)
    rec = _Recorder()
    out = infer_volume(slices, rec, batch_size=4)
    assert rec.batches == [4, 4, 2]
    np.testing.assert_allclose(out, _expected(slices), rtol=1e-6)
    with pytest.raises(ModelError, match="batch_size must be >= 1"):
        infer_volume(slices, rec, batch_size=0)
    with pytest.raises(ModelError, match=r"slices must be \(N, C, H, W\)"):
        infer_volume(slices[0], rec)


def test_run_pipelined_keeps_order_and_records_failures() -> None:
    rng = np.random.default_rng(2)
    delays = rng.uniform(0, 0.02, size=(12, 3))

    def prepare(i: int) -> int:
        time.sleep(delays[i, 0])
        if i == 4:
            raise ValueError("bad input 4")
        return i * 10

    def infer(x: int) -> int:
        time.sleep(delays[x // 10, 1])
        if x == 70:
            raise RuntimeError("inference failed on 7")
        return x + 1

    def finish(x: int, y: int) -> tuple[int, int]:
        time.sleep(delays[x // 10, 2])
        if x == 90:
            raise KeyError("finish 9")
        return (x, y)

    outcomes = list(run_pipelined(range(12), prepare, infer, finish, prefetch=3, prepare_workers=2))
    assert [o.item for o in outcomes] == list(range(12))
    failed = {o.item: type(o.error).__name__ for o in outcomes if not o.ok}
    assert failed == {4: "ValueError", 7: "RuntimeError", 9: "KeyError"}
    assert [o.value for o in outcomes if o.ok] == [(i * 10, i * 10 + 1) for i in range(12) if i not in failed]


def test_run_pipelined_overlaps_cpu_and_inference() -> None:
    """Prepare, infer and finish each take 0.1 s per item: one after the other, 5 items take 1.5 s;
    overlapped, inference is the bottleneck: about 0.1 * (5 + 2) s."""
    step = 0.1
    spans: dict[str, list[tuple[float, float]]] = {"prepare": [], "infer": [], "finish": []}

    def timed(stage: str, value: int) -> int:
        start = time.perf_counter()
        time.sleep(step)
        spans[stage].append((start, time.perf_counter()))
        return value

    def prepare(i: int) -> int:
        return timed("prepare", i)

    def infer(i: int) -> int:
        return timed("infer", i)

    def finish(i: int, j: int) -> int:
        return timed("finish", i + j)

    started = time.perf_counter()
    values = [o.value for o in run_pipelined(range(5), prepare, infer, finish, prefetch=2)]
    elapsed = time.perf_counter() - started
    assert values == [0, 2, 4, 6, 8]

    def overlap(a: str, b: str) -> float:
        return max(min(e1, e2) - max(s1, s2) for s1, e1 in spans[a] for s2, e2 in spans[b])

    assert overlap("prepare", "infer") > step / 2  # the next case is prepared during inference
    assert overlap("finish", "infer") > step / 2  # and the previous one finished
    assert elapsed < 0.75 * (3 * step * 5), f"{elapsed:.2f} s: no overlap"


def _phantom(
    shape: tuple[int, int, int] = (12, 40, 40), radius_mm: float = 12.0, seed: int = 0
) -> sitk.Image:
    """HU volume: air-ish background with a bright sphere (the tiny model's 'tumour'), 1.5 x 1.5 x 3 mm."""
    spacing = (1.5, 1.5, 3.0)
    z, y, x = np.indices(shape).astype(float)
    centre = [(n - 1) / 2 for n in shape]
    r2 = (
        ((x - centre[2]) * spacing[0]) ** 2
        + ((y - centre[1]) * spacing[1]) ** 2
        + ((z - centre[0]) * spacing[2]) ** 2
    )
    hu = np.where(r2 <= radius_mm**2, 80.0, -800.0)
    hu += np.random.default_rng(seed).normal(0, 5, size=shape)
    image = sitk.GetImageFromArray(hu.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin((-30.0, 10.0, 100.0))
    return image


def test_segment_cases_overlapped_equals_sequential_and_is_faster(tmp_path: Path) -> None:
    model = load_model(write_model(tmp_path / "tiny", size=32, spacing=2.0))
    slow = _Recorder(seconds_per_batch=0.05)
    cases = [CaseInput(f"case-{i}", lambda i=i: _phantom(seed=i, radius_mm=8.0 + i)) for i in range(6)]

    started = time.perf_counter()
    sequential = list(segment_cases(cases, model, backend=slow, batch_size=4, overlap=False))
    sequential_s = time.perf_counter() - started
    started = time.perf_counter()
    overlapped = list(segment_cases(cases, model, backend=slow, batch_size=4, prefetch=2))
    overlapped_s = time.perf_counter() - started

    assert [o.item.subject for o in overlapped] == [c.subject for c in cases]
    assert all(o.ok for o in sequential + overlapped)
    for a, b in zip(sequential, overlapped, strict=True):
        assert a.value is not None and b.value is not None
        assert np.array_equal(
            sitk.GetArrayViewFromImage(a.value.mask), sitk.GetArrayViewFromImage(b.value.mask)
        )
        assert a.value.measurements == b.value.measurements
        assert b.value.seconds["infer"] >= 0.05 * 3  # 12 slices in 3 batches
    volumes = [o.value.measurements.volume_mm3 for o in overlapped if o.value and o.value.measurements]
    assert volumes == sorted(volumes)  # radius grows with the case number
    assert overlapped_s < sequential_s, (overlapped_s, sequential_s)


def test_segment_cases_records_a_failing_case_and_goes_on(tmp_path: Path) -> None:
    model = load_model(write_model(tmp_path / "tiny", size=32))

    def broken() -> sitk.Image:
        raise OSError("unreadable series")

    cases = [CaseInput("ok-1", _phantom), CaseInput("broken", broken), CaseInput("ok-2", _phantom)]
    outcomes = list(segment_cases(cases, model, backend=_Recorder()))
    assert [o.ok for o in outcomes] == [True, False, True]
    assert isinstance(outcomes[1].error, OSError)


def test_segment_case_uses_the_cached_session_by_default(tmp_path: Path) -> None:
    model = load_model(write_model(tmp_path / "tiny", size=32))
    clear_sessions()
    result = segment_case(_phantom(), model)
    assert result.found and result.measurements is not None
    assert get_session(model).providers == (CPU,)
    assert result.provenance["model_sha256"] == model.sha256


def test_segment_case_without_tumour_is_a_result_not_an_error(tmp_path: Path) -> None:
    model = load_model(write_model(tmp_path / "tiny", size=32))
    result = segment_case(_phantom(radius_mm=0.0), model, _Recorder())
    assert not result.found and result.measurements is None and result.components == ()
    assert not sitk.GetArrayViewFromImage(result.mask).any()
    assert result.as_row()["found"] is False


def test_segment_case_refuses_non_axial_series(tmp_path: Path) -> None:
    model = load_model(write_model(tmp_path / "tiny", size=32))
    sagittal = _phantom()
    sagittal.SetDirection((0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0))
    with pytest.raises(SegmentationError, match="the slices are not axial"):
        segment_case(sagittal, model, _Recorder())


# -- PyTorch backend ------------------------------------------------------------------------------

needs_torch = pytest.mark.skipif(
    not TorchBackend.is_available(), reason="torch/onnx not installed (cohort[torch])"
)


def test_torch_backend_availability_is_reported() -> None:
    import importlib.util

    expected = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("onnx") is not None
    assert TorchBackend.is_available() is expected


def test_torch_converter_refuses_unknown_operators(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "gemm.onnx"))
    with pytest.raises(ModelError, match=r"does not support the ONNX operator\(s\) \['Gemm'\]"):
        onnx_to_torch(tmp_path / "gemm.onnx")


@needs_torch
def test_torch_backend_matches_onnxruntime_on_the_tiny_model(tiny: ModelSpec) -> None:
    backend = TorchBackend(tiny, BackendOptions(kind=BackendKind.TORCH, device=Device.CPU))
    assert backend.providers == ("cpu",)
    batch = np.random.default_rng(3).uniform(0, 1, size=(3, 1, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(backend.run(batch), _expected(batch), rtol=1e-5, atol=1e-6)


@needs_torch
def test_torch_converter_matches_onnxruntime_on_an_exported_unet(tmp_path: Path) -> None:
    """A U-Net exported by torch.onnx.export (Conv, ConvTranspose, MaxPool, Concat, Relu, Sigmoid)."""
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from train_demo_model import build_unet, export_onnx

    torch.manual_seed(0)
    net = build_unet(base=4, downsamplings=2)
    for m in net.modules():  # non-trivial batch-norm statistics, folded into the convolutions by the exporter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    export_onnx(net.eval(), tmp_path / "unet.onnx", 32)
    batch = np.random.default_rng(4).uniform(0, 1, size=(3, 1, 32, 32)).astype(np.float32)
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "unet.onnx"), providers=[CPU])
    expected = session.run(None, {"ct": batch})[0]
    module = onnx_to_torch(tmp_path / "unet.onnx").eval()
    with torch.inference_mode():
        got = module(torch.from_numpy(batch)).numpy()
        direct = net(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(direct, expected, atol=1e-5)


@needs_torch
def test_torch_backend_refuses_cuda_without_a_gpu(tiny: ModelSpec) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelError, match="torch sees no CUDA device"):
        TorchBackend(tiny, BackendOptions(kind=BackendKind.TORCH, device=Device.CUDA))


@pytest.mark.gpu
@needs_torch
def test_torch_backend_on_cuda_in_fp16(tiny: ModelSpec) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    backend = TorchBackend(tiny, BackendOptions(kind=BackendKind.TORCH, device=Device.CUDA, fp16=True))
    batch = np.random.default_rng(5).uniform(0, 1, size=(8, 1, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(backend.run(batch), _expected(batch), atol=2e-2)
