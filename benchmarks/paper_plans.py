"""`bkd extract-teacher --plan` for every paper-row config, at the published dataset sizes.

    python -m benchmarks.paper_plans [--configs ...] [--rows 64] [--epochs 2] [--json OUT]

The datasets and trained teachers are not here, so each row is planned the way a user would plan a
dataset before fetching all of it: from a small sample in the real on-disk format, with `--samples`
set to the full split sizes (ImageNet-1k 1,281,167 / 50,000; CIFAR 50,000 / 10,000; CIFAR10-DVS
9,000 / 1,000):

  ImageNet rows   a class folder of JPEG photo crops (benchmarks.photos), one image per class and split
  CIFAR rows      CIFAR python pickles of 32x32 photo crops
  CIFAR10-DVS     an HDF5 file of Poisson event-count frames (no event data ships here: synthetic)

Teachers: each ANN teacher is the row's timm model trained from scratch for `--epochs` on photo crops
at 224, labelled by photograph (as benchmarks.codecs does), so its activations have trained-like
statistics (ReLU sparsity, scales) rather than random-init ones; the SNN teacher of the DVS row is
trained by `bkd train-teacher` for one epoch on the synthetic frames. Each plan is calibrated on
`--rows` rows per split (the configs' chunk of 512 takes long on a CPU; the bytes per row hardly
change with it). Rows whose config sets `extract.codecs` are planned again with every array in
float16 (`extract.codecs={}`), the store before compact codecs, for comparison. The time estimate is
this machine's: it says what the plan prints, not what a GPU takes.
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import save_weights, write_json

REPO = Path(__file__).resolve().parent.parent
IMAGENET = {"train": 1_281_167, "test": 50_000}
CIFAR = {"train": 50_000, "test": 10_000}
ROWS = {  # config: (dataset writer, full split sizes)
    "imagenet-sew-resnet18.yaml": ("imagenet", IMAGENET),
    "imagenet-sew-resnet34.yaml": ("imagenet", IMAGENET),
    "imagenet-sew-resnet50.yaml": ("imagenet", IMAGENET),
    "imagenet-spikingformer-8-768.yaml": ("imagenet", IMAGENET),
    "cifar10-spikingformer-4-384.yaml": ("cifar10", CIFAR),
    "cifar100-spikingformer-4-384.yaml": ("cifar100", CIFAR),
    "cifar10dvs-sew.yaml": ("dvs", {"train": 9_000, "test": 1_000}),
}


# --- datasets in their real formats --------------------------------------------------------------

def write_imagenet(root: Path, seed: int = 0) -> None:
    from benchmarks.photos import make_jpeg_folder

    make_jpeg_folder(root, classes=1000, per_class=1, val_per_class=1, seed=seed)


def write_cifar(root: Path, classes: int, rows: int, seed: int = 0) -> None:
    from benchmarks.photos import photo_array

    names = ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]} if classes == 10
             else {"train": ["train"], "test": ["test"]})
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    key = "labels" if classes == 10 else "fine_labels"
    for split, files in names.items():
        for index, name in enumerate(files):
            images, labels = photo_array(rows, 32, seed + index, "train" if split == "train" else "test", classes)
            batch = {"data": images.reshape(rows, -1), key: labels.tolist(), "batch_label": name}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def write_dvs(root: Path, rows: int, seed: int = 0) -> None:
    import h5py

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for split in ("train", "test"):
        rate = rng.gamma(0.3, 1.0, (rows, 1, 2, 128, 128))  # sparse, bursty event counts per pixel
        frames = rng.poisson(np.broadcast_to(rate, (rows, 4, 2, 128, 128))).astype(np.float32)
        with h5py.File(root / f"{split}.h5", "w") as fh:
            fh.create_dataset("frames", data=frames, chunks=(1, 4, 2, 128, 128))
            fh.create_dataset("labels", data=np.arange(rows) % 10)
            fh.attrs["num_classes"] = 10


# --- teachers --------------------------------------------------------------------------------------

def photo_teacher(model_name: str, num_classes: int, path: Path, epochs: int, train: int) -> None:
    """`model_name` trained on photo crops (benchmarks.codecs.trained_on_photos) with a `num_classes` head,
    saved where the config reads its teacher."""
    from benchmarks.codecs import trained_on_photos

    model = trained_on_photos(model_name, num_classes, epochs=epochs, train=train)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def snn_teacher(cfg, run_dir: Path) -> None:
    """The row's SNN teacher, trained as `bkd train-teacher` trains it, for one epoch."""
    import dataclasses

    from pipeline.teacher.train import train_teacher

    train_teacher(dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, epochs=1)), run_dir)


# --- plans -----------------------------------------------------------------------------------------

def plan_row(config: str, work: Path, rows: int, epochs: int, train: int) -> list[dict]:
    from pipeline.config import load_config
    from pipeline.teacher.plan import format_plan, plan_store

    kind, samples = ROWS[config]
    root = work / "data"
    if not root.exists():  # rows of one dataset share it
        {"imagenet": lambda: write_imagenet(root),
         "cifar10": lambda: write_cifar(root, 10, 2 * rows),
         "cifar100": lambda: write_cifar(root, 100, 2 * rows),
         "dvs": lambda: write_dvs(root, 2 * rows)}[kind]()
    store = work / "cache" / (Path(config).stem + ".zarr")
    overrides = ["loader.workers=0", f"data.root={root}", f"extract.store={store}"]  # one process: 2 cores here
    cfg = load_config(REPO / "configs" / config, overrides)
    weights = work / cfg.teacher.checkpoint
    overrides.append(f"teacher.checkpoint={weights}")
    cfg = load_config(REPO / "configs" / config, overrides)
    if not weights.exists():
        if cfg.teacher.model.startswith("bkd:"):
            snn_teacher(cfg, work / "runs" / "teacher")
        else:
            from pipeline.data import load_split

            classes = load_split(cfg.data, "train").num_classes
            photo_teacher(cfg.teacher.model, classes, weights, epochs, train)
    variants = [("config", [])] + ([("float16", ["extract.codecs={}"])] if cfg.extract.codecs else [])
    out = []
    for name, extra in variants:
        made = plan_store(load_config(REPO / "configs" / config, overrides + extra), torch.device("cpu"), samples, rows)
        print(f"\n== {config} ({name})\n{format_plan(made)}", flush=True)
        out.append({"config": config, "variant": name, "codecs": dict(cfg.extract.codecs) if not extra else {},
                    "views": cfg.extract.views, "plan": made.to_dict()})
    return out


def summary(rows: list[dict]) -> str:
    """One line per plan: features per sample and view, images, the whole store, and the uncompressed
    float16 arithmetic of the features (what the configs' headers compute)."""
    lines = ["| config | codecs | K | features B/sample/view (train) | features, float16 raw | features | images | "
             "store |", "|---" * 8 + "|"]
    from pipeline.teacher.plan import human

    for row in rows:
        plan = row["plan"]
        train = [a for a in plan["arrays"] if a["split"] == "train" and a["name"].startswith(("features.", "scales."))]
        per_view = sum(a["bytes_per_view"] for a in train)
        raw = sum(int(np.prod(a["shape"])) * 2 * (plan["samples"][a["split"]] * plan["views"][a["split"]])
                  for a in plan["arrays"] if a["name"].startswith("features."))
        features = sum(a["bytes"] for a in plan["arrays"] if a["name"].startswith(("features.", "scales.")))
        images = sum(a["bytes"] for a in plan["arrays"] if a["name"] == "images")
        codecs = ", ".join(f"{k}: {v}" for k, v in row["codecs"].items()) or "float16"
        lines.append(f"| {row['config']} | {codecs} | {row['views']} | {per_view:,.0f} | {human(raw)} | "
                     f"{human(features)} | {human(images) if images else '-'} | {human(plan['total_bytes'])} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paper_plans", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--rows", type=int, default=64, help="calibration rows per split")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of photo training for each ANN teacher")
    parser.add_argument("--train", type=int, default=256, help="photo crops the ANN teachers train on")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    args = parser.parse_args(argv)
    started, out = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="bkd-paper-plans-") as scratch:
        for config in args.configs:
            work = Path(scratch) / ROWS[config][0]
            work.mkdir(exist_ok=True)
            out += plan_row(config, work, args.rows, args.epochs, args.train)
    print("\n" + summary(out))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json({"rows": args.rows, "epochs": args.epochs, "train": args.train,
                    "seconds": time.perf_counter() - started, "plans": out}, args.json)
    return out


if __name__ == "__main__":
    main()
