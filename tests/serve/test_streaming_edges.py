"""serve/streaming.py at its edges: messages near --max-message-bytes, on real servers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from grpc import aio

from protos import kserve_pb2 as pb
from serve import streaming
from serve.background import BackgroundServer
from serve.errors import invalid
from tests.serve.test_streaming import Answers, _open, _request, _rest, _rows

LIMIT = 64 * 1024


def test_an_error_whose_echoed_id_would_pass_the_message_limit_leaves_the_stream_open(
    start_server: Callable[..., BackgroundServer],
) -> None:
    # The request fits the limit, but its error answer echoed the id beside the message and
    # went above it: gRPC ended the stream RESOURCE_EXHAUSTED, cancelling both good requests.
    server = start_server(max_message_bytes=LIMIT, max_queue_delay_us=300_000)
    long_id = "x" * (LIMIT - 100)
    lost = pb.ModelInferRequest(model_name="nope", id=long_id)
    assert lost.ByteSize() <= LIMIT

    async def scenario() -> tuple[Answers, grpc.StatusCode, str]:
        address = f"127.0.0.1:{server.port}"
        async with aio.insecure_channel(address) as channel:
            call = _open(channel)
            await call.write(_request(_rows(1, 1), "before"))
            await call.write(lost)
            await call.write(_request(_rows(2, 2), "after"))
            await call.done_writing()
            return await _rest(call)

    answers, code, details = asyncio.run(scenario())
    assert code == grpc.StatusCode.OK, details
    by_id = {a.infer_response.id: a for a in answers}
    assert sorted(by_id) == ["", "after", "before"]
    assert not by_id["before"].error_message and not by_id["after"].error_message
    message = by_id[""].error_message
    assert message.startswith("NOT_FOUND: expected a model name"), message
    assert f"id, {len(long_id)} characters" in message and "--max-message-bytes" in message
    assert server.server is not None and server.server.state.in_flight == 0


def test_an_error_answer_fits_the_smallest_limit_even_in_four_byte_characters() -> None:
    request = pb.ModelInferRequest(model_name="😀" * 200, id="😀" * 200)
    answer = streaming._error(request, invalid("😀" * 600), 1024)
    assert answer.ByteSize() <= 1024
    assert answer.error_message.startswith("INVALID_ARGUMENT: 😀")
    assert answer.infer_response.parameters["triton_final_response"].bool_param
