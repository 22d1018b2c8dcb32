"""Batch composition: distinct classes per batch of the student's sampler, against i.i.d. sampling.

Run from the repository root::

    python -m benchmarks.batches [--json OUT]

For an ImageNet-sized class-sorted label vector (1,000 classes of 732 to 1,300 images, as
ImageFolder lists ImageNet's training set) under the ImageNet configs' sampler (chunks of 512 rows,
windows of 4 chunks, batch 256), and for class-sorted ImageFolder, HDF5 and DVS HDF5 files of 24
classes written here (chunks of 16, windows of 4, batch 16), it prints the mean number of distinct
classes per batch with the store's rows in the files' order (what stores of format 5 held), in the
split's seeded random order (what extraction writes now), and the i.i.d. expectation, each for one
process, per rank of two DDP ranks and under two loader workers. Then what the shuffled order costs
where the rows are read from HDF5 (`HDF5Source`): rows per second in the file's order and shuffled,
for a file chunked by row and one of gzip-compressed 64-row chunks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.special import gammaln

from pipeline.config import load_config
from pipeline.data import _split, load_split
from pipeline.sources import Source
from pipeline.student.stream import student_sampler

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/imagenet-sew-resnet18.yaml"
SETTINGS = (("1 process", 1, 0), ("2 DDP ranks", 2, 0), ("2 loader workers", 1, 2))
# The written files: 24 classes, class by class
CLASSES, PER_CLASS, TEST_PER_CLASS = 24, 20, 4
BATCH = 16  # with chunks of 16 rows and windows of 4 chunks: a window holds 4 batches, as ImageNet's 2048 hold 8


def write_class_sorted(root: Path, fmt: str, counts=None) -> None:
    """train and test splits of `fmt` (imagenet: class folders of PNGs; hdf5; dvs_hdf5) whose files list
    the samples class by class; `counts`: per-class numbers of training samples (default PER_CLASS each)."""
    rng = np.random.default_rng(1)
    counts = [PER_CLASS] * CLASSES if counts is None else counts
    for split, sizes in (("train", counts), ("test", [TEST_PER_CLASS] * CLASSES)):
        labels = np.repeat(np.arange(CLASSES), sizes)
        if fmt == "imagenet":
            from PIL import Image

            for c in range(CLASSES):
                folder = root / ("train" if split == "train" else "val") / f"n{c:08d}"
                folder.mkdir(parents=True)
                for i in range(sizes[c]):
                    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            continue
        import h5py

        root.mkdir(parents=True, exist_ok=True)
        key, shape, dtype = ("images", (1, 8, 8), np.uint8) if fmt == "hdf5" else ("frames", (2, 2, 8, 8), np.float32)
        with h5py.File(root / f"{split}.h5", "w") as fh:
            fh.create_dataset(key, data=rng.integers(0, 4, (len(labels), *shape)).astype(dtype))
            fh.create_dataset("labels", data=labels)
            fh.attrs["num_classes"] = CLASSES


def class_sorted_config(root: Path, fmt: str, *extra: str):
    """The default config on those files, with a student sampler of the ImageNet configs' proportions."""
    return load_config(REPO / "params.yaml", [
        f"data.name={fmt}", f"data.root={root}", "data.image_size=8", "extract.chunk_size=16",
        "extract.chunks_per_shard=4", "extract.views=1", "extract.features=[pre_logits]", "extract.splits=[train]",
        "student.shuffle_buffer_chunks=4", f"student.batch_size={BATCH}", "loader.workers=0", *extra])


def iid_distinct(labels: np.ndarray, batch: int) -> float:
    """Expected distinct classes in `batch` samples drawn uniformly without replacement from `labels`:
    the sum over classes of 1 - C(N - n_c, batch) / C(N, batch)."""
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    n = len(labels)
    if n < 10_000:  # exact
        return float(sum(1 - math.comb(n - c, batch) / math.comb(n, batch) for c in counts))

    def log_comb(a, b):
        return gammaln(a + 1) - gammaln(b + 1) - gammaln(a - b + 1)

    absent = np.where(n - counts >= batch, np.exp(log_comb(n - counts, batch) - log_comb(n, batch)), 0.0)
    return float(np.sum(1 - absent))


def sampled_distinct(labels: np.ndarray, sampler, batch: int, epochs: int = 3) -> float:
    """Mean distinct classes per whole batch of `sampler`'s order over `labels` (the store's rows), over
    `epochs` epochs."""
    found = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = np.fromiter((i for _, i in sampler), np.int64)
        whole = len(order) // batch * batch
        rows = labels[order[:whole]].reshape(-1, batch)
        rows = np.sort(rows, axis=1)
        found.append(1 + (np.diff(rows, axis=1) != 0).sum(axis=1))
    return float(np.concatenate(found).mean())


class _Labels(Source):
    """Labels alone, in a file's order: enough for a split's rows (no pixels are read)."""

    def __init__(self, labels: np.ndarray):
        self.labels, self.num_classes, self.shape, self.origin = labels, int(labels.max()) + 1, (1, 1, 1), "labels"


def compare(labels_in_file_order: np.ndarray, split_labels: np.ndarray, cfg, batch: int, epochs: int) -> dict:
    """Distinct classes per batch (rank 0's, under DDP), file order vs split order vs i.i.d., for each
    sampler setting."""
    out = {}
    for name, ranks, workers in SETTINGS:
        local = batch // ranks
        setting = dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader, workers=workers))
        sampler = student_sampler(setting, len(split_labels), setting.extract.chunk_size, local, 0, ranks)
        out[name] = {"batch": local,
                     "file_order": sampled_distinct(labels_in_file_order, sampler, local, epochs),
                     "store_order": sampled_distinct(split_labels, sampler, local, epochs),
                     "iid": iid_distinct(split_labels, local)}
    return out


def imagenet_sized(epochs: int = 1) -> dict:
    rng = np.random.default_rng(0)
    counts = np.clip(rng.integers(732, 1301, 1000), 732, 1300)
    counts[0], counts[1] = 732, 1300
    labels = np.repeat(np.arange(1000), counts)
    cfg = load_config(CONFIG, ["loader.workers=0"])
    split = _split(cfg.data, "train", _Labels(labels))
    return compare(labels, split.labels.numpy(), cfg, cfg.student.batch_size, epochs)


def file_formats(epochs: int = 3) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("imagenet", "hdf5", "dvs_hdf5"):
            root = Path(tmp) / fmt
            write_class_sorted(root, fmt)
            cfg = class_sorted_config(root, fmt)
            split = load_split(cfg.data, "train")
            out[fmt] = compare(np.repeat(np.arange(CLASSES), PER_CLASS), split.labels.numpy(), cfg, BATCH, epochs)
    return out


def hdf5_reads(tmp: Path, n: int = 4096, shape=(3, 64, 64), batch: int = 256, rows: int = 1024) -> dict:
    """Rows per second `HDF5Source` reads in batches, `rows` rows in the file's order and `rows` of a shuffled
    split's order, for a file chunked by row, one in uncompressed chunks of 64 rows and one in gzip chunks
    of 64 rows. A real dataset is many times the reader's chunk cache, so the cache is scaled down with
    this 48 MiB file, to an eighth of it: shuffled reads then rarely find their chunk in it, as in a real
    file."""
    import h5py

    from pipeline import data as data_module

    rng = np.random.default_rng(0)
    pixels = np.cumsum(rng.integers(-8, 9, (n, *shape), dtype=np.int16), axis=-1).astype(np.uint8)  # photo-like
    cache = data_module.CHUNK_CACHE_BYTES
    data_module.CHUNK_CACHE_BYTES = pixels.nbytes // 8
    out = {}
    try:
        for name, layout in (("row chunks", {"chunks": (1, *shape)}), ("64-row chunks", {"chunks": (64, *shape)}),
                             ("gzip 64-row", {"chunks": (64, *shape), "compression": "gzip"})):
            path = tmp / f"{len(out)}.h5"
            with h5py.File(path, "w") as fh:
                fh.create_dataset("images", data=pixels, **layout)
                fh.create_dataset("labels", data=np.zeros(n, np.int64))
            out[name] = {}
            for order_name, order in (("file order", np.arange(n)), ("shuffled", rng.permutation(n))):
                source = data_module.HDF5Source(path)
                started = time.perf_counter()
                for b in range(0, rows, batch):
                    source.read(order[b:b + batch])
                out[name][order_name] = rows / (time.perf_counter() - started)
    finally:
        data_module.CHUNK_CACHE_BYTES = cache
    return out


def rows(results: dict) -> list[tuple]:
    """(measure, value, target, met, detail) rows for the benchmark table."""
    big = results["imagenet_sized"]["1 process"]
    worst = max(((abs(r["store_order"] - r["iid"]) / r["iid"], data, setting)
                 for data, settings in results.items() if data != "hdf5_reads" for setting, r in settings.items()))
    reads = [(f"batches: HDF5 {layout}: shuffled / file order",
              f"{r['shuffled'] / r['file order']:.2f}", "", None,
              f"{r['shuffled']:.0f} vs {r['file order']:.0f} rows/s (HDF5Source, batches of 256)")
             for layout, r in results.get("hdf5_reads", {}).items()]
    return reads + [
        ("batches: ImageNet-sized, classes per batch of 256", f"{big['store_order']:.1f}", "~ i.i.d.",
         abs(big["store_order"] - big["iid"]) <= 0.1 * big["iid"],
         f"i.i.d. {big['iid']:.1f}; the files' class-sorted order gave {big['file_order']:.1f}"),
        ("batches: largest gap to i.i.d., any format/sampler", f"{worst[0]:.1%}", "<= 10%", worst[0] <= 0.1,
         f"{worst[1]}, {worst[2]} (ImageFolder, HDF5, DVS HDF5; 1 process, 2 DDP ranks, 2 workers)"),
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batches", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    results = {"imagenet_sized": imagenet_sized(), **file_formats()}
    with tempfile.TemporaryDirectory() as tmp:
        reads = hdf5_reads(Path(tmp))
    print(f"{'data':<16} {'sampler':<18} {'batch':>5} {'file order':>11} {'store order':>12} {'i.i.d.':>8}")
    for data, rows in results.items():
        for setting, r in rows.items():
            print(f"{data:<16} {setting:<18} {r['batch']:>5} {r['file_order']:>11.1f} {r['store_order']:>12.1f} "
                  f"{r['iid']:>8.1f}")
    for layout, r in reads.items():
        print(f"HDF5 reads, {layout}: {r['file order']:.0f} rows/s in the file's order, {r['shuffled']:.0f} shuffled")
    results["hdf5_reads"] = reads
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
