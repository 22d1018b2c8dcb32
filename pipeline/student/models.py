"""Spiking students built from spikingjelly's layers, neurons and SEW blocks.

Registered: sew_resnet_mnist, sew_resnet_cifar (small-image SEW-ResNets), sew_resnet18/34/50
(SEW-ResNet ImageNet rows, IF neurons), sew_resnet_dvs (the CIFAR10-DVS row), spikingformer_cml
(the Spikingformer-CML rows, pipeline.student.spikingformer) and spikformer (spikingjelly's
Spikformer, not a paper row). Each builder's docstring names its stage modules (`stage_names`).

Inputs use direct encoding: the analog image is fed at every one of the T timesteps; event
frames [B, T, C, H, W] feed one frame per timestep.
"""

from __future__ import annotations

from typing import Callable

import torch
from spikingjelly.activation_based import functional, layer
from spikingjelly.activation_based.model.sew_resnet import BasicBlock, sew_function
from torch import nn

from pipeline.errors import ConfigError, clip
from pipeline.student.base import STUDENTS, SpikingStudent, create_student, encode, register_student
from pipeline.student.neurons import lif, neuron_factory
from pipeline.student.spikingformer import SpikingformerCML

__all__ = ["STUDENTS", "create_student", "register_student", "SpikingStudent", "encode"]

SEW_CONNECTIONS = ("ADD", "AND", "IAND")  # spikingjelly's sew_function; others fail in forward


class SEWResNet(SpikingStudent):
    """A SEW-ResNet for small images: 3x3 stem, one stage per width, SEW ADD shortcuts.

    forward_features: [B, C, H, W] -> [B, num_features], the pooled spike features of the
    last stage averaged over the T timesteps (the feature BKD distills);
    forward_feature_map: the same before pooling, [B, num_features, H', W'] (BKD on maps).
    Stages: `stages.{i}` for the last block i of each width (mnist: stages.0/1/2; cifar:
    stages.1/3/5/7), each [T, B, width, H', W'].
    """

    def __init__(self, num_classes: int, in_chans: int, timesteps: int,
                 widths=(32, 64, 128), blocks=(1, 1, 1), cnf: str = "ADD"):
        super().__init__()
        for key, values in (("widths", widths), ("blocks", blocks)):
            if (not isinstance(values, (list, tuple)) or not values
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)):
                raise ConfigError(f"student.model_kwargs: {key} must be a non-empty list of integers >= 1, "
                                  f"got {clip(repr(values), 80)}")
        if len(widths) != len(blocks):
            raise ConfigError("student.model_kwargs: widths and blocks must have the same length")
        if cnf not in SEW_CONNECTIONS:
            raise ConfigError(f"student.model_kwargs: cnf must be one of {', '.join(SEW_CONNECTIONS)}, "
                              f"got {clip(repr(cnf), 80)}")
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
        ends = [sum(blocks[:i + 1]) - 1 for i in range(len(blocks))]
        self.stage_names = tuple(f"stages.{i}" for i in ends)
        self.num_features = inplanes
        self.fc = nn.Linear(inplanes, num_classes)
        functional.set_step_mode(self, "m")

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W]: the last stage's spike maps averaged over the T timesteps."""
        functional.reset_net(self)  # membrane potentials start at rest for every batch
        return self.stages(self.stem(encode(x, self.timesteps))).mean(0)


@register_student
def sew_resnet_mnist(num_classes: int, input_shape, timesteps: int, **kwargs) -> SEWResNet:
    """A student for 28x28 digits: one SEW block per stage, widths from model_kwargs (params.yaml: 8/16/32)."""
    return SEWResNet(num_classes, input_shape[-3], timesteps, **kwargs)


@register_student
def sew_resnet_cifar(num_classes: int, input_shape, timesteps: int, **kwargs) -> SEWResNet:
    """A CIFAR-style SEW-ResNet-18: 3x3 stem, no max-pool, widths 64-512, two SEW blocks per stage."""
    kwargs = {"widths": (64, 128, 256, 512), "blocks": (2, 2, 2, 2), **kwargs}
    return SEWResNet(num_classes, input_shape[-3], timesteps, **kwargs)


class TimeAveragedStudent(SpikingStudent):
    """A spikingjelly multi-step backbone behind timm's interface.

    `backbone_map` maps [T, B, C, H, W] inputs to the last feature maps [T, B, D, H', W'];
    forward_feature_map averages them over T, forward_features also over space (the pooled
    feature BKD distills), forward_head is a linear classifier.
    """

    def __init__(self, backbone: nn.Module, backbone_map: Callable, num_features: int, num_classes: int,
                 timesteps: int, stage_names: tuple[str, ...] = ()):
        super().__init__()
        self.backbone, self._backbone_map = backbone, backbone_map
        self.timesteps, self.num_features = timesteps, num_features
        self.stage_names = tuple(stage_names)
        self.fc = nn.Linear(num_features, num_classes)
        functional.set_step_mode(self.backbone, "m")

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self)
        return self._backbone_map(self.backbone, encode(x, self.timesteps)).mean(0)


def _check_cnf(cnf) -> None:
    if cnf not in SEW_CONNECTIONS:
        raise ConfigError(f"student.model_kwargs: cnf must be one of {', '.join(SEW_CONNECTIONS)}, "
                          f"got {clip(repr(cnf), 80)}")


def _sew_map(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """spikingjelly's SEWResNet._forward_impl up to (not including) its average pool."""
    x = m.maxpool(m.sn1(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))


SEW_IMAGENET_DOC = """spikingjelly's SEW-ResNet-{depth} (ImageNet stem: 7x7/2 conv-BN, neuron, 3x3/2 max-pool).

    kwargs: `cnf` ("ADD", the published rows; "AND", "IAND"), `neuron` ("if", the default, as the
    official ImageNet code: IF, detached reset, ATan surrogate, see pipeline.student.neurons; "lif": LIF
    tau 2 with the ATan surrogate; "plif").
    Stages: `backbone.layer1` .. `backbone.layer4`, each the output of its last SEW block,
    [T, B, C, H, W] with C = {widths} and H = input/4, /8, /16, /32 (224 -> 56, 28, 14, 7); the
    official `--indices k` exports layer k+1 (the BKD rows use layer4, the map distilled).

    Checked against the official `Spike-Element-Wise-ResNet/imagenet/sew_resnet.py`: the same
    torchvision layout (blocks [2,2,2,2] / [3,4,6,3] basic / [3,4,6,3] bottleneck), the neuron after
    every conv-BN and after the downsample conv-BN, the SEW connection after the last neuron of the
    block, Kaiming fan-out init, no zero-init of the residual BN (the official scripts do not set
    it), and the classifier on the average pool averaged over T. Differences: the official model
    runs the stem conv-BN once on the image and repeats its output T times, here conv-BN runs on the
    T copies (the same outputs; BN's running variance sees T*B instead of B samples, so its
    unbiased correction differs negligibly); the downsample neuron is named
    `downsample_sn` (official: `downsample.1`); spikingjelly's bottleneck puts the IAND/AND
    operands the other way round than the official block (irrelevant for ADD); the stem conv is
    rebuilt when the input does not have 3 channels (the official model takes RGB only).
    """


def _sew_imagenet(depth: int):
    def build(num_classes: int, input_shape, timesteps: int, cnf: str = "ADD", neuron: str = "if"
              ) -> TimeAveragedStudent:
        from spikingjelly.activation_based.model import sew_resnet

        _check_cnf(cnf)
        backbone = getattr(sew_resnet, f"sew_resnet{depth}")(cnf=cnf, spiking_neuron=neuron_factory(neuron))
        if input_shape[-3] != 3:
            backbone.conv1 = layer.Conv2d(input_shape[-3], 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        width = backbone.fc.in_features
        backbone.fc = nn.Identity()  # the wrapper's own head replaces it
        stages = tuple(f"backbone.layer{i}" for i in range(1, 5))
        return TimeAveragedStudent(backbone, _sew_map, width, num_classes, timesteps, stages)

    expansion = 4 if depth >= 50 else 1
    build.__name__ = f"sew_resnet{depth}"
    build.__doc__ = SEW_IMAGENET_DOC.format(depth=depth, widths="/".join(str(w * expansion)
                                                                         for w in (64, 128, 256, 512)))
    return build


for _depth in (18, 34, 50):
    register_student(_sew_imagenet(_depth))


class SEWBlockDVS(nn.Module):
    """Two conv3x3-BN-neuron units, then the SEW connection with the block input."""

    def __init__(self, channels: int, mid_channels: int, cnf: str, spiking_neuron: Callable):
        super().__init__()
        self.cnf = cnf
        self.conv = nn.Sequential(_conv_bn_sn(channels, mid_channels, 3, spiking_neuron),
                                  _conv_bn_sn(mid_channels, channels, 3, spiking_neuron))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sew_function(x, self.conv(x), self.cnf)


def _conv_bn_sn(cin: int, cout: int, kernel: int, spiking_neuron: Callable) -> nn.Sequential:
    return nn.Sequential(layer.Conv2d(cin, cout, kernel_size=kernel, padding=kernel // 2, bias=False),
                         layer.BatchNorm2d(cout), spiking_neuron())


DVS_CHANNELS = (64, 64, 64, 64, 128, 128, 128)


class SEWResNetDVS(SpikingStudent):
    """The CIFAR10-DVS SEW-ResNet of the official `Spike-Element-Wise-ResNet/cifar10dvs/smodels.py`
    (see `sew_resnet_dvs`)."""

    def __init__(self, num_classes: int, in_chans: int, img_size: tuple[int, int], timesteps: int,
                 channels=DVS_CHANNELS, cnf: str = "ADD", neuron: str = "plif"):
        super().__init__()
        if (not isinstance(channels, (list, tuple)) or not channels
                or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels)):
            raise ConfigError(f"student.model_kwargs: channels must be a non-empty list of integers >= 1, "
                              f"got {clip(repr(channels), 80)}")
        _check_cnf(cnf)
        if min(img_size) < 2 ** len(channels):
            raise ConfigError(f"student.model_kwargs: {len(channels)} stages halve the input "
                              f"{len(channels)} times, more than a {img_size[0]}x{img_size[1]} input allows")
        spiking_neuron = neuron_factory(neuron)
        self.timesteps = timesteps
        modules, cin, self._stage_ends = [], in_chans, []
        for width in channels:
            if width != cin:  # the official 'up' unit: conv1x1-BN-neuron
                modules.append(_conv_bn_sn(cin, width, 1, spiking_neuron))
            modules.append(SEWBlockDVS(width, width, cnf, spiking_neuron))
            modules.append(layer.MaxPool2d(2, 2))
            self._stage_ends.append(len(modules) - 1)
            cin = width
        self.conv = nn.Sequential(*modules)
        self.num_features = cin
        self.fc = nn.Linear(cin, num_classes)
        self.stage_names = tuple(f"conv.{i}" for i in self._stage_ends)
        functional.set_step_mode(self, "m")

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H / 2^stages, W / 2^stages] (128x128 frames: [B, 128, 1, 1])."""
        functional.reset_net(self)
        return self.conv(encode(x, self.timesteps)).mean(0)


@register_student
def sew_resnet_dvs(num_classes: int, input_shape, timesteps: int, **kwargs) -> SEWResNetDVS:
    """The official CIFAR10-DVS student: a SEW-ResNet on 2-channel 128x128 event frames.

    Seven stages of widths 64, 64, 64, 64, 128, 128, 128; each is [conv1x1-BN-neuron when the width
    changes] -> SEW block (conv3x3-BN-neuron twice, then cnf with the block input) -> MaxPool 2x2.
    The neuron is the official PLIF (learnable tau from 2, detached reset, ATan surrogate). The
    head is a linear classifier on the last map averaged over T (and over space: 1x1 at 128x128).

    kwargs: `channels` (the stage widths), `cnf` ("ADD"), `neuron` ("plif"; "lif", "if").
    Modules: `conv.{i}` carries the official `ResNetN.conv` index i, so the official `--indices i`
    reads the output of `conv.i` here. With the default widths: conv.0 the 2->64 conv1x1 unit
    (128x128), then per stage SEW block / max-pool: conv.1/2, 3/4, 5/6, 7/8 (64 channels, pooled to
    64, 32, 16, 8), conv.9 the 64->128 conv1x1 unit (8x8, the official default `indices=(9,)`
    with teacher and student width 128), conv.10/11, 12/13, 14/15 (128 channels, pooled to 4, 2, 1).
    `stage_names` lists the seven pools (conv.2, 4, 6, 8, 11, 13, 15), each [T, B, C, H, W].

    Departures: the official classifier is `Linear(C*H*W)` on the flattened map and so accepts only
    128x128 frames; here it reads the spatial mean (identical at 128x128, where the map is 1x1),
    and other input sizes are allowed as long as the seven pools leave at least 1x1. The official
    files loop over `indices` with a trailing Flatten module at conv.16; there is none here.
    """
    return SEWResNetDVS(num_classes, input_shape[-3], tuple(input_shape[-2:]), timesteps, **kwargs)


def _spikformer_map(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """spikingjelly's Spikformer.forward_features before its mean over the token grid."""
    x = m.patch_embed(x)
    for block in m.blocks:
        x = block(x)
    return x


@register_student
def spikformer(num_classes: int, input_shape, timesteps: int, depths: int = 4, embed_dims: int = 384,
               num_heads: int = 12, patch_size: int = 4, mlp_ratio: float = 4.0) -> TimeAveragedStudent:
    """spikingjelly's Spikformer; `depths`-`embed_dims` name the paper's shapes (4-384, 8-768).

    Not the paper's student (that is `spikingformer_cml`): spikingjelly's blocks are Spikformer's.
    Stages: `backbone.blocks.{i}`, each [T, B, embed_dims, H / patch, W / patch].
    """
    from spikingjelly.activation_based.model import spikformer as sj_spikformer

    backbone = sj_spikformer.Spikformer(T=timesteps, in_channels=input_shape[-3], img_size_h=input_shape[-2],
                                        img_size_w=input_shape[-1], patch_size=patch_size, num_classes=num_classes,
                                        embed_dims=embed_dims, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                        depths=depths)
    backbone.head = nn.Identity()
    stages = tuple(f"backbone.blocks.{i}" for i in range(depths))
    return TimeAveragedStudent(backbone, _spikformer_map, embed_dims, num_classes, timesteps, stages)


@register_student
def spikingformer_cml(num_classes: int, input_shape, timesteps: int, depths: int = 4, embed_dims: int = 384,
                      num_heads: int = 12, mlp_ratio: float = 4.0, patch_size: int | None = None):
    """Spikingformer-CML as the official BKDSNN code builds it (pipeline.student.spikingformer).

    kwargs: `depths` (blocks), `embed_dims` (D), `num_heads` (official: 12 on CIFAR-10, 8 on
    CIFAR-100 and ImageNet), `mlp_ratio` (4), `patch_size` (the stem: 4 pools twice, CIFAR
    32 -> 8x8 tokens; 16 pools four times, ImageNet 224 -> 14x14; default 4 for inputs up to 64 px,
    else 16). Paper rows: 4-384 on CIFAR, 8-768 on ImageNet.
    Modules: `patch_embed.{0..4}` (stem stages), `blocks.{0..depths-1}`, `fc`. Stages:
    `blocks.{i}`, each the real-valued residual stream [T, B, D, H / patch, W / patch]; the last,
    `blocks.{depths-1}`, is the map BKD distills (forward_feature_map averages it over T).
    """
    return SpikingformerCML(num_classes, input_shape[-3], tuple(input_shape[-2:]), timesteps, depths=depths,
                            embed_dims=embed_dims, num_heads=num_heads, mlp_ratio=mlp_ratio, patch_size=patch_size)
