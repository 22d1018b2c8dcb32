"""What a store holds (`store_info`) and whether every shard of it reads back whole (`verify_store`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.errors import StoreError
from pipeline.targets.fields import sample_ids_problem
from pipeline.targets.fsutil import absent_objects, bytes_on_disk, listing, shard_keys
from pipeline.targets.manifest import open_group, read_flags, split_group
from pipeline.targets.reader import TeacherTargets
from pipeline.targets.signing import SIGNATURE, key_env, signature_problem, store_key
from pipeline.targets.spec import FEATURES, FLAGS, LOGITS, SOURCE_ROW, SplitLayout, TargetSpec


def store_info(path: str | Path) -> dict[str, Any]:
    """The store's splits, shards written, feature shapes, dtypes, codec, size on disk and manifest; a store whose
    arrays are not the ones its manifest makes them is refused (`verify_store` lists what else is wrong)."""
    root = open_group(str(path))
    manifest = root.attrs["manifest"]
    for split in manifest["splits"]:  # arrays the manifest does not describe: refused, as training does
        TeacherTargets(path, split, require_complete=False, signed=False)
    chunking = manifest["chunking"]
    splits = {}
    for split, meta in manifest["splits"].items():
        layout = SplitLayout(meta["num_samples"], chunking["chunk_size"], chunking["chunks_per_shard"],
                             meta["views"])
        splits[split] = {
            "samples": layout.num_samples,
            "views": layout.views,
            "shards_complete": int(read_flags(split_group(root, split, str(path), (FLAGS,)), str(path)).sum()),
            "shards_total": layout.num_shards,
        }
    size = bytes_on_disk(path)
    samples = sum(s["samples"] for s in splits.values())
    sample_views = sum(s["samples"] * s["views"] for s in splits.values())
    first_group = root[next(iter(splits))]
    features = {name[len(FEATURES):]: array for name, array in first_group.arrays() if name.startswith(FEATURES)}
    any_features = next(iter(features.values()))
    return {
        "path": str(path),
        "complete": bool(root.attrs.get("complete", False)),
        "views": {split: s["views"] for split, s in splits.items()},
        "splits": splits,
        "feature_shapes": {loc: list(array.shape[2:]) for loc, array in features.items()},
        "num_classes": manifest["teacher"]["num_classes"],
        "dtypes": {"features": any_features.dtype.name, "logits": manifest["arrays"]["logits"]},
        "codecs": {target: TargetSpec.from_manifest(manifest).codec(target) for target in (*features, LOGITS)},
        "codec": ", ".join(f"{type(c).__name__}({getattr(c, 'level', '')})".replace("()", "")
                           for c in any_features.compressors),
        "bytes_on_disk": size,
        "bytes_per_sample": size / samples if samples else 0.0,
        "bytes_per_sample_view": size / sample_views if sample_views else 0.0,
        "manifest": manifest,
        "signature": signature_status(root, str(path)),
    }


def signature_status(root, path: str) -> dict[str, Any] | None:
    """The store's signature (key id), and whether it holds under the configured key: None if unsigned."""
    signature = root.attrs.get(SIGNATURE)
    if signature is None:
        return None
    key = store_key()
    problem = signature_problem(root, path, key)[0] if key is not None else None
    return {"key_id": signature.get("key_id") if isinstance(signature, dict) else None,
            "checked": key is not None, "problem": problem}


def verify_store(path: str | Path, signature: bool = True) -> Iterator[tuple[str, int | None, str | None]]:
    """Read every chunk; yield (split, shard, problem or None) for each shard, each field checked by its codec,
    and (split or "", None, problem) for what makes a whole split (or the store) unreadable to training
    (with `signature` and a signing key set, a store not signed with it)."""
    root = open_group(str(path))  # a store that cannot be opened (its manifest damaged or edited) is refused
    manifest = root.attrs["manifest"]
    if not root.attrs.get("complete", False):
        yield "", None, "the store is not marked complete (extraction did not finish); training refuses it"
    key = store_key() if signature else None
    problem = signature_problem(root, str(path), key)[0] if key is not None else None
    if problem:
        yield "", None, f"{problem}, and a signing key is set ({key_env()}): training refuses it"
    for split in manifest["splits"]:
        try:
            targets = TeacherTargets(path, split, require_complete=False, signed=False)
        except StoreError as exc:  # what a reader refuses before any shard: arrays the manifest does not describe
            yield split, None, str(exc).split(": ", 1)[-1]
            continue
        done = set(np.flatnonzero(read_flags(targets.group, str(path))).tolist())
        sizes = listing(str(path), split)
        ids = []  # with stored sample ids: (ids, labels) of every shard read, for the split's fingerprint
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
            if targets.spec.source_rows:
                ids.append((rows[SOURCE_ROW], rows["labels"]))
            yield split, shard, targets.check_rows(rows, start, stop)
        if targets.spec.source_rows and len(ids) == targets.layout.num_shards:
            problem = sample_ids_problem(*(np.concatenate(column) for column in zip(*ids)),
                                         targets.spec.splits[split]["fingerprint"])
            if problem:
                yield split, None, problem

