"""One typed experiment config shared by every stage.

A config is a YAML file whose sections map onto the dataclasses below. Loading checks
every key and type and every value range before any heavy work starts; command-line
overrides (``section.key=value``) go through the same checks.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError

DISTILL_MODES = ("none", "kd", "wsld", "bkd", "mixed")
FLOAT_DTYPES = ("float16", "float32")


@dataclass
class DataConfig:
    name: str = "mnist5k"  # mnist5k | digits | cifar10 | cifar100 | imagenet | hdf5 | dvs_hdf5
    # Where the on-disk datasets live (not used by the embedded mnist5k / digits).
    root: str = "data"
    # Fixed, seeded train/test split of the embedded datasets (mnist5k, digits, and hdf5 files
    # without a split); datasets with an official split (CIFAR, ImageNet) use it.
    split_seed: int = 0
    test_size: int = 1000
    # Use only the first `limit` samples of each split (tiny runs, tests); null = all.
    limit: int | None = None
    # imagenet: images are resized (shorter side) and center-cropped to this size on load.
    image_size: int = 224


@dataclass
class AugmentConfig:
    """The augmentation that makes views, shared by extraction and student training."""

    kind: str = "pad_crop_flip"  # none | pad_crop_flip | resized_crop_flip | event_flip_roll
    seed: int = 0  # view parameters are a pure function of (seed, sample index, view index)
    flip: bool = False  # horizontal flip with probability 1/2 (off for digits)
    pad: int = 2  # pad_crop_flip: zero padding, in pixels, before a crop of the original size
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # resized_crop_flip: area range
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # resized_crop_flip: aspect range
    max_roll: int = 4  # event_flip_roll: circular shift range, in pixels
    # Mixup / CutMix alphas (0 = off). Only for distill=none: a mixed image's teacher feature is
    # not the mix of the two images' features, so cached targets cannot follow a mix.
    mixup: float = 0.0
    cutmix: float = 0.0


@dataclass
class TeacherConfig:
    model: str = "resnet18"  # any timm model name
    # Replace the 7x7/2 stem convolution with a 3x3/1 one so 28x28 inputs keep spatial detail.
    small_input_stem: bool = True
    checkpoint: str = "models/teacher.safetensors"
    # Resize inputs to this side length before the teacher (e.g. 224 for a ViT on 32x32 CIFAR);
    # part of the teacher only: the student and the cached views keep the dataset's size.
    input_size: int | None = None
    random_shift: int = 2  # training-time translation, in pixels (the teacher sees clean inputs at extraction)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    device: str = "auto"


@dataclass
class ExtractConfig:
    store: str = "cache/mnist5k-resnet18.zarr"
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    # Store only the k largest logits (and their classes) per view, e.g. 10 of ImageNet's 1000;
    # the logits losses then see the other classes as far below the k-th (README: the approximation).
    logits_topk: int | None = None
    # pre_logits: the pooled penultimate feature (N, C); map: the feature map before pooling
    # (N, C, H, W) -- BKD then regresses maps and its generation block's 3x3 convolutions act spatially.
    features: str = "pre_logits"
    views: int = 1  # K: view 0 is the clean input, views 1..K-1 augmented (train split; test is clean)
    chunk_size: int = 256  # samples per chunk (the unit the reader streams)
    chunks_per_shard: int = 4  # chunks per shard (the unit of work that writes)
    batch_size: int = 256
    feature_dtype: str = "float16"
    logits_dtype: str = "float16"
    zstd_level: int = 3


@dataclass
class BKDConfig:
    blur_ratio: float = 0.15  # lambda: probability of zeroing each channel
    alpha: float = 2e-3
    rescale: bool = True  # rescale teacher features to the student's max ("clip" in the public code)


@dataclass
class LogitsConfig:
    temperature: float = 2.0
    weight: float = 1.0


@dataclass
class StudentConfig:
    model: str = "sew_resnet_mnist"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    timesteps: int = 4
    distill: str = "mixed"
    epochs: int = 8
    batch_size: int = 64
    lr: float = 5e-3
    weight_decay: float = 1e-4
    bkd: BKDConfig = field(default_factory=BKDConfig)
    logits: LogitsConfig = field(default_factory=LogitsConfig)
    shuffle_buffer_chunks: int = 4  # chunks held in memory by the streaming reader
    checkpoint_every: int = 0  # also checkpoint every N steps (0: at epoch ends only); --resume continues there
    # views:  each epoch trains on one cached view per sample (input and targets consistent);
    # online: fresh random augmentation every step against view 0's (clean-input) targets --
    #         the inconsistent baseline, kept for ablations.
    augment: str = "views"
    out_dir: str = "runs/students"
    device: str = "auto"


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    student: StudentConfig = field(default_factory=StudentConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; build nested dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        # YAML reads `1e-3` as a string (YAML 1.1); accept ints and numeric strings.
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in raw.items():
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: Config) -> Config:
    """Range checks that types alone cannot express."""
    import timm

    from pipeline.data import DATASETS  # local imports: these pull in torch
    from pipeline.models import STUDENTS

    _check(timm.is_model(cfg.teacher.model), f"teacher.model: '{cfg.teacher.model}' is not a timm model name")
    _check(cfg.student.model in STUDENTS,
           f"student.model: unknown student '{cfg.student.model}' (known: {', '.join(sorted(STUDENTS))})")
    _check(cfg.data.name in DATASETS, f"data.name: unknown dataset '{cfg.data.name}' (known: {', '.join(DATASETS)})")
    _check(cfg.data.test_size > 0, "data.test_size must be > 0")
    _check(cfg.data.limit is None or cfg.data.limit > 0, "data.limit must be > 0 or null")
    for section in (cfg.teacher, cfg.student):
        name = "teacher" if section is cfg.teacher else "student"
        _check(section.epochs >= 1, f"{name}.epochs must be >= 1, got {section.epochs}")
        _check(section.batch_size >= 1, f"{name}.batch_size must be >= 1, got {section.batch_size}")
        _check(0 < section.lr < math.inf, f"{name}.lr must be finite and > 0, got {section.lr}")
        _check(section.weight_decay >= 0, f"{name}.weight_decay must be >= 0")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", section.device) is not None,
               f"{name}.device must be auto, cpu or cuda[:N], got '{section.device}'")
    _check(cfg.teacher.random_shift >= 0, "teacher.random_shift must be >= 0")
    _check(cfg.teacher.input_size is None or cfg.teacher.input_size >= 1, "teacher.input_size must be >= 1 or null")
    _validate_augment(cfg)
    ex = cfg.extract
    _check(ex.chunk_size >= 1, f"extract.chunk_size must be >= 1, got {ex.chunk_size}")
    _check(ex.chunks_per_shard >= 1, f"extract.chunks_per_shard must be >= 1, got {ex.chunks_per_shard}")
    _check(ex.batch_size >= 1, "extract.batch_size must be >= 1")
    _check(ex.logits_topk is None or ex.logits_topk >= 1, "extract.logits_topk must be >= 1 or null")
    _check(ex.features in ("pre_logits", "map"), f"extract.features must be pre_logits or map, got '{ex.features}'")
    _check(bool(ex.splits), "extract.splits must name at least one split")
    for split in ex.splits:
        _check(split in ("train", "test"), f"extract.splits: unknown split '{split}' (known: train, test)")
    _check(ex.feature_dtype in FLOAT_DTYPES, f"extract.feature_dtype must be one of {FLOAT_DTYPES}")
    _check(ex.logits_dtype in FLOAT_DTYPES, f"extract.logits_dtype must be one of {FLOAT_DTYPES}")
    _check(1 <= ex.zstd_level <= 22, "extract.zstd_level must be in [1, 22]")
    st = cfg.student
    _check(st.timesteps >= 1, f"student.timesteps (T) must be >= 1, got {st.timesteps}")
    _check(st.distill in DISTILL_MODES, f"student.distill: unknown mode '{st.distill}' (known: {', '.join(DISTILL_MODES)})")
    _check(0.0 <= st.bkd.blur_ratio < 1.0, f"student.bkd.blur_ratio (lambda) must be in [0, 1), got {st.bkd.blur_ratio}")
    _check(0 <= st.bkd.alpha < math.inf, f"student.bkd.alpha must be finite and >= 0, got {st.bkd.alpha}")
    _check(0 < st.logits.temperature < math.inf,
           f"student.logits.temperature must be finite and > 0, got {st.logits.temperature}")
    _check(0 <= st.logits.weight < math.inf, f"student.logits.weight must be finite and >= 0, got {st.logits.weight}")
    _check(st.shuffle_buffer_chunks >= 1, "student.shuffle_buffer_chunks must be >= 1")
    _check(st.checkpoint_every >= 0, f"student.checkpoint_every must be >= 0 (0: epoch ends only), got {st.checkpoint_every}")
    return cfg


def _validate_augment(cfg: Config) -> None:
    from pipeline.augment import PARAM_NAMES

    aug, views = cfg.augment, cfg.extract.views
    _check(aug.kind in PARAM_NAMES, f"augment.kind: unknown '{aug.kind}' (known: {', '.join(PARAM_NAMES)})")
    _check(aug.pad >= 0 and aug.max_roll >= 0, "augment.pad and augment.max_roll must be >= 0")
    for name in ("scale", "ratio"):
        low_high = getattr(aug, name)
        _check(len(low_high) == 2 and 0 < low_high[0] <= low_high[1],
               f"augment.{name} must be [low, high] with 0 < low <= high, got {low_high}")
    _check(aug.scale[1] <= 1.0, f"augment.scale must lie in (0, 1], got {aug.scale}")
    _check(views >= 1, f"extract.views (K) must be >= 1, got {views}")
    _check(views == 1 or aug.kind != "none", "extract.views > 1 needs an augmentation (augment.kind is none)")
    _check(cfg.student.augment in ("views", "online"),
           f"student.augment must be 'views' or 'online', got '{cfg.student.augment}'")
    _check(aug.mixup >= 0 and aug.cutmix >= 0, "augment.mixup and augment.cutmix must be >= 0")
    if (aug.mixup > 0 or aug.cutmix > 0) and cfg.student.distill != "none":
        raise ConfigError(
            f"augment.mixup/cutmix cannot be used with student.distill={cfg.student.distill}: the cached teacher "
            "targets belong to unmixed inputs, and a mixed image's teacher feature is not the mix of the features")


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override to a raw config mapping (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like section.key=value")
    dotted, text = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{assignment}': '{key}' is not a section")
    node[keys[-1]] = _parse_scalar(text)


def load_config(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> Config:
    """Read a YAML config (or the built-in defaults when `path` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate(_build(Config, raw, ""))


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
