"""Spiking students built from spikingjelly's layers and SEW blocks.

Inputs use direct encoding: the analog image is fed at every one of the T timesteps.
"""

from __future__ import annotations

from typing import Callable

import torch
from spikingjelly.activation_based import functional, layer
from spikingjelly.activation_based.model.sew_resnet import BasicBlock
from torch import nn

from pipeline.errors import ConfigError
from pipeline.neurons import lif

STUDENTS: dict[str, Callable[..., nn.Module]] = {}


def register_student(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    STUDENTS[fn.__name__] = fn
    return fn


def create_student(name: str, num_classes: int, in_chans: int, timesteps: int, **kwargs) -> nn.Module:
    if name not in STUDENTS:
        raise ConfigError(f"student.model: unknown student '{name}' (known: {', '.join(sorted(STUDENTS))})")
    try:
        return STUDENTS[name](num_classes=num_classes, in_chans=in_chans, timesteps=timesteps, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"student.model_kwargs: {exc}") from None


class SEWResNet(nn.Module):
    """A SEW-ResNet for small images: 3x3 stem, one stage per width, SEW ADD shortcuts.

    forward_features: [B, C, H, W] -> [B, num_features], the pooled spike features of the
    last stage averaged over the T timesteps (the feature BKD distills).
    """

    def __init__(self, num_classes: int, in_chans: int, timesteps: int,
                 widths=(32, 64, 128), blocks=(1, 1, 1), cnf: str = "ADD"):
        super().__init__()
        if len(widths) != len(blocks):
            raise ConfigError("student.model_kwargs: widths and blocks must have the same length")
        self.timesteps = timesteps
        self.stem = nn.Sequential(
            layer.Conv2d(in_chans, widths[0], kernel_size=3, padding=1, bias=False),
            layer.BatchNorm2d(widths[0]),
            lif(),
        )
        stages, inplanes = [], widths[0]
        for i, (width, depth) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            for j in range(depth):
                downsample = None
                if j == 0 and (stride != 1 or inplanes != width):
                    downsample = nn.Sequential(
                        layer.Conv2d(inplanes, width, kernel_size=1, stride=stride, bias=False),
                        layer.BatchNorm2d(width),
                    )
                stages.append(BasicBlock(inplanes, width, stride if j == 0 else 1, downsample,
                                         cnf=cnf, spiking_neuron=lif))
                inplanes = width
        self.stages = nn.Sequential(*stages)
        self.pool = layer.AdaptiveAvgPool2d((1, 1))
        self.num_features = inplanes
        self.fc = nn.Linear(inplanes, num_classes)
        functional.set_step_mode(self, "m")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self)  # membrane potentials start at rest for every batch
        x = x.unsqueeze(0).expand(self.timesteps, *x.shape)  # direct encoding: [T, B, C, H, W]
        x = self.pool(self.stages(self.stem(x)))
        return x.flatten(2).mean(0)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_student
def sew_resnet_mnist(num_classes: int, in_chans: int, timesteps: int, **kwargs) -> SEWResNet:
    """The default student for 28x28 digits: widths 32/64/128, one SEW block per stage."""
    return SEWResNet(num_classes, in_chans, timesteps, **kwargs)
