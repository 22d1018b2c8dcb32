"""Stage one: run the teacher once and write its targets into the store, shard by shard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.augment import ViewAugmenter, view_augmenter
from pipeline.config import Config
from pipeline.data import ImageSplit, load_splits
from pipeline.errors import BkdError, StoreError
from pipeline.locks import PathLock
from pipeline.models import create_teacher, teacher_outputs
from pipeline.store import (TOPK_INDEX, SplitLayout, StoreWriter, TeacherTargets, check_store_location,
                            existing_store, make_manifest, pixel_digests)

# Samples of a lazily read split (image folders, HDF5) whose pixels a training run checks against the store.
PIXEL_CHECK_SAMPLES = 256


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


def open_student_targets(cfg: Config, split: str, images: ImageSplit, trust_store_teacher: bool = False) -> TeacherTargets:
    """Open the store for `split` and refuse it unless it was built for this config's run.

    Identity (teacher weights, dataset, split, transform, views) comes from the manifest; the
    inputs themselves are compared by their per-sample digests: every sample of an in-memory
    split, an even spread of PIXEL_CHECK_SAMPLES of a lazily read one. Without the teacher
    checkpoint the store's teacher cannot be checked, which is refused unless
    `trust_store_teacher` waives it (a store copied from another machine, say).
    """
    targets = TeacherTargets(cfg.extract.store, split)
    expected = expected_manifest(cfg, {split: images}, require_checkpoint=False)
    if expected["teacher"]["checkpoint_sha256"] is None:
        if not trust_store_teacher:
            raise StoreError(f"teacher checkpoint {cfg.teacher.checkpoint} not found, so the store's teacher cannot "
                             "be checked; fix teacher.checkpoint, or pass --trust-store-teacher to use the store as is")
        tqdm.write(f"warning: {cfg.teacher.checkpoint} not found; trusting the store's teacher (--trust-store-teacher)")
        expected["teacher"]["checkpoint_sha256"] = targets.manifest["teacher"]["checkpoint_sha256"]
    targets.check_matches(expected)
    rows = np.arange(len(images))
    if not images.in_memory and len(rows) > PIXEL_CHECK_SAMPLES:
        rows = np.unique(np.linspace(0, len(rows) - 1, PIXEL_CHECK_SAMPLES).round().astype(np.int64))
    targets.check_pixels(images.load_raw(rows)[0], rows)
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
    bad = next((name for name, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all()), None)
    if bad is not None:
        raise BkdError(f"{weights}: tensor '{bad}' holds NaN or infinite values; these teacher weights are broken")
    return model.eval()


class ShardExtractor:
    """Everything one process needs to compute shards: the teacher, the splits, their views."""

    def __init__(self, cfg: Config, device: torch.device):
        ex = self.ex = cfg.extract
        self.cfg, self.device = cfg, device
        self.splits = load_splits(cfg.data, ex.splits)
        first = next(iter(self.splits.values()))
        self.num_classes = first.num_classes
        self.model = load_teacher(cfg, first).to(device)
        if ex.logits_topk is not None and ex.logits_topk > first.num_classes:
            raise BkdError(f"extract.logits_topk is {ex.logits_topk}, but the teacher has only "
                           f"{first.num_classes} classes")
        self.manifest = expected_manifest(cfg, self.splits, num_features=self.model.num_features)
        self.layouts = {name: SplitLayout(len(s), ex.chunk_size, ex.chunks_per_shard, split_views(cfg, name))
                        for name, s in self.splits.items()}
        self.augmenters = {name: view_augmenter(cfg.augment, s) for name, s in self.splits.items()}
        with torch.no_grad():  # the feature shape: (C,) pre-logits or the (C, H, W) map
            probe = first.load([0]).to(device)
            self.feature_shape = tuple(teacher_outputs(self.model, probe, ex.features)[0].shape[1:])

    def open_writer(self, overwrite: bool = False) -> StoreWriter:
        ex = self.ex
        return StoreWriter(ex.store, self.manifest, self.layouts, self.feature_shape, self.num_classes,
                           len(self.augmenters[ex.splits[0]].param_names), ex.feature_dtype, ex.logits_dtype,
                           ex.zstd_level, overwrite=overwrite, logits_topk=ex.logits_topk)

    def compute(self, name: str, shard: int, on_batch=None) -> dict[str, np.ndarray]:
        """The arrays of one shard: all its samples, all their views."""
        ex, split, layout, augmenter = self.ex, self.splits[name], self.layouts[name], self.augmenters[name]
        start, stop = layout.shard_rows(shard)
        params = augmenter.draw(np.arange(start, stop), layout.views)
        features = np.empty((stop - start, layout.views, *self.feature_shape), np.float32)
        logits = np.empty((stop - start, layout.views, self.num_classes), np.float32)
        digests = np.empty(stop - start, np.uint64)
        arrays = {}
        for b in range(start, stop, ex.batch_size):
            e = min(b + ex.batch_size, stop)
            raw, clean = split.load_raw(range(b, e))  # one read per batch, whatever the number of views
            digests[b - start:e - start] = pixel_digests(raw)
            for v in range(layout.views):
                images = augmenter.apply(clean, params[b - start:e - start, v]).to(self.device)
                f, z = teacher_outputs(self.model, images, ex.features)
                features[b - start:e - start, v] = f.float().cpu().numpy()
                logits[b - start:e - start, v] = z.float().cpu().numpy()
                if on_batch is not None:
                    on_batch(e - b)
        for name, values in (("features", features), ("logits", logits)):
            if not np.isfinite(values).all():
                raise BkdError(f"the teacher produced non-finite {name} on {split.split} shard {shard} "
                               f"(rows {start}:{stop}); nothing of that shard was written")
        if ex.logits_topk is not None:
            values, classes = torch.from_numpy(logits).topk(ex.logits_topk, dim=-1)
            logits, arrays[TOPK_INDEX] = values.numpy(), classes.numpy().astype(np.int32)
        return {
            **arrays,
            "features": features.astype(ex.feature_dtype),
            "logits": logits.astype(ex.logits_dtype),
            "view_params": params,
            "labels": split.labels[start:stop].numpy(),
            "index": np.arange(start, stop, dtype=np.int64),
            "pixel_digest": digests,
        }


_WORKER_STATE: dict = {}  # per dask worker process: the extractor and writer, built once


def _worker_device(name: str) -> torch.device:
    """One GPU per worker when there are several: worker k takes cuda:(k mod count)."""
    if name.startswith("cuda") and ":" not in name and torch.cuda.device_count() > 1:
        from distributed import get_worker

        worker = str(get_worker().name)
        return torch.device(f"cuda:{int(worker) % torch.cuda.device_count() if worker.isdigit() else 0}")
    return torch.device(name)


def _extract_shard_task(cfg: Config, device_name: str, name: str, shard: int, threads: int | None) -> int:
    key = (repr(cfg), device_name)
    if key not in _WORKER_STATE:
        _WORKER_STATE.clear()
        if threads is not None:  # workers sharing one machine must not each use every core
            torch.set_num_threads(threads)
        extractor = ShardExtractor(cfg, _worker_device(device_name))
        _WORKER_STATE[key] = (extractor, extractor.open_writer())
    extractor, writer = _WORKER_STATE[key]
    writer.write_shard(name, shard, extractor.compute(name, shard))
    start, stop = extractor.layouts[name].shard_rows(shard)
    return (stop - start) * extractor.layouts[name].views


def extract_teacher(cfg: Config, device: torch.device, overwrite: bool = False, workers: int = 1,
                    scheduler: str | None = None) -> dict:
    """Write the teacher's features and logits for every configured split, shard by shard.

    Only missing shards are computed, so re-running after a crash resumes. With `workers` > 1
    the shards run on a dask LocalCluster of that many processes (or on the cluster at
    `scheduler`); each worker loads the teacher once and writes its shards itself.
    """
    local = workers <= 1 and scheduler is None
    check_store_location(cfg.extract.store)  # before any heavy work: a path bkd must not write to,
    existing_store(cfg.extract.store)  # or something there that bkd did not make
    # With dask, this process only plans and records shards: it keeps its teacher copy (needed for
    # the manifest's feature shape) off the GPUs the workers use.
    extractor = ShardExtractor(cfg, device if local else torch.device("cpu"))
    with store_lock(cfg.extract.store):
        writer = extractor.open_writer(overwrite)
        missing = [(name, shard) for name in extractor.splits for shard in writer.missing_shards(name)]
        total = sum(np.diff(extractor.layouts[n].shard_rows(s))[0] * extractor.layouts[n].views for n, s in missing)
        with tqdm(total=total, desc="extract", unit="view", dynamic_ncols=True) as bar:
            if local:
                for name, shard in missing:
                    writer.write_shard(name, shard, extractor.compute(name, shard, bar.update))
            else:
                _run_on_dask(cfg, str(device), missing, workers, scheduler, bar)
        writer.finish()
    return {"store": str(cfg.extract.store), "shards_written": len(missing),
            "num_features": extractor.model.num_features}


def _run_on_dask(cfg: Config, device: str, shards: list, workers: int, scheduler: str | None, bar) -> None:
    from distributed import Client, LocalCluster, as_completed

    import os

    threads = None
    if scheduler is not None:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        threads = max(1, (os.cpu_count() or 1) // workers)
    try:
        futures = [client.submit(_extract_shard_task, cfg, device, name, shard, threads, pure=False)
                   for name, shard in shards]
        for future in as_completed(futures):
            bar.update(future.result())  # re-raises a worker's error here
    finally:
        client.close()
        if scheduler is None:
            cluster.close()


def store_lock(store: str) -> PathLock:
    """Refuse a second extraction into the same store while one runs: `STORE.lock` beside it."""
    return PathLock(f"{str(store).rstrip('/')}.lock", f"{store} is being written by another extraction")
