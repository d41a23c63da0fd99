"""`python -m serve` on model files and folders it cannot serve: one line, exit 2, no warm-up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from serve.config import ServerConfig
from serve.repository import find_models

Make = Callable[..., Path]


def _serve(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run `python -m serve` on free ports until it exits (every case here fails at start)."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "serve", "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "0", "--device", "cpu", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _model_at(make_classifier: Make, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return make_classifier(path)


def _without_root_reads(unreadable: Path) -> tuple[str, ...]:
    """A command prefix under which ``unreadable`` (mode 000) cannot be read: none for a normal
    user; for root, setpriv without the capabilities that let root read everything."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: root reads every file")
    prefix = (setpriv, "--bounding-set", "-dac_override,-dac_read_search")
    works = subprocess.run([*prefix, "true"], check=False).returncode == 0
    reads = subprocess.run([*prefix, "test", "-r", unreadable], check=False).returncode == 0
    if not works or reads:
        pytest.skip("running as root without a way to drop its read-everything capabilities")
    return prefix


def test_unreadable_model_folders_and_files_are_model_problems(
    make_classifier: Make, tmp_path: Path
) -> None:
    # A folder without read permission made Path.is_file raise EACCES: exit 1 (as for a port
    # in use) with a bare "[Errno 13] Permission denied: ...", saying nothing to do.
    repo = tmp_path / "repo"
    _model_at(make_classifier, repo / "a" / "1" / "model.onnx")
    _model_at(make_classifier, repo / "b" / "model.onnx")
    loose = make_classifier(tmp_path / "loose.onnx")
    (repo / "b").chmod(0)
    loose.chmod(0)
    try:
        prefix = _without_root_reads(repo / "b")
        done = _serve("--model-repository", str(repo), prefix=prefix)
        assert done.returncode == 2, done.stderr
        assert f"expected to read {repo / 'b' / 'model.onnx'}, got Permission denied" in done.stderr
        assert "readable by the user the server runs as" in done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
        # The file itself: not "pass a file written by `python -m export`".
        done = _serve(str(loose), prefix=prefix)
        assert done.returncode == 2, done.stderr
        assert "got Permission denied; make it readable by the user" in done.stderr
    finally:
        (repo / "b").chmod(0o755)
        loose.chmod(0o644)


def test_a_path_the_system_refuses_is_a_usage_error(tmp_path: Path) -> None:
    # ENAMETOOLONG from stat: an OSError that ended the server with exit 1 and no advice.
    long = tmp_path / ("m" * 300 + ".onnx")
    refused = r"expected to read .* got File name too long; check the path"
    with pytest.raises(ValueError, match=refused):
        find_models(ServerConfig(models=(long,)))


def test_a_model_folder_passed_as_a_file_points_at_the_repository_flag(
    make_classifier: Make, tmp_path: Path
) -> None:
    # A Triton user's habit: `python -m serve models/resnet` or `python -m serve models`.
    _model_at(make_classifier, tmp_path / "resnet" / "1" / "model.onnx")
    for folder in (tmp_path / "resnet", tmp_path):
        with pytest.raises(ValueError, match=r"got the folder .* --model-repository DIR"):
            find_models(ServerConfig(models=(folder,)))


def test_missing_external_data_stops_the_server_before_any_warm_up(
    make_classifier: Make, tmp_path: Path
) -> None:
    # ONNX Runtime found the missing weights file only when it opened that model: after the
    # ports were bound and the models before it warmed up (minutes on a GPU).
    good = make_classifier(tmp_path / "good.onnx")
    model = onnx.load(str(make_classifier(tmp_path / "big.onnx")))
    onnx.save(model, str(tmp_path / "big.onnx"), save_as_external_data=True,
              location="big.onnx.data", size_threshold=0)  # fmt: skip
    (tmp_path / "big.onnx.data").unlink()
    done = _serve(str(good), str(tmp_path / "big.onnx"))
    assert done.returncode == 2, done.stderr
    assert f"expected the external data file {tmp_path / 'big.onnx.data'}" in done.stderr
    assert "No such file or directory; copy it beside the model" in done.stderr
    assert "listening on" not in done.stderr and "loaded from" not in done.stderr


def test_a_model_onnx_runtime_refuses_stops_the_server_before_any_warm_up(
    make_classifier: Make, tmp_path: Path
) -> None:
    # The graph reads fine; only ONNX Runtime knows it lacks opset 99, when it opens the
    # session. That came after the models before it had warmed up (minutes on a GPU).
    good = make_classifier(tmp_path / "good.onnx")
    model = onnx.load(str(make_classifier(tmp_path / "new.onnx")))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 99
    onnx.save(model, str(tmp_path / "new.onnx"))
    done = _serve(str(good), str(tmp_path / "new.onnx"))
    assert done.returncode == 2, done.stderr
    assert "new.onnx" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "loaded from" not in done.stderr, done.stderr
