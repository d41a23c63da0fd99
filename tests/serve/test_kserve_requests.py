"""serve/kserve_codec.py + serve/tensors.py: what a malformed ModelInfer request is told, unary
and streamed, through a real server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from protos import kserve_pb2
from serve.background import BackgroundServer

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def _request(shape: list[int], *, raw: bool = True) -> kserve_pb2.ModelInferRequest:
    request = kserve_pb2.ModelInferRequest(model_name="tiny", id="r1")
    request.inputs.add(name="input", datatype="FP32", shape=shape)
    if raw:
        request.raw_input_contents.append(np.zeros(192, "<f4").tobytes())
    return request


def _refusal(server: BackgroundServer, request: kserve_pb2.ModelInferRequest) -> str:
    """The INVALID_ARGUMENT message of ``request`` sent unary; the streamed answer must agree."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(INFER)(request.SerializeToString(), timeout=10)
        (answer,) = channel.stream_stream(STREAM)(iter([request.SerializeToString()]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    streamed = kserve_pb2.ModelStreamInferResponse.FromString(answer)
    assert streamed.error_message == f"INVALID_ARGUMENT: {caught.value.details()}"
    assert streamed.infer_response.id == "r1"
    return caught.value.details()


def test_minus_one_rows_copied_from_model_metadata_is_explained(
    shared_server: BackgroundServer,
) -> None:
    # ModelMetadata lists the input as [-1, 3, 8, 8]; a client that sends that shape was told
    # "expected ... of shape [-1, 3, 8, 8], got [-1, 3, 8, 8]".
    details = _refusal(shared_server, _request([-1, 3, 8, 8]))
    assert "[-1, 3, 8, 8], got [-1, 3, 8, 8]" not in details
    assert "expected at least one row in input 'input', got shape [-1, 3, 8, 8]" in details
    assert "-1 means any count, not a value to send" in details


def test_a_sample_without_its_row_axis_is_told_to_add_it(
    shared_server: BackgroundServer,
) -> None:
    details = _refusal(shared_server, _request([3, 8, 8]))
    assert "expected input 'input' of shape [rows, 3, 8, 8] for model tiny" in details
    assert "add the row axis first: [1, 3, 8, 8] for one sample" in details


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("fp64_contents", [0.5] * 192),
        ("int_contents", [1] * 192),
        ("int64_contents", [1] * 192),
        ("bytes_contents", [b"\x00\x00\x00\x00"] * 192),
    ],
)
@pytest.mark.parametrize("raw", [False, True], ids=["typed-only", "with-raw"])
def test_values_in_another_typed_field_are_named(
    shared_server: BackgroundServer, field: str, values: list[object], raw: bool
) -> None:
    # They were reported as no data at all ("got none"), or ignored beside raw contents.
    request = _request([1, 3, 8, 8], raw=raw)
    getattr(request.inputs[0].contents, field).extend(values)
    details = _refusal(shared_server, request)
    assert f"got contents.{field}; send them as float32" in details
    assert "contents.fp32_contents" in details


def test_an_input_sent_twice_is_told_to_send_it_once(shared_server: BackgroundServer) -> None:
    request = _request([1, 3, 8, 8])
    request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 8, 8])
    request.raw_input_contents.append(request.raw_input_contents[0])
    details = _refusal(shared_server, request)
    assert "got ['input', 'input']; send 'input' once" in details


def test_an_output_asked_for_twice_is_told_to_ask_once(shared_server: BackgroundServer) -> None:
    request = _request([1, 3, 8, 8])
    request.outputs.add(name="logits")
    request.outputs.add(name="logits")
    details = _refusal(shared_server, request)
    assert "got ['logits', 'logits']; ask for 'logits' once" in details
