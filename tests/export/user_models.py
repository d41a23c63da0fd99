"""User-defined networks for `--arch user_models:FACTORY`, including deliberately broken ones.

Not a test module: tests put this directory on the path (or PYTHONPATH for the CLI).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import Tensor, nn
from torch.nn import functional as F

SHAPE = (3, 8, 8)


class TinyNet(nn.Module):
    """A correct user network: conv → BN → relu → linear."""

    def __init__(self, num_classes: int = 5, in_channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.bn(self.conv(x))).flatten(1))


def tiny_net(num_classes: int, in_channels: int) -> TinyNet:
    return TinyNet(num_classes=num_classes, in_channels=in_channels)


def tiny_net_no_args() -> TinyNet:
    return TinyNet()


class TrainingBatchNorm(TinyNet):
    """Normalizes with batch statistics even in eval mode (momentum 0: buffers stay put)."""

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        x = F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                         training=True, momentum=0.0)  # fmt: skip
        return self.head(F.relu(x).flatten(1))


class BatchMean(TinyNet):
    """Subtracts the batch mean: every row depends on the rest of the batch."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x - x.mean(dim=0, keepdim=True))


class TrainingDropout(TinyNet):
    """Dropout forced on at inference."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv(x))).flatten(1)
        return self.head(F.dropout(x, p=0.5, training=True))


class NoRunningStats(TinyNet):
    """BatchNorm without running statistics: eval() would still use batch statistics."""

    def __init__(self, num_classes: int = 5, in_channels: int = 3) -> None:
        super().__init__(num_classes, in_channels)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)


class Counter(TinyNet):
    """Mutates a buffer on every forward call, so export changes the model."""

    def __init__(self, num_classes: int = 5, in_channels: int = 3) -> None:
        super().__init__(num_classes, in_channels)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls.add_(1)
        return super().forward(x)


class FixedBatch(TinyNet):
    """Flattens to a fixed batch of 2: runs at the probe's batch size only."""

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.bn(self.conv(x))).reshape(2, -1))


class Squeeze(TinyNet):
    """Squeezes every axis of size 1: at batch size 1 the output loses its batch axis."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).squeeze()


def trained_state(model: nn.Module) -> dict[str, Tensor]:
    """Move BN statistics away from their initial values, then return the state_dict."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *SHAPE) * 2 + 1)
    return model.eval().state_dict()


class ValueBranch(TinyNet):
    """Branches in Python on a tensor's value: the trace keeps one of the two paths."""

    def forward(self, x: Tensor) -> Tensor:
        logits = super().forward(x)
        if logits.sum() > 1e9:
            return -logits
        return logits


class MaskedLogits(TinyNet):
    """Holds a -inf buffer on purpose (a floor for the logits, like an attention mask)."""

    def __init__(self, num_classes: int = 5, in_channels: int = 3) -> None:
        super().__init__(num_classes, in_channels)
        self.register_buffer("floor", torch.full((num_classes,), float("-inf")))

    def forward(self, x: Tensor) -> Tensor:
        return torch.maximum(super().forward(x), self.floor)


def tiny_net_from_command_line() -> TinyNet:
    """A training script's factory that reads its options from the command line (ours, here)."""
    parser = argparse.ArgumentParser(prog="train.py")
    parser.add_argument("--data", required=True)
    parser.add_argument("--classes", type=int, default=5)
    return TinyNet(num_classes=parser.parse_args().classes)


def tiny_net_that_exits() -> TinyNet:
    """A factory that gives up with sys.exit(1) (which would read as a failed check)."""
    sys.exit(1)


def tiny_net_that_exits_saying_why() -> TinyNet:
    """A factory that gives up with sys.exit("...") (None printed as its code before)."""
    sys.exit("no data folder")


def tiny_net_half(num_classes: int, in_channels: int) -> TinyNet:
    """A factory that builds the network in half precision (as for mixed-precision training)."""
    return TinyNet(num_classes=num_classes, in_channels=in_channels).half()


def tiny_net_compiled(num_classes: int, in_channels: int) -> nn.Module:
    """A factory that returns the network wrapped by torch.compile (keys gain `_orig_mod.`)."""
    return torch.compile(TinyNet(num_classes=num_classes, in_channels=in_channels))


def tiny_net_data_parallel(num_classes: int, in_channels: int) -> nn.Module:
    """A factory that returns the network wrapped in DataParallel (keys gain `module.`)."""
    return nn.DataParallel(TinyNet(num_classes=num_classes, in_channels=in_channels))


class CastsToHalf(TinyNet):
    """Casts its input to half in forward, as a model trained with .half() may."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.half()).float()


class DoubleLogits(TinyNet):
    """Returns float64 logits."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).double()


class Eigenvalues(TinyNet):
    """Uses an op that neither ONNX exporter can express (torch.linalg.eigvals)."""

    def forward(self, x: Tensor) -> Tensor:
        shift = torch.linalg.eigvals(x[:, 0, :4, :4]).real.sum(dim=1, keepdim=True)
        return super().forward(x) + 0 * shift
