"""serve/repository.py: which files become which model names, and which are refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from serve.config import ServerConfig
from serve.model_info import read_model_info
from serve.repository import find_models
from serve.runtime import Runtime


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_files_are_named_by_stem(tmp_path: Path) -> None:
    a, b = _touch(tmp_path / "x" / "resnet.onnx"), _touch(tmp_path / "digits.onnx")
    assert find_models(ServerConfig(models=(a, b))) == {"resnet": a, "digits": b}
    with pytest.raises(ValueError, match="twice"):
        find_models(ServerConfig(models=(a, _touch(tmp_path / "y" / "resnet.onnx"))))
    # Its requests would be counted with those naming no served model.
    with pytest.raises(ValueError, match="other than '_unknown'"):
        find_models(ServerConfig(models=(_touch(tmp_path / "_unknown.onnx"),)))


def test_repository_layouts(tmp_path: Path) -> None:
    plain = _touch(tmp_path / "repo" / "a" / "model.onnx")
    triton = _touch(tmp_path / "repo" / "b" / "1" / "model.onnx")
    _touch(tmp_path / "repo" / "README.txt")
    (tmp_path / "repo" / "lost+found").mkdir()  # a volume's root: not a model folder
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


def _repository(tmp_path: Path, *files: str) -> Path:
    for name in files:
        _touch(tmp_path / "repo" / name)
    return tmp_path / "repo"


def test_other_versions_are_refused_rather_than_serving_version_1(tmp_path: Path) -> None:
    # Triton serves the highest version: quietly serving 1 would answer with another model.
    repo = _repository(tmp_path, "a/1/model.onnx", "a/2/model.onnx", "a/10/model.onnx")
    with pytest.raises(ValueError, match=r"got versions 1, 2, 10; keep the one to serve as a/1/"):
        find_models(ServerConfig(model_repository=repo))
    repo = _repository(tmp_path / "b", "b/3/model.onnx")
    with pytest.raises(ValueError, match=r"b/1/model\.onnx .*got version 3; move the model"):
        find_models(ServerConfig(model_repository=repo))
    # Folders Triton does not read as versions (and empty ones) are no reason to refuse.
    repo = _repository(tmp_path / "c", "c/1/model.onnx", "c/v2/model.onnx", "c/02/model.onnx")
    (repo / "c" / "5").mkdir()
    assert find_models(ServerConfig(model_repository=repo)) == {"c": repo / "c/1/model.onnx"}


def test_model_onnx_may_be_a_folder_with_external_data(
    make_classifier: Callable[..., Path], reference: Callable, tmp_path: Path
) -> None:
    # Triton's layout for an ONNX model with external data: NAME/1/model.onnx/model.onnx.
    model = onnx.load(str(make_classifier(tmp_path / "m.onnx")))
    folder = tmp_path / "repo" / "big" / "1" / "model.onnx"
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True,
              location="weights.bin", size_threshold=0)  # fmt: skip
    found = find_models(ServerConfig(model_repository=tmp_path / "repo"))
    assert found == {"big": folder / "model.onnx"}
    runtime = Runtime(read_model_info("big", found["big"]), device="cpu", max_batch_size=2,
                      intra_op_threads=1)  # fmt: skip
    runtime.warm_up()
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(runtime.run(x), reference(tmp_path / "m.onnx", x), atol=1e-5)


def test_files_the_repository_ignores_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = _repository(tmp_path, "resnet.onnx")
    with pytest.raises(ValueError, match=r"got none \(and resnet\.onnx directly in it"):
        find_models(ServerConfig(model_repository=repo))
    _touch(repo / "digits" / "1" / "model.onnx")
    (repo / "digits" / "config.pbtxt").write_text('label_filename: "labels.txt"\n')
    with caplog.at_level("WARNING", logger="serve.repository"):
        assert list(find_models(ServerConfig(model_repository=repo))) == ["digits"]
    assert f"not serving {repo / 'resnet.onnx'}" in caplog.text
    assert f"{repo / 'resnet'}/model.onnx to serve it" in caplog.text
    assert "config.pbtxt is not read; labels" in caplog.text
