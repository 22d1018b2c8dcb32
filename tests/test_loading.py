"""Parallel loading that keeps the store's locality, decoded images in the store, views of the full image.

Loader workers must change when a batch is ready, never what it holds; under workers each chunk is
decoded (close to) once per epoch; the store's images give the very pixels the files give.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
import zarr
from PIL import Image

from pipeline import checkpoint
from pipeline.augment import ViewAugmenter, view_augmenter, view_schedule
from pipeline.config import AugmentConfig, LoaderConfig, load_config
from pipeline.data import data_loader, load_split, load_splits
from pipeline.errors import ConfigError, StoreError
from pipeline.teacher.extract import extract_teacher
from pipeline.teacher.models import create_teacher
from pipeline.student.stream import CachedTargetDataset, open_student_targets
from pipeline.samplers import ChunkShuffleSampler, interleave_lanes
from pipeline.targets import IMAGES, StoredImages, TeacherTargets, verify_store
from tests.helpers import (CHUNK, N_TEST, TINY, build_store, extract_recording, image_split, imagenet_config,
                           make_arrays, open_writer, resumed_equals_straight, rewrite_manifest, run_bkd, write_photos,
                           write_split)

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# -- lanes: whole spans of the epoch's order per worker -----------------------------------------

@pytest.mark.parametrize("n,batch,lanes", [(320, 32, 2), (300, 32, 3), (1000, 50, 4), (97, 10, 8), (64, 64, 2),
                                           (65, 32, 4)])
def test_lanes_reorder_whole_batches_and_keep_the_short_one_last(n, batch, lanes):
    order = np.random.default_rng(n).permutation(n)
    out = interleave_lanes(order, batch, lanes)
    assert sorted(out.tolist()) == list(range(n))  # a reordering of the same samples
    batches = [out[i:i + batch] for i in range(0, n, batch)]
    originals = {tuple(order[i:i + batch]) for i in range(0, n, batch)}
    assert all(tuple(b) in originals for b in batches)  # the same batches, whole
    assert all(len(b) == batch for b in batches[:-1])
    # batch k comes from lane k mod L, and each lane is one contiguous span of the original order
    used = min(lanes, len(batches))
    position = {tuple(order[i:i + batch]): i // batch for i in range(0, n, batch)}
    for lane in range(used):
        mine = sorted(position[tuple(b)] for k, b in enumerate(batches) if k % used == lane)
        assert mine == list(range(mine[0], mine[0] + len(mine)))


def test_lane_sampler_is_the_plain_order_with_one_lane_and_resumes_by_prefix():
    plain = ChunkShuffleSampler(300, 16, 2, seed=4)
    one = ChunkShuffleSampler(300, 16, 2, seed=4, lanes=1, batch_size=32)
    assert list(plain) == list(one)
    lanes = ChunkShuffleSampler(300, 16, 2, seed=4, lanes=3, batch_size=32, with_epoch=True)
    lanes.set_epoch(2)
    full = list(lanes)
    assert all(epoch == 2 for epoch, _ in full)
    lanes.set_epoch(2, start=96)
    assert list(lanes) == full[96:]


# -- workers: same batches, chunks decoded once ----------------------------------------------------

def _logged_dataset(tmp_path: Path, n: int, buffer_chunks: int, log: Path):
    """A CachedTargetDataset whose store reads append 'pid chunk' to `log` (from whichever process reads)."""
    data = build_store(tmp_path / f"s{n}.zarr", n_train=n)["train"]
    targets = TeacherTargets(tmp_path / f"s{n}.zarr", "train")
    original = targets.read_chunk

    def logged(chunk, locations=None):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()} {chunk}\n")
        return original(chunk, locations)

    targets.read_chunk = logged
    return CachedTargetDataset(image_split(data["labels"]), targets, buffer_chunks)


def _reads(log: Path) -> list[tuple[int, int]]:
    lines = log.read_text().split() if log.exists() else []
    out = [(int(lines[i]), int(lines[i + 1])) for i in range(0, len(lines), 2)]
    log.unlink(missing_ok=True)
    return out


def _epoch(loader) -> list:
    """Each batch's inputs (finished, as the training device gets them), labels, pre-logits and logits."""
    return [(images.to("cpu"), labels, features["pre_logits"], logits) for images, labels, features, logits, _ in loader]


def test_two_workers_serve_the_main_process_batches_and_decode_each_chunk_about_once(tmp_path):
    n, batch, buffer = 640, 32, 2  # 10 chunks of 64, windows of 2 chunks
    log = tmp_path / "reads.log"
    dataset = _logged_dataset(tmp_path, n, buffer, log)
    sampler = ChunkShuffleSampler(n, CHUNK, buffer, seed=1, lanes=2, batch_size=batch, with_epoch=True)
    loader = data_loader(dataset, batch, sampler, LoaderConfig(workers=2, persistent_workers=True), CPU)
    reference = data_loader(dataset, batch, sampler, LoaderConfig(workers=0), CPU)
    chunks = n // CHUNK
    for epoch in range(2):  # persistent workers learn the epoch from the sampler's (epoch, index) pairs
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        served = _epoch(loader)
        reads = _reads(log)
        expected = _epoch(reference)
        _reads(log)
        assert len(served) == len(expected) == n // batch
        for got, want in zip(served, expected):
            for a, b in zip(got, want):
                assert torch.equal(a, b)
        pids = {pid for pid, _ in reads}
        assert len(pids) == 2 and os.getpid() not in pids  # the workers decoded, the trainer did not
        # every chunk decoded, each once but for those of a window where the two lanes meet (persistent
        # workers may still hold some of last epoch's chunks)
        if epoch == 0:
            assert {c for _, c in reads} == set(range(chunks))
        assert len(reads) <= chunks + 2 * buffer
        assert all(reads.count(r) == 1 for r in reads)  # no worker decodes a chunk twice
    # without lanes the workers take alternate batches: each decodes (nearly) every chunk
    plain = ChunkShuffleSampler(n, CHUNK, buffer, seed=1)
    list(data_loader(dataset, batch, plain, LoaderConfig(workers=2, persistent_workers=False), CPU))
    assert len(_reads(log)) > 1.5 * chunks


def test_persistent_workers_serve_each_epochs_scheduled_views(tmp_path):
    """K = 3 views under two persistent workers: every epoch serves the view `view_schedule` gives each
    sample that epoch (its stored targets, its input rebuilt from the stored parameters), as a loader
    without workers does; the workers' copies learn the epoch from the sampler, not from `set_epoch`."""
    n, batch, buffer, views, seed = 256, 32, 2, 3, 5
    augmenter = ViewAugmenter(AugmentConfig(kind="pad_crop_flip", pad=2), (1, 8, 8))
    data = make_arrays(n, 0, views)
    data["view_params"] = augmenter.draw(np.arange(n), views)
    writer = open_writer(tmp_path / "k3.zarr", n_train=n)
    write_split(writer, "train", data)
    write_split(writer, "test", make_arrays(N_TEST, 1))
    writer.finish()
    split = image_split(data["labels"])
    dataset = CachedTargetDataset(split, TeacherTargets(tmp_path / "k3.zarr", "train"), buffer, augmenter, "views",
                                  seed=seed)
    sampler = ChunkShuffleSampler(n, CHUNK, buffer, seed=1, lanes=2, batch_size=batch, with_epoch=True)
    loader = data_loader(dataset, batch, sampler, LoaderConfig(workers=2, persistent_workers=True), CPU)
    reference = data_loader(dataset, batch, sampler, LoaderConfig(workers=0), CPU)
    logits = torch.from_numpy(data["logits"].astype(np.float16)).float()
    schedules, by_sample = [], []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)  # the training process's copy only, as Trainer does
        schedule = view_schedule(n, views, epoch, seed)
        schedules.append(schedule)
        order = [i for _, i in sampler]
        served, expected = _epoch(loader), _epoch(reference)
        by_sample.append(torch.cat([got[3] for got in served])[np.argsort(order)])
        assert len(served) == len(expected) == n // batch
        for b, (got, want) in enumerate(zip(served, expected)):
            for a, c in zip(got, want):
                assert torch.equal(a, c)
            idx = order[b * batch:(b + 1) * batch]
            images, _, _, got_logits = got
            assert torch.equal(got_logits, logits[idx, schedule[idx]])
            params = torch.from_numpy(data["view_params"][idx, schedule[idx]])
            assert torch.equal(images.to("cpu"), augmenter.apply(split.read(idx), params))
    assert (schedules[0] != schedules[1]).all() and (schedules[1] != schedules[2]).all()
    assert len(np.unique(schedules[0])) == views
    assert all((by_sample[e] != by_sample[e + 1]).any(1).all() for e in range(2))  # each sample, another view


def test_extraction_with_loader_workers_writes_the_same_store(tmp_path):
    def cfg(name: str, workers: int):
        return load_config(REPO / "params.yaml", [
            "data.limit=48", "extract.chunk_size=8", "extract.chunks_per_shard=2", "extract.batch_size=12",
            "extract.splits=[train]", "extract.features=[pre_logits]", "extract.views=3",
            "augment.mixup=0.5", "augment.mix_views=1", "augment.randaugment=rand-m9-n1-mstd0.4-inc1",
            f"teacher.checkpoint={tmp_path / 'teacher.safetensors'}", f"extract.store={tmp_path / name}",
            f"loader.workers={workers}"])

    one, two = cfg("one.zarr", 0), cfg("two.zarr", 2)
    split = load_split(one.data, "train")
    torch.manual_seed(0)
    checkpoint.save_weights(create_teacher(one.teacher, split.num_classes, split.image_shape).state_dict(),
                            one.teacher.checkpoint)
    extract_teacher(one, CPU)
    extract_teacher(two, CPU)
    a, b = TeacherTargets(one.extract.store, "train"), TeacherTargets(two.extract.store, "train")
    rows_a, rows_b = a.read_rows(0, len(a)), b.read_rows(0, len(b))
    assert set(rows_a) == set(rows_b)
    for name in rows_a:
        np.testing.assert_array_equal(rows_a[name], rows_b[name], err_msg=name)


# -- ImageNet: views of the load_size image, images stored once ------------------------------------

@pytest.fixture(scope="module")
def imagenet_store(tmp_path_factory):
    """A K = 3 store of a JPEG tree at load_size 24, input 16, with the images, and what the teacher saw."""
    tmp = tmp_path_factory.mktemp("imagenet")
    write_photos(tmp / "photos")
    cfg = imagenet_config(tmp)
    saw = extract_recording(cfg)  # one batch per shard, as it needs
    split = load_split(cfg.data, "train")
    return cfg, split, saw


def test_clean_input_is_the_centre_crop_of_the_load_size_image(imagenet_store):
    cfg, split, _ = imagenet_store
    assert split.source_shape == (3, 24, 24) and split.image_shape == (3, 16, 16)
    path = split.source.folder.samples[split.ids[5]][0]
    pixels = TF.pil_to_tensor(Image.open(path).convert("RGB"))
    expected = TF.center_crop(TF.center_crop(TF.resize(pixels, [24], antialias=True), [24, 24]), [16, 16])
    torch.testing.assert_close(split.load([5])[0], (expected.float() * split.scale - split.mean) / split.std,
                               rtol=0, atol=0)
    assert split.transform["load_size"] == 24 and split.transform["input_shape"] == [3, 16, 16]


def test_views_are_cut_from_the_whole_load_size_image(imagenet_store):
    cfg, split, saw = imagenet_store
    targets = TeacherTargets(cfg.extract.store, "train")
    params = targets.read_rows(0, len(split))["view_params"]  # (N, V, [top, left, height, width, flip])
    assert (params[:, 0] == [4, 4, 16, 16, 0]).all()  # view 0: the centre crop
    boxes = params[:, 1:].reshape(-1, 5)
    assert (boxes[:, 0] + boxes[:, 2] <= 24).all() and (boxes[:, 1] + boxes[:, 3] <= 24).all()
    outside = (boxes[:, 0] < 4) | (boxes[:, 1] < 4) | (boxes[:, 0] + boxes[:, 2] > 20) | (boxes[:, 1] + boxes[:, 3] > 20)
    assert outside.sum() >= len(boxes) // 2  # most boxes reach beyond the centre crop
    for i in range(len(split)):
        assert torch.equal(saw[(i, 0)], split.load([i])[0])


def test_student_views_equal_the_teacher_inputs_from_files_and_from_the_store(imagenet_store):
    cfg, split, saw = imagenet_store
    targets = open_student_targets(cfg, "train", split)
    raw = split.load_raw(range(len(split)))
    stored = zarr.open_group(cfg.extract.store, mode="r")["train"][IMAGES][:]
    np.testing.assert_array_equal(stored, raw)  # uint8, as the source decoded them
    from_store = split.reading_from(StoredImages(targets, split))
    for images in (split, from_store):
        dataset = CachedTargetDataset(images, targets, 2, view_augmenter(cfg.augment, images), "views")
        for v in range(cfg.extract.views):
            dataset.schedule = torch.full((len(split),), v)
            batch = dataset.__getitems__(list(range(len(split))))[0].to("cpu")
            for i in range(len(split)):
                assert torch.equal(batch[i], saw[(i, v)]), (i, v)


def test_a_rewritten_stored_image_is_an_error_never_another_picture(imagenet_store, tmp_path):
    import shutil

    cfg, split, _ = imagenet_store
    copy = tmp_path / "copy.zarr"
    shutil.copytree(cfg.extract.store, copy)
    array = zarr.open_group(copy, mode="r+")["train"][IMAGES]
    array[3] = array[4]  # another (real) picture in row 3
    targets = TeacherTargets(copy, "train")
    images = StoredImages(targets, split)
    sample = int(split.ids[3])  # the file's row of store row 3
    refusal = rf"image of sample {sample} \(store row 3\) does not match its pixel digest"
    with pytest.raises(StoreError, match=refusal) as info:
        images.read(split.ids[[1, 3]])
    assert "\n" not in str(info.value)
    assert any(problem and "images" in problem for _, _, problem in verify_store(copy))


def test_student_trains_from_the_stored_images(imagenet_store, monkeypatch):
    cfg, split, _ = imagenet_store
    root = Path(cfg.extract.store).parent
    read = []
    monkeypatch.setattr(StoredImages, "read", lambda self, rows, _real=StoredImages.read: read.append(1) or
                        _real(self, rows))
    args = [f"data.root={cfg.data.root}", "data.name=imagenet", "data.image_size=16", "data.load_size=24",
            "augment.kind=resized_crop_flip", "augment.flip=true", "extract.views=3", "extract.images=true",
            "extract.chunk_size=4", "extract.chunks_per_shard=2", "extract.features=[pre_logits]",
            "student.model_kwargs.widths=[8,16,32]", "student.batch_size=4", "student.epochs=1",
            f"teacher.checkpoint={cfg.teacher.checkpoint}", f"extract.store={cfg.extract.store}"]
    sets = [x for a in args for x in ("--set", a)]
    run_bkd(["train-student", "--config", str(REPO / "params.yaml"), *sets, "--set", "loader.workers=0",
             "--run-dir", str(root / "run0")], root)
    assert read  # the training process read the store's images, not the files
    assert (root / "run0" / "student.safetensors").is_file()
    # (the same with loader workers: the imagenet-sew-resnet18 row of tests/test_datasets.py end to end)


@pytest.mark.parametrize("override,message", [
    ("loader.workers=-1", "loader.workers must be >= 0"),
    ("loader.pin_memory=sometimes", "loader.pin_memory must be auto, true or false"),
    ("loader.prefetch_factor=0", "loader.prefetch_factor must be >= 1"),
    ("data.load_size=100", "data.load_size must be in [data.image_size=224"),
])
def test_bad_loader_settings_are_one_line(override, message):
    extra = ["data.image_size=224"] if override.startswith("data.load_size") else []
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as info:
        load_config(None, [*extra, override])
    assert "\n" not in str(info.value)


def test_loader_settings_do_not_change_a_teacher_run_or_the_store_identity():
    from pipeline.rundir import RESULT_NEUTRAL, SCOPES

    assert "loader.workers" in SCOPES["student"]  # a student's sample order has one lane per worker
    assert not any(s.startswith("loader") for s in SCOPES["teacher"])
    assert {"loader.pin_memory", "loader.prefetch_factor", "loader.persistent_workers"} <= set(RESULT_NEUTRAL)
    cfg = load_config(None, ["loader.workers=3"])
    assert dataclasses.asdict(cfg.loader)["workers"] == 3
    splits = load_splits(cfg.data, ["train"])
    assert splits["train"].source_shape == splits["train"].image_shape  # mnist: no crop


def test_views_never_write_into_the_raw_values_they_are_cut_from():
    from pipeline.augment import ViewAugmenter
    from pipeline.config import AugmentConfig

    frames = torch.rand(3, 4, 2, 8, 8)  # float event counts: float32 already, normalized in place
    kept = frames.clone()
    aug = ViewAugmenter(AugmentConfig(kind="event_flip_roll", max_roll=2), (4, 2, 8, 8), mean=torch.tensor([0.5]),
                        std=torch.tensor([2.0]))
    out = aug.apply(frames, np.stack([aug.identity()] * 3))
    assert torch.equal(frames, kept)
    assert torch.equal(out, (kept - 0.5) / 2.0)


def test_evaluation_reads_files_in_loader_workers_with_the_same_result(imagenet_store):
    from pipeline.metrics import predict_logits

    cfg, _, _ = imagenet_store
    test = load_splits(cfg.data, ("train", "test"))["test"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
    alone = predict_logits(model, test, CPU, batch_size=4)
    workers = predict_logits(model, test, CPU, batch_size=4, loader=LoaderConfig(workers=2))
    assert len(alone) == len(test) and torch.equal(alone, workers)


@pytest.mark.slow
def test_mid_epoch_resume_under_loader_workers_is_exact(tiny_project, monkeypatch):
    """Two workers and their lanes: killed after step 2 of 5, resumed, the same weights (persistent workers
    across epochs: test_two_workers_serve_the_main_process_batches...)."""
    monkeypatch.chdir(tiny_project)
    cfg = load_config(REPO / "params.yaml", [a for a in TINY if a != "--set"] +
                      ["loader.workers=2", "student.checkpoint_every=2", "student.epochs=1"])
    resumed_equals_straight(monkeypatch, cfg, tiny_project, "lanes", mid_epoch=True)


def test_a_corrupt_image_read_in_a_loader_worker_is_one_plain_line(tmp_path):
    write_photos(tmp_path / "photos", per_class=3)
    bad = sorted((tmp_path / "photos" / "train" / "n01443537").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated mid-file
    cfg = imagenet_config(tmp_path, "loader.workers=2", "extract.splits=[train]", "extract.images=false")
    split = load_split(cfg.data, "train")
    checkpoint.save_weights(create_teacher(cfg.teacher, split.num_classes, split.image_shape).state_dict(),
                            cfg.teacher.checkpoint)
    sets = [x for a in ["data.name=imagenet", f"data.root={tmp_path / 'photos'}", "data.image_size=16",
                        "data.load_size=24", "extract.features=[pre_logits]", "extract.splits=[train]",
                        "extract.chunk_size=2", "extract.chunks_per_shard=1", "extract.batch_size=2",
                        "loader.workers=2", f"teacher.checkpoint={cfg.teacher.checkpoint}",
                        f"extract.store={tmp_path / 'bad.zarr'}"] for x in ("--set", a)]
    proc = run_bkd(["extract-teacher", "--config", str(REPO / "params.yaml"), *sets], tmp_path, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("bkd: error: ") and f"{bad}: not a readable image" in lines[-1]
    assert "Caught" not in lines[-1] and "Traceback" not in lines[-1]


def _edit_array_shape(store: Path, split: str, name: str, shape: list[int]) -> None:
    """Rewrite an array's metadata shape (its zarr.json) and nothing else: what a hand edit or a bad copy does."""
    meta = store / split / name / "zarr.json"
    data = json.loads(meta.read_text())
    data["shape"] = shape
    meta.write_text(json.dumps(data))


@pytest.mark.parametrize("damage, fragment", [
    (lambda s: rewrite_manifest(s, lambda m: m["splits"]["train"].__setitem__("views", 4)),
     "train/features.pre_logits is (12, 3, 512) float16 where the manifest makes it (12, 4, 512)"),
    (lambda s: _edit_array_shape(s, "train", IMAGES, [12, 3, 20, 24]),
     "train/images is (12, 3, 20, 24) uint8 where the manifest makes it (12, 3, 24, 24)"),
])
def test_arrays_the_manifest_does_not_describe_are_refused_by_verify_and_training(imagenet_store, tmp_path, damage,
                                                                                     fragment):
    import shutil

    cfg, split, _ = imagenet_store
    copy = tmp_path / "copy.zarr"
    shutil.copytree(cfg.extract.store, copy)
    damage(copy)
    problems = [(s, i, p) for s, i, p in verify_store(copy) if p]
    assert ("train", None) in [(s, i) for s, i, _ in problems] and fragment in problems[0][2]
    proc = run_bkd(["cache", "verify", str(copy)], tmp_path, check=False)
    assert proc.returncode == 1 and f"bad split train: damaged store, {fragment}" in proc.stderr
    with pytest.raises(StoreError, match="damaged store"):  # not an IndexError deep in a read
        open_student_targets(dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, store=str(copy))),
                             "train", split)
    info = run_bkd(["cache", "info", str(copy)], tmp_path, check=False)  # not "complete" over the damage
    assert info.returncode == 2 and info.stderr.count("\n") == 1 and fragment in info.stderr


def test_verify_flags_a_store_not_marked_complete(imagenet_store, tmp_path):
    import shutil

    cfg, _, _ = imagenet_store
    copy = tmp_path / "copy.zarr"
    shutil.copytree(cfg.extract.store, copy)
    zarr.open_group(str(copy), mode="r+").attrs["complete"] = False
    proc = run_bkd(["cache", "verify", str(copy)], tmp_path, check=False)
    assert proc.returncode == 1 and "bad store: the store is not marked complete" in proc.stderr


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _kill_a_loader_worker(args: list[str], cwd: Path, ready, settle: float = 0.0) -> str:
    """Run `bkd ARGS`, SIGKILL one of its loader workers once `ready()` holds and workers are alive (after
    `settle` seconds more), and return the command's one-line refusal, checked to be the only output of note."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([str(Path(sys.executable).with_name("bkd")), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    deadline, killed = time.monotonic() + 300, None
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        if _children(proc.pid) and ready():
            time.sleep(settle)
            for worker in _children(proc.pid):  # those alive now (a short-lived child may have gone)
                try:
                    os.kill(worker, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed = worker
                break
        time.sleep(0.02)
    _, stderr = proc.communicate(timeout=300)
    assert killed is not None, "the command ended before a worker could be killed"
    line = stderr.replace("\r", "\n").strip().splitlines()[-1]  # after the progress bar's last redraw
    assert proc.returncode == 2 and stderr.count("bkd: error:") == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert line.startswith("bkd: error: a data loader worker process died")
    return line


@pytest.mark.slow
def test_a_killed_loader_worker_is_one_line_and_resume_continues(tiny_project):
    """A loader worker SIGKILLed mid-run (as the OOM killer does): one line saying what happened and how to go
    on, and `--resume` then finishes the run."""
    args = ["train-student", *TINY, "--epochs", "8", "--distill", "none", "--set", "loader.workers=2",
            "--run-dir", "runs/oom"]
    run = tiny_project / "runs/oom"
    line = _kill_a_loader_worker(args, tiny_project, ready=lambda: (run / "last.pt").is_file())  # past epoch 1
    assert "--resume" in line
    out = run_bkd([*args, "--resume"], tiny_project)
    assert "test accuracy" in out.stdout
    assert len(json.loads((run / "history.json").read_text())) == 8


@pytest.mark.slow
def test_a_killed_loader_worker_during_extraction_is_one_line_and_the_rerun_completes(tiny_project):
    args = ["extract-teacher", *TINY, "--set", "loader.workers=2", "--set", "extract.views=6",
            "--store", "cache/oom.zarr"]
    _kill_a_loader_worker(args, tiny_project, ready=lambda: True, settle=0.5)  # into the first shard
    done = run_bkd(args, tiny_project)
    assert "complete" in done.stdout
    assert all(problem is None for _, _, problem in verify_store(tiny_project / "cache/oom.zarr"))
