"""Spikingformer-CML, the transformer student of the BKDSNN paper rows, from spikingjelly's
multi-step layers and neurons.

The architecture follows the official `Spikingformer-CML/{cifar10,cifar100,imagenet}/model.py`
(facts only; the implementation is ours):

* Every neuron is `pipeline.student.neurons.spikingformer_lif` (LIF, tau 2, detached hard reset, sigmoid
  surrogate); the attention LIF fires at 0.5.
* Tokenizer (the CML stem): five 3x3 conv-BN stages of widths D/8, D/4, D/2, D, D. The first one
  reads the analog image; each later one is LIF -> conv -> BN. A downsampling stage ends in
  MaxPool(3, stride 2, pad 1) *after* its BN, i.e. conv-BN-MaxPool before the next LIF (CML). With
  patch size 2^k the last k of the first four stages pool: CIFAR (patch 4, 32x32 -> 8x8) pools in
  stages 2 and 3, ImageNet (patch 16, 224 -> 14x14) in stages 0-3. The stem output is the BN's
  real-valued output.
* Blocks are pre-activation: x = x + SSA(x); x = x + MLP(x). Each branch starts with its own LIF,
  so the residual stream stays real-valued and only what enters a convolution is spikes.
  - SSA: LIF; q, k, v = LIF(BN(conv1x1(.))) each (no conv bias); per head (q k^T) v * 0.125
    (the official fixed scale, whatever the head width), then the attention LIF (threshold 0.5),
    then conv1x1 (with bias) -> BN.
  - MLP: LIF -> conv1x1 (bias) -> BN to D*mlp_ratio, LIF -> conv1x1 (bias) -> BN back to D.
* Head: the last block's output averaged over tokens and timesteps, then a linear classifier
  (weights trunc-normal std 0.02, bias 0).

Departures from the official code, none of which changes what the network computes:
* The official blocks construct two LayerNorms (`norm1`, `norm2`) and a DropPath that `forward`
  never uses; they are left out, so the parameter count is 4*D*depth lower than the official
  model's count, and no dead parameters sit in the optimizer. Published sizes (ours / official):
  4-384 on 32x32, 10 classes: 9,320,122 / 9,326,266; 100 classes: 9,354,772 / 9,360,916;
  8-768 on 224x224, 1000 classes: 66,338,632 / 66,363,208 (the papers quote 9.32M and 66.34M).
* The ImageNet file computes q (k^T v), the CIFAR ones (q k^T) v; both are the same product.
* q/k/v/proj are 1x1 Conv2d / BatchNorm2d on the [T, B, D, H, W] map where the official code uses
  Conv1d / BatchNorm1d on the flattened tokens: the same weights (shaped [D, D, 1, 1] instead of
  [D, D, 1]) and the same batch statistics, and the activity probe of pipeline.student.evaluate, which
  counts Conv2d and Linear operations, sees them. The token products q k^T v have no module, so the
  probe does not count them.
"""

from __future__ import annotations

import math

import torch
from spikingjelly.activation_based import functional, layer
from torch import nn

from pipeline.errors import ConfigError, clip
from pipeline.student.base import SpikingStudent, encode
from pipeline.student.neurons import spikingformer_lif

ATTENTION_SCALE = 0.125  # the official constant, independent of the head width
ATTENTION_THRESHOLD = 0.5
STEM_STAGES = 5  # conv stages of the tokenizer; all but the last may pool


class SpikingSelfAttention(nn.Module):
    """[T, B, D, H, W] real-valued stream -> [T, B, D, H, W] branch output (BN of the projection).

    Submodules: `pre_lif`, `q`, `k`, `v` (each 1x1 conv-BN-LIF), `attn_lif` (threshold 0.5),
    `proj` (1x1 conv-BN)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.scale = num_heads, ATTENTION_SCALE
        self.pre_lif = spikingformer_lif()
        for name in ("q", "k", "v"):
            setattr(self, name, nn.Sequential(
                layer.Conv2d(dim, dim, kernel_size=1, bias=False, step_mode="m"),
                layer.BatchNorm2d(dim, step_mode="m"),
                spikingformer_lif(),
            ))
        self.attn_lif = spikingformer_lif(v_threshold=ATTENTION_THRESHOLD)
        self.proj = nn.Sequential(
            layer.Conv2d(dim, dim, kernel_size=1, step_mode="m"),
            layer.BatchNorm2d(dim, step_mode="m"),
        )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[T, B, D, N] -> [T, B, heads, N, D / heads]."""
        T, B, D, N = x.shape
        return x.reshape(T, B, self.num_heads, D // self.num_heads, N).transpose(-1, -2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, D, H, W = x.shape
        spikes = self.pre_lif(x)
        q, k, v = (self._heads(branch(spikes).flatten(3)) for branch in (self.q, self.k, self.v))
        out = (q @ k.transpose(-1, -2)) @ v * self.scale  # [T, B, heads, N, d]
        out = out.transpose(-1, -2).reshape(T, B, D, H * W)
        return self.proj(self.attn_lif(out).reshape(T, B, D, H, W))


class SpikingMLP(nn.Module):
    """Two LIF -> conv1x1 -> BN units: D -> hidden -> D, on [T, B, D, H, W]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Sequential(spikingformer_lif(), layer.Conv2d(dim, hidden, kernel_size=1, step_mode="m"),
                                 layer.BatchNorm2d(hidden, step_mode="m"))
        self.fc2 = nn.Sequential(spikingformer_lif(), layer.Conv2d(hidden, dim, kernel_size=1, step_mode="m"),
                                 layer.BatchNorm2d(dim, step_mode="m"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


class SpikingTransformerBlock(nn.Module):
    """Pre-activation block: the residual stream is real-valued, each branch spikes inside."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.attn = SpikingSelfAttention(dim, num_heads)
        self.mlp = SpikingMLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


def spiking_tokenizer(in_chans: int, dim: int, pools: int) -> nn.Sequential:
    """The CML stem: stage i is [LIF (i > 0)] -> conv3x3 -> BN -> [MaxPool if i >= 4 - pools]."""
    widths = [dim // 8, dim // 4, dim // 2, dim, dim]
    stages, cin = [], in_chans
    for i, width in enumerate(widths):
        parts = [spikingformer_lif()] if i > 0 else []
        parts += [layer.Conv2d(cin, width, kernel_size=3, padding=1, bias=False, step_mode="m"),
                  layer.BatchNorm2d(width, step_mode="m")]
        if i < STEM_STAGES - 1 and i >= STEM_STAGES - 1 - pools:
            parts.append(layer.MaxPool2d(kernel_size=3, stride=2, padding=1, step_mode="m"))
        stages.append(nn.Sequential(*parts))
        cin = width
    return nn.Sequential(*stages)


class SpikingformerCML(SpikingStudent):
    """Spikingformer-CML behind timm's interface (see the module docstring).

    Modules: `patch_embed.{0..4}` (stem stages), `blocks.{0..depth-1}`, `fc`. Every stem stage and
    every block outputs [T, B, C, H, W]; `blocks.{depth-1}` is the map BKD distills
    (forward_feature_map is its output averaged over T).
    """

    def __init__(self, num_classes: int, in_chans: int, img_size: tuple[int, int], timesteps: int,
                 depths: int = 4, embed_dims: int = 384, num_heads: int = 12, mlp_ratio: float = 4.0,
                 patch_size: int | None = None):
        super().__init__()
        for key, value in (("depths", depths), ("embed_dims", embed_dims), ("num_heads", num_heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"student.model_kwargs: {key} must be an integer >= 1, got {clip(repr(value), 80)}")
        if embed_dims % 8:
            raise ConfigError(f"student.model_kwargs: embed_dims must be a multiple of 8 (the stem starts at "
                              f"embed_dims / 8), got {embed_dims}")
        if embed_dims % num_heads:
            raise ConfigError(f"student.model_kwargs: embed_dims {embed_dims} is not divisible by num_heads "
                              f"{num_heads}")
        if patch_size is None:
            patch_size = default_patch_size(img_size)
        if patch_size not in (1, 2, 4, 8, 16):
            raise ConfigError(f"student.model_kwargs: patch_size must be 1, 2, 4, 8 or 16 (the stem pools at most "
                              f"four times), got {clip(repr(patch_size), 80)}")
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ConfigError(f"student.model_kwargs: patch_size {patch_size} does not divide the input size "
                              f"{img_size[0]}x{img_size[1]}")
        self.timesteps, self.patch_size = timesteps, patch_size
        self.num_features = embed_dims
        self.patch_embed = spiking_tokenizer(in_chans, embed_dims, int(math.log2(patch_size)))
        self.blocks = nn.Sequential(*[SpikingTransformerBlock(embed_dims, num_heads, mlp_ratio)
                                      for _ in range(depths)])
        self.fc = nn.Linear(embed_dims, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)
        functional.set_step_mode(self, "m")

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(f"blocks.{i}" for i in range(len(self.blocks)))

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D, H / patch, W / patch]: the last block's real-valued output averaged over T."""
        functional.reset_net(self)
        return self.blocks(self.patch_embed(encode(x, self.timesteps))).mean(0)


def default_patch_size(img_size: tuple[int, int]) -> int:
    """The official stems: patch 4 for CIFAR-sized inputs (up to 64 px), 16 for ImageNet-sized ones."""
    return 4 if max(img_size) <= 64 else 16

