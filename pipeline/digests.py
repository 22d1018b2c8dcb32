"""The digests that tie a store to the data it was made from: a split's fingerprint (its sample ids and
labels, in row order) and each sample's pixel digest. Extraction writes them, the dataset computes them
(`ImageSplit.fingerprint`), a student run and `bkd cache verify` compare them; one definition of each."""

from __future__ import annotations

import hashlib

import numpy as np


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


def split_fingerprint(ids: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of a split's sample ids and labels, in its row order: the `splits.<split>.fingerprint` of a store."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()
