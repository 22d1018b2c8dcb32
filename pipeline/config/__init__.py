"""One typed experiment config shared by every stage.

A config is a YAML file whose sections map onto the dataclasses of `sections`. Loading checks every key
and type (`coerce`), then every value range (each section's `check`) and the rules across sections
(`rules`) before any heavy work starts; command-line overrides (``section.key=value``, `load`) go
through the same checks. `choices` holds the fields that take one of a few names; `yamlio` reads and
writes the YAML. Imports no torch, model or dataset code: names of datasets and models are checked by
pipeline.registry.
"""

from __future__ import annotations

from pipeline.config.choices import (CHANNELS_LAST, FLOAT_DTYPES, INTERPOLATIONS, MAX_ALIAS_VALUES, MAX_CONFIG_BYTES,
                                     MAX_TEACHER_INPUT_SIZE, NEURON_BACKENDS, OPTIMIZERS, PRECISIONS, SCHEDULE_PER,
                                     SNN_TEACHER_PREFIX, STORE_CODECS, ChannelsLast, DistillMode, ErasingMode, FloatDtype, Former,
                                     Interpolation, NeuronBackend, Optimizer, Precision, SchedulePer, Split,
                                     StoreCodec, StudentAugment, StudentTargets)
from pipeline.config.load import apply_override, format_override, load_config
from pipeline.config.rules import validate
from pipeline.config.sections import (AugmentConfig, BKDConfig, Config, DataConfig, ExtractConfig, LoaderConfig,
                                      LogitsConfig, ScheduleConfig, StudentConfig, TeacherConfig)
from pipeline.config.yamlio import YAMLRefused, dump_config, flatten
from pipeline.modes import DISTILL_MODES, MODES

__all__ = ["CHANNELS_LAST", "DISTILL_MODES", "FLOAT_DTYPES", "INTERPOLATIONS", "MAX_ALIAS_VALUES", "MAX_CONFIG_BYTES",
           "MAX_TEACHER_INPUT_SIZE", "MODES", "NEURON_BACKENDS", "OPTIMIZERS", "PRECISIONS", "SCHEDULE_PER",
           "SNN_TEACHER_PREFIX", "STORE_CODECS", "AugmentConfig", "BKDConfig", "ChannelsLast", "Config", "DataConfig", "DistillMode",
           "ErasingMode", "ExtractConfig", "FloatDtype", "Former", "Interpolation", "LoaderConfig", "LogitsConfig",
           "NeuronBackend", "Optimizer", "Precision", "ScheduleConfig", "SchedulePer", "Split", "StoreCodec", "StudentAugment",
           "StudentConfig", "StudentTargets", "TeacherConfig", "YAMLRefused", "apply_override", "dump_config",
           "flatten", "format_override", "load_config", "validate"]
