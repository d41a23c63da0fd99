"""ONNX Runtime sessions: provider choice (CUDA, else CPU), batch-size buckets, warm-up."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_c

from serve import affinity
from serve.model_info import ModelInfo

_log = logging.getLogger(__name__)

# ONNX Runtime raises its own exception types (Fail, InvalidGraph, NoSuchFile, ...), none of them
# a RuntimeError; bench and server catch them through this tuple.
ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    v for v in vars(_ort_c).values() if isinstance(v, type) and issubclass(v, Exception)
)
# Of those, the ones that mean the device failed, not the model; and how a CUDA failure reads
# when ONNX Runtime raises it as a plain Fail (as a run does).
_DEVICE_ERRORS = ("EPFail", "DeviceReset", "EngineError")
_DEVICE_FAILURE = re.compile(r"CUDA failure|CUDA error|CUDNN failure|CUBLAS failure|cudaError")
# How ONNX Runtime says that an allocation failed (CPU arena, CUDA).
_OUT_OF_MEMORY = re.compile(r"Failed to allocate memory|out of memory|bad_alloc", re.IGNORECASE)
# How onnxruntime.preload_dlls says a library did not load: "Failed to load PATH: REASON".
_LOAD_FAILURE = re.compile(r"^Failed to load (\S+?): ", re.MULTILINE)
# "/onnxruntime_src/onnxruntime/core/graph/model.cc:256 onnxruntime::Model::Model(...) ", also
# with a return type: ".../model_load_utils.h:46 void onnxruntime::...::ValidateOpset(...) "
_SOURCE_LOCATION = re.compile(
    r"\S*/onnxruntime\S*\.(?:cc|cpp|h):\d+ (?:(?:[\w:<>*&]+ )?[\w:~<>]+\(.*?\) )?"
)


def buckets_for(max_batch: int) -> tuple[int, ...]:
    """Batch sizes the accelerator sees: powers of two below ``max_batch``, then ``max_batch``."""
    sizes = []
    size = 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch)
    return tuple(sizes)


def bucket_for(rows: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``rows``."""
    for size in buckets:
        if size >= rows:
            return size
    raise ValueError(f"expected at most {buckets[-1]} rows in a batch, got {rows}")


def nvidia_driver_present() -> bool:
    """False where no NVIDIA driver is loaded, so creating the CUDA provider can only fail.

    onnxruntime-gpu lists CUDAExecutionProvider on every host; trying it without a driver
    prints several lines of loader errors, which a CPU-only host should not show.
    """
    return sys.platform != "linux" or Path("/dev/nvidiactl").exists()


def _providers(device: str) -> tuple[list[str], list[str]]:
    """The providers to ask ONNX Runtime for, and the CUDA libraries that did not load."""
    if device == "cpu" or (device == "auto" and not nvidia_driver_present()):
        return ["CPUExecutionProvider"], []
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        if device == "cuda":
            raise RuntimeError(
                "expected onnxruntime with CUDAExecutionProvider for --device cuda, got "
                f"{available}; install onnxruntime-gpu or pass --device auto"
            )
        return ["CPUExecutionProvider"], []
    missing = preload_cuda_libraries()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"], missing


def cuda_unusable(missing: list[str]) -> str:
    """Why ONNX Runtime did not create the CUDA provider, as far as this process can tell."""
    reasons = []
    if not nvidia_driver_present():
        reasons.append("no NVIDIA driver is loaded: /dev/nvidiactl is missing")
    if missing:
        reasons.append(f"CUDA libraries that did not load: {', '.join(missing)}")
    return "; ".join(reasons) or "onnxruntime could not create it, its log above says why"


def preload_cuda_libraries() -> list[str]:
    """Load CUDA and cuDNN from pip wheels (the [cuda] extra) where onnxruntime can
    (``preload_dlls``); the names of the libraries it could not load. A missing wheel only
    means the CUDA provider will not be created, which the caller's provider check reports
    (naming these)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return []
    # preload_dlls print()s a line per library it cannot load, on stdout, outside the log
    # and --log-format json; the names go into the caller's one line instead.
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            preload()
    except Exception as e:
        _log.debug("onnxruntime.preload_dlls() failed: %s", e)
    text = printed.getvalue()
    if text.strip():
        _log.debug("onnxruntime.preload_dlls(): %s", " | ".join(text.split("\n")).strip(" |"))
    # A library present but unloadable is reported twice (by path, then by name): once here.
    return list(dict.fromkeys(Path(name).name for name in _LOAD_FAILURE.findall(text)))


def ort_reason(error: Exception) -> str:
    """ONNX Runtime's message on one line, without its status prefix and C++ source location."""
    text = " ".join(str(error).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Error in execution: ", "", text)  # run_with_iobinding's RuntimeError
    text = re.sub(r"^Load model from .*? failed:", "", text)
    text = text.replace("Status Message: ", "").replace("Name:'' ", "")
    text = _SOURCE_LOCATION.sub("", text).strip()
    return text if len(text) <= 400 else text[:400] + " ..."


def _load_hint(path: Path, reason: str) -> str:
    ir = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", reason)
    if ir:
        return (
            f"re-save it with ir_version {ir.group(2)} (m = onnx.load({str(path)!r}); "
            f"m.ir_version = {ir.group(2)}; onnx.save(m, {str(path)!r})), re-export it with "
            "`python -m export`, or upgrade onnxruntime"
        )
    if "No Op registered" in reason or "opset" in reason.lower():
        return (
            f"export it with standard ONNX operators at an opset onnxruntime {ort.__version__} "
            "supports (`python -m export`), or upgrade onnxruntime"
        )
    return "re-export it with `python -m export` or check it with onnx.checker.check_model"


def device_failed(error: Exception) -> bool:
    """True when ``error``, raised by ONNX Runtime, means the execution provider failed."""
    return type(error).__name__ in _DEVICE_ERRORS or bool(_DEVICE_FAILURE.search(str(error)))


def out_of_memory(error: Exception) -> bool:
    """True when ``error``, raised by ONNX Runtime, says an allocation failed."""
    return bool(_OUT_OF_MEMORY.search(str(error)))


def _raise_if_device_failed(path: Path, error: Exception) -> None:
    """RuntimeError when ``error`` means the execution provider failed, not the model."""
    if device_failed(error):
        raise RuntimeError(
            f"expected onnxruntime to run {path} on its execution provider, got "
            f"{type(error).__name__}: {ort_reason(error)}; check the GPU driver and CUDA "
            "libraries or pass --device cpu"
        ) from error


def open_session(
    path: Path, options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    """An ONNX Runtime session of the model file at ``path``.

    Raises ValueError when ONNX Runtime refuses the model (one line naming the file and what to
    do), RuntimeError when the execution provider fails.
    """
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except ORT_ERRORS as e:
        _raise_if_device_failed(path, e)
        reason = ort_reason(e)
        raise ValueError(
            f"expected a model onnxruntime {ort.__version__} can load at {path}, got "
            f"{type(e).__name__}: {reason}; {_load_hint(path, reason)}"
        ) from e


def nodes_off(session: ort.InferenceSession, provider: str) -> dict[str, int]:
    """How many nodes of each op type ONNX Runtime assigned to a provider other than
    ``provider``; empty where the session did not record its assignments (the session option
    ``session.record_ep_graph_assignment_info``, onnxruntime 1.23 or newer)."""
    assignments = getattr(session, "get_provider_graph_assignment_info", None)
    if assignments is None:
        return {}
    try:
        subgraphs = assignments()
    except ORT_ERRORS:  # not recorded
        return {}
    counts: Counter[str] = Counter()
    for subgraph in subgraphs:
        if subgraph.ep_name != provider:
            counts.update(node.op_type for node in subgraph.get_nodes())
    return dict(counts)


class Runtime:
    """One ONNX Runtime session of one model, with its batch buckets warmed up.

    ``run`` is thread-safe (ONNX Runtime allows concurrent ``InferenceSession.run``) and
    releases the GIL, so callers run it in worker threads.
    """

    def __init__(
        self,
        info: ModelInfo,
        *,
        device: str,
        max_batch_size: int,
        intra_op_threads: int,
        io_binding: bool | None = None,
        pad: bool | None = None,
    ) -> None:
        self.info = info
        options = ort.SessionOptions()
        plan = affinity.ThreadPlan(intra_op_threads) if intra_op_threads else affinity.thread_plan()
        plan.apply(options)
        # Idle ORT threads would spin on the cores the event loop needs to receive and answer
        # requests; on 2 shared cores that halved batch-1 throughput (docs/benchmarks.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # CUDA-provider creation failures are reported below
        requested, missing = _providers(device)
        if "CUDAExecutionProvider" in requested:  # for nodes_off below
            options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        threads_before = affinity.thread_ids()
        self.session = open_session(info.path, options, requested)
        active = self.session.get_providers()
        self.provider = active[0]
        # With its default thread count ORT pins its pool threads; the CPUs it left for the
        # thread that calls run, where instance threads and the loop go (serve/affinity.py).
        self.caller_cpus = (
            affinity.cpus_left_by(threads_before)
            if self.provider == "CPUExecutionProvider" and plan.pins
            else None
        )
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            raise RuntimeError(
                f"expected the CUDA execution provider for --device cuda, got {active} "
                f"({cuda_unusable(missing)}); check the GPU driver and CUDA libraries "
                "(pip install '.[cuda]') or pass --device auto"
            )
        if self.provider == "CUDAExecutionProvider" or device == "cpu":
            why = ""
        elif "CUDAExecutionProvider" in requested:
            why = f" (CUDA requested but unusable, CPU fallback: {cuda_unusable(missing)})"
        else:
            why = " (no usable CUDA: no NVIDIA driver or no CUDA build of onnxruntime)"
        _log.info("model %s runs on %s%s", info.name, self.provider, why)
        on_cpu = self.provider == "CPUExecutionProvider"
        off = {} if on_cpu else nodes_off(self.session, self.provider)
        if off:
            # ORT's own warning about this is below the log level set above, and says neither
            # which nodes nor how many.
            _log.info(
                "model %s: %d node%s on the CPU provider (%s): ONNX Runtime keeps shape "
                "computations there; a compute op there copies its tensors between device and "
                "host at every batch",
                info.name,
                sum(off.values()),
                "" if sum(off.values()) == 1 else "s",
                ", ".join(f"{n} {op}" for op, n in sorted(off.items())),
            )
        if plan.why:
            _log.info(
                "model %s: %d ONNX Runtime intra-op thread%s, as %s (ORT's default counts every "
                "core of the machine; --intra-op-threads sets it)",
                info.name,
                plan.threads,
                "" if plan.threads == 1 else "s",
                plan.why,
            )
        if self.caller_cpus is not None:
            _log.info(
                "model %s: instance threads pinned to CPUs %s, off ONNX Runtime's pool threads",
                info.name,
                sorted(self.caller_cpus),
            )
        limit = max_batch_size if info.fixed_batch is None else info.fixed_batch
        self.max_batch = limit
        self.buckets = (info.fixed_batch,) if info.fixed_batch else buckets_for(limit)
        # On CUDA (default) or when asked: inputs are copied into a device buffer kept per
        # bucket and thread (IOBinding) instead of ORT allocating one per run. The GPU side is
        # unmeasured (docs/benchmarks.md); tests/serve/test_runtime.py runs this path on CPU.
        on_cuda = self.provider == "CUDAExecutionProvider"
        # Padding to a bucket lets the GPU see only warmed shapes (cuDNN picks its algorithms
        # per shape). ONNX Runtime's CPU provider runs a new batch size as fast as a known one,
        # so there padding only computes zeros: up to 30% of every batch (docs/benchmarks.md).
        self.pads = bool(on_cuda or info.fixed_batch) if pad is None else pad
        self.io_binding = on_cuda if io_binding is None else io_binding
        self._device = "cuda" if on_cuda else "cpu"
        self._bound = threading.local()
        # ONNX Runtime also logs a failed run itself, in colour and outside --log-format; the
        # error it raises is what warm_up and the batcher report.
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4

    def batch_size(self, rows: int) -> int:
        """The batch size ``rows`` rows run at: their bucket when padding, else ``rows``."""
        if rows > self.max_batch:
            raise ValueError(f"expected at most {self.max_batch} rows in a batch, got {rows}")
        return bucket_for(rows, self.buckets) if self.pads else rows

    def warm_up(self, stop: threading.Event | None = None) -> bool:
        """Run every bucket once so no request pays for first-shape setup; False when ``stop``
        was set before the last bucket ran (the server is shutting down while loading).

        Raises ValueError naming the model file when a bucket fails to run or gives logits of
        another shape than [batch, num_classes].
        """
        try:
            return self._warm_up(stop)
        finally:
            # Warm-up runs on a loader thread that serves no batch (instance threads bind
            # buffers of their own): kept, its IOBinding buffers would hold device memory for
            # every bucket as long as that pool thread lives.
            self._bound.__dict__.pop("slots", None)

    def _warm_up(self, stop: threading.Event | None) -> bool:
        ran: list[int] = []
        for size in self.buckets:
            if stop is not None and stop.is_set():
                return False
            try:
                logits = self.run(np.zeros((size, *self.info.sample_shape), dtype=np.float32))
            except ORT_ERRORS as e:
                _raise_if_device_failed(self.info.path, e)
                raise self._refusal(size, ran, f"{type(e).__name__}: {ort_reason(e)}") from e
            except MemoryError as e:  # numpy's, for the bucket's zeros: samples of huge dims
                raise self._refusal(size, ran, f"MemoryError: out of memory ({e})") from e
            expected = (size, self.info.num_classes)
            if tuple(logits.shape) != expected:
                raise self._refusal(size, ran, f"logits of shape {list(logits.shape)}")
            ran.append(size)
        return stop is None or not stop.is_set()

    def _refusal(self, size: int, ran: list[int], got: str) -> ValueError:
        path, classes = self.info.path, self.info.num_classes
        if _OUT_OF_MEMORY.search(got):
            fix = f"pass --max-batch-size {ran[-1]} or" if ran else "serve a smaller model or"
            return ValueError(
                f"expected memory to run the model {path} at batch size {size} (a bucket up to "
                f"--max-batch-size {self.max_batch}), got {got}; {fix} free memory on the device"
            )
        if ran:  # smaller batches ran: the batch size is the problem
            return ValueError(
                f"expected the model {path} to run at batch size {size} (a bucket up to "
                f"--max-batch-size {self.max_batch}), got {got}; the model does not accept batch "
                f"size {size}: export it with a dynamic batch axis (`python -m export`) or pass "
                f"--max-batch-size {ran[-1]}"
            )
        return ValueError(
            f"expected the model {path} to give logits [{size}, {classes}] for a batch "
            f"[{size}, {', '.join(map(str, self.info.sample_shape))}] ({classes} classes from its "
            f"output shape or metadata num_classes), got {got}; fix the graph or its metadata "
            "and re-export it with `python -m export`"
        )

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits [N, K] for a float32 batch [N, *sample_shape]; N from ``batch_size``.

        Raises one of ``ORT_ERRORS`` when the model fails to run, on either path.
        """
        if self.io_binding:
            return self._run_bound(batch)
        (logits,) = self.session.run(
            [self.info.output_name], {self.info.input_name: batch}, self._run_options
        )
        return logits

    def _run_bound(self, batch: np.ndarray) -> np.ndarray:
        # One input buffer per bucket and thread: concurrent instances never share one.
        slots: dict[int, tuple[ort.OrtValue, ort.IOBinding]] = self._bound.__dict__.setdefault(
            "slots", {}
        )
        try:
            slot = slots.get(len(batch))
            if slot is None:
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    list(batch.shape), np.float32, self._device, 0
                )
                binding = self.session.io_binding()
                binding.bind_ortvalue_input(self.info.input_name, value)
                binding.bind_output(self.info.output_name, self._device)
                slot = slots[len(batch)] = (value, binding)
            value, binding = slot
            value.update_inplace(np.ascontiguousarray(batch, dtype=np.float32))
            self.session.run_with_iobinding(binding, self._run_options)
            return binding.copy_outputs_to_cpu()[0]
        except RuntimeError as e:
            # The IOBinding calls raise a plain RuntimeError where run raises ORT's types (the
            # device's allocation and copies too: out of memory, a CUDA failure); as one of
            # those, warm_up and the batcher tell a device failure or a full device from a
            # model refusing its input on this path too.
            raise _ort_c.Fail(str(e)) from e
