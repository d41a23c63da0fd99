"""serve/repository.py: which files become which model names."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.config import ServerConfig
from serve.repository import find_models


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_files_are_named_by_stem(tmp_path: Path) -> None:
    a, b = _touch(tmp_path / "x" / "resnet.onnx"), _touch(tmp_path / "digits.onnx")
    assert find_models(ServerConfig(models=(a, b))) == {"resnet": a, "digits": b}
    with pytest.raises(ValueError, match="twice"):
        find_models(ServerConfig(models=(a, _touch(tmp_path / "y" / "resnet.onnx"))))


def test_repository_layouts(tmp_path: Path) -> None:
    plain = _touch(tmp_path / "repo" / "a" / "model.onnx")
    triton = _touch(tmp_path / "repo" / "b" / "1" / "model.onnx")
    _touch(tmp_path / "repo" / "README.txt")
    assert find_models(ServerConfig(model_repository=tmp_path / "repo")) == {
        "a": plain,
        "b": triton,
    }
    _touch(tmp_path / "repo" / "c" / "2" / "model.onnx")
    with pytest.raises(ValueError, match=r"c/1/model\.onnx"):
        find_models(ServerConfig(model_repository=tmp_path / "repo"))


def test_config_is_checked_where_built(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"MODEL\.onnx or --model-repository"):
        ServerConfig()
    with pytest.raises(ValueError, match="--instances"):
        ServerConfig(models=(tmp_path / "m.onnx",), instances=0)
    with pytest.raises(ValueError, match="--device"):
        ServerConfig(models=(tmp_path / "m.onnx",), device="tpu")
