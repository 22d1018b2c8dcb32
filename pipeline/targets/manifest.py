"""Opening a store as bkd's: its format, a manifest a reader can use, the groups and flags of its
splits, and the chunk digests that tie every chunk of every row array to its place.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import zarr

from pipeline.errors import StoreError
from pipeline.targets.fsutil import store_exists
from pipeline.targets.codecs import CODECS
from pipeline.targets.spec import (DIGEST_SINCE, FLAGS, FORMAT, FORMAT_FAMILY, READABLE_FORMATS, SPLITS,
                                   format_version, manifest_digest, older_format, short)

MANIFEST_KEYS = ("teacher", "dataset", "splits", "transform", "augment", "features", "arrays", "chunking")


def check_format(url: str, manifest: dict, read: bool = False) -> None:
    """Refuse a bkd store of another format, saying why an older one cannot be used and how to rebuild it
    (`read`: for reading, which takes the older formats a reader still understands as they are)."""
    found = manifest.get("format")
    if found != FORMAT and not (read and found in READABLE_FORMATS):
        raise StoreError(f"{url} holds a store of format {found}, this bkd reads and writes {FORMAT}"
                         f"{older_format(found)}; rebuild it with `bkd extract-teacher --overwrite`")


def manifest_damage(manifest: dict) -> str | None:
    """What makes a manifest unusable (a section missing, a field of the wrong type or range), or None."""
    missing = [key for key in MANIFEST_KEYS if not isinstance(manifest.get(key), dict)]
    return f"'{missing[0]}' is missing" if missing else manifest_problem(manifest)


def manifest_problem(manifest: dict) -> str | None:
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
        checks += [(f"splits.{split}.num_samples", meta.get("num_samples"), 0),
                   (f"splits.{split}.views", meta.get("views"), 1)]
    for field, value, low in checks:
        if not count(value, low):
            return f"{field} is {short(value)} (expected an integer >= {low})"
    codecs = manifest.get("codecs", {})
    for key, name in codecs.items() if isinstance(codecs, dict) else [("", codecs)]:
        if name not in CODECS:
            return f"codecs{'.' + key if key else ''} is {short(name)} (known codecs: {', '.join(CODECS)})"
    dtypes = manifest.get("dtypes", {})
    for key in ("features", "logits"):
        value = dtypes.get(key, "float16") if isinstance(dtypes, dict) else dtypes
        if value not in CODECS:
            return f"dtypes{'.' + key if isinstance(dtypes, dict) else ''} is {short(value)}"
    return None


def open_group(path: str, mode: str = "r") -> zarr.Group:
    """The root group of the bkd store at `path`, refused in one line unless it is one of a format this
    bkd reads, with a usable manifest."""
    if not store_exists(path):
        raise StoreError(f"teacher-target store not found: {path} (create it with `bkd extract-teacher`)")
    try:
        group = zarr.open_group(path, mode=mode)
    except Exception as exc:
        raise StoreError(f"{path}: not a readable Zarr store ({type(exc).__name__}: {exc})") from None
    manifest = group.attrs.get("manifest", {})
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found not in READABLE_FORMATS:
        if isinstance(found, str) and found.startswith(FORMAT_FAMILY):
            check_format(path, manifest, read=True)
        raise StoreError(f"{path}: not a bkd teacher-target store (no '{FORMAT}' manifest)")
    damage = manifest_damage(manifest)
    if damage:
        raise StoreError(f"{path}: damaged manifest, {damage}; re-run `bkd extract-teacher --overwrite`")
    if format_version(found) >= DIGEST_SINCE and group.attrs.get("manifest_digest") != manifest_digest(manifest):
        raise StoreError(f"{path}: damaged manifest, it does not match the digest written with it (edited after "
                         "extraction?); re-run `bkd extract-teacher --overwrite`")
    return group


def split_group(root: zarr.Group, split: str, path: str, names: tuple[str, ...]) -> zarr.Group:
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


def read_flags(group: zarr.Group, path: str) -> np.ndarray:
    """The split's `shards_done` flags, refused in one line if they cannot be read."""
    try:
        return group[FLAGS][:]
    except Exception as exc:  # a damaged flag chunk: zstd / codec errors
        raise StoreError(f"{path}: damaged store, {group.path}/shards_done cannot be read ({type(exc).__name__}); "
                         "re-run `bkd extract-teacher --overwrite`") from None


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
