"""The online-teacher reference (`student.targets: online`): the official method, against which
training from the cache is measured.

The teacher runs in the training process, every step, on exactly the inputs the student trains on: a
fresh view of each sample per epoch, drawn with the recipe of `augment` (its parameters a pure
function of augment.seed, the epoch and the sample, so a resumed run draws the same views). It
computes the same feature locations and forms as extraction (extract.features, extract.precision,
channels_last, compile) and full logits. No store is read.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset

from pipeline.augment import ViewAugmenter
from pipeline.config import Config
from pipeline.data import ImageSplit
from pipeline.errors import ConfigError
from pipeline.student.stream import epoch_and_indices, fresh_params, view_inputs
from pipeline.teacher.fast import prepare_teacher
from pipeline.teacher.models import load_teacher
from pipeline.targets import teacher_sha


class OnlineTeacher:
    """The frozen teacher of `cfg.teacher.checkpoint`, prepared as extraction prepares it; calling it
    gives ({location: features}, logits) in float32 for a batch of inputs, without gradients."""

    def __init__(self, cfg: Config, split: ImageSplit, device: torch.device):
        self.sha = teacher_sha(cfg)  # refuses a missing checkpoint in one line
        model = load_teacher(cfg.teacher, split.num_classes, split.image_shape).to(device)
        model.eval().requires_grad_(False)
        self.fast = prepare_teacher(model, device, cfg.extract)
        self.locations = tuple(cfg.extract.features)
        with torch.no_grad():
            features, _ = self.fast.outputs(split.load([0]).to(device), self.locations)
        self.feature_shapes = {loc: tuple(f.shape[1:]) for loc, f in features.items()}

    def check_locations(self, locations: Sequence[str]) -> None:
        """Refuse a teacher location that extraction would not cache: the reference reads what the cache holds."""
        for loc in locations:
            if loc not in self.feature_shapes:
                raise ConfigError(f"student.targets=online: the teacher location {loc!r} is not in extract.features "
                                  f"({', '.join(self.locations)}); the online teacher computes what extraction caches")

    def __call__(self, images: torch.Tensor, locations: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        with torch.no_grad():
            features, logits = self.fast.outputs(images, list(locations))
        return {loc: features[loc].float() for loc in locations}, logits.float()

    def describe(self) -> str:
        return f"online teacher ({self.fast.describe()})"


class FreshViews(Dataset):
    """(input, label, training target) of a fresh view of every sample each epoch: what the online
    teacher and the student both see. Batches itself (`__getitems__`), like the cached dataset."""

    def __init__(self, images: ImageSplit, augmenter: ViewAugmenter, smoothing: float = 0.0):
        self.images, self.augmenter, self.smoothing = images, augmenter, smoothing
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitems__(self, indices: list):
        self.epoch, indices = epoch_and_indices(indices, self.epoch)
        params = fresh_params(self.augmenter, torch.as_tensor(indices), self.epoch, len(self))
        return view_inputs(self.images, self.augmenter, indices, params, self.smoothing)

    def __getitem__(self, i: int):
        inputs, labels, targets = self.__getitems__([i])
        return inputs[0], labels[0], targets[0]

