"""The teacher-target store: a sharded Zarr v3 group with one subgroup per split.

Layout::

    STORE/                              attrs: manifest (identity, shapes, versions), complete
      train/features     (N, V, C)      teacher pre-logits of each of the V views of each sample
      train/logits       (N, V, K)
      train/view_params  (N, V, P) int32  each view's augmentation parameters (view 0: clean input)
      train/labels       (N,)
      train/index        (N,)           position of each row in the split (sample ids live in the fingerprint)
      train/shards_done  (S,) bool      one chunk per shard: set by that shard's writer after its data
      test/...                          (V = 1: the clean input)

Arrays are chunked along N (`chunk_size` rows) and packed into shards of `chunks_per_shard`
chunks. A shard is the unit of work: it is computed and written whole, by one writer, and
recorded as complete in `shards_done` only after its data is on disk. Each shard's flag is
its own chunk, so concurrent writers of different shards (dask workers) never touch the same
object. `complete` turns
true only when every shard of every split is written, so a store left by a crash says it
is incomplete.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import fsspec
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pipeline.errors import StoreError

FORMAT = "bkd-teacher-targets/2"
ARRAYS = ("features", "logits", "view_params", "labels", "index")
TOPK_INDEX = "logits_index"  # with extract.logits_topk: `logits` holds the k largest, this their classes
# Classes outside the stored top-k get the smallest kept logit minus this: a softmax weight of
# e^-100 or less (zero in float32 at tau <= 4), yet finite, so KL and CE terms stay finite.
TOPK_FILL_MARGIN = 100.0


def dense_logits(values: np.ndarray, indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Full logits (..., num_classes) from the top-k `values` and their class `indices` (..., k)."""
    values = values.astype(np.float32)
    dense = np.repeat(values.min(-1, keepdims=True) - TOPK_FILL_MARGIN, num_classes, axis=-1)
    np.put_along_axis(dense, indices.astype(np.int64), values, axis=-1)
    return dense
# Manifest fields a training run must agree with, as dotted paths.
IDENTITY_FIELDS = (
    "teacher.model",
    "teacher.checkpoint_sha256",
    "teacher.logits_topk",
    "teacher.features",
    "dataset.name",
    "dataset.split_seed",
    "dataset.test_size",
    "dataset.limit",
    "transform",
    "augment",
)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in ("torch", "timm", "zarr", "numcodecs", "numpy", "spikingjelly", "bkd"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _get(mapping: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


@dataclass(frozen=True)
class SplitLayout:
    num_samples: int
    chunk_size: int
    chunks_per_shard: int
    views: int = 1

    @property
    def shard_size(self) -> int:
        return self.chunk_size * self.chunks_per_shard

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.shard_size)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_samples / self.chunk_size)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)


class StoreWriter:
    """Creates (or reopens, to resume) a store and writes it shard by shard."""

    def __init__(self, path: str | Path, manifest: dict[str, Any], layouts: dict[str, SplitLayout],
                 feature_shape: tuple[int, ...], num_classes: int, num_view_params: int, feature_dtype: str, logits_dtype: str,
                 zstd_level: int, overwrite: bool = False, logits_topk: int | None = None):
        self.path = str(path)
        self.layouts = layouts
        self.array_names = ARRAYS + ((TOPK_INDEX,) if logits_topk else ())
        if store_exists(self.path):
            existing = _open_group(self.path, mode="r") if not overwrite else None
            if existing is not None:
                if not _same_identity(existing.attrs["manifest"], manifest):
                    raise StoreError(f"{self.path} holds targets of another run; pass --overwrite to replace it")
                self.root = zarr.open_group(self.path, mode="r+")  # resume: keep completed shards
                return
        self.root = zarr.open_group(self.path, mode="w", zarr_format=3)
        compressor = ZstdCodec(level=zstd_level, checksum=True)  # checksums make corrupted chunks detectable
        for split, layout in layouts.items():
            group = self.root.create_group(split)
            n, chunk, shard, views = layout.num_samples, layout.chunk_size, layout.shard_size, layout.views
            specs = {
                "features": ((n, views, *feature_shape), feature_dtype),
                "logits": ((n, views, logits_topk or num_classes), logits_dtype),
                "view_params": ((n, views, num_view_params), "int32"),
                "labels": ((n,), "int64"),
                "index": ((n,), "int64"),
            }
            if logits_topk:
                specs[TOPK_INDEX] = ((n, views, logits_topk), "int32")
            for name, (shape, dtype) in specs.items():
                group.create_array(name, shape=shape, dtype=dtype, chunks=(chunk,) + shape[1:],
                                   shards=(shard,) + shape[1:], compressors=compressor, fill_value=0)
            group.create_array("shards_done", shape=(layout.num_shards,), dtype="bool", chunks=(1,),
                               fill_value=False)
        self.root.attrs.update({"manifest": manifest, "complete": False})

    def missing_shards(self, split: str) -> list[int]:
        return np.flatnonzero(~self.root[split]["shards_done"][:]).tolist()

    def write_shard(self, split: str, shard: int, arrays: dict[str, np.ndarray]) -> None:
        start, stop = self.layouts[split].shard_rows(shard)
        group = self.root[split]
        for name in self.array_names:
            data = arrays[name]
            if len(data) != stop - start:
                raise ValueError(f"shard {split}/{shard}: {name} has {len(data)} rows, expected {stop - start}")
            group[name][start:stop] = data
        group["shards_done"][shard] = True  # only after the shard's data is written

    def finish(self) -> None:
        if any(self.missing_shards(split) for split in self.layouts):
            raise StoreError(f"{self.path}: cannot mark complete, shards are missing")
        self.root.attrs["complete"] = True


def filesystem(url: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of a store location: a local path or any fsspec URL zarr accepts."""
    return fsspec.core.url_to_fs(str(url))


def store_exists(url: str | Path) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def _open_group(path: str, mode: str = "r") -> zarr.Group:
    if not store_exists(path):
        raise StoreError(f"teacher-target store not found: {path} (create it with `bkd extract-teacher`)")
    try:
        group = zarr.open_group(path, mode=mode)
    except Exception as exc:
        raise StoreError(f"{path}: not a readable Zarr store ({type(exc).__name__}: {exc})") from None
    found = group.attrs.get("manifest", {}).get("format")
    if found != FORMAT:
        if isinstance(found, str) and found.startswith(FORMAT.split("/")[0]):
            raise StoreError(f"{path}: store format {found}, this bkd reads {FORMAT}; re-run "
                             f"`bkd extract-teacher --overwrite`")
        raise StoreError(f"{path}: not a bkd teacher-target store (no '{FORMAT}' manifest)")
    return group


def _same_identity(a: dict, b: dict) -> bool:
    keys = IDENTITY_FIELDS + ("splits", "arrays", "chunking")
    return all(_get(a, k) == _get(b, k) for k in keys)


def make_manifest(*, teacher: dict, dataset: dict, splits: dict, transform: dict, augment: dict,
                  arrays: dict, chunking: dict) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "teacher": teacher,
        "dataset": dataset,
        "splits": splits,
        "transform": transform,
        "augment": augment,
        "arrays": arrays,
        "chunking": chunking,
        "versions": package_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


class TeacherTargets:
    """Read-only access to one split of a complete store, one chunk at a time."""

    def __init__(self, path: str | Path, split: str, require_complete: bool = True):
        self.path, self.split = str(path), split
        self.root = _open_group(self.path)
        self.manifest = self.root.attrs["manifest"]
        if require_complete and not self.root.attrs.get("complete", False):
            raise StoreError(f"{self.path}: store is incomplete (extraction did not finish); re-run `bkd extract-teacher`")
        if split not in self.manifest["splits"]:
            raise StoreError(f"{self.path}: no '{split}' split (has: {', '.join(self.manifest['splits'])})")
        self.group = self.root[split]
        self.topk = self.manifest["teacher"].get("logits_topk")
        self.arrays = {name: self.group[name] for name in ARRAYS + ((TOPK_INDEX,) if self.topk else ())}
        chunking = self.manifest["chunking"]
        meta = self.manifest["splits"][split]
        self.layout = SplitLayout(meta["num_samples"], chunking["chunk_size"], chunking["chunks_per_shard"],
                                  meta["views"])

    def __len__(self) -> int:
        return self.layout.num_samples

    @property
    def chunk_size(self) -> int:
        return self.layout.chunk_size

    @property
    def views(self) -> int:
        return self.layout.views

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """(C,) for pre-logits, (C, H, W) for feature maps."""
        return tuple(self.arrays["features"].shape[2:])

    @property
    def feature_dim(self) -> int:
        return self.feature_shape[0]

    @property
    def num_classes(self) -> int:
        return self.manifest["teacher"]["num_classes"]

    def read_rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) of every array; with top-k storage, `logits` comes back dense."""
        try:
            rows = {name: arr[start:stop] for name, arr in self.arrays.items()}
        except Exception as exc:  # a codec or checksum error: name where it happened
            shard = start // self.layout.shard_size
            raise StoreError(f"{self.path}: cannot read {self.split} rows {start}:{stop} "
                             f"(shard {shard}): {type(exc).__name__}: {exc}") from None
        if self.topk:  # consumers always see full logits
            rows["logits"] = dense_logits(rows["logits"], rows.pop(TOPK_INDEX), self.num_classes)
        return rows

    def read_chunk(self, chunk: int) -> dict[str, np.ndarray]:
        start = chunk * self.chunk_size
        return self.read_rows(start, min(start + self.chunk_size, len(self)))

    def check_matches(self, expected: dict[str, Any]) -> None:
        """Refuse a store whose identity differs from `expected` (a manifest-shaped mapping)."""
        for dotted in IDENTITY_FIELDS:
            want, have = _get(expected, dotted), _get(self.manifest, dotted)
            if want != have:
                raise StoreError(f"{self.path} was built for another run: {dotted} is {have!r} in the store, "
                                 f"{want!r} in the config")
        for key in ("fingerprint", "views"):
            dotted = f"splits.{self.split}.{key}"
            want, have = _get(expected, dotted), _get(self.manifest, dotted)
            if want != have:
                raise StoreError(f"{self.path} was built for another run: {dotted} is {have!r} in the store, "
                                 f"{want!r} in the config")


def bytes_on_disk(url: str | Path) -> int:
    fs, path = filesystem(url)
    return fs.du(path)


def store_info(path: str | Path) -> dict[str, Any]:
    root = _open_group(str(path))
    manifest = root.attrs["manifest"]
    chunking = manifest["chunking"]
    splits = {}
    for split, meta in manifest["splits"].items():
        layout = SplitLayout(meta["num_samples"], chunking["chunk_size"], chunking["chunks_per_shard"],
                             meta["views"])
        splits[split] = {
            "samples": layout.num_samples,
            "views": layout.views,
            "shards_complete": int(root[split]["shards_done"][:].sum()),
            "shards_total": layout.num_shards,
        }
    size = bytes_on_disk(path)
    samples = sum(s["samples"] for s in splits.values())
    sample_views = sum(s["samples"] * s["views"] for s in splits.values())
    features = root[next(iter(splits))]["features"]
    return {
        "path": str(path),
        "complete": bool(root.attrs.get("complete", False)),
        "views": {split: s["views"] for split, s in splits.items()},
        "splits": splits,
        "feature_shape": list(features.shape[2:]),
        "num_classes": manifest["teacher"]["num_classes"],
        "dtypes": {name: manifest["arrays"][name] for name in ("features", "logits")},
        "codec": ", ".join(f"{type(c).__name__}({getattr(c, 'level', '')})".replace("()", "")
                           for c in features.compressors),
        "bytes_on_disk": size,
        "bytes_per_sample": size / samples if samples else 0.0,
        "bytes_per_sample_view": size / sample_views if sample_views else 0.0,
        "manifest": manifest,
    }


def verify_store(path: str | Path) -> Iterator[tuple[str, int, str | None]]:
    """Read every chunk; yield (split, shard, problem or None) for each shard."""
    root = _open_group(str(path))
    manifest = root.attrs["manifest"]
    num_classes = manifest["teacher"]["num_classes"]
    for split in manifest["splits"]:
        targets = TeacherTargets(path, split, require_complete=False)
        done = set(np.flatnonzero(root[split]["shards_done"][:]).tolist())
        for shard in range(targets.layout.num_shards):
            if shard not in done:
                yield split, shard, "not written (extraction incomplete)"
                continue
            start, stop = targets.layout.shard_rows(shard)
            try:
                rows = targets.read_rows(start, stop)
            except StoreError as exc:
                yield split, shard, str(exc).split(": ", 1)[-1]
                continue
            problem = None
            if not np.isfinite(rows["features"]).all():
                problem = "non-finite features"
            elif not np.isfinite(rows["logits"]).all():
                problem = "non-finite logits"
            elif rows["labels"].min() < 0 or rows["labels"].max() >= num_classes:
                problem = f"labels outside [0, {num_classes})"
            elif not np.array_equal(rows["index"], np.arange(start, stop)):
                problem = "sample index out of order"
            yield split, shard, problem
