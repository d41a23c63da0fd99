"""Shared fixtures: tiny ONNX classifiers built with onnx.helper, and real servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import serve.server as server_module
from serve import images
from serve.background import BackgroundServer
from serve.benchenv import free_port, free_ports  # noqa: F401 (free_ports: for the tests)
from serve.config import ServerConfig


def make_classifier(
    path: Path,
    *,
    channels: int = 3,
    size: int = 8,
    classes: int = 5,
    seed: int = 0,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a Conv → Relu → Flatten → Gemm classifier: input [batch,C,H,W], logits [batch,K]."""
    rng = np.random.default_rng(seed)
    filters = 4
    conv_w = rng.normal(0, 0.5, (filters, channels, 3, 3)).astype(np.float32)
    conv_b = rng.normal(0, 0.1, (filters,)).astype(np.float32)
    gemm_w = rng.normal(0, 0.2, (classes, filters * size * size)).astype(np.float32)
    gemm_b = rng.normal(0, 0.1, (classes,)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "gemm_w", "gemm_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info(
                "input", TensorProto.FLOAT, ["batch", channels, size, size]
            )
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[
            numpy_helper.from_array(conv_w, "conv_w"),
            numpy_helper.from_array(conv_b, "conv_b"),
            numpy_helper.from_array(gemm_w, "gemm_w"),
            numpy_helper.from_array(gemm_b, "gemm_b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    meta = {
        "arch": "tiny",
        "num_classes": str(classes),
        "input_shape": f"{channels},{size},{size}",
        "labels": json.dumps([f"label{i}" for i in range(classes)]),
        "mean": json.dumps([0.5] * channels),
        "std": json.dumps([0.25] * channels),
    }
    if metadata is not None:
        meta = metadata
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def reference(path: Path, batch: np.ndarray) -> np.ndarray:
    """Logits of ``batch`` from a local CPU ONNX Runtime session (one row at a time)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = [session.run(None, {"input": batch[i : i + 1]})[0] for i in range(len(batch))]
    return np.concatenate(rows)


@pytest.fixture(name="make_classifier", scope="session")
def make_classifier_fixture() -> Callable[..., Path]:
    """``make_classifier(path, channels=3, size=8, classes=5, seed=0, metadata=None)``."""
    return make_classifier


@pytest.fixture(name="reference", scope="session")
def reference_fixture() -> Callable[[Path, np.ndarray], np.ndarray]:
    """``reference(path, batch)``: logits from a local CPU ONNX Runtime session."""
    return reference


@pytest.fixture(scope="session")
def classifier_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("models") / "tiny.onnx")


@pytest.fixture(scope="session")
def base_config(classifier_path: Path) -> ServerConfig:
    return ServerConfig(
        models=(classifier_path,),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        max_batch_size=8,
        grace=5,
        device="cpu",
        intra_op_threads=1,
    )


@pytest.fixture
def start_server(base_config: ServerConfig) -> Iterator[Callable[..., BackgroundServer]]:
    """Start a real server with ``base_config`` plus overrides; every one is stopped after."""
    started: list[BackgroundServer] = []

    def start(**overrides: object) -> BackgroundServer:
        server = BackgroundServer(replace(base_config, **overrides))
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture(scope="module")
def shared_server(base_config: ServerConfig) -> Iterator[BackgroundServer]:
    """One default server per test module, for tests that do not need special settings."""
    with BackgroundServer(base_config) as server:
        yield server


def plant_counting_bug(server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Make the next request ``server`` counts in its metrics raise "planted bug"; returns a
    list that receives that request's status code when the bug fires."""
    assert server.server is not None
    state = server.server.state
    record = state.record
    fired: list[object] = []

    def record_with_a_bug(model_name: str, code: object, seconds: float) -> None:
        if not fired:
            fired.append(code)
            raise RuntimeError("planted bug")
        record(model_name, code, seconds)

    monkeypatch.setattr(state, "record", record_with_a_bug)
    return fired


def make_reshape_model(path: Path, *, shape: list[int], declared_classes: int) -> Path:
    """Write input [batch,3,4,4] → Reshape(``shape``) → logits declared [batch, declared_classes].

    ``shape=[1, 48]`` only runs at batch size 1; ``shape=[-1, 48]`` computes 48 classes whatever
    the output declares. Not checked with onnx.checker: its shape inference would object.
    """
    shape_init = numpy_helper.from_array(np.array(shape, dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["logits"])],
        "reshape",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", declared_classes])],
        initializer=[shape_init],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@contextlib.contextmanager
def server_held_loading(
    config: ServerConfig, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[BackgroundServer, threading.Event]]:
    """A server on a free port starting on a thread, its models held in loading (port bound,
    not ready) until the yielded event is set; released, joined and closed on exit."""
    release = threading.Event()
    load = server_module._load

    def held_load(*args: object) -> object:
        release.wait(60)
        return load(*args)

    monkeypatch.setattr(server_module, "_load", held_load)
    background = BackgroundServer(replace(config, port=free_port()))
    starting = threading.Thread(target=background.start)
    starting.start()
    try:
        yield background, release
    finally:
        release.set()
        starting.join(60)
        background.close()


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Grows by one for every image the (in-process) server decodes."""
    calls: list[int] = []
    decode = images.decode

    def counting_decode(*args: object) -> np.ndarray:
        calls.append(1)
        return decode(*args)

    monkeypatch.setattr(images, "decode", counting_decode)
    return calls
