"""Chunk-aligned shuffling and the streaming cached-target dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.data import collate_batch
from pipeline.errors import BkdError, StoreError
from pipeline.targets import TeacherTargets
from pipeline.student.stream import CachedTargetDataset
from pipeline.samplers import ChunkShuffleSampler
from tests.helpers import CHUNK, build_store, image_split

# ---------------------------------------------------------------------------------------------
# ChunkShuffleSampler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,chunk,buf", [(300, 64, 2), (320, 64, 2), (100, 7, 3), (50, 64, 4), (65, 8, 1)])
def test_sampler_is_a_permutation_each_epoch(n, chunk, buf):
    sampler = ChunkShuffleSampler(n, chunk, buf, seed=3)
    assert len(sampler) == n
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == n
        assert sorted(order) == list(range(n))
        assert all(isinstance(i, int) for i in order)


def test_sampler_reproducible_and_varies_by_epoch_and_seed():
    a = ChunkShuffleSampler(300, 16, 2, seed=7)
    b = ChunkShuffleSampler(300, 16, 2, seed=7)
    orders = []
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        first = list(a)
        assert first == list(b)  # same (seed, epoch), other instance
        assert first == list(a)  # same instance iterated again
        orders.append(first)
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    other_seed = ChunkShuffleSampler(300, 16, 2, seed=8)
    assert list(other_seed) != orders[0]
    # it really shuffles: not the identity, and chunk order is not sorted
    assert orders[0] != list(range(300))
    chunk_seq = [i // 16 for i in orders[0]]
    first_seen = list(dict.fromkeys(chunk_seq))
    assert first_seen != sorted(first_seen)


@pytest.mark.parametrize("n,chunk,world", [(300, 16, 2), (320, 64, 2), (100, 7, 3), (65, 8, 4), (96, 32, 3)])
def test_rank_shares_are_disjoint_whole_chunks_of_equal_length(n, chunk, world):
    for epoch in range(3):
        shares = []
        for rank in range(world):
            sampler = ChunkShuffleSampler(n, chunk, 2, seed=5, rank=rank, world_size=world)
            sampler.set_epoch(epoch)
            shares.append(list(sampler))
            assert len(shares[-1]) == len(sampler)  # what DataLoader plans for is what it gets
        assert len({len(share) for share in shares}) == 1  # same step count on every rank
        chunk_sets = [{i // chunk for i in share} for share in shares]
        for a in range(world):
            for b in range(a + 1, world):
                assert not chunk_sets[a] & chunk_sets[b]  # no chunk is read by two ranks
        for share, chunks in zip(shares, chunk_sets):  # each rank serves all of its chunks' samples
            assert set(share) == {i for i in range(n) if i // chunk in chunks}
        assert sorted({i for share in shares for i in share}) == list(range(n))
    # shares are reshuffled every epoch
    one = ChunkShuffleSampler(n, chunk, 2, seed=5, rank=0, world_size=world)
    first = list(one)
    one.set_epoch(1)
    assert list(one) != first


@pytest.mark.parametrize("world", [1, 2, 3])
def test_within_window_order_is_reshuffled_each_epoch_on_every_rank(world):
    """One-chunk windows: each window is a whole chunk, and the order inside it (offsets in the chunk) is
    drawn anew each epoch on every rank, reproducibly from (seed, epoch)."""
    n, chunk = 16 * 12, 16

    def patterns(rank: int, epoch: int, seed: int = 5) -> list[tuple[int, ...]]:
        sampler = ChunkShuffleSampler(n, chunk, 1, seed=seed, rank=rank, world_size=world)
        sampler.set_epoch(epoch)
        order = np.asarray(list(sampler))
        windows = order.reshape(-1, chunk)
        assert all(len(set(w // chunk)) == 1 for w in windows)  # a window is one whole chunk
        return [tuple(w % chunk) for w in windows]

    for rank in range(world):
        first, second = patterns(rank, 0), patterns(rank, 1)
        assert first == patterns(rank, 0) and second == patterns(rank, 1)  # a function of (seed, epoch)
        assert all(a != b for a, b in zip(first, second))  # every window's inner order changes
        assert all(sorted(p) != list(p) for p in first + second)  # and really is shuffled
        assert patterns(rank, 0, seed=6) != first
    if world > 1:  # the ranks do not share one inner order
        assert patterns(0, 1) != patterns(1, 1)


def test_one_rank_sampler_is_the_plain_sampler_and_start_skips_a_prefix():
    plain = ChunkShuffleSampler(300, 16, 2, seed=4)
    ranked = ChunkShuffleSampler(300, 16, 2, seed=4, rank=0, world_size=1)
    plain.set_epoch(2)
    ranked.set_epoch(2)
    full = list(plain)
    assert list(ranked) == full
    ranked.set_epoch(2, start=96)  # resuming after three batches of 32
    assert list(ranked) == full[96:]
    shared = ChunkShuffleSampler(300, 16, 2, seed=4, rank=1, world_size=2)
    whole = list(shared)
    shared.set_epoch(0, start=40)
    assert list(shared) == whole[40:]


def test_fewer_chunks_than_ranks_is_refused():
    with pytest.raises(BkdError, match="3 chunks .* 4 ranks"):
        ChunkShuffleSampler(40, 16, 2, rank=0, world_size=4)


@pytest.mark.parametrize("seed", range(5))
def test_sampler_windows_are_whole_chunks_when_chunks_are_full(seed):
    n, chunk, buf = 16 * 12, 16, 3  # 12 full chunks, 4 windows
    order = list(ChunkShuffleSampler(n, chunk, buf, seed=seed))
    window = buf * chunk
    for start in range(0, n, window):
        part = order[start:start + window]
        chunks = {i // chunk for i in part}
        assert len(chunks) == buf
        # each chunk of the window is there whole
        assert sorted(part) == sorted(i for c in chunks for i in range(c * chunk, (c + 1) * chunk))
    # and samples are shuffled inside a window, not served chunk after chunk
    assert any(order[k] // chunk != order[k + 1] // chunk for k in range(chunk - 1))


def _max_open_chunks(order, chunk):
    """Largest number of chunks that are started but not finished at any point of the order."""
    first, last = {}, {}
    for pos, i in enumerate(order):
        c = i // chunk
        first.setdefault(c, pos)
        last[c] = pos
    events = sorted([(p, 0) for p in first.values()] + [(p, 1) for p in last.values()])
    open_now = best = 0
    for _, kind in events:  # at equal positions, a start (0) sorts before an end (1)
        open_now += 1 if kind == 0 else -1
        best = max(best, open_now)
    return best


@pytest.mark.parametrize("n,chunk,buf", [(300, 64, 2), (1000, 32, 4), (77, 5, 1), (500, 10, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampler_never_needs_more_than_buffer_chunks(n, chunk, buf, seed):
    order = list(ChunkShuffleSampler(n, chunk, buf, seed=seed))
    assert _max_open_chunks(order, chunk) <= buf
    # sanity: a plain global shuffle would need many more chunks at once
    global_shuffle = np.random.default_rng(seed).permutation(n).tolist()
    assert _max_open_chunks(global_shuffle, chunk) > buf


# ---------------------------------------------------------------------------------------------
# CachedTargetDataset
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def make_dataset(tmp_path):
    def make(n_train: int, buffer_chunks: int):
        path = tmp_path / f"s{n_train}.zarr"
        data = build_store(path, n_train=n_train)["train"]
        targets = TeacherTargets(path, "train")
        reads: list[int] = []
        original = targets.read_chunk

        def counting_read(chunk, locations=None):  # an independent count of the reads that hit the store
            reads.append(chunk)
            return original(chunk, locations)

        targets.read_chunk = counting_read
        split = image_split(data["labels"])
        return CachedTargetDataset(split, targets, buffer_chunks), split, data, reads

    return make


def _run_epoch(dataset, sampler, batch_size, split, data):
    order = list(sampler)  # the order the loader will see (same seed and epoch)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_batch)
    seen = 0
    for images, labels, features, logits, targets in loader:
        assert torch.equal(targets, labels)  # no smoothing, no mixing: the training target is the label
        assert list(features) == ["pre_logits"]  # the store's one location
        features = features["pre_logits"]
        idx = order[seen:seen + len(labels)]
        seen += len(labels)
        assert features.dtype == torch.float32 and logits.dtype == torch.float32
        torch.testing.assert_close(features, torch.from_numpy(data["features.pre_logits"][idx, 0].astype(np.float16)).float(),
                                   rtol=0, atol=0)
        torch.testing.assert_close(logits, torch.from_numpy(data["logits"][idx, 0].astype(np.float16)).float(),
                                   rtol=0, atol=0)
        assert torch.equal(labels, torch.from_numpy(data["labels"][idx]))
        assert torch.equal(images.to("cpu"), split.load(idx))
    assert seen == len(order)


@pytest.mark.parametrize("buffer_chunks", [1, 2, 3])
def test_dataset_serves_stored_rows_and_decodes_each_chunk_once(make_dataset, buffer_chunks):
    # 320 = 5 full chunks of 64; batch 32 divides every window, so batches never straddle windows.
    n = 320
    dataset, split, data, reads = make_dataset(n, buffer_chunks)
    num_chunks = n // CHUNK
    sampler = ChunkShuffleSampler(n, CHUNK, buffer_chunks, seed=0)
    _run_epoch(dataset, sampler, 32, split, data)
    assert dataset.chunks_decoded == num_chunks
    assert sorted(reads) == list(range(num_chunks))  # every chunk read exactly once
    assert 1 <= dataset.max_resident_chunks <= 2 * buffer_chunks

    sampler.set_epoch(1)
    before = dataset.chunks_decoded
    _run_epoch(dataset, sampler, 32, split, data)
    assert dataset.chunks_decoded - before <= num_chunks
    assert dataset.max_resident_chunks <= 2 * buffer_chunks


@pytest.mark.parametrize("n,batch_size,buffer_chunks", [(300, 32, 2), (300, 50, 3), (320, 50, 2)])
def test_dataset_values_with_partial_chunk_and_ragged_batches(make_dataset, n, batch_size, buffer_chunks):
    dataset, split, data, reads = make_dataset(n, buffer_chunks)
    sampler = ChunkShuffleSampler(n, CHUNK, buffer_chunks, seed=0)
    _run_epoch(dataset, sampler, batch_size, split, data)
    assert set(reads) == set(range(-(-n // CHUNK)))
    assert dataset.max_resident_chunks <= 2 * buffer_chunks


@pytest.mark.parametrize("n,batch_size,buffer_chunks", [(300, 32, 2), (320, 50, 2), (500, 50, 3), (300, 200, 1)])
def test_dataset_decodes_each_chunk_once_when_batches_straddle_windows(make_dataset, n, batch_size,
                                                                      buffer_chunks):
    dataset, split, data, reads = make_dataset(n, buffer_chunks)
    sampler = ChunkShuffleSampler(n, CHUNK, buffer_chunks, seed=0)
    _run_epoch(dataset, sampler, batch_size, split, data)
    assert dataset.chunks_decoded == -(-n // CHUNK)


def test_getitem_single_sample(make_dataset):
    dataset, split, data, _ = make_dataset(320, 2)
    image, label, features, logit, _ = dataset[133]
    feature = features["pre_logits"]
    assert torch.equal(image, split.load([133])[0])
    assert label.item() == data["labels"][133]
    assert torch.equal(feature, torch.from_numpy(data["features.pre_logits"][133, 0].astype(np.float16)).float())
    assert torch.equal(logit, torch.from_numpy(data["logits"][133, 0].astype(np.float16)).float())


def test_mismatched_lengths_raise(tmp_path):
    path = tmp_path / "s.zarr"
    data = build_store(path, n_train=300)["train"]
    targets = TeacherTargets(path, "train")
    with pytest.raises(StoreError, match="300"):
        CachedTargetDataset(image_split(data["labels"][:299]), targets, 2)
