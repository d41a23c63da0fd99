"""Bad input and usage: exit 2, one clear message, no traceback.

A few cases run the real command as a subprocess; the rest call `export.cli.main` in-process,
where an uncaught exception would fail the test just as a traceback would.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import user_models

HERE = Path(__file__).resolve().parent


def assert_usage_error(done, *phrases: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ")
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr


def no_onnx_in(directory: Path) -> bool:
    return not any(p.name.endswith((".onnx", ".onnx.tmp")) for p in directory.iterdir())


def test_missing_file(run_cli, tmp_path: Path) -> None:
    assert_usage_error(run_cli(tmp_path / "nope.ckpt"), "does not exist")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("random.ckpt", os.urandom(4096)),
        ("text.ckpt", b"this is a text file, not weights\n" * 20),
        ("empty.ckpt", b""),
        ("random.safetensors", os.urandom(512)),
        ("fake.pt", b"PK\x03\x04" + os.urandom(200)),
    ],
    ids=["random-bytes", "text", "empty", "bad-safetensors", "broken-zip"],
)
def test_not_a_checkpoint(run_cli, tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    done = run_cli(path)
    assert_usage_error(done)
    assert any(w in done.stderr for w in ("PyTorch checkpoint", "empty file", "safetensors"))
    assert no_onnx_in(tmp_path)


def test_pickled_module_needs_trust_pickle(run_cli, tmp_path: Path) -> None:
    model = user_models.TinyNet()
    user_models.trained_state(model)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    done = run_cli(path, "--input-shape", "3,8,8", extra_path=HERE)
    assert_usage_error(done, "--trust-pickle", "state_dict")
    assert no_onnx_in(tmp_path)

    done = run_cli(path, "--input-shape", "3,8,8", "--trust-pickle", extra_path=HERE)
    assert done.returncode == 0, done.stderr
    assert "exported TinyNet" in done.stdout
    assert (tmp_path / "whole.onnx").is_file()


def test_keys_that_fit_no_architecture(run_main, tmp_path: Path) -> None:
    state = {"encoder.weight": torch.randn(8, 4), "decoder.weight": torch.randn(4, 8)}
    path = tmp_path / "odd.ckpt"
    torch.save(state, path)
    done = run_main(path)
    assert_usage_error(done, "fit none", "closest", "missing", "unexpected", "--arch")


def test_wrong_arch(run_main, small_ckpt) -> None:
    path, _ = small_ckpt
    done = run_main(path, "--arch", "lenet5")
    assert_usage_error(done, "'lenet5'", "missing conv_unit.0.weight", "unexpected")


def test_unknown_arch_name(run_main, small_ckpt) -> None:
    path, _ = small_ckpt
    assert_usage_error(run_main(path, "--arch", "resnet1000"), "resnet1000", "resnet18-cifar")


def test_factory_that_does_not_import(run_main, small_ckpt) -> None:
    path, _ = small_ckpt
    assert_usage_error(run_main(path, "--arch", "no_such_module:build"), "importable", "PYTHONPATH")


@pytest.mark.parametrize(
    ("shape", "phrase"),
    [
        ("3,32", "C,H,W"),
        ("a,b,c", "integers"),
        ("1,32,32", "input channels"),
        ("3,16,16", "accept inputs of shape 3,16,16"),
    ],
    ids=["two-dims", "not-numbers", "wrong-channels", "too-small-for-arch"],
)
def test_wrong_input_shape(run_main, small_ckpt, shape: str, phrase: str) -> None:
    path, _ = small_ckpt
    assert_usage_error(run_main(path, "--input-shape", shape), phrase)


def test_unwritable_output(run_main, small_ckpt, tmp_path: Path) -> None:
    path, _ = small_ckpt
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_usage_error(run_main(path, "-o", blocker / "out.onnx"), "output directory")
    assert_usage_error(run_main(path, "-o", "/proc/out.onnx"), "writable output directory")


@pytest.mark.parametrize(
    ("args", "phrase"),
    [(("--opset", "11"), "--opset >= 18"), (("--std", "0"), "--std values > 0"),
     (("--mean", "0.1,0.2"), "--mean with 1 or 3 values"), (("--atol", "x"), "invalid float")],
    ids=["opset", "std", "mean-count", "atol"],
)  # fmt: skip
def test_bad_options(run_main, small_ckpt, args: tuple[str, ...], phrase: str) -> None:
    path, _ = small_ckpt
    done = run_main(path, *args)
    assert_usage_error(done, phrase)


def test_labels_count_must_match(run_main, small_ckpt, tmp_path: Path) -> None:
    path, _ = small_ckpt
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    assert_usage_error(run_main(path, "--labels", labels), "expected 4 non-empty labels")
