"""ANN teachers built with timm."""

from __future__ import annotations

import timm
import torch
from torch import nn

from pipeline.config import TeacherConfig
from pipeline.errors import BkdError, ConfigError


def create_teacher(cfg: TeacherConfig, num_classes: int, in_chans: int) -> nn.Module:
    """`timm.create_model(cfg.model)` for `in_chans`-channel inputs and `num_classes` classes."""
    if not timm.is_model(cfg.model):
        raise ConfigError(f"teacher.model: '{cfg.model}' is not a timm model name")
    model = timm.create_model(cfg.model, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    if cfg.small_input_stem:
        stem = getattr(model, "conv1", None)
        if not isinstance(stem, nn.Conv2d):
            raise ConfigError(f"teacher.small_input_stem is supported for timm ResNets only, not '{cfg.model}'")
        # A 3x3 stride-1 stem keeps 28x28 digits at 14x14 after the max-pool instead of 7x7.
        model.conv1 = nn.Conv2d(in_chans, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    _adapt_inputs(model, cfg.input_size)
    return model


def load_teacher(cfg: TeacherConfig, num_classes: int, in_chans: int, weights: str | None = None) -> nn.Module:
    """The timm teacher with `weights` (default: cfg.checkpoint) loaded and checked, in eval mode."""
    from pipeline import checkpoint

    weights = weights or cfg.checkpoint
    model = create_teacher(cfg, num_classes, in_chans)
    state = checkpoint.load_weights(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        raise BkdError(f"{weights} does not fit teacher.model '{cfg.model}': {lines[1] if len(lines) > 1 else exc}") \
            from None
    bad = next((name for name, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all()), None)
    if bad is not None:
        raise BkdError(f"{weights}: tensor '{bad}' holds NaN or infinite values; these teacher weights are broken")
    return model.eval()


def _adapt_inputs(model: nn.Module, size: int | None) -> None:
    """Make `model` take the student's inputs: event frames [B, T, C, H, W] are averaged over
    T, and with `size`, images are resized to size x size (bilinear), before `forward_features`.

    Set on the instance, so `forward`, `forward_features` and the state dict (no new keys: a
    user's timm weights still load) all see it; callers keep feeding dataset-shaped inputs.
    """
    forward_features = model.forward_features

    def adapted_forward_features(x: torch.Tensor, **kwargs) -> torch.Tensor:
        if x.dim() == 5:
            x = x.mean(1)
        if size is not None and x.shape[-2:] != (size, size):
            x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return forward_features(x, **kwargs)

    model.forward_features = adapted_forward_features


@torch.no_grad()
def teacher_outputs(model: nn.Module, images: torch.Tensor, locations=("pre_logits",)
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({location: features}, logits) from one forward: pre_logits (`forward_head(pre_logits=True)`),
    map (what `forward_features` returns) or any module name, captured on the way."""
    from pipeline.models.stages import capture

    with capture(model, locations) as got:
        feature_map = model.forward_features(images)
    logits = model.forward_head(feature_map)
    got["map"] = feature_map
    if "pre_logits" in locations:
        got["pre_logits"] = model.forward_head(feature_map, pre_logits=True)
    for loc in locations:
        if got[loc].dim() not in (2, 4):
            raise ConfigError(f"extract.features: the teacher's '{loc}' gives features shaped "
                              f"{tuple(got[loc].shape[1:])} per sample; a location must give (C,) or (C, H, W)")
    return {loc: got[loc] for loc in locations}, logits
