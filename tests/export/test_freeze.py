"""Freezing: eval mode, BatchNorm statistics checked, parameters and buffers untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import user_models

from export import ExportConfig, UsageError, export_checkpoint
from export.freeze import fingerprint, freeze
from export.zoo.resnet import resnet18_cifar

HERE = Path(__file__).resolve().parent


def test_export_leaves_parameters_and_buffers_unchanged(small_ckpt, tmp_path: Path) -> None:
    path, state = small_ckpt
    before = {k: v.clone() for k, v in state.items()}
    result = export_checkpoint(ExportConfig(checkpoint=path, output=tmp_path / "f.onnx"))
    reloaded = torch.load(path, weights_only=True)
    for key, value in before.items():
        assert torch.equal(reloaded[key], value), key
    model = resnet18_cifar(num_classes=4, in_channels=3)
    model.load_state_dict(before)
    assert fingerprint(model) == result.frozen.fingerprint
    assert result.frozen.batchnorm_layers == 6
    assert not result.frozen.untrained_batchnorms


def test_fingerprint_sees_any_change() -> None:
    model = resnet18_cifar(num_classes=4, in_channels=3)
    first = fingerprint(model)
    model.blk1.bn1.running_var[0] += 1e-6
    assert fingerprint(model) != first


def test_freeze_sets_eval_and_no_grad() -> None:
    model = resnet18_cifar(num_classes=4, in_channels=3).train()
    frozen = freeze(model)
    assert not model.training
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert frozen.untrained_batchnorms  # never trained: statistics still 0/1


def test_untrained_batchnorm_warns(run_main, tmp_path: Path) -> None:
    path = tmp_path / "fresh.ckpt"
    torch.save(resnet18_cifar(num_classes=3, in_channels=3).state_dict(), path)
    done = run_main(path)
    assert done.returncode == 0, done.stderr
    assert "looks untrained" in done.stderr


def test_batchnorm_without_running_stats_is_refused(run_main, tmp_path: Path) -> None:
    path = tmp_path / "nostats.ckpt"
    torch.save(user_models.NoRunningStats().state_dict(), path)
    done = run_main(path, "--arch", "user_models:NoRunningStats", "--input-shape", "3,8,8",
                    extra_path=HERE)  # fmt: skip
    assert done.returncode == 2
    assert "track running statistics" in done.stderr


def test_no_running_stats_raises_usage_error() -> None:
    with pytest.raises(UsageError, match="track_running_stats=False"):
        freeze(user_models.NoRunningStats())


@pytest.mark.parametrize("arch", [None, "resnet18-cifar", "user_models:tiny_net"])
def test_checkpoint_without_running_stats_is_named(run_main, tmp_path: Path, arch) -> None:
    # A zoo (or user) network trained with track_running_stats=False saves no statistics; the
    # arch is right, so the message must name the statistics, not tell the user to change it.
    if arch == "user_models:tiny_net":
        state = user_models.NoRunningStats().state_dict()
        options = ["--arch", arch, "--input-shape", "3,8,8"]
    else:
        state = resnet18_cifar(num_classes=4, in_channels=3).state_dict()
        options = ["--arch", arch] if arch else []
    path = tmp_path / "nostats.ckpt"
    torch.save({k: v for k, v in state.items() if ".running_" not in k}, path)
    done = run_main(path, *options, "-o", tmp_path / "out.onnx", extra_path=HERE)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: expected BatchNorm running statistics"), done.stderr
    assert "track_running_stats=True" in done.stderr
    assert "--arch" not in done.stderr
    assert not (tmp_path / "out.onnx").exists()
