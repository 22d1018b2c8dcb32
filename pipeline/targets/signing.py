"""Signed stores: an HMAC-SHA256, under a key a team holds, of everything a reader checks a store against.

The chunk digests are checksums: whoever can write a store can rewrite rows and their digests together.
A signature closes that for a shared store (a DVC remote, a bucket). It covers the manifest (its digest)
and every split's chunk digests, which cover every row of every array; readers holding the key check it
once when they open a store and then check rows against the digests they checked, not ones read later.

The key is the environment's, never the config's (params.yaml is committed): `BKD_STORE_KEY` (the key
itself, e.g. a CI secret) or `BKD_STORE_KEY_FILE` (a file holding it). With a key set, extraction signs
what it completes, and `bkd cache verify`, training and evaluation refuse a store that is unsigned,
signed with another key, or changed since it was signed. Without one, signatures are neither written nor
checked: an unsigned store works as it always has. HMAC (the standard library's) needs no key pairs; its
limit is that whoever can verify can also sign.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import numpy as np
import zarr

from pipeline.errors import BkdError, StoreError
from pipeline.targets.spec import CHUNK_DIGEST, manifest_digest

KEY_ENV, KEY_FILE_ENV = "BKD_STORE_KEY", "BKD_STORE_KEY_FILE"
SIGNATURE = "signature"  # the root attribute: {"scheme", "key_id", "mac"}
SCHEME = "hmac-sha256"


def store_key() -> bytes | None:
    """The signing key the environment configures, or None; a variable set but unusable is an error
    (an empty secret would otherwise turn every check off unnoticed)."""
    value, file = os.environb.get(KEY_ENV.encode()), os.environ.get(KEY_FILE_ENV)  # the key as bytes, whatever they are
    if value is not None and file is not None:
        raise BkdError(f"both {KEY_ENV} and {KEY_FILE_ENV} are set: set one")
    if file is not None:
        try:
            key = Path(file).read_bytes().strip()
        except OSError as exc:
            raise BkdError(f"{KEY_FILE_ENV}={file}: cannot read the key ({exc.strerror or exc})") from None
        if not key:
            raise BkdError(f"{KEY_FILE_ENV}={file}: the key file is empty")
        return key
    if value is not None and not value.strip():
        raise BkdError(f"{KEY_ENV} is set but empty")
    return value.strip() if value is not None else None


def key_id(key: bytes) -> str:
    """A short name for a key that does not reveal it: which key signed a store."""
    return hmac.new(key, b"bkd store key id", hashlib.sha256).hexdigest()[:16]


def signed_digests(root: zarr.Group, path: str) -> tuple[bytes, dict[str, np.ndarray]]:
    """(sha256 of the manifest's digest and every split's chunk digests, those chunk digests by split)."""
    manifest = root.attrs["manifest"]
    content = hashlib.sha256(f"bkd signed store\n{manifest_digest(manifest)}\n".encode())
    digests = {}
    for split in sorted(manifest["splits"]):
        try:
            values = np.ascontiguousarray(root[split][CHUNK_DIGEST][:], dtype="<u8")
        except Exception as exc:  # absent (a store of a format before chunk digests) or damaged
            raise StoreError(f"{path}: {split}/{CHUNK_DIGEST} cannot be read ({type(exc).__name__}), so the store "
                             "cannot be signed or its signature checked; `bkd cache verify` says more") from None
        content.update(f"{split}:{values.shape}\n".encode())
        content.update(values.tobytes())
        digests[split] = values
    return content.digest(), digests


def signature_problem(root: zarr.Group, path: str, key: bytes) -> tuple[str | None, dict[str, np.ndarray]]:
    """(what is wrong with the store's signature under `key`, or None; the chunk digests it covers)."""
    signature = root.attrs.get(SIGNATURE)
    if signature is None:
        return "it is unsigned", {}
    if not isinstance(signature, dict) or signature.get("scheme") != SCHEME:
        return f"its signature is not a {SCHEME} one bkd wrote", {}
    if signature.get("key_id") != key_id(key):
        return f"it was signed with another key (key id {signature.get('key_id')}; yours is {key_id(key)})", {}
    try:
        content, digests = signed_digests(root, path)
    except StoreError as exc:
        return str(exc).split(": ", 1)[-1], {}
    mac = str(signature.get("mac", "")).encode("utf-8", "surrogatepass")
    if not hmac.compare_digest(mac, hmac.new(key, content, hashlib.sha256).hexdigest().encode()):
        return f"its signature does not match its contents ({CHANGED})", {}
    return None, digests


def check_signature(root: zarr.Group, path: str) -> dict[str, np.ndarray] | None:
    """With a key configured, the store's chunk digests by split, as signed; a store that is unsigned,
    signed with another key or changed since is refused in one line. Without a key, None."""
    key = store_key()
    if key is None:
        return None
    problem, digests = signature_problem(root, path, key)
    if problem:
        raise StoreError(f"{path}: {problem}, and a signing key is set ({key_env()}); only a store signed with it "
                         f"is read ({fix(problem)})")
    return digests


CHANGED = "changed since it was signed"


def fix(problem: str) -> str:
    """What to do about a signature problem: a store changed under its key is rebuilt, not signed again."""
    if CHANGED in problem:
        return ("its rows or digests were rewritten after signing: rebuild it with `bkd extract-teacher "
                "--overwrite`, or find out who changed it")
    return "`bkd cache sign` signs one after verifying it, if you vouch for its contents"


def sign_store(root: zarr.Group, path: str, key: bytes, checked: bytes | None = None) -> str:
    """Sign the store under `key` (`checked`: the content digest it must still have, as verified); returns
    the key id."""
    content, _ = signed_digests(root, path)
    if checked is not None and content != checked:
        raise StoreError(f"{path}: not signed, it changed while it was verified")
    root.attrs[SIGNATURE] = {"scheme": SCHEME, "key_id": key_id(key),
                             "mac": hmac.new(key, content, hashlib.sha256).hexdigest()}
    return key_id(key)


def sign_extracted(root: zarr.Group, path: str, wrote: int, total: int) -> str | None:
    """After an extraction completed the store at `path`, writing `wrote` of its `total` shards: with a key
    set, sign it if this run wrote any of it (the key holder vouches for what their extraction completes,
    shards a resumed extraction found included, which the line says). A store this run wrote none of keeps
    its signature, and one unsigned (or signed otherwise) stays so: nothing this run did vouches for it.
    Returns the line to print (None without a key)."""
    key = store_key()
    if key is None:
        return None
    if wrote:
        found = (f"; {total - wrote} of its {total} shards were there before this run, and the signature vouches "
                 "for them too" if wrote < total else "")
        return f"{path}: signed (key id {sign_store(root, path, key)}{found})"
    problem, _ = signature_problem(root, path, key)
    if problem:
        return (f"warning: {path} is not signed with the key set ({problem}); this run extracted none of it, so "
                "it signs none of it: `bkd cache sign` (which verifies it first), if you trust its contents")
    return f"{path}: signed (key id {key_id(key)})"


def key_env() -> str:
    """The variable that configures the key (for messages)."""
    return KEY_FILE_ENV if os.environ.get(KEY_FILE_ENV) is not None else KEY_ENV
