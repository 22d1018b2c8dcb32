"""Reader throughput and memory: stream a store much larger than the reader's buffer.

The parent builds the store by tiling the real benchmark store (real teacher features, so they
compress as real ones do) to `samples` rows, then streams one shuffled epoch in a fresh child
process, and its peak RSS is reset (Linux /proc/self/clear_refs) after the images (tiled MNIST, in memory)
are loaded and the store opened: the growth over that baseline is the reader's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.targets import StoreWriter, TeacherTargets, bytes_on_disk

from benchmarks.common import peak_rss_mb, reset_peak_rss


def tile_store(source: str | Path, dest: str | Path, samples: int) -> int:
    """Write a copy of `source`'s train split grown to `samples` rows (its rows repeated); return bytes on disk."""
    src = TeacherTargets(source, "train")
    spec = dataclasses.replace(src.spec, splits={"train": {**src.spec.splits["train"], "num_samples": samples}})
    layout = spec.layout("train")
    arrays = {name: src.group[name][:] for name in src.spec.row_arrays() if name != "index"}
    writer = StoreWriter(dest, spec, overwrite=True)
    for shard in range(layout.num_shards):
        start, stop = layout.shard_rows(shard)
        rows = np.arange(start, stop) % len(src)
        writer.write_shard("train", shard, {**{k: v[rows] for k, v in arrays.items()},
                                            "index": np.arange(start, stop, dtype=np.int64)})
    writer.finish()
    return bytes_on_disk(dest)


def stream(store: str, batch_size: int, buffer_chunks: int) -> dict:
    """One shuffled epoch through CachedTargetDataset; runs in the child process."""
    import torch

    from pipeline.config import DataConfig
    from pipeline.data import ImageSplit, load_split
    from pipeline.sources import ArraySource
    from pipeline.samplers import ChunkShuffleSampler
    from pipeline.student.stream import CachedTargetDataset

    targets = TeacherTargets(store, "train")
    mnist = load_split(DataConfig(), "train")
    n = len(targets)
    rows = np.arange(n) % len(mnist)
    images = ArraySource(mnist.source.images[mnist.ids[rows]], targets.group["labels"][:], mnist.num_classes)
    split = ImageSplit(mnist.name, "train", images, np.arange(n), DataConfig())
    dataset = CachedTargetDataset(split, targets, buffer_chunks)
    sampler = ChunkShuffleSampler(n, targets.chunk_size, buffer_chunks, seed=0)
    order = list(sampler)
    baseline = reset_peak_rss()  # from here on, the peak is the reader's
    started = time.perf_counter()
    for b in range(0, n, batch_size):
        batch = dataset.__getitems__(order[b:b + batch_size])
        assert all(torch.isfinite(f).all() for f in batch[2].values())
    seconds = time.perf_counter() - started
    return {
        "samples": n,
        "seconds": seconds,
        "samples_per_s": n / seconds,
        "rss_baseline_mb": baseline,
        "rss_peak_mb": peak_rss_mb(),
        "rss_growth_mb": peak_rss_mb() - baseline,  # peak while streaming minus resident before it
        "chunks_decoded": dataset.chunks_decoded,
        "max_resident_chunks": dataset.max_resident_chunks,
        "buffer_rows": 2 * buffer_chunks * targets.chunk_size,
        "decoded_store_mb": n * targets.views * (sum(int(np.prod(s)) for s in targets.feature_shapes.values()) + targets.num_classes) * 4 / 2**20,
    }


def run(source_store: str | Path, tmp: Path, samples: int, batch_size: int, buffer_chunks: int) -> dict:
    big = tmp / "reader.zarr"
    size = tile_store(source_store, big, samples)
    out = subprocess.run([sys.executable, "-m", "benchmarks.reader", str(big), "--batch-size", str(batch_size),
                          "--buffer-chunks", str(buffer_chunks)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["store_bytes_on_disk"] = size
    result["store_mb"] = size / 2**20
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reader", description=__doc__.split("\n\n")[0])
    parser.add_argument("store")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--buffer-chunks", type=int, default=4)
    args = parser.parse_args()
    print(json.dumps(stream(args.store, args.batch_size, args.buffer_chunks)))
