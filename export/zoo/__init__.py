"""The model zoo: the seed notes' classifiers, with the facts the exporter needs about each."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import Tensor, nn

from export.zoo.googlenet import googlenet
from export.zoo.resnet import resnet18, resnet18_cifar
from export.zoo.small import lenet5, mlp, nin
from export.zoo.vgg import alexnet, vgg11, vgg11_bn, vgg16

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchSpec:
    """How to build one zoo architecture and read its sizes from a state_dict.

    `first_weight` is the first layer's weight (dim 1 = input channels × `features_per_channel`),
    `last_weight` the classifier's weight (dim 0 = number of classes). `ignored_prefixes` name
    training-only keys a checkpoint may carry and the inference model does not build.
    """

    name: str
    build: Callable[..., nn.Module]
    spatial: tuple[int, int]
    first_weight: str
    last_weight: str
    features_per_channel: int = 1
    ignored_prefixes: tuple[str, ...] = ()
    imagenet_stats: bool = False

    def sizes(self, state_dict: Mapping[str, Tensor]) -> tuple[int, int] | None:
        """(num_classes, in_channels) read from the weights, or None when the keys are absent."""
        first, last = state_dict.get(self.first_weight), state_dict.get(self.last_weight)
        if first is None or last is None or first.dim() < 2 or last.dim() < 1:
            return None
        if first.shape[1] % self.features_per_channel:
            return None
        return int(last.shape[0]), int(first.shape[1]) // self.features_per_channel

    def default_input_shape(self, in_channels: int) -> tuple[int, int, int]:
        return (in_channels, *self.spatial)

    def default_stats(self, in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std): ImageNet's for ImageNet-style RGB nets, else identity."""
        if self.imagenet_stats and in_channels == 3:
            return IMAGENET_MEAN, IMAGENET_STD
        return (0.0,) * in_channels, (1.0,) * in_channels


_SPECS = (
    ArchSpec("lenet5", lenet5, (32, 32), "conv_unit.0.weight", "fc_unit.4.weight"),
    ArchSpec("mlp", mlp, (28, 28), "model.0.weight", "model.4.weight", features_per_channel=784),
    ArchSpec("nin", nin, (224, 224), "net.0.0.weight", "net.7.4.weight"),
    ArchSpec("resnet18-cifar", resnet18_cifar, (32, 32), "conv1.0.weight", "outlayer.weight"),
    ArchSpec("resnet18", resnet18, (224, 224), "conv1.weight", "fc.weight", imagenet_stats=True),
    ArchSpec("alexnet", alexnet, (224, 224), "features.0.weight", "classifier.6.weight",
             imagenet_stats=True),
    ArchSpec("vgg11", vgg11, (224, 224), "features.0.weight", "classifier.6.weight",
             imagenet_stats=True),
    ArchSpec("vgg11_bn", vgg11_bn, (224, 224), "features.0.weight", "classifier.6.weight",
             imagenet_stats=True),
    ArchSpec("vgg16", vgg16, (224, 224), "features.0.weight", "classifier.6.weight",
             imagenet_stats=True),
    ArchSpec("googlenet", googlenet, (224, 224), "conv1.conv.weight", "fc.weight",
             ignored_prefixes=("aux1.", "aux2."), imagenet_stats=True),
)  # fmt: skip


def architectures() -> Mapping[str, ArchSpec]:
    """Every zoo architecture by name, read-only."""
    return MappingProxyType({spec.name: spec for spec in _SPECS})
