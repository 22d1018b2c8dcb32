"""The config's sections: one dataclass each, its fields with their meaning, and its own range checks.

`Config` is the whole config, one field per section. A section's `check` sees only its own fields; the
rules across sections are in pipeline.config.rules.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.checks import (_check, _check_path, _check_seed, _check_training, _location_name,
                                    randaugment_problem)
from pipeline.config.choices import (MAX_TEACHER_INPUT_SIZE, SNN_TEACHER_PREFIX, ChannelsLast, DistillMode,
                                     ErasingMode, FloatDtype, Interpolation, NeuronBackend, Optimizer, Precision,
                                     SchedulePer, Split, StoreCodec, StudentAugment, StudentTargets)
from pipeline.errors import short as _short
from pipeline.modes import MODES


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
    # Hold out this many samples of the training split and evaluate on them in place of the test
    # split: a validation split, for choosing settings without looking at the test split. The first
    # `holdout` rows of the train split's seeded order (before data.limit, which then applies to
    # each side); every report of such a run says it was scored on validation. 0 = off.
    holdout: int = 0
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
        _check(self.holdout >= 0, f"data.holdout must be >= 0, got {self.holdout}")
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
        problem = randaugment_problem(self.randaugment) if self.randaugment else None
        _check(problem is None, f"augment.randaugment: {_short(self.randaugment)} is not a timm RandAugment spec "
                                f"such as rand-m9-n1-mstd0.4-inc1: {problem}")
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
    # The teacher's own training seed (init, sample order). The top-level `seed` is the student's, so a
    # sweep over student seeds reuses one teacher and one store.
    seed: int = 0
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    device: str = "auto"

    def check(self) -> None:
        _check_training(self, "teacher")
        _check_path("teacher.checkpoint", self.checkpoint)
        _check(self.random_shift >= 0, "teacher.random_shift must be >= 0")
        _check_seed("teacher.seed", self.seed)
        size = self.input_size
        _check(size is None or 1 <= size <= MAX_TEACHER_INPUT_SIZE,
               f"teacher.input_size must be in [1, {MAX_TEACHER_INPUT_SIZE}] or null, got {size}")
        # the fields that depend on whether the teacher is a timm ANN or a bkd SNN
        if self.model.startswith(SNN_TEACHER_PREFIX):
            _check(self.timesteps is not None,
                   f"teacher.timesteps is required for an SNN teacher ({_short(self.model)}): set its own T")
            _check(self.timesteps >= 1, f"teacher.timesteps must be >= 1, got {self.timesteps}")
            _check(self.input_size is None,
                   "teacher.input_size resizes inputs for ANN teachers; an SNN teacher "
                   f"({_short(self.model)}) takes the student's inputs as they are (set it to null)")
        else:
            _check(self.timesteps is None, f"teacher.timesteps is for bkd:<student> SNN teachers only; "
                                           f"{_short(self.model)} is an ANN (set it to null)")
            _check(not self.model_kwargs, f"teacher.model_kwargs is for bkd:<student> SNN teachers only; "
                                          f"{_short(self.model)} is a timm model (set it to {{}})")


@dataclass
class ExtractConfig:
    store: str = "cache/mnist5k-resnet18.zarr"
    # The small file the extraction writes when the store is complete: the store's manifest digest. DVC
    # tracks it instead of the store (never hashing or copying the store), and a student run refuses a store
    # that is not the one it names. Empty: beside the store, STORE (minus .zarr) + ".identity.json".
    identity: str = ""
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
    # How a location's features (or, under "logits", the logits) are stored, where not as the dtypes above:
    # float16-shuffle / float16-bitshuffle (float16, shuffled before zstd: smaller, exact), bfloat16, or
    # codes with a float32 scale per (sample, view, channel): uint8 / uint7 ... uint4 (non-negative,
    # post-ReLU maps), int8, float8 (e4m3). docs/store.md measures each codec's bytes and its error in
    # every loss form.
    codecs: dict[str, StoreCodec] = field(default_factory=dict)
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

    def identity_path(self) -> str:
        """extract.identity, or where it goes when empty: beside the store."""
        base = self.store.rstrip("/")
        return self.identity or (base[:-len(".zarr")] if base.endswith(".zarr") else base) + ".identity.json"

    def check(self) -> None:
        _check_path("extract.store", self.store)
        _check(self.identity == "" or self.identity.strip() != "",
               f"extract.identity must be a path or empty (beside the store), got {_short(self.identity)}")
        _check(self.identity_path().rstrip("/") != self.store.rstrip("/"),
               "extract.identity names the store itself; it is a file of its own, such as cache/NAME.identity.json")
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
        for target, codec in self.codecs.items():
            _check(target in self.features or target == "logits",
                   f"extract.codecs names {_short(target)}, which is neither one of extract.features "
                   f"({', '.join(self.features)}) nor logits")
            _check(not (target == "logits" and codec.startswith("uint")),
                   f"extract.codecs.logits is {codec}, which stores only non-negative values; use int8 or float8")


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
    timesteps: int = 2
    distill: DistillMode = "mixed"
    epochs: int = 30
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
    # Where the teacher targets come from.
    # cache:  the store extract-teacher wrote (the teacher never runs).
    # online: the reference, as the official code trains: the teacher (teacher.checkpoint, with the
    #         forms and fast math of extract: features, precision, channels_last, compile) runs every
    #         step on a fresh view of the recipe -- exactly the input the student trains on. No store
    #         is read. For measuring what training from K cached views costs against it.
    targets: StudentTargets = "cache"
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
        _check(self.targets == "cache" or self.augment == "views",
               "student.targets=online gives every fresh view its own teacher targets, and student.augment=online "
               "pairs fresh views with the clean input's cached ones: they contradict; leave student.augment at views")
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
