"""The fields that take one of a few names, as `Literal` types, and the limits the checks share.

Loading refuses any other name, naming the field and the choices (pipeline.config.coerce); the tuples
are the same choices for code that checks values of its own.
"""

from __future__ import annotations

import typing
from typing import Annotated, Literal

from pipeline.modes import DISTILL_MODES


class Former(dict):
    """`Annotated` metadata of a choices field: names it no longer takes, each with why (added to the refusal)."""


DistillMode = Literal[DISTILL_MODES]  # pipeline.modes.MODES
FloatDtype = Literal["float16", "float32"]
# How the store keeps a float target array (pipeline.targets.codecs: one codec per name)
StoreCodec = Literal["float32", "float16", "float16-shuffle", "float16-bitshuffle", "bfloat16", "uint8", "uint7",
                     "uint6", "uint5", "uint4", "int8", "float8"]
Interpolation = Literal["bilinear", "bicubic"]
Optimizer = Literal["adamw", "sgd"]  # sgd: classical momentum, no Nesterov
SchedulePer = Literal["step", "epoch"]
ErasingMode = Literal["const", "rand", "pixel"]  # timm's remode
StudentAugment = Literal["views", "online"]
StudentTargets = Literal["cache", "online"]
Split = Literal["train", "test"]
# Fast math (pipeline.precision): autocast dtypes, channels_last and spikingjelly 2.0's multi-step
# neuron implementations. "auto" resolves from the device the stage actually runs on.
Precision = Literal["auto", "float32", "bfloat16", "float16"]
ChannelsLast = Literal["auto", "on", "off"]
NeuronBackend = Annotated[Literal["auto", "torch", "cuda", "triton"], Former(
    cupy="cupy was spikingjelly 0.0.0.0.x's backend; spikingjelly 2.0 has cuda and triton")]

FLOAT_DTYPES = typing.get_args(FloatDtype)
STORE_CODECS = typing.get_args(StoreCodec)
INTERPOLATIONS = typing.get_args(Interpolation)
OPTIMIZERS = typing.get_args(Optimizer)
SCHEDULE_PER = typing.get_args(SchedulePer)
PRECISIONS = typing.get_args(Precision)
CHANNELS_LAST = typing.get_args(ChannelsLast)
NEURON_BACKENDS = typing.get_args(typing.get_args(NeuronBackend)[0])
MAX_CONFIG_BYTES = 1 << 20  # a config is a few kB; anything near this is not one
MAX_ALIAS_VALUES = 10_000  # values that YAML aliases may add to a document (see _ConfigLoader)
MAX_TEACHER_INPUT_SIZE = 4096
SNN_TEACHER_PREFIX = "bkd:"  # teacher.model "bkd:<student>": a trained bkd SNN as teacher
