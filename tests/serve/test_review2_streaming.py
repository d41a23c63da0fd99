"""serve/streaming.py's byte window for error answers: a request refused as it is read (unknown
model, bad tensor) echoes its id too, and those answers must fill the window like the rest."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from protos import kserve_pb2 as pb
from serve import streaming
from serve.background import BackgroundServer

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def test_refused_requests_echoing_long_ids_fill_the_byte_window(
    start_server: Callable[..., BackgroundServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Answers to requests refused at once (here: an unknown model) were put in the outbox
    # without counting their bytes while their writes took them off: one client that did not
    # read, sending ids near --max-message-bytes, got 1024 of them held, and each written one
    # widened the window for the next ones.
    monkeypatch.setattr(streaming, "WINDOW_BYTES", 1 << 20)  # 64 answers of 16 KiB ids
    server = start_server()
    assert server.server is not None
    state = server.server.state
    request = pb.ModelInferRequest(model_name="absent")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 8, 8])
    request.raw_input_contents.append(np.zeros((1, 3, 8, 8), "<f4").tobytes())
    names = [str(i).zfill(16 * 1024) for i in range(2000)]
    payloads = []
    for name in names:
        request.id = name
        payloads.append(request.SerializeToString())
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        answers = channel.stream_stream(
            STREAM, response_deserializer=pb.ModelStreamInferResponse.FromString
        )(iter(payloads), timeout=120)
        read, until = -1, time.monotonic() + 30
        while state.arrivals != read and time.monotonic() < until:  # until reading stops
            read = state.arrivals
            time.sleep(0.5)
        got = list(answers)  # read now: the rest comes
    assert read < 1000
    assert [a.infer_response.id for a in got] == names  # refused at once: answered in order
    assert all(a.error_message.startswith("NOT_FOUND: ") for a in got)
