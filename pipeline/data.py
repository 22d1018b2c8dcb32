"""Splits of a dataset, and the input transform both stages share.

A dataset is a *source* of raw samples with labels (`pipeline.sources`). A split is a fixed list of
source rows: the dataset's official train/test split where it has one (CIFAR, ImageNet, HDF5 files), a
seeded permutation otherwise (MNIST-5k, digits), always in a seeded random order. The split's
*fingerprint* (sha256 of its sample ids and labels) and the transform spec identify the exact inputs a
cached teacher target belongs to. The splits of one dataset are checked against each other
(`load_splits`: same sample shape, same classes). The loaders here carry worker errors out as one line.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.config import DataConfig, LoaderConfig
from pipeline.digests import split_fingerprint
from pipeline.errors import BkdError, ConfigError, DataError
from pipeline.rawviews import RawViews
from pipeline.sources import DATASETS, ArraySource, HDF5Source, Source


class ImageSplit(Dataset):
    """One split of a dataset; items are (normalized input, label, row in the split).

    `source_shape` is the shape of the raw samples the source gives (the pixels views are cut
    from), `image_shape` the model's input: the same, except for ImageNet with a `data.load_size`
    above `data.image_size`, where the input is the image_size centre crop of the source image.
    """

    def __init__(self, name: str, split: str, source: Source, rows: np.ndarray, cfg: DataConfig):
        info = DATASETS[name]
        self.name, self.split, self.source = name, split, source
        self.ids = np.asarray(rows, dtype=np.int64)
        self.labels = torch.from_numpy(source.labels[self.ids])
        self.num_classes = source.num_classes
        self.source_shape = tuple(source.shape)
        self.image_shape = self.source_shape
        if name == "imagenet":
            self.image_shape = (source.shape[0], cfg.image_size, cfg.image_size)
        self.encoding, self.scale = info.encoding, info.scale
        channels = source.shape[-3]
        self.mean = torch.tensor((info.mean * channels)[:channels]).view(-1, 1, 1)
        self.std = torch.tensor((info.std * channels)[:channels]).view(-1, 1, 1)
        self.transform = {
            "scale": info.scale,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "input_shape": list(self.image_shape),
            "encoding": info.encoding,
            "image_size": cfg.image_size if name == "imagenet" else None,
            # only where set: stores written before load_size existed keep their identity
            **({"load_size": cfg.load_size} if name == "imagenet" and cfg.load_size else {}),
            **({"interpolation": cfg.interpolation} if name == "imagenet" else {}),
        }
        # Small in-memory datasets are read once; the rest per batch.
        self._raw = torch.from_numpy(np.ascontiguousarray(source.read(self.ids))) if isinstance(source, ArraySource) \
            else None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def crops(self) -> bool:
        """True when the input is a centre crop of larger source pixels."""
        return self.image_shape != self.source_shape

    def centre_crop(self, pixels: torch.Tensor) -> torch.Tensor:
        """The model input (..., image_shape) of source pixels: their centre crop."""
        return centre_crop(pixels, *self.image_shape[-2:]) if self.crops else pixels

    def read(self, indices) -> torch.Tensor:
        """Raw source values (len(indices), *source_shape) for rows of this split: what views are cut from."""
        return torch.from_numpy(np.ascontiguousarray(self.load_raw(indices)))

    def load(self, indices) -> torch.Tensor:
        """Normalized inputs (len(indices), *image_shape) for rows of this split (the clean input)."""
        return self.load_views(indices).finish()

    def load_views(self, indices) -> RawViews:
        """The clean inputs of rows of this split as they cross to the device (`RawViews`: the raw values,
        normalized there); `.to(device)` gives what `load` gives, on the device."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        raw = self._raw[torch.from_numpy(idx)] if self._raw is not None else \
            torch.from_numpy(np.ascontiguousarray(self.source.read(self.ids[idx])))
        return RawViews(self.centre_crop(raw), self.scale, self.mean, self.std)

    def __getitem__(self, i: int):
        return self.load([i])[0], self.labels[i], i

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices)
        return self.load_views(indices), self.labels[idx], idx

    @property
    def in_memory(self) -> bool:
        """True when the whole split is held in memory (reading every sample costs no I/O)."""
        return self._raw is not None

    def load_raw(self, indices) -> np.ndarray:
        """Raw source values (len(indices), *source_shape), as the source gives them, for rows of this split."""
        return self.source.read(self.ids[np.asarray(indices, dtype=np.int64).reshape(-1)])

    def reading_from(self, source: Source) -> "ImageSplit":
        """This split with its pixels read from `source` (same rows, labels, fingerprint and transform):
        e.g. the decoded images a store holds instead of the image files. `source.read` takes the rows
        of the original source (this split's `ids`) and must give the same raw values."""
        if tuple(source.shape) != self.source_shape:
            raise DataError(f"{source.origin} holds samples of shape {tuple(source.shape)}, the dataset's are "
                            f"{self.source_shape}")
        other = copy.copy(self)
        other.source, other._raw = source, None  # every read from `source`, not the files' copy
        return other

    def fingerprint(self) -> str:
        """sha256 of the split's sample ids and labels, in its row order (a store's `splits.<split>.fingerprint`)."""
        return split_fingerprint(self.ids, self.labels.numpy())


def scored_split(cfg) -> str:
    """What a run's "test" accuracy is scored on: the test split, or with data.holdout the validation rows
    held out of the train split. `cfg`: the data section."""
    return "validation" if cfg.holdout else "test"


def centre_offsets(height: int, width: int, crop_height: int, crop_width: int) -> tuple[int, int]:
    """(top, left) of a crop_height x crop_width centre crop of a height x width image, placed as
    torchvision's center_crop places it."""
    return int(round((height - crop_height) / 2.0)), int(round((width - crop_width) / 2.0))


def centre_crop(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The height x width centre crop of (..., H, W) pixels (a view, as torchvision's center_crop gives)."""
    top, left = centre_offsets(pixels.shape[-2], pixels.shape[-1], height, width)
    return pixels[..., top:top + height, left:left + width]


def random_shift(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels in x and y, padding with its corner value."""
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def collate_batch(batch):
    """Collate for loaders over ImageSplit: `__getitems__` already returns stacked tensors."""
    return batch


def data_loader(dataset, batch_size: int | None, sampler, loader: LoaderConfig, device: torch.device,
                workers: int | None = None) -> DataLoader:
    """The DataLoader every stage uses: `loader.workers` worker processes (`workers` overrides the
    count) with pinned memory (auto: when the device is CUDA), `prefetch_factor` batches ahead per
    worker and persistent workers as configured. `batch_size` None: the dataset's items are batches.
    Datasets here batch themselves (`__getitems__`) and are deterministic functions of their indices,
    so the workers change when a batch is ready, never what it holds."""
    workers = loader.workers if workers is None else workers
    pin = loader.pin_memory is True or (loader.pin_memory == "auto" and device.type == "cuda")
    extra = {"prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers} if workers else {}
    return WorkerErrorsAsRaised(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_batch,
                                num_workers=workers, pin_memory=pin and torch.cuda.is_available(), **extra)


class WorkerErrorsAsRaised(DataLoader):
    """A DataLoader whose workers' refusals (a corrupt image, a damaged store) reach the caller as the
    worker raised them: torch re-raises them with its worker banner and the worker's traceback in the
    message, which `bkd: error:` would print as one very long line."""

    def __iter__(self):
        # Made now, not at the first batch: the iterator draws its workers' seed from the global RNG, which
        # `Trainer` keeps out of the training stream around `iter(loader)` (a generator would draw it later).
        return _AsRaised(super().__iter__())


class _AsRaised:
    """An iterator of batches that re-raises bkd's refusals with their own message (`_as_raised`)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.batches)
        except BkdError as exc:
            raise _as_raised(exc) from None

    def __len__(self) -> int:
        return len(self.batches)


def _as_raised(exc: BkdError) -> BkdError:
    """`exc` with the message the worker gave it (the last line of the traceback torch put in it)."""
    text = str(exc)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return exc
    last = text.rstrip().splitlines()[-1]
    return type(exc)(last.split(": ", 1)[1] if ": " in last else last)


def scattered_read_warning(split: ImageSplit) -> str | None:
    """A warning when reading `split`'s rows in a random order costs much more than in file order: an HDF5
    file whose chunks hold many rows (each scattered row decompresses its whole chunk); None otherwise."""
    source = split.source
    if not isinstance(source, HDF5Source) or (rows := source.rows_per_chunk) <= 1:
        return None
    fix = "set extract.images: true so training reads the store, or " if split.encoding == "direct" else ""
    return (f"warning: {source.path} holds {rows} rows a chunk, and training reads rows in a random order, "
            f"so each read decompresses a whole chunk; {fix}rewrite the file with one row a chunk")


def load_split(cfg: DataConfig, split: str) -> ImageSplit:
    """The fixed `split` ('train' or 'test') of the configured dataset."""
    return load_splits(cfg, [split])[split]


def load_splits(cfg: DataConfig, names) -> dict[str, ImageSplit]:
    """The named splits ('train', 'test') of the configured dataset, checked against each other.

    A model trained on one split is evaluated on the other, so they must have the same sample
    shape and the same classes. HDF5 files without a `num_classes` attribute share
    max(label) + 1 over all the named splits (a test file lacking the top class does not shrink
    it); files that declare it must agree, and the others' labels must lie below it.
    """
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset '{cfg.name}' (known: {', '.join(DATASETS)})")
    # with data.holdout, the test split is the held-out part of the training split
    sources = {split: DATASETS[cfg.name].load(cfg, "train" if cfg.holdout else split) for split in names}
    _check_consistent(list(sources.values()))
    return {split: _split(cfg, split, source) for split, source in sources.items()}


def _check_consistent(sources: list[Source]) -> None:
    """Same sample shape and class count in every source; undeclared class counts are unified."""
    first = sources[0]
    for other in sources[1:]:
        if other.shape != first.shape:
            raise DataError(f"{first.origin} holds samples of shape {first.shape} but {other.origin} holds "
                            f"{other.shape} (the splits of one dataset must match)")
    declared = [s for s in sources if s.classes_declared]
    if not declared:
        num_classes = max(s.num_classes for s in sources)
    else:
        num_classes = declared[0].num_classes
        for other in declared[1:]:
            if other.num_classes != num_classes:
                raise DataError(f"{declared[0].origin} has {num_classes} classes but {other.origin} has "
                                f"{other.num_classes} (the splits of one dataset must match)")
        for other in sources:
            if other.num_classes > num_classes:  # undeclared: its max label + 1
                raise DataError(f"{other.origin}: label {other.num_classes - 1} is outside the classes (expected "
                                f"in [0, {num_classes}), the num_classes of {declared[0].origin})")
    for source in sources:
        source.num_classes = num_classes


SPLIT_STREAMS = {"train": 0, "test": 1}  # the random streams of data.split_seed: each split's row order,
LIMIT_STREAM = 2  # and (with the split's) which rows data.limit keeps


def _split(cfg: DataConfig, split: str, source: Source) -> ImageSplit:
    """The rows of `source` that form `split`, in a seeded random order: its part of the seeded
    permutation of the pool, or the official split's rows permuted (data.split_seed). The store's
    rows follow this order, so they never keep a file's class-by-class order."""
    n = len(source)
    if not DATASETS[cfg.name].official_split:
        if not 0 < cfg.test_size < n:
            raise ConfigError(f"data.test_size must be in (0, {n}) for {cfg.name}, got {cfg.test_size}")
        order = np.random.default_rng(cfg.split_seed).permutation(n)
        rows = order[cfg.test_size:] if split == "train" or cfg.holdout else order[:cfg.test_size]
    else:  # one stream per split, so the train order does not depend on the test split
        stream = SPLIT_STREAMS["train" if cfg.holdout else split]
        rows = np.random.default_rng((cfg.split_seed, stream)).permutation(n)
    if cfg.holdout:  # a validation split: the first rows of the train order, the rest train
        if not 0 < cfg.holdout < len(rows):
            raise ConfigError(f"data.holdout must be in (0, {len(rows)}) for {cfg.name}'s train split, "
                              f"got {cfg.holdout}")
        rows = rows[cfg.holdout:] if split == "train" else rows[:cfg.holdout]
    if cfg.limit is not None and cfg.limit < len(rows):
        rows = rows[balanced_subset(source.labels[rows], cfg.limit,
                                    np.random.default_rng((cfg.split_seed, SPLIT_STREAMS[split], LIMIT_STREAM)),
                                    f"the {split} split")]
    return ImageSplit(cfg.name, split, source, rows, cfg)


def balanced_subset(labels: np.ndarray, size: int, rng: np.random.Generator, what: str = "the split") -> np.ndarray:
    """Positions (increasing) of `size` of `labels` that keep every class present, in proportion to its
    count (largest remainders, at least one row a class): class c's share is q_c = size * n_c / n; each
    class gets max(1, floor(q_c)), then the rows still owed go to the largest q_c - taken, or the rows
    over go back from the classes of more than one row with the smallest (ties to the lower class).
    Each class's rows are a random choice of `rng`."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if size < len(classes):
        raise ConfigError(f"data.limit is {size}, below the {len(classes)} classes of {what}: a subset "
                          f"must keep every class (set data.limit >= {len(classes)} or null)")
    quota = size * counts / counts.sum()
    take = np.maximum(1, np.floor(quota)).astype(np.int64)
    while take.sum() != size:
        owed = size - int(take.sum())
        if owed > 0:
            take[np.argsort(-(quota - take), kind="stable")[:owed]] += 1
        else:
            over = np.flatnonzero(take > 1)
            take[over[np.argsort(quota[over] - take[over], kind="stable")[:-owed]]] -= 1
    keep = np.zeros(len(labels), bool)
    for c, k in zip(classes.tolist(), take.tolist()):
        keep[rng.choice(np.flatnonzero(labels == c), size=k, replace=False)] = True
    return np.flatnonzero(keep)
