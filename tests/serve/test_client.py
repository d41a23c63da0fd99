"""serve/client.py: the Python Client and `python -m serve.client` against a real server."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from serve.background import BackgroundServer
from serve.client import Client, ClientError, main
from tests.serve.conftest import free_port


def _write_png(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


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
    done = subprocess.run(
        [sys.executable, "-m", "serve.client", f"127.0.0.1:{free_port()}", "--model", "tiny",
         str(tmp_path / "a.png"), "--timeout", "5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert "cannot reach a ready server" in done.stderr
    assert "Traceback" not in done.stderr
