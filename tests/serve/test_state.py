"""serve/state.py: model lookup while the server loads and once it is ready."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from serve.batcher import Batcher
from serve.errors import ServeError
from serve.model_info import read_model_info
from serve.runtime import Runtime
from serve.state import Model, ServingState


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
