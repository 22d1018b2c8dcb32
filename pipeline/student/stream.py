"""Stream cached teacher targets in chunk-aligned, shuffled order with bounded memory.

Samples are drawn by `pipeline.samplers.ChunkShuffleSampler` (`student_sampler`); `CachedTargetDataset`
serves a batch by decoding only the chunks its samples fall in (see `pipeline.samplers` for the lanes
of loader workers).

With K cached views per sample, each epoch serves one view per sample (`view_schedule`): the
student input is rebuilt from that view's stored augmentation parameters, so it is exactly
the tensor the teacher saw, and the targets are that view's features and logits.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch.utils.data import Dataset

from pipeline.augment import ViewAugmenter, partner_inputs, smoothed_one_hot, view_schedule
from pipeline.config import Config
from pipeline.data import ImageSplit
from pipeline.errors import StoreError
from pipeline.rawviews import RawViews
from pipeline.samplers import ChunkShuffleSampler
from pipeline.targets import TeacherTargets, check_student_targets, feature_array, student_teacher_sha


def open_student_targets(cfg: Config, split: str, images: ImageSplit,
                         trust_store_teacher: bool = False) -> TeacherTargets:
    """Open the store for `split` and refuse it unless it was built for this config's run from `images`:
    teacher weights (waived by `trust_store_teacher` when the checkpoint is missing), dataset, split,
    transform, the views of cfg.augment and, sample by sample, the pixels (`check_student_targets`)."""
    targets = TeacherTargets(cfg.extract.store, split)
    sha = student_teacher_sha(cfg, targets, trust_store_teacher)
    check_student_targets(targets, cfg, images, sha, ViewAugmenter(cfg.augment, tuple(images.image_shape)).spec())
    return targets


def student_sampler(cfg: Config, num_samples: int, chunk_size: int, batch_size: int, rank: int = 0,
                    world_size: int = 1, lanes: int | None = None) -> ChunkShuffleSampler:
    """The sampler a student run draws its batches with: chunk-aligned windows of
    student.shuffle_buffer_chunks chunks of the store, one rank's share under DDP, with `lanes`
    (default: loader.workers) lanes. Batches are i.i.d. draws because the store's rows are in a seeded
    random order (data._split); the windows only keep the reads local."""
    return ChunkShuffleSampler(num_samples, chunk_size, cfg.student.shuffle_buffer_chunks, seed=cfg.seed, rank=rank,
                               world_size=world_size, lanes=max(1, cfg.loader.workers if lanes is None else lanes),
                               batch_size=batch_size, with_epoch=True)


def epoch_and_indices(indices: list, epoch: int) -> tuple[int, list[int]]:
    """(epoch, sample indices) of a batch: a with_epoch sampler yields (epoch, index) pairs."""
    if indices and isinstance(indices[0], tuple):
        return indices[0][0], [i for _, i in indices]
    return epoch, list(indices)


def fresh_params(augmenter: ViewAugmenter, indices: torch.Tensor, epoch: int, num_samples: int) -> torch.Tensor:
    """Parameters of a fresh view of each sample for `epoch`, mixed while the recipe mixes (as timm's
    Mixup/CutMix, every batch until augment.mix_off_epoch)."""
    off = augmenter.cfg.mix_off_epoch
    mix = augmenter.mixes and (off == 0 or epoch < off)
    return torch.from_numpy(augmenter.draw_online(indices.numpy(), epoch, num_samples, mix=mix))


def view_inputs(images: ImageSplit, augmenter: ViewAugmenter, indices: list[int], params: torch.Tensor,
                smoothing: float = 0.0) -> tuple[RawViews, torch.Tensor, torch.Tensor]:
    """(inputs, finished on the device, labels, training targets) of the views `params` (B, P) of samples
    `indices`: the label
    is the sample's class, the target the label, or the soft one of a mixed view or label smoothing."""
    labels = images.labels[torch.as_tensor(indices)]
    pixels = images.read(indices)
    inputs = augmenter.raw_views(pixels, params, partner_inputs(images, augmenter, params, pixels))
    if augmenter.mixes or smoothing > 0:
        return inputs, labels, augmenter.targets(labels, params, images.labels, images.num_classes, smoothing)
    return inputs, labels, labels


class CachedTargetDataset(Dataset):
    """(image, label, teacher features, teacher logits, training target) for each sample of a
    split; the teacher features are a dict {location: tensor} over `locations` (default: every
    cached one; only those are read from the store). The label is the sample's class (accuracy
    counts against it); the training target is the label, or with label smoothing or a mixed
    view the soft target (lam * s(y) + (1 - lam) * s(y_partner), as timm's Mixup builds it).

    policy "views": serve view `view_schedule(...)[i]` of sample i, its input rebuilt by
    `augmenter` from the stored parameters (a mixed view from its and its partner's pixels).
    policy "online": a fresh random augmentation of sample i each epoch (mixed while the recipe
    mixes), with the clean input's (view 0) targets: the inconsistent baseline. Without an
    augmenter, the clean input and view 0.
    """

    def __init__(self, images: ImageSplit, targets: TeacherTargets, buffer_chunks: int,
                 augmenter: ViewAugmenter | None = None, policy: str = "views", seed: int = 0,
                 locations=None, smoothing: float = 0.0):
        if len(images) != len(targets):
            raise StoreError(f"{targets.path}: {targets.split} split has {len(targets)} samples, "
                             f"the dataset has {len(images)}")
        if policy not in ("views", "online"):
            raise ValueError(f"policy must be 'views' or 'online', got {policy!r}")
        self.images, self.targets, self.buffer_chunks = images, targets, buffer_chunks
        self.augmenter, self.policy, self.seed, self.smoothing = augmenter, policy, seed, smoothing
        self.locations = list(targets.feature_shapes if locations is None else locations)
        targets.check_locations(self.locations)
        self.set_epoch(0)
        self.capacity = 2 * buffer_chunks
        self._chunks: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self.chunks_decoded = 0  # for tests and benchmarks: reads from the store
        self.max_resident_chunks = 0

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.augmenter is not None and self.policy == "views":
            self.schedule = torch.from_numpy(view_schedule(
                len(self), self.targets.views, epoch, self.seed, self.augmenter.mixed_views(self.targets.views),
                self.augmenter.cfg.mix_off_epoch))
        else:
            self.schedule = torch.zeros(len(self), dtype=torch.long)

    def _load_chunks(self, chunks: list[int]) -> None:
        """Make `chunks` resident; evict least-recently-used chunks that are not among them."""
        for chunk in chunks:  # touch the resident ones first, so they are the most recent
            if chunk in self._chunks:
                self._chunks.move_to_end(chunk)
        needed = set(chunks)
        for chunk in chunks:
            if chunk in self._chunks:
                continue
            rows = self.targets.read_chunk(chunk, self.locations)
            self._chunks[chunk] = {
                **{loc: torch.from_numpy(rows[feature_array(loc)]).float() for loc in self.locations},
                "logits": torch.from_numpy(rows["logits"]).float(),
                "view_params": torch.from_numpy(rows["view_params"]),
            }
            self.chunks_decoded += 1
            evictable = [c for c in self._chunks if c not in needed]
            while len(self._chunks) > self.capacity and evictable:
                del self._chunks[evictable.pop(0)]
        self.max_resident_chunks = max(self.max_resident_chunks, len(self._chunks))

    def __getitems__(self, indices: list):
        epoch, indices = epoch_and_indices(indices, self.epoch)
        if epoch != self.epoch:
            self.set_epoch(epoch)
        idx = torch.as_tensor(indices)
        chunk_ids = idx // self.targets.chunk_size
        views = self.schedule[idx]
        shapes = self.targets.feature_shapes
        features = {loc: torch.empty(len(idx), *shapes[loc]) for loc in self.locations}
        logits = torch.empty(len(idx), self.targets.num_classes)
        stored_views = self.augmenter is not None and self.policy == "views"  # inputs rebuilt from stored params
        params = torch.empty(len(idx), self.targets.arrays["view_params"].shape[2], dtype=torch.int32)
        chunks = torch.unique(chunk_ids).tolist()
        self._load_chunks(chunks)
        for chunk in chunks:
            rows = (chunk_ids == chunk).nonzero().squeeze(1)
            local = idx[rows] - chunk * self.targets.chunk_size
            data = self._chunks[chunk]
            for loc in self.locations:
                features[loc][rows] = data[loc][local, views[rows]]
            logits[rows] = data["logits"][local, views[rows]]
            if stored_views:
                params[rows] = data["view_params"][local, views[rows]]
        if self.augmenter is None:
            labels = targets = self.images.labels[idx]
            images = self.images.load_views(indices)
            if self.smoothing > 0:
                targets = smoothed_one_hot(labels, self.images.num_classes, self.smoothing)
        else:
            if not stored_views:  # online: a fresh augmentation, against the clean input's targets
                params = fresh_params(self.augmenter, idx, self.epoch, len(self))
            images, labels, targets = view_inputs(self.images, self.augmenter, indices, params, self.smoothing)
        return images, labels, features, logits, targets

    def __getitem__(self, i: int):
        """One sample, its input finished here (a loader serves batches through `__getitems__`)."""
        images, labels, features, logits, targets = self.__getitems__([i])
        return images.finish()[0], labels[0], {loc: f[0] for loc, f in features.items()}, logits[0], targets[0]
