"""The raw source pixels a store holds (`extract.images`), read back as a source of the split it was built from."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from pipeline.errors import StoreError
from pipeline.targets.fields import Images, sample_ids_problem
from pipeline.targets.reader import TeacherTargets
from pipeline.targets.spec import IMAGES, SOURCE_ROW


class ByID:
    """Values keyed by sample id, without an array as long as the largest id: `[ids]` gives theirs (an id
    not held is an error), `get(ids)` gives -1 for those not held. The labels (by id) of a split rebuilt from
    a store alone, and every store's row of a sample id."""

    def __init__(self, ids: np.ndarray, values: np.ndarray):
        order = np.argsort(ids, kind="stable")
        self.keys, self.values = np.asarray(ids, np.int64)[order], np.asarray(values, np.int64)[order]

    def get(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.keys, ids), max(len(self.keys) - 1, 0))
        held = (self.keys[at] == ids) if len(self.keys) else np.zeros(ids.shape, bool)
        return np.where(held, self.values[at] if len(self.keys) else -1, -1)

    def __getitem__(self, ids) -> np.ndarray:
        values = self.get(ids)
        if (values < 0).any():
            raise StoreError("sample ids outside the stored split were asked for")
        return values

    def __len__(self) -> int:  # a source's rows: up to the largest id held
        return int(self.keys[-1]) + 1 if len(self.keys) else 0


class StoredImages:
    """The raw source pixels a store holds (`extract.images`), as a source (`read`, `labels`, `shape`,
    `num_classes`, `origin`) of the split it was built from: `read` takes that source's rows (the split's
    `ids`) and returns the very values the teacher's inputs were made from, without decoding an image file.

    `split`: the split the store was built from -- its `ids`, `num_classes` and `source.labels` (the
    labels by source row) are used, nothing else. Without it (`split=None`: the dataset's files are not
    at hand), the store alone: the sample ids and labels it holds (`source_row`, `labels`, format 10),
    checked against their chunk digests and the split's fingerprint in the manifest. Then `ids` are the
    split's ids, for `ImageSplit(name, split, stored, stored.ids, data_cfg)`.

    The images are stored in blocks of `Images.block_rows` rows (one zstd chunk each): zarr costs about
    a millisecond per chunk read whatever its size, several times the decoding of one 256 px image.
    Decoded blocks are kept (least recently used first out, at most `cache_rows` rows' worth), so the
    sampler's windows -- whose rows the batches of a window revisit -- decode each block about once
    per epoch; a mix partner elsewhere in the split costs one block.

    Each row is checked against the store's pixel digests (themselves checked against their chunk
    digests at open) the first time a process reads it, so a rewritten, swapped or corrupt image is
    an error, never another picture; later reads of the row in that process (the next epochs of a
    persistent loader worker) rely on zstd's checksum of every chunk.
    """

    classes_declared = True

    def __init__(self, targets: TeacherTargets, split=None, cache_rows: int = 0):
        if targets.spec.image_shape is None:
            raise StoreError(f"{targets.path} holds no images (extract.images was off when it was built)")
        stored = self._stored_ids(targets, required=split is None)
        if split is None:
            self.ids, self.num_classes = stored[0], targets.num_classes
            self.labels = ByID(*stored)  # by sample id, however large the ids
        else:
            if len(split) != len(targets):
                raise StoreError(f"{targets.path}: {targets.split} split has {len(targets)} samples, the dataset has "
                                 f"{len(split)}")
            if stored is not None and not (np.array_equal(stored[0], split.ids)
                                           and np.array_equal(stored[1], split.labels.numpy())):
                raise StoreError(f"{targets.path}: damaged store, its {targets.split} sample ids and labels are not "
                                 "those of the dataset, which its manifest's fingerprint records; re-run "
                                 "`bkd extract-teacher --overwrite`")
            self.ids, self.labels, self.num_classes = split.ids, split.source.labels, split.num_classes
        self.path, self.origin = targets.path, f"{targets.path} ({targets.split} images)"
        self.targets = targets
        self.shape = targets.spec.image_shape
        self.position = ByID(self.ids, np.arange(len(self.ids)))  # sample id -> store row
        self.digests = targets.whole("pixel_digest")
        self.verified = np.zeros(len(self.digests), bool)
        self.block = int(self.array.chunks[0])  # rows per stored chunk
        self.capacity = max(1, -(-cache_rows // self.block))  # blocks kept
        self._blocks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.blocks_decoded = 0  # for tests and benchmarks

    @property
    def array(self):
        """The images array (the store's, opened again in a forked loader worker)."""
        return self.targets.arrays[IMAGES]

    @staticmethod
    def _stored_ids(targets: TeacherTargets, required: bool) -> tuple[np.ndarray, np.ndarray] | None:
        """The split's sample ids and labels as the store holds them (None for a store of format 9 unless
        `required`), refused unless they are the split the manifest describes (its fingerprint), each id once."""
        if not targets.spec.source_rows:
            if not required:
                return None
            raise StoreError(f"{targets.path} does not hold its samples' ids (a store of format "
                             f"{targets.manifest['format'].rsplit('/', 1)[-1]}), so it cannot stand in for the "
                             "dataset's files; put them back, or re-run `bkd extract-teacher --overwrite`")
        ids, labels = targets.whole(SOURCE_ROW), targets.whole("labels")
        problem = sample_ids_problem(ids, labels, targets.spec.splits[targets.split]["fingerprint"])
        if not problem and len(labels) and (labels.min() < 0 or labels.max() >= targets.num_classes):
            problem = f"labels outside [0, {targets.num_classes})"
        if problem:
            raise StoreError(f"{targets.path}: damaged store, {targets.split}: {problem}; re-run "
                             "`bkd extract-teacher --overwrite`")
        return ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def _load_block(self, block: int, needed: set[int]) -> np.ndarray:
        if block in self._blocks:
            self._blocks.move_to_end(block)
            return self._blocks[block]
        start = block * self.block
        try:
            data = self.array[start:min(start + self.block, len(self.digests))]
        except Exception as exc:  # a codec or checksum error
            raise StoreError(f"{self.path}: cannot read the images of rows {start}:{start + self.block}: "
                             f"{type(exc).__name__}: {exc}") from None
        self.blocks_decoded += 1
        self._blocks[block] = data
        for old in [b for b in self._blocks if b not in needed][:max(0, len(self._blocks) - self.capacity)]:
            del self._blocks[old]
        return data

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The stored pixels (len(rows), *shape) uint8 of source rows `rows`, each checked against its digest."""
        rows = np.asarray(rows, dtype=np.int64)
        at = self.position.get(rows)
        if (at < 0).any():
            raise StoreError(f"{self.path}: source rows outside the stored split were asked for")
        out = np.empty((len(at), *self.shape), np.uint8)
        blocks = at // self.block
        needed = set(np.unique(blocks).tolist())
        for block in needed:
            mine = np.flatnonzero(blocks == block)
            out[mine] = self._load_block(block, needed)[at[mine] - block * self.block]
        new = np.flatnonzero(~self.verified[at])  # each row checked the first time this process reads it
        bad = Images.mismatches(out[new], self.digests[at[new]])
        if len(bad):
            first = new[bad[0]]
            raise StoreError(f"{self.path}: the stored image of sample {int(rows[first])} (store row {int(at[first])}) "
                             "does not match its pixel digest (rewritten or swapped); re-run "
                             "`bkd extract-teacher --overwrite`")
        self.verified[at] = True
        return out
