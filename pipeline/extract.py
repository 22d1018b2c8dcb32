"""Stage one: run the teacher once and write its targets into the store, shard by shard."""

from __future__ import annotations

import posixpath
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
from pipeline.store import TOPK_INDEX, SplitLayout, StoreWriter, TeacherTargets, filesystem, make_manifest


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


class ShardExtractor:
    """Everything one process needs to compute shards: the teacher, the splits, their views."""

    def __init__(self, cfg: Config, device: torch.device):
        ex = self.ex = cfg.extract
        self.cfg, self.device = cfg, device
        self.splits = {name: load_split(cfg.data, name) for name in ex.splits}
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
        arrays = {}
        for b in range(start, stop, ex.batch_size):
            e = min(b + ex.batch_size, stop)
            for v in range(layout.views):
                images = augmenter.apply(split.load(range(b, e)), params[b - start:e - start, v]).to(self.device)
                f, z = teacher_outputs(self.model, images, ex.features)
                features[b - start:e - start, v] = f.float().cpu().numpy()
                logits[b - start:e - start, v] = z.float().cpu().numpy()
                if on_batch is not None:
                    on_batch(e - b)
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


class store_lock:
    """Refuse a second extraction into the same store while one runs: `STORE.lock` beside it.

    The lock is created exclusively through the store's fsspec filesystem (local files, memory,
    object stores that support exclusive creation) and holds its owner's host and pid; a lock
    left by a dead process on this host is taken over.
    """

    def __init__(self, store: str):
        self.url = f"{str(store).rstrip('/')}.lock"
        self.fs, self.path = filesystem(self.url)

    def __enter__(self):
        import json
        import os
        import socket

        if posixpath.dirname(self.path):
            self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                with self.fs.open(self.path, "xb") as fh:
                    fh.write(json.dumps(me).encode())
                return self
            except FileExistsError:
                try:
                    owner = json.loads(self.fs.cat_file(self.path))
                except (OSError, ValueError):
                    owner = {}
                if owner.get("host") == me["host"] and not _pid_alive(owner.get("pid", -1)):
                    self.fs.rm_file(self.path)  # stale: its process is gone
                    continue
                raise BkdError(f"{self.url[:-len('.lock')]} is being written by another extraction "
                               f"(pid {owner.get('pid')} on {owner.get('host')}); if none is running, "
                               f"delete {self.url}") from None
        raise BkdError(f"cannot take the lock {self.url}")

    def __exit__(self, *exc):
        if self.fs.exists(self.path):
            self.fs.rm_file(self.path)


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0
