"""The store's writer: creates (or reopens, to resume) a store and writes it shard by shard.

A shard is the unit of work: it is computed and written whole, by one writer, and recorded as
complete in `shards_done` only after its data is on disk. Each shard's flag is its own chunk, so
concurrent writers of different shards (dask workers) never touch the same object. `complete`
turns true only when every shard of every split is written, so a store left by a crash says it
is incomplete. The manifest is written first, in the object that makes the folder a Zarr group,
so a store left by a crash at any point is recognisable as bkd's own and can be resumed or replaced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pipeline.errors import StoreError
from pipeline.targets.fields import Coded, Images, store_fields
from pipeline.targets.fsutil import (absent_objects, check_store_location, existing_store, listing, remove_store,
                                     shard_keys)
from pipeline.targets.manifest import check_format, chunk_digests, manifest_damage, read_flags, split_group
from pipeline.targets.spec import (CHUNK_DIGEST, FLAGS, IMAGES, STORE_IDENTITY, TargetSpec, first_difference,
                                   manifest_digest)

# Every array is written whole shards at a time; all-fill chunks must still be written, so that a
# missing object always means a missing piece (zarr skips them by default).
WRITE_CONFIG = {"write_empty_chunks": True}


class StoreWriter:
    """Creates (or reopens, to resume) a store and writes it shard by shard.

    It only ever replaces (`overwrite`) or resumes a store that bkd made: a folder whose root
    holds a bkd manifest and nothing bkd would not write. Anything else at the path is refused.
    """

    def __init__(self, path: str | Path, spec: TargetSpec, overwrite: bool = False):
        self._setup(path, spec)
        manifest = spec.to_manifest()
        check_store_location(self.path)
        existing = existing_store(self.path)  # None: nothing (or an empty folder) is there
        if existing is not None:
            if not overwrite:
                check_format(self.path, existing)  # an older format first: its manifest lacks newer sections
                damage = manifest_damage(existing)
                if damage:
                    raise StoreError(f"{self.path}: damaged manifest, {damage}; pass --overwrite to replace the store")
                difference = first_difference(existing, manifest, STORE_IDENTITY)
                if difference:
                    raise StoreError(f"{self.path} holds targets of another run ({difference}); pass --overwrite "
                                     "to replace it")
                root = zarr.open_group(self.path, mode="r+")
                if root.attrs.get("skeleton_done", False):
                    self.root = root  # resume: keep completed shards
                    return
                # A crash while the skeleton was written: no shard can have been written yet.
            remove_store(self.path)
        self._create(manifest)

    def _setup(self, path: str | Path, spec: TargetSpec) -> None:
        self.path, self.spec = str(path), spec
        self.layouts = {split: spec.layout(split) for split in spec.splits}
        self.array_names = spec.row_arrays()
        self.fields = store_fields(spec)

    @classmethod
    def attach(cls, path: str | Path, spec: TargetSpec) -> StoreWriter:
        """A writer of more shards into a store another process has just created or resumed for this
        run (a dask worker's, while the planner holds the store's lock). It checks that the store's
        skeleton is complete and its manifest this run's, but does not list the folder, which other
        writers are filling at the same time."""
        writer = cls.__new__(cls)
        writer._setup(path, spec)
        root = zarr.open_group(writer.path, mode="r+")
        existing = root.attrs.get("manifest")
        difference = (first_difference(existing, spec.to_manifest(), STORE_IDENTITY)
                      if isinstance(existing, dict) else "no manifest")
        if difference or not root.attrs.get("skeleton_done", False):
            raise StoreError(f"{writer.path} is not the store this run opened for writing "
                             f"({difference or 'its skeleton is incomplete'})")
        writer.root = root
        return writer

    def _create(self, manifest: dict) -> None:
        # The manifest goes into the group's own metadata object, the first thing written: from then
        # on the folder is recognisably a bkd store, whatever happens to the rest.
        self.root = zarr.open_group(self.path, mode="w", zarr_format=3,
                                    attributes={"manifest": manifest, "manifest_digest": manifest_digest(manifest),
                                                "complete": False, "skeleton_done": False})
        level = self.spec.zstd_level
        compressor = ZstdCodec(level=level, checksum=True)  # checksums make corrupted chunks detectable
        coded = {field.name: field.codec for field in self.fields if isinstance(field, Coded)}
        for split, layout in self.layouts.items():
            group = self.root.create_group(split)
            for name, (shape, dtype) in self.spec.array_schema(split).items():
                rows = Images.block_rows(layout.chunk_size) if name == IMAGES else layout.chunk_size
                compressors = (coded[name].compressors(level, np.dtype(dtype).itemsize) if name in coded
                               else [compressor])
                group.create_array(name, shape=shape, dtype=dtype, chunks=(rows,) + shape[1:],
                                   shards=(layout.shard_size,) + shape[1:], compressors=compressors, fill_value=0,
                                   config=WRITE_CONFIG)
            columns = len(self.array_names)
            group.create_array(CHUNK_DIGEST, shape=(layout.num_chunks, columns), dtype="uint64",
                               chunks=(layout.chunks_per_shard, columns), compressors=compressor, fill_value=0,
                               config=WRITE_CONFIG)  # one object per shard, written with it
            group.create_array(FLAGS, shape=(layout.num_shards,), dtype="bool", chunks=(1,), fill_value=False)
        self.root.attrs["skeleton_done"] = True

    def missing_shards(self, split: str) -> list[int]:
        """Shards to (re)write: never flagged done, or flagged but with an object missing or empty."""
        group = split_group(self.root, split, self.path, self.array_names + (CHUNK_DIGEST, FLAGS))
        done = read_flags(group, self.path)
        sizes = listing(self.path, split)
        return [shard for shard in range(len(done))
                if not done[shard] or absent_objects(self.path, shard_keys(group, shard), sizes)]

    def write_shard(self, split: str, shard: int, values: dict[str, np.ndarray]) -> None:
        """Write shard `shard` of `split` from `values`, each field's values for the shard's rows (keyed by
        array name; with top-k storage, full `logits` and the views' target classes or the top-k arrays
        themselves), encoded by the field's codec; flagged done after its data and chunk digests."""
        layout = self.layouts[split]
        start, stop = layout.shard_rows(shard)
        group = self.root[split]
        arrays = {name: data for field in self.fields for name, data in field.encode(values).items()}
        stored = {}
        for name in self.array_names:
            data = arrays[name]
            if len(data) != stop - start:
                raise ValueError(f"shard {split}/{shard}: {name} has {len(data)} rows, expected {stop - start}")
            stored[name] = np.asarray(data, dtype=group[name].dtype)  # hashed as it will read back
            group[name].with_config(WRITE_CONFIG)[start:stop] = stored[name]
        first = start // layout.chunk_size
        digests = chunk_digests(stored, self.array_names, first, layout.chunk_size)
        group[CHUNK_DIGEST].with_config(WRITE_CONFIG)[first:first + len(digests)] = digests
        group[FLAGS][shard] = True  # only after the shard's data is written

    def finish(self) -> None:
        if any(self.missing_shards(split) for split in self.layouts):
            raise StoreError(f"{self.path}: cannot mark complete, shards are missing")
        self.root.attrs["complete"] = True
