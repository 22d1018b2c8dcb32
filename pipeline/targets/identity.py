"""What a store built from a config is (`expected_spec`), and what a student run checks of the store it opens.

The student takes what was cached -- K views, the feature locations and shapes, top-k logits -- from
the store it opens; its config repeats none of it. It must agree with the store on the rest:
teacher weights, dataset, split (ids and labels), transform, the view-making augmentation and,
sample by sample, the pixels.

The view-making augmentation comes in as its spec (a dict, `ViewAugmenter.spec()`) and a split as any
object with an `ImageSplit`'s attributes, so this contract imports no data-loading or augmentation code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.config import Config
from pipeline.errors import BkdError, StoreError
from pipeline.targets.identity_file import check_identity
from pipeline.targets.reader import TeacherTargets
from pipeline.targets.spec import LOGITS, TargetSpec

# Samples of a lazily read split (image folders, HDF5) whose pixels a training run checks against the store.
PIXEL_CHECK_SAMPLES = 256


def split_views(cfg: Config, split: str) -> int:
    """K views of the training split; the test split is only ever evaluated on clean inputs."""
    return cfg.extract.views if split == "train" else 1


def teacher_sha(cfg: Config, required: bool = True) -> str | None:
    """sha256 of cfg.teacher.checkpoint; None when it is missing and not `required`."""
    ckpt = Path(cfg.teacher.checkpoint)
    if ckpt.is_file():
        return checkpoint.sha256_file(ckpt)
    if required:
        raise BkdError(f"teacher checkpoint not found: {ckpt} (run `bkd train-teacher` or set teacher.checkpoint)")
    return None


def expected_spec(cfg: Config, splits: dict, sha: str | None, view_spec: dict, feature_shapes: dict | None = None,
                  num_features: int | None = None, precision: str | None = None) -> TargetSpec:
    """The spec of the store `cfg` builds from `splits` (ImageSplits), with the teacher's `sha`, the spec of
    the views it makes (`view_spec`: `ViewAugmenter.spec()` of cfg.augment) and the shape of its features at
    each of extract.features (`feature_shapes`, known once the teacher ran).

    `precision` is the resolved autocast dtype of the teacher's forward (pipeline.teacher.fast), recorded as
    teacher.precision: an extraction resumes only a store made at the same precision, while a student reads
    a store made at any (STUDENT_IDENTITY does not list it) and can see how its targets were made."""
    feature_shapes = feature_shapes or {loc: () for loc in cfg.extract.features}
    any_split = next(iter(splits.values()))
    ex = cfg.extract
    return TargetSpec(
        teacher={"model": cfg.teacher.model, "checkpoint_sha256": sha, "small_input_stem": cfg.teacher.small_input_stem,
                 "timesteps": cfg.teacher.timesteps, "model_kwargs": cfg.teacher.model_kwargs,
                 "num_classes": any_split.num_classes, "num_features": num_features, "precision": precision},
        dataset={"name": cfg.data.name, "split_seed": cfg.data.split_seed, "test_size": cfg.data.test_size,
                 "limit": cfg.data.limit, "holdout": cfg.data.holdout},
        splits={name: {"num_samples": len(s), "fingerprint": s.fingerprint(), "views": split_views(cfg, name)}
                for name, s in splits.items()},
        transform={**any_split.transform, "teacher_input_size": cfg.teacher.input_size,
                   "teacher_interpolation": cfg.teacher.interpolation},
        augment=view_spec,
        features={"locations": {loc: list(shape) for loc, shape in feature_shapes.items()},
                  "logits_topk": ex.logits_topk,
                  # only where on: stores without images keep the identity they had
                  **({"images": list(any_split.source_shape), "source_rows": True} if ex.images else {})},
        dtypes={"features": ex.feature_dtype, "logits": ex.logits_dtype},
        codecs={target: ex.codecs.get(target, ex.logits_dtype if target == LOGITS else ex.feature_dtype)
                for target in (*ex.features, LOGITS)},
        chunking={"chunk_size": ex.chunk_size, "chunks_per_shard": ex.chunks_per_shard},
        zstd_level=ex.zstd_level,
    )


def student_teacher_sha(cfg: Config, targets: TeacherTargets, trust_store_teacher: bool = False) -> str:
    """The teacher sha256 a student run expects of `targets`: its checkpoint's. Without the checkpoint the
    store's teacher cannot be checked, which is refused unless `trust_store_teacher` waives it (a store
    copied from another machine): then the store's own."""
    sha = teacher_sha(cfg, required=False)
    if sha is None:
        if not trust_store_teacher:
            raise StoreError(f"teacher checkpoint {cfg.teacher.checkpoint} not found, so the store's teacher cannot "
                             "be checked; fix teacher.checkpoint, or pass --trust-store-teacher to use the store as is")
        tqdm.write(f"warning: {cfg.teacher.checkpoint} not found; trusting the store's teacher (--trust-store-teacher)")
        sha = targets.spec.teacher["checkpoint_sha256"]
    return sha


def check_student_targets(targets: TeacherTargets, cfg: Config, images, sha: str, view_spec: dict,
                          read_stored: bool = False) -> tuple[int, int]:
    """Refuse `targets` unless its split was built for this config's run: from `images` (the split, an
    ImageSplit), by the teacher of `sha`, with views of `view_spec` (`ViewAugmenter.spec()` of cfg.augment).

    Identity comes from the manifest; the inputs themselves are compared by their per-sample
    digests: every sample of an in-memory split, an even spread of PIXEL_CHECK_SAMPLES of a
    lazily read one. With `read_stored` (the run reads the pixels the store holds, not these), samples
    that differ are counted rather than refused: (differing, checked).
    """
    check_identity(cfg.extract.identity_path(), targets.path, targets.manifest)
    expected = expected_spec(cfg, {targets.split: images}, sha, view_spec)
    targets.check_matches(expected.to_manifest())
    rows = np.arange(len(images))
    if not images.in_memory and len(rows) > PIXEL_CHECK_SAMPLES:
        rows = np.unique(np.linspace(0, len(rows) - 1, PIXEL_CHECK_SAMPLES).round().astype(np.int64))
    if not read_stored:
        targets.check_pixels(images.load_raw(rows), rows, images.ids[rows])
        return 0, len(rows)
    return len(targets.pixel_mismatches(images.load_raw(rows), rows)), len(rows)
