"""The seed notes' small networks: LeNet-5, a 784-200-200-10 MLP and Network-in-Network."""

from __future__ import annotations

from torch import Tensor, nn


class LeNet5(nn.Module):
    """LeNet-5 for 3×32×32 images, as in the notes (no activation between the conv layers)."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv_unit = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, stride=1, padding=0),
            nn.MaxPool2d(kernel_size=2, stride=2, padding=0),
            nn.Conv2d(6, 16, kernel_size=5, stride=1, padding=0),
            nn.MaxPool2d(kernel_size=2, stride=2, padding=0),
        )
        self.fc_unit = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_unit(self.conv_unit(x).flatten(1))


class MLP(nn.Module):
    """The notes' MNIST MLP: flattens C×28×28 and applies 784-200-200-K with LeakyReLU."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(in_channels * 28 * 28, 200),
            nn.LeakyReLU(inplace=True),
            nn.Linear(200, 200),
            nn.LeakyReLU(inplace=True),
            nn.Linear(200, num_classes),
            nn.LeakyReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.flatten(1))


def nin_block(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1),
        nn.ReLU(),
    )


class NiN(nn.Module):
    """Network in Network (Lin et al., 2013) in the d2l layout: four NiN blocks, no linear layer."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nin_block(in_channels, 96, kernel_size=11, stride=4, padding=0),
            nn.MaxPool2d(3, stride=2),
            nin_block(96, 256, kernel_size=5, stride=1, padding=2),
            nn.MaxPool2d(3, stride=2),
            nin_block(256, 384, kernel_size=3, stride=1, padding=1),
            nn.MaxPool2d(3, stride=2),
            nn.Dropout(0.5),
            nin_block(384, num_classes, kernel_size=3, stride=1, padding=1),
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Flatten(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def lenet5(*, num_classes: int = 10, in_channels: int = 3) -> LeNet5:
    return LeNet5(num_classes=num_classes, in_channels=in_channels)


def mlp(*, num_classes: int = 10, in_channels: int = 1) -> MLP:
    return MLP(num_classes=num_classes, in_channels=in_channels)


def nin(*, num_classes: int = 10, in_channels: int = 1) -> NiN:
    return NiN(num_classes=num_classes, in_channels=in_channels)
