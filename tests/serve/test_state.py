"""serve/state.py: model lookup while the server loads and once it is ready, and versions."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from protos import kserve_pb2
from serve.background import BackgroundServer
from serve.batcher import Batcher
from serve.errors import ServeError
from serve.model_info import read_model_info
from serve.runtime import Runtime
from serve.state import Model, ServingState
from tests.serve.v2 import INFER, infer_payload, reply_logits


def _lookup_code(state: ServingState, name: str, version: str = "") -> grpc.StatusCode:
    with pytest.raises(ServeError) as caught:
        state.model(name, version)
    return caught.value.code


def test_a_model_not_loaded_yet_is_unavailable_until_ready(classifier_path: Path) -> None:
    # ModelMetadata and ModelConfig look models up here: a client polling them while the
    # server starts must be told to retry (UNAVAILABLE), not that the model does not exist.
    info = read_model_info("tiny", classifier_path)
    runtime = Runtime(info, device="cpu", max_batch_size=2, intra_op_threads=1)
    tiny = Model(info, Batcher(runtime, max_queue_size=4, max_queue_delay_s=0, instances=1))
    state = ServingState({}, None, max_image_pixels=1 << 20)
    state.loading = {"tiny", "other"}
    assert _lookup_code(state, "tiny") == grpc.StatusCode.UNAVAILABLE
    assert _lookup_code(state, "typo") == grpc.StatusCode.NOT_FOUND  # never coming: say so now
    state.models["tiny"] = tiny  # loaded, "other" still loading
    assert state.model("tiny", "") is tiny
    assert _lookup_code(state, "other") == grpc.StatusCode.UNAVAILABLE
    state.ready = True  # loading is over: a name still missing will not come
    assert _lookup_code(state, "other") == grpc.StatusCode.NOT_FOUND
    assert _lookup_code(state, "tiny", "2") == grpc.StatusCode.NOT_FOUND
    assert state.model("tiny", "1") is tiny


def test_any_decimal_spelling_of_version_1_is_served(classifier_path: Path) -> None:
    # Triton parses version strings as integers: "01" is version 1.
    info = read_model_info("tiny", classifier_path)
    runtime = Runtime(info, device="cpu", max_batch_size=2, intra_op_threads=1)
    tiny = Model(info, Batcher(runtime, max_queue_size=4, max_queue_delay_s=0, instances=1))
    state = ServingState({"tiny": tiny}, None, max_image_pixels=1 << 20)
    state.ready = True
    for version in ("", "1", "01", "0001", "0" * 5000 + "1"):
        assert state.model("tiny", version) is tiny, version
    for version in ("0", "2", "10", "010", "-1", "+1", " 1", "1 ", "1.0", "0x1", "\uff11", "one"):
        assert _lookup_code(state, "tiny", version) == grpc.StatusCode.NOT_FOUND, version
    with pytest.raises(ServeError, match="this server serves version 1 only"):
        state.model("tiny", "7")


def test_a_real_server_answers_version_01(shared_server: BackgroundServer) -> None:
    x = np.zeros((2, 3, 8, 8), np.float32)
    with grpc.insecure_channel(f"127.0.0.1:{shared_server.port}") as channel:
        infer = channel.unary_unary(INFER)
        _, logits = reply_logits(infer(_versioned(x, "01"), timeout=30))
        assert logits.shape == (2, 5)
        with pytest.raises(grpc.RpcError) as caught:
            infer(_versioned(x, "010"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    client = tc.InferenceServerClient(f"127.0.0.1:{shared_server.port}")
    try:
        assert client.get_model_metadata("tiny", model_version="01").name == "tiny"
        assert client.is_model_ready("tiny", "01") and not client.is_model_ready("tiny", "010")
        tensor = tc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        assert client.infer("tiny", [tensor], model_version="01").as_numpy("logits").shape == (2, 5)
    finally:
        client.close()


def _versioned(x: np.ndarray, version: str) -> bytes:
    request = kserve_pb2.ModelInferRequest.FromString(infer_payload("tiny", x))
    request.model_version = version
    return request.SerializeToString()
