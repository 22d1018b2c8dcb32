"""Spiking students built from spikingjelly's layers and SEW blocks.

Inputs use direct encoding: the analog image is fed at every one of the T timesteps.
"""

from __future__ import annotations

from typing import Callable

import torch
from spikingjelly.activation_based import functional, layer
from spikingjelly.activation_based.model.sew_resnet import BasicBlock
from torch import nn

from pipeline.errors import ConfigError, clip
from pipeline.neurons import lif

STUDENTS: dict[str, Callable[..., nn.Module]] = {}
SEW_CONNECTIONS = ("ADD", "AND", "IAND")  # spikingjelly's sew_function; others fail in forward


def register_student(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    STUDENTS[fn.__name__] = fn
    return fn


def create_student(name: str, num_classes: int, input_shape: tuple[int, ...], timesteps: int,
                   **kwargs) -> nn.Module:
    """A registered student for inputs of `input_shape` ((C, H, W) images or (T, C, H, W) frames)."""
    if name not in STUDENTS:
        raise ConfigError(f"student.model: unknown student '{name}' (known: {', '.join(sorted(STUDENTS))})")
    # Only construction is wrapped: whatever fails while building the model comes from
    # student.model_kwargs (unknown names, wrong types, sizes torch refuses) and is bad input.
    try:
        model = STUDENTS[name](num_classes=num_classes, input_shape=tuple(input_shape), timesteps=timesteps,
                               **kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 -- reported as bad input, see above
        raise ConfigError(f"student.model_kwargs: {_first_line(exc)}") from None
    # torch builds zero-width layers without complaint (and fails only in the first forward)
    if any(p.numel() == 0 for p in model.parameters()):
        raise ConfigError(f"student.model_kwargs: {clip(repr(kwargs), 200)} builds a layer with no weights "
                          "(a width or size of 0?)")
    return model


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return clip(lines[0].strip() if lines else type(exc).__name__, 200)


def encode(x: torch.Tensor, timesteps: int) -> torch.Tensor:
    """The student's input as [T, B, C, H, W].

    Images [B, C, H, W] use direct encoding (the same image at every timestep); event frames
    [B, T, C, H, W] feed one frame per timestep, so T must match the frames.
    """
    if x.dim() == 4:
        return x.unsqueeze(0).expand(timesteps, *x.shape)
    if x.dim() == 5:
        if x.shape[1] != timesteps:
            raise ConfigError(f"the input has {x.shape[1]} event frames but student.timesteps is {timesteps}")
        return x.transpose(0, 1)
    raise ValueError(f"expected [B, C, H, W] images or [B, T, C, H, W] frames, got shape {tuple(x.shape)}")


class SpikingStudent(nn.Module):
    """timm's interface over `forward_feature_map` (the time-averaged last feature map):
    forward_features pools it over space (averaging over time and space commute, so this is the
    pooled, time-averaged feature BKD distills), forward_head is the linear classifier `fc`."""

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_feature_map(x).mean((2, 3))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class SEWResNet(SpikingStudent):
    """A SEW-ResNet for small images: 3x3 stem, one stage per width, SEW ADD shortcuts.

    forward_features: [B, C, H, W] -> [B, num_features], the pooled spike features of the
    last stage averaged over the T timesteps (the feature BKD distills);
    forward_feature_map: the same before pooling, [B, num_features, H', W'] (BKD on maps).
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
        self.num_features = inplanes
        self.fc = nn.Linear(inplanes, num_classes)
        functional.set_step_mode(self, "m")

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W]: the last stage's spike maps averaged over the T timesteps."""
        functional.reset_net(self)  # membrane potentials start at rest for every batch
        return self.stages(self.stem(encode(x, self.timesteps))).mean(0)


@register_student
def sew_resnet_mnist(num_classes: int, input_shape, timesteps: int, **kwargs) -> SEWResNet:
    """The default student for 28x28 digits: widths 32/64/128, one SEW block per stage."""
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
                 timesteps: int):
        super().__init__()
        self.backbone, self._backbone_map = backbone, backbone_map
        self.timesteps, self.num_features = timesteps, num_features
        self.fc = nn.Linear(num_features, num_classes)
        functional.set_step_mode(self.backbone, "m")

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        functional.reset_net(self)
        return self._backbone_map(self.backbone, encode(x, self.timesteps)).mean(0)


def _sew_map(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """spikingjelly's SEWResNet._forward_impl up to (not including) its average pool."""
    x = m.maxpool(m.sn1(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))


def _sew_imagenet(depth: int):
    def build(num_classes: int, input_shape, timesteps: int, cnf: str = "ADD") -> TimeAveragedStudent:
        from spikingjelly.activation_based.model import sew_resnet

        backbone = getattr(sew_resnet, f"sew_resnet{depth}")(cnf=cnf, spiking_neuron=lif)
        if input_shape[-3] != 3:
            backbone.conv1 = layer.Conv2d(input_shape[-3], 64, kernel_size=7, stride=2, padding=3, bias=False)
        width = backbone.fc.in_features
        backbone.fc = nn.Identity()  # the wrapper's own head replaces it
        return TimeAveragedStudent(backbone, _sew_map, width, num_classes, timesteps)

    build.__name__ = f"sew_resnet{depth}"
    build.__doc__ = f"spikingjelly's SEW-ResNet-{depth} (ImageNet stem), SEW ADD shortcuts."
    return build


for _depth in (18, 34, 50):
    register_student(_sew_imagenet(_depth))


def _spikformer_map(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """spikingjelly's Spikformer.forward_features before its mean over the token grid."""
    x = m.patch_embed(x)
    for block in m.blocks:
        x = block(x)
    return x


@register_student
def spikformer(num_classes: int, input_shape, timesteps: int, depths: int = 4, embed_dims: int = 384,
               num_heads: int = 12, patch_size: int = 4, mlp_ratio: float = 4.0) -> TimeAveragedStudent:
    """spikingjelly's Spikformer; `depths`-`embed_dims` name the paper's shapes (4-384, 8-768)."""
    from spikingjelly.activation_based.model import spikformer as sj_spikformer

    backbone = sj_spikformer.Spikformer(T=timesteps, in_channels=input_shape[-3], img_size_h=input_shape[-2],
                                        img_size_w=input_shape[-1], patch_size=patch_size, num_classes=num_classes,
                                        embed_dims=embed_dims, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                        depths=depths)
    backbone.head = nn.Identity()
    return TimeAveragedStudent(backbone, _spikformer_map, embed_dims, num_classes, timesteps)
