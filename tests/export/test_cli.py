"""Bad input and usage: exit 2, one clear message, no traceback.

A few cases run the real command as a subprocess; the rest call `export.cli.main` in-process,
where an uncaught exception would fail the test just as a traceback would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import user_models
from safetensors.torch import save_file

from export import ExportConfig, UsageError
from export.cli import build_parser

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


def test_pickled_module_of_a_training_script(run_cli, tmp_path: Path) -> None:
    # torch.save(model) in a script pickles the class as __main__.Net: no import can find it
    # again, so "run from the project that defines the model" would not help; say what will.
    script = tmp_path / "train.py"
    lines = ["import torch", "class Net(torch.nn.Linear): pass", "torch.save(Net(12, 3), 'w.pt')"]
    script.write_text("\n".join(lines) + "\n")
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True, timeout=120)
    done = run_cli(tmp_path / "w.pt", "--trust-pickle", "--input-shape", "1,1,12")
    assert_usage_error(done, "__main__.Net, a class of the script that saved it",
                       "save model.state_dict()", "--arch module.path:Net")  # fmt: skip
    assert done.stderr.count("\n") == 1
    assert no_onnx_in(tmp_path)


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


def test_factory_name_the_module_lacks(run_main, small_ckpt) -> None:
    # Not "got NoneType": the name is absent, and the closest names the module has are given.
    path, _ = small_ckpt
    done = run_main(path, "--arch", "user_models:tiny_nte", extra_path=HERE)
    assert_usage_error(done, "got no such name there; closest: tiny_net")
    assert "NoneType" not in done.stderr


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
    [(("--opset", "11"), "--opset from 18 to"), (("--opset", "99"), "got 99; pass one in that"),
     (("--std", "0"), "--std values > 0"), (("--mean", "0.1,0.2"), "; pass one value (used for"),
     (("--atol", "x"), "invalid float"), (("--atol", "-1"), "got -1.0 and 0.001; pass e.g."),
     (("--atol", "nan"), "got nan and 0.001; pass e.g. --atol"),
     (("--rtol", "inf"), "finite --atol and --rtol")],
    ids=["opset", "opset-too-new", "std", "mean-count", "atol", "atol-negative", "atol-nan",
         "rtol-inf"],
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
    # Four lines for four classes, one blank: three labels, and the blank line is named.
    labels.write_text("cat\n\ndog\nemu\n")
    assert_usage_error(run_main(path, "--labels", labels), "got 3 and a blank line 2; remove it")


@pytest.mark.parametrize(
    "data",
    [
        # Windows Notepad saves UTF-8 with a BOM; it must not become part of the first label.
        "cat\r\ndog\r\nemu\r\nfox\r\n".encode("utf-8-sig"),
        # Read line by line, JSON gave labels such as '["cat",' or '"0": "cat",' (and exit 0
        # when the line count happened to fit).
        b'["cat", "dog", "emu", "fox"]\n',
        b'{\n  "0": "cat",\n  "1": "dog",\n  "3": "fox",\n  "2": "emu"\n}\n',
        b'{"0": ["n1", "cat"], "1": ["n2", "dog"], "2": ["n3", "emu"], "3": ["n4", "fox"]}',
    ],
    ids=["byte-order-mark", "json-list", "index_to_name", "imagenet_index_to_name"],
)
def test_labels_files_that_export(run_main, small_ckpt, tmp_path: Path, data: bytes) -> None:
    path, _ = small_ckpt
    labels = tmp_path / "labels.txt"
    labels.write_bytes(data)
    out = tmp_path / "out.onnx"
    done = run_main(path, "--labels", labels, "-o", out)
    assert done.returncode == 0, done.stderr
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert json.loads(props["labels"]) == ["cat", "dog", "emu", "fox"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"1": "cat", "2": "dog", "3": "emu", "4": "fox"}', "class indices"),
        ('["cat", "dog", 3, "fox"]', "got 3"),
        ('["cat", "dog", "\\ud800", "fox"]', "valid Unicode"),
        ('["cat", "dog", "emu"]', "got 3"),
        # int("01") is 1: the keys passed as indices, then "1" was looked up (KeyError).
        ('{"0": "cat", "01": "dog", "2": "emu", "3": "fox"}', "class indices"),
        # Not "a blank line 2" of a file written on one line.
        ('["cat", " ", "emu", "fox"]', "got ' ' for class 1"),
    ],
    ids=["keys", "number", "surrogate", "count", "padded_key", "empty"],
)
def test_bad_json_labels_are_named(run_main, small_ckpt, tmp_path: Path, text, expected) -> None:
    path, _ = small_ckpt
    labels = tmp_path / "labels.json"
    labels.write_text(text)
    done = run_main(path, "--labels", labels, "-o", tmp_path / "out.onnx")
    assert_usage_error(done, str(labels), expected)
    assert no_onnx_in(tmp_path)


@pytest.mark.parametrize("kind", ["missing", "directory", "binary"])
def test_unreadable_labels_file(run_main, small_ckpt, tmp_path: Path, kind: str) -> None:
    path, _ = small_ckpt
    labels = tmp_path / "labels.txt"
    if kind == "directory":
        labels.mkdir()
    elif kind == "binary":
        labels.write_bytes(b"\xff\xfe\x00bad" * 5)
    done = run_main(path, "--labels", labels, "-o", tmp_path / "out.onnx")
    assert_usage_error(done, str(labels), "; pass --labels a text file with one label per line")
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("arch", "source", "phrase"),
    [
        (":foo", None, "module.path:factory"),
        (".x:y", None, "module.path:factory"),
        ("user_models:", None, "module.path:factory"),
        ("syntax_error_mod:build", "def build(:\n", "SyntaxError"),
        ("raises_mod:build", "raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
        ("exits_mod:build", "import sys\nprint('training...')\nsys.exit(0)\n",
         "importing exits_mod exited (code 0); guard its script code with if __name__"),
    ],
    ids=["empty-module", "relative-module", "empty-name", "syntax-error", "raises-at-import",
         "exits-at-import"],
)  # fmt: skip
def test_factory_that_fails_to_import(
    run_main, small_ckpt, tmp_path: Path, arch: str, source: str | None, phrase: str
) -> None:
    path, _ = small_ckpt
    if source is not None:
        (tmp_path / (arch.partition(":")[0] + ".py")).write_text(source)
    done = run_main(path, "--arch", arch, "--input-shape", "3,32,32", extra_path=tmp_path)
    assert_usage_error(done, phrase, arch)


def test_factory_module_that_runs_argparse_at_import(run_cli, small_ckpt, tmp_path: Path) -> None:
    # A training script imported for its model class parses our arguments and exits 2.
    (tmp_path / "train_script.py").write_text(
        "import argparse\n"
        "parser = argparse.ArgumentParser()\n"
        "parser.add_argument('--epochs', type=int)\n"
        "args = parser.parse_args()\n"
        "print('training started')\n"
    )
    path, _ = small_ckpt
    done = run_cli(path, "--arch", "train_script:build", "-o", tmp_path / "out.onnx",
                   extra_path=tmp_path)  # fmt: skip
    assert_usage_error(done, "importing train_script exited (code 2)", "__name__ == '__main__'")
    assert done.stderr.count("\n") == 1, done.stderr  # no usage text of the script's own
    assert "usage:" not in done.stderr
    assert no_onnx_in(tmp_path)


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
        ({"": "bool"}, "got dtype bool; save the preprocessed inputs as float32"),
        ({"": "complex"}, "expected a real-valued numeric --sample array, got dtype complex128"),
    ],
    ids=["npz-two-arrays", "nan", "inf", "beyond-float32", "bool", "complex"],
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
        elif kind == "bool":
            array = array > 0.5
        elif kind == "complex":
            array = array + 1j  # a cast to float32 would silently drop the imaginary part
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


def lenet_state() -> dict[str, torch.Tensor]:
    from export.zoo.small import lenet5

    torch.manual_seed(0)
    return lenet5(num_classes=10, in_channels=3).state_dict()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_integer_weights_are_refused(run_main, tmp_path: Path, suffix: str) -> None:
    # load_state_dict(assign=True) used to fail with a traceback: ints cannot be parameters.
    state = lenet_state()
    state["fc_unit.2.weight"] = (state["fc_unit.2.weight"] * 100).long()
    path = tmp_path / f"int{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    done = run_main(path)
    assert_usage_error(done, "floating-point weights for lenet5", "fc_unit.2.weight of dtype int64",
                       "; save the float model's state_dict")  # fmt: skip
    assert no_onnx_in(tmp_path)


def test_non_finite_weights_are_refused(run_main, tmp_path: Path) -> None:
    # Exported, they used to give a dozen parity failures that blamed the exporter.
    state = lenet_state()
    state["fc_unit.2.bias"][3] = float("inf")
    state["fc_unit.4.weight"][0, :2] = float("nan")
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    done = run_main(path)
    assert_usage_error(done, "got 1 NaN or infinite value(s) of 84 in fc_unit.2.bias",
                       "export an earlier checkpoint")  # fmt: skip
    assert done.stderr.count("\n") == 1
    assert no_onnx_in(tmp_path)


def test_unreadable_checkpoint(run_cli, tmp_path: Path) -> None:
    path = tmp_path / "locked.pt"
    torch.save(lenet_state(), path)
    path.chmod(0)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        # root reads any file; without these two capabilities it obeys the permission bits.
        prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
        if not shutil.which("setpriv") or subprocess.run([*prefix, "true"]).returncode:
            pytest.skip("running as root, and setpriv cannot drop CAP_DAC_OVERRIDE here")
    done = run_cli(path, prefix=prefix)
    assert_usage_error(done, f"got {path} which cannot be read (Permission denied)",
                       "check its permissions")  # fmt: skip
    assert no_onnx_in(tmp_path)


def test_checkpoint_that_is_no_regular_file(run_main, tmp_path: Path) -> None:
    folder = tmp_path / "run1"
    folder.mkdir()
    assert_usage_error(run_main(folder), f"got {folder} which is a directory", "file inside it")
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    done = run_main(fifo, "-o", tmp_path / "out.onnx")
    assert_usage_error(done, f"got {fifo} which is a special file")
    assert no_onnx_in(tmp_path)


def test_onnx_model_as_checkpoint(run_main, tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    before = path.read_bytes()
    # Said first, rather than that the default output (model.onnx) is the checkpoint itself.
    done = run_main(path)
    assert_usage_error(done, "which is already an ONNX model", f"python -m serve {path}")
    assert "is the checkpoint" not in done.stderr
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "args",
    [("--input-shape=",), ("--mean=",), ("--std=",), ("-o", ""), ("--arch=",), ("--labels=",)],
    ids=["input-shape", "mean", "std", "output", "arch", "labels"],
)
def test_empty_option_value(
    run_main, small_ckpt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]
) -> None:
    # `-o ""` used to mean the current directory, and the others were ignored.
    monkeypatch.chdir(tmp_path)
    path, _ = small_ckpt
    done = run_main(path, *args)
    assert_usage_error(done, f"argument {args[0].rstrip('=')}", "got an empty string")
    assert not list(tmp_path.iterdir())


def test_whole_module_under_a_state_dict_entry(run_main, tmp_path: Path) -> None:
    # YOLO-style training checkpoints keep the module itself under "model".
    model = user_models.TinyNet(num_classes=3)
    user_models.trained_state(model)
    path = tmp_path / "train.pt"
    torch.save({"model": model, "epoch": 3}, path)
    done = run_main(path, "--input-shape", "3,8,8", extra_path=HERE)
    assert_usage_error(done, "pickled Python object (user_models.TinyNet)", "--trust-pickle")
    done = run_main(path, "--input-shape", "3,8,8", "--trust-pickle", extra_path=HERE)
    assert done.returncode == 0, done.stderr
    assert "exported TinyNet" in done.stdout
    assert "3 classes" in done.stdout


def test_summary_gives_the_opset_in_the_file(
    run_main, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "lenet.pt"
    torch.save(lenet_state(), path)
    done = run_main(path, "--opset", "19")
    assert done.returncode == 0, done.stderr
    assert "opset        19 (legacy exporter)" in done.stdout
    assert onnx.load(str(tmp_path / "lenet.onnx")).opset_import[0].version == 19
    # The dynamo exporter writes its own default opset when it cannot convert to the one asked
    # for; the summary must give the file's opset, not the option's.
    from export import pipeline

    real = pipeline.export_onnx
    monkeypatch.setattr(pipeline, "export_onnx", lambda *a, **kw: real(*a, **{**kw, "opset": 18}))
    done = run_main(path, "--opset", "19")
    assert done.returncode == 0, done.stderr
    assert "opset        18 (legacy exporter)" in done.stdout
    assert "asked for --opset 19, the exporter wrote opset 18" in done.stderr


def test_help_shows_the_defaults() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "ONNX opset (18 to 23) (default: 18)" in text
    assert "absolute tolerance (default: 0.0001)" in text
    assert "(default: None)" not in text


def test_onnx_runtime_telemetry_stays_off(
    run_cli, small_ckpt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # onnxruntime 1.31 sends Microsoft telemetry by default and wrote a device id and a
    # database under ~/.cache/Microsoft during the parity checks.
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    done = run_cli(small_ckpt[0], "-o", tmp_path / "small.onnx")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "small.onnx").is_file()
    assert list(home.rglob("*")) == []


def test_a_reader_that_stops_early_ends_the_export_quietly(small_ckpt, tmp_path: Path) -> None:
    # `python -m export CKPT | head -2`: the summary's print met the closed pipe, a traceback
    # and exit 1, which reads as a failed check although the model was written and checked.
    ckpt = tmp_path / "piped.ckpt"
    shutil.copy(small_ckpt[0], ckpt)
    reader, writer = os.pipe()
    os.close(reader)  # as head does once it has its lines
    try:
        done = subprocess.run(
            [sys.executable, "-m", "export", str(ckpt)],
            stdout=writer, stderr=subprocess.PIPE, text=True, timeout=240,
            cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
    finally:
        os.close(writer)
    assert done.returncode == 141, done.stderr  # 128 + SIGPIPE, as a shell reports it
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert ckpt.with_suffix(".onnx").is_file()
