"""serve/runtime.py: batch sizes (padded to buckets only where it pays), and the IOBinding path
(CUDA's, run here on CPU) answers like a plain run."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from serve.model_info import read_model_info
from serve.runtime import Runtime
from tests.serve.conftest import make_reshape_model


def _runtime(path: Path, io_binding: bool) -> Runtime:
    info = read_model_info("tiny", path)
    return Runtime(
        info, device="cpu", max_batch_size=8, intra_op_threads=1, io_binding=io_binding
    )


def test_cpu_runs_plainly_by_default(classifier_path: Path) -> None:
    info = read_model_info("tiny", classifier_path)
    runtime = Runtime(info, device="cpu", max_batch_size=8, intra_op_threads=1)
    assert runtime.io_binding is False


def test_cpu_batches_run_unpadded_and_padding_fills_buckets(classifier_path: Path) -> None:
    info = read_model_info("tiny", classifier_path)
    cpu = Runtime(info, device="cpu", max_batch_size=8, intra_op_threads=1)
    assert cpu.pads is False
    assert [cpu.batch_size(n) for n in (1, 3, 5, 8)] == [1, 3, 5, 8]
    padded = Runtime(info, device="cpu", max_batch_size=8, intra_op_threads=1, pad=True)
    assert [padded.batch_size(n) for n in (1, 3, 5, 8)] == [1, 4, 8, 8]
    for runtime in (cpu, padded):
        with pytest.raises(ValueError, match="at most 8 rows"):
            runtime.batch_size(9)
    # Any batch size runs on the CPU provider, and each row's logits do not depend on it.
    rows = np.random.default_rng(2).normal(size=(5, *info.sample_shape)).astype(np.float32)
    np.testing.assert_allclose(cpu.run(rows)[3], cpu.run(rows[3:4])[0], rtol=1e-5, atol=1e-5)


def test_bound_runs_equal_plain_runs_for_every_bucket_and_reuse(classifier_path: Path) -> None:
    plain, bound = _runtime(classifier_path, False), _runtime(classifier_path, True)
    rng = np.random.default_rng(1)
    for _ in range(2):  # the second round reuses each bucket's buffer with new data
        for size in bound.buckets:
            batch = rng.normal(size=(size, 3, 8, 8)).astype(np.float32)
            expected = plain.run(batch)
            got = bound.run(batch)
            assert got.shape == (size, 5)
            np.testing.assert_array_equal(got, expected)


def test_bound_runs_from_threads_keep_their_own_buffers(classifier_path: Path) -> None:
    plain, bound = _runtime(classifier_path, False), _runtime(classifier_path, True)
    rng = np.random.default_rng(2)
    batches = [rng.normal(size=(4, 3, 8, 8)).astype(np.float32) for _ in range(16)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(bound.run, batches))
    for batch, got in zip(batches, results, strict=True):
        np.testing.assert_array_equal(got, plain.run(batch))


# --- models ONNX Runtime refuses: one ValueError naming the file and what to do ----------------


def test_a_model_from_a_newer_onnx_is_refused_with_how_to_resave(
    classifier_path: Path, tmp_path: Path
) -> None:
    model = onnx.load(str(classifier_path))
    model.ir_version = 99  # beyond any onnxruntime; the onnx package saves it as is
    path = tmp_path / "new.onnx"
    onnx.save(model, str(path))
    info = read_model_info("new", path)
    with pytest.raises(ValueError, match="IR version: 99") as refused:
        Runtime(info, device="cpu", max_batch_size=8, intra_op_threads=1)
    message = str(refused.value)
    assert str(path) in message and "ir_version" in message and "python -m export" in message
    assert "\n" not in message and "onnxruntime_src" not in message


def _save(graph: onnx.GraphProto, path: Path, opset: int = 18, **props: str) -> Path:
    """``graph`` as a model at ``opset`` with metadata ``props``, saved to ``path``."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    helper.set_model_props(model, props)
    onnx.save(model, str(path))
    return path


def _one_node_model(path: Path, op: str, opset: int) -> Path:
    """input [batch, 4] → ``op`` → logits [batch, 4], at ``opset``."""
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node(op, ["input"], ["logits"])],
        "g",
        [vi("input", TensorProto.FLOAT, ["batch", 4])],
        [vi("logits", TensorProto.FLOAT, ["batch", 4])],
    )
    return _save(graph, path, opset)


def test_an_unknown_operator_is_refused(tmp_path: Path) -> None:
    path = _one_node_model(tmp_path / "foobar.onnx", "FooBar", 18)
    with pytest.raises(ValueError, match="No Op registered for FooBar") as refused:
        Runtime(read_model_info("foobar", path), device="cpu", max_batch_size=8, intra_op_threads=1)
    assert str(path) in str(refused.value) and "opset" in str(refused.value)


def test_an_opset_newer_than_onnxruntime_is_refused_in_words(tmp_path: Path) -> None:
    path = _one_node_model(tmp_path / "future.onnx", "Identity", 99)
    with pytest.raises(ValueError, match="Opset 99") as refused:
        Runtime(read_model_info("future", path), device="cpu", max_batch_size=8, intra_op_threads=1)
    message = str(refused.value)
    # ONNX Runtime's message names the opsets it supports at its end, after a C++ signature
    # (with a return type) that pushed it past the 400 characters kept.
    assert "Current official support for domain ai.onnx is till opset" in message, message
    assert "std::" not in message and "ValidateOpsetForDomain" not in message, message
    assert str(path) in message and "upgrade onnxruntime" in message


@pytest.mark.parametrize("io_binding", [False, True], ids=["plain", "io_binding"])
def test_warm_up_refuses_a_model_fixed_to_batch_1(tmp_path: Path, io_binding: bool) -> None:
    # IOBinding is CUDA's default path, where ONNX Runtime raises a plain RuntimeError.
    path = make_reshape_model(tmp_path / "b1.onnx", shape=[1, 48], declared_classes=48)
    runtime = Runtime(
        read_model_info("b1", path), device="cpu", max_batch_size=8, intra_op_threads=1,
        io_binding=io_binding,
    )  # fmt: skip
    with pytest.raises(ValueError, match="does not accept batch size 2") as refused:
        runtime.warm_up()
    message = str(refused.value)
    assert str(path) in message and "--max-batch-size 1" in message and "\n" not in message
    # As the message says, it serves with --max-batch-size 1.
    Runtime(
        read_model_info("b1", path), device="cpu", max_batch_size=1, intra_op_threads=1
    ).warm_up()


def test_a_cuda_failure_at_warm_up_blames_the_device_not_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # How a CUDA failure leaves run_with_iobinding (CUDA's default path), injected: this
    # machine has no GPU. Raised as ONNX Runtime's Fail, it was read as a model refusing
    # the batch ("re-export it"), exit 2, instead of a device failure.
    path = make_reshape_model(tmp_path / "m.onnx", shape=[-1, 48], declared_classes=48)
    runtime = Runtime(
        read_model_info("m", path), device="cpu", max_batch_size=2, intra_op_threads=1,
        io_binding=True,
    )  # fmt: skip

    def fail(*args: object) -> None:
        raise RuntimeError("Error in execution: CUDA failure 700: an illegal memory access")

    monkeypatch.setattr(runtime.session, "run_with_iobinding", fail)
    with pytest.raises(RuntimeError, match="check the GPU driver and CUDA libraries") as caught:
        runtime.warm_up()
    assert not isinstance(caught.value, ValueError) and "CUDA failure 700" in str(caught.value)


def test_warm_up_out_of_memory_says_so_not_that_the_batch_size_is_refused(
    tmp_path: Path,
) -> None:
    # Allocates 2**(24 * batch) float32 values: 64 MiB at batch 1, 1 PiB at batch 2, beyond any
    # address space whatever the kernel's overcommit setting, as a model meets a
    # --max-batch-size its device has no memory for.
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["input"], ["batch"], start=0, end=1),
            helper.make_node("Pow", ["base", "batch"], ["count"]),
            helper.make_node("ConstantOfShape", ["count"], ["zeros"]),
            helper.make_node("ReduceSum", ["zeros"], ["zero"], keepdims=0),
            helper.make_node("Add", ["input", "zero"], ["logits"]),
        ],
        "g",
        [vi("input", TensorProto.FLOAT, ["batch", 2])],
        [vi("logits", TensorProto.FLOAT, ["batch", 2])],
        initializer=[numpy_helper.from_array(np.array([1 << 24], np.int64), "base")],
    )
    path = _save(graph, tmp_path / "hungry.onnx")
    runtime = Runtime(
        read_model_info("hungry", path), device="cpu", max_batch_size=4, intra_op_threads=1
    )
    with pytest.raises(ValueError, match=r"expected memory .* at batch size 2") as refused:
        runtime.warm_up()
    message = str(refused.value)
    assert "pass --max-batch-size 1 or free memory" in message, message
    assert "dynamic batch axis" not in message and str(path) in message


def test_warm_up_refuses_logits_of_another_class_count(tmp_path: Path) -> None:
    path = make_reshape_model(tmp_path / "lies.onnx", shape=[-1, 48], declared_classes=10)
    runtime = Runtime(
        read_model_info("lies", path), device="cpu", max_batch_size=8, intra_op_threads=1
    )
    with pytest.raises(ValueError, match=r"logits \[1, 10\].*got logits of shape \[1, 48\]"):
        runtime.warm_up()


@pytest.mark.parametrize("set_during", [None, 1, 4, 8], ids=["never", "first", "middle", "last"])
def test_warm_up_stops_once_asked_and_says_whether_it_finished(
    classifier_path: Path, monkeypatch: pytest.MonkeyPatch, set_during: int | None
) -> None:
    runtime = _runtime(classifier_path, io_binding=False)
    assert runtime.buckets == (1, 2, 4, 8)
    stop = threading.Event()
    ran: list[int] = []
    run = runtime.run

    def recording_run(batch: np.ndarray) -> np.ndarray:
        ran.append(len(batch))
        if len(batch) == set_during:
            stop.set()  # a signal while this bucket runs
        return run(batch)

    monkeypatch.setattr(runtime, "run", recording_run)
    finished = runtime.warm_up(stop)
    assert ran == [size for size in (1, 2, 4, 8) if set_during is None or size <= set_during]
    # Stopped during the last bucket: every bucket ran, but the server is stopping all the same.
    assert finished is (set_during is None)


def test_warm_up_without_memory_for_the_batch_itself_says_so(tmp_path: Path) -> None:
    # Symbolic sample dims with an input_shape far beyond any machine (a typo in metadata):
    # numpy's MemoryError for the warm-up zeros used to end the server in a traceback.
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["input"], ["logits"], keepdims=1, axes=[1])],
        "g",
        [vi("input", TensorProto.FLOAT, ["batch", "n"])],
        [vi("logits", TensorProto.FLOAT, ["batch", 1])],
    )
    path = _save(graph, tmp_path / "huge.onnx", 11, input_shape="[100000000000000]")
    runtime = Runtime(
        read_model_info("huge", path), device="cpu", max_batch_size=1, intra_op_threads=1
    )
    with pytest.raises(ValueError, match=r"expected memory .* at batch size 1") as refused:
        runtime.warm_up()
    assert "serve a smaller model or free memory" in str(refused.value)
