"""Real photographs as benchmark data: an ImageNet-style JPEG class folder and 224 px HDF5 arrays.

Nothing is downloaded. The pixels come from the colour photographs that scikit-learn ships
(`sklearn.datasets.load_sample_images`: china.jpg, flower.jpg, 427x640) and, when scikit-image is
installed, the colour photographs in its `skimage/data` folder (astronaut, chelsea, coffee,
hubble_deep_field, ihc (immunohistochemistry), motorcycle_left/right, retina, rocket). The
synthetic and grey-level images there (camera, coins, color, logo, phantom, ...) are left out.
scikit-image is only read from, never imported: its files are found through the import system.

Each image is a crop of one photo at a seeded random box, resized and re-encoded: ImageNet-like
sizes for the JPEG folder (long side 375..500 px, aspect 4:3, 3:2, 1:1, 3:4 or 2:3, JPEG quality
90 with 4:2:0 chroma, as most of ImageNet), a square of `size` for the HDF5 arrays. Every image is
a pure function of (seed, split, class, index) and the set of photos found, so a tree with more
images per class extends a smaller one, and the same seed on the same machine gives the same bytes.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from pathlib import Path

import numpy as np

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                  "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")
ASPECTS = ((4, 3), (3, 2), (1, 1), (3, 4), (2, 3))  # width : height
ASPECT_WEIGHTS = (0.45, 0.2, 0.1, 0.15, 0.1)
LONG_SIDE = (375, 500)  # inclusive range of the longer side, in pixels
MIN_CROP = 0.6  # a crop's side is 0.6..1 of the largest box of its aspect that fits the photo
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def photo_files() -> dict[str, Path]:
    """{name: file} of the real colour photographs available here, sorted by name."""
    import sklearn

    files = {name: Path(sklearn.__file__).parent / "datasets" / "images" / name for name in ("china.jpg", "flower.jpg")}
    spec = importlib.util.find_spec("skimage")  # locates the package without running it
    if spec is not None and spec.submodule_search_locations:
        data = Path(next(iter(spec.submodule_search_locations))) / "data"
        files |= {name: data / name for name in SKIMAGE_PHOTOS if (data / name).is_file()}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"photo files missing: {', '.join(missing)}")
    return dict(sorted(files.items()))


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[tuple[str, np.ndarray], ...]:
    """((name, (H, W, 3) uint8), ...) for every photo of `photo_files`, decoded once per process."""
    from PIL import Image

    out = []
    for name, path in photo_files().items():
        with Image.open(path) as image:
            out.append((name, np.asarray(image.convert("RGB"))))
    return tuple(out)


def _crop(photo: np.ndarray, rng: np.random.Generator, width: int, height: int):
    """A random box of aspect width:height (0.6..1 of the largest that fits), randomly flipped,
    resized to width x height: a PIL image."""
    from PIL import Image

    ph, pw = photo.shape[:2]
    scale = min(pw / width, ph / height)  # the largest box of this aspect that fits
    side = rng.uniform(MIN_CROP, 1.0)
    bw, bh = max(1, round(width * scale * side)), max(1, round(height * scale * side))
    left, top = int(rng.integers(0, pw - bw + 1)), int(rng.integers(0, ph - bh + 1))
    image = Image.fromarray(photo[top:top + bh, left:left + bw])
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image.resize((width, height), Image.Resampling.BICUBIC)


def _rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_CODES[split], label, index])


def jpeg_image(seed: int, split: str, label: int, index: int, quality: int = 90) -> tuple[bytes, tuple[int, int]]:
    """(JPEG bytes, (width, height)) of image `index` of class `label` in `split`."""
    import io

    photos = load_photos()
    rng = _rng(seed, split, label, index)
    photo = photos[int(rng.integers(len(photos)))][1]
    aw, ah = ASPECTS[int(rng.choice(len(ASPECTS), p=ASPECT_WEIGHTS))]
    long_side = int(rng.integers(LONG_SIDE[0], LONG_SIDE[1] + 1))
    width, height = (long_side, round(long_side * ah / aw)) if aw >= ah else (round(long_side * aw / ah), long_side)
    buffer = io.BytesIO()
    _crop(photo, rng, width, height).save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
    return buffer.getvalue(), (width, height)


def class_name(label: int) -> str:
    """An ImageNet-style folder name (a WordNet id's shape) for class `label`."""
    return f"n{label:08d}"


def make_jpeg_folder(root: str | Path, classes: int, per_class: int, seed: int = 0, val_per_class: int | None = None,
                     quality: int = 90) -> dict:
    """Write `root`/train/<class>/*.JPEG (`per_class` images per class) and `root`/val/<class>/*.JPEG
    (`val_per_class`, default max(1, per_class // 10)), the layout bkd's `imagenet` dataset reads.

    Returns what was written: counts, bytes, mean image size, the photos used, seconds.
    """
    if classes < 1 or per_class < 1:
        raise ValueError(f"classes and per_class must be >= 1, got {classes} and {per_class}")
    val_per_class = max(1, per_class // 10) if val_per_class is None else val_per_class
    root = Path(root)
    started = time.perf_counter()
    sizes, total = [], 0
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / class_name(label)
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                data, size = jpeg_image(seed, split, label, index, quality)
                stem = f"{class_name(label)}_{index}" if split == "train" else \
                    f"ILSVRC2012_val_{label * count + index + 1:08d}"
                (folder / f"{stem}.JPEG").write_bytes(data)
                sizes.append(size)
                total += len(data)
    sizes = np.asarray(sizes)
    return {"root": str(root), "classes": classes, "train": classes * per_class, "val": classes * val_per_class,
            "bytes": total, "mean_bytes": total / len(sizes), "mean_width": float(sizes[:, 0].mean()),
            "mean_height": float(sizes[:, 1].mean()), "quality": quality, "seed": seed,
            "photos": [name for name, _ in load_photos()], "seconds": time.perf_counter() - started}


def photo_array(n: int, size: int, seed: int = 0, split: str = "train", num_classes: int = 1000,
                unique: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 3, size, size) uint8, labels (n,) int64): square crops of the photos, resized to
    size x size, labels drawn uniformly from num_classes (all from (seed, split)). Only the first
    `unique` crops are drawn; later rows repeat them in turn (drawing costs ~3 ms per 224 px crop)."""
    photos = load_photos()
    images = np.empty((n, 3, size, size), np.uint8)
    for i in range(min(n, unique)):
        rng = _rng(seed, split, 0, i)
        images[i] = np.asarray(_crop(photos[int(rng.integers(len(photos)))][1], rng, size, size)).transpose(2, 0, 1)
    for i in range(unique, n):
        images[i] = images[i % unique]
    labels = np.random.default_rng([seed, SPLIT_CODES[split], 1]).integers(0, num_classes, n)
    return images, labels.astype(np.int64)


def write_hdf5(root: str | Path, train: int, test: int, size: int, num_classes: int = 1000, seed: int = 0,
               unique: int = 1024) -> dict:
    """`root`/train.h5 and test.h5 with `images` (N, 3, size, size) uint8 and `labels`, and the
    num_classes attribute: what bkd's `hdf5` dataset reads, here from crops of the photos."""
    import h5py

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for split, n in (("train", train), ("test", test)):
        images, labels = photo_array(n, size, seed, split, num_classes, unique)
        with h5py.File(root / f"{split}.h5", "w") as fh:
            fh.create_dataset("images", data=images, chunks=(1, *images.shape[1:]))
            fh.create_dataset("labels", data=labels)
            fh.attrs["num_classes"] = num_classes
    return {"root": str(root), "train": train, "test": test, "size": size, "num_classes": num_classes,
            "unique": min(unique, train),
            "bytes": sum((root / f"{s}.h5").stat().st_size for s in ("train", "test")),
            "seconds": time.perf_counter() - started}
