"""Every checkpoint format and key prefix loads to the same weights and exports."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import onnx
import pytest
import torch
import user_models
from safetensors.torch import save_file

from export import ExportConfig, UsageError, export_checkpoint
from export.checkpoint import key_variants, load_checkpoint
from export.zoo.resnet import resnet18_cifar
from export.zoo.small import mlp


def save_scripted(model: torch.nn.Module, path: Path) -> None:
    """Save ``model`` as a TorchScript archive, as users of older torch releases have them.

    torch deprecates writing new ones (``torch.jit.script`` warns); reading them stays
    supported, and that is what these tests are about.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        torch.jit.script(model.eval()).save(str(path))


def export_ok(path: Path, **options: object):
    result = export_checkpoint(ExportConfig(checkpoint=path, **options))
    assert result.parity.passed
    return result


@pytest.mark.parametrize(
    "entry", ["state_dict", "model_state_dict", "model", "net", "state_dict_ema"]
)
def test_state_dict_entries(small_ckpt, tmp_path: Path, entry: str) -> None:
    _, state = small_ckpt
    path = tmp_path / "wrapped.ckpt"
    torch.save({entry: state, "epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}}, path)
    loaded = load_checkpoint(path)
    assert set(loaded.state_dict) == set(state)
    assert export_ok(path).arch == "resnet18-cifar"


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "module._orig_mod."])
def test_prefixes_removed(small_ckpt, tmp_path: Path, prefix: str) -> None:
    _, state = small_ckpt
    path = tmp_path / "prefixed.ckpt"
    torch.save({"state_dict": {prefix + k: v for k, v in state.items()}}, path)
    result = export_ok(path)
    assert result.arch == "resnet18-cifar"
    assert result.num_classes == 4


def test_mlp_keeps_its_own_model_prefix(tmp_path: Path) -> None:
    # mlp's own keys are model.0.weight ...: stripping "model." must not be forced on them.
    state = mlp(num_classes=10, in_channels=1).state_dict()
    for wrapper in ("", "module."):
        path = tmp_path / f"mlp{wrapper or '-bare'}.ckpt"
        torch.save({wrapper + k: v for k, v in state.items()}, path)
        assert export_ok(path).arch == "mlp"
    variants = [sorted(v)[0] for v in key_variants({"module.model.0.weight": torch.zeros(1)})]
    assert variants == ["module.model.0.weight", "model.0.weight", "0.weight"]


def test_safetensors(small_ckpt, tmp_path: Path) -> None:
    _, state = small_ckpt
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert load_checkpoint(path).format == "safetensors"
    assert export_ok(path).arch == "resnet18-cifar"


def test_torchscript_archive(small_ckpt, tmp_path: Path) -> None:
    _, state = small_ckpt
    model = resnet18_cifar(num_classes=4, in_channels=3)
    model.load_state_dict(state)
    path = tmp_path / "scripted.pt"
    save_scripted(model, path)
    loaded = load_checkpoint(path)
    assert loaded.format == "torchscript"
    assert export_ok(path).arch == "resnet18-cifar"


def test_torchscript_traced_in_train_mode(run_main, small_ckpt, tmp_path: Path) -> None:
    # torch.jit.trace keeps BatchNorm's training flag as a constant: eval() cannot undo it, so
    # the message must say to trace again after eval(), not to rewrite forward.
    _, state = small_ckpt
    model = resnet18_cifar(num_classes=4, in_channels=3)
    model.load_state_dict(state)
    path = tmp_path / "traced.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model.train(), torch.randn(2, 3, 32, 32)).save(str(path))
    done = run_main(path, "-o", tmp_path / "traced.onnx")
    assert done.returncode == 1, done.stderr
    assert "trace it again after model.eval()" in done.stderr, done.stderr
    assert not (tmp_path / "traced.onnx").exists()


def test_missing_num_batches_tracked_is_fine(small_ckpt, tmp_path: Path) -> None:
    _, state = small_ckpt
    path = tmp_path / "old.ckpt"
    torch.save({k: v for k, v in state.items() if "num_batches_tracked" not in k}, path)
    assert export_ok(path).arch == "resnet18-cifar"


def test_dict_without_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "meta.ckpt"
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, path)
    with pytest.raises(UsageError, match="expected tensors"):
        load_checkpoint(path)


def test_checkpoint_hash_in_metadata(small_ckpt, tmp_path: Path) -> None:
    import hashlib

    path, _ = small_ckpt
    result = export_ok(path, output=tmp_path / "hashed.onnx")
    assert result.metadata["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert result.metadata["torch_version"] == torch.__version__


def test_half_precision_weights_export_as_float32(small_ckpt, tmp_path: Path) -> None:
    _, state = small_ckpt
    path = tmp_path / "half.ckpt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)
    result = export_ok(path)
    assert result.arch == "resnet18-cifar"
    model = onnx.load(str(result.output))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_torchscript_that_is_no_zoo_network(tmp_path: Path) -> None:
    model = user_models.TinyNet(num_classes=3)
    user_models.trained_state(model)
    path = tmp_path / "custom.pt"
    save_scripted(model, path)
    with pytest.raises(UsageError, match="--input-shape"):
        export_checkpoint(ExportConfig(checkpoint=path))
    result = export_ok(path, input_shape=(3, 8, 8))
    assert result.arch == "TinyNet"
    assert result.num_classes == 3
    assert result.exporter == "legacy"


def test_damaged_torchscript_archive(tmp_path: Path) -> None:
    good = tmp_path / "scripted.pt"
    save_scripted(user_models.TinyNet(), good)
    damaged = tmp_path / "ts_bad.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(damaged, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if "/code/" in info.filename and info.filename.endswith(".py"):
                data = data[:20] + b"\xff" * 100 + data[120:]
            dst.writestr(info, data)
    # A zip with a code/ entry that torch.jit.save never wrote (no version record).
    impostor = tmp_path / "impostor.pt"
    with zipfile.ZipFile(impostor, "w") as z:
        z.writestr("impostor/code/model.py", "def forward(x):\n    return x\n")
    for path in (damaged, impostor):
        with pytest.raises(UsageError, match="expected a readable TorchScript archive") as info:
            export_checkpoint(ExportConfig(checkpoint=path, input_shape=(3, 8, 8)))
        assert str(path) in str(info.value)
        assert "\n" not in str(info.value)


def test_half_precision_pickled_module_exports_as_float32(tmp_path: Path) -> None:
    # Used to fail with advice to fix --input-shape (float input against half weights).
    model = user_models.TinyNet(num_classes=3)
    user_models.trained_state(model)
    path = tmp_path / "whole_half.pt"
    torch.save(model.half(), path)
    result = export_ok(path, input_shape=(3, 8, 8), trust_pickle=True)
    assert result.arch == "TinyNet"
    graph = onnx.load(str(result.output)).graph
    for value in (graph.input[0], graph.output[0]):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_torchscript_with_the_dynamo_exporter(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    save_scripted(user_models.TinyNet(), path)
    with pytest.raises(UsageError) as info:
        export_checkpoint(ExportConfig(checkpoint=path, input_shape=(3, 8, 8), exporter="dynamo"))
    message = str(info.value)
    assert "the dynamo exporter cannot take" in message
    assert "leave --exporter at auto" in message
    assert "\x1b" not in message
    assert not list(tmp_path.glob("*.onnx*"))


def test_pickled_data_parallel_module(tmp_path: Path) -> None:
    # torch.save(model) of a DataParallel-wrapped model, as older training scripts do: neither
    # ONNX exporter takes the wrapper, and the error said to simplify the forward.
    model = user_models.TinyNet(num_classes=3)
    user_models.trained_state(model)
    path = tmp_path / "whole_dp.pt"
    torch.save({"model": torch.nn.DataParallel(model).half(), "epoch": 7}, path)
    result = export_ok(path, input_shape=(3, 8, 8), trust_pickle=True)
    assert result.arch == "TinyNet"
    assert result.num_classes == 3


def test_empty_safetensors_is_named(tmp_path: Path) -> None:
    # Used to be reported as keys that fit no zoo architecture, listing all of theirs.
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    with pytest.raises(UsageError, match="holds none") as info:
        export_checkpoint(ExportConfig(checkpoint=path))
    assert "closest" not in str(info.value)


def test_truncated_archive_and_lfs_pointer_are_named(tmp_path: Path) -> None:
    # A checkpoint cut short by an interrupted copy, or a Git LFS pointer in its place, used to
    # be called "none of these" (not a torch.save, safetensors or TorchScript file).
    state_dict = tmp_path / "state.pt"
    torch.save(user_models.TinyNet().state_dict(), state_dict)
    scripted = tmp_path / "scripted.pt"
    save_scripted(user_models.TinyNet(), scripted)
    for good in (state_dict, scripted):
        cut = tmp_path / f"cut_{good.name}"
        cut.write_bytes(good.read_bytes()[:-100])
        with pytest.raises(UsageError, match="truncated or damaged") as info:
            export_checkpoint(ExportConfig(checkpoint=cut, input_shape=(3, 8, 8)))
        assert str(cut) in str(info.value)
    for name in ("lfs.pt", "model.safetensors"):  # Hugging Face keeps .safetensors in LFS
        pointer = tmp_path / name
        pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
        with pytest.raises(UsageError, match="git lfs pull"):
            export_checkpoint(ExportConfig(checkpoint=pointer))
