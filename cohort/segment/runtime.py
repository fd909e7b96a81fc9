"""Inference runtime: backends that run a model's ONNX file, sessions reused per worker, batching,
and a pipeline that overlaps CPU pre/post-processing with inference.

Backends (plugins that say whether they can run, like pydicom's pixel decoders):

* :class:`OnnxRuntimeBackend`: ONNX Runtime with the execution providers it
  offers, preferred in the order TensorRT -> CUDA -> CPU
  (:data:`PROVIDER_PREFERENCE`). A fallback to CPU is logged, never silent.
* :class:`TorchBackend`: the same ONNX file run by PyTorch, on CUDA when there is
  a GPU (optionally in fp16), through :func:`onnx_to_torch`, a small converter of
  the operators a 2D/3D U-Net uses. Needs the optional extra ``cohort[torch]``
  (``torch`` and ``onnx``); :meth:`TorchBackend.is_available` says whether it is
  there. (onnx2torch was not used: it requires torchvision, which does not
  import beside the CPU build of torch this project installs.)

:func:`get_session` caches one backend per (ONNX path, sha256, options) in each
worker process, so a model is loaded once per worker and reused for every case.
:func:`infer_volume` runs the slices of one case in batches. :func:`run_pipelined`
prepares the next cases on threads while the current one is inferred, and
finishes (post-processes) the previous one at the same time.

Workers for this stage should be started with the Dask resource
:data:`GPU_WORKER_RESOURCES` and the stage's tasks submitted with
``resources=GPU_TASK_RESOURCES`` so they go to GPU workers only.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

from cohort.errors import ModelError

if TYPE_CHECKING:  # no pydantic at import: the torch backend alone runs with torch + onnx + numpy
    from cohort.segment.model import ModelSpec

logger = logging.getLogger(__name__)

#: Execution providers of ONNX Runtime, most preferred first.
PROVIDER_PREFERENCE: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)
GPU_PROVIDERS = frozenset(PROVIDER_PREFERENCE[:2])
#: Dask resources a GPU worker declares (``dask worker --resources GPU=1``).
GPU_WORKER_RESOURCES: Mapping[str, float] = {"GPU": 1}
#: Dask resources one segmentation task asks for: one whole GPU.
GPU_TASK_RESOURCES: Mapping[str, float] = {"GPU": 1}


class BackendKind(StrEnum):
    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"


class Device(StrEnum):
    AUTO = "auto"  # a GPU when there is one, else the CPU (logged)
    CPU = "cpu"
    CUDA = "cuda"  # a GPU or an error


@dataclass(frozen=True)
class BackendOptions:
    """How to run a model. Hashable: part of the session cache key."""

    kind: BackendKind = BackendKind.ONNXRUNTIME
    device: Device = Device.AUTO
    fp16: bool = False  # Torch on CUDA: half precision; ONNX Runtime: TensorRT's fp16 only
    threads: int | None = None  # CPU threads (None: the library's default; torch: process-wide)
    trt_cache_dir: str | None = None  # TensorRT engine cache (building an engine takes minutes)
    channels_last: bool = True  # Torch on CUDA: NHWC memory format for tensor cores


@runtime_checkable
class Backend(Protocol):
    """Runs a model on one batch ``(N, C, H, W)`` and returns its raw output ``(N, K, H, W)``."""

    @property
    def name(self) -> str: ...

    @property
    def providers(self) -> tuple[str, ...]: ...

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def select_providers(
    available: Sequence[str], device: Device = Device.AUTO, preference: Sequence[str] = PROVIDER_PREFERENCE
) -> tuple[str, ...]:
    """The providers to ask ONNX Runtime for, in preference order, from those ``available``.

    AUTO: every preferred provider that is available (CPU last, as the fallback).
    CPU: the CPU only. CUDA: the available GPU providers then CPU, or
    :class:`ModelError` when there is none.
    """
    offered = [p for p in preference if p in available]
    if device == Device.CPU:
        return ("CPUExecutionProvider",)
    gpu = [p for p in offered if p in GPU_PROVIDERS]
    if device == Device.CUDA and not gpu:
        raise ModelError(
            f"a GPU was asked for but ONNX Runtime offers only {list(available)}; install onnxruntime-gpu "
            "(never beside onnxruntime: they share the import name) or use the torch backend",
            subject="onnxruntime",
        )
    if not gpu:
        logger.info("ONNX Runtime offers no GPU provider (available: %s); running on CPU", list(available))
    return (*gpu, "CPUExecutionProvider")


def _provider_options(provider: str, options: BackendOptions) -> dict[str, Any]:
    if provider == "TensorrtExecutionProvider":
        trt: dict[str, Any] = {"trt_fp16_enable": options.fp16}
        if options.trt_cache_dir:
            trt |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": options.trt_cache_dir}
        return trt
    return {}


class OnnxRuntimeBackend:
    """A model in one ONNX Runtime session (created once, reused for every batch)."""

    def __init__(self, model: ModelSpec, options: BackendOptions | None = None) -> None:
        import onnxruntime as ort

        options = options or BackendOptions()
        self._model = model
        wanted = select_providers(ort.get_available_providers(), options.device)
        if options.fp16 and "TensorrtExecutionProvider" not in wanted:
            logger.warning(
                "fp16 is only used through TensorRT with ONNX Runtime; running %s in fp32", model.name
            )
        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3
        if options.threads is not None:
            session_options.intra_op_num_threads = options.threads
            session_options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(
                str(model.onnx_path),
                session_options,
                providers=[(p, _provider_options(p, options)) for p in wanted],
            )
        except Exception as exc:  # onnxruntime's errors are untyped
            raise ModelError(
                f"ONNX Runtime cannot create a session ({exc})", subject=str(model.onnx_path)
            ) from exc
        self._providers = tuple(self._session.get_providers())
        dropped = [p for p in wanted if p not in self._providers]
        if dropped:
            logger.warning(
                "ONNX Runtime could not start %s for %s (missing libraries?); using %s",
                dropped,
                model.name,
                list(self._providers),
            )
        if options.device == Device.CUDA and not GPU_PROVIDERS & set(self._providers):
            raise ModelError(f"no GPU provider could start (got {list(self._providers)})", subject=model.name)
        self._input = model.manifest.input.name
        self._output = model.manifest.output.name
        self._dtype = model.manifest.input.dtype.numpy

    @property
    def name(self) -> str:
        return BackendKind.ONNXRUNTIME.value

    @property
    def providers(self) -> tuple[str, ...]:
        return self._providers

    def run(self, batch: np.ndarray) -> np.ndarray:
        feed = np.ascontiguousarray(batch, dtype=self._dtype)
        out = self._session.run([self._output], {self._input: feed})[0]
        return np.asarray(out, dtype=np.float32)


class TorchBackend:
    """The model's ONNX file run by PyTorch (see :func:`onnx_to_torch`), on CUDA when there is one."""

    @staticmethod
    def is_available() -> bool:
        """True when ``torch`` and ``onnx`` can be imported (the ``cohort[torch]`` extra)."""
        return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("onnx") is not None

    @staticmethod
    def cuda_available() -> bool:
        if not TorchBackend.is_available():
            return False
        import torch

        return bool(torch.cuda.is_available())

    def __init__(self, model: ModelSpec | str | Path, options: BackendOptions | None = None) -> None:
        """``model``: a loaded model, or the path of an ONNX file (no manifest: the raw graph)."""
        onnx_path = Path(model) if isinstance(model, str | Path) else model.onnx_path
        name = onnx_path.name if isinstance(model, str | Path) else model.name
        if not self.is_available():
            raise ModelError(
                "the torch backend needs torch and onnx: pip install 'cohort[torch]'", subject=name
            )
        import torch

        options = options or BackendOptions(kind=BackendKind.TORCH)
        cuda = torch.cuda.is_available()
        if options.device == Device.CUDA and not cuda:
            raise ModelError("a GPU was asked for but torch sees no CUDA device", subject=name)
        use_cuda = cuda and options.device != Device.CPU
        if not use_cuda and options.device == Device.AUTO:
            logger.info("torch sees no CUDA device; running %s on CPU", name)
        self._device = torch.device("cuda" if use_cuda else "cpu")
        self._half = options.fp16 and use_cuda
        if options.fp16 and not use_cuda:
            logger.warning("fp16 needs CUDA; running %s in fp32 on CPU", name)
        if not use_cuda and options.threads is not None:
            torch.set_num_threads(options.threads)
        module = onnx_to_torch(onnx_path).eval().to(self._device)
        if self._half:
            module = module.half()
        self._channels_last = use_cuda and options.channels_last
        if self._channels_last:
            module = module.to(memory_format=torch.channels_last)
        if use_cuda:
            torch.backends.cudnn.benchmark = True
        self._module = module
        self._providers = (f"{self._device}{':fp16' if self._half else ''}",)

    @property
    def name(self) -> str:
        return BackendKind.TORCH.value

    @property
    def providers(self) -> tuple[str, ...]:
        return self._providers

    @property
    def module(self) -> Any:
        return self._module

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            if self._device.type == "cuda":
                x = x.pin_memory().to(self._device, non_blocking=True)
            if self._half:
                x = x.half()
            if self._channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = self._module(x)
            return np.asarray(y.float().cpu().numpy(), dtype=np.float32)


def make_backend(model: ModelSpec, options: BackendOptions | None = None) -> Backend:
    """A new backend of ``options.kind`` for ``model`` (uncached; see :func:`get_session`)."""
    options = options or BackendOptions()
    if options.kind == BackendKind.TORCH:
        return TorchBackend(model, options)
    return OnnxRuntimeBackend(model, options)


@lru_cache(maxsize=8)
def _cached_backend(path: str, sha256: str, options: BackendOptions, model: _ModelRef) -> Backend:
    return make_backend(model.spec, options)


@dataclass(frozen=True, eq=False)
class _ModelRef:
    """Carries the ModelSpec into the cache without making it part of the key."""

    spec: ModelSpec

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ModelRef)


_session_lock = threading.Lock()


def get_session(model: ModelSpec, options: BackendOptions | None = None) -> Backend:
    """The backend for ``model`` in this process, created on first use and reused afterwards.

    Keyed by the ONNX file's path and sha256 and by ``options``: a worker that
    processes many cases loads the model once. Thread-safe.
    """
    options = options or BackendOptions()
    with _session_lock:
        return _cached_backend(str(model.onnx_path), model.sha256, options, _ModelRef(model))


def clear_sessions() -> None:
    """Drop every cached backend of this process (frees GPU memory)."""
    with _session_lock:
        _cached_backend.cache_clear()


def infer_volume(slices: np.ndarray, backend: Backend, batch_size: int = 16) -> np.ndarray:
    """Run ``slices`` ``(N, C, H, W)`` through ``backend`` in batches of ``batch_size``; ``(N, K, H, W)``."""
    if slices.ndim != 4:
        raise ModelError(f"slices must be (N, C, H, W), got shape {slices.shape}", subject=backend.name)
    if batch_size < 1:
        raise ModelError(f"batch_size must be >= 1, got {batch_size}", subject=backend.name)
    n = slices.shape[0]
    out: np.ndarray | None = None
    for start in range(0, n, batch_size):
        y = backend.run(slices[start : start + batch_size])
        if out is None:
            out = np.empty((n, *y.shape[1:]), dtype=np.float32)
        out[start : start + y.shape[0]] = y
    if out is None:
        raise ModelError("no slices to infer", subject=backend.name)
    return out


# -- overlapping CPU work with inference ----------------------------------------------------------

T = TypeVar("T")
P = TypeVar("P")
Q = TypeVar("Q")
R = TypeVar("R")


@dataclass(frozen=True)
class Outcome(Generic[T, R]):
    """The result of one item of :func:`run_pipelined`: ``value`` or the ``error`` that stopped it."""

    item: T
    value: R | None = None
    error: BaseException | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def _done(error: BaseException) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_exception(error)
    return fut


def run_pipelined(
    items: Iterable[T],
    prepare: Callable[[T], P],
    infer: Callable[[P], Q],
    finish: Callable[[P, Q], R],
    *,
    prefetch: int = 2,
    prepare_workers: int = 1,
    finish_workers: int = 1,
) -> Iterator[Outcome[T, R]]:
    """Process ``items`` as prepare (CPU) -> infer (accelerator) -> finish (CPU), overlapped.

    Up to ``prefetch`` items are prepared ahead on ``prepare_workers`` threads
    while the calling thread runs ``infer`` on the current one, and finished items
    are post-processed on ``finish_workers`` threads meanwhile. Outcomes come out
    in the order of ``items``. An exception in any stage is caught for that item
    only and returned as its ``error``; the other items go on. NumPy, SciPy,
    SimpleITK, ONNX Runtime and PyTorch release the GIL in their heavy parts, so
    the threads really run at the same time. Memory: at most ``prefetch``
    prepared items and ``prefetch`` items awaiting their finish are held.
    """
    if prefetch < 1:
        raise ValueError("prefetch must be >= 1")
    source = iter(items)
    with (
        ThreadPoolExecutor(prepare_workers, thread_name_prefix="cohort-prepare") as pre_pool,
        ThreadPoolExecutor(finish_workers, thread_name_prefix="cohort-finish") as post_pool,
    ):
        prepared: deque[tuple[T, Future[P]]] = deque()
        finishing: deque[tuple[T, Future[R], float]] = deque()

        def refill() -> None:
            while len(prepared) < prefetch:
                try:
                    item = next(source)
                except StopIteration:
                    return
                prepared.append((item, pre_pool.submit(prepare, item)))

        def outcome(item: T, fut: Future[R], infer_s: float) -> Outcome[T, R]:
            error = fut.exception()
            if error is not None:
                return Outcome(item=item, error=error, seconds={"infer": infer_s})
            return Outcome(item=item, value=fut.result(), seconds={"infer": infer_s})

        refill()
        while prepared:
            item, pre = prepared.popleft()
            try:
                ready = pre.result()
            except Exception as exc:  # recorded in the item's Outcome
                finishing.append((item, _done(exc), 0.0))
            else:
                refill()  # keep the CPU busy while this item is inferred
                clock = time.perf_counter()
                try:
                    raw = infer(ready)
                except Exception as exc:  # recorded in the item's Outcome
                    finishing.append((item, _done(exc), time.perf_counter() - clock))
                else:
                    finishing.append(
                        (item, post_pool.submit(finish, ready, raw), time.perf_counter() - clock)
                    )
                del ready
            refill()
            while finishing and (finishing[0][1].done() or len(finishing) > prefetch):
                yield outcome(*finishing.popleft())
        while finishing:
            yield outcome(*finishing.popleft())


# -- ONNX -> PyTorch --------------------------------------------------------------------------


def onnx_to_torch(path: str | Path) -> Any:
    """Build a ``torch.nn.Module`` that evaluates the ONNX graph at ``path``.

    Supported operators (what U-Nets exported by ``torch.onnx.export`` or
    ``tf2onnx`` use): Conv, ConvTranspose, BatchNormalization, MaxPool,
    AveragePool, GlobalAveragePool, Relu, LeakyRelu, Sigmoid, Tanh, Softmax, Clip,
    Concat, Add, Sub, Mul, Div, Resize/Upsample (nearest, linear), Pad (constant),
    Transpose, Identity, Dropout, Constant. Any other operator raises
    :class:`ModelError` naming it. The graph's weights become buffers, so
    ``.to(device)`` and ``.half()`` move and cast them.
    """
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    proto = onnx.load(str(path))
    graph = proto.graph
    unsupported = sorted({n.op_type for n in graph.node if n.op_type not in _SUPPORTED_OPS})
    if unsupported:
        raise ModelError(
            f"the torch backend does not support the ONNX operator(s) {unsupported}; "
            "use the onnxruntime backend",
            subject=str(path),
        )
    import torch

    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    constants: dict[str, np.ndarray] = {}
    nodes: list[tuple[str, list[str], list[str], dict[str, Any]]] = []
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant":
            value = attrs.get("value")
            if value is None:
                raise ModelError("only tensor-valued Constant nodes are supported", subject=str(path))
            constants[node.output[0]] = numpy_helper.to_array(value)
            continue
        nodes.append((node.op_type, list(node.input), list(node.output), attrs))
    graph_inputs = [i.name for i in graph.input if i.name not in initializers]
    if len(graph_inputs) != 1 or len(graph.output) != 1:
        raise ModelError("the torch backend supports graphs with one input and one output", subject=str(path))

    ops = _torch_ops()

    class OnnxModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._names: dict[str, str] = {}
            for i, (name, array) in enumerate({**initializers, **constants}.items()):
                buffer = f"t{i}"
                self._names[name] = buffer
                self.register_buffer(buffer, torch.from_numpy(np.array(array)))
            self._nodes = nodes
            self._input = graph_inputs[0]
            self._output = graph.output[0].name

        def forward(self, x: Any) -> Any:
            env: dict[str, Any] = {self._input: x}
            for name, buffer in self._names.items():
                env[name] = getattr(self, buffer)
            for op, ins, outs, attrs in self._nodes:
                env[outs[0]] = ops[op]([env[i] if i else None for i in ins], attrs)
            return env[self._output]

    return OnnxModule()


def _sym_pads(pads: Sequence[int], n: int) -> tuple[list[int], list[int] | None]:
    """ONNX pads ``[b1..bn, e1..en]`` -> (symmetric padding, or None and an F.pad list)."""
    begin, end = list(pads[:n]), list(pads[n:])
    if begin == end:
        return begin, None
    pad: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        pad += [b, e]
    return [0] * n, pad


def _check_auto_pad(attrs: Mapping[str, Any]) -> None:
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "VALID"):
        raise ModelError(f"auto_pad={auto} is not supported by the torch backend", subject="onnx_to_torch")


def _conv(args: list[Any], attrs: Mapping[str, Any]) -> Any:
    import torch.nn.functional as F

    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    n = w.dim() - 2
    _check_auto_pad(attrs)
    padding, pad = _sym_pads(attrs.get("pads", [0] * 2 * n), n)
    if pad is not None:
        x = F.pad(x, pad)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    return fn(
        x,
        w,
        b,
        stride=attrs.get("strides", [1] * n),
        padding=padding,
        dilation=attrs.get("dilations", [1] * n),
        groups=attrs.get("group", 1),
    )


def _conv_transpose(args: list[Any], attrs: Mapping[str, Any]) -> Any:
    import torch.nn.functional as F

    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    n = w.dim() - 2
    _check_auto_pad(attrs)
    if "output_shape" in attrs:
        raise ModelError("ConvTranspose with output_shape is not supported", subject="onnx_to_torch")
    padding, pad = _sym_pads(attrs.get("pads", [0] * 2 * n), n)
    if pad is not None:
        raise ModelError("ConvTranspose with asymmetric pads is not supported", subject="onnx_to_torch")
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
    return fn(
        x,
        w,
        b,
        stride=attrs.get("strides", [1] * n),
        padding=padding,
        output_padding=attrs.get("output_padding", [0] * n),
        groups=attrs.get("group", 1),
        dilation=attrs.get("dilations", [1] * n),
    )


def _pool(kind: str) -> Callable[[list[Any], Mapping[str, Any]], Any]:
    def op(args: list[Any], attrs: Mapping[str, Any]) -> Any:
        import torch.nn.functional as F

        x = args[0]
        kernel = list(attrs["kernel_shape"])
        n = len(kernel)
        _check_auto_pad(attrs)
        padding, pad = _sym_pads(attrs.get("pads", [0] * 2 * n), n)
        if pad is not None:
            x = F.pad(x, pad, value=float("-inf") if kind == "max" else 0.0)
        stride = attrs.get("strides", [1] * n)
        ceil = bool(attrs.get("ceil_mode", 0))
        if kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
            return fn(x, kernel, stride, padding, attrs.get("dilations", [1] * n), ceil)
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n]
        return fn(x, kernel, stride, padding, ceil, bool(attrs.get("count_include_pad", 0)))

    return op


def _batch_norm(args: list[Any], attrs: Mapping[str, Any]) -> Any:
    import torch.nn.functional as F

    x, scale, bias, mean, var = args[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=attrs.get("epsilon", 1e-5))


def _resize(args: list[Any], attrs: Mapping[str, Any]) -> Any:
    import torch.nn.functional as F

    x = args[0]
    mode = attrs.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    transform = attrs.get("coordinate_transformation_mode", b"half_pixel")
    transform = transform.decode() if isinstance(transform, bytes) else transform
    scales = args[2] if len(args) > 2 and args[2] is not None and args[2].numel() else None
    if scales is None and len(args) == 2 and args[1] is not None and args[1].dtype.is_floating_point:
        scales = args[1]  # Upsample(X, scales)
    sizes = args[3] if len(args) > 3 and args[3] is not None and args[3].numel() else None
    n = x.dim() - 2
    kwargs: dict[str, Any] = {}
    if sizes is not None:
        kwargs["size"] = [int(s) for s in sizes.tolist()[2:]]
    elif scales is not None:
        kwargs["scale_factor"] = [float(s) for s in scales.tolist()[2:]]
    else:
        raise ModelError("Resize without scales or sizes is not supported", subject="onnx_to_torch")
    if mode == "nearest":
        return F.interpolate(x, mode="nearest", **kwargs)
    if mode == "linear":
        torch_mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[n]
        if transform == "align_corners":
            return F.interpolate(x, mode=torch_mode, align_corners=True, **kwargs)
        if transform in ("half_pixel", "pytorch_half_pixel"):
            return F.interpolate(x, mode=torch_mode, align_corners=False, **kwargs)
    raise ModelError(f"Resize mode={mode} with {transform} is not supported", subject="onnx_to_torch")


def _pad(args: list[Any], attrs: Mapping[str, Any]) -> Any:
    import torch.nn.functional as F

    x = args[0]
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = args[1].tolist() if len(args) > 1 and args[1] is not None else list(attrs["pads"])
    value = float(args[2].item()) if len(args) > 2 and args[2] is not None else float(attrs.get("value", 0.0))
    if mode != "constant":
        raise ModelError(f"Pad mode={mode} is not supported", subject="onnx_to_torch")
    n = x.dim()
    flat: list[int] = []
    for b, e in zip(reversed(pads[:n]), reversed(pads[n:]), strict=True):
        flat += [int(b), int(e)]
    return F.pad(x, flat, value=value)


def _bound(args: list[Any], index: int, attrs: Mapping[str, Any], name: str) -> float | None:
    if len(args) > index and args[index] is not None:
        return float(args[index].item())
    value = attrs.get(name)
    return None if value is None else float(value)


def _clip(args: list[Any], attrs: Mapping[str, Any]) -> Any:
    return args[0].clamp(min=_bound(args, 1, attrs, "min"), max=_bound(args, 2, attrs, "max"))


_ELEMENTWISE = (
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Softmax",
    "Concat",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Transpose",
    "GlobalAveragePool",
    "Identity",
    "Dropout",
)
_SUPPORTED_OPS = frozenset(
    (
        *_ELEMENTWISE,
        "Conv",
        "ConvTranspose",
        "BatchNormalization",
        "MaxPool",
        "AveragePool",
        "Resize",
        "Upsample",
        "Pad",
        "Clip",
        "Constant",
    )
)


@lru_cache(maxsize=1)
def _torch_ops() -> dict[str, Callable[[list[Any], Mapping[str, Any]], Any]]:
    import torch
    import torch.nn.functional as F

    ops: dict[str, Callable[[list[Any], Mapping[str, Any]], Any]] = {
        "Relu": lambda a, k: F.relu(a[0]),
        "LeakyRelu": lambda a, k: F.leaky_relu(a[0], k.get("alpha", 0.01)),
        "Sigmoid": lambda a, k: torch.sigmoid(a[0]),
        "Tanh": lambda a, k: torch.tanh(a[0]),
        "Softmax": lambda a, k: torch.softmax(a[0], dim=k.get("axis", -1)),
        "Concat": lambda a, k: torch.cat(a, dim=k["axis"]),
        "Add": lambda a, k: a[0] + a[1],
        "Sub": lambda a, k: a[0] - a[1],
        "Mul": lambda a, k: a[0] * a[1],
        "Div": lambda a, k: a[0] / a[1],
        "Transpose": lambda a, k: a[0].permute(*k["perm"]),
        "GlobalAveragePool": lambda a, k: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True),
        "Identity": lambda a, k: a[0],
        "Dropout": lambda a, k: a[0],  # inference
        "Conv": _conv,
        "ConvTranspose": _conv_transpose,
        "BatchNormalization": _batch_norm,
        "MaxPool": _pool("max"),
        "AveragePool": _pool("avg"),
        "Resize": _resize,
        "Upsample": _resize,
        "Pad": _pad,
        "Clip": _clip,
    }
    return ops


__all__ = [
    "GPU_TASK_RESOURCES",
    "GPU_WORKER_RESOURCES",
    "PROVIDER_PREFERENCE",
    "Backend",
    "BackendKind",
    "BackendOptions",
    "Device",
    "OnnxRuntimeBackend",
    "Outcome",
    "TorchBackend",
    "clear_sessions",
    "get_session",
    "infer_volume",
    "make_backend",
    "onnx_to_torch",
    "run_pipelined",
    "select_providers",
]
