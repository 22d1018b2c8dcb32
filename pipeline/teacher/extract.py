"""Stage one: run the teacher once and write its targets into the store, shard by shard."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.augment import partner_inputs, view_augmenter
from pipeline.config import Config
from pipeline.data import data_loader, load_splits
from pipeline.dvcrepo import dvc_copies
from pipeline.errors import BkdError
from pipeline.rawviews import device_batches
from pipeline.teacher.fast import prepare_teacher, resolve_extract
from pipeline.teacher.models import load_teacher, teacher_outputs
from pipeline.teacher.plan import check_fits
from pipeline.targets.codecs import CodecError, get_codec
from pipeline.targets.fsutil import errors_name, store_lock
from pipeline.targets.signing import sign_extracted, store_key
from pipeline.targets import (IMAGES, SOURCE_ROW, TOPK_TARGET_CLASS, StoreWriter, check_format, check_identity_target,
                              check_store_location, existing_store, expected_spec, feature_array, pixel_digests,
                              teacher_sha, write_identity)


class ShardExtractor:
    """Everything one process needs to compute shards: the teacher, the splits, their views."""

    def __init__(self, cfg: Config, device: torch.device):
        ex = self.ex = cfg.extract
        self.cfg, self.device = cfg, device
        self.splits = load_splits(cfg.data, ex.splits)
        first = next(iter(self.splits.values()))
        if ex.images and first.encoding != "direct":
            raise BkdError(f"extract.images stores uint8 image pixels, and {cfg.data.name} samples are float event "
                           "frames; leave extract.images off for it")
        self.num_classes = first.num_classes
        sha = teacher_sha(cfg)
        self.model = load_teacher(cfg.teacher, first.num_classes, first.image_shape).to(device)
        self.teacher = prepare_teacher(self.model, device, ex, teacher_outputs)  # precision, channels_last, compile
        if ex.logits_topk is not None and ex.logits_topk > first.num_classes:
            raise BkdError(f"extract.logits_topk is {ex.logits_topk}, but the teacher has only "
                           f"{first.num_classes} classes")
        self.augmenters = {name: view_augmenter(cfg.augment, s) for name, s in self.splits.items()}
        with torch.no_grad():  # each location's shape: (C,) vectors or (C, H, W) maps
            probe = first.load([0]).to(device)
            probed = self.teacher.outputs(probe, ex.features)[0]
            self.feature_shapes = {loc: tuple(f.shape[1:]) for loc, f in probed.items()}
        view_spec = next(iter(self.augmenters.values())).spec()
        self.spec = expected_spec(cfg, self.splits, sha, view_spec, self.feature_shapes, self.model.num_features,
                                  self.teacher.precision)
        self.layouts = {name: self.spec.layout(name) for name in self.splits}
        for loc, f in probed.items():  # values a location's codec cannot store: refused now, not a shard in
            codec = get_codec(self.spec.codec(loc))
            try:
                codec.encode(f.float().cpu().numpy()[:, None])
            except CodecError as exc:
                raise CodecError(f"extract.codecs.{loc} is {codec.name}: {exc}") from None
        self.images = ex.images

    def open_writer(self, overwrite: bool = False) -> StoreWriter:
        return StoreWriter(self.ex.store, self.spec, overwrite=overwrite)

    def batches(self, name: str, ranges: list[tuple[int, int]], workers: int | None = None):
        """The `ViewBatches` of the row `ranges` of split `name` through a DataLoader with the config's loader
        settings (`workers` overrides the count: 0 inside dask workers, which cannot have children)."""
        spans = [(b, min(b + self.ex.batch_size, stop)) for start, stop in ranges
                 for b in range(start, stop, self.ex.batch_size)]
        dataset = ViewBatches(self.splits[name], self.augmenters[name], self.layouts[name].views, spans, self.images)
        return data_loader(dataset, None, None, self.cfg.loader, self.device, workers=workers)

    def compute(self, name: str, shard: int, on_batch=None, workers: int | None = None) -> dict[str, np.ndarray]:
        """The arrays of one shard: all its samples, all their views."""
        return next(self.shard_arrays(name, [shard], on_batch, workers))[1]

    def shard_arrays(self, name: str, shards: list[int], on_batch=None, workers: int | None = None):
        """(shard, arrays) for each of `shards` in turn, from one loader: workers build the next views
        while the teacher runs."""
        ranges = [self.layouts[name].shard_rows(shard) for shard in shards]
        batches = iter(self.batches(name, ranges, workers)) if shards else None
        for shard, (start, stop) in zip(shards, ranges):
            yield shard, self.rows_arrays(name, start, stop, batches, on_batch)

    def rows_arrays(self, name: str, start: int, stop: int, batches=None, on_batch=None) -> dict[str, np.ndarray]:
        """The arrays of rows [start, stop) of split `name`, all their views, as the store's writer takes them.
        `batches`: an iterator over those rows' `ViewBatches` items (by default, a loader of its own)."""
        ex, split, layout, augmenter = self.ex, self.splits[name], self.layouts[name], self.augmenters[name]
        batches = iter(self.batches(name, [(start, stop)])) if batches is None else batches
        features = {loc: np.empty((stop - start, layout.views, *shape), np.float32)
                    for loc, shape in self.feature_shapes.items()}
        logits = np.empty((stop - start, layout.views, self.num_classes), np.float32)
        digests = np.empty(stop - start, np.uint64)
        params = np.empty((stop - start, layout.views, len(augmenter.param_names)), np.int32)
        images = np.empty((stop - start, *split.source_shape), np.uint8) if self.images else None
        arrays = {}
        for b in range(start, stop, ex.batch_size):
            batch = next(batches)
            e = b + len(batch["digests"])
            assert batch["start"] == b, "extraction batches out of order"
            rows = slice(b - start, e - start)
            digests[rows], params[rows] = batch["digests"], batch["params"]
            if images is not None:
                images[rows] = batch["raw"]
            for v, view in enumerate(device_batches(batch["views"], self.device)):  # the next view in a side stream
                f, z = self.teacher.outputs(view, ex.features)
                for loc, values in f.items():
                    features[loc][rows, v] = values.float().cpu().numpy()
                logits[rows, v] = z.float().cpu().numpy()
                if on_batch is not None:
                    on_batch(e - b)
        for what, values in (*((f"features at {loc}", f) for loc, f in features.items()), ("logits", logits)):
            if not np.isfinite(values).all():
                raise BkdError(f"the teacher produced non-finite {what} on {split.split} rows {start}:{stop} "
                               f"(shard {start // layout.shard_size}); nothing of that shard was written")
        labels = split.labels[start:stop].numpy()
        if ex.logits_topk is not None:  # the store keeps the k largest and what the losses need of the rest
            arrays[TOPK_TARGET_CLASS] = augmenter.target_classes(labels, params, split.labels.numpy())
        if images is not None:
            arrays[IMAGES], arrays[SOURCE_ROW] = images, split.ids[start:stop]
        return {
            **arrays,
            **{feature_array(loc): f for loc, f in features.items()},  # float32: each location's codec stores it
            "logits": logits,  # full, float32: the store's logits codec casts it or keeps its top k
            "view_params": params,
            "labels": labels,
            "index": np.arange(start, stop, dtype=np.int64),
            "pixel_digest": digests,
        }


class ViewBatches(Dataset):
    """Item i: one extraction batch of a split (rows `spans[i]`) made ready for the teacher -- the
    rows' pixel digests, their views' parameters and every view's input (V `RawViews` of B rows), and with
    `keep_raw` the raw source pixels (for the store's images). Runs in loader workers: decoding,
    digests and view building overlap the teacher's forward."""

    def __init__(self, split, augmenter, views: int, spans: list[tuple[int, int]], keep_raw: bool = False):
        self.split, self.augmenter, self.views, self.spans, self.keep_raw = split, augmenter, views, spans, keep_raw

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> dict:
        start, stop = self.spans[i]
        split, augmenter = self.split, self.augmenter
        raw = split.load_raw(range(start, stop))  # one read per batch, whatever the number of views
        pixels = torch.from_numpy(np.ascontiguousarray(raw))
        params = augmenter.draw(np.arange(start, stop), self.views, num_samples=len(split))
        views = [augmenter.raw_views(pixels, params[:, v], partner_inputs(split, augmenter, params[:, v], pixels))
                 for v in range(self.views)]  # finished on the teacher's device
        return {"start": start, "digests": pixel_digests(raw), "params": params, "views": views,
                "raw": raw if self.keep_raw else None}


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
        # the planner validated (or created) the store under its lock: attach without listing it
        _WORKER_STATE[key] = (extractor, StoreWriter.attach(cfg.extract.store, extractor.spec))
    extractor, writer = _WORKER_STATE[key]
    writer.write_shard(name, shard, extractor.compute(name, shard, workers=0))  # dask workers have no children
    start, stop = extractor.layouts[name].shard_rows(shard)
    return (stop - start) * extractor.layouts[name].views


def extract_teacher(cfg: Config, device: torch.device, overwrite: bool = False, workers: int = 1,
                    scheduler: str | None = None, check_space: bool = True) -> dict:
    """Write the teacher's features and logits for every configured split, shard by shard.

    Only missing shards are computed, so re-running after a crash resumes. With `workers` > 1
    the shards run on a dask LocalCluster of that many processes (or on the cluster at
    `scheduler`); each worker loads the teacher once and writes its shards itself. With `check_space`, an
    extraction whose projected store does not fit on its local disk is refused before the first shard.
    """
    local = workers <= 1 and scheduler is None
    # "auto" precision resolved once, from the device the shards run on: the manifest and every worker agree
    cfg = dataclasses.replace(cfg, extract=resolve_extract(cfg.extract, device))
    check_store_location(cfg.extract.store)  # before any heavy work: a path bkd must not write to,
    check_identity_target(cfg.extract.identity_path(), cfg.extract.store)  # or an identity file not to replace,
    store_key()  # or a signing key set but unusable,
    if "://" in str(cfg.extract.store):
        dvc_copies(str(cfg.extract.store))  # or a store at a URL that DVC lists as an output,
    existing = existing_store(cfg.extract.store)  # or something there that bkd did not make,
    if existing is not None and not overwrite:
        check_format(cfg.extract.store, existing)  # or a store of another format
    # With dask, this process only plans and records shards: it keeps its teacher copy (needed for
    # the manifest's feature shape) off the GPUs the workers use.
    extractor = ShardExtractor(cfg if local else _planner_config(cfg), device if local else torch.device("cpu"))
    if local:
        tqdm.write(f"teacher {extractor.teacher.describe()}")
    with store_lock(cfg.extract.store), errors_name(str(cfg.extract.store)):  # a full disk names the store
        writer = extractor.open_writer(overwrite)
        missing = [(name, shard) for name in extractor.splits for shard in writer.missing_shards(name)]
        if check_space and missing:
            rows = {name: sum(np.diff(extractor.layouts[n].shard_rows(s))[0] for n, s in missing if n == name)
                    for name in extractor.splits}
            check_fits(extractor, rows)
        total = sum(np.diff(extractor.layouts[n].shard_rows(s))[0] * extractor.layouts[n].views for n, s in missing)
        with tqdm(total=total, desc="extract", unit="view", dynamic_ncols=True) as bar:
            if local:
                for name in extractor.splits:
                    shards = [shard for split, shard in missing if split == name]
                    for shard, arrays in extractor.shard_arrays(name, shards, bar.update):
                        writer.write_shard(name, shard, arrays)
            else:
                _run_on_dask(cfg, str(device), missing, workers, scheduler, bar)
        writer.finish()
        note = sign_extracted(writer.root, str(cfg.extract.store), len(missing),
                              sum(layout.num_shards for layout in writer.layouts.values()))
        if note:
            tqdm.write(note)
        write_identity(cfg.extract.identity_path(), writer.root.attrs["manifest"])
    return {"store": str(cfg.extract.store), "shards_written": len(missing), "identity": cfg.extract.identity_path(),
            "num_features": extractor.model.num_features}


def _planner_config(cfg: Config) -> Config:
    """The planning process's config under dask: its one probe forward needs no compilation or layout."""
    return dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, compile=False, channels_last="off"))


@contextlib.contextmanager
def _environ_kept():
    """Restore this process's environment on exit. distributed's Nanny writes its pre-spawn variables
    (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, ...) into the *launching* process's os.environ and leaves them;
    every process started from here afterwards (a DDP rank, a `bkd` subprocess) would then run on one
    intra-op thread, with other numbers than the same run started elsewhere."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k not in before]:
            del os.environ[key]
        os.environ.update({k: v for k, v in before.items() if os.environ.get(k) != v})


def _run_on_dask(cfg: Config, device: str, shards: list, workers: int, scheduler: str | None, bar) -> None:
    from distributed import Client, LocalCluster, as_completed

    with _environ_kept():
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

