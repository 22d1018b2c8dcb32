"""Teachers behind one interface: a timm ANN, or a trained bkd SNN (`teacher.model: bkd:<student>`).

`teacher_outputs(model, images, locations)` returns the teacher's features at named locations
(see `pipeline.locations`) and its logits from one forward pass:

  pre_logits  timm's `forward_head(pre_logits=True)`; an SNN's `forward_features` (the last map
              averaged over T and space)
  map         what timm's `forward_features` returns (must be 4-D); an SNN's `forward_feature_map`
  <module>    the output of any module of the model (`layer3`, `layer4` of a timm ResNet,
              `stages.1` of a SEW-ResNet); an SNN's [T, B, ...] outputs are averaged over T

Every location reads as [B, C] or [B, C, H, W]; anything else (a ViT block's [B, N, C] tokens)
is refused. An SNN teacher is built like a student (`create_student`) with its own
`teacher.timesteps` and `teacher.model_kwargs`, and loads only a bkd student weights file whose
metadata (model, model_kwargs, timesteps, classes) agrees with the config.

Stage one imports nothing of the student side, so a student-side edit never invalidates the
teacher or its cache. The one exception is an SNN teacher: it *is* a student architecture, so
`snn_models()` imports the student models (`SNN_MODELS`) when, and only when, the config names one;
a DVC pipeline with such a teacher lists those files among its teacher stages' deps.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import nn

from pipeline import locations as feature_locations
from pipeline.config import SNN_TEACHER_PREFIX, TeacherConfig
from pipeline.errors import BkdError, ConfigError, clip, short

SNN_MODELS = "pipeline.student.models"  # imported by name: see the module docstring
STUDENT_FORMAT = "bkd-student/1"  # the metadata format of bkd student weights files (pipeline.student.train.student_metadata)


def snn_teacher_student(model_name: str) -> str | None:
    """The registered student name of a `bkd:<student>` teacher.model, else None (a timm teacher)."""
    return model_name[len(SNN_TEACHER_PREFIX):] if model_name.startswith(SNN_TEACHER_PREFIX) else None


def snn_models():
    """The student model registry, for `bkd:<student>` teachers only (see the module docstring)."""
    return importlib.import_module(SNN_MODELS)


def is_snn_teacher(model: nn.Module) -> bool:
    """Whether `model` is a spiking (bkd student-built) teacher rather than a timm ANN. No SNN exists
    unless the student models were imported, so a timm teacher never imports them to answer."""
    base = sys.modules.get("pipeline.student.base")
    return base is not None and isinstance(model, base.SpikingStudent)


def create_teacher(cfg: TeacherConfig, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """The teacher for dataset inputs of `input_shape` ((C, H, W) images or (T, C, H, W) event frames)
    and `num_classes` classes: `timm.create_model(cfg.model)`, or for `bkd:<student>` the registered
    SNN `create_student(student, num_classes, input_shape, cfg.timesteps, **cfg.model_kwargs)`."""
    if isinstance(input_shape, int):
        raise TypeError("create_teacher takes the dataset's input shape, (C, H, W) or (T, C, H, W), "
                        "not a channel count")
    input_shape = tuple(int(n) for n in input_shape)
    if len(input_shape) not in (3, 4):
        raise ValueError(f"input_shape must be (C, H, W) or (T, C, H, W), got {input_shape}")
    student = snn_teacher_student(cfg.model)
    if student is not None:
        return _create_snn_teacher(cfg, student, num_classes, input_shape)
    if not timm.is_model(cfg.model):
        raise ConfigError(f"teacher.model: '{clip(cfg.model)}' is not a timm model name "
                          f"(or {SNN_TEACHER_PREFIX}<student> for an SNN teacher)")
    if cfg.timesteps is not None or cfg.model_kwargs:
        raise ConfigError(f"teacher.timesteps and teacher.model_kwargs are for {SNN_TEACHER_PREFIX}<student> "
                          f"teachers only, not the timm model '{clip(cfg.model)}'")
    in_chans = input_shape[-3]
    model = timm.create_model(cfg.model, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    if cfg.small_input_stem:
        stem = getattr(model, "conv1", None)
        if not isinstance(stem, nn.Conv2d):
            raise ConfigError(f"teacher.small_input_stem is supported for timm ResNets only, not '{cfg.model}'")
        # A 3x3 stride-1 stem keeps 28x28 digits at 14x14 after the max-pool instead of 7x7.
        model.conv1 = nn.Conv2d(in_chans, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    _adapt_inputs(model, cfg.input_size, cfg.interpolation)
    return model


def _create_snn_teacher(cfg: TeacherConfig, student: str, num_classes: int, input_shape: tuple[int, ...]
                        ) -> nn.Module:
    if cfg.timesteps is None or cfg.timesteps < 1:
        raise ConfigError(f"teacher.timesteps must be >= 1 for the SNN teacher '{clip(cfg.model)}', "
                          f"got {cfg.timesteps}")
    if len(input_shape) == 4 and input_shape[0] != cfg.timesteps:
        raise ConfigError(_frames_message(input_shape[0], cfg.timesteps))
    if cfg.input_size is not None:
        raise ConfigError(f"teacher.input_size is for ANN teachers; the SNN teacher '{clip(cfg.model)}' takes "
                          "the student's inputs as they are")
    try:
        return snn_models().create_student(student, num_classes, input_shape, cfg.timesteps, **cfg.model_kwargs)
    except ConfigError as exc:  # create_student speaks of student.*; here those are teacher.* settings
        message = str(exc)
        raise ConfigError("teacher." + message[len("student."):] if message.startswith("student.") else message) \
            from None


def _frames_message(frames: int, timesteps: int) -> str:
    return (f"the inputs have {frames} event frames but teacher.timesteps is {timesteps}: an SNN teacher feeds "
            "one frame per timestep, so teacher.timesteps must equal the frame count")


def load_teacher(cfg: TeacherConfig, num_classes: int, input_shape: Sequence[int], weights: str | None = None
                 ) -> nn.Module:
    """The teacher with `weights` (default: cfg.checkpoint) loaded and checked, in eval mode.

    An SNN teacher's weights must be a bkd student weights file whose metadata agrees with the
    config (model, model_kwargs, timesteps) and the dataset (classes); a mismatch is refused in
    one line naming the field."""
    from pipeline import checkpoint

    weights = weights or cfg.checkpoint
    if snn_teacher_student(cfg.model) is not None:
        _check_snn_weights(cfg, weights, num_classes)
    model = create_teacher(cfg, num_classes, input_shape)
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


def _check_snn_weights(cfg: TeacherConfig, weights: str | Path, num_classes: int) -> None:
    """Refuse, in one line naming the field, a weights file that is not the configured SNN teacher."""
    from pipeline import checkpoint

    path = Path(weights)
    if path.suffix != ".safetensors":
        raise BkdError(f"{path}: the SNN teacher '{clip(cfg.model)}' loads a bkd student weights file "
                       "(.safetensors written by `bkd train-student` or `bkd train-teacher`)")
    meta = checkpoint.read_metadata(path)
    if meta.get("format") != STUDENT_FORMAT:
        raise BkdError(f"{path} is not a bkd student weights file (no '{STUDENT_FORMAT}' metadata), so it cannot be "
                       f"checked as the SNN teacher '{clip(cfg.model)}'")
    expected = {"model": snn_teacher_student(cfg.model), "model_kwargs": json.loads(json.dumps(cfg.model_kwargs)),
                "timesteps": cfg.timesteps, "num_classes": num_classes}
    parse = {"model": str, "model_kwargs": json.loads, "timesteps": int, "num_classes": int}
    for field, want in expected.items():
        try:
            got = parse[field](meta[field])
        except (KeyError, ValueError):
            raise BkdError(f"{path}: damaged bkd student metadata (field '{field}' missing or unreadable)") from None
        if got != want:
            if field == "num_classes":
                raise BkdError(f"{path} was trained for {got} classes, but the dataset has {want}")
            shown = cfg.model if field == "model" else want
            raise BkdError(f"{path} holds {field} {short(got)}, but teacher.{field} is {short(shown)}")


def teacher_metadata(cfg: TeacherConfig, split, epochs: int | None = None, **extra: str) -> dict[str, str]:
    """What a teacher's weights file says about itself. A timm teacher: its model and stem; an SNN
    teacher: the student-style description (`pipeline.student.train.student_metadata`: format, model, model_kwargs,
    T, classes, input shape and transform), so `load_teacher` can check it and `bkd predict` run it."""
    student = snn_teacher_student(cfg.model)
    if student is None:
        return {"model": cfg.model, "small_input_stem": str(cfg.small_input_stem), **extra}
    meta = {"format": STUDENT_FORMAT, "model": student, "model_kwargs": json.dumps(cfg.model_kwargs),
            "timesteps": str(cfg.timesteps), "num_classes": str(split.num_classes),
            "input_shape": json.dumps(list(split.image_shape)), "transform": json.dumps(split.transform),
            "dataset": split.name, "distill": "none", "role": "teacher"}
    if epochs is not None:
        meta["epochs"] = str(epochs)
    return {**meta, **extra}


def _adapt_inputs(model: nn.Module, size: int | None, mode: str = "bilinear") -> None:
    """Make `model` take the student's inputs: event frames [B, T, C, H, W] are averaged over
    T, and with `size`, images are resized to size x size (`mode`: bilinear or bicubic), before
    `forward_features`.

    Set on the instance, so `forward`, `forward_features` and the state dict (no new keys: a
    user's timm weights still load) all see it; callers keep feeding dataset-shaped inputs.
    """
    forward_features = model.forward_features

    def adapted_forward_features(x: torch.Tensor, **kwargs) -> torch.Tensor:
        if x.dim() == 5:
            x = x.mean(1)
        if size is not None and x.shape[-2:] != (size, size):
            x = nn.functional.interpolate(x, size=(size, size), mode=mode, align_corners=False)
        return forward_features(x, **kwargs)

    model.forward_features = adapted_forward_features


def check_teacher_locations(model: nn.Module, locations: Sequence[str], where: str = "teacher location") -> None:
    """Refuse, before any heavy work, location names `model` does not have (one line naming it).
    Shapes are checked by `teacher_outputs` (a module's output shape is only known once it runs)."""
    if isinstance(locations, str):
        raise TypeError("locations must be a sequence of names, not a string")
    if not locations:
        raise ConfigError(f"{where}: no location given (pre_logits, map or a module name)")
    feature_locations.check_locations(model, locations, where)


@torch.no_grad()
def teacher_outputs(model: nn.Module, images: torch.Tensor, locations: Sequence[str] = ("pre_logits",)
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({location: features}, logits) of one forward pass of the teacher over `images`.

    Locations are pre_logits, map or module names (see the module docstring); each feature is
    [B, C] or [B, C, H, W], module outputs of an SNN teacher averaged over its T timesteps."""
    check_teacher_locations(model, locations)
    locations = list(dict.fromkeys(locations))
    modules = [loc for loc in locations if loc not in feature_locations.SPECIAL]
    snn = is_snn_teacher(model)
    if snn and images.dim() == 5 and images.shape[1] != model.timesteps:
        raise ConfigError(_frames_message(images.shape[1], model.timesteps))
    if snn:
        captured, logits = feature_locations.spiking_outputs(model, images, modules)
        feature_map, pooled = captured["map"], captured["pre_logits"]
    else:
        with feature_locations.capture(model, modules) as captured:
            feature_map = model.forward_features(images)
            logits = model.forward_head(feature_map)
        if "pre_logits" in locations:  # outside the capture: head modules keep the logits pass's output
            pooled = model.forward_head(feature_map, pre_logits=True)
    out = {}
    for loc in locations:
        if loc == "pre_logits":
            value = pooled
        elif loc == "map":
            value = feature_map
        elif loc in captured:
            value = captured[loc]
        else:
            raise ConfigError(f"teacher location '{clip(loc)}': the module does not run in "
                              f"{type(model).__name__}'s forward pass")
        if value.dim() not in (2, 4) or value.shape[0] != len(images):
            hint = " (tokens of a transformer block are not a feature map)" if value.dim() == 3 else ""
            raise ConfigError(f"teacher location '{clip(loc)}' of {type(model).__name__} gives features shaped "
                              f"{tuple(value.shape)} for a batch of {len(images)}; a location must give [B, C] or "
                              f"[B, C, H, W]{hint}")
        out[loc] = value
    return out, logits
