"""The store's identity file: a few hundred bytes that name one store, written when its extraction completes.

It holds the digest of the store's manifest (which records the teacher's weights, the split fingerprints
and the moment the store was created), so it changes whenever a store is rebuilt, and only then. DVC
tracks this file in place of the store: the extraction stage's output is the identity file and the
student stages depend on it, so DVC never hashes, copies or deletes a store of hundreds of GiB, local or
at a URL. What guards the store's contents is bkd's own: the manifest digest, checked here against the
file, and the chunk digests every read checks.

A student run refuses a store whose manifest is not the one its identity file names (the store was
replaced since); a run with no identity file reads the store on the store's own checks alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.checkpoint import write_json
from pipeline.errors import StoreError
from pipeline.targets.fsutil import filesystem
from pipeline.targets.spec import manifest_digest

IDENTITY_FORMAT = "bkd-store-identity/1"


def identity_record(manifest: dict) -> dict:
    """What the identity file holds: no path and nothing of this machine, so the same store gives the
    same file wherever it is extracted or read."""
    return {
        "format": IDENTITY_FORMAT,
        "manifest_digest": manifest_digest(manifest),
        "created": manifest.get("created"),
        "teacher_sha256": (manifest.get("teacher") or {}).get("checkpoint_sha256"),
        "splits": {name: {key: split.get(key) for key in ("num_samples", "views", "fingerprint")}
                   for name, split in (manifest.get("splits") or {}).items()},
    }


def read_identity(path: str) -> dict | None:
    """The identity file at `path`; None when there is none. Anything else there is refused."""
    fs, inner = filesystem(path)
    if not fs.exists(inner):
        return None
    if fs.isdir(inner):
        raise StoreError(f"extract.identity {path} is a folder; it names a file, such as cache/NAME.identity.json")
    try:
        record = json.loads(fs.cat_file(inner))
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("format") != IDENTITY_FORMAT:
        raise StoreError(f"{path} exists and is not a bkd store identity file; bkd will not replace it "
                         "(choose another extract.identity)")
    return record


def check_identity_target(path: str, store: str) -> None:
    """Before an extraction: refuse an identity path it must not write (the store or a path inside it,
    however spelt; something else there; a URL while DVC runs the stage, whose outputs outside the
    repository DVC 3 cannot keep)."""
    if "://" not in path and "://" not in store:
        here, there = Path(path).resolve(), Path(store).resolve()
        if here == there or there in here.parents:
            raise StoreError(f"extract.identity {path} is the store {store} or inside it; it is a file of its own, "
                             "such as cache/NAME.identity.json")
    if os.environ.get("DVC_STAGE") and "://" in path:
        raise StoreError(f"extract.identity is {path}, a URL, and DVC runs this stage: DVC tracks the identity file, "
                         "which must lie in the repository (e.g. cache/NAME.identity.json); the store itself may stay "
                         "at its URL")
    read_identity(path)


def write_identity(path: str, manifest: dict) -> None:
    """Write the identity file of the store of `manifest` (atomically for a local path)."""
    fs, inner = filesystem(path)
    record = identity_record(manifest)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        if os.path.dirname(inner):
            os.makedirs(os.path.dirname(inner), exist_ok=True)
        write_json(record, inner)
    else:
        fs.pipe_file(inner, (json.dumps(record, indent=2) + "\n").encode())


def check_identity(path: str, store: str, manifest: dict) -> None:
    """Refuse the store of `manifest` unless the identity file at `path` names it (no file: nothing to check)."""
    record = read_identity(path)
    if record is None:
        return
    have = manifest_digest(manifest)
    if record.get("manifest_digest") != have:
        raise StoreError(f"{store} is not the store {path} names (its manifest digest is {have}, the file records "
                         f"{record.get('manifest_digest')}, created {record.get('created')}): the store was replaced "
                         "since, or the file was written for another store. Run the extraction again "
                         "(`bkd extract-teacher`, or `dvc repro -f -s extract_teacher`), which rewrites the identity "
                         "file for the store there")
