"""One typed experiment config shared by every stage.

A config is a YAML file whose sections map onto the dataclasses below. Loading checks
every key and type and every value range before any heavy work starts; command-line
overrides (``section.key=value``) go through the same checks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from pipeline.errors import ConfigError
from pipeline.errors import clip as _clip
from pipeline.errors import short as _short
from pipeline.modes import DISTILL_MODES, MODES


class Former(dict):
    """`Annotated` metadata of a choices field: names it no longer takes, each with why (added to the refusal)."""


# The fields that take one of a few names. Loading refuses any other name, naming the field and the
# choices (`_coerce`); the tuples are the same choices for code that checks values of its own.
DistillMode = Literal[DISTILL_MODES]  # pipeline.modes.MODES
FloatDtype = Literal["float16", "float32"]
Interpolation = Literal["bilinear", "bicubic"]
Optimizer = Literal["adamw", "sgd"]  # sgd: classical momentum, no Nesterov
SchedulePer = Literal["step", "epoch"]
ErasingMode = Literal["const", "rand", "pixel"]  # timm's remode
StudentAugment = Literal["views", "online"]
Split = Literal["train", "test"]
# Fast math (pipeline.precision): autocast dtypes, channels_last and spikingjelly 2.0's multi-step
# neuron implementations. "auto" resolves from the device the stage actually runs on.
Precision = Literal["auto", "float32", "bfloat16", "float16"]
ChannelsLast = Literal["auto", "on", "off"]
NeuronBackend = Annotated[Literal["auto", "torch", "cuda", "triton"], Former(
    cupy="cupy was spikingjelly 0.0.0.0.x's backend; spikingjelly 2.0 has cuda and triton")]

FLOAT_DTYPES = typing.get_args(FloatDtype)
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


class YAMLRefused(yaml.YAMLError):
    """Well-formed YAML that a config may not contain; the message is one line, shown as is."""


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and alias bombs.

    Duplicate keys: YAML says a mapping's keys are unique, PyYAML keeps the last silently, so a
    second `lr:` in a section would override the first unnoticed. Checked on the node's own
    pairs, before `<<` merge keys are flattened (a key that overrides a merged one is fine).

    Aliases: a document of nested aliases ("billion laughs") is tiny as text and as composed
    nodes (an alias is the same node again), but everything that walks the loaded value --
    type checks, error messages -- sees its full expansion. Refusing aliases altogether would be
    simplest, but anchors are a legitimate way to share a block between sections, so instead
    every alias is charged the expanded size of the node it repeats (memoized per node, so the
    counting is linear in the document) and the document is refused once the aliases add more
    than MAX_ALIAS_VALUES values. An alias to a node still being composed (a recursive
    document) never expands to a finite config and is refused too.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._alias_values = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None:  # an undefined alias is reported by the composer itself
                line = event.start_mark.line + 1
                if node.end_mark is None:
                    raise YAMLRefused(f"recursive alias *{_clip(event.anchor)} at line {line}")
                self._alias_values += self._size(node)
                if self._alias_values > MAX_ALIAS_VALUES:
                    raise YAMLRefused(f"aliases expand to more than {MAX_ALIAS_VALUES} values "
                                      f"(at *{_clip(event.anchor)}, line {line})")
        return super().compose_node(parent, index)

    def _size(self, node: yaml.Node) -> int:
        """How many values `node` stands for once every alias in it is expanded."""
        size = self._sizes.get(id(node))
        if size is None:
            if isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._size(child) for child in node.value)
            elif isinstance(node, yaml.MappingNode):
                size = 1 + sum(self._size(k) + self._size(v) for k, v in node.value)
            else:
                size = 1
            self._sizes[id(node)] = size
        return size

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise YAMLRefused(f"duplicate key {_short(key)} at line {line} "
                                      f"(first at line {first_line[key]})")
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)


@dataclass
class DataConfig:
    name: str = "mnist5k"  # mnist5k | digits | cifar10 | cifar100 | imagenet | hdf5 | dvs_hdf5
    # Where the on-disk datasets live (not used by the embedded mnist5k / digits).
    root: str = "data"
    # Seeds which rows each split holds and in what order. Datasets without an official split
    # (mnist5k, digits) are one pool split by a seeded permutation; datasets with one (CIFAR,
    # ImageNet, HDF5 files) keep their official split, its rows put in a seeded random order. So a
    # split is never in its file's order -- ImageFolder and many HDF5 files list samples class by
    # class -- and neither is the store, whose rows follow the split: its chunk-local batches are
    # i.i.d. draws, as the published runs' samplers give.
    split_seed: int = 0
    test_size: int = 1000
    # Use only `limit` samples of each split (tiny runs, tests): a seeded subset that keeps every
    # class in proportion to its share of the split (largest remainders); null = all.
    limit: int | None = None
    # imagenet: the input size. Files are decoded, their shorter side resized to `load_size` and
    # centre-cropped square: the pixels views are cut from (a RandomResizedCrop box of the
    # load_size image, resized to image_size). The clean input (view 0, evaluation) is the
    # image_size centre crop of it -- torchvision's Resize(load_size) + CenterCrop(image_size).
    image_size: int = 224
    load_size: int | None = None  # null: image_size (views are cut from the centre crop itself)
    # imagenet: the filter of that resize, antialiased (torchvision's and timm's evaluation default
    # is bilinear; the Spikingformer ImageNet recipe resizes bicubic).
    interpolation: Interpolation = "bilinear"

    def check(self) -> None:
        _check_seed("data.split_seed", self.split_seed)
        _check(self.test_size > 0, "data.test_size must be > 0")
        _check(self.limit is None or self.limit > 0, "data.limit must be > 0 or null")
        _check(self.image_size >= 1, f"data.image_size must be >= 1, got {self.image_size}")
        load = self.load_size
        _check(load is None or self.image_size <= load <= MAX_TEACHER_INPUT_SIZE,
               f"data.load_size must be in [data.image_size={self.image_size}, {MAX_TEACHER_INPUT_SIZE}] or null, "
               f"got {load}")


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
    # timm's recipe on top of the geometric view, every random choice stored with the view:
    randaugment: str = ""  # a timm RandAugment spec, e.g. rand-m9-n1-mstd0.4-inc1 ("" = off)
    erasing: float = 0.0  # timm RandomErasing probability per view (the recipe's reprob)
    erasing_mode: ErasingMode = "const"
    # Mixup / CutMix Beta alphas (0 = off): the last `mix_views` of the K cached views mix each
    # sample with a partner sample (both rebuilt from their pixels; the teacher saw the mixed image),
    # and carry the soft target lam * y + (1 - lam) * y_partner.
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_views: int = 0
    # Training only: from this epoch on, train on the unmixed views (0 = mix until the end), as the
    # recipe's mixup_off_epoch.
    mix_off_epoch: int = 0

    def check(self) -> None:
        _check_seed("augment.seed", self.seed)
        # Upper bounds on pad and max_roll depend on the image size: ViewAugmenter checks them.
        _check(self.pad >= 0, f"augment.pad must be >= 0, got {self.pad}")
        _check(self.max_roll >= 0, f"augment.max_roll must be >= 0, got {self.max_roll}")
        for name in ("scale", "ratio"):
            low_high = getattr(self, name)
            # finite: torchvision's crop sampling takes log(ratio) and loops or crashes on inf
            _check(len(low_high) == 2 and 0 < low_high[0] <= low_high[1] < math.inf,
                   f"augment.{name} must be [low, high] with 0 < low <= high, both finite, got {_short(low_high)}")
        _check(self.scale[1] <= 1.0, f"augment.scale must lie in (0, 1], got {self.scale}")
        _check(self.mixup >= 0 and self.cutmix >= 0, "augment.mixup and augment.cutmix must be >= 0")
        _check(0 <= self.erasing <= 1, f"augment.erasing must be a probability in [0, 1], got {self.erasing}")
        _check(self.mix_off_epoch >= 0, f"augment.mix_off_epoch must be >= 0 (0: never off), got {self.mix_off_epoch}")
        _check(self.mixup > 0 or self.cutmix > 0 or self.mix_views == 0,
               "augment.mix_views > 0 needs augment.mixup or augment.cutmix > 0")

    def augments(self) -> bool:
        """Whether views differ from the clean input: a geometric kind or a recipe step."""
        return self.kind != "none" or bool(self.randaugment) or self.erasing > 0 or self.mixup > 0 or self.cutmix > 0



@dataclass
class TeacherConfig:
    # Any timm model name, or "bkd:<registered student>" (e.g. bkd:sew_resnet18) for a trained
    # bkd SNN teacher (the official DVS runs distil from an SNN of the student's architecture).
    model: str = "resnet18"
    # Replace the 7x7/2 stem convolution with a 3x3/1 one so 28x28 inputs keep spatial detail.
    small_input_stem: bool = True
    checkpoint: str = "models/teacher.safetensors"
    # Resize inputs to this side length before the teacher (e.g. 224 for a ViT on 32x32 CIFAR);
    # part of the teacher only: the student and the cached views keep the dataset's size.
    input_size: int | None = None
    # How images are resized to input_size: the official CIFAR-10 script resizes 32 -> 224
    # bicubic, the CIFAR-100 one bilinear.
    interpolation: Interpolation = "bilinear"
    # bkd:<student> teachers only: the SNN's own T (required) and its constructor arguments; both
    # must match the weights file's metadata (a bkd student weights file).
    timesteps: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    random_shift: int = 2  # training-time translation, in pixels (the teacher sees clean inputs at extraction)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    device: str = "auto"

    def check(self) -> None:
        _check_training(self, "teacher")
        _check_path("teacher.checkpoint", self.checkpoint)
        _check(self.random_shift >= 0, "teacher.random_shift must be >= 0")
        size = self.input_size
        _check(size is None or 1 <= size <= MAX_TEACHER_INPUT_SIZE,
               f"teacher.input_size must be in [1, {MAX_TEACHER_INPUT_SIZE}] or null, got {size}")
        # the fields that depend on whether the teacher is a timm ANN or a bkd SNN
        if self.model.startswith(SNN_TEACHER_PREFIX):
            _check(self.timesteps is not None,
                   f"teacher.timesteps is required for an SNN teacher ({_short(self.model)}): set its own T")
            _check(self.timesteps >= 1, f"teacher.timesteps must be >= 1, got {self.timesteps}")
            _check(self.input_size is None, "teacher.input_size resizes inputs for ANN teachers; an SNN teacher "
                                            f"({_short(self.model)}) takes the student's inputs as they are (set it to null)")
        else:
            _check(self.timesteps is None, f"teacher.timesteps is for bkd:<student> SNN teachers only; "
                                           f"{_short(self.model)} is an ANN (set it to null)")
            _check(not self.model_kwargs, f"teacher.model_kwargs is for bkd:<student> SNN teachers only; "
                                          f"{_short(self.model)} is a timm model (set it to {{}})")


@dataclass
class ExtractConfig:
    store: str = "cache/mnist5k-resnet18.zarr"
    splits: list[Split] = field(default_factory=lambda: ["train", "test"])
    # Store only the k largest logits (and their classes) per view, e.g. 10 of ImageNet's 1000;
    # the logits losses then see the other classes as far below the k-th (README: the approximation).
    logits_topk: int | None = None
    # Teacher feature locations to cache, one array each: pre_logits (the pooled penultimate vector,
    # (N, C)), map (the last map before pooling, (N, C, H, W)) or a module name of the teacher
    # (e.g. layer3, layer4: that stage's output map). Students choose among them (student.features).
    features: list[str] = field(default_factory=lambda: ["pre_logits", "layer1", "layer2"])
    views: int = 1  # K: view 0 is the clean input, views 1..K-1 augmented (train split; test is clean)
    chunk_size: int = 256  # samples per chunk (the unit the reader streams)
    chunks_per_shard: int = 4  # chunks per shard (the unit of work that writes)
    batch_size: int = 256
    feature_dtype: FloatDtype = "float16"
    logits_dtype: FloatDtype = "float16"
    zstd_level: int = 3
    # Also store each split's source pixels (uint8, as decoded: data.load_size for ImageNet) in the
    # store, so student training reads arrays instead of decoding image files every epoch.
    images: bool = False
    # Autocast dtype of the teacher's forward. auto = bfloat16 on
    # a CUDA device that supports it, float32 otherwise (CPU). Targets are stored as above whatever the
    # compute dtype; the resolved value is recorded in the store (teacher.precision), and resuming a
    # store made at another precision is refused.
    precision: Precision = "auto"
    # Teacher weights and images in channels_last memory layout (auto = on for a CUDA
    # device when the teacher has Conv2d layers, off on CPU). YAML reads a bare on / off as true / false;
    # both spellings are taken and stored as "on" / "off".
    channels_last: ChannelsLast | bool = "auto"
    compile: bool = False  # torch.compile the teacher's forward (the first batches pay the compilation)

    def __post_init__(self):
        if isinstance(self.channels_last, bool):  # YAML 1.1: `channels_last: on` is a boolean
            self.channels_last = "on" if self.channels_last else "off"

    def check(self) -> None:
        _check_path("extract.store", self.store)
        _check(self.views >= 1, f"extract.views (K) must be >= 1, got {self.views}")
        _check(self.chunk_size >= 1, f"extract.chunk_size must be >= 1, got {self.chunk_size}")
        _check(self.chunks_per_shard >= 1, f"extract.chunks_per_shard must be >= 1, got {self.chunks_per_shard}")
        _check(self.batch_size >= 1, "extract.batch_size must be >= 1")
        _check(self.logits_topk is None or self.logits_topk >= 1, "extract.logits_topk must be >= 1 or null")
        _check(bool(self.features), "extract.features must name at least one teacher feature location")
        for loc in self.features:
            _check(_location_name(loc), f"extract.features: {_short(loc)} is not a location name "
                   "(pre_logits, map or a module name such as layer4)")
        _check(len(set(self.features)) == len(self.features),
               f"extract.features names a location twice: {_short(self.features)}")
        _check(bool(self.splits), "extract.splits must name at least one split")
        _check(1 <= self.zstd_level <= 22, "extract.zstd_level must be in [1, 22]")


@dataclass
class LoaderConfig:
    """DataLoader worker processes for teacher training, extraction and student training.

    Workers decode images and rebuild views while the model computes. Student training deals whole
    shuffle windows of the store to workers (`ChunkShuffleSampler` lanes), so each worker decodes
    its own chunks once per epoch; with W workers the epoch's sample order interleaves W lanes of
    whole batches (the order then depends on W, like DDP's on its world size: W is part of a student
    run). Teacher training and extraction give the same results with any number of workers.
    """

    workers: int = 0  # 0: load in the training process
    pin_memory: bool | str = "auto"  # auto (on when the device is CUDA) | true | false
    prefetch_factor: int = 2  # batches each worker loads ahead
    persistent_workers: bool = True  # keep workers (and their decoded chunks) between epochs

    def check(self) -> None:
        _check(self.workers >= 0, f"loader.workers must be >= 0, got {self.workers}")
        _check(self.pin_memory in (True, False, "auto"),
               f"loader.pin_memory must be auto, true or false, got {_short(self.pin_memory)}")
        _check(self.prefetch_factor >= 1, f"loader.prefetch_factor must be >= 1, got {self.prefetch_factor}")


@dataclass
class BKDConfig:
    blur_ratio: float = 0.15  # lambda: probability of zeroing each channel
    # Weight of every feature term (BKD, KDSNN, LaSNN), like the official --alpha_mgd.
    alpha: float = 2e-3
    # Rescale teacher features to the aligned student's maximum: the official --use_clip, which no
    # published run sets; off, as published.
    rescale: bool = False

    def check(self) -> None:
        _check(0.0 <= self.blur_ratio < 1.0,
               f"student.bkd.blur_ratio (lambda) must be in [0, 1), got {self.blur_ratio}")
        _check(0 <= self.alpha < math.inf, f"student.bkd.alpha must be finite and >= 0, got {self.alpha}")


@dataclass
class LogitsConfig:
    temperature: float = 2.0
    weight: float = 1.0

    def check(self) -> None:
        _check(0 < self.temperature < math.inf,
               f"student.logits.temperature must be finite and > 0, got {self.temperature}")
        _check(0 <= self.weight < math.inf, f"student.logits.weight must be finite and >= 0, got {self.weight}")


@dataclass
class ScheduleConfig:
    """The learning-rate schedule: cosine from `lr` to `min_lr` over `epochs` (timm's semantics).

    The defaults are bkd's original schedule: per-step cosine from lr to 0 over all steps, no
    warmup, no cooldown. The published Spikingformer recipe is per: epoch, warmup_epochs: 20,
    warmup_lr: 1.0e-5, min_lr: 1.0e-5, cooldown_epochs: 10; SEW-ResNet's is per: epoch alone.
    """

    # step: the lr changes after every optimizer step | epoch: at epoch ends (timm's train script)
    per: SchedulePer = "step"
    # Linear warmup from warmup_lr towards lr over the first warmup_epochs, inside `epochs`: as timm's
    # default (warmup_prefix false) the cosine still starts at epoch 0, the warmup replaces its first
    # epochs and hands over to it at epoch warmup_epochs. warmup_lr is unused without warmup.
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0  # where the cosine ends
    # Epochs at min_lr after the cosine: a run trains epochs + cooldown_epochs epochs.
    cooldown_epochs: int = 0

    def check(self, lr: float, epochs: int, name: str = "student") -> None:
        """The schedule against the optimiser's `lr` and `epochs` of section `name`."""
        _check(0 <= self.min_lr <= lr, f"{name}.schedule.min_lr must be in [0, {name}.lr={lr}], got {self.min_lr}")
        _check(0 <= self.warmup_epochs < epochs,
               f"{name}.schedule.warmup_epochs must be in [0, {name}.epochs={epochs}), got {self.warmup_epochs}")
        _check(self.warmup_epochs == 0 or 0 <= self.warmup_lr <= lr,
               f"{name}.schedule.warmup_lr must be in [0, {name}.lr={lr}], got {self.warmup_lr}")
        _check(self.cooldown_epochs >= 0, f"{name}.schedule.cooldown_epochs must be >= 0, got {self.cooldown_epochs}")


@dataclass
class StudentConfig:
    model: str = "sew_resnet_mnist"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    timesteps: int = 4
    distill: DistillMode = "mixed"
    epochs: int = 8
    batch_size: int = 64
    lr: float = 5e-3
    weight_decay: float = 1e-4
    optimizer: Optimizer = "adamw"
    momentum: float = 0.9  # sgd only
    # Exclude biases and norm weights (every 1-D parameter) from weight decay, as timm does.
    no_decay_bias_norm: bool = False
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # Which student location distils to which cached teacher location (extract.features): one pair
    # for bkd, mixed and kdsnn. Student locations: pre_logits (the pooled, time-averaged last map),
    # map (the time-averaged last map) or a module name (its output averaged over T). The pair's
    # shapes choose the BKD form (pipeline.student.losses.BKDHead): map -> vector: generation on the map,
    # then pooled (Spikingformer-CML); map -> map; vector -> vector.
    features: dict[str, str] = field(default_factory=lambda: {"pre_logits": "pre_logits"})
    # lasnn's layer-wise pairs (one or more, usually intermediate stages), in the same form.
    lasnn_features: dict[str, str] = field(default_factory=lambda: {"stages.1": "layer1", "stages.2": "layer2"})
    bkd: BKDConfig = field(default_factory=BKDConfig)
    logits: LogitsConfig = field(default_factory=LogitsConfig)
    # Label smoothing of the training target (timm's smoothing; CE and WSLD's weight use the soft target).
    label_smoothing: float = 0.0
    shuffle_buffer_chunks: int = 4  # chunks held in memory by the streaming reader
    checkpoint_every: int = 0  # also checkpoint every N steps (0: at epoch ends only); --resume continues there
    # views:  each epoch trains on one cached view per sample (input and targets consistent);
    # online: fresh random augmentation every step against view 0's (clean-input) targets --
    #         the inconsistent baseline, kept for ablations.
    augment: StudentAugment = "views"
    out_dir: str = "runs/students"
    device: str = "auto"
    # Autocast dtype of the student's forward in the training step (and of the per-epoch test accuracy):
    # auto = bfloat16 on a CUDA device that supports it, float32
    # otherwise (CPU). The loss terms, BKD heads included, are computed in float32; float16 trains with a
    # GradScaler (saved in checkpoints). `bkd evaluate` always evaluates in float32.
    precision: Precision = "auto"
    compile: bool = False  # torch.compile the student's forward in the training step (weights keep their names)
    # spikingjelly 2.0's implementation of the multi-step IF/LIF/PLIF neurons on CUDA. auto leaves
    # spikingjelly's own choice (its native CUDA kernels when built, else Triton, else the torch
    # reference); on CPU only the torch reference exists. Forcing one needs student.precision
    # float32 (spikingjelly's fused kernels keep a float32 membrane; under autocast the nodes run the
    # torch reference, which spikingjelly refuses to run when an implementation is forced).
    neuron_backend: NeuronBackend = "auto"

    def train_epochs(self) -> int:
        """Epochs the run trains: the cosine's `epochs`, then the schedule's cooldown at min_lr."""
        return self.epochs + self.schedule.cooldown_epochs

    def feature_pairs(self) -> dict[str, str]:
        """{student location: teacher location} the distillation mode's feature terms use (none: {})."""
        pairs = MODES[self.distill].pairs
        return getattr(self, pairs) if pairs else {}

    def check(self) -> None:
        _check_training(self, "student")
        _check_path("student.out_dir", self.out_dir)
        _check(self.timesteps >= 1, f"student.timesteps (T) must be >= 1, got {self.timesteps}")
        self.bkd.check()
        self.logits.check()
        for key in ("features", "lasnn_features"):
            for student_loc, teacher_loc in getattr(self, key).items():
                _check(_location_name(student_loc) and _location_name(teacher_loc),
                       f"student.{key}: {_short(student_loc)}: {_short(teacher_loc)} must map a student location "
                       "to a teacher location (pre_logits, map or module names)")
        mode = MODES[self.distill]
        if mode.pairs:
            count = len(getattr(self, mode.pairs))
            _check(not mode.layerwise or count >= 1,
                   f"student.distill={self.distill} needs at least one pair in student.{mode.pairs}")
            _check(mode.layerwise or count == 1,
                   f"student.distill={self.distill} distils one feature pair; student.{mode.pairs} has {count}")
        _check(self.shuffle_buffer_chunks >= 1, "student.shuffle_buffer_chunks must be >= 1")
        _check(0 <= self.momentum < 1, f"student.momentum must be in [0, 1), got {self.momentum}")
        self.schedule.check(self.lr, self.epochs)
        _check(self.checkpoint_every >= 0,
               f"student.checkpoint_every must be >= 0 (0: epoch ends only), got {self.checkpoint_every}")
        _check(0 <= self.label_smoothing < 1, f"student.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return "str"
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class _NotAChoice(ConfigError):
    """A string of a choices field that is none of its choices: refused as is, also inside a union."""


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
            except _NotAChoice:
                raise
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_short(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and isinstance(value, str):
            return value
        error = _NotAChoice if isinstance(value, str) else ConfigError
        raise error(f"{where} must be one of {', '.join(choices)}, got {_short(value)}")
    if origin is Annotated:
        base, *metadata = typing.get_args(tp)
        try:
            return _coerce(value, base, where)
        except _NotAChoice as exc:
            why = next((m[value] for m in metadata if isinstance(m, Former) and value in m), None)
            if why is None:
                raise
            raise _NotAChoice(f"{exc} ({why})") from None
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_short(value)}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_short(value)}")
        return dict(value)
    if tp is float:
        # YAML reads `1e-3` as a string (YAML 1.1); accept ints and numeric strings.
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {_short(value)}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {_short(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {_short(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {_short(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {_short(value)}")
    if tp is Any:
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names, key=str)  # YAML keys may be numbers, null, ...
    if unknown:
        prefix = f"{where}." if where else ""
        key = unknown[0] if isinstance(unknown[0], str) else repr(unknown[0])
        # the key clipped shorter than other values: the student section's list of known keys is long
        raise ConfigError(f"unknown config key '{prefix}{_clip(key, 60)}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in raw.items():
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_seed(key: str, seed: int) -> None:
    # numpy refuses negative seeds and torch ones of 64 bits or more (with tracebacks, deep inside
    # data loading, augmentation or training)
    _check(0 <= seed < 2**63, f"{key} must be in [0, 2**63), got {_short(seed)}")


def _check_path(key: str, value: str) -> None:
    # An empty path is "." to pathlib: a store there once made --overwrite delete the working
    # directory. Empty or blank usually means an unset shell variable in `--set extract.store=$X`.
    _check(value.strip() != "", f"{key} must be a non-empty path, got {_short(value)}")


def _check_training(section: TeacherConfig | StudentConfig, name: str) -> None:
    """The optimisation fields the teacher and the student sections share."""
    _check(section.epochs >= 1, f"{name}.epochs must be >= 1, got {section.epochs}")
    _check(section.batch_size >= 1, f"{name}.batch_size must be >= 1, got {section.batch_size}")
    _check(0 < section.lr < math.inf, f"{name}.lr must be finite and > 0, got {section.lr}")
    _check(section.weight_decay >= 0, f"{name}.weight_decay must be >= 0")
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", section.device) is not None,
           f"{name}.device must be auto, cpu or cuda[:N], got {_short(section.device)}")


def _location_name(value: Any) -> bool:
    """A feature location: a module name as `named_modules` spells it (dotted identifiers and indices)."""
    return isinstance(value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", value) is not None


def validate(cfg: Config) -> Config:
    """A checked copy of `cfg`, which is left as it is.

    The copy is built from `cfg`'s values as a loaded file is (types and choices, `_coerce`), then
    each section checks its ranges (`check`), then the rules across sections below. Names of
    datasets, models and augmentations are checked by pipeline.registry.
    """
    return _checked(_build(Config, cfg.to_dict(), ""))


def _checked(cfg: Config) -> Config:
    """`cfg` once its sections' ranges and the rules across sections hold."""
    _check_seed("seed", cfg.seed)
    for section in (cfg.data, cfg.loader, cfg.teacher, cfg.augment, cfg.extract, cfg.student):
        section.check()
    aug, views, online = cfg.augment, cfg.extract.views, cfg.student.augment == "online"
    _check(views == 1 or aug.augments(), "extract.views > 1 needs an augmentation (augment.kind is none, and no recipe)")
    _check(0 <= aug.mix_views < views,
           f"augment.mix_views must be in [0, extract.views - 1] (view 0 is the clean input), got {aug.mix_views} "
           f"with extract.views {views}")
    _check(not (aug.mixup > 0 or aug.cutmix > 0) or aug.mix_views >= 1 or online,
           "augment.mixup/cutmix need augment.mix_views >= 1: the mixed views are cached with their teacher targets")
    return cfg


def _parse_scalar(text: str, assignment: str) -> Any:
    if text == "":
        return ""
    try:
        return _yaml_load(text)
    except YAMLRefused as exc:
        raise ConfigError(f"override '{_clip(assignment)}': {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{_clip(assignment)}': the value is not valid YAML "
                          f"({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    """A YAML error in one line: its problem and where, else the first line of its text."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        where = f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}" if exc.problem_mark else ""
        return _clip(f"{exc.problem}{where}", 200)
    lines = str(exc).strip().splitlines()
    return _clip(lines[0].strip() if lines else type(exc).__name__, 200)


def format_override(dotted: str, value: Any) -> str:
    """`dotted=value` for `apply_override` that reads back exactly `value` (JSON is YAML: 'yes' stays a string)."""
    return f"{dotted}={json.dumps(value)}"


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override to a raw config mapping (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"override '{_clip(assignment)}' must look like section.key=value")
    dotted, text = assignment.split("=", 1)
    keys = [key.strip() for key in dotted.split(".")]
    if not all(keys):
        raise ConfigError(f"override '{_clip(assignment)}': empty key in '{_clip(dotted)}' "
                          "(expected section.key=value)")
    node = raw
    for depth, key in enumerate(keys[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{_clip(assignment)}': '{'.'.join(keys[:depth + 1])}' is not a section")
    node[keys[-1]] = _parse_scalar(text, assignment)


def load_config(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> Config:
    """Read a YAML config (or the built-in defaults when `path` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = _read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for assignment in overrides:
        apply_override(raw, assignment)
    return _checked(_build(Config, raw, ""))


def _read_yaml(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB, too large for a config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    try:
        return _yaml_load(text)
    except YAMLRefused as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_first_line(exc)})") from None


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically: a full disk leaves the old file or none, never half of one."""
    from pipeline.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
