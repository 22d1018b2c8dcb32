"""Where a store lives: fsspec paths, refusing paths that could only be a mistake, recognising a folder
as a bkd store (every object in it one bkd writes), deleting only such a store, and finding the
objects of a shard that are missing or empty.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import re
from pathlib import Path

import fsspec
import zarr

from pipeline.errors import StoreError
from pipeline.locks import PathLock
from pipeline.targets.spec import CHUNK_DIGEST, FLAGS, FORMAT_FAMILY, SPLITS, is_row_array


def filesystem(url: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of a store location: a local path or any fsspec URL zarr accepts.

    fsspec hands out one cached instance per URL kind, and object-store filesystems (s3fs, gcsfs) keep
    the listings they made: objects written since (by zarr's own instance, a worker, another process)
    would read as missing. Its listings are dropped here, so every check starts from the store as it is."""
    fs, path = fsspec.core.url_to_fs(str(url))
    fs.invalidate_cache()
    return fs, path


def store_exists(url: str | Path) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def bytes_on_disk(url: str | Path) -> int:
    fs, path = filesystem(url)
    return fs.du(path)


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


# zarr's local store writes each object to "<name minus suffix>.<uuid hex>.partial" and renames it into
# place: such a file is one of bkd's objects in flight (another writer's) or left by a killed write.
_IN_FLIGHT = re.compile(r"^(?P<stem>.+)\.[0-9a-f]{32}\.partial$")


def is_store_object(parts: tuple[str, ...]) -> bool:
    """Is this path, relative to a store's root, one that bkd writes? (metadata and chunk objects, and
    zarr's temporary file of one being written)"""
    in_flight = _IN_FLIGHT.match(parts[-1]) if parts else None
    if in_flight is not None:
        stem = in_flight["stem"]
        return stem != parts[-1] and is_store_object((*parts[:-1], "zarr.json" if stem == "zarr" else stem))
    if parts == ("zarr.json",):
        return True
    if not parts or parts[0] not in SPLITS:
        return False
    if parts[1:] == ("zarr.json",):
        return True
    return (len(parts) >= 3 and (parts[1] in (CHUNK_DIGEST, FLAGS) or is_row_array(parts[1]))
            and (parts[2:] == ("zarr.json",)
                 or (parts[2] == "c" and len(parts) > 3 and all(p.isdigit() for p in parts[3:]))))


def store_objects(fs, path: str) -> list[tuple[str, ...]]:
    """Every file under `path` (links included, not followed), as path parts relative to it."""
    root = path.rstrip("/")
    found = fs.find(root, withdirs=False)
    return [tuple(posixpath.relpath(p, root).split("/")) for p in found]


def existing_store(url: str) -> dict | None:
    """The manifest of the bkd store at `url`; None if nothing (or only empty folders) is there.

    Anything else there is refused: bkd never writes into, or deletes, what it did not make --
    every object under the folder must be one bkd writes (metadata and chunks of its arrays).
    """
    fs, path = filesystem(url)
    if not fs.exists(path):
        return None
    objects = store_objects(fs, path)
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
    foreign = sorted("/".join(parts) for parts in objects if not is_store_object(parts))
    if foreign:
        raise StoreError(f"{url} holds '{foreign[0]}', which bkd did not write; move it away before replacing "
                         "the store")
    return manifest


def remove_store(url: str) -> None:
    """Delete a bkd store, object by object: only what `existing_store` accepted as bkd's, the split
    folders first and the root metadata (which makes it a store) last, then the folders left empty.

    Killed part-way, what is left still carries the manifest, so the next --overwrite finishes the job.
    """
    fs, path = filesystem(url)
    objects = [parts for parts in store_objects(fs, path) if is_store_object(parts)]
    for parts in sorted(objects, key=lambda p: (p == ("zarr.json",), p)):
        fs.rm_file(posixpath.join(path, *parts))
    for folder in sorted({"/".join(parts[:i]) for parts in objects for i in range(1, len(parts))},
                         key=lambda f: -f.count("/")):
        full = posixpath.join(path, folder)
        if fs.isdir(full) and not fs.ls(full, detail=False):
            fs.rmdir(full)


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


def listing(url: str, prefix: str) -> dict[str, int]:
    """Sizes of every object under `prefix` of the store at `url`, in one listing."""
    fs, root = filesystem(url)
    found = fs.find(posixpath.join(root, prefix), detail=True)
    return {path.rstrip("/"): info.get("size") or 0 for path, info in found.items()}


def store_lock(store: str) -> PathLock:
    """Refuse a second writer of the same store while one runs: `STORE.lock` beside it."""
    return PathLock(f"{str(store).rstrip('/')}.lock", f"{store} is being written by another extraction")


@contextlib.contextmanager
def errors_name(path: str):
    """Give an OSError that names no file (a full disk under a Zarr write) `path`, so its one line says where."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.strerror:
            raise OSError(exc.errno, exc.strerror, path) from None
        raise
