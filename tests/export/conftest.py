"""Fixtures for the exporter tests: run the real CLI, train zoo models briefly, save checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]

RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_cli() -> RunCli:
    """Run `python -m export ARGS...` as a subprocess; extra_path goes on PYTHONPATH, prefix
    (a command such as setpriv) before the interpreter."""

    def run(
        *args: object, extra_path: Path | None = None, prefix: Sequence[str] = ()
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        paths = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
        return subprocess.run(
            [*prefix, sys.executable, "-m", "export", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=240,
        )

    return run


@pytest.fixture
def run_main(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> RunCli:
    """`export.cli.main(ARGS)` in this process (fast), with the same result shape as run_cli."""
    from export.cli import main

    def run(*args: object, extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
        if extra_path is not None:
            monkeypatch.syspath_prepend(str(extra_path))
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors
            code = int(e.code or 0)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["export", *map(str, args)], code, out, err)

    return run


def train_briefly(model: nn.Module, input_shape: tuple[int, ...], steps: int = 2) -> nn.Module:
    """A few SGD steps in train mode, so weights and BatchNorm statistics leave their init."""
    torch.manual_seed(1)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        x = torch.randn(4, *input_shape)
        out = model(x)
        loss = nn.functional.cross_entropy(out, torch.randint(0, out.shape[1], (4,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A briefly trained resnet18-cifar (fast to export) saved as a plain state_dict."""
    from export.zoo.resnet import resnet18_cifar

    torch.manual_seed(0)
    model = train_briefly(resnet18_cifar(num_classes=4, in_channels=3), (3, 32, 32))
    path = tmp_path_factory.mktemp("small") / "small.ckpt"
    state = model.state_dict()
    torch.save(state, path)
    return path, state
