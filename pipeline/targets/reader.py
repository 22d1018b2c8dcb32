"""The store's reader: one split of a store, read a chunk (or any rows) at a time.

Nothing is ever read as a fill value: every written shard is an object on disk, and the reader
checks that a shard's objects exist and are not empty before decoding it (a deleted shard would
otherwise read back as zeros). Every array read is checked against its chunk digests, then
decoded by its field's codec.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.errors import StoreError
from pipeline.targets.fields import Features, FieldError, Images, store_fields
from pipeline.targets.fsutil import absent_objects, listing, shard_keys
from pipeline.targets.manifest import chunk_digests, open_group, read_flags, split_group
from pipeline.targets.signing import check_signature
from pipeline.targets.spec import (CHUNK_DIGEST, FLAGS, IMAGES, STUDENT_IDENTITY, TargetSpec, feature_array,
                                   first_difference, short)


class TeacherTargets:
    """Read-only access to one split of a complete store, one chunk at a time (with a signing key set,
    of a store signed with it: `pipeline.targets.signing`)."""

    def __init__(self, path: str | Path, split: str, require_complete: bool = True, signed: bool = True):
        self.path, self.split = str(path), split
        self._pid = os.getpid()
        self.root = open_group(self.path)
        self.manifest = self.root.attrs["manifest"]
        # With a signing key set (and `signed`), the chunk digests as signed: rows are checked against these.
        self._signed = (check_signature(self.root, self.path) or None) if signed else None
        if require_complete and not self.root.attrs.get("complete", False):
            raise StoreError(f"{self.path}: store is incomplete (extraction did not finish); "
                             "re-run `bkd extract-teacher`")
        if split not in self.manifest["splits"]:
            raise StoreError(f"{self.path}: no '{split}' split (has: {', '.join(self.manifest['splits'])})")
        self.spec = TargetSpec.from_manifest(self.manifest)  # what the store holds: K, feature locations, top-k, ...
        self.topk = self.spec.logits_topk
        self.fields = store_fields(self.spec)
        names = self.spec.row_arrays()
        self._group = split_group(self.root, split, self.path, names + (CHUNK_DIGEST, FLAGS))
        self._arrays = {name: self._group[name] for name in names}
        self._check_shapes()
        self.layout = self.spec.layout(split)
        self._present: set[int] = set()  # shards whose objects were seen on disk
        if require_complete:
            self.check_present()

    @property
    def group(self):
        """The split's zarr group, opened again in a process forked since (a DataLoader worker): an object
        store's client (s3fs, gcsfs) is bound to the event loop of the process that opened it."""
        if self._pid != os.getpid():
            self._group = zarr.open_group(self.path, mode="r")[self.split]
            self._arrays = {name: self._group[name] for name in self._arrays}
            self._pid = os.getpid()
        return self._group

    @property
    def arrays(self) -> dict:
        """The row arrays by name (opened again after a fork, as `group`)."""
        self.group
        return self._arrays

    def _check_shapes(self) -> None:
        """Refuse arrays whose shape or dtype is not the one the manifest makes them (a view count, sample
        count or image size edited in one but not the other): read as they are, they index out of range."""
        for name, (shape, dtype) in self.spec.array_schema(self.split).items():
            array = self.arrays[name]
            if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
                raise StoreError(f"{self.path}: damaged store, {self.split}/{name} is {tuple(array.shape)} "
                                 f"{array.dtype} where the manifest makes it {tuple(shape)} {dtype}; re-run "
                                 "`bkd extract-teacher --overwrite`")

    def check_present(self) -> None:
        """Refuse the split unless every shard is flagged done and all its objects exist and are non-empty.

        One listing of the split's folder: cheap next to a read, and it turns a deleted or
        truncated-to-nothing shard into an error instead of rows of zeros.
        """
        done = read_flags(self.group, self.path)
        if not done.all():
            shard = int(np.flatnonzero(~done)[0])
            raise StoreError(f"{self.path}: {self.split} shard {shard} was never written; re-run `bkd extract-teacher`")
        sizes = listing(self.path, self.group.path)
        for shard in range(self.layout.num_shards):
            self._require_shard(shard, sizes)

    def _require_shard(self, shard: int, sizes: dict[str, int] | None = None) -> None:
        if shard in self._present:
            return
        bad = absent_objects(self.path, shard_keys(self.group, shard), sizes)
        if bad:
            raise StoreError(f"{self.path}: {self.split} shard {shard} is damaged: {bad[0]} is missing or empty; "
                             f"re-run `bkd extract-teacher` to rewrite it (`bkd cache verify` lists every bad shard)")
        self._present.add(shard)

    def __len__(self) -> int:
        return self.layout.num_samples

    @property
    def chunk_size(self) -> int:
        return self.layout.chunk_size

    @property
    def views(self) -> int:
        return self.layout.views

    @property
    def feature_shapes(self) -> dict[str, tuple[int, ...]]:
        """{location: (C,) for pooled vectors, (C, H, W) for maps}, as cached."""
        return self.spec.feature_shapes

    def check_locations(self, locations) -> None:
        """Refuse, in one line, a teacher feature location this store does not hold."""
        for loc in locations:
            if loc not in self.feature_shapes:
                raise StoreError(f"{self.path} holds no teacher features at {short(loc)} (it holds: "
                                 f"{', '.join(self.feature_shapes)}); add it to extract.features and re-extract")

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def read_rows(self, start: int, stop: int, validate: bool = True, locations=None,
                  images: bool = False) -> dict[str, np.ndarray]:
        """Rows [start, stop) of every field (of the features, only those of `locations` when given; the
        stored images only with `images`), decoded: with top-k storage, `logits` comes back dense.

        Every array read is checked against its chunk digests. With `validate`, rows that
        `bkd cache verify` would flag (non-finite targets, labels out of range, rows out of
        place) are refused rather than trained on.
        """
        wanted = None if locations is None else {feature_array(loc) for loc in locations}
        if locations is not None:
            self.check_locations(locations)
        fields = [field for field in self.fields if (images or field.name != IMAGES)
                  and (wanted is None or not isinstance(field, Features) or field.name in wanted)]
        read = {name for field in fields for name in field.arrays}
        names = [name for name in self.arrays if name in read]
        for shard in range(start // self.layout.shard_size, (max(stop, start + 1) - 1) // self.layout.shard_size + 1):
            self._require_shard(shard)
        try:
            stored = {name: self.arrays[name][start:stop] for name in names}
        except Exception as exc:  # a codec or checksum error: name where it happened
            shard = start // self.layout.shard_size
            raise StoreError(f"{self.path}: cannot read {self.split} rows {start}:{stop} "
                             f"(shard {shard}): {type(exc).__name__}: {exc}") from None
        problem, rows = self.digest_problem(stored, start, stop), {}
        try:
            for field in fields if not problem else ():
                rows |= field.decode(stored)
        except FieldError as exc:
            problem = str(exc)
        problem = problem or (self.check_rows(rows, start, stop) if validate else None)
        if problem:
            shard = start // self.layout.shard_size
            raise StoreError(f"{self.path}: {self.split} rows {start}:{stop} (shard {shard}): "
                             f"{problem}; `bkd cache verify` lists every bad shard")
        return rows

    def digest_problem(self, rows: dict[str, np.ndarray], start: int, stop: int) -> str | None:
        """Compare the whole chunks among `rows` [start, stop) of the arrays read with the digests written
        beside them: what does not match, or None."""
        size = self.chunk_size
        first = -(-start // size)  # chunks [first, last) lie wholly inside the rows (the last one may be short)
        last = self.layout.num_chunks if stop >= len(self) else stop // size
        if last <= first:
            return None
        try:
            stored = (self._signed[self.split] if self._signed else self.group[CHUNK_DIGEST])[first:last]
            if stored.ndim != 2 or stored.shape[1] != len(self.spec.row_arrays()):
                return f"chunk digests have shape {stored.shape[1:]}, expected one column per array"
        except Exception as exc:  # a damaged digest object
            return f"chunk digests cannot be read ({type(exc).__name__})"
        offset = first * size - start
        whole = {name: values[offset:offset + (last - first) * size] for name, values in rows.items()}
        order = self.spec.row_arrays()
        names = tuple(name for name in order if name in whole)
        columns = [order.index(name) for name in names]
        bad = np.argwhere(chunk_digests(whole, names, first, size) != stored[:, columns])
        if len(bad):
            chunk, column = bad[0]
            return (f"chunk {first + int(chunk)} of {names[column]} does not match its digest "
                    "(moved, swapped or rewritten)")
        return None

    def check_rows(self, rows: dict[str, np.ndarray], start: int, stop: int) -> str | None:
        """What is wrong with decoded rows [start, stop), field by field, or None."""
        for field in self.fields:
            if field.name in rows:
                problem = field.check(rows, start, stop)
                if problem:
                    return problem
        return None

    def read_chunk(self, chunk: int, locations=None) -> dict[str, np.ndarray]:
        start = chunk * self.chunk_size
        return self.read_rows(start, min(start + self.chunk_size, len(self)), locations=locations)

    def whole(self, name: str) -> np.ndarray:
        """The split's whole `name` array (a small per-row one: pixel_digest, labels, source_row), checked
        against its chunk digests and decoded by nothing (these are stored as they are)."""
        try:
            values = self.group[name][:]
        except Exception as exc:  # a damaged object
            raise StoreError(f"{self.path}: {self.split}/{name} cannot be read ({type(exc).__name__}); "
                             "`bkd cache verify` names the bad shard") from None
        problem = self.digest_problem({name: values}, 0, len(self))
        if problem:
            raise StoreError(f"{self.path}: {self.split}/{name}: {problem}; `bkd cache verify` lists every bad shard")
        return values

    def identity_digest(self) -> str:
        """sha256 (16 hex digits) of everything the store holds and is, provenance left out: equal
        for a store rebuilt identically, different for any other K, features, teacher, data, ..."""
        identity = {k: v for k, v in self.manifest.items() if k not in ("versions", "created")}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def check_matches(self, expected: dict[str, Any]) -> None:
        """Refuse a store built for another run: `expected` (manifest-shaped) must agree on the student
        identity and this split's fingerprint; what was cached (views, feature kind, top-k) is the store's."""
        difference = first_difference(self.manifest, expected, STUDENT_IDENTITY + (f"splits.{self.split}.fingerprint",))
        if difference:
            raise StoreError(f"{self.path} was built for another run: {difference}")

    def pixel_mismatches(self, raw: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The positions of `raw` (the inputs of `rows`, as the source gives them) that are not the extracted ones."""
        try:
            stored = self.group["pixel_digest"].get_orthogonal_selection((np.asarray(rows, dtype=np.int64),))
        except Exception as exc:  # a damaged digest shard
            raise StoreError(f"{self.path}: {self.split}/pixel_digest cannot be read ({type(exc).__name__}); "
                             "`bkd cache verify` names the bad shard") from None
        return Images.mismatches(raw, stored)

    def check_pixels(self, raw: np.ndarray, rows: np.ndarray, sample_ids: np.ndarray | None = None) -> None:
        """Refuse the store unless `raw` (the inputs of `rows`, as the source gives them) are the extracted ones.
        `sample_ids`: the dataset's ids of those rows (the split's `ids`: rows of its files), named in the
        refusal; the store's rows are in a seeded random order, so a store row means nothing to a reader."""
        rows = np.asarray(rows, dtype=np.int64)
        ids = rows if sample_ids is None else np.asarray(sample_ids, dtype=np.int64)
        mismatch = self.pixel_mismatches(raw, rows)
        if len(mismatch):
            at = mismatch[0]
            where = "" if sample_ids is None else f" (store row {int(rows[at])})"
            raise StoreError(f"{self.path} was built from other inputs: {self.split} sample {int(ids[at])}{where} "
                             f"(and {len(mismatch) - 1} more of {len(rows)} checked) differs from what the teacher "
                             "saw; re-run `bkd extract-teacher --overwrite` for these files")
