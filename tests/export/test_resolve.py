"""Architecture resolution: --arch, the checkpoint's `arch` entry, detection, user factories."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
import user_models

from export import ExportConfig, UsageError, export_checkpoint
from export.checkpoint import Checkpoint
from export.resolve import resolve
from export.zoo import architectures

HERE = Path(__file__).resolve().parent


def as_checkpoint(state: dict[str, torch.Tensor], arch: str | None = None) -> Checkpoint:
    return Checkpoint(Path("mem.ckpt"), "0" * 64, "state_dict", state, arch=arch)


@pytest.mark.parametrize("arch", list(architectures()))
def test_detection_by_keys_and_shapes(arch: str) -> None:
    channels, classes = (1, 6) if arch in ("mlp", "nin") else (3, 7)
    state = architectures()[arch].build(num_classes=classes, in_channels=channels).state_dict()
    resolved = resolve(as_checkpoint(state), None)
    assert resolved.arch == arch
    assert (resolved.num_classes, resolved.in_channels) == (classes, channels)


def test_googlenet_aux_classifiers_are_ignored() -> None:
    state = architectures()["googlenet"].build(num_classes=5, in_channels=3).state_dict()
    state["aux1.conv.conv.weight"] = torch.zeros(128, 512, 1, 1)
    state["aux2.fc2.weight"] = torch.zeros(5, 1024)
    assert resolve(as_checkpoint(state), None).arch == "googlenet"


def test_arch_entry_in_checkpoint(small_ckpt, tmp_path: Path) -> None:
    _, state = small_ckpt
    path = tmp_path / "tagged.ckpt"
    torch.save({"arch": "resnet18-cifar", "state_dict": state}, path)
    assert export_checkpoint(ExportConfig(checkpoint=path)).arch == "resnet18-cifar"
    torch.save({"arch": "vgg16", "state_dict": state}, path)
    with pytest.raises(UsageError, match="expected weights of 'vgg16'"):
        export_checkpoint(ExportConfig(checkpoint=path))


def test_wrong_shapes_are_named() -> None:
    state = architectures()["lenet5"].build(num_classes=10, in_channels=3).state_dict()
    state["fc_unit.0.weight"] = torch.zeros(120, 401)
    with pytest.raises(UsageError) as info:
        resolve(as_checkpoint(state), None)
    assert "closest" in str(info.value)
    assert "lenet5: wrong shape fc_unit.0.weight" in str(info.value)


@pytest.mark.parametrize("factory", ["tiny_net", "tiny_net_no_args", "TinyNet"])
def test_user_factory(factory: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    path = tmp_path / "user.ckpt"
    torch.save(
        {"module." + k: v for k, v in user_models.trained_state(user_models.TinyNet()).items()},
        path,
    )
    result = export_checkpoint(
        ExportConfig(checkpoint=path, arch=f"user_models:{factory}", input_shape=(3, 8, 8))
    )
    assert result.arch == f"user_models:{factory}"
    assert result.num_classes == 5
    assert result.frozen.batchnorm_layers == 1


def test_user_factory_via_cli(run_cli, tmp_path: Path) -> None:
    path = tmp_path / "user.ckpt"
    torch.save(user_models.trained_state(user_models.TinyNet(num_classes=3)), path)
    done = run_cli(path, "--arch", "user_models:tiny_net", "--input-shape", "3,8,8",
                   extra_path=HERE)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "exported user_models:tiny_net" in done.stdout


@pytest.mark.parametrize(
    ("factory", "said"),
    [("tiny_net_from_command_line", "the following arguments are required: --data"),
     ("tiny_net_that_exits", "SystemExit (code 1)"),
     ("tiny_net_that_exits_saying_why", "SystemExit (code 1: 'no data folder')")],
    ids=["parses-argv", "sys-exit", "sys-exit-message"],
)  # fmt: skip
def test_user_factory_that_exits(run_main, tmp_path: Path, factory: str, said: str) -> None:
    # Exit 2 with our one-line message: not the factory's exit code (1 would read as a failed
    # check), nor its usage text, which would read as this command's.
    path = tmp_path / "user.ckpt"
    torch.save(user_models.trained_state(user_models.TinyNet()), path)
    done = run_main(path, "--arch", f"user_models:{factory}", "--input-shape", "3,8,8",
                    extra_path=HERE)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: expected user_models:"), done.stderr
    assert said in done.stderr and "usage:" not in done.stderr
    assert done.stderr.count("\n") == 1


def test_user_factory_needs_input_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    path = tmp_path / "user.ckpt"
    torch.save(user_models.trained_state(user_models.TinyNet()), path)
    with pytest.raises(UsageError, match="--input-shape"):
        export_checkpoint(ExportConfig(checkpoint=path, arch="user_models:tiny_net"))


def test_user_factory_weights_must_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    path = tmp_path / "user.ckpt"
    state = user_models.trained_state(user_models.TinyNet())
    state["extra.weight"] = torch.zeros(2, 2)
    torch.save(state, path)
    with pytest.raises(UsageError, match=r"unexpected extra\.weight"):
        export_checkpoint(ExportConfig(checkpoint=path, arch="user_models:tiny_net",
                                       input_shape=(3, 8, 8)))  # fmt: skip


def test_factory_named_by_checkpoint_is_not_imported_unasked(run_main, tmp_path: Path) -> None:
    # The file, not the user, would choose which module runs: a security problem.
    planted = tmp_path / "planted_arch.py"
    planted.write_text(
        "from pathlib import Path\n"
        "Path(__file__).with_name('imported').touch()\n"
        "from user_models import tiny_net\n"
    )
    state = user_models.trained_state(user_models.TinyNet())
    path = tmp_path / "tagged.ckpt"
    torch.save({"arch": "planted_arch:tiny_net", "state_dict": state}, path)

    done = run_main(path, "--input-shape", "3,8,8", extra_path=tmp_path)
    assert done.returncode == 2, done.stderr
    for phrase in ("'arch' entry", str(path), "--arch planted_arch:tiny_net", "--trust-pickle"):
        assert phrase in done.stderr
    assert not (tmp_path / "imported").exists()

    done = run_main(path, "--input-shape", "3,8,8", "--trust-pickle", extra_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "exported planted_arch:tiny_net" in done.stdout
    assert (tmp_path / "imported").exists()
    done = run_main(path, "--input-shape", "3,8,8", "--arch", "planted_arch:tiny_net",
                    "-o", tmp_path / "explicit.onnx", extra_path=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("arch", ["this:s", "no_such_module_here:Net"])
def test_bad_factory_from_checkpoint_names_the_checkpoint(
    run_main, small_ckpt, tmp_path: Path, arch: str
) -> None:
    _, state = small_ckpt
    path = tmp_path / "tagged.ckpt"
    torch.save({"arch": arch, "state_dict": state}, path)
    done = run_main(path, "--trust-pickle")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"the checkpoint's 'arch' entry in {path}" in done.stderr
    assert "--arch " + arch not in done.stderr
    assert "from --arch" not in done.stderr


def test_factory_building_a_half_model_exports_as_float32(run_main, tmp_path: Path) -> None:
    # Used to fail the probe with advice to fix --input-shape (float input, half weights).
    path = tmp_path / "half.ckpt"
    state = user_models.trained_state(user_models.TinyNet())
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)
    done = run_main(path, "--arch", "user_models:tiny_net_half", "--input-shape", "3,8,8",
                    extra_path=HERE)  # fmt: skip
    assert done.returncode == 0, done.stderr
    graph = onnx.load(str(path.with_suffix(".onnx"))).graph
    for value in (graph.input[0], graph.output[0]):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize(
    ("factory", "prefix"),
    [
        ("tiny_net_compiled", ""),
        ("tiny_net_compiled", "_orig_mod."),
        ("tiny_net_data_parallel", ""),
        ("tiny_net_data_parallel", "module."),
    ],
)
def test_factory_returning_a_wrapped_network(
    run_main, tmp_path: Path, factory: str, prefix: str
) -> None:
    # torch.compile and DataParallel wrappers used to end in a failed trace ("simplify the
    # forward"), or keys that did not fit: the network inside them is what gets exported.
    path = tmp_path / "wrapped.ckpt"
    state = user_models.trained_state(user_models.TinyNet())
    torch.save({prefix + k: v for k, v in state.items()}, path)
    done = run_main(path, "--arch", f"user_models:{factory}", "--input-shape", "3,8,8",
                    extra_path=HERE)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "legacy exporter" in done.stdout
