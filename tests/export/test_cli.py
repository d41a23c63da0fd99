"""Bad input and usage: exit 2, one clear message, no traceback.

A few cases run the real command as a subprocess; the rest call `export.cli.main` in-process,
where an uncaught exception would fail the test just as a traceback would.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import user_models

from export import ExportConfig, UsageError

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


@pytest.mark.parametrize(
    ("arch", "source", "phrase"),
    [
        (":foo", None, "module.path:factory"),
        (".x:y", None, "module.path:factory"),
        ("user_models:", None, "module.path:factory"),
        ("syntax_error_mod:build", "def build(:\n", "SyntaxError"),
        ("raises_mod:build", "raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
    ],
    ids=["empty-module", "relative-module", "empty-name", "syntax-error", "raises-at-import"],
)
def test_factory_that_fails_to_import(
    run_main, small_ckpt, tmp_path: Path, arch: str, source: str | None, phrase: str
) -> None:
    path, _ = small_ckpt
    if source is not None:
        (tmp_path / (arch.partition(":")[0] + ".py")).write_text(source)
    done = run_main(path, "--arch", arch, "--input-shape", "3,32,32", extra_path=tmp_path)
    assert_usage_error(done, phrase, arch)


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (("--std", "nan"), "finite --std"),
        (("--mean", "0.5,inf,0.5"), "finite --mean"),
        (("--input-shape", "1,5000,5000"), "at most 16,777,216 values per sample"),
    ],
    ids=["std-nan", "mean-inf", "input-too-large"],
)
def test_non_finite_stats_and_huge_inputs(run_main, small_ckpt, args, phrase: str) -> None:
    path, _ = small_ckpt
    assert_usage_error(run_main(path, *args), phrase)


def test_huge_input_shape_is_refused_before_any_work(small_ckpt) -> None:
    # 3×30000×30000 used to be OOM-killed while probing the model (exit 137, no message).
    path, _ = small_ckpt
    with pytest.raises(UsageError, match="pass a smaller --input-shape"):
        ExportConfig(checkpoint=path, input_shape=(3, 30000, 30000))


@pytest.mark.parametrize(
    ("values", "phrase"),
    [
        ({"a": "inputs", "b": "inputs"}, "got {} with 2 arrays (a, b)"),
        ({"": "nan"}, "got 1 NaN or infinite value(s)"),
        ({"": "inf"}, "NaN or infinite"),
        ({"": "too-big"}, "got 3072 NaN or infinite"),
    ],
    ids=["npz-two-arrays", "nan", "inf", "beyond-float32"],
)
def test_bad_sample_file(run_main, small_ckpt, tmp_path: Path, values, phrase: str) -> None:
    path, _ = small_ckpt
    rng = np.random.default_rng(0)
    arrays = {}
    for name, kind in values.items():
        array = rng.random((2, 3, 32, 32))
        if kind in ("nan", "inf"):
            array[1, 2, 3, 4] = float(kind)
        elif kind == "too-big":
            array[0] = 1e300  # finite as float64, infinite once cast to the model's float32
        arrays[name] = array
    if "" in arrays:
        sample = tmp_path / "sample.npy"
        np.save(sample, arrays[""])
    else:
        sample = tmp_path / "sample.npz"
        np.savez(sample, **arrays)
    done = run_main(path, "--sample", sample, "-o", tmp_path / "out.onnx")
    assert_usage_error(done, phrase.format(sample), "--sample")
    assert no_onnx_in(tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("bad.npz", b"PK\x03\x04garbage", "BadZipFile"),
        ("empty.npy", b"", "EOFError"),
    ],
)
def test_unreadable_sample_file(
    run_main, small_ckpt, tmp_path: Path, name: str, content: bytes, reason: str
) -> None:
    path, _ = small_ckpt
    sample = tmp_path / name
    sample.write_bytes(content)
    done = run_main(path, "--sample", sample, "-o", tmp_path / "out.onnx")
    assert_usage_error(done, reason, "np.save(path, inputs)")
    assert no_onnx_in(tmp_path)


def test_sample_npz_with_one_array(run_main, small_ckpt, tmp_path: Path) -> None:
    path, _ = small_ckpt
    sample = tmp_path / "sample.npz"
    np.savez(sample, np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32))
    done = run_main(path, "--sample", sample, "-o", tmp_path / "out.onnx")
    assert done.returncode == 0, done.stderr
    assert "batch sample" in done.stdout


def test_output_is_the_checkpoint(run_main, small_ckpt, tmp_path: Path) -> None:
    before = small_ckpt[0].read_bytes()
    path = tmp_path / "model.ckpt"
    path.write_bytes(before)
    assert_usage_error(run_main(path, "-o", path), "is the checkpoint", "another .onnx path")
    link = tmp_path / "link.onnx"
    link.symlink_to(path)
    assert_usage_error(run_main(path, "-o", link), "is the checkpoint")
    # The default output (CKPT with .onnx) is the checkpoint when the checkpoint ends in .onnx.
    named_onnx = tmp_path / "weights.onnx"
    named_onnx.write_bytes(before)
    assert_usage_error(run_main(named_onnx), "is the checkpoint")
    assert path.read_bytes() == before
    assert named_onnx.read_bytes() == before


def test_output_that_is_no_regular_file(run_main, small_ckpt, tmp_path: Path) -> None:
    path, _ = small_ckpt
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    assert_usage_error(run_main(path, "-o", fifo), str(fifo), "special file")
    assert fifo.is_fifo()
    # -o DIR means DIR/<ckpt stem>.onnx, and that one is a directory here.
    (tmp_path / f"{path.stem}.onnx").mkdir()
    assert_usage_error(run_main(path, "-o", tmp_path), f"{path.stem}.onnx", "a directory")
    (tmp_path / "out.parity.json").mkdir()
    done = run_main(path, "-o", tmp_path / "out.onnx")
    assert_usage_error(done, "parity report", "out.parity.json", "a directory")
    assert not (tmp_path / "out.onnx").exists()


def test_output_with_trailing_slash_is_a_directory(run_main, small_ckpt, tmp_path: Path) -> None:
    path, _ = small_ckpt
    missing = f"{tmp_path / 'newdir'}{os.sep}"
    assert_usage_error(run_main(path, "-o", missing), "existing output directory", "newdir")
    assert not (tmp_path / "newdir").exists()
    (tmp_path / "models").mkdir()
    done = run_main(path, "-o", f"{tmp_path / 'models'}{os.sep}")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "models" / f"{path.stem}.onnx").is_file()
    assert (tmp_path / "models" / f"{path.stem}.parity.json").is_file()
