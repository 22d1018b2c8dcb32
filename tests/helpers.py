"""Helpers the test modules share: running the `bkd` CLI, tiny stores and tiny dataset files.

Fixtures live in conftest.py; test modules import what they share from here, never from each other.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.config import DataConfig, load_config
from pipeline.data import ImageSplit
from pipeline.sources import ArraySource
from pipeline.targets import StoreWriter, TargetSpec
from stages.cli import main

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------

# A few hundred samples, one epoch, small chunks so every split has several shards.
TINY = [
    "--set", "data.limit=160",
    "--set", "data.test_size=500",
    "--set", "extract.chunk_size=32",
    "--set", "extract.chunks_per_shard=2",
    "--set", "teacher.batch_size=64",
    "--set", "student.batch_size=32",
    "--set", "student.model_kwargs.widths=[8,16,32]",
    "--set", "extract.features=[pre_logits]",  # the layer maps only lasnn reads: not needed here
]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_bkd(args: list[str], cwd: Path, check: bool = True) -> Result:
    """Invoke the real `bkd` click group in-process (one interpreter: no per-call import cost)."""
    with contextlib.chdir(cwd):
        result = CliRunner().invoke(main, args, catch_exceptions=False)
    out = Result(result.exit_code, result.stdout, result.stderr)
    if check and out.returncode != 0:
        raise AssertionError(f"bkd {' '.join(args)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return out


def run_bkd_process(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Invoke the installed `bkd` console script in a subprocess."""
    bkd = Path(sys.executable).with_name("bkd")
    return subprocess.run([str(bkd), *args], cwd=cwd, env=env or dict(os.environ, DVC_NO_ANALYTICS="1"),
                          capture_output=True, text=True, timeout=600)


def project_with_store(tmp_path_factory, name: str, args: list[str], teacher_epochs: int) -> Path:
    """A new working directory with the configs, a teacher trained with `args`, and its store."""
    root = tmp_path_factory.mktemp(name)
    shutil.copytree(REPO / "configs", root / "configs")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    run_bkd(["train-teacher", *args, "--epochs", str(teacher_epochs)], root)
    run_bkd(["extract-teacher", *args], root)
    return root


def assert_one_line(returncode: int, stderr: str, *fragments: str) -> str:
    """A refusal: exit code 2 and one `bkd: error: ...` line naming each of `fragments`; returns the line."""
    assert returncode == 2, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bkd: error:"), stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def assert_refused(proc: Result, fragment: str) -> None:
    """`proc` was refused in one line that starts its stderr and names `fragment`."""
    assert proc.stderr.startswith("bkd: error:"), proc.stderr
    assert_one_line(proc.returncode, proc.stderr, fragment)


def resumed_equals_straight(monkeypatch, cfg, root: Path, name: str, mid_epoch: bool = False) -> None:
    """Train `cfg` into runs/NAME-straight; into runs/NAME-resumed stop it right after its first checkpoint
    (the first mid-epoch one with `mid_epoch`), as a kill would, and `--resume` it: the weights must be
    identical. `root` is the working directory."""
    import pytest

    from pipeline.checkpoint import load_weights
    from pipeline.student import train

    straight, resumed = root / f"runs/{name}-straight", root / f"runs/{name}-resumed"
    train.train_student(cfg, straight)
    real_save = train.Trainer._save

    def save_then_die(self, epoch, step, tally):
        real_save(self, epoch, step, tally)
        if step or not mid_epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Trainer, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.train_student(cfg, resumed)
    monkeypatch.setattr(train.Trainer, "_save", real_save)
    assert not (resumed / "student.safetensors").exists()
    train.train_student(cfg, resumed, resume=True)
    expected = load_weights(straight / "student.safetensors")
    got = load_weights(resumed / "student.safetensors")
    assert expected.keys() == got.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, got[key]), key


# ---------------------------------------------------------------------------------------------
# Teacher-target stores written with pipeline.targets directly
# ---------------------------------------------------------------------------------------------

N_TRAIN, N_TEST = 300, 150  # 3 shards (last partial), 2 shards
CHUNK, PER_SHARD = 64, 2
DIM, CLASSES = 12, 10
VIEWS = {"train": 3, "test": 1}
PARAMS = 3  # view parameters per view
TOPK = 3


def make_arrays(n: int, seed: int, views: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "features.pre_logits": (rng.standard_normal((n, views, DIM)) * 4).astype(np.float32),  # float16 in the store
        "logits": (rng.standard_normal((n, views, CLASSES)) * 8).astype(np.float32),
        "view_params": rng.integers(0, 5, (n, views, PARAMS)).astype(np.int32),
        "labels": rng.integers(0, CLASSES, n).astype(np.int64),
        "index": np.arange(n, dtype=np.int64),
        "pixel_digest": rng.integers(0, 2**63, n).astype(np.uint64),
    }


def make_test_spec(sha: str = "a" * 64, fingerprints: dict | None = None,
                   n_train: int = N_TRAIN, n_test: int = N_TEST, logits_topk: int | None = None) -> TargetSpec:
    fingerprints = fingerprints or {"train": "f-train", "test": "f-test"}
    return TargetSpec(
        teacher={"model": "resnet18", "checkpoint_sha256": sha, "small_input_stem": True,
                 "num_classes": CLASSES, "num_features": DIM},
        dataset={"name": "digits", "split_seed": 0, "test_size": 100, "limit": None},
        splits={"train": {"num_samples": n_train, "fingerprint": fingerprints["train"], "views": VIEWS["train"]},
                "test": {"num_samples": n_test, "fingerprint": fingerprints["test"], "views": VIEWS["test"]}},
        transform={"scale": 1 / 255, "mean": [0.3], "std": [0.4], "input_shape": [1, 8, 8], "encoding": "direct"},
        augment={"kind": "pad_crop_flip", "seed": 0, "pad": 2, "param_names": ["top", "left", "flip"]},
        features={"locations": {"pre_logits": [DIM]}, "logits_topk": logits_topk},
        chunking={"chunk_size": CHUNK, "chunks_per_shard": PER_SHARD},
    )


def open_writer(path, spec=None, overwrite=False, n_train=N_TRAIN, n_test=N_TEST) -> StoreWriter:
    return StoreWriter(path, spec or make_test_spec(n_train=n_train, n_test=n_test), overwrite=overwrite)


def write_split(writer: StoreWriter, split: str, data: dict[str, np.ndarray], shards=None) -> None:
    layout = writer.layouts[split]
    for shard in range(layout.num_shards) if shards is None else shards:
        start, stop = layout.shard_rows(shard)
        writer.write_shard(split, shard, {k: v[start:stop] for k, v in data.items()})


def build_store(path, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0) -> dict[str, dict]:
    """A complete two-split store at `path`; returns the arrays written."""
    writer = open_writer(path, n_train=n_train, n_test=n_test)
    data = {"train": make_arrays(n_train, seed, VIEWS["train"]), "test": make_arrays(n_test, seed + 1)}
    for split in ("train", "test"):
        write_split(writer, split, data[split])
    writer.finish()
    return data


def build_topk_store(path) -> dict[str, dict]:
    """A complete top-k store (k = TOPK) at `path`; returns the full arrays it was made from."""
    from pipeline.targets import topk_arrays

    writer = StoreWriter(path, make_test_spec(logits_topk=TOPK))
    full = {split: make_arrays(n, i, VIEWS[split]) for i, (split, n) in enumerate((("train", N_TRAIN), ("test", N_TEST)))}
    for split, data in full.items():
        targets = np.repeat(data["labels"][:, None, None], VIEWS[split], 1).repeat(2, 2)
        targets[::4, :, 1] = (data["labels"][::4, None] + 1) % CLASSES  # a mixed view's two classes
        data["targets"] = targets
        write_split(writer, split, {**{k: v for k, v in data.items() if k != "targets"},
                                    **topk_arrays(data["logits"], TOPK, targets)})
    writer.finish()
    return full


def image_split(labels: np.ndarray, seed: int = 0) -> ImageSplit:
    """A train split of random 8x8 digits with `labels`, held in memory."""
    n = len(labels)
    images = np.random.default_rng(seed).integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
    return ImageSplit("digits", "train", ArraySource(images, labels, 10), np.arange(n), DataConfig(name="digits"))


def extract_recording(cfg) -> dict:
    """Extract `cfg`'s store with a random teacher; {(sample, view): the tensor the teacher was fed}."""
    import pipeline.teacher.extract as extract_module
    from pipeline import checkpoint
    from pipeline.data import load_split
    from pipeline.teacher.models import create_teacher

    split = load_split(cfg.data, "train")
    torch.manual_seed(0)
    checkpoint.save_weights(create_teacher(cfg.teacher, split.num_classes, split.image_shape).state_dict(),
                            cfg.teacher.checkpoint)
    fed: list[torch.Tensor] = []
    real = extract_module.teacher_outputs

    def recording(model, images, *args):
        fed.append(images.clone())
        return real(model, images, *args)

    extract_module.teacher_outputs = recording
    try:
        extract_module.extract_teacher(cfg, torch.device("cpu"))
    finally:
        extract_module.teacher_outputs = real
    teacher_saw, views = {}, cfg.extract.views
    shard_rows = cfg.extract.chunk_size * cfg.extract.chunks_per_shard
    assert cfg.extract.batch_size >= shard_rows  # one batch per shard: views 0..K-1 in turn
    for shard, start in enumerate(range(0, len(split), shard_rows)):
        for v in range(views):
            for r, image in enumerate(fed[1 + shard * views + v]):  # fed[0] probes the feature shape
                teacher_saw[(start + r, v)] = image
    return teacher_saw


# ---------------------------------------------------------------------------------------------
# Dataset files in their real on-disk formats
# ---------------------------------------------------------------------------------------------

RNG = np.random.default_rng(0)


def _cifar_batch(path: Path, n: int, classes: int, label_key: str) -> dict:
    batch = {"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8),
             label_key: RNG.integers(0, classes, n).tolist(), "batch_label": "tiny"}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return batch


def write_cifar10(root: Path, per_batch: int = 8) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {name: _cifar_batch(folder / name, per_batch, 10, "labels")
               for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    return batches


def write_cifar100(root: Path) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    _cifar_batch(folder / "train", 24, 100, "fine_labels")
    _cifar_batch(folder / "test", 12, 100, "fine_labels")


def write_imagefolder(root: Path, per_class: int = 6) -> None:
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = RNG.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)  # sizes differ, like real photos
                Image.fromarray(pixels).save(folder / f"{i}.png")


def write_hdf5(root: Path, key: str, shape: tuple, n: dict, dtype=np.uint8) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for split, count in n.items():
        with h5py.File(root / f"{split}.h5", "w") as fh:
            data = RNG.integers(0, 4 if dtype != np.uint8 else 256, (count, *shape)).astype(dtype)
            fh.create_dataset(key, data=data, chunks=(1, *shape))
            fh.create_dataset("labels", data=RNG.integers(0, 10, count))
            fh.attrs["num_classes"] = 10


def rewrite_manifest(store, edit, digest: bool = True) -> None:
    """Apply `edit` to the store's manifest in place; with `digest`, rewrite its digest and the identity file
    beside it too, as a store that was written so would have them (without: a hand edit, which readers refuse)."""
    import zarr

    from pipeline.targets import write_identity
    from pipeline.targets.spec import manifest_digest

    root = zarr.open_group(str(store), mode="r+")
    manifest = dict(root.attrs["manifest"])
    edit(manifest)
    root.attrs["manifest"] = manifest
    if digest:
        root.attrs["manifest_digest"] = manifest_digest(manifest)
        identity = Path(str(store).removesuffix(".zarr") + ".identity.json")
        if identity.is_file():
            write_identity(str(identity), manifest)


def write_photos(root: Path, per_class: int = 6) -> None:
    """A train/ and val/ class-folder tree of JPEGs larger than load_size, sizes differing."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01440764", "n01443537"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = 30 + 3 * i, 44 - 2 * i
                smooth = np.cumsum(rng.integers(-9, 10, (h, w, 3)), axis=1)  # photo-like gradients, not noise
                Image.fromarray(np.clip(smooth + 128, 0, 255).astype(np.uint8)).save(folder / f"{i}.JPEG", quality=90)


def imagenet_config(tmp: Path, *extra: str):
    """An ImageNet-format config over `tmp`/photos (load_size 24, input 16), K = 3 with the images stored."""
    return load_config(REPO / "params.yaml", [
        "data.name=imagenet", f"data.root={tmp / 'photos'}", "data.image_size=16", "data.load_size=24",
        "augment.kind=resized_crop_flip", "augment.flip=true", "extract.views=3", "extract.images=true",
        "extract.chunk_size=4", "extract.chunks_per_shard=2", "extract.batch_size=8", "extract.features=[pre_logits]",
        "student.features={pre_logits: pre_logits}", "student.model_kwargs.widths=[8,16,32]", "student.batch_size=4",
        f"teacher.checkpoint={tmp / 'teacher.safetensors'}", f"extract.store={tmp / 'imagenet.zarr'}", *extra])
