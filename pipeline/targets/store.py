"""The teacher-target store: a sharded Zarr v3 group with one subgroup per split.

Layout::

    STORE/                              attrs: manifest (identity, shapes, versions), complete
      train/features.LOC (N, V, C) or (N, V, C, H, W)  the teacher's features at location LOC (pre_logits,
                                        map, a stage such as layer4) for each of the V views of each sample
      train/logits       (N, V, K)
      train/view_params  (N, V, P) int32  each view's augmentation parameters (view 0: clean input)
      train/labels       (N,)
      train/index        (N,)           position of each row in the split, whose rows are in a seeded random
                                        order (data.split_seed; sample ids live in the fingerprint)
      train/pixel_digest (N,) uint64    blake2b-64 of each sample's raw input: the store belongs to these pixels
      train/logits_index (N, V, K) int32 with extract.logits_topk: `logits` holds the K largest, this their
                                        classes; and what the losses need of the rest (see `dense_logits`):
      train/logits_target_class (N, V, 2) int32  the classes each view's training target is made of
      train/logits_target (N, V, 2) float32  the teacher's logits at those classes
      train/logits_tail  (N, V, 2) float32  log-sum-exp and sum of the logits at every other class
      train/images       (N, C, H, W) uint8  with extract.images: each sample's raw source pixels, in chunks of
                                        a few rows (read by `StoredImages`, checked against pixel_digest)
      train/chunk_digest (chunks, A) uint64  blake2b-64 of each chunk of each of the A row arrays
      train/shards_done  (S,) bool      one chunk per shard: set by that shard's writer after its data
      test/...                          (V = 1: the clean input)

Arrays are chunked along N (`chunk_size` rows) and packed into shards of `chunks_per_shard`
chunks. A shard is the unit of work: it is computed and written whole, by one writer, and
recorded as complete in `shards_done` only after its data is on disk. Each shard's flag is
its own chunk, so concurrent writers of different shards (dask workers) never touch the same
object. `complete` turns
true only when every shard of every split is written, so a store left by a crash says it
is incomplete.

Nothing is ever read as a fill value: every array is written with `write_empty_chunks` so each
written shard is an object on disk, and readers check that a shard's objects exist and are not
empty before decoding it (a deleted shard would otherwise read back as zeros). The group's
manifest is written first, in the same object that makes the folder a Zarr group, so a store
left by a crash at any point is recognisable as bkd's own and can be resumed or replaced.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import fsspec
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pipeline.errors import StoreError
from pipeline.data import Source
from pipeline.targets.spec import (CHUNK_DIGEST, FEATURES, FLAGS, FORMAT, FORMAT_FAMILY, IMAGES, SPLITS, STORE_IDENTITY,
                                   STUDENT_IDENTITY, TOPK_ARRAYS, TOPK_INDEX, TOPK_TAIL,
                                   TOPK_TARGET, TOPK_TARGET_CLASS, SplitLayout, TargetSpec, feature_array,
                                   first_difference, is_row_array, older_format, short)

MANIFEST_KEYS = ("teacher", "dataset", "splits", "transform", "augment", "features", "arrays", "chunking")
# Every array is written whole shards at a time; all-fill chunks must still be written, so that a
# missing object always means a missing piece (zarr skips them by default).
WRITE_CONFIG = {"write_empty_chunks": True}
def image_block_rows(chunk_size: int) -> int:
    """Rows per stored chunk of the images array: a few (a mix partner decodes its block), dividing the
    chunk size (so shards hold whole blocks)."""
    return math.gcd(IMAGE_BLOCK, chunk_size)


IMAGE_BLOCK = 16


def topk_arrays(logits: np.ndarray, k: int, target_classes: np.ndarray) -> dict[str, np.ndarray]:
    """What a store keeps of full logits (..., C) with top-k storage: the k largest (`logits`, as
    float32) and their classes, the logits at each view's target classes (..., 2), and the
    log-sum-exp and sum, at temperature 1, of the logits at every other class (the tail)."""
    z = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(target_classes, dtype=np.int64)
    classes = np.argsort(-z, axis=-1, kind="stable")[..., :k]  # ties: the lower class first
    tail = np.ones(z.shape, bool)
    np.put_along_axis(tail, classes, False, axis=-1)
    np.put_along_axis(tail, targets, False, axis=-1)
    top = np.where(tail, z, -np.inf).max(-1, keepdims=True)
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):  # an empty tail: log-sum-exp -inf, sum 0
        lse = np.log(np.where(tail, np.exp(z - shift), 0.0).sum(-1)) + shift[..., 0]
    return {
        "logits": np.take_along_axis(z, classes, -1).astype(np.float32),
        TOPK_INDEX: classes.astype(np.int32),
        TOPK_TARGET_CLASS: targets.astype(np.int32),
        TOPK_TARGET: np.take_along_axis(z, targets, -1).astype(np.float32),
        TOPK_TAIL: np.stack([lse, np.where(tail, z, 0.0).sum(-1)], -1).astype(np.float32),
    }


def dense_logits(values: np.ndarray, indices: np.ndarray, num_classes: int, target_classes: np.ndarray,
                 target_logits: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """Full logits (..., num_classes) float32, rebuilt from what `topk_arrays` kept.

    The top-k `values` go to their `indices`, the target logits to their `target_classes` (over a
    top-k value: they are float32, the top k may be float16). The m tail classes -- all others --
    get values whose log-sum-exp and sum at temperature 1 are the stored ones, capped at the
    k-th logit c as the true tail is: floor(j) classes at c, one between, the rest at one low value
    l, with j and l solving  j e^c + (m - j) e^l = e^LSE,  j c + (m - j) l = SUM  (then made exact
    for the whole classes). The classes that get c are a contiguous run, in class order, from a
    start drawn from the view's tail statistics.

    Exact, whatever the target: the log-sum-exp of the whole row and the logit at each target
    class, hence CE(z_t, y) for a hard label; the sum of the row, hence CE against a label-smoothed
    target and any mix of two (mixup, cutmix) of the view's target classes. The top-k logits
    themselves (to the store's dtype). Approximate: the softened distribution at tau != 1. The
    tail's mass at tau > 1 is that of the tail gathered as close under c as its log-sum-exp
    allows, a lower bound (close for a confident teacher, whose tail mass sits in a few runners-up
    just below c; short for a flat tail), and that mass sits on other classes than the true
    runners-up. The float16 top k (extract.logits_dtype) rounds the exact quantities by up to
    ~0.008 at logits ~20. On a confident 1000-class teacher at tau = 2 (README, "Top-k logits")
    the KD and WSLD losses stay within 2.3 % of the full logits' at k = 5 and 0.25 % at k >= 10,
    their gradients within 0.2 % at k >= 10; at k = 5 the gradient stays off by the softened
    probability of the runners-up left out (12-50 %), which no statistic of the tail can place.
    The constant fill of store format 4 (every tail class 100 below c) dropped the tail: CE(z_t, y)
    wrong for a label outside the top k or a smoothed target, WSLD off by 7-87 %.
    """
    values = np.asarray(values, dtype=np.float64)
    indices, targets = np.asarray(indices, dtype=np.int64), np.asarray(target_classes, dtype=np.int64)
    lse, total = (np.asarray(tail, dtype=np.float64)[..., i] for i in (0, 1))
    known = np.zeros(values.shape[:-1] + (num_classes,), bool)
    np.put_along_axis(known, indices, True, axis=-1)
    np.put_along_axis(known, targets, True, axis=-1)
    m = num_classes - known.sum(-1)
    has = m > 0
    mm = np.maximum(m, 1).astype(np.float64)
    lse, total = np.where(has, lse, 0.0), np.where(has, total, 0.0)
    cap = np.maximum(values.min(-1), lse - np.log(mm) + 1e-9)  # the k-th logit (raised if rounding left no room)
    scaled = np.exp(lse - cap)  # e^(LSE - c): the tail's mass in classes at c, <= m
    # j in [0, m): f(j) = j + (m - j) e^(l(j) - c) - e^(LSE - c), l(j) = (SUM - j c) / (m - j), rises
    # from <= 0 (Jensen) to m - e^(LSE - c) >= 0.
    lo, hi = np.zeros_like(mm), mm.copy()
    for _ in range(64):
        j = (lo + hi) / 2
        gap = np.maximum(mm - j, 1e-300)
        low = np.minimum((total - j * cap) / gap - cap, 0.0)
        above = j + gap * np.exp(low) > scaled
        hi, lo = np.where(above, j, hi), np.where(above, lo, j)
    j = (lo + hi) / 2
    whole = np.minimum(np.floor(j), mm - 1)
    rest = mm - whole - 1  # classes at l
    low = np.minimum((total - j * cap) / np.maximum(mm - j, 1e-300) - cap, 0.0)  # l - c
    frac = j - whole
    mid = np.log(np.maximum(frac + (1 - frac) * np.exp(low), 1e-300))  # u - c, the class between
    for _ in range(8):  # whole classes: make sum and log-sum-exp exact (l moves little, spread over `rest`)
        low = np.where(rest > 0, (total - whole * cap - (mid + cap)) / np.maximum(rest, 1) - cap, low)
        mid = np.log(np.maximum(scaled - whole - rest * np.exp(low), 1e-300))
    # The tail classes in class order from a start drawn from the view's statistics: rank 0, 1, ...
    bits = np.ascontiguousarray(np.asarray(tail, dtype=np.float32)[..., 0]).view(np.uint32).astype(np.uint64)
    start = ((bits * np.uint64(2654435761) % np.uint64(2**32) >> np.uint64(7)) % np.uint64(num_classes))
    start = start.astype(np.int64)[..., None]
    order = (np.arange(num_classes) + start) % num_classes  # rotated class order
    rank_rotated = np.cumsum(~np.take_along_axis(known, order, -1), -1) - 1
    rank = np.take_along_axis(rank_rotated, (np.arange(num_classes) - start) % num_classes, -1)
    fill = np.where(rank < whole[..., None], 0.0, np.where(rank == whole[..., None], mid[..., None], low[..., None]))
    dense = fill + cap[..., None]
    np.put_along_axis(dense, indices, values, axis=-1)
    np.put_along_axis(dense, targets, np.asarray(target_logits, dtype=np.float64), axis=-1)
    return dense.astype(np.float32)


def topk_problem(rows: dict[str, np.ndarray], num_classes: int) -> str | None:
    """What keeps top-k rows from being rebuilt into dense logits, or None."""
    for name in (TOPK_INDEX, TOPK_TARGET_CLASS):
        values = rows[name]
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            return f"{name} outside [0, {num_classes})"
    for name in ("logits", TOPK_TARGET, TOPK_TAIL):
        if not np.isfinite(rows[name] if name != TOPK_TAIL else rows[name][..., 1]).all():
            return f"non-finite {name}"
    if np.isnan(rows[TOPK_TAIL][..., 0]).any() or np.isposinf(rows[TOPK_TAIL][..., 0]).any():
        return f"non-finite {TOPK_TAIL}"
    return None


def pixel_digests(raw: np.ndarray) -> np.ndarray:
    """(N,) uint64: blake2b-64 of each sample's raw input (its bytes, dtype and shape).

    Extraction hashes the inputs it already loads; training hashes the inputs it is about to
    use and compares, so a store is refused for other pixels even under the same sample ids.
    """
    raw = np.ascontiguousarray(raw)
    tag = f"{raw.dtype.str}{raw.shape[1:]}".encode()
    out = np.empty(len(raw), np.uint64)
    for i, sample in enumerate(raw):
        digest = hashlib.blake2b(tag, digest_size=8)
        digest.update(sample.tobytes())
        out[i] = int.from_bytes(digest.digest(), "little")
    return out


def chunk_digests(rows: dict[str, np.ndarray], names: tuple[str, ...], first_chunk: int, chunk_size: int) -> np.ndarray:
    """(chunks, len(names)) uint64: blake2b-64 of each chunk's index, the array's name and the chunk's rows
    of that array, as stored. One column per array, so a reader of some arrays checks just those."""
    n = len(rows[names[0]])
    out = np.empty((-(-n // chunk_size), len(names)), np.uint64)
    for k in range(len(out)):
        for j, name in enumerate(names):
            digest = hashlib.blake2b(f"{first_chunk + k}/{name}".encode(), digest_size=8)
            digest.update(np.ascontiguousarray(rows[name][k * chunk_size:(k + 1) * chunk_size]).tobytes())
            out[k, j] = int.from_bytes(digest.digest(), "little")
    return out


class StoreWriter:
    """Creates (or reopens, to resume) a store and writes it shard by shard.

    It only ever replaces (`overwrite`) or resumes a store that bkd made: a folder whose root
    holds a bkd manifest and nothing bkd would not write. Anything else at the path is refused.
    """

    def __init__(self, path: str | Path, spec: TargetSpec, overwrite: bool = False):
        self.path, self.spec = str(path), spec
        self.layouts = {split: spec.layout(split) for split in spec.splits}
        self.array_names = spec.row_arrays()
        manifest = spec.to_manifest()
        check_store_location(self.path)
        existing = existing_store(self.path)  # None: nothing (or an empty folder) is there
        if existing is not None:
            if not overwrite:
                check_format(self.path, existing)  # an older format first: its manifest lacks newer sections
                damage = _manifest_damage(existing)
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

    def _create(self, manifest: dict) -> None:
        # The manifest goes into the group's own metadata object, the first thing written: from then
        # on the folder is recognisably a bkd store, whatever happens to the rest.
        self.root = zarr.open_group(self.path, mode="w", zarr_format=3,
                                    attributes={"manifest": manifest, "complete": False, "skeleton_done": False})
        compressor = ZstdCodec(level=self.spec.zstd_level, checksum=True)  # checksums make corrupted chunks detectable
        for split, layout in self.layouts.items():
            group = self.root.create_group(split)
            for name, (shape, dtype) in self.spec.array_schema(split).items():
                rows = image_block_rows(layout.chunk_size) if name == IMAGES else layout.chunk_size
                group.create_array(name, shape=shape, dtype=dtype, chunks=(rows,) + shape[1:],
                                   shards=(layout.shard_size,) + shape[1:], compressors=compressor, fill_value=0,
                                   config=WRITE_CONFIG)
            columns = len(self.array_names)
            group.create_array(CHUNK_DIGEST, shape=(layout.num_chunks, columns), dtype="uint64",
                               chunks=(layout.chunks_per_shard, columns), compressors=compressor, fill_value=0,
                               config=WRITE_CONFIG)  # one object per shard, written with it
            group.create_array(FLAGS, shape=(layout.num_shards,), dtype="bool", chunks=(1,), fill_value=False)
        self.root.attrs["skeleton_done"] = True

    def missing_shards(self, split: str) -> list[int]:
        """Shards to (re)write: never flagged done, or flagged but with an object missing or empty."""
        group = _split_group(self.root, split, self.path, self.array_names + (CHUNK_DIGEST, FLAGS))
        done = _read_flags(group, self.path)
        sizes = _listing(self.path, split)
        return [shard for shard in range(len(done))
                if not done[shard] or absent_objects(self.path, shard_keys(group, shard), sizes)]

    def write_shard(self, split: str, shard: int, arrays: dict[str, np.ndarray]) -> None:
        layout = self.layouts[split]
        start, stop = layout.shard_rows(shard)
        group = self.root[split]
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
        group["shards_done"][shard] = True  # only after the shard's data is written

    def finish(self) -> None:
        if any(self.missing_shards(split) for split in self.layouts):
            raise StoreError(f"{self.path}: cannot mark complete, shards are missing")
        self.root.attrs["complete"] = True


def check_store_location(url: str) -> None:
    """Refuse a store path that could only be a mistake: empty, the working folder or above it, a link."""
    if not str(url).strip():
        raise StoreError("the store path is empty (extract.store / --store); name a folder such as cache/NAME.zarr")
    fs, path = filesystem(url)
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return
    here = Path(path)
    if here.is_symlink():
        raise StoreError(f"{url} is a symbolic link; bkd writes stores only at real paths (use the link's target)")
    resolved, cwd = here.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
        raise StoreError(f"refusing to use {url} as a store: it is the working folder, one of its parents or the "
                         "home folder")
    if here.exists() and not here.is_dir():
        raise StoreError(f"{url} exists and is not a folder; a store is a folder")


def _is_store_object(parts: tuple[str, ...]) -> bool:
    """Is this path, relative to a store's root, one that bkd writes? (metadata and chunk objects only)"""
    if parts == ("zarr.json",):
        return True
    if not parts or parts[0] not in SPLITS:
        return False
    if parts[1:] == ("zarr.json",):
        return True
    return (len(parts) >= 3 and (parts[1] in (CHUNK_DIGEST, FLAGS) or is_row_array(parts[1]))
            and (parts[2:] == ("zarr.json",) or (parts[2] == "c" and len(parts) > 3 and all(p.isdigit() for p in parts[3:]))))


def check_format(url: str, manifest: dict) -> None:
    """Refuse a bkd store of another format, saying why an older one cannot be used and how to rebuild it."""
    found = manifest.get("format")
    if found != FORMAT:
        raise StoreError(f"{url} holds a store of format {found}, this bkd reads and writes {FORMAT}"
                         f"{older_format(found)}; rebuild it with `bkd extract-teacher --overwrite`")


def existing_store(url: str) -> dict | None:
    """The manifest of the bkd store at `url`; None if nothing (or only empty folders) is there.

    Anything else there is refused: bkd never writes into, or deletes, what it did not make --
    every object under the folder must be one bkd writes (metadata and chunks of its arrays).
    """
    fs, path = filesystem(url)
    if not fs.exists(path):
        return None
    objects = _store_objects(fs, path)
    if not objects:
        return None
    try:
        manifest = json.loads(fs.cat_file(posixpath.join(path, "zarr.json")))["attributes"]["manifest"]
        family = str(manifest["format"]).split("/")[0]
    except (OSError, ValueError, KeyError, TypeError):
        raise StoreError(f"{url} exists and is not a bkd teacher-target store; bkd will not write into or delete it "
                         "(choose another --store)") from None
    if family != FORMAT_FAMILY:
        raise StoreError(f"{url} is not a bkd teacher-target store; bkd will not write into or delete it")
    foreign = sorted("/".join(parts) for parts in objects if not _is_store_object(parts))
    if foreign:
        raise StoreError(f"{url} holds '{foreign[0]}', which bkd did not write; move it away before replacing "
                         "the store")
    return manifest


def _store_objects(fs, path: str) -> list[tuple[str, ...]]:
    """Every file under `path` (links included, not followed), as path parts relative to it."""
    root = path.rstrip("/")
    found = fs.find(root, withdirs=False)
    return [tuple(posixpath.relpath(p, root).split("/")) for p in found]


def remove_store(url: str) -> None:
    """Delete a bkd store, object by object: only what `existing_store` accepted as bkd's, the split
    folders first and the root metadata (which makes it a store) last, then the folders left empty.

    Killed part-way, what is left still carries the manifest, so the next --overwrite finishes the job.
    """
    fs, path = filesystem(url)
    objects = [parts for parts in _store_objects(fs, path) if _is_store_object(parts)]
    for parts in sorted(objects, key=lambda p: (p == ("zarr.json",), p)):
        fs.rm_file(posixpath.join(path, *parts))
    for folder in sorted({"/".join(parts[:i]) for parts in objects for i in range(1, len(parts))},
                         key=lambda f: -f.count("/")):
        full = posixpath.join(path, folder)
        if fs.isdir(full) and not fs.ls(full, detail=False):
            fs.rmdir(full)


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
    manifest = group.attrs.get("manifest", {})
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        if isinstance(found, str) and found.startswith(FORMAT_FAMILY):
            check_format(path, manifest)
        raise StoreError(f"{path}: not a bkd teacher-target store (no '{FORMAT}' manifest)")
    damage = _manifest_damage(manifest)
    if damage:
        raise StoreError(f"{path}: damaged manifest, {damage}; re-run `bkd extract-teacher --overwrite`")
    return group


def _manifest_damage(manifest: dict) -> str | None:
    """What makes a manifest unusable (a section missing, a field of the wrong type or range), or None."""
    missing = [key for key in MANIFEST_KEYS if not isinstance(manifest.get(key), dict)]
    return f"'{missing[0]}' is missing" if missing else _manifest_problem(manifest)


def _manifest_problem(manifest: dict) -> str | None:
    """The first field of a manifest that a reader could not use (wrong type or range), or None."""
    def count(value, low):
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    checks = [(f"chunking.{key}", manifest["chunking"].get(key), 1) for key in ("chunk_size", "chunks_per_shard")]
    checks.append(("teacher.num_classes", manifest["teacher"].get("num_classes"), 1))
    if manifest["features"].get("logits_topk") is not None:  # it decides the top-k arrays a reader opens
        checks.append(("features.logits_topk", manifest["features"]["logits_topk"], 1))
    for split, meta in manifest["splits"].items():
        if split not in SPLITS or not isinstance(meta, dict):
            return f"unknown split '{short(split)}'"
        checks += [(f"splits.{split}.num_samples", meta.get("num_samples"), 0), (f"splits.{split}.views", meta.get("views"), 1)]
    for field, value, low in checks:
        if not count(value, low):
            return f"{field} is {short(value)} (expected an integer >= {low})"
    return None


def _split_group(root: zarr.Group, split: str, path: str, names: tuple[str, ...]) -> zarr.Group:
    """The split's group, refused in one line if its or one of its arrays' metadata is gone."""
    try:
        with warnings.catch_warnings():  # zarr warns about the metadata-less folder: the error below says it
            warnings.simplefilter("ignore")
            group = root[split]
            present = set(group.array_keys())
    except (KeyError, ValueError, OSError):
        raise StoreError(f"{path}: damaged store, the '{split}' group's metadata is missing; "
                         "re-run `bkd extract-teacher --overwrite`") from None
    missing = [name for name in names if name not in present]
    if missing:
        raise StoreError(f"{path}: damaged store, {split}/{missing[0]} is missing; re-run "
                         "`bkd extract-teacher --overwrite`")
    return group


def _read_flags(group: zarr.Group, path: str) -> np.ndarray:
    try:
        return group["shards_done"][:]
    except Exception as exc:  # a damaged flag chunk: zstd / codec errors
        raise StoreError(f"{path}: damaged store, {group.path}/shards_done cannot be read ({type(exc).__name__}); "
                         "re-run `bkd extract-teacher --overwrite`") from None


def shard_keys(group: zarr.Group, shard: int) -> list[str]:
    """The objects, relative to the store root, that hold `shard` of every array of a split group."""
    keys = []
    for name, array in group.arrays():
        if array.shards is not None:
            keys.append(posixpath.join(group.path, name, "c", str(shard), *["0"] * (array.ndim - 1)))
        elif name == CHUNK_DIGEST:  # one plain chunk per shard
            keys.append(posixpath.join(group.path, name, "c", str(shard), *["0"] * (array.ndim - 1)))
    return keys


def absent_objects(url: str, keys: list[str], sizes: dict[str, int] | None = None) -> list[str]:
    """The keys among `keys` whose object is missing or empty (`sizes`: a listing made beforehand)."""
    fs, root = filesystem(url)
    bad = []
    for key in keys:
        full = posixpath.join(root, key)
        if sizes is not None:
            size = sizes.get(full.rstrip("/"))
        else:
            try:
                size = fs.size(full)
            except (FileNotFoundError, OSError):
                size = None
        if not size:
            bad.append(key)
    return bad


def _listing(url: str, prefix: str) -> dict[str, int]:
    """Sizes of every object under `prefix` of the store at `url`, in one listing."""
    fs, root = filesystem(url)
    found = fs.find(posixpath.join(root, prefix), detail=True)
    return {path.rstrip("/"): info.get("size") or 0 for path, info in found.items()}


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
        self.spec = TargetSpec.from_manifest(self.manifest)  # what the store holds: K, feature locations, top-k, ...
        self.topk = self.spec.logits_topk
        names = self.spec.row_arrays()
        self.group = _split_group(self.root, split, self.path, names + (CHUNK_DIGEST, FLAGS))
        self.arrays = {name: self.group[name] for name in names}
        self.layout = self.spec.layout(split)
        self._present: set[int] = set()  # shards whose objects were seen on disk
        if require_complete:
            self.check_present()

    def check_present(self) -> None:
        """Refuse the split unless every shard is flagged done and all its objects exist and are non-empty.

        One listing of the split's folder: cheap next to a read, and it turns a deleted or
        truncated-to-nothing shard into an error instead of rows of zeros.
        """
        done = _read_flags(self.group, self.path)
        if not done.all():
            shard = int(np.flatnonzero(~done)[0])
            raise StoreError(f"{self.path}: {self.split} shard {shard} was never written; re-run `bkd extract-teacher`")
        sizes = _listing(self.path, self.group.path)
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
        """Rows [start, stop) of every array (of the feature arrays, only those of `locations`
        when given; the stored images only with `images`); with top-k storage, `logits` comes back dense.

        Every array read is checked against its chunk digests. With `validate`, rows that
        `bkd cache verify` would flag (non-finite targets, labels out of range, rows out of
        place) are refused rather than trained on.
        """
        names = [name for name in self.arrays if images or name != IMAGES]
        if locations is not None:
            self.check_locations(locations)
            wanted = {feature_array(loc) for loc in locations}
            names = [name for name in names if not name.startswith(FEATURES) or name in wanted]
        for shard in range(start // self.layout.shard_size, (max(stop, start + 1) - 1) // self.layout.shard_size + 1):
            self._require_shard(shard)
        try:
            rows = {name: self.arrays[name][start:stop] for name in names}
        except Exception as exc:  # a codec or checksum error: name where it happened
            shard = start // self.layout.shard_size
            raise StoreError(f"{self.path}: cannot read {self.split} rows {start}:{stop} "
                             f"(shard {shard}): {type(exc).__name__}: {exc}") from None
        problem = self._digest_problem(rows, start, stop)
        if self.topk and not problem:  # consumers always see full logits
            problem = topk_problem(rows, self.num_classes)
            if not problem:
                rows["logits"] = dense_logits(rows["logits"], rows[TOPK_INDEX], self.num_classes,
                                              rows[TOPK_TARGET_CLASS], rows[TOPK_TARGET], rows[TOPK_TAIL])
        for name in TOPK_ARRAYS:
            rows.pop(name, None)
        problem = problem or (self.rows_problem(rows, start, stop) if validate else None)
        if problem:
            raise StoreError(f"{self.path}: {self.split} rows {start}:{stop} (shard {start // self.layout.shard_size}): "
                             f"{problem}; `bkd cache verify` lists every bad shard")
        return rows

    def _digest_problem(self, rows: dict[str, np.ndarray], start: int, stop: int) -> str | None:
        """Compare the whole chunks among rows [start, stop) with the digests written beside them."""
        size = self.chunk_size
        first = -(-start // size)  # chunks [first, last) lie wholly inside the rows (the last one may be short)
        last = self.layout.num_chunks if stop >= len(self) else stop // size
        if last <= first:
            return None
        try:
            stored = self.group[CHUNK_DIGEST][first:last]
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

    def rows_problem(self, rows: dict[str, np.ndarray], start: int, stop: int) -> str | None:
        """What is wrong with rows [start, stop) as read, or None."""
        for name, values in rows.items():
            if name.startswith(FEATURES) and not np.isfinite(values).all():
                return f"non-finite teacher features ({name})"
        if not np.isfinite(rows["logits"]).all():
            return "non-finite logits"
        if len(rows["labels"]) and (rows["labels"].min() < 0 or rows["labels"].max() >= self.num_classes):
            return f"labels outside [0, {self.num_classes})"
        if not np.array_equal(rows["index"], np.arange(start, stop)):
            return "sample index out of order"
        return None

    def read_chunk(self, chunk: int, locations=None) -> dict[str, np.ndarray]:
        start = chunk * self.chunk_size
        return self.read_rows(start, min(start + self.chunk_size, len(self)), locations=locations)

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

    def check_pixels(self, raw: np.ndarray, rows: np.ndarray, sample_ids: np.ndarray | None = None) -> None:
        """Refuse the store unless `raw` (the inputs of `rows`, as the source gives them) are the extracted ones.
        `sample_ids`: the dataset's ids of those rows (the split's `ids`: rows of its files), named in the
        refusal; the store's rows are in a seeded random order, so a store row means nothing to a reader."""
        rows = np.asarray(rows, dtype=np.int64)
        ids = rows if sample_ids is None else np.asarray(sample_ids, dtype=np.int64)
        try:
            stored = self.group["pixel_digest"].get_orthogonal_selection((rows,))
        except Exception as exc:  # a damaged digest shard
            raise StoreError(f"{self.path}: {self.split}/pixel_digest cannot be read ({type(exc).__name__}); "
                             "`bkd cache verify` names the bad shard") from None
        mismatch = np.flatnonzero(pixel_digests(raw) != stored)
        if len(mismatch):
            at = mismatch[0]
            where = "" if sample_ids is None else f" (store row {int(rows[at])})"
            raise StoreError(f"{self.path} was built from other inputs: {self.split} sample {int(ids[at])}{where} "
                             f"(and {len(mismatch) - 1} more of {len(rows)} checked) differs from what the teacher saw; "
                             "re-run `bkd extract-teacher --overwrite` for these files")


class StoredImages(Source):
    """The raw source pixels a store holds (`extract.images`), as a `Source` of the split it was built
    from: `read` takes that source's rows (the split's `ids`) and returns the very values the
    teacher's inputs were made from, without decoding an image file.

    The images are stored in blocks of `image_block_rows` rows (one zstd chunk each): zarr costs about
    a millisecond per chunk read whatever its size, several times the decoding of one 256 px image.
    Decoded blocks are kept (least recently used first out, at most `cache_rows` rows' worth), so the
    sampler's windows -- whose rows the batches of a window revisit -- decode each block about once
    per epoch; a mix partner elsewhere in the split costs one block.

    Each row is checked against the store's pixel digests (themselves checked against their chunk
    digests at open) the first time a process reads it, so a rewritten, swapped or corrupt image is
    an error, never another picture; later reads of the row in that process (the next epochs of a
    persistent loader worker) rely on zstd's checksum of every chunk.
    """

    def __init__(self, targets: TeacherTargets, split, cache_rows: int = 0):
        if targets.spec.image_shape is None:
            raise StoreError(f"{targets.path} holds no images (extract.images was off when it was built)")
        if len(split) != len(targets):
            raise StoreError(f"{targets.path}: {targets.split} split has {len(targets)} samples, the dataset has "
                             f"{len(split)}")
        self.path, self.origin = targets.path, f"{targets.path} ({targets.split} images)"
        self.array = targets.arrays[IMAGES]
        self.shape, self.num_classes = targets.spec.image_shape, split.num_classes
        self.labels = split.source.labels
        self.position = np.full(int(split.ids.max()) + 1, -1, np.int64)  # source row -> store row
        self.position[split.ids] = np.arange(len(split))
        digests = targets.group["pixel_digest"][:]
        problem = targets._digest_problem({"pixel_digest": digests}, 0, len(targets))
        if problem:
            raise StoreError(f"{targets.path}: {targets.split}/pixel_digest: {problem}; `bkd cache verify` lists "
                             "every bad shard")
        self.digests = digests
        self.verified = np.zeros(len(digests), bool)
        self.block = int(self.array.chunks[0])  # rows per stored chunk
        self.capacity = max(1, -(-cache_rows // self.block))  # blocks kept
        self._blocks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.blocks_decoded = 0  # for tests and benchmarks

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
        rows = np.asarray(rows, dtype=np.int64)
        at = self.position[np.clip(rows, 0, len(self.position) - 1)]
        if (at < 0).any() or (rows >= len(self.position)).any():
            raise StoreError(f"{self.path}: source rows outside the stored split were asked for")
        out = np.empty((len(at), *self.shape), np.uint8)
        blocks = at // self.block
        needed = set(np.unique(blocks).tolist())
        for block in needed:
            mine = np.flatnonzero(blocks == block)
            out[mine] = self._load_block(block, needed)[at[mine] - block * self.block]
        new = np.flatnonzero(~self.verified[at])  # each row checked the first time this process reads it
        bad = np.flatnonzero(pixel_digests(out[new]) != self.digests[at[new]])
        if len(bad):
            first = new[bad[0]]
            raise StoreError(f"{self.path}: the stored image of sample {int(rows[first])} (store row {int(at[first])}) "
                             "does not match its pixel digest (rewritten or swapped); re-run "
                             "`bkd extract-teacher --overwrite`")
        self.verified[at] = True
        return out


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
            "shards_complete": int(_read_flags(_split_group(root, split, str(path), ("shards_done",)), str(path)).sum()),
            "shards_total": layout.num_shards,
        }
    size = bytes_on_disk(path)
    samples = sum(s["samples"] for s in splits.values())
    sample_views = sum(s["samples"] * s["views"] for s in splits.values())
    split_group = root[next(iter(splits))]
    features = {name[len(FEATURES):]: array for name, array in split_group.arrays() if name.startswith(FEATURES)}
    any_features = next(iter(features.values()))
    return {
        "path": str(path),
        "complete": bool(root.attrs.get("complete", False)),
        "views": {split: s["views"] for split, s in splits.items()},
        "splits": splits,
        "feature_shapes": {loc: list(array.shape[2:]) for loc, array in features.items()},
        "num_classes": manifest["teacher"]["num_classes"],
        "dtypes": {"features": any_features.dtype.name, "logits": manifest["arrays"]["logits"]},
        "codec": ", ".join(f"{type(c).__name__}({getattr(c, 'level', '')})".replace("()", "")
                           for c in any_features.compressors),
        "bytes_on_disk": size,
        "bytes_per_sample": size / samples if samples else 0.0,
        "bytes_per_sample_view": size / sample_views if sample_views else 0.0,
        "manifest": manifest,
    }


def verify_store(path: str | Path) -> Iterator[tuple[str, int, str | None]]:
    """Read every chunk; yield (split, shard, problem or None) for each shard."""
    root = _open_group(str(path))
    manifest = root.attrs["manifest"]
    for split in manifest["splits"]:
        targets = TeacherTargets(path, split, require_complete=False)
        done = set(np.flatnonzero(_read_flags(targets.group, str(path))).tolist())
        sizes = _listing(str(path), split)
        for shard in range(targets.layout.num_shards):
            if shard not in done:
                yield split, shard, "not written (extraction incomplete)"
                continue
            start, stop = targets.layout.shard_rows(shard)
            bad = absent_objects(str(path), shard_keys(targets.group, shard), sizes)
            if bad:
                yield split, shard, f"{bad[0]} is missing or empty"
                continue
            try:
                rows = targets.read_rows(start, stop, validate=False, images=True)
            except StoreError as exc:
                yield split, shard, str(exc).split(": ", 1)[-1]
                continue
            yield split, shard, targets.rows_problem(rows, start, stop)
