"""Stream cached teacher targets in chunk-aligned, shuffled order with bounded memory.

`ChunkShuffleSampler` shuffles the order of chunks, then takes `buffer_chunks` chunks at a
time and shuffles the samples inside that window. `CachedTargetDataset` serves a batch by
decoding only the chunks its samples fall in. It keeps at most two windows of decoded chunks
(`2 * buffer_chunks`, or the chunks of one batch if that is more): a batch that straddles a
window boundary needs chunks of both windows, and with that capacity, least-recently-used
eviction that never evicts the current batch's chunks only drops chunks of finished windows.
So each chunk is decoded once per epoch and the store is never loaded whole.

Under DataLoader workers, each worker keeps its own decoded chunks, so batches that need the same
chunks must go to the same worker: with `lanes` = W workers the sampler cuts the epoch's order
into W contiguous spans of whole batches (each a run of whole windows but at its two ends) and
interleaves them batch by batch, so batch k comes from span k mod W -- the worker DataLoader
sends it to. Each worker then streams its own windows and decodes each chunk once per epoch, but
for the chunks of a window where two spans meet, which both of their workers read.

With K cached views per sample, each epoch serves one view per sample (`view_schedule`): the
student input is rebuilt from that view's stored augmentation parameters, so it is exactly
the tensor the teacher saw, and the targets are that view's features and logits.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.augment import ViewAugmenter, partner_inputs, smoothed_one_hot, view_schedule
from pipeline.config import Config
from pipeline.data import ImageSplit
from pipeline.errors import BkdError, StoreError
from pipeline.targets import TeacherTargets, feature_array


class ChunkShuffleSampler(Sampler):
    """Chunk-aligned shuffle, reproducible from (seed, epoch); under DDP, one rank's share of it.

    With `world_size` ranks, each epoch's shuffled chunk order is dealt round-robin, so ranks
    read disjoint chunks of the store. Every rank yields `len(self)` indices -- the largest
    possible share, ceil(chunks / ranks) full chunks -- a shorter share repeating its own first
    samples, so all ranks take the same number of steps (DDP steps in lockstep).
    `set_epoch(epoch, start)` skips the first `start` indices: resuming mid-epoch.

    `lanes` > 1 (DataLoader workers, with the loader's `batch_size`): the order is cut into that many
    spans of whole batches, interleaved batch by batch (see the module docstring); the last batch,
    the only one that may be short, stays last. `with_epoch`: yield (epoch, index) pairs, so a
    dataset copy in a persistent worker knows the epoch of every index it serves.
    """

    def __init__(self, num_samples: int, chunk_size: int, buffer_chunks: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, lanes: int = 1, batch_size: int | None = None,
                 with_epoch: bool = False):
        self.num_samples, self.chunk_size, self.buffer_chunks, self.seed = num_samples, chunk_size, buffer_chunks, seed
        self.rank, self.world_size = rank, world_size
        if lanes > 1 and not batch_size:
            raise ValueError("lanes > 1 needs the loader's batch_size")
        self.lanes, self.batch_size, self.with_epoch = lanes, batch_size, with_epoch
        self.num_chunks = -(-num_samples // chunk_size)
        if self.num_chunks < world_size:
            raise BkdError(f"{self.num_chunks} chunks of {chunk_size} samples cannot be shared by {world_size} ranks; "
                           f"rebuild the store with a smaller extract.chunk_size or use fewer processes")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.num_samples
        return -(-self.num_chunks // self.world_size) * self.chunk_size

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        chunk_order = rng.permutation(self.num_chunks)
        if self.world_size > 1:
            chunk_order = chunk_order[self.rank::self.world_size]
            rng = np.random.default_rng((self.seed, self.epoch, self.rank))
        windows = [
            rng.permutation(np.concatenate([
                np.arange(c * self.chunk_size, min((c + 1) * self.chunk_size, self.num_samples))
                for c in chunk_order[w:w + self.buffer_chunks]]))
            for w in range(0, len(chunk_order), self.buffer_chunks)]
        order = np.resize(np.concatenate(windows), len(self))  # pads a short share with its own samples
        if self.lanes > 1:
            order = interleave_lanes(order, self.batch_size, self.lanes)
        order = order[self.start:].tolist()
        if self.with_epoch:
            yield from ((self.epoch, i) for i in order)
        else:
            yield from order


def student_sampler(cfg: Config, num_samples: int, chunk_size: int, batch_size: int, rank: int = 0,
                    world_size: int = 1) -> ChunkShuffleSampler:
    """The sampler a student run draws its batches with: chunk-aligned windows of
    student.shuffle_buffer_chunks chunks of the store, one rank's share under DDP, with loader.workers
    lanes. Batches are i.i.d. draws because the store's rows are in a seeded random order (data._split);
    the windows only keep the reads local."""
    return ChunkShuffleSampler(num_samples, chunk_size, cfg.student.shuffle_buffer_chunks, seed=cfg.seed, rank=rank,
                               world_size=world_size, lanes=max(1, cfg.loader.workers), batch_size=batch_size,
                               with_epoch=True)


def interleave_lanes(order: np.ndarray, batch_size: int, lanes: int) -> np.ndarray:
    """`order` cut into `lanes` contiguous spans of whole batches, then interleaved batch by batch:
    batch k of the result is the next batch of span k mod lanes. The spans hold ceil or floor of
    batches / lanes batches, the longer ones first; the span that ends the result is the one that
    ends `order`, so the one short batch (its last) stays last and every other batch is whole."""
    batches = -(-len(order) // batch_size)
    if batches <= 1 or lanes <= 1:
        return order
    lanes = min(lanes, batches)
    q, r = divmod(batches, lanes)
    counts = [q + (lane < r) for lane in range(lanes)]
    last = (r - 1) if r else lanes - 1  # the lane whose batch comes last
    span_order = [lane for lane in range(lanes) if lane != last] + [last]  # spans of `order`, in order
    starts, at = {}, 0
    for lane in span_order:
        starts[lane], at = at, at + counts[lane]
    picks = [starts[k % lanes] + k // lanes for k in range(batches)]  # batch k of the result
    return np.concatenate([order[b * batch_size:(b + 1) * batch_size] for b in picks])


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
        if indices and isinstance(indices[0], tuple):  # (epoch, index) pairs from a with_epoch sampler
            epoch = indices[0][0]
            if epoch != self.epoch:
                self.set_epoch(epoch)
            indices = [i for _, i in indices]
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
        labels = self.images.labels[idx]
        targets = labels
        if self.augmenter is None:
            images = self.images.load(indices)
            if self.smoothing > 0:
                targets = smoothed_one_hot(labels, self.images.num_classes, self.smoothing)
        else:
            aug = self.augmenter
            if not stored_views:  # online: a fresh augmentation, against the clean input's targets
                off = aug.cfg.mix_off_epoch
                params = aug.draw_online(idx.numpy(), self.epoch, len(self),
                                         mix=aug.mixes and (off == 0 or self.epoch < off))
            pixels = self.images.read(indices)
            images = aug.apply(pixels, params, partner_inputs(self.images, aug, params, pixels))
            if aug.mixes or self.smoothing > 0:
                targets = aug.targets(labels, params, self.images.labels, self.images.num_classes, self.smoothing)
        return images, labels, features, logits, targets

    def __getitem__(self, i: int):
        images, labels, features, logits, targets = self.__getitems__([i])
        return images[0], labels[0], {loc: f[0] for loc, f in features.items()}, logits[0], targets[0]
