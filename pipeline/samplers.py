"""Chunk-aligned, seeded sample orders, shared by teacher and student training.

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
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler

from pipeline.errors import BkdError


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
