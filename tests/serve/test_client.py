"""serve/client.py: the Python Client and `python -m serve.client` against a real server."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from serve.background import BackgroundServer
from serve.client import Client, ClientError, main
from tests.serve.conftest import free_port
from tests.serve.pki import make_pki


def _write_png(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m serve.client ARGS`` in a subprocess (what a user runs, gRPC logs included)."""
    return subprocess.run(
        [sys.executable, "-m", "serve.client", *args], capture_output=True, text=True, timeout=120
    )


def test_client_api(shared_server: BackgroundServer, classifier_path: Path, tmp_path: Path,
                    reference: Callable) -> None:  # fmt: skip
    target = f"127.0.0.1:{shared_server.port}"
    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)
    expected = reference(classifier_path, x)
    with Client(target) as client:
        client.wait_ready()
        client.wait_ready("tiny")
        assert [t.name for t in client.model_metadata("tiny").inputs] == ["input"]
        np.testing.assert_allclose(client.infer("tiny", x), expected, atol=1e-5)
        tops = client.classify_arrays("tiny", x, top_k=2)
        assert [[p.index for p in top] for top in tops] == [
            list(np.argsort(-row, kind="stable")[:2]) for row in expected
        ]
        files = [_write_png(tmp_path / f"{i}.png", i) for i in range(2)]
        from_files = client.classify_files("tiny", files, top_k=1)
        buffers = []
        for path in files:
            buffers.append(path.read_bytes())
        assert from_files == client.classify("tiny", buffers, top_k=1)
        assert from_files[0][0].label.startswith("label")
        with pytest.raises(ClientError) as caught:
            client.infer("nope", x)
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ClientError):
            client.wait_ready("nope", timeout=5)


def test_infer_stream_answers_every_batch_in_order(
    shared_server: BackgroundServer, classifier_path: Path, reference: Callable
) -> None:
    rng = np.random.default_rng(2)
    # Sizes around the server's max batch of 8, so some requests are split and some batch.
    batches = [rng.normal(size=(n, 3, 8, 8)).astype(np.float32) for n in (1, 3, 8, 11, 2) * 8]
    fed: list[int] = []

    def lazily():  # the client may not read the whole input up front
        for number, batch in enumerate(batches):
            fed.append(number)
            yield batch

    with Client(f"127.0.0.1:{shared_server.port}") as client:
        answers = client.infer_stream("tiny", lazily(), window=4)
        first = next(answers)
        time.sleep(0.5)  # unread answers must hold the rest of the input back
        # Taken from the input only as answers free the window (out-of-order answers to
        # split requests may be read before the first one can be yielded: at most a window).
        assert len(fed) <= 2 * 4
        got = [first, *answers]
        assert len(got) == len(batches)
        for batch, logits in zip(batches, got, strict=True):
            np.testing.assert_allclose(logits, reference(classifier_path, batch), atol=1e-5)
        # The same client's unary calls still work once the stream is done.
        np.testing.assert_allclose(
            client.infer("tiny", batches[0]), reference(classifier_path, batches[0]), atol=1e-5
        )


def test_infer_stream_raises_the_status_of_a_failed_request(
    shared_server: BackgroundServer,
) -> None:
    good = np.zeros((1, 3, 8, 8), np.float32)
    bad = np.zeros((1, 3, 9, 9), np.float32)
    with Client(f"127.0.0.1:{shared_server.port}") as client:
        answers = client.infer_stream("tiny", [good, bad, good], window=1)
        assert next(answers).shape == (1, 5)  # the tiny model has 5 classes
        with pytest.raises(ClientError) as caught:
            next(answers)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert str(caught.value).startswith("request 1: INVALID_ARGUMENT: expected")
        with pytest.raises(ClientError) as caught:
            list(client.infer_stream("nope", [good]))
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ValueError, match="window"):
            next(client.infer_stream("tiny", [good], window=0))


def test_cli_prints_top_labels(
    shared_server: BackgroundServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = [_write_png(tmp_path / f"{i}.png", i) for i in range(2)]
    target = f"127.0.0.1:{shared_server.port}"
    assert main([target, "--model", "tiny", *map(str, files), "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(files[0]) and lines[4] == str(files[1])
    assert len(lines) == 8 and all("label" in line for line in lines[1:4])
    scores = [float(line.split()[0]) for line in lines[1:4]]
    assert scores == sorted(scores, reverse=True)


def test_cli_errors_are_messages(
    shared_server: BackgroundServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _write_png(tmp_path / "a.png", 0)
    target = f"127.0.0.1:{shared_server.port}"
    assert main([target, "--model", "tiny", str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main([target, "--model", "nope", str(image)]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main([target, "--model", "tiny", str(bad)]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_server_down_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    image = io.BytesIO()
    Image.new("RGB", (4, 4)).save(image, format="PNG")
    (tmp_path / "a.png").write_bytes(image.getvalue())
    done = _cli(f"127.0.0.1:{free_port()}", "--model", "tiny", str(tmp_path / "a.png"),
                "--timeout", "5")  # fmt: skip
    assert done.returncode == 1
    assert "cannot reach a ready server" in done.stderr
    assert "pass --ca CA.pem (root_certificates= in Python) if it serves TLS" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_plaintext_client_of_a_tls_server_is_told_about_ca(
    start_server: Callable[..., BackgroundServer], tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    server = start_server(tls_cert=pki.server_cert, tls_key=pki.server_key)
    batch = np.zeros((1, 3, 8, 8), np.float32)
    client = Client(f"127.0.0.1:{server.port}", timeout=10)
    with client, pytest.raises(ClientError) as caught:
        client.infer("tiny", batch)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "pass --ca CA.pem" in str(caught.value)
    with Client(f"127.0.0.1:{server.port}", timeout=10, root_certificates=pki.ca.read_bytes()) as c:
        assert c.infer("tiny", batch).shape == (1, 5)


@pytest.mark.parametrize("command", ["serve.client", "serve.bench"])
def test_a_tls_command_against_a_plaintext_server_prints_one_line(
    shared_server: BackgroundServer, tmp_path: Path, command: str
) -> None:
    """gRPC's C core printed its own "Handshake failed" line at INFO before ours."""
    pki = make_pki(tmp_path)
    image = _write_png(tmp_path / "a.png", 0)
    args = {"serve.client": [str(image)], "serve.bench": ["-c", "1", "--seconds", "1"]}[command]
    # The commands' own default is under test: not one the environment sets.
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    done = subprocess.run(
        [sys.executable, "-m", command, f"127.0.0.1:{shared_server.port}", "--model", "tiny",
         "--ca", str(pki.ca), *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: ") and "--ca" in line, line


def test_an_answer_above_the_clients_limit_is_blamed_on_the_client(
    start_server: Callable[..., BackgroundServer],
    make_classifier: Callable[..., Path],
    tmp_path: Path,
) -> None:
    # gRPC words it "Stream removed (CLIENT: Received message larger than max ...)".
    server = start_server(models=(make_classifier(tmp_path / "wide.onnx", classes=8192),))
    client = Client(f"127.0.0.1:{server.port}", max_message_bytes=4096)  # answers are 32 KiB
    with client, pytest.raises(ClientError) as caught:
        client.infer("wide", np.zeros((1, 3, 8, 8), np.float32))
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "above this client's message size limit" in str(caught.value)


def test_grpc_own_size_and_deadline_errors_say_what_to_do(shared_server: BackgroundServer) -> None:
    target = f"127.0.0.1:{shared_server.port}"
    batch = np.zeros((8, 3, 8, 8), np.float32)  # 6 KiB of float32
    small = Client(target, max_message_bytes=1024)
    with small, pytest.raises(ClientError) as caught:
        small.infer("tiny", batch)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "above this client's message size limit; send fewer or smaller images" in str(
        caught.value
    )
    with socket.socket() as silent:  # accepts TCP but never speaks HTTP/2: gRPC's own deadline
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        hasty = Client(f"127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        with hasty, pytest.raises(ClientError) as caught:
            hasty.infer("tiny", batch)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "raise --timeout (timeout= in Python)" in str(caught.value)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--top-k", "99999999999"], "--top-k <= 4294967295"),  # ClassifyRequest.top_k: uint32
        (["--top-k", "0"], "--top-k"),
        (["--timeout", "0"], "--timeout > 0"),
        (["--timeout", "-1"], "--timeout > 0"),
        (["--timeout", "nan"], "--timeout > 0"),
        (["--timeout", "inf"], "--timeout > 0"),
    ],
)
def test_cli_out_of_range_flags_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    image = _write_png(tmp_path / "a.png", 0)
    with pytest.raises(SystemExit) as caught:
        main([f"127.0.0.1:{free_port()}", "--model", "tiny", str(image), *flags])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_empty_target_is_a_usage_error(tmp_path: Path) -> None:
    image = _write_png(tmp_path / "a.png", 0)
    done = _cli("", "--model", "tiny", str(image))
    assert done.returncode == 2
    assert "expected HOST:PORT, got an empty target" in done.stderr
    assert "Failed to create channel" not in done.stderr


@pytest.mark.parametrize(
    ("flag", "content", "message"),
    [
        ("--token-file", b"abc\x01def\n", "got '\\x01' at offset 3"),
        ("--token-file", b"\xff\xfesecret\n", "non-ASCII byte at offset 0"),
        ("--token-file", b" \n", "empty file"),
        ("--ca", b"hello, not a certificate\n", "expected PEM certificates"),
        ("--ca", b"", "expected PEM certificates"),
    ],
)
def test_cli_bad_token_and_ca_files_are_usage_errors(
    tmp_path: Path, flag: str, content: bytes, message: str
) -> None:
    image = _write_png(tmp_path / "a.png", 0)
    bad = tmp_path / "bad-file"
    bad.write_bytes(content)
    done = _cli(f"127.0.0.1:{free_port()}", "--model", "tiny", str(image), flag, str(bad),
                "--timeout", "2")  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()  # one line: no traceback, no gRPC core log lines
    assert line.startswith("error: ") and message in line and str(bad) in line


def test_cli_with_token_and_ca_over_tls(
    start_server: Callable[..., BackgroundServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pki = make_pki(tmp_path)
    token = tmp_path / "token"
    token.write_text("right-token\n")
    server = start_server(tls_cert=pki.server_cert, tls_key=pki.server_key, auth_token_file=token)
    image = _write_png(tmp_path / "a.png", 0)
    argv = [f"127.0.0.1:{server.port}", "--model", "tiny", str(image), "--ca", str(pki.ca)]
    assert main([*argv, "--token-file", str(token)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6
    assert main(argv) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_cli_and_client_with_mutual_tls(
    start_server: Callable[..., BackgroundServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A server with --tls-client-ca took no call from our client: it had no way to send a
    client certificate."""
    pki = make_pki(tmp_path)
    server = start_server(
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    )
    image = _write_png(tmp_path / "a.png", 0)
    argv = [f"127.0.0.1:{server.port}", "--model", "tiny", str(image), "--ca", str(pki.ca),
            "--timeout", "10"]  # fmt: skip
    assert main([*argv, "--cert", str(pki.client_cert), "--key", str(pki.client_key)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == str(image)
    assert main(argv) == 1  # no client certificate: the handshake fails
    assert "--cert and --key are given if it requires client certificates" in (
        capsys.readouterr().err
    )
    with Client(
        f"127.0.0.1:{server.port}",
        timeout=10,
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    ) as client:
        (top,) = client.classify_files("tiny", [image], top_k=1)
        assert len(top) == 1
    with pytest.raises(ValueError, match="private_key and certificate_chain together"):
        Client("127.0.0.1:1", private_key=pki.client_key.read_bytes())


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (("--cert", "client_cert"), "expected --ca with --cert and --key"),
        (("--ca", "ca", "--cert", "client_cert"), "expected --cert and --key together"),
        (("--ca", "ca", "--cert", "client_cert", "--key", "server_key"),
         "got the key of another pair"),
    ],
)
def test_cli_bad_client_certificate_flags_are_usage_errors(
    tmp_path: Path, files: tuple[str, ...], message: str
) -> None:
    pki = make_pki(tmp_path)
    image = _write_png(tmp_path / "a.png", 0)
    flags = [getattr(pki, item) if hasattr(pki, item) else item for item in files]
    done = _cli(f"127.0.0.1:{free_port()}", "--model", "tiny", str(image),
                *map(str, flags), "--timeout", "2")  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert message in done.stderr.splitlines()[-1], done.stderr


def test_classify_refuses_what_it_would_send_wrong(
    shared_server: BackgroundServer, tmp_path: Path
) -> None:
    x = np.random.default_rng(3).normal(size=(2, 3, 8, 8)).astype(np.float32)
    png = _write_png(tmp_path / "a.png", 0).read_bytes()
    with Client(f"127.0.0.1:{shared_server.port}") as client:
        expected = client.classify("tiny", [x[0], x[1], png], top_k=2)
        # Float64, Fortran order, a strided view and a memoryview of the file are the same.
        same = [x[0].astype(np.float64), np.asfortranarray(x[1]), memoryview(png)]
        assert client.classify("tiny", same, top_k=2) == expected
        assert client.classify_arrays("tiny", x[:, :, ::-1, :][:, :, ::-1, :], 2) == expected[:2]
        # Raw uint8 pixels used to be cast to 0..255 floats and classified unnormalized.
        pixels = np.random.default_rng(4).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
        with pytest.raises(TypeError, match="got dtype uint8; preprocess it to float32"):
            client.classify("tiny", [png, pixels[0]])
        with pytest.raises(TypeError, match="got dtype uint8"):
            client.classify_arrays("tiny", pixels)
        with pytest.raises(TypeError, match="got dtype uint8"):
            client.infer("tiny", pixels)
        with pytest.raises(TypeError, match="use classify_files"):
            client.classify("tiny", [str(tmp_path / "a.png")])
        for top_k in (-1, 2**32):  # protobuf said "Value out of range: -1"
            with pytest.raises(ValueError, match="expected 0 <= top_k"):
                client.classify("tiny", [png], top_k=top_k)
        (default,) = client.classify("tiny", [png], top_k=0)  # the server's default, 5
        assert len(default) == 5
        # A memoryview of a float array is that array, not encoded bytes.
        assert client.classify("tiny", [memoryview(x[0]), png], top_k=2) == expected[::2]


def test_infer_stream_raises_what_the_batches_raise_not_grpcs_iteration_error(
    shared_server: BackgroundServer,
) -> None:
    good = np.zeros((1, 3, 8, 8), np.float32)
    pixels = np.zeros((1, 3, 8, 8), np.uint8)

    def broken() -> Iterator[np.ndarray]:
        yield good
        raise OSError("the camera went away")

    with Client(f"127.0.0.1:{shared_server.port}") as client:
        answers = client.infer_stream("tiny", [good, pixels, good], window=1)
        assert next(answers).shape == (1, 5)
        with pytest.raises(TypeError, match="got dtype uint8"):  # was "Exception iterating"
            next(answers)
        answers = client.infer_stream("tiny", broken(), window=4)
        assert next(answers).shape == (1, 5)
        with pytest.raises(OSError, match="the camera went away"):
            next(answers)


def test_cli_reads_a_named_pipe(shared_server: BackgroundServer, tmp_path: Path) -> None:
    image = _write_png(tmp_path / "a.png", 0)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    # The writer writes the moment a reader opens the pipe, then exits at once: the CLI once
    # opened the pipe to check it, closed it (losing the bytes), and then waited on it forever.
    write = (
        f"import os; fd = os.open({str(pipe)!r}, os.O_WRONLY); "
        f"os.write(fd, {image.read_bytes()!r}); os._exit(0)"
    )
    writer = subprocess.Popen([sys.executable, "-c", write])
    try:
        done = _cli(f"127.0.0.1:{shared_server.port}", "--model", "tiny", str(pipe))
    finally:
        writer.kill()
        writer.wait()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == str(pipe)


def test_cli_splits_a_call_with_more_images_than_a_request_may_hold(
    start_server: Callable[..., BackgroundServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = start_server(max_queue_size=2, max_batch_size=4)  # at most 8 rows per request
    paths = [_write_png(tmp_path / f"{i}.png", i) for i in range(20)]
    target = f"127.0.0.1:{server.port}"
    assert main([target, "--model", "tiny", *map(str, paths), "--top-k", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[::2] == [str(p) for p in paths]


def test_cli_names_a_bad_image_and_still_classifies_the_others(
    shared_server: BackgroundServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = [_write_png(tmp_path / f"{i}.png", i) for i in range(2)]
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    target = f"127.0.0.1:{shared_server.port}"
    assert (
        main([target, "--model", "tiny", str(good[0]), str(bad), str(good[1]), "--top-k", "1"]) == 1
    )
    out, err = capsys.readouterr()
    assert out.splitlines()[::2] == [str(good[0]), str(good[1])]
    (line,) = err.splitlines()
    assert line.startswith(f"error: {bad}: INVALID_ARGUMENT: ")
    assert main([target, "--model", "tiny", str(tmp_path)]) == 2
    assert "(Is a directory); pass the images in it" in capsys.readouterr().err


def test_cli_reads_stdin_for_dash(shared_server: BackgroundServer, tmp_path: Path) -> None:
    image = _write_png(tmp_path / "a.png", 0)
    target = f"127.0.0.1:{shared_server.port}"
    done = subprocess.run(
        [sys.executable, "-m", "serve.client", target, "--model", "tiny", "-", str(image)],
        input=image.read_bytes(), capture_output=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert lines[0] == "-" and lines[6] == str(image)
    assert lines[1:6] == lines[7:12]


def test_cli_sends_more_images_than_one_message_holds_in_several_calls(
    shared_server: BackgroundServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 17 uncompressed 4.3 MB PNGs: 73 MB, above the 64 MiB message limit of one call.
    pixels = np.random.default_rng(6).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    paths = []
    for i in range(17):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(buffer.getvalue())
    target = f"127.0.0.1:{shared_server.port}"
    assert main([target, "--model", "tiny", *map(str, paths), "--top-k", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[::2] == [str(p) for p in paths]
    assert len(set(lines[1::2])) == 1


def test_cli_splits_its_calls_for_a_server_with_a_small_message_limit(
    start_server: Callable[..., BackgroundServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = start_server(max_message_bytes=256 * 1024)
    pixels = np.random.default_rng(7).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    paths = []
    for i in range(5):  # 120 KB each: two fit in one call, the five of them do not
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.roll(pixels, i)).save(paths[-1], compress_level=0)
    assert main([f"127.0.0.1:{server.port}", "--model", "tiny", *map(str, paths)]) == 0
    assert capsys.readouterr().out.splitlines()[::6] == [str(p) for p in paths]
