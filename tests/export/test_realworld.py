"""Checkpoints as real training code writes them: mixed precision, Lightning and EMA dicts,
wrapper prefixes, CUDA-saved storages, weight norm, TorchScript archives, odd user models."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from export.onnx_export import read_metadata
from export.zoo.small import lenet5

SHAPE = (3, 32, 32)


def _trained_lenet(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = lenet5(num_classes=num_classes, in_channels=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def lenet_state() -> dict[str, torch.Tensor]:
    return _trained_lenet().state_dict()


def _onnx_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def _exports(run_main, ckpt: Path, *args: object) -> Path:
    result = run_main(ckpt, *args)
    assert result.returncode == 0, result.stderr
    out = ckpt.with_suffix(".onnx")
    assert out.is_file()
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_mixed_precision_weights_export_as_float32(
    run_main, lenet_state, tmp_path: Path, dtype: torch.dtype, suffix: str
) -> None:
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in lenet_state.items()}
    ckpt = tmp_path / f"amp{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(weights, str(ckpt))
    else:
        torch.save(weights, ckpt)
    out = _exports(run_main, ckpt)
    meta = read_metadata(out)
    assert meta["arch"] == "lenet5" and meta["num_classes"] == "4"
    # Float32 in and out, whatever precision the weights were saved in.
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"
    assert session.get_outputs()[0].type == "tensor(float)"


def test_checkpoint_saved_from_cuda_tensors_loads_on_cpu(
    run_main, lenet_state, tmp_path: Path
) -> None:
    # torch.save records each storage's device ("cuda:0" for a GPU run); a CPU-only host can
    # load it only with map_location. Tag the storages as a GPU run would.
    ckpt = tmp_path / "gpu.ckpt"
    state = {"state_dict": lenet_state, "epoch": 3, "best_acc1": torch.tensor(0.9)}
    with mock.patch("torch.serialization.location_tag", lambda storage: "cuda:0"):
        torch.save(state, ckpt)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(ckpt, weights_only=True)  # the file really is tagged for the GPU
    _exports(run_main, ckpt)


def test_lightning_checkpoint(run_main, lenet_state, tmp_path: Path) -> None:
    ckpt = tmp_path / "epoch=3-step=40.ckpt"
    torch.save(
        {
            "epoch": 3,
            "global_step": 40,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in lenet_state.items()},
            "hyper_parameters": {"lr": 0.1, "num_classes": 4},
            "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(3)}},
                                  "param_groups": [{"lr": 0.1, "params": [0]}]}],
            "lr_schedulers": [{"last_epoch": 3}],
            "loops": {},
            "callbacks": {},
        },
        ckpt,
    )  # fmt: skip
    assert read_metadata(_exports(run_main, ckpt))["arch"] == "lenet5"


@pytest.mark.parametrize("prefix", ["module._orig_mod.", "_orig_mod.module.", "model.module."])
def test_compile_and_data_parallel_prefixes_together(
    run_main, lenet_state, tmp_path: Path, prefix: str
) -> None:
    ckpt = tmp_path / "wrapped.pth"
    torch.save({"model_state_dict": {prefix + k: v for k, v in lenet_state.items()}}, ckpt)
    assert read_metadata(_exports(run_main, ckpt))["arch"] == "lenet5"


def test_ema_beside_the_raw_weights(run_main, lenet_state, tmp_path: Path) -> None:
    ema = {f"module.{k}": v * 0.5 if v.is_floating_point() else v for k, v in lenet_state.items()}
    ckpt = tmp_path / "ema.pth"
    torch.save({"state_dict": lenet_state, "state_dict_ema": ema, "epoch": 9}, ckpt)
    out = _exports(run_main, ckpt)
    x = torch.randn(3, *SHAPE)
    model = _trained_lenet()
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_onnx_logits(out, x), expected, atol=1e-4, rtol=1e-3)


def test_channels_last_and_non_contiguous_weights(run_main, lenet_state, tmp_path: Path) -> None:
    weights = {}
    for key, value in lenet_state.items():
        if value.dim() == 4:
            value = value.contiguous(memory_format=torch.channels_last)
        elif value.dim() == 2:
            value = value.t().contiguous().t()  # a transposed view
        weights[key] = value
    assert not all(v.is_contiguous() for v in weights.values())
    ckpt = tmp_path / "layout.pt"
    torch.save(weights, ckpt)
    out = _exports(run_main, ckpt)
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        expected = _trained_lenet()(x).numpy()
    np.testing.assert_allclose(_onnx_logits(out, x), expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("api", ["parametrizations", "legacy"])
def test_weight_norm_on_a_zoo_network_is_folded(run_main, tmp_path: Path, api: str) -> None:
    model = _trained_lenet()
    with torch.no_grad():
        # Not a plain layer in disguise: g differs from ‖v‖, so folding must compute g·v/‖v‖.
        model.fc_unit[4].weight.mul_(3.0)
    if api == "parametrizations":
        parametrizations.weight_norm(model.fc_unit[4])
        parametrizations.weight_norm(model.conv_unit[0], dim=None)
    else:
        with pytest.warns(FutureWarning):  # deprecated, yet in many checkpoints
            nn.utils.weight_norm(model.fc_unit[4])
            nn.utils.weight_norm(model.conv_unit[0], dim=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt = tmp_path / "wn.pt"
    torch.save(model.state_dict(), ckpt)
    assert any("weight_g" in k or "original0" in k for k in model.state_dict())
    out = _exports(run_main, ckpt)
    assert read_metadata(out)["arch"] == "lenet5"
    x = torch.randn(5, *SHAPE)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    np.testing.assert_allclose(_onnx_logits(out, x), expected, atol=1e-4, rtol=1e-3)


USER_MODULE = """
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations


class Net(nn.Module):
    def __init__(self, num_classes=5, in_channels=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, x):
        return self.head(self.drop(F.relu(self.bn(self.conv(x))).flatten(1)))


class TupleNet(Net):
    def forward(self, x):
        logits = super().forward(x)
        return logits, logits.softmax(1)


class DictNet(Net):
    def forward(self, x):
        return {"logits": super().forward(x)}


def weight_normed(num_classes, in_channels):
    net = Net(num_classes, in_channels)
    parametrizations.weight_norm(net.head)
    return net


def conv_weight_normed(num_classes, in_channels):
    net = Net(num_classes, in_channels)
    parametrizations.weight_norm(net.conv)
    return net


def tv_style(*, weights=None, progress=True, **kwargs):
    # torchvision's builders: keywords only, num_classes passed on to the network.
    return Net(**kwargs)


def keywords_elsewhere(**options):
    return Net(num_classes=5)  # takes any keyword and ignores it


def sync_bn(num_classes, in_channels):
    return nn.SyncBatchNorm.convert_sync_batchnorm(Net(num_classes, in_channels))
"""


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "userpkg"
    folder.mkdir()
    (folder / "rw_nets.py").write_text(textwrap.dedent(USER_MODULE))
    return folder


def _user_state(user_dir: Path, monkeypatch: pytest.MonkeyPatch, factory: str, **kw) -> dict:
    monkeypatch.syspath_prepend(str(user_dir))
    import rw_nets

    torch.manual_seed(0)
    model = getattr(rw_nets, factory)(num_classes=7, in_channels=3, **kw).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 8, 8) * 2 + 1)
    return model.eval().state_dict()


def _export_user(run_main, user_dir: Path, ckpt: Path, factory: str):
    """`python -m export CKPT --arch rw_nets:FACTORY` for the user module's 3x8x8 networks."""
    return run_main(ckpt, "--arch", f"rw_nets:{factory}", "--input-shape", "3,8,8",
                    extra_path=user_dir)  # fmt: skip


@pytest.mark.parametrize("trained", ["weight_normed", "conv_weight_normed"])
def test_user_factory_with_weight_norm_on_a_layer(
    run_main, user_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trained: str
) -> None:
    # The number of classes has to be read from the (g, v) pair when the head has no `.weight`
    # key, and the conv's folded weight must not be taken for the last layer's.
    ckpt = tmp_path / "wn_user.pt"
    torch.save(_user_state(user_dir, monkeypatch, trained), ckpt)
    for factory in (trained, "Net"):  # as trained, and as the plain network
        result = _export_user(run_main, user_dir, ckpt, factory)
        assert result.returncode == 0, result.stderr
        assert read_metadata(ckpt.with_suffix(".onnx"))["num_classes"] == "7"


@pytest.mark.parametrize("factory", ["TupleNet", "DictNet"])
def test_user_model_returning_more_than_logits(
    run_main, user_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, factory: str
) -> None:
    ckpt = tmp_path / "multi.pt"
    torch.save(_user_state(user_dir, monkeypatch, "Net"), ckpt)
    result = _export_user(run_main, user_dir, ckpt, factory)
    assert result.returncode == 2
    assert "forward returns the logits only" in result.stderr
    assert "Traceback" not in result.stderr
    assert not ckpt.with_suffix(".onnx").exists()


@pytest.mark.parametrize("drop", ["missing", "extra"])
def test_num_batches_tracked_missing_or_extra(
    run_main, user_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drop: str
) -> None:
    state = _user_state(user_dir, monkeypatch, "Net")
    if drop == "missing":
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    else:
        state["conv.num_batches_tracked"] = torch.tensor(12)
    ckpt = tmp_path / "nbt.pt"
    torch.save(state, ckpt)
    result = _export_user(run_main, user_dir, ckpt, "Net")
    assert result.returncode == 0, result.stderr


def test_sync_batchnorm_from_a_ddp_script(
    run_main, user_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "ddp.pt"
    torch.save(_user_state(user_dir, monkeypatch, "Net"), ckpt)
    result = _export_user(run_main, user_dir, ckpt, "sync_bn")
    assert result.returncode == 0, result.stderr
    # SyncBatchNorm's input checks are no data-dependent branch of the user's forward.
    assert "tracer" not in result.stderr


@pytest.mark.parametrize("count", [3, 9])
def test_labels_file_of_the_wrong_length(run_main, lenet_state, tmp_path: Path, count: int) -> None:
    ckpt = tmp_path / "labels.pt"
    torch.save(lenet_state, ckpt)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"label{i}\n" for i in range(count)))
    result = run_main(ckpt, "--labels", labels)
    assert result.returncode == 2
    assert f"expected 4 non-empty labels (one per line) in {labels}, got {count}" in result.stderr
    assert not ckpt.with_suffix(".onnx").exists()


def test_torchscript_archive_for_another_input_size_names_the_cause(
    run_main, tmp_path: Path
) -> None:
    ckpt = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript archives still exist
        torch.jit.script(_trained_lenet()).save(str(ckpt))
    result = run_main(ckpt, "--input-shape", "3,28,28")
    assert result.returncode == 2
    # The interpreter's error comes last, after two tracebacks; the message must carry it.
    assert "mat1 and mat2 shapes cannot be multiplied" in result.stderr, result.stderr
    assert "TorchScript interpreter" not in result.stderr
    assert "pass a matching --input-shape" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("entry", ["resnet50", "LeNet5", "lenet"])
def test_arch_entry_naming_no_zoo_network_leaves_it_to_the_weights(
    run_main, lenet_state, tmp_path: Path, entry: str
) -> None:
    # pytorch/examples' ImageNet script saves {"arch": args.arch, ...}; others save the class
    # name. A name outside the zoo says nothing against weights that fit one exactly.
    ckpt = tmp_path / "named.pth"
    state = {f"module.{k}": v for k, v in lenet_state.items()}
    torch.save({"epoch": 90, "arch": entry, "state_dict": state, "best_acc1": torch.tensor(71.2)},
               ckpt)  # fmt: skip
    assert read_metadata(_exports(run_main, ckpt))["arch"] == "lenet5"


def test_arch_entry_naming_no_zoo_network_and_weights_that_fit_none(
    run_main, lenet_state, tmp_path: Path
) -> None:
    ckpt = tmp_path / "named.pth"
    state = {k: v for k, v in lenet_state.items() if not k.startswith("fc_unit.4.")}
    torch.save({"arch": "resnet50", "state_dict": state}, ckpt)
    result = run_main(ckpt)
    assert result.returncode == 2
    assert "the checkpoint's 'arch' entry 'resnet50' names none" in result.stderr
    assert "--arch module.path:factory" in result.stderr


def test_lightning_module_holding_more_than_the_network(
    run_main, lenet_state, tmp_path: Path
) -> None:
    # self.model = net; self.criterion = nn.CrossEntropyLoss(weight=class_weights)
    ckpt = tmp_path / "lit.ckpt"
    state = {f"model.{k}": v for k, v in lenet_state.items()}
    state["criterion.weight"] = torch.ones(4)
    torch.save({"state_dict": state, "epoch": 1, "hyper_parameters": {}}, ckpt)
    result = run_main(ckpt)
    assert result.returncode == 2
    assert "got those of lenet5 under 'model.' beside 1 other key(s) (criterion.weight)" in (
        result.stderr
    )
    assert "pl_module.model.state_dict()" in result.stderr
    assert not ckpt.with_suffix(".onnx").exists()


def test_a_torchvision_style_builder_gets_the_checkpoints_class_count(
    run_main, user_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `--arch torchvision.models:resnet50` for a fine-tuned 7-class head: the builder takes
    # only **kwargs, so it was called bare and built its default head, which did not fit.
    ckpt = tmp_path / "tv.pt"
    torch.save(_user_state(user_dir, monkeypatch, "Net"), ckpt)
    result = _export_user(run_main, user_dir, ckpt, "tv_style")
    assert result.returncode == 0, result.stderr
    assert read_metadata(ckpt.with_suffix(".onnx"))["num_classes"] == "7"
    # A builder that swallows the keyword still gets the plain "does not fit" error.
    result = _export_user(run_main, user_dir, ckpt, "keywords_elsewhere")
    assert result.returncode == 2
    assert "expected weights that fit rw_nets:keywords_elsewhere" in result.stderr
    assert "Traceback" not in result.stderr
