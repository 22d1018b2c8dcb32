"""Stage one: run the teacher once and write its targets into the store, shard by shard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.augment import ViewAugmenter, view_augmenter
from pipeline.config import Config
from pipeline.data import ImageSplit, load_split
from pipeline.errors import BkdError
from pipeline.models import create_teacher, teacher_outputs
from pipeline.store import TOPK_INDEX, SplitLayout, StoreWriter, TeacherTargets, make_manifest


def split_views(cfg: Config, split: str) -> int:
    """K views of the training split; the test split is only ever evaluated on clean inputs."""
    return cfg.extract.views if split == "train" else 1


def expected_manifest(cfg: Config, splits: dict[str, ImageSplit], require_checkpoint: bool = True,
                      num_features: int | None = None) -> dict:
    """The identity a store built from this config records (and a training run must find)."""
    ckpt = Path(cfg.teacher.checkpoint)
    if ckpt.is_file():
        sha = checkpoint.sha256_file(ckpt)
    elif require_checkpoint:
        raise BkdError(f"teacher checkpoint not found: {ckpt} (run `bkd train-teacher` or set teacher.checkpoint)")
    else:
        sha = None  # cannot be checked: compared as missing, so the store must agree it is unknown
    any_split = next(iter(splits.values()))
    augment = ViewAugmenter(cfg.augment, tuple(any_split.image_shape)).spec()
    return make_manifest(
        teacher={"model": cfg.teacher.model, "checkpoint_sha256": sha,
                 "small_input_stem": cfg.teacher.small_input_stem, "logits_topk": cfg.extract.logits_topk,
                 "features": cfg.extract.features,
                 "num_classes": any_split.num_classes, "num_features": num_features},
        dataset={"name": cfg.data.name, "split_seed": cfg.data.split_seed,
                 "test_size": cfg.data.test_size, "limit": cfg.data.limit},
        splits={name: {"num_samples": len(s), "fingerprint": s.fingerprint(), "views": split_views(cfg, name)}
                for name, s in splits.items()},
        transform={**any_split.transform, "teacher_input_size": cfg.teacher.input_size},
        augment=augment,
        arrays={"features": cfg.extract.feature_dtype, "logits": cfg.extract.logits_dtype,
                "view_params": "int32", "labels": "int64", "index": "int64",
                **({TOPK_INDEX: "int32"} if cfg.extract.logits_topk else {})},
        chunking={"chunk_size": cfg.extract.chunk_size, "chunks_per_shard": cfg.extract.chunks_per_shard},
    )


def open_student_targets(cfg: Config, split: str, images) -> TeacherTargets:
    """Open the store for `split` and refuse it unless it was built for this config's run."""
    targets = TeacherTargets(cfg.extract.store, split)
    expected = expected_manifest(cfg, {split: images}, require_checkpoint=False)
    if expected["teacher"]["checkpoint_sha256"] is None:
        # Only the store is here (e.g. copied from another machine): trust its teacher hash.
        tqdm.write(f"warning: {cfg.teacher.checkpoint} not found; the store's teacher checkpoint hash is not checked")
        expected["teacher"]["checkpoint_sha256"] = targets.manifest["teacher"]["checkpoint_sha256"]
    targets.check_matches(expected)
    return targets


def load_teacher(cfg: Config, split: ImageSplit, weights: str | None = None) -> torch.nn.Module:
    """The timm teacher with `weights` (default: cfg.teacher.checkpoint) loaded, in eval mode."""
    weights = weights or cfg.teacher.checkpoint
    model = create_teacher(cfg.teacher, split.num_classes, split.image_shape[-3])
    state = checkpoint.load_weights(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise BkdError(f"{weights} does not fit teacher.model '{cfg.teacher.model}': "
                       f"{str(exc).splitlines()[1] if len(str(exc).splitlines()) > 1 else exc}") from None
    return model.eval()


def extract_teacher(cfg: Config, device: torch.device, overwrite: bool = False) -> dict:
    """Write the teacher's pre-logits and logits for every configured split; resume if interrupted."""
    ex = cfg.extract
    store = ex.store
    splits = {name: load_split(cfg.data, name) for name in ex.splits}
    first = next(iter(splits.values()))
    model = load_teacher(cfg, first).to(device)
    manifest = expected_manifest(cfg, splits, num_features=model.num_features)
    topk = ex.logits_topk
    if topk is not None and topk > first.num_classes:
        raise BkdError(f"extract.logits_topk is {topk}, but the teacher has only {first.num_classes} classes")
    layouts = {name: SplitLayout(len(s), ex.chunk_size, ex.chunks_per_shard, split_views(cfg, name))
               for name, s in splits.items()}
    augmenters = {name: view_augmenter(cfg.augment, s) for name, s in splits.items()}
    with torch.no_grad():  # the feature shape: (C,) pre-logits or the (C, H, W) map
        probe = first.load([0]).to(device)
        feature_shape = tuple(teacher_outputs(model, probe, ex.features)[0].shape[1:])
    writer = StoreWriter(store, manifest, layouts, feature_shape, first.num_classes,
                         len(augmenters[ex.splits[0]].param_names), ex.feature_dtype, ex.logits_dtype,
                         ex.zstd_level, overwrite=overwrite, logits_topk=topk)
    written = 0
    for name, split in splits.items():
        layout, augmenter = layouts[name], augmenters[name]
        missing = writer.missing_shards(name)
        bar = tqdm(total=sum(np.diff(layout.shard_rows(s))[0] for s in missing) * layout.views,
                   desc=f"extract {name}", unit="view", dynamic_ncols=True)
        for shard in missing:
            start, stop = layout.shard_rows(shard)
            params = augmenter.draw(np.arange(start, stop), layout.views)
            features = np.empty((stop - start, layout.views, *feature_shape), np.float32)
            logits = np.empty((stop - start, layout.views, first.num_classes), np.float32)
            arrays = {}
            for b in range(start, stop, ex.batch_size):
                e = min(b + ex.batch_size, stop)
                for v in range(layout.views):
                    images = augmenter.apply(split.load(range(b, e)), params[b - start:e - start, v]).to(device)
                    f, z = teacher_outputs(model, images, ex.features)
                    features[b - start:e - start, v] = f.float().cpu().numpy()
                    logits[b - start:e - start, v] = z.float().cpu().numpy()
                    bar.update(e - b)
            if topk is not None:
                values, classes = torch.from_numpy(logits).topk(topk, dim=-1)
                logits, arrays[TOPK_INDEX] = values.numpy(), classes.numpy().astype(np.int32)
            writer.write_shard(name, shard, {
                **arrays,
                "features": features.astype(ex.feature_dtype),
                "logits": logits.astype(ex.logits_dtype),
                "view_params": params,
                "labels": split.labels[start:stop].numpy(),
                "index": np.arange(start, stop, dtype=np.int64),
            })
            written += 1
        bar.close()
    writer.finish()
    return {"store": str(store), "shards_written": written, "num_features": model.num_features}
