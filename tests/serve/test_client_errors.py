"""serve/client.py: what the Python Client does with a user's mistakes and a server's states."""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import kserve_pb2
from serve.background import BackgroundServer
from serve.client import Client, ClientError
from serve.config import ServerConfig
from tests.serve.conftest import free_port, server_held_loading
from tests.serve.pki import make_pki

GOOD = np.zeros((1, 3, 8, 8), np.float32)


def test_wait_ready_waits_while_the_server_loads(
    base_config: ServerConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The port is bound before the models load, and ServerReady says false meanwhile:
    wait_ready raised "got not ready" at once instead of waiting."""
    with (
        server_held_loading(base_config, monkeypatch) as (background, release),
        Client(f"127.0.0.1:{background.config.port}") as client,
    ):
        for _ in range(30):  # until the port is bound; then loading until released
            with pytest.raises(ClientError) as caught:
                client.wait_ready("tiny", timeout=1)
            if "got no answer" not in str(caught.value):
                break
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert "got not ready (still loading its models" in str(caught.value)
        threading.Timer(0.5, release.set).start()
        client.wait_ready("tiny", timeout=60)
        client.wait_ready()
        with pytest.raises(ClientError) as caught:  # once ready: at once, not after 60 s
            client.wait_ready("nope", timeout=60)
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        assert "[tiny]" in str(caught.value)


def test_wait_ready_on_a_tls_server_without_root_certificates_says_so(
    start_server: Callable[..., BackgroundServer], tmp_path: Path
) -> None:
    """gRPC's wait for a connection ends in its deadline, never in the failed handshake: the
    message only said to check the address and that the server runs."""
    pki = make_pki(tmp_path)
    server = start_server(tls_cert=pki.server_cert, tls_key=pki.server_key)
    client = Client(f"127.0.0.1:{server.port}")
    with client, pytest.raises(ClientError) as caught:
        client.wait_ready(timeout=1)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "got no answer within 1 s" in str(caught.value)
    assert "pass --ca CA.pem (root_certificates= in Python) if it serves TLS" in str(caught.value)


def test_infer_stream_yields_the_answers_before_a_failed_request(
    start_server: Callable[..., BackgroundServer],
) -> None:
    """A request refused on arrival is answered before requests still queued: its error was
    raised at once, losing the answers to the requests before it, which the docs promise."""
    server = start_server(max_queue_delay_us=300_000)  # good requests wait in the queue
    bad = np.zeros((1, 3, 9, 9), np.float32)
    got = []
    with Client(f"127.0.0.1:{server.port}") as client, pytest.raises(ClientError) as caught:
        for logits in client.infer_stream("tiny", [GOOD, GOOD, GOOD, bad, GOOD], window=8):
            got.append(logits)
    assert str(caught.value).startswith("request 3: INVALID_ARGUMENT: ")
    assert [logits.shape for logits in got] == [(1, 5)] * 3


def test_infer_stream_refuses_batches_that_are_not_arrays(shared_server: BackgroundServer) -> None:
    with Client(f"127.0.0.1:{shared_server.port}") as client:
        # gRPC's thread iterated them: ClientError UNKNOWN "Exception iterating requests!".
        with pytest.raises(TypeError, match="not iterable"):
            next(client.infer_stream("tiny", 3))  # type: ignore[arg-type]
        # A None in the batches ended the stream quietly, its batches after it unanswered.
        answers = client.infer_stream("tiny", [GOOD, None, GOOD], window=1)  # type: ignore[list-item]
        assert next(answers).shape == (1, 5)
        with pytest.raises(TypeError, match="got dtype object"):
            next(answers)


def test_infer_stream_deadline_says_what_to_do(shared_server: BackgroundServer) -> None:
    """On an open stream gRPC words it "Stream removed (Deadline Exceeded)", which got no
    hint; a stalled input keeps the server's own per-request DEADLINE_EXCEEDED out of it."""
    resume = threading.Event()

    def stalled() -> Iterator[np.ndarray]:
        yield GOOD
        resume.wait(30)

    try:
        with Client(f"127.0.0.1:{shared_server.port}") as client:
            client.infer("tiny", GOOD)  # connected first: then gRPC says "Stream removed"
            with pytest.raises(ClientError) as caught:
                list(client.infer_stream("tiny", stalled(), timeout=1))
    finally:
        resume.set()
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "raise --timeout (timeout= in Python)" in str(caught.value)


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 0, -1, "soon"])
def test_timeouts_that_grpc_takes_as_past_are_refused(
    shared_server: BackgroundServer, timeout: object
) -> None:
    """inf, nan, 0 and -1 ended every call with DEADLINE_EXCEEDED "raise --timeout"."""
    target = f"127.0.0.1:{shared_server.port}"
    with pytest.raises(ValueError, match="expected timeout > 0 seconds, or None"):
        Client(target, timeout=timeout).infer("tiny", GOOD)  # type: ignore[arg-type]
    with Client(target) as client:
        with pytest.raises(ValueError, match="expected timeout > 0 seconds"):
            client.wait_ready(timeout=timeout)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="expected timeout > 0 seconds"):
            next(client.infer_stream("tiny", [GOOD], timeout=timeout))  # type: ignore[arg-type]
    with Client(target, timeout=None) as client:  # no deadline
        assert client.infer("tiny", GOOD).shape == (1, 5)


@pytest.mark.parametrize("target", ["", "  ", None])
def test_an_empty_target_is_refused(target: object) -> None:
    """gRPC logged its own lines, then failed the first call with UNKNOWN."""
    with pytest.raises(ValueError, match="expected target as HOST:PORT"):
        Client(target)  # type: ignore[arg-type]


def test_token_is_stripped_and_checked(
    start_server: Callable[..., BackgroundServer], tmp_path: Path
) -> None:
    """A token read from a file kept its newline: gRPC refused it as INTERNAL "Invalid
    metadata" (and its C core logged a line of its own)."""
    token_file = tmp_path / "token"
    token_file.write_text("right-token\n")
    server = start_server(auth_token_file=token_file)
    target = f"127.0.0.1:{server.port}"
    with Client(target, token=token_file.read_text()) as client:
        assert client.infer("tiny", GOOD).shape == (1, 5)
    for token in ("Bearer right-token", "caf\u00e9", "two\nlines"):
        with pytest.raises(ValueError, match="expected token as one word of printable ASCII"):
            Client(target, token=token)


def test_one_path_or_image_where_a_list_is_expected(
    shared_server: BackgroundServer, tmp_path: Path
) -> None:
    png = tmp_path / "a.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    with Client(f"127.0.0.1:{shared_server.port}") as client:
        # Iterated as characters: IsADirectoryError for '/', the first one.
        with pytest.raises(TypeError, match=r"got a single path \(str\); pass \[path\]"):
            client.classify_files("tiny", str(png))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"got a single path \(PosixPath\)"):
            client.classify_files("tiny", png)  # type: ignore[arg-type]
        # Iterated as integers: "got dtype int64; preprocess it to float32".
        with pytest.raises(TypeError, match=r"got a single image \(bytes\); pass \[image\]"):
            client.classify("tiny", png.read_bytes())  # type: ignore[arg-type]


def test_classify_arrays_refuses_one_image_without_the_batch_axis(
    shared_server: BackgroundServer,
) -> None:
    """Its three channels were sent as three images; the server's answer spoke of images
    "without a batch axis", the opposite of the fix."""
    with Client(f"127.0.0.1:{shared_server.port}") as client:
        with pytest.raises(ValueError, match=r"got shape \[3, 8, 8\]; pass one image"):
            client.classify_arrays("tiny", GOOD[0])
        assert len(client.classify_arrays("tiny", GOOD[0][None], top_k=2)[0]) == 2


@pytest.mark.parametrize("top_k", ["3", None, 2.5])
def test_top_k_of_another_type_is_named(shared_server: BackgroundServer, top_k: object) -> None:
    client = Client(f"127.0.0.1:{shared_server.port}")
    with client, pytest.raises(TypeError, match="expected top_k as an int, got"):  # was "'<='"
        client.classify("tiny", [GOOD[0]], top_k=top_k)  # type: ignore[arg-type]


def test_client_error_survives_pickling(shared_server: BackgroundServer) -> None:
    """A ClientError raised in a ProcessPoolExecutor worker broke the pool: unpickling it
    called ClientError(message) without its code."""
    with Client(f"127.0.0.1:{shared_server.port}") as client, pytest.raises(ClientError) as caught:
        client.infer("nope", GOOD)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.code, str(copy)) == (grpc.StatusCode.NOT_FOUND, str(caught.value))


def test_a_timeout_beyond_grpcs_deadlines_is_no_deadline_in_effect(
    shared_server: BackgroundServer,
) -> None:
    """gRPC takes a deadline past 2262 as already passed: timeout=1e10 failed every call at
    once with DEADLINE_EXCEEDED "raise --timeout", and wait_ready said "got no answer"."""
    target = f"127.0.0.1:{shared_server.port}"
    with Client(target, timeout=1e10) as client:
        client.wait_ready("tiny", timeout=1e10)
        assert client.infer("tiny", GOOD).shape == (1, 5)
        assert [a.shape for a in client.infer_stream("tiny", [GOOD], timeout=1e12)] == [(1, 5)]


def test_classify_refuses_one_image_array_where_a_list_is_expected(
    shared_server: BackgroundServer,
) -> None:
    """Its channels were sent as images; the server asked for "one preprocessed image of that
    shape, without a batch axis", which is what the caller had passed."""
    with Client(f"127.0.0.1:{shared_server.port}") as client:
        with pytest.raises(TypeError, match=r"got an array of shape \[3, 8, 8\]; pass one image"):
            client.classify("tiny", GOOD[0])
        assert len(client.classify("tiny", [GOOD[0]], top_k=1)[0]) == 1
        assert len(client.classify("tiny", GOOD, top_k=1)) == 1  # [N, C, H, W] still works


def _drain(server: BackgroundServer) -> None:
    """Start ``server``'s drain as its stop does, without stopping it."""

    async def drain() -> None:
        assert server.server is not None
        server.server.state.drain()

    server.call(drain)


def test_wait_ready_on_a_draining_server_says_it_is_shutting_down(
    start_server: Callable[..., BackgroundServer],
) -> None:
    """It said "still loading its models, or draining; raise the timeout": a draining server
    is not ready again, however long one waits."""
    server = start_server()
    with Client(f"127.0.0.1:{server.port}") as client:
        client.wait_ready("tiny", timeout=30)
        _drain(server)
        for model in (None, "tiny"):
            with pytest.raises(ClientError) as caught:
                client.wait_ready(model, timeout=0.5)
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            message = str(caught.value)
            assert "got a server shutting down (draining), which is not ready again" in message
            assert "raise the timeout" not in message


def test_wait_ready_waits_through_a_restart_at_the_same_address(
    base_config: ServerConfig,
) -> None:
    """A draining server is waited for all the same: the one restarted in its place becomes
    ready at the same address."""
    config = replace(base_config, port=free_port())
    first = BackgroundServer(config)
    first.start()
    running = [first]
    try:
        with Client(f"127.0.0.1:{config.port}") as client, ThreadPoolExecutor(1) as pool:
            client.wait_ready("tiny", timeout=30)
            _drain(first)
            waiting = pool.submit(client.wait_ready, "tiny", 60)
            running.remove(first)
            first.close()
            second = BackgroundServer(config)
            second.start()
            running.append(second)
            waiting.result(60)
            assert client.infer("tiny", GOOD).shape == (1, 5)
    finally:
        for server in running:
            server.close()


def test_wait_ready_waits_for_a_server_that_stopped_under_its_call() -> None:
    """A ServerReady call cut off by the server's stop ended wait_ready at once with
    "UNAVAILABLE: ... stopped before answering", though a server was restarting there."""
    port = free_port()
    called = threading.Event()
    release = threading.Event()

    def start(ready: bool) -> grpc.Server:
        def server_ready(request: object, context: grpc.ServicerContext) -> object:
            if not ready:
                called.set()
                release.wait(30)
            return kserve_pb2.ServerReadyResponse(ready=ready)

        method = grpc.unary_unary_rpc_method_handler(
            server_ready,
            request_deserializer=kserve_pb2.ServerReadyRequest.FromString,
            response_serializer=kserve_pb2.ServerReadyResponse.SerializeToString,
        )
        server = grpc.server(ThreadPoolExecutor(2))
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService", {"ServerReady": method}
            ),)
        )  # fmt: skip
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        return server

    stopping = start(ready=False)  # answers once it has been stopped under the call
    servers = [stopping]
    try:
        with Client(f"127.0.0.1:{port}") as client, ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.wait_ready, None, 60)
            assert called.wait(30)
            stopping.stop(0).wait(30)
            servers.append(start(ready=True))
            waiting.result(60)
    finally:
        release.set()
        for server in servers:
            server.stop(0).wait(30)
