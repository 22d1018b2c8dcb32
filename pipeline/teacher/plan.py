"""What an extraction will write and take, before it starts: `bkd extract-teacher --plan`.

The plan runs the teacher on a calibration chunk of each split (its first `extract.chunk_size` rows,
every view), writes those rows through the store's real writer and codecs into a scratch store, and
scales what each array took per row to the split's size. Sharding adds each shard's index to each
array, and the rest (metadata, chunk digests, flags) is counted from the scratch store. The time is
the calibration's, timed once the first batch (warm-up, compilation) is done, times the views to
compute. The same projection, on a smaller calibration, lets an extraction refuse to start when the
store cannot fit on its disk.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.dvcrepo import DvcCopies, dvc_copies
from pipeline.errors import BkdError
from pipeline.targets import StoreWriter, filesystem
from pipeline.targets.spec import FEATURES, IMAGES, LOGITS, SCALES

PER_SAMPLE = {"labels", "index", "pixel_digest", IMAGES}  # one value per sample; the others, one per view

SHARD_INDEX_BYTES = 16  # per chunk of a shard: its offset and length (uint64 each), plus a crc32c per shard


@dataclasses.dataclass
class ArrayPlan:
    split: str
    name: str
    shape: tuple[int, ...]  # one sample's (per-sample arrays) or one view's
    dtype: str
    codec: str
    views: int  # views per row the array holds (1 for per-sample arrays)
    bytes_per_row: float  # compressed, as written

    @property
    def bytes_per_view(self) -> float:
        return self.bytes_per_row / self.views


@dataclasses.dataclass
class Plan:
    store: str
    samples: dict[str, int]  # rows per split the plan is for
    views: dict[str, int]
    arrays: list[ArrayPlan]
    array_bytes: dict[tuple[str, str], int]  # (split, array) -> bytes for all its rows, shard indices included
    other_bytes: int  # metadata, chunk digests and flags
    seconds_per_view: float
    seconds_per_row_written: float
    calibration_rows: dict[str, int]
    device: str
    dvc: DvcCopies | None = None  # what DVC's cache adds for the store (None: not in a DVC repository)

    @property
    def total_bytes(self) -> int:
        return sum(self.array_bytes.values()) + self.other_bytes

    @property
    def dvc_bytes(self) -> int:
        """The bytes DVC's commit adds, on the file system of its cache."""
        return self.dvc.extra * self.total_bytes if self.dvc is not None else 0

    @property
    def forward_passes(self) -> int:
        return sum(n * self.views[split] for split, n in self.samples.items())

    @property
    def seconds(self) -> float:
        return (self.forward_passes * self.seconds_per_view
                + sum(self.samples.values()) * self.seconds_per_row_written)

    def free_bytes(self) -> int | None:
        return free_space(self.store)

    def cache_free_bytes(self) -> int | None:
        """Free bytes on the file system of DVC's cache, where it is not the store's."""
        if self.dvc is None or self.dvc.cache_dir is None or self.dvc.same_filesystem:
            return None
        return free_space(self.dvc.cache_dir)

    def shortfall(self) -> str | None:
        """What does not fit: the store (with DVC's copy when its cache shares the disk), or DVC's copy on
        its cache's own disk; None when everything fits or the free space is unknown."""
        free, cache_free = self.free_bytes(), self.cache_free_bytes()
        here = self.total_bytes + (self.dvc_bytes if self.dvc is None or self.dvc.same_filesystem else 0)
        if free is not None and here > free:
            with_dvc = f" ({human(self.total_bytes)} and DVC's copy)" if here > self.total_bytes else ""
            return f"the store {self.store} is projected at {human(here)}{with_dvc} still to write, and its disk has " \
                   f"{human(free)} free"
        if cache_free is not None and self.dvc_bytes > cache_free:
            return f"DVC's cache {self.dvc.cache_dir} would take {human(self.dvc_bytes)} of the store ({self.dvc.why}) " \
                   f"and its disk has {human(cache_free)} free"
        return None

    def to_dict(self) -> dict:
        return {"store": self.store, "samples": self.samples, "views": self.views, "device": self.device,
                "calibration_rows": self.calibration_rows,
                "arrays": [{**dataclasses.asdict(a), "bytes_per_view": a.bytes_per_view,
                            "bytes": self.array_bytes[(a.split, a.name)]} for a in self.arrays],
                "other_bytes": self.other_bytes, "total_bytes": self.total_bytes, "free_bytes": self.free_bytes(),
                "writable": writable(self.store),
                "dvc": None if self.dvc is None else {"why": self.dvc.why, "bytes": self.dvc_bytes,
                                                      "cache_dir": self.dvc.cache_dir,
                                                      "same_filesystem": self.dvc.same_filesystem,
                                                      "free_bytes_at_cache": self.cache_free_bytes()},
                "forward_passes": self.forward_passes, "seconds": self.seconds}


def _destination(store: str) -> Path | None:
    """The nearest existing folder (or the store itself) of a local store; None for other filesystems."""
    fs, path = filesystem(store)
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return None
    here = Path(path).absolute()
    while not here.exists():
        here = here.parent
    return here


def free_space(store: str) -> int | None:
    """Free bytes on the disk a local store goes to (its nearest existing folder); None for other filesystems."""
    here = _destination(store)
    return None if here is None else shutil.disk_usage(here).free


def writable(store: str) -> bool | None:
    """Whether this process may create or write a local store there (a read-only mount or folder says
    no); None for other filesystems, which say so only when written to."""
    here = _destination(store)
    return None if here is None else os.access(here, os.W_OK | os.X_OK)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def plan_extraction(extractor, samples: dict[str, int] | None = None, rows: int | None = None) -> Plan:
    """The plan of `extractor`'s store (a `ShardExtractor`), for `samples` rows per split (the splits' own
    sizes by default: another count plans a dataset that is not here, from the one that is), calibrated on
    `rows` rows of each split (extract.chunk_size by default)."""
    spec, ex = extractor.spec, extractor.ex
    samples = {name: len(split) for name, split in extractor.splits.items()} | (samples or {})
    if set(samples) - set(extractor.splits):
        raise ValueError(f"plan for splits {sorted(samples)}, but the extraction writes {list(extractor.splits)}")
    arrays, array_bytes, other, calibration = [], {}, 0, {}
    forward_seconds, forward_views, write_seconds, written_rows = 0.0, 0, 0.0, 0
    with tempfile.TemporaryDirectory(prefix="bkd-plan-") as scratch:
        for name in extractor.splits:
            n = min(len(extractor.splits[name]), rows or ex.chunk_size)
            calibration[name] = n
            stamps = [(time.perf_counter(), 0)]  # (time, views computed since the last stamp)
            values = extractor.rows_arrays(name, 0, n, on_batch=lambda v: stamps.append((time.perf_counter(), v)))
            timed = stamps[2:] and stamps[1:]  # from the end of the first batch's first view (warm-up) when possible
            forward_seconds += stamps[-1][0] - (timed or stamps)[0][0]
            forward_views += sum(v for _, v in (timed or stamps)[1:])
            one = dataclasses.replace(spec, splits={name: {**spec.splits[name], "num_samples": n}},
                                      chunking={"chunk_size": n, "chunks_per_shard": 1})
            folder = Path(scratch) / f"{name}.zarr"
            writer = StoreWriter(str(folder), one)
            started = time.perf_counter()  # the shard's encoding and writing, not the scratch store's creation
            writer.write_shard(name, 0, values)
            write_seconds += time.perf_counter() - started
            written_rows += n
            num_shards = math.ceil(samples[name] / (ex.chunk_size * ex.chunks_per_shard))
            index = num_shards * (ex.chunks_per_shard * SHARD_INDEX_BYTES + 4)
            counted = 0
            for array, (shape, dtype) in one.array_schema(name).items():
                stored = _folder_bytes(folder / name / array / "c")
                counted += stored
                per_row = (stored - SHARD_INDEX_BYTES - 4) / n  # the scratch store's one-chunk shard index out
                views = 1 if array in PER_SAMPLE else spec.splits[name]["views"]
                item = tuple(shape[1:] if array in PER_SAMPLE else shape[2:])  # one sample's, or one view's
                arrays.append(ArrayPlan(name, array, item, dtype, _codec_of(spec, array), views, per_row))
                array_bytes[(name, array)] = round(per_row * samples[name]) + index
            small = _folder_bytes(folder) - counted  # metadata, and one chunk's digests and flag
            other += small + math.ceil(samples[name] / ex.chunk_size) * 8 * len(one.row_arrays()) + num_shards
    per_view = forward_seconds / forward_views if forward_views else 0.0
    return Plan(str(ex.store), samples, {name: spec.splits[name]["views"] for name in samples}, arrays, array_bytes,
                other, per_view, write_seconds / max(written_rows, 1), calibration, str(extractor.device))


def plan_store(cfg, device, samples: dict[str, int] | None = None, rows: int | None = None) -> Plan:
    """The plan of the store `cfg` extracts on `device` (`bkd extract-teacher --plan`), calibrated on `rows`
    rows per split (extract.chunk_size by default): nothing is written."""
    from pipeline.teacher.extract import ShardExtractor
    from pipeline.teacher.fast import resolve_extract

    cfg = dataclasses.replace(cfg, extract=resolve_extract(cfg.extract, device))
    plan = plan_extraction(ShardExtractor(cfg, device), samples, rows)
    plan.dvc = dvc_copies(str(cfg.extract.store))
    return plan


def _codec_of(spec, array: str) -> str:
    if array.startswith(FEATURES):
        return spec.codec(array[len(FEATURES):])
    if array == LOGITS:
        return spec.codec(LOGITS)
    if array.startswith(SCALES):
        return "float32 scales"
    return "zstd"


def raw_bytes(spec, rows: dict[str, int]) -> int:
    """The bytes of `rows` rows per split of every array, uncompressed: what the store takes at most."""
    return sum(rows[split] * int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
               for split in rows for shape, dtype in spec.array_schema(split).values())


def check_fits(extractor, rows: dict[str, int]) -> None:
    """Refuse, in one line, an extraction whose `rows` still to write (per split) project past the free
    space at its local destination. Only when even the uncompressed arrays would not fit is the projection
    calibrated (on a few rows, through the real codecs)."""
    free = free_space(str(extractor.ex.store))
    if free is None:  # an object store: no free space to check, and no copy DVC could make (extraction
        return        # refused a URL store that DVC lists as an output before loading the teacher)
    copies = dvc_copies(str(extractor.ex.store))  # a second copy, where DVC tracks the store and copies
    if not (copies is not None and copies.extra) and raw_bytes(extractor.spec, rows) * 1.01 + (1 << 20) <= free:
        return
    plan = plan_extraction(extractor, samples=rows, rows=min(extractor.ex.chunk_size, 64))
    plan.dvc = copies
    problem = plan.shortfall()
    if problem:
        raise BkdError(f"{problem}; free space, move extract.store, lower extract.views or choose compact "
                       "extract.codecs (`bkd extract-teacher --plan` shows each array), or pass --ignore-free-space")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _dvc_line(plan: Plan) -> str:
    if plan.dvc is None:
        return "DVC: not in a DVC repository"
    if not plan.dvc_bytes:
        return f"DVC: {plan.dvc.why}"
    where = "on the store's disk" if plan.dvc.same_filesystem else (
        f"on its cache's disk ({human(plan.cache_free_bytes() or 0)} free there)")
    return f"DVC: {plan.dvc.why}: +{human(plan.dvc_bytes)} {where}"


def format_plan(plan: Plan) -> str:
    """The plan as the table `--plan` prints."""
    lines = [f"plan for {plan.store} ({', '.join(f'{s}: {n:,} samples x {plan.views[s]} views' for s, n in plan.samples.items())};"
             f" calibrated on {', '.join(f'{n} {s} rows' for s, n in plan.calibration_rows.items())} on {plan.device})",
             f"{'split':6} {'array':28} {'shape':18} {'dtype':8} {'codec':18} {'B/sample/view':>14} {'total':>11}"]
    for a in plan.arrays:
        lines.append(f"{a.split:6} {a.name:28} {str(a.shape):18} {a.dtype:8} {a.codec:18} {a.bytes_per_view:14.1f} "
                     f"{human(plan.array_bytes[(a.split, a.name)]):>11}")
    images = sum(b for (split, name), b in plan.array_bytes.items() if name == "images")
    if images:
        lines.append(f"images: {human(images)}")
    free = plan.free_bytes()
    read_only = ("; READ-ONLY: this process cannot write there, so the extraction would fail"
                 if writable(plan.store) is False else "")
    lines += [f"metadata, digests, flags: {human(plan.other_bytes)}",
              f"store: {human(plan.total_bytes)}; free at destination: {human(free) if free is not None else 'unknown'}"
              f"{read_only}",
              _dvc_line(plan),
              f"teacher forward passes: {plan.forward_passes:,}; estimated time: {duration(plan.seconds)} "
              f"({plan.seconds_per_view * 1e3:.2f} ms per view, {plan.seconds_per_row_written * 1e3:.3f} ms per row "
              "written)"]
    return "\n".join(lines)
