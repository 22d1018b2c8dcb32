"""Feature locations: the named places of a model whose outputs distillation reads.

A location is a module name of the model (`layer4`, `blocks.3`, as `named_modules()` spells it)
or one of the two special names every model has:

  pre_logits  the pooled vector the classifier reads (timm's `forward_head(pre_logits=True)`;
              a student's time-averaged, spatially averaged last map)
  map         the last feature map before pooling (timm's `forward_features`; a student's
              `forward_feature_map`)

`capture` records the outputs of named modules during one ordinary forward pass through
forward hooks, so asking for a stage costs no second pass and changes nothing the model computes.
Multi-step spiking modules emit [T, B, ...]; their captures are averaged over T, so every
location reads as [B, C] or [B, C, H, W], whatever model it comes from.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from pipeline.errors import ConfigError, clip

SPECIAL = ("pre_logits", "map")


def module_names(model: nn.Module) -> list[str]:
    """The names `capture` accepts besides the special ones (containers included)."""
    return [name for name, _ in model.named_modules() if name]


def check_locations(model: nn.Module, locations, where: str) -> None:
    """One line naming the first location `model` does not have, with what it has."""
    names = set(module_names(model))
    for loc in locations:
        if loc not in SPECIAL and loc not in names:
            top = [n for n, _ in model.named_children()]
            raise ConfigError(f"{where}: '{clip(str(loc), 80)}' is neither pre_logits, map nor a module of "
                              f"{type(model).__name__} (its top-level modules: {clip(', '.join(top), 200)})")


@contextlib.contextmanager
def capture(model: nn.Module, names, time_major: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward of `model` stores the output of each module in `names`
    (special names are skipped: the caller computes those) into the yielded dict, as it left the
    module (later in-place operations do not reach it); with `time_major` the outputs are
    [T, B, ...] and stored averaged over T."""
    got: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        if name in SPECIAL:
            continue
        if name not in modules:
            check_locations(model, [name], "feature location")

        def hook(_module, _inputs, output, name=name):
            if isinstance(output, (tuple, list)):
                output = output[0]
            # a copy: the next module may work in place on this very tensor (timm's bn1 -> ReLU(inplace))
            got[name] = output.mean(0) if time_major else output.clone()

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield got
    finally:
        for handle in handles:
            handle.remove()


def spiking_outputs(model: nn.Module, images: torch.Tensor, names) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({name: output averaged over T, "map": the time-averaged last map, "pre_logits": its spatial
    mean}, logits) from one forward of a bkd spiking model (`forward_feature_map`, `forward_head`)."""
    with capture(model, names, time_major=True) as got:
        feature_map = model.forward_feature_map(images)
    pooled = feature_map.mean((2, 3))
    got.update({"map": feature_map, "pre_logits": pooled})
    return got, model.forward_head(pooled)
