"""serve/runtime.py on the CUDA path: what of it runs on CPU (IOBinding, padding to buckets,
instance threads), how an unusable CUDA provider is reported, and, where a GPU is usable, the
same checks on the CUDA provider itself (skipped elsewhere)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from serve import runtime as runtime_module
from serve.model_info import read_model_info
from serve.runtime import Runtime, nodes_off, nvidia_driver_present, preload_cuda_libraries
from tests.serve.conftest import make_reshape_model


def _cuda_usable(path: Path) -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not nvidia_driver_present():
        return False
    if preload_cuda_libraries():
        return False
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(
        str(path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    return session.get_providers()[0] == "CUDAExecutionProvider"


def _cuda_like(path: Path, max_batch: int = 8) -> Runtime:
    """The CUDA provider's configuration (IOBinding, padded to buckets), on the CPU provider."""
    return Runtime(
        read_model_info("tiny", path), device="cpu", max_batch_size=max_batch,
        intra_op_threads=1, io_binding=True, pad=True,
    )  # fmt: skip


def _bound_sizes(runtime: Runtime) -> list[int]:
    """The batch sizes the calling thread holds IOBinding buffers for."""
    return sorted(getattr(runtime._bound, "slots", {}))


# --- IOBinding buffers: per instance thread, none left on the thread that warmed up ----------


def test_warm_up_leaves_no_bound_buffers_on_the_loader_thread(classifier_path: Path) -> None:
    # The server warms up in asyncio.to_thread, a pool thread that lives on and never runs a
    # batch; on CUDA each bucket's buffer it kept was device memory held for nothing.
    runtime = _cuda_like(classifier_path)
    with ThreadPoolExecutor(1) as loader:
        assert loader.submit(runtime.warm_up).result() is True
        assert loader.submit(_bound_sizes, runtime).result() == []
    # An instance thread binds its own buffers as batches come, and answers as before.
    rows = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    padded = np.concatenate([rows, np.zeros((1, 3, 8, 8), np.float32)])
    plain = Runtime(
        read_model_info("tiny", classifier_path), device="cpu", max_batch_size=8,
        intra_op_threads=1,
    )  # fmt: skip
    np.testing.assert_array_equal(runtime.run(padded)[:3], plain.run(padded)[:3])
    assert _bound_sizes(runtime) == [4]


def test_a_refused_warm_up_leaves_no_bound_buffers_either(tmp_path: Path) -> None:
    path = make_reshape_model(tmp_path / "b1.onnx", shape=[1, 48], declared_classes=48)
    runtime = _cuda_like(path)
    with pytest.raises(ValueError, match="does not accept batch size 2"):
        runtime.warm_up()
    assert _bound_sizes(runtime) == []


def test_padded_bound_runs_from_instance_threads_answer_each_row_as_run_alone(
    classifier_path: Path,
) -> None:
    # As the batcher does on CUDA: rows padded with zeros to their bucket, several instance
    # threads at once, each row's logits read back from the first rows of the answer.
    runtime = _cuda_like(classifier_path)
    runtime.warm_up()
    plain = Runtime(
        read_model_info("tiny", classifier_path), device="cpu", max_batch_size=8,
        intra_op_threads=1,
    )  # fmt: skip
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 9, 40)
    requests = [rng.normal(size=(int(n), 3, 8, 8)).astype(np.float32) for n in sizes]

    def run(rows: np.ndarray) -> np.ndarray:
        size = runtime.batch_size(len(rows))
        batch = np.zeros((size, *rows.shape[1:]), np.float32)
        batch[: len(rows)] = rows
        return runtime.run(batch)[: len(rows)]

    with ThreadPoolExecutor(4) as instances:
        answers = list(instances.map(run, requests))
    for rows, got in zip(requests, answers, strict=True):
        alone = np.concatenate([plain.run(rows[i : i + 1]) for i in range(len(rows))])
        np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-5)
    assert [runtime.batch_size(n) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]


# --- an unusable CUDA provider: said in the one line, not printed on stdout -------------------


def _cuda_listed_but_unusable(path: Path) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider to fail")
    if _cuda_usable(path):
        pytest.skip("the CUDA provider works here")


def test_device_cuda_says_why_cuda_is_unusable_and_prints_nothing(
    classifier_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    _cuda_listed_but_unusable(classifier_path)
    capfd.readouterr()
    info = read_model_info("tiny", classifier_path)
    with pytest.raises(RuntimeError, match="expected the CUDA execution provider") as refused:
        Runtime(info, device="cuda", max_batch_size=8, intra_op_threads=1)
    message = str(refused.value)
    # onnxruntime.preload_dlls() print()ed "Failed to load libcublasLt.so.13: ..." lines on
    # stdout, outside the log and --log-format json.
    assert capfd.readouterr().out == ""
    missing = preload_cuda_libraries()
    if not nvidia_driver_present():
        assert "no NVIDIA driver is loaded" in message, message
    for library in missing:
        assert library in message, message
    assert "--device auto" in message and "\n" not in message


def test_auto_falls_back_to_cpu_in_one_line_naming_the_missing_libraries(
    classifier_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _cuda_listed_but_unusable(classifier_path)
    missing = preload_cuda_libraries()
    if not missing:
        pytest.skip("the CUDA libraries load here; the provider fails for another reason")
    # A host with a driver but without the [cuda] extra's libraries.
    monkeypatch.setattr(runtime_module, "nvidia_driver_present", lambda: True)
    capfd.readouterr()
    info = read_model_info("tiny", classifier_path)
    with caplog.at_level(logging.INFO, logger="serve.runtime"):
        runtime = Runtime(info, device="auto", max_batch_size=8, intra_op_threads=1)
    assert runtime.provider == "CPUExecutionProvider" and runtime.io_binding is False
    assert capfd.readouterr().out == ""
    (line,) = [r.getMessage() for r in caplog.records if "runs on" in r.getMessage()]
    assert "CUDA requested but unusable, CPU fallback" in line, line
    assert all(library in line for library in missing), line


# --- nodes ONNX Runtime placed on another provider than the session's first -----------------


def test_nodes_off_counts_the_nodes_another_provider_runs(classifier_path: Path) -> None:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    session = ort.InferenceSession(
        str(classifier_path), options, providers=["CPUExecutionProvider"]
    )
    if not hasattr(session, "get_provider_graph_assignment_info"):
        pytest.skip(f"onnxruntime {ort.__version__} does not record node assignments")
    # Seen from CUDA, every node of this CPU session is one that left the device.
    assert nodes_off(session, "CUDAExecutionProvider") == {
        "Conv": 1, "Relu": 1, "Flatten": 1, "Gemm": 1,
    }  # fmt: skip
    assert nodes_off(session, "CPUExecutionProvider") == {}
    unrecorded = ort.InferenceSession(str(classifier_path), providers=["CPUExecutionProvider"])
    assert nodes_off(unrecorded, "CUDAExecutionProvider") == {}


# --- on a usable GPU only ---------------------------------------------------------------------


@pytest.fixture
def cuda_runtime(classifier_path: Path) -> Runtime:
    if not _cuda_usable(classifier_path):
        pytest.skip("no usable CUDA provider here")
    runtime = Runtime(
        read_model_info("tiny", classifier_path), device="cuda", max_batch_size=8,
        intra_op_threads=1,
    )  # fmt: skip
    assert runtime.provider == "CUDAExecutionProvider"
    assert runtime.io_binding is True and runtime.pads is True
    return runtime


def test_cuda_bound_runs_match_the_cpu_provider(
    cuda_runtime: Runtime, classifier_path: Path
) -> None:
    assert cuda_runtime.warm_up() is True
    assert _bound_sizes(cuda_runtime) == []
    cpu = Runtime(
        read_model_info("tiny", classifier_path), device="cpu", max_batch_size=8,
        intra_op_threads=1,
    )  # fmt: skip
    rng = np.random.default_rng(4)
    batches = [rng.normal(size=(size, 3, 8, 8)).astype(np.float32) for size in (1, 2, 4, 8) * 4]
    with ThreadPoolExecutor(4) as instances:  # instance threads, each with its own buffers
        answers = list(instances.map(cuda_runtime.run, batches))
    for batch, got in zip(batches, answers, strict=True):
        # TF32 (the CUDA provider's default on Ampere and newer) rounds matmul inputs to a
        # 10-bit mantissa.
        np.testing.assert_allclose(got, cpu.run(batch), rtol=1e-2, atol=1e-2)


def test_a_device_out_of_memory_binding_a_bucket_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # How the CUDA arena refuses a bucket's buffers, injected (this machine has no GPU): a
    # plain RuntimeError from the IOBinding calls before the run, which escaped warm_up as it
    # was and reached the batcher as an INTERNAL "bug" with a traceback.
    path = make_reshape_model(tmp_path / "m.onnx", shape=[-1, 48], declared_classes=48)
    runtime = _cuda_like(path, max_batch=2)
    io_binding = runtime.session.io_binding

    def full_at_2() -> object:
        if _bound_sizes(runtime) == [1]:
            raise RuntimeError(
                "/onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:359 void* "
                "onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*) "
                "Failed to allocate memory for requested buffer of size 384"
            )
        return io_binding()

    monkeypatch.setattr(runtime.session, "io_binding", full_at_2)
    with pytest.raises(ValueError, match=r"expected memory .* at batch size 2") as refused:
        runtime.warm_up()
    assert "pass --max-batch-size 1 or free memory" in str(refused.value)
