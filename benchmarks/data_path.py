"""The data path of a real ImageNet run, measured on this machine: JPEG files -> extraction -> store -> student.

Run from the repository root::

    python -m benchmarks.data_path                 # about 2.5 min on 2 cores; writes benchmarks/results-data-path.json
    python -m benchmarks.data_path --quick         # about 15 s: tiny sizes, checks the script (the smoke test)
                                   [--json OUT] [--cache DIR]

Data: an ImageNet-style class folder (`data.root`/train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, what
`pipeline.sources`' `imagenet` dataset reads) of real photographs with ImageNet's typical size and
weight. Each image is a crop of one of the colour photographs scikit-learn and scikit-image ship
(`benchmarks.photos.load_photos`; nothing is downloaded): 500x375 px (landscape, probability 0.75) or
375x500 (portrait); the box has the image's aspect and 0.8..1.25 times its size (clipped to the photo),
at a seeded random position, flipped with probability 1/2, resized to the image size (bicubic), so the
pixels are at about their native resolution and keep the photographs' detail; then JPEG-encoded with
4:2:0 chroma at the two adjacent qualities of 85..100 (bisected) whose mean sizes over the folder's
training images bracket 110 kB (110,000 bytes, ImageNet-1k's mean training JPEG), a seeded share of the
images at the higher one so that the mean meets it (val images at the more used one). The qualities and
their counts, the mean size at each quality tried and the folder's measured mean size and dimensions
are in the JSON (`folder`). The folder is cached under `--cache` (default: the system temp dir) and reused.

Everything runs through the pipeline's own entry points, so a change of the loaders is measured as it
is: `ShardExtractor` / `extract_teacher` (stage one), `build_student_run` (stage two), the view
augmenter's pieces, the store reader. Configs are the paper rows' (`configs/imagenet-sew-resnet18.yaml`;
the Spikingformer ImageNet row's augment section for the recipe stages) with the data swapped for the
folder, a seeded random-init timm ResNet-18 teacher (nothing downloaded), CPU, and small batches. Rates
are steady state (the first batch, which pays worker start-up, is left out) unless said otherwise. The
trainer's process runs torch on `--threads` threads (default 1, as each loader worker does): on a small
shared machine torch's multi-threaded kernels stall whenever another process holds a core (measured
here: a 64 px ResNet-18 batch took 0.86 s on 2 threads beside a busy core, 0.045 s on one).

  A. extraction     `bkd extract-teacher`'s path at 224 from load_size 256, K = the row's 16 views,
                    extract.images on (the store keeps the decoded 256 px pixels): views/s delivered by
                    the extraction loader alone (ShardExtractor.batches: decode, resize, K views,
                    digests; passes alternated between the worker counts, the median pass), consumed by
                    the teacher alone (ShardExtractor.rows_arrays over batches already in memory: the
                    ResNet-18 forward per view, the batch's arrival on the device and the host copies),
                    and end to end (`extract_teacher` over the store's rows, writes included; its setup,
                    measured apart, taken out), at 1 and 2 loader workers. 4 and 8 workers cannot be
                    measured on a 2-core machine.
  B. student        the student loader of `bkd train-student` (the run's own loader from
                    `build_student_run`: store chunks, the decoded images from the store, views rebuilt
                    from the stored parameters) at 0, 1 and 2 workers, persistent, one warm epoch each,
                    then `epochs` rounds of one epoch per setting in turn; against SEW-ResNet-18 (T = the
                    row's 4) training on CPU at 224 (the engine's train_step: forward, loss, backward,
                    optimizer), batch 2. The store holds `limit` rows in small chunks (each row costs the
                    teacher K forwards at 224 here): a target chunk read costs more per sample than with
                    the row's 512-row chunks (section C estimates that cost), and the dataset's 2-chunk
                    LRU keeps some chunks decoded across epoch ends (fewer reads than a large store).
  C. stage split    host CPU-ms per sample of the student loader, each piece timed from outside on one
                    thread (as a loader worker runs): store reads (target chunks, image blocks), JPEG
                    decode and resize (extraction side, paid once per image per extraction; what a
                    loader reading the files would pay per sample), crop/resize, flip, RandAugment,
                    normalization, erasing, mixing, collate + the worker-to-trainer shared-memory copy,
                    and the bytes per sample a host-to-device copy would move (dtype x numel of every
                    tensor the loader yields; on CPU `.to(device)` moves nothing). Each stage's own cost
                    is timed wherever the code runs it; beside them, the loader's whole view call and,
                    where the code finishes views on the device (`raw_views` batches whose `.to(device)`
                    normalizes, erases and mixes), that finish apart (on the CPU here); and the loader's
                    whole work per sample in one process. For the SEW-ResNet-18 row and for the
                    Spikingformer-8-768 ImageNet row's recipe (RandAugment m9, erasing 0.25,
                    mixup/cutmix on 15 of 16 views), which the ResNet rows do not run.
  D. estimate       loader workers per GPU each paper row (benchmarks.paper_plans) would need: the
                    documented H200 consumer rate (docs/performance.md, benchmarks/results-cuda-paper.json)
                    over the per-worker rate measured here at 1 worker (and with the target chunk read
                    at its 512-row estimate). An estimate from this CPU, not a GPU measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
ROW = "configs/imagenet-sew-resnet18.yaml"  # the row whose data path is run end to end
RECIPE_ROW = "configs/imagenet-spikingformer-8-768.yaml"  # the ImageNet row with RandAugment, erasing, mixing
DEFAULT_JSON = REPO / "benchmarks" / "results-data-path.json"

# -- the JPEG folder ------------------------------------------------------------------------------------------

TARGET_BYTES = 110_000  # ImageNet-1k's mean training JPEG, about 110 kB
IMAGE_SIZES = ((500, 375), (375, 500))  # (width, height): landscape with probability 0.75, else portrait
LANDSCAPE = 0.75
BOX_SCALE = (0.8, 1.25)  # the crop box: 0.8..1.25 x the image size (clipped to the photo), resized to it
QUALITIES = tuple(range(85, 101))
FOLDER_VERSION = 3  # bump when the image recipe changes: the cache key


def _crop(photos, rng: np.random.Generator):
    """(PIL image, photo name): one seeded crop at about the photo's native resolution (module docstring)."""
    from PIL import Image

    name, photo = photos[int(rng.integers(len(photos)))]
    width, height = IMAGE_SIZES[0] if rng.random() < LANDSCAPE else IMAGE_SIZES[1]
    ph, pw = photo.shape[:2]
    scale = min(rng.uniform(*BOX_SCALE), pw / width, ph / height)
    bw, bh = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = int(rng.integers(0, pw - bw + 1)), int(rng.integers(0, ph - bh + 1))
    image = Image.fromarray(np.ascontiguousarray(photo[top:top + bh, left:left + bw]))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image.resize((width, height), Image.Resampling.BICUBIC), name


def _jpeg(image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
    return buffer.getvalue()


def bracket_quality(crops) -> tuple[int, int, dict[int, list[bytes]]]:
    """The adjacent JPEG qualities (lo, hi) of QUALITIES whose mean sizes over `crops` (PIL images) bracket
    TARGET_BYTES (a bisection: the size grows with the quality), and the encodings made on the way."""
    encoded: dict[int, list[bytes]] = {}

    def mean(q: int) -> float:
        if q not in encoded:
            encoded[q] = [_jpeg(c, q) for c in crops]
        return float(np.mean([len(b) for b in encoded[q]]))

    lo, hi = QUALITIES[0], QUALITIES[-1]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if mean(mid) < TARGET_BYTES else (lo, mid)
    mean(lo), mean(hi)
    return lo, hi, encoded


def make_folder(root: Path, classes: int, per_class: int, seed: int = 0) -> dict:
    """Write root/train/<wnid>/*.JPEG (`per_class` a class) and root/val/<wnid>/*.JPEG (one a class), all at
    two adjacent qualities mixed so that the training images' mean size meets TARGET_BYTES (module doc)."""
    from benchmarks.photos import class_name, load_photos

    started = time.perf_counter()
    photos = load_photos()
    images = {(split, label, index): _crop(photos, np.random.default_rng([seed, code, label, index]))
              for split, code, count in (("train", 0, per_class), ("val", 1, 1))
              for label in range(classes) for index in range(count)}
    train = [key for key in images if key[0] == "train"]
    lo, hi, encoded = bracket_quality([images[key][0] for key in train])
    # a seeded share of the images at hi, the rest at lo, so the mean size meets the target
    means = {q: float(np.mean([len(b) for b in encoded[q]])) for q in (lo, hi)}
    share = float(np.clip((TARGET_BYTES - means[lo]) / max(means[hi] - means[lo], 1.0), 0.0, 1.0))
    at_hi = set(np.random.default_rng([seed, 7]).permutation(len(train))[:round(share * len(train))].tolist())
    qualities = [hi if k in at_hi else lo for k in range(len(train))]
    data = {key: encoded[q][k] for k, (key, q) in enumerate(zip(train, qualities))}
    quality = lo if len(at_hi) < len(train) / 2 else hi
    used: dict[str, int] = {}
    for key, (image, name) in images.items():
        split, label, index = key
        folder = root / split / class_name(label)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{class_name(label)}_{index}" if split == "train" else f"ILSVRC2012_val_{label + 1:08d}"
        (folder / f"{stem}.JPEG").write_bytes(data[key] if key in data else _jpeg(image, quality))
        if split == "train":
            used[name] = used.get(name, 0) + 1
    sizes = np.asarray([len(data[key]) for key in train])
    dims = np.asarray([images[key][0].size for key in train])
    return {
        "root": str(root), "classes": classes, "train_images": len(train), "val_images": classes,
        "photos": sorted(n for n, _ in photos), "train_images_per_photo": dict(sorted(used.items())),
        "crop": f"{IMAGE_SIZES[0][0]}x{IMAGE_SIZES[0][1]} (p {LANDSCAPE}) or {IMAGE_SIZES[1][0]}x{IMAGE_SIZES[1][1]}; "
                f"box {BOX_SCALE[0]}..{BOX_SCALE[1]} x the image size clipped to the photo, random position, "
                "flip p 0.5, bicubic resize; JPEG 4:2:0 at the two adjacent qualities of "
                f"{QUALITIES[0]}..{QUALITIES[-1]} (bisected) whose mean sizes bracket the target, a seeded share "
                "of the images at the higher one so that the mean meets it",
        "quality": quality, "qualities": {str(q): qualities.count(q) for q in sorted(set(qualities))},
        "target_mean_bytes": TARGET_BYTES,
        "orientations": {f"{w}x{h}": int(sum(1 for key in train if images[key][0].size == (w, h)))
                         for w, h in IMAGE_SIZES},
        "mean_bytes_by_quality": {str(q): round(float(np.mean([len(b) for b in v])))
                                  for q, v in sorted(encoded.items())},
        "mean_bytes": float(sizes.mean()), "median_bytes": float(np.median(sizes)), "min_bytes": int(sizes.min()),
        "max_bytes": int(sizes.max()), "mean_width": float(dims[:, 0].mean()), "mean_height": float(dims[:, 1].mean()),
        "mean_megapixels": float((dims[:, 0] * dims[:, 1]).mean() / 1e6), "seed": seed,
        "build_s": time.perf_counter() - started,
    }


def cached_folder(cache: Path, classes: int, per_class: int, seed: int = 0) -> dict:
    """The folder for (classes, per_class, seed), built once under `cache` (atomically: a folder is renamed
    into place when complete) and reused."""
    root = Path(cache) / f"jpeg-v{FOLDER_VERSION}-{classes}x{per_class}-seed{seed}"
    info_file = root / "folder.json"
    if not info_file.is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=root.name + ".part-", dir=root.parent))
        info = make_folder(scratch, classes, per_class, seed)
        (scratch / "folder.json").write_text(json.dumps(info, indent=2))
        try:
            os.rename(scratch, root)
        except OSError:  # another process finished first: use its folder
            shutil.rmtree(scratch, ignore_errors=True)
    info = json.loads(info_file.read_text())
    info["root"], info["cached"] = str(root), True
    return info


# -- sizes and configs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    classes: int  # class folders (>= 10: the row keeps the teacher's top-10 logits)
    per_class: int  # training JPEGs a class
    image: int  # data.image_size (the row's 224)
    load: int  # data.load_size (the row's 256)
    views: int  # extract.views (the row's K = 16)
    extract_batch: int  # extract.batch_size (rows; a loader item holds K views of each)
    loader_rows: int  # rows the extraction loader delivers alone
    consumer_rows: int  # rows the teacher consumes alone
    limit: int | None  # data.limit of the extracted store (end-to-end extraction, student runs)
    chunk: int  # extract.chunk_size
    student_loader_batch: int
    student_batch: int  # the CPU student step's batch
    steps: int
    warmup: int
    epochs: int  # timed epochs of the student loader (after one warm epoch)
    split_samples: int  # samples each stage of the split is timed on
    reps: int  # passes of the extraction loader alone per worker count (the median is reported)


SIZES = {
    # the store (end to end and student runs) holds 48 rows: each costs the teacher K = 16 forwards at 224
    "full": Sizes(classes=16, per_class=16, image=224, load=256, views=16, extract_batch=8, loader_rows=128,
                  consumer_rows=8, limit=48, chunk=16, student_loader_batch=4, student_batch=2, steps=2, warmup=1,
                  epochs=6, split_samples=64, reps=3),
    # a smoke run: the real JPEGs, tiny model inputs
    "quick": Sizes(classes=10, per_class=1, image=64, load=72, views=2, extract_batch=4, loader_rows=10,
                   consumer_rows=4, limit=None, chunk=4, student_loader_batch=4, student_batch=2, steps=1, warmup=1,
                   epochs=1, split_samples=4, reps=1),
}


def row_config(tmp: Path, folder: str, sizes: Sizes, workers: int, student_batch: int, limit: int | None,
               path: str = ROW) -> Config:
    """The paper row's config on the folder: a random teacher and the store in `tmp`, CPU, small batches."""
    return load_config(REPO / path, [
        f"data.root={folder}", f"data.limit={'null' if limit is None else limit}", f"data.image_size={sizes.image}",
        f"data.load_size={sizes.load}",
        f"teacher.checkpoint={tmp / 'teacher.safetensors'}", "teacher.device=cpu",
        f"extract.store={tmp / 'store.zarr'}", f"extract.identity={tmp / 'store.identity.json'}",
        "extract.splits=[train]", f"extract.views={sizes.views}", f"extract.batch_size={sizes.extract_batch}",
        f"extract.chunk_size={sizes.chunk}", "extract.chunks_per_shard=1",
        "student.device=cpu", f"student.batch_size={student_batch}", "student.shuffle_buffer_chunks=1",
        f"student.out_dir={tmp / 'runs'}", f"loader.workers={workers}",
    ])


# -- measuring ------------------------------------------------------------------------------------------------


def tensors(obj):
    """Every torch tensor in a batch: tensors, tuples, lists, dicts and dataclasses (a batch object such as
    views finished on the device), depth first. NumPy arrays stay on the host and are not yielded."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from tensors(v)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors(getattr(obj, f.name))


def tensor_bytes(obj) -> int:
    """Bytes a host-to-device copy of a batch moves: dtype x numel of every tensor in it."""
    return sum(t.element_size() * t.numel() for t in tensors(obj))


def tensor_shapes(obj):
    """A batch's tensors as 'dtype[shape]', in its structure (None: nothing that crosses to the device)."""
    if isinstance(obj, torch.Tensor):
        return f"{str(obj.dtype).removeprefix('torch.')}{list(obj.shape)}"
    if isinstance(obj, dict):
        return {k: tensor_shapes(v) for k, v in obj.items() if tensor_shapes(v) is not None}
    if isinstance(obj, (tuple, list)):
        return [tensor_shapes(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        shapes = {f.name: tensor_shapes(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"type": type(obj).__name__, **{k: v for k, v in shapes.items() if v not in (None, {}, [])}}
    return None


def batch_len(batch) -> int:
    """Samples in a student batch: its labels (the second item)."""
    return len(batch[1])


def steady(stamps: list[float], counts: list[int]) -> float:
    """Units/s between the first arrival and the last (the first item's units left out); 0 for one item."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return 0.0
    return sum(counts[1:]) / (stamps[-1] - stamps[0])


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load() -> float:
    return os.getloadavg()[0]


# -- A. extraction ----------------------------------------------------------------------------------------------


def _spans(start: int, stop: int, batch: int) -> list[int]:
    return [min(b + batch, stop) - b for b in range(start, stop, batch)]


def extraction_loader(extractor, rows: int, workers: int) -> dict:
    """Views/s the extraction loader delivers alone over rows [0, rows) with `workers` processes."""
    views = extractor.layouts["train"].views
    counts = _spans(0, rows, extractor.ex.batch_size)
    loader = extractor.batches("train", [(0, rows)], workers=workers)
    started = time.perf_counter()
    stamps, item_bytes, shapes = [], 0, None
    for k, item in enumerate(loader):
        stamps.append(time.perf_counter())
        if k == 0:
            item_bytes, shapes = tensor_bytes(item), tensor_shapes(item)
    if len(stamps) != len(counts):  # batching changed: spread the rows evenly over what came
        counts = [rows / len(stamps)] * len(stamps)
    del loader
    rate = steady(stamps, counts)
    return {"workers": workers, "rows": rows, "items": len(stamps), "first_item_s": stamps[0] - started,
            "total_s": stamps[-1] - started, "rows_per_s": rate, "views_per_s": rate * views,
            "rows_per_s_with_startup": rows / (stamps[-1] - started),
            "item_tensor_bytes": item_bytes, "item_rows": counts[0], "item_tensors": shapes,
            "load_avg": load()}


def extraction_consumer(extractor, rows: int) -> dict:
    """Views/s the teacher consumes alone: ShardExtractor.rows_arrays over batches already in memory (the
    forward of every view and the copies back to the host); the first forward is left out (warm-up)."""
    items = list(extractor.batches("train", [(0, rows)], workers=0))
    stamps, counts = [], []

    def on_batch(n):
        stamps.append(time.perf_counter())
        counts.append(n)

    started = time.perf_counter()
    extractor.rows_arrays("train", 0, rows, batches=iter(items), on_batch=on_batch)
    total = time.perf_counter() - started
    return {"rows": rows, "forwards": len(stamps), "batch_rows": counts[0] if counts else 0, "total_s": total,
            "views_per_s": steady(stamps, counts), "views_per_s_with_first": sum(counts) / total,
            "load_avg": load()}


def extraction_end_to_end(cfg: Config, setup_s: float) -> dict:
    """`extract_teacher` (the command's path: loader, teacher, digests, codecs, writes) over the whole split."""
    from pipeline.data import load_split
    from pipeline.teacher.extract import extract_teacher

    rows = len(load_split(cfg.data, "train"))
    started = time.perf_counter()
    extract_teacher(cfg, CPU, overwrite=True)
    wall = time.perf_counter() - started
    views = rows * cfg.extract.views
    return {"workers": cfg.loader.workers, "rows": rows, "views": views, "wall_s": wall,
            "setup_s_subtracted": setup_s, "views_per_s": views / max(wall - setup_s, 1e-9),
            "views_per_s_gross": views / wall, "load_avg": load()}


def run_extraction(tmp: Path, folder: str, sizes: Sizes, workers: tuple[int, ...]) -> tuple[dict, Config]:
    from pipeline.data import load_split
    from pipeline.teacher.extract import ShardExtractor

    from benchmarks.common import write_random_teacher

    everything = row_config(tmp, folder, sizes, 0, sizes.student_loader_batch, None)
    write_random_teacher(everything)
    started = time.perf_counter()
    extractor = ShardExtractor(everything, CPU)
    setup = time.perf_counter() - started
    rows = min(sizes.loader_rows, len(load_split(everything.data, "train")))
    out: dict = {"config": ROW, "teacher": everything.teacher.model, "views": sizes.views,
                 "image_size": sizes.image, "load_size": sizes.load, "batch_rows": sizes.extract_batch,
                 "features": list(everything.extract.features), "images_stored": everything.extract.images,
                 "setup_s": setup}
    print(f"A. extraction: loader alone over {rows} rows x {sizes.views} views", flush=True)
    reps: dict[int, list[dict]] = {w: [] for w in workers}
    for _ in range(sizes.reps):  # alternated, so the machine's noise falls on every setting alike
        for w in workers:
            reps[w].append(extraction_loader(extractor, rows, w))
    out["loader"] = {}
    for w, runs in reps.items():
        best = sorted(runs, key=lambda r: r["views_per_s"])[len(runs) // 2]  # the median rep
        out["loader"][str(w)] = {**best, "views_per_s_reps": [r["views_per_s"] for r in runs]}
    print(f"A. extraction: teacher alone over {sizes.consumer_rows} rows x {sizes.views} views", flush=True)
    with torch.no_grad():
        out["consumer"] = extraction_consumer(extractor, sizes.consumer_rows)
    del extractor
    gc.collect()
    cfgs = {w: row_config(tmp, folder, sizes, w, sizes.student_loader_batch, sizes.limit) for w in workers}
    for w, cfg in cfgs.items():
        print(f"A. extraction: end to end (extract_teacher), {w} worker(s)", flush=True)
        out.setdefault("end_to_end", {})[str(w)] = extraction_end_to_end(cfg, setup)
    first = out["loader"][str(workers[0])]
    per_row = first["item_tensor_bytes"] / max(1, first["item_rows"])
    row_cfg = load_config(REPO / ROW)
    out["host_to_device"] = {
        "bytes_per_row": per_row, "bytes_per_view": per_row / sizes.views, "tensors": first["item_tensors"],
        # the row's own loader items at its 224 px: extract.batch_size rows x K views each
        "row_config_item_bytes": per_row / sizes.views * row_cfg.extract.batch_size * row_cfg.extract.views
        * (row_cfg.data.image_size / sizes.image) ** 2,
        "row_config": {"batch_size": row_cfg.extract.batch_size, "views": row_cfg.extract.views,
                       "workers": row_cfg.loader.workers, "prefetch_factor": row_cfg.loader.prefetch_factor},
    }
    h = out["host_to_device"]
    h["row_config_bytes_in_flight"] = \
        h["row_config_item_bytes"] * row_cfg.loader.workers * row_cfg.loader.prefetch_factor
    return out, cfgs[workers[-1]]


# -- B. student ---------------------------------------------------------------------------------------------------


def _epoch(run, epoch: int) -> tuple[float, int, object]:
    """(seconds, samples, first batch) of one epoch of a student run's loader."""
    run.sampler.set_epoch(epoch)
    run.dataset.set_epoch(epoch)
    started, count, first = time.perf_counter(), 0, None
    for batch in run.loader:
        count += batch_len(batch)
        first = batch if first is None else first
    return time.perf_counter() - started, count, first


def student_loaders(cfgs: dict[int, Config], epochs: int) -> dict[str, dict]:
    """Samples/s each student run's own loader delivers (build_student_run, `workers` processes, persistent):
    a warm epoch each (worker start-up, first reads and digest checks), then `epochs` rounds in which every
    setting runs one epoch in turn, so the machine's noise falls on all alike."""
    from pipeline.student.train import build_student_run

    runs = {w: build_student_run(cfg, CPU, workers=w) for w, cfg in cfgs.items()}
    out: dict[str, dict] = {}
    for w, run in runs.items():
        warm, _, first = _epoch(run, 0)
        out[str(w)] = {"workers": w, "batch_size": run.loader.batch_size, "samples_per_epoch": len(run.dataset),
                       "timed_epochs": epochs, "warm_epoch_s": warm, "epoch_s": [], "samples": 0, "trainer_cpu_s": 0.0,
                       "bytes_per_sample": tensor_bytes(first) / batch_len(first),
                       "batch_tensors": tensor_shapes(first)}
    for epoch in range(1, epochs + 1):
        for w, run in runs.items():
            cpu = time.process_time()
            seconds, count, _ = _epoch(run, epoch)
            r = out[str(w)]
            r["trainer_cpu_s"] += time.process_time() - cpu
            r["epoch_s"].append(seconds)
            r["samples"] += count
    for w, run in runs.items():
        r = out[str(w)]
        r["samples_per_s"] = r["samples"] / sum(r["epoch_s"])
        r["trainer_cpu_ms_per_sample"] = r.pop("trainer_cpu_s") / r["samples"] * 1e3
        r["load_avg"] = load()
        if w == 0:  # the trainer's own counters (with workers they live in the worker processes)
            r["target_chunks_decoded"] = getattr(run.dataset, "chunks_decoded", None)
            r["image_blocks_decoded"] = getattr(run.train.source, "blocks_decoded", None)
            r["epochs_read"] = epochs + 1
            r["store_chunks"] = -(-len(run.dataset) // run.targets.chunk_size) if run.targets is not None else None
            # a small store: the dataset's LRU of decoded chunks keeps some across epoch ends, so fewer chunk
            # reads an epoch than a large store's one per chunk, and these rates lean optimistic
    del runs
    gc.collect()
    return out


def student_consumer(cfg: Config, tmp: Path, steps: int, warmup: int) -> dict:
    """Samples/s the student trains at on CPU: the engine's train_step on one batch already loaded."""
    from pipeline.rawviews import to_device
    from pipeline.student.train import build_student_run

    run = build_student_run(cfg, CPU, workers=0)
    run.sampler.set_epoch(0)
    run.dataset.set_epoch(0)
    loaded = next(iter(run.loader))
    moves = []  # on the CPU the copy moves nothing; what a batch does on arrival (e.g. views finished there) is timed
    for _ in range(3):
        started = time.perf_counter()
        batch = to_device(loaded, CPU)
        moves.append(time.perf_counter() - started)
    trainer = run.trainer(tmp / "unused-run")
    seconds = []
    for k in range(warmup + steps):
        started = time.perf_counter()
        trainer.train_step(batch, where="in the data-path benchmark")
        if k >= warmup:
            seconds.append(time.perf_counter() - started)
    median = float(np.median(seconds))
    out = {"model": cfg.student.model, "timesteps": cfg.student.timesteps, "distill": cfg.student.distill,
           "precision": run.fast.precision, "batch_size": batch_len(batch), "step_s": seconds, "median_step_s": median,
           "samples_per_s": batch_len(batch) / median,
           "to_device_ms_per_sample": float(np.median(moves)) / batch_len(batch) * 1e3, "load_avg": load()}
    del run, trainer
    gc.collect()
    return out


def run_student(tmp: Path, folder: str, sizes: Sizes, workers: tuple[int, ...]) -> tuple[dict, Config]:
    out: dict = {"config": ROW, "image_size": sizes.image, "load_size": sizes.load}
    cfgs = {w: row_config(tmp, folder, sizes, w, sizes.student_loader_batch, sizes.limit) for w in workers}
    print(f"B. student loader, {', '.join(map(str, workers))} workers, {sizes.epochs} rounds", flush=True)
    out["loader"] = student_loaders(cfgs, sizes.epochs)
    cfg = cfgs[workers[-1]]
    print(f"B. student step ({cfg.student.model}, T = {cfg.student.timesteps}, batch {sizes.student_batch})",
          flush=True)
    step_cfg = row_config(tmp, folder, sizes, 0, sizes.student_batch, sizes.limit)
    out["consumer"] = student_consumer(step_cfg, tmp, sizes.steps, sizes.warmup)
    consumed = out["consumer"]["samples_per_s"]
    out["loader/consumer"] = {w: r["samples_per_s"] / consumed for w, r in out["loader"].items()}
    return out, cfg


# -- C. the stage split ---------------------------------------------------------------------------------------------


class Clock:
    """CPU and wall seconds of the pieces timed with `piece(name, samples)`."""

    def __init__(self):
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.samples: dict[str, int] = {}
        self.notes: dict[str, str] = {}

    @contextlib.contextmanager
    def piece(self, name: str, samples: int):
        cpu, wall = time.process_time(), time.perf_counter()
        yield
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
        self.samples[name] = self.samples.get(name, 0) + samples

    def attempt(self, name: str, fn) -> None:
        """Run `fn(clock)`; where this code no longer has a piece, say so instead of stopping the benchmark."""
        try:
            fn(self)
        except (AttributeError, TypeError, KeyError, ValueError, ImportError) as exc:
            self.notes[name] = f"not measured on this code: {type(exc).__name__}: {exc}"

    def ms(self) -> dict[str, dict[str, float]]:
        return {name: {"cpu_ms_per_sample": self.cpu[name] / self.samples[name] * 1e3,
                       "wall_ms_per_sample": self.wall[name] / self.samples[name] * 1e3, "samples": self.samples[name]}
                for name in self.cpu}


def _store_reads(clock: Clock, cfg: Config) -> dict:
    """Target chunks and image blocks read and decoded from the store (page-cached files), per sample."""
    from pipeline.targets import IMAGES, TeacherTargets

    targets = TeacherTargets(cfg.extract.store, "train")
    locations = list(cfg.student.feature_pairs().values())
    chunks = -(-len(targets) // targets.chunk_size)
    targets.read_chunk(0, locations)  # opens the arrays
    with clock.piece("read/decompress: target chunk (K views)", len(targets)):
        for c in range(chunks):
            targets.read_chunk(c, locations)
    array = targets.arrays[IMAGES]
    block = int(array.chunks[0])
    with clock.piece("read/decompress: image block", len(targets)):
        for start in range(0, len(targets), block):
            array[start:start + block]
    # A chunk read's fixed cost is about one zarr call per array, whatever the rows: timed on an array of a
    # few bytes a row ('labels') and counted once per array holding this read's fields (the per-row arrays but
    # the images and other locations' features and scales). What is left is per row, as with 512-row chunks.
    arrays = [name for name in targets.arrays if name != IMAGES and
              not (name.split(".", 1)[0] in ("features", "scales") and name.split(".", 1)[-1] not in locations)]
    tiny = []
    if "labels" in targets.arrays:
        for c in range(chunks):
            started = time.process_time()
            targets.arrays["labels"][c * targets.chunk_size:(c + 1) * targets.chunk_size]
            tiny.append(time.process_time() - started)
    per_chunk = clock.cpu["read/decompress: target chunk (K views)"] / chunks
    fixed = float(np.median(tiny)) * len(arrays) if tiny else None
    return {"locations": locations, "chunk_rows": targets.chunk_size, "chunks": chunks, "views": targets.views,
            "chunk_read_ms": per_chunk * 1e3, "arrays_read_estimate": len(arrays),
            "fixed_ms_per_chunk_estimate": None if fixed is None else fixed * 1e3,
            "ms_per_row_at_512_row_chunks_estimate": None if fixed is None else
            (max(per_chunk - fixed, 0.0) / targets.chunk_size + fixed / 512) * 1e3,
            "image_block_rows": block, "image_block_read_ms": clock.cpu["read/decompress: image block"]
            / -(-len(targets) // block) * 1e3, "stored_image_shape": list(array.shape[1:])}


def _jpeg_side(clock: Clock, split, n: int, prefix: str) -> None:
    """Extraction side: read the files, decode them (PIL, as ImageFolder's loader), and the source's whole
    read (decode, resize of the shorter side to load_size, centre crop): resize = the rest."""
    from PIL import Image

    rows = np.arange(n)
    paths = [split.source.folder.samples[int(i)][0] for i in split.ids[rows]] \
        if hasattr(split.source, "folder") else []
    if paths:
        with clock.piece(f"{prefix}file read", n):
            blobs = [Path(p).read_bytes() for p in paths]
        with clock.piece(f"{prefix}JPEG decode", n):
            for blob in blobs:
                with Image.open(io.BytesIO(blob)) as image:
                    image.convert("RGB").load()
    with clock.piece(f"{prefix}whole source read", n):
        split.load_raw(rows)


def _view_pieces(clock: Clock, augmenter, pixels: torch.Tensor, params: np.ndarray, prefix: str = "") -> None:
    """The unmixed view's pieces on raw pixels (B, C, H, W), in the augmenter's order: crop/resize, flip,
    RandAugment, normalization, erasing. Each timed alone on the previous piece's output."""
    from pipeline.augment import apply_erasing, apply_randaugment

    layout, n = augmenter.layout, len(pixels)
    params = np.asarray(params)
    base = [[int(x) for x in p[layout["base"]]] for p in params]
    flip_field = list(augmenter.kind.fields).index("flip") if "flip" in augmenter.kind.fields else None
    seeds = [int(p[layout["recipe"]][0]) if layout["recipe"].stop > layout["recipe"].start else -1 for p in params]
    unflipped = [b[:flip_field] + [0] + b[flip_field + 1:] if flip_field is not None else b for b in base]
    with clock.piece(f"{prefix}crop/resize", n):
        raws = [augmenter.kind.apply(image, b) for image, b in zip(pixels, unflipped)]
    flips = [bool(b[flip_field]) if flip_field is not None else False for b in base]
    with clock.piece(f"{prefix}flip", n):
        raws = [r.flip(-1) if f else r for r, f in zip(raws, flips)]
    if getattr(augmenter, "randaugment", None) is not None:
        with clock.piece(f"{prefix}RandAugment", n):
            raws = [apply_randaugment(augmenter.randaugment, r, s) if s >= 0 else r for r, s in zip(raws, seeds)]
    with clock.piece(f"{prefix}normalization", n):
        out = augmenter.normalize(torch.stack(raws))
    if getattr(augmenter, "erasing", None) is not None:
        with clock.piece(f"{prefix}erasing", n):
            for view, s in zip(out, seeds):
                if s >= 0:
                    apply_erasing(augmenter.erasing, view, s)


def _collate(clock: Clock, batches: list) -> None:
    """collate (the loader's own function) and the copy a worker makes to hand a batch over: each of its
    tensors moved into shared memory (timed on copies, so the batches stay as they are)."""
    from pipeline.data import collate_batch

    copies = [[t.clone() for t in tensors(b)] for b in batches]
    with clock.piece("collate + worker-to-trainer copy (shared memory)", sum(batch_len(b) for b in batches)):
        for b, c in zip(batches, copies):
            collate_batch(b)
            for t in c:
                t.share_memory_()


def _whole_views(clock: Clock, augmenter, pixels: torch.Tensor, params, partners, label: str) -> None:
    """The loader's own view calls on a batch: `apply` (built and finished here), and where the code builds
    views to be finished on the device (`raw_views`, a batch object whose `.to(device)` finishes them), the
    host build and the finish apart (the finish on the CPU here)."""
    n = len(pixels)
    with clock.piece(f"{label}: apply, whole", n):
        augmenter.apply(pixels, params, partners)
    build = getattr(augmenter, "raw_views", None)
    if build is not None:
        with clock.piece(f"{label}: host build", n):
            batch = build(pixels, params, partners)
        with clock.piece(f"{label}: device finish", n):
            batch.to(CPU)


def stage_split(cfg: Config, folder: str, sizes: Sizes, tmp: Path) -> dict:
    """Section C (module docstring): each piece on one thread, CPU-ms per sample."""
    from pipeline.augment import partner_inputs, view_augmenter
    from pipeline.data import load_split
    from pipeline.student.train import build_student_run

    n = sizes.split_samples
    row, recipe = Clock(), Clock()
    info: dict = {}
    with threads(1):
        # the SEW-ResNet-18 row: the run's own split (images from the store), augmenter and loader
        run = build_student_run(cfg, CPU, workers=0)
        train = run.train
        reads: dict = {}
        row.attempt("store reads", lambda c: reads.update(_store_reads(c, cfg)))
        info["store_reads"] = reads
        files = load_split(dataclasses.replace(cfg.data, limit=None), "train")  # every file, not the store's rows
        row.attempt("extraction side", lambda c: _jpeg_side(c, files, min(n, len(files)), "extraction side: "))
        augmenter = run.dataset.augmenter
        info["views_finished_on_device"] = hasattr(augmenter, "raw_views")
        idx = np.arange(n) % len(train)  # the store's rows, in turn, at views 1..K-1 in turn
        views = max(2, run.targets.views)
        pixels = train.read(idx)
        params = augmenter.draw(idx, views, num_samples=len(train))
        params = params[np.arange(n), 1 + np.arange(n) % (views - 1)]
        row.attempt("view pieces", lambda c: _view_pieces(c, augmenter, pixels, params))
        row.attempt("whole views", lambda c: _whole_views(c, augmenter, pixels, params,
                                                          partner_inputs(train, augmenter, params, pixels), "view"))
        # the loader's whole work per sample in this process, one thread, and its batches for the collate
        batches = []
        chunks_before = getattr(run.dataset, "chunks_decoded", None)
        for epoch in (1, 2):
            run.sampler.set_epoch(epoch)
            run.dataset.set_epoch(epoch)
            with row.piece("loader total (in process, 1 thread)", len(run.dataset)):
                for batch in run.loader:
                    batches.append(batch)
        if chunks_before is not None:
            info["loader_total_target_chunk_reads"] = run.dataset.chunks_decoded - chunks_before
        row.attempt("collate", lambda c: _collate(c, batches))
        info["row_bytes_per_sample"] = tensor_bytes(batches[0]) / batch_len(batches[0])
        info["row_batch_tensors"] = tensor_shapes(batches[0])
        info["row_uint8_image_bytes"] = int(np.prod(train.image_shape))
        info["row_float32_image_bytes"] = 4 * int(np.prod(train.image_shape))
        del run, batches
        gc.collect()

        # the Spikingformer ImageNet row's recipe, on the same files at its load_size (= image_size), bicubic
        rcfg = load_config(REPO / RECIPE_ROW, [f"data.root={folder}", "data.limit=null",
                                               f"data.image_size={sizes.image}", f"data.load_size={sizes.image}"])
        rsplit = load_split(rcfg.data, "train")
        m = min(n, len(rsplit))
        recipe.attempt("extraction side", lambda c: _jpeg_side(c, rsplit, m, "extraction side: "))
        raugmenter = view_augmenter(rcfg.augment, rsplit)
        ridx = np.arange(m)
        rpixels = rsplit.read(ridx)
        unmixed = raugmenter.draw_online(ridx, 0, len(rsplit), mix=False)
        mixed = raugmenter.draw_online(ridx, 0, len(rsplit), mix=True)
        recipe.attempt("view pieces", lambda c: _view_pieces(c, raugmenter, rpixels, unmixed))
        partners = rpixels.roll(1, 0)  # any raw pixels: the partner's read is an image block, timed on the row
        recipe.attempt("whole unmixed", lambda c: _whole_views(c, raugmenter, rpixels, unmixed, None, "view unmixed"))
        recipe.attempt("whole mixed", lambda c: _whole_views(c, raugmenter, rpixels, mixed, partners, "view mixed"))
        info["recipe"] = {"config": RECIPE_ROW, "randaugment": rcfg.augment.randaugment,
                          "erasing": rcfg.augment.erasing, "mixup": rcfg.augment.mixup, "cutmix": rcfg.augment.cutmix,
                          "mixed_views": f"{rcfg.augment.mix_views} of {rcfg.extract.views}",
                          "source": f"{sizes.image} px ({rcfg.data.interpolation})"}
    return {"row": _split_table(row, info, "row"), "recipe": _split_table(recipe, info, "recipe"), "info": info,
            "threads": 1}


def _split_table(clock: Clock, info: dict, which: str) -> dict:
    """The stage rows, CPU-ms per sample (None: not in this row's path, or not measurable on this code).
    crop/resize .. erasing are each stage's own cost wherever it runs; `view build (host)` is what the
    loader's own call costs, `view finish (device)` what is left for the device (on the CPU here)."""
    ms = clock.ms()

    def g(name: str) -> float | None:
        return ms[name]["cpu_ms_per_sample"] if name in ms else None

    ex = "extraction side: "
    jpeg, whole_read = g(ex + "JPEG decode"), g(ex + "whole source read")
    resize = None if jpeg is None or whole_read is None else whole_read - jpeg - (g(ex + "file read") or 0.0)
    views = "view" if which == "row" else "view mixed"
    host = g(f"{views}: host build")
    host = g(f"{views}: apply, whole") if host is None else host
    stages = {
        "read/decompress: target chunk (K views)": g("read/decompress: target chunk (K views)"),
        "read/decompress: image block": g("read/decompress: image block"),
        "JPEG decode (extraction side, once per image)": jpeg,
        "resize to load_size + centre crop (extraction side)": resize,
        "crop/resize": g("crop/resize"),
        "flip": g("flip"),
        "RandAugment": g("RandAugment"),
        "normalization": g("normalization"),
        "erasing": g("erasing"),
        "mixing (partner view + blend)": None,
        "collate + worker-to-trainer copy (shared memory)": g("collate + worker-to-trainer copy (shared memory)"),
        "view build in the loader (host), whole": host,
        "view finish where the batch is used (device; CPU here)": g(f"{views}: device finish"),
    }
    out = {"stages_cpu_ms_per_sample": stages, "pieces": ms, "notes": clock.notes,
           "views_finished_on_device": info.get("views_finished_on_device")}
    reads = info.get("store_reads", {})
    if which == "row":
        total = g("loader total (in process, 1 thread)")
        known = [v for v in (stages["read/decompress: target chunk (K views)"], stages["read/decompress: image block"],
                             host) if v is not None]
        out["loader_total_cpu_ms_per_sample"] = total
        out["loader_total_epochs"] = 2
        out["loader_total_target_chunk_reads"] = info.get("loader_total_target_chunk_reads")
        out["store_chunks"] = reads.get("chunks")
        out["reads_plus_view_build"] = sum(known)
        out["other (dataset bookkeeping, gathers, chunk float conversion)"] = \
            None if total is None else total - sum(known)
        out["target_chunk_at_512_rows_ms_per_sample_estimate"] = reads.get("ms_per_row_at_512_row_chunks_estimate")
        out["host_to_device_bytes_per_sample"] = info.get("row_bytes_per_sample")
        out["host_to_device_tensors"] = info.get("row_batch_tensors")
        out["uint8_image_bytes_per_sample"] = info.get("row_uint8_image_bytes")
        out["float32_image_bytes_per_sample"] = info.get("row_float32_image_bytes")
        out["not_in_this_row"] = ["RandAugment", "erasing", "mixing (partner view + blend)"]
    else:
        unmixed, mixed = g("view unmixed: apply, whole"), g("view mixed: apply, whole")
        if unmixed is not None and mixed is not None:
            stages["mixing (partner view + blend)"] = mixed - unmixed
        for k in ("read/decompress: target chunk (K views)", "read/decompress: image block",
                  "collate + worker-to-trainer copy (shared memory)"):
            stages[k] = None
        out["view_unmixed_ms"], out["view_mixed_ms"] = unmixed, mixed
        out["partner_image_block_read_ms"] = reads.get("image_block_read_ms")  # a mixed view's partner: one block
        out["recipe"] = info.get("recipe")
        out["not_measured_here"] = ("store reads and collate: no store of this row is built (see the SEW-ResNet-18 "
                                    "row's; a mixed view also reads its partner's image block, "
                                    "partner_image_block_read_ms)")
    return out


# -- D. workers per GPU ---------------------------------------------------------------------------------------------

DOC_H200 = {  # docs/performance.md, "GPU (NVIDIA H200)": the figures of benchmarks/results-cuda-paper.json
    "student_samples_per_s": 867.4, "teacher_views_per_s": 1296.4,
}


def documented_h200() -> dict:
    """The H200 consumer rates of SEW-ResNet-18 @224 (cached student step, batch 64, bfloat16) and of its
    ResNet-18 teacher (bare forward loop, batch 256: host-bound there, so a lower bound of the GPU's rate)."""
    path = REPO / "benchmarks" / "results-cuda-paper.json"
    try:
        r = json.loads(path.read_text())
        w = r["paper_scale"]["workloads"]["sew_resnet18@224"]
        if "H200" not in r["machine"]["device"]:
            raise KeyError("not an H200 run")
        return {"student_samples_per_s": w["loader"]["student_samples_per_s"],
                "teacher_views_per_s": w["extraction"]["bare_samples_per_s"],
                "source": f"{path.relative_to(REPO)} ({r['machine']['device']}, docs/performance.md)"}
    except (OSError, KeyError, ValueError, TypeError):
        return {**DOC_H200, "source": "docs/performance.md, GPU (NVIDIA H200) table"}


def workers_per_gpu(extraction: dict, student: dict, split: dict | None = None) -> dict:
    from benchmarks.paper_plans import ROWS

    gpu = documented_h200()
    per_worker_student = student["loader"]["1"]["samples_per_s"] if "1" in student["loader"] else None
    # The store here has small chunks (its rows cost the teacher K forwards each): with the row's 512-row
    # chunks a target chunk read costs less per sample. The same rate with that read at its estimate:
    row = (split or {}).get("row", {})
    total, chunk = row.get("loader_total_cpu_ms_per_sample"), \
        row.get("stages_cpu_ms_per_sample", {}).get("read/decompress: target chunk (K views)")
    chunk_512 = row.get("target_chunk_at_512_rows_ms_per_sample_estimate")
    per_worker_512 = None if None in (per_worker_student, total, chunk, chunk_512) else \
        per_worker_student * total / (total - chunk + chunk_512)
    per_worker_extract = extraction["loader"]["1"]["views_per_s"] if "1" in extraction["loader"] else None
    rows = {}
    for config, (kind, _) in ROWS.items():
        if config == Path(ROW).name:
            rows[config] = {
                "student_consumer_samples_per_s": gpu["student_samples_per_s"],
                "student_loader_per_worker_samples_per_s": per_worker_student,
                "student_workers_per_gpu":
                    gpu["student_samples_per_s"] / per_worker_student if per_worker_student else None,
                "student_loader_per_worker_at_512_row_chunks_estimate": per_worker_512,
                "student_workers_per_gpu_at_512_row_chunks_estimate":
                    gpu["student_samples_per_s"] / per_worker_512 if per_worker_512 else None,
                "extraction_consumer_views_per_s": gpu["teacher_views_per_s"],
                "extraction_loader_per_worker_views_per_s": per_worker_extract,
                "extraction_workers_per_gpu":
                    gpu["teacher_views_per_s"] / per_worker_extract if per_worker_extract else None,
                "note": "extraction consumer is a lower bound (the documented bare loop was host-bound), so its "
                        "worker count is too",
            }
        elif kind == "imagenet":
            rows[config] = {"note": "same JPEG -> store path, but no documented H200 consumer rate for this row"}
        else:
            rows[config] = {"note": f"{kind} data: not this data path (no JPEG folder)"}
    return {"estimate": "consumer rate on one H200 (documented) / per-worker delivered rate measured on THIS CPU "
                        "at 1 worker; an estimate from this CPU, not a GPU measurement",
            "gpu_rates": gpu, "rows": rows}


# -- machine, table, main ---------------------------------------------------------------------------------------------


def machine_info() -> dict:
    import PIL
    import torchvision

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        from PIL import features

        turbo = bool(features.check_feature("libjpeg_turbo"))
    except Exception:  # noqa: BLE001
        turbo = None
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    return {"cpu_model": model, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "torchvision_version": torchvision.__version__, "timm_version": timm_version,
            "pillow_version": PIL.__version__, "libjpeg_turbo": turbo, "python_version": platform.python_version(),
            "platform": platform.platform(), "cuda_available": torch.cuda.is_available()}


def code_info() -> dict:
    """Which pipeline code was measured: its folder, and where it is a git work tree its commit and the files of
    pipeline/ and stages/ that differ from it (read-only git calls: no index refresh is written)."""
    import subprocess

    import pipeline

    where = Path(pipeline.__file__).resolve().parent
    info: dict = {"pipeline_dir": str(where), "git_commit": None, "uncommitted": None}
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                env=env, timeout=20)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", str(where.parent), "status", "--porcelain", "--", "pipeline",
                                     "stages"], capture_output=True, text=True, env=env, timeout=20)
            info["uncommitted"] = status.stdout.splitlines() if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _f(x, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}" if abs(x) >= 100 or digits else f"{x:.3g}"


def print_table(r: dict) -> None:
    m, f, ex, st, sp = r["machine"], r["folder"], r["extraction"], r["student"], r["stage_split"]
    print(f"\nbkd data path on {m['cpu_model']}, {m['cpus_usable']} CPUs, torch {m['torch_version']} "
          f"({r['size']} sizes, {r['total_s'] / 60:.1f} min; load average {r['load_avg_start']:.1f} -> "
          f"{r['load_avg_end']:.1f})")
    print(f"JPEG folder: {f['train_images']} train images in {f['classes']} classes, "
          f"mean {f['mean_bytes'] / 1e3:.1f} kB, "
          f"{' + '.join(f'{n} at {k}' for k, n in f['orientations'].items())} px, JPEG quality "
          f"{' + '.join(f'{n} at {q}' for q, n in f['qualities'].items())}")
    ws = list(ex["loader"])
    print(f"\nA. extraction ({ex['teacher']} @{ex['image_size']} from {ex['load_size']}, K = {ex['views']}, "
          f"{ex['batch_rows']} rows a batch), views/s")
    print(f"{'':<44}" + "".join(f"{w + ' worker' + ('s' if w != '1' else ''):>14}" for w in ws))
    print(f"{'loader alone':<44}" + "".join(f"{_f(ex['loader'][w]['views_per_s']):>14}" for w in ws))
    print(f"{'teacher forward alone (consumer)':<44}" + f"{_f(ex['consumer']['views_per_s']):>14}")
    print(f"{'end to end (extract_teacher, setup excluded)':<44}"
          + "".join(f"{_f(ex['end_to_end'][w]['views_per_s']):>14}" for w in ws))
    h = ex["host_to_device"]
    print(f"host->device: {h['bytes_per_view'] / 1e3:.0f} kB a view, {h['bytes_per_row'] / 1e6:.2f} MB a row at this "
          f"size; the row's config ({h['row_config']['batch_size']} rows x {h['row_config']['views']} views a loader "
          f"item) at 224: {h['row_config_item_bytes'] / 2**30:.2f} GiB an item, "
          f"{h['row_config_bytes_in_flight'] / 2**30:.1f} GiB in flight ({h['row_config']['workers']} workers x "
          f"prefetch {h['row_config']['prefetch_factor']})")
    ws = list(st["loader"])
    c = st["consumer"]
    print(f"\nB. student ({c['model']} T = {c['timesteps']} @{st['image_size']}, from the store's decoded images), "
          f"samples/s")
    print(f"{'':<44}" + "".join(f"{w + ' workers':>14}" for w in ws))
    print(f"{'loader (timed epochs)':<44}" + "".join(f"{_f(st['loader'][w]['samples_per_s']):>14}" for w in ws))
    print(f"{'student forward+backward (batch ' + str(c['batch_size']) + ')':<44}{_f(c['samples_per_s']):>14}")
    print(f"{'loader / student':<44}" + "".join(f"{_f(st['loader/consumer'][w]):>14}" for w in ws))
    print(f"{'batch arrival (to_device; CPU: no copy)':<44}{_f(c['to_device_ms_per_sample'], 2) + ' ms/sample':>14}")
    print(f"host->device: {st['loader'][ws[0]]['bytes_per_sample'] / 1e3:.0f} kB a sample "
          f"(the uint8 image alone: {sp['row']['uint8_image_bytes_per_sample'] / 1e3:.0f} kB)")
    where = "device" if sp["row"].get("views_finished_on_device") else "host"
    print(f"\nC. stage split, host CPU-ms per sample, 1 thread (normalization/erasing/mixing run on the {where})")
    print(f"  {'stage':<56}{'SEW-ResNet-18 row':>18}{'Spikingformer recipe':>22}")
    for stage in sp["row"]["stages_cpu_ms_per_sample"]:
        a, b = sp["row"]["stages_cpu_ms_per_sample"][stage], sp["recipe"]["stages_cpu_ms_per_sample"][stage]
        print(f"  {stage:<56}{_f(a, 2):>18}{_f(b, 2):>22}")
    row = sp["row"]
    print(f"  {'loader total, in process (row)':<56}{_f(row['loader_total_cpu_ms_per_sample'], 2):>18}"
          f"   ({row.get('loader_total_target_chunk_reads')} chunk reads over {row.get('loader_total_epochs')} "
          f"epochs of a {row.get('store_chunks')}-chunk store)")
    print(f"  {'  of which reads + view build':<56}{_f(row['reads_plus_view_build'], 2):>18}")
    if row.get("target_chunk_at_512_rows_ms_per_sample_estimate") is not None:
        print(f"  {'  target chunk read at 512-row chunks (estimate)':<56}"
              f"{_f(row['target_chunk_at_512_rows_ms_per_sample_estimate'], 2):>18}")
    print(f"  host->device bytes per sample: {row['host_to_device_bytes_per_sample'] / 1e3:.0f} kB "
          f"(uint8 image {row['uint8_image_bytes_per_sample'] / 1e3:.0f} kB, float32 image "
          f"{row['float32_image_bytes_per_sample'] / 1e3:.0f} kB)")
    for which in ("row", "recipe"):
        for name, note in sp[which]["notes"].items():
            print(f"  note ({which}, {name}): {note}")
    d = r["workers_per_gpu"]
    print(f"\nD. loader workers per GPU -- ESTIMATE: documented H200 consumer rate / per-worker rate on THIS CPU "
          f"({d['gpu_rates']['source']})")
    for config, e in d["rows"].items():
        if "student_workers_per_gpu" in e:
            print(f"  {config:<36} student: {_f(e['student_consumer_samples_per_s'])} / "
                  f"{_f(e['student_loader_per_worker_samples_per_s'])} = {_f(e['student_workers_per_gpu'], 1)} workers "
                  f"({_f(e['student_workers_per_gpu_at_512_row_chunks_estimate'], 1)} with 512-row chunks); "
                  f"extraction: {_f(e['extraction_consumer_views_per_s'])} / "
                  f"{_f(e['extraction_loader_per_worker_views_per_s'])} = {_f(e['extraction_workers_per_gpu'], 1)} "
                  f"workers (lower bound)")
        else:
            print(f"  {config:<36} {e['note']}")


def run(size: str = "full", cache: Path | None = None, torch_threads: int = 1) -> dict:
    with threads(torch_threads):
        return _run(size, cache)


def _run(size: str, cache: Path | None) -> dict:
    sizes = SIZES[size]
    cache = Path(cache) if cache else Path(tempfile.gettempdir()) / "bkd-data-path-cache"
    started = time.perf_counter()
    result: dict = {"benchmark": "data_path", "size": size, "sizes": dataclasses.asdict(sizes),
                    "machine": machine_info(), "code": code_info(), "load_avg_start": load()}
    folder = cached_folder(cache, sizes.classes, sizes.per_class)
    result["folder"] = folder
    print(f"JPEG folder {folder['root']}: {folder['train_images']} images, mean {folder['mean_bytes'] / 1e3:.1f} kB, "
          f"qualities {folder['qualities']}", flush=True)
    seconds = result["section_s"] = {"folder": time.perf_counter() - started}
    with tempfile.TemporaryDirectory(prefix="bkd-data-path-") as tmp:
        tmp = Path(tmp)
        mark = time.perf_counter()
        result["extraction"], cfg = run_extraction(tmp, folder["root"], sizes, (1, 2))
        seconds["extraction"], mark = time.perf_counter() - mark, time.perf_counter()
        result["student"], cfg = run_student(tmp, folder["root"], sizes, (0, 1, 2))
        seconds["student"], mark = time.perf_counter() - mark, time.perf_counter()
        print("C. stage split", flush=True)
        result["stage_split"] = stage_split(cfg, folder["root"], sizes, tmp)
        seconds["stage_split"] = time.perf_counter() - mark
    result["workers_per_gpu"] = workers_per_gpu(result["extraction"], result["student"], result["stage_split"])
    result["not_measurable_here"] = (f"4 and 8 loader workers: this machine has {os.cpu_count()} CPUs; the host-to-"
                                     "device copy itself (no GPU): its bytes per sample are reported instead")
    result["load_avg_end"] = load()
    result["total_s"] = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_path", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks the script")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help=f"where the figures go (default: {DEFAULT_JSON.relative_to(REPO)} for a full run; "
                             "a --quick run writes none unless given)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the JPEG folder is cached (default: the system temp dir)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of this (the trainer's) process (default 1; loader workers use 1)")
    parser.add_argument("--note", default=None, help="free text kept in the JSON (e.g. which code was measured)")
    args = parser.parse_args(argv)
    result = run("quick" if args.quick else "full", args.cache, args.threads)
    if args.note:
        result["note"] = args.note
    print_table(result)
    out = args.json if args.json is not None else (None if args.quick else DEFAULT_JSON)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
