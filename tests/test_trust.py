"""Nothing lost, nothing silently wrong: the store and run-folder findings of the adversarial review.

Each test feeds the bad input itself (a foreign folder, a deleted shard, other pixels, a changed
config on resume, ...) to the real code path and asserts the one-line refusal and that nothing
was deleted or trained on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from pipeline.errors import BkdError, StoreError
from pipeline.targets import TeacherTargets, verify_store
from tests.conftest import TINY, run_bkd
from tests.test_store import CHUNK, N_TRAIN, build_store, make_test_spec, open_writer

STORE = "cache/mnist5k-resnet18.zarr"


def _one_line_refusal(proc, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("bkd: error:") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert fragment in proc.stderr, proc.stderr


# --- 1, 2: --overwrite deletes only what bkd made ---------------------------------------------

def test_overwrite_refuses_a_folder_bkd_did_not_make(tiny_project: Path, tmp_path: Path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    proc = run_bkd(["extract-teacher", *TINY, "--store", str(thesis), "--overwrite"], tiny_project, check=False)
    _one_line_refusal(proc, "not a bkd teacher-target store")
    assert (thesis / "chapter1.tex").read_text() == "years of work"


@pytest.mark.parametrize("store", ["", " ", ".", ".."])
def test_overwrite_never_deletes_the_working_folder(tiny_project: Path, tmp_path: Path, store: str):
    work = tmp_path / "repo"
    shutil.copytree(tiny_project / "configs", work / "configs")
    shutil.copy(tiny_project / "params.yaml", work / "params.yaml")
    (work / ".git").mkdir()
    (work / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    shutil.copytree(tiny_project / "models", work / "models")
    proc = run_bkd(["extract-teacher", *TINY, "--store", store, "--overwrite"], work, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("bkd: error:")
    assert (work / ".git" / "HEAD").is_file() and (work / "configs").is_dir()


def test_overwrite_refuses_a_store_holding_foreign_files_and_a_symlink(tmp_path: Path):
    path = tmp_path / "s.zarr"
    build_store(path)
    (path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="notes.txt"):
        open_writer(path, spec=make_test_spec(sha="c" * 64), overwrite=True)
    assert (path / "notes.txt").read_text() == "mine" and (path / "train").is_dir()
    (path / "notes.txt").unlink()
    link = tmp_path / "link.zarr"
    link.symlink_to(path)
    with pytest.raises(StoreError, match="symbolic link"):
        open_writer(link, spec=make_test_spec(sha="c" * 64), overwrite=True)
    assert TeacherTargets(path, "train").manifest["teacher"]["checkpoint_sha256"] == "a" * 64
    # its own store is replaced
    open_writer(path, spec=make_test_spec(sha="c" * 64), overwrite=True)
    assert not (path / "notes.txt").exists()


def test_crash_while_writing_the_skeleton_is_recoverable(tmp_path: Path, monkeypatch):
    path = tmp_path / "s.zarr"
    real = zarr.Group.create_array
    calls = []

    def dies_on_the_fourth(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this point runs
        return real(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        open_writer(path)
    monkeypatch.setattr(zarr.Group, "create_array", real)
    writer = open_writer(path)  # the same command again: the half-made skeleton is recognised and rebuilt
    assert writer.missing_shards("train") == [0, 1, 2]
    # an interrupted --overwrite that removed the split folders but not the root is still bkd's
    build_store(tmp_path / "t.zarr")
    shutil.rmtree(tmp_path / "t.zarr" / "train")
    open_writer(tmp_path / "t.zarr", spec=make_test_spec(sha="d" * 64), overwrite=True)


# --- 3: a deleted or emptied shard is an error, never zeros ------------------------------------

@pytest.mark.parametrize("array", ["features.pre_logits", "logits", "view_params", "labels", "pixel_digest"])
@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_missing_or_empty_shard_is_an_error(tmp_path: Path, array: str, damage: str):
    path = tmp_path / "s.zarr"
    build_store(path)
    shard_file = path / "train" / array / "c" / "1"
    while shard_file.is_dir():  # c/1/0/0 for (N, V, C) arrays, c/1 for (N,)
        shard_file = next(shard_file.iterdir())
    assert shard_file.stat().st_size > 0
    if damage == "deleted":
        shard_file.unlink()
    else:
        shard_file.write_bytes(b"")
    problems = {(s, i): p for s, i, p in verify_store(path)}
    assert "missing or empty" in problems[("train", 1)]
    assert problems[("train", 0)] is None and problems[("train", 2)] is None
    with pytest.raises(StoreError, match="shard 1 is damaged"):
        TeacherTargets(path, "train")  # refused at open, before any training
    targets = TeacherTargets(path, "train", require_complete=False)
    targets.read_rows(0, CHUNK)  # shard 0 is fine
    with pytest.raises(StoreError, match="shard 1"):
        targets.read_rows(2 * CHUNK, 2 * CHUNK + 5)


def test_all_zero_arrays_are_still_written(tmp_path: Path):
    """view_params of augment.kind none are all zeros: each shard must still be an object on disk."""
    path = tmp_path / "s.zarr"
    writer = open_writer(path)
    from tests.test_store import make_arrays, write_split

    data = make_arrays(N_TRAIN, 0, 3)
    data["view_params"][:] = 0
    data["labels"][:] = 0
    write_split(writer, "train", data)
    write_split(writer, "test", make_arrays(150, 1))
    writer.finish()
    TeacherTargets(path, "train")  # every shard present
    assert all(problem is None for _, _, problem in verify_store(path))


def test_train_student_refuses_a_store_with_a_deleted_shard(tiny_project: Path, tmp_path: Path):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_project / STORE, store)
    shutil.rmtree(store / "train" / "features.pre_logits" / "c" / "1")
    proc = run_bkd(["train-student", *TINY, "--set", f"extract.store={store}", "--run-dir", "runs/refused"],
                   tiny_project, check=False)
    _one_line_refusal(proc, "train shard 1 is damaged")
    assert not (tiny_project / "runs/refused").exists()
    verify = run_bkd(["cache", "verify", str(store)], tiny_project, check=False)
    assert verify.returncode == 1 and "bad shard train/1" in verify.stderr


def test_rows_verify_would_flag_are_refused_when_read(tmp_path: Path):
    from tests.test_store import make_arrays, write_split

    path = tmp_path / "s.zarr"
    writer = open_writer(path)
    data = make_arrays(N_TRAIN, 0, 3)
    data["features.pre_logits"][200, 1, 0] = np.nan  # shard 1
    write_split(writer, "train", data)
    write_split(writer, "test", make_arrays(150, 1))
    writer.finish()
    targets = TeacherTargets(path, "train")  # present and complete: accepted at open
    targets.read_chunk(0)
    with pytest.raises(StoreError, match="non-finite teacher features"):
        targets.read_chunk(3)  # rows 192:256


def test_damaged_manifest_is_one_line(tiny_project: Path, tmp_path: Path):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_project / STORE, store)
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["manifest"]["splits"]
    (store / "zarr.json").write_text(json.dumps(meta))
    for args in (["cache", "info", str(store)], ["cache", "verify", str(store)],
                 ["train-student", *TINY, "--set", f"extract.store={store}", "--run-dir", "runs/refused"]):
        _one_line_refusal(run_bkd(args, tiny_project, check=False), "'splits' is missing")


# --- 5: the store belongs to the pixels it was extracted from ----------------------------------

def test_store_of_other_pixels_with_the_same_ids_is_refused(tmp_path: Path):
    from tests.test_datasets import write_hdf5

    data = tmp_path / "data"
    write_hdf5(data, "images", (1, 8, 8), {"train": 24, "test": 12})
    shutil.copytree(Path(__file__).resolve().parents[1] / "configs", tmp_path / "configs")
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", tmp_path / "params.yaml")
    args = [*TINY, "--set", "data.name=hdf5", "--set", f"data.root={data}", "--set", "extract.chunk_size=8",
            "--set", "teacher.epochs=1", "--set", "student.epochs=1",
            "--set", "extract.store=cache/h5.zarr"]
    run_bkd(["train-teacher", *args], tmp_path)
    run_bkd(["extract-teacher", *args], tmp_path)
    with h5py.File(data / "train.h5", "r+") as fh:  # same ids, same labels, other pixels in one sample
        images = fh["images"][:]
        images[13] = 255 - images[13]
        fh["images"][...] = images
    proc = run_bkd(["train-student", *args, "--run-dir", "runs/s"], tmp_path, check=False)
    _one_line_refusal(proc, "built from other inputs: train sample 13 (store row ")  # the file's row


def test_check_pixels_compares_each_sample(tmp_path: Path):
    from pipeline.targets import pixel_digests

    raw = np.random.default_rng(0).integers(0, 256, (N_TRAIN, 1, 4, 4), dtype=np.uint8)
    path = tmp_path / "s.zarr"
    writer = open_writer(path)
    from tests.test_store import make_arrays, write_split

    data = make_arrays(N_TRAIN, 0, 3)
    data["pixel_digest"] = pixel_digests(raw)
    write_split(writer, "train", data)
    targets = TeacherTargets(path, "train", require_complete=False)
    rows = np.array([0, 5, 299])
    targets.check_pixels(raw[rows], rows)
    other = raw[rows].copy()
    other[1, 0, 0, 0] ^= 1  # one bit of one pixel
    with pytest.raises(StoreError, match="sample 5"):
        targets.check_pixels(other, rows)
    with pytest.raises(StoreError):  # same bytes, another dtype or shape is another input
        targets.check_pixels(raw[rows].reshape(3, 1, 2, 8), rows)


# --- 7, 8, 9: a run folder belongs to its config ------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tiny_project: Path) -> str:
    run_bkd(["train-student", *TINY, "--epochs", "1", "--distill", "kd", "--run-dir", "runs/owned"], tiny_project)
    return "runs/owned"


@pytest.mark.parametrize("change, field", [
    (["--set", "student.lr=0.01"], "student.lr"),
    (["--set", "student.bkd.blur_ratio=0.3"], "student.bkd.blur_ratio"),
    (["--set", "student.timesteps=2"], "student.timesteps"),
    (["--set", "student.batch_size=16"], "student.batch_size"),
    (["--epochs", "2"], "student.epochs"),
    (["--distill", "mixed"], "student.distill"),
    (["--set", "student.model_kwargs.widths=[8,16,16]"], "student.model_kwargs.widths"),
])
def test_resume_refuses_a_changed_config(tiny_project: Path, finished_run: str, change, field):
    before = (tiny_project / finished_run / "config.yaml").read_text()
    args = ["train-student", *TINY, "--epochs", "1", "--distill", "kd", *change, "--run-dir", finished_run, "--resume"]
    proc = run_bkd(args, tiny_project, check=False)
    _one_line_refusal(proc, field)
    assert (tiny_project / finished_run / "config.yaml").read_text() == before


def test_resume_allows_result_neutral_changes(tiny_project: Path, finished_run: str):
    out = run_bkd(["train-student", *TINY, "--epochs", "1", "--distill", "kd", "--device", "cpu",
                   "--set", "student.checkpoint_every=3", "--run-dir", finished_run, "--resume"], tiny_project)
    assert out.returncode == 0
    info = json.loads((tiny_project / finished_run / "run.json").read_text())
    assert info["kind"] == "student" and info["command"][0] and len(info["resumed"]) >= 1
    assert "git_commit" in info


def test_fresh_run_into_another_configs_folder_is_refused(tiny_project: Path, finished_run: str):
    proc = run_bkd(["train-student", *TINY, "--epochs", "1", "--distill", "kd", "--set", "student.lr=0.02",
                    "--run-dir", finished_run], tiny_project, check=False)
    _one_line_refusal(proc, "holds a run of another config")
    assert (tiny_project / finished_run / "student.safetensors").is_file()


def test_run_folder_is_locked_while_a_run_uses_it(tiny_project: Path, finished_run: str):
    from pipeline.locks import PathLock

    with PathLock(str(tiny_project / finished_run / "RUN.lock"), "run"):  # a live process (this one) holds it
        proc = run_bkd(["train-student", *TINY, "--epochs", "1", "--distill", "kd", "--run-dir", finished_run,
                        "--resume"], tiny_project, check=False)
    _one_line_refusal(proc, "in use by another bkd process")


def test_run_dir_that_is_a_file_or_a_stranger_folder(tiny_project: Path, tmp_path: Path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = run_bkd(["train-student", *TINY, "--epochs", "1", "--run-dir", str(afile)], tiny_project, check=False)
    _one_line_refusal(proc, "is a file")
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "cat.jpg").write_bytes(b"meow")
    proc = run_bkd(["train-student", *TINY, "--epochs", "1", "--run-dir", str(stranger)], tiny_project, check=False)
    _one_line_refusal(proc, "not a bkd run folder")
    assert (stranger / "cat.jpg").read_bytes() == b"meow"


def test_truncated_checkpoint_is_one_line(tiny_project: Path, finished_run: str, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_project / finished_run, run)
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    proc = run_bkd(["train-student", *TINY, "--epochs", "1", "--distill", "kd", "--run-dir", str(run), "--resume"],
                   tiny_project, check=False)
    _one_line_refusal(proc, "not a readable bkd checkpoint")


def test_evaluate_takes_the_run_and_refuses_contradictions(tiny_project: Path, finished_run: str, tmp_path: Path):
    base = ["evaluate", *TINY, "--distill", "kd", "--run-dir", finished_run, "--plots-dir", str(tmp_path / "p")]
    proc = run_bkd([*base, "--set", "student.timesteps=8", "--metrics", str(tmp_path / "m.json")], tiny_project,
                   check=False)
    _one_line_refusal(proc, "student.timesteps")
    proc = run_bkd([*base, "--set", "student.model_kwargs.widths=[8,16,16]", "--metrics", str(tmp_path / "m.json")],
                   tiny_project, check=False)
    _one_line_refusal(proc, "student.model_kwargs.widths")
    run_bkd([*base, "--set", "student.epochs=1", "--metrics", str(tmp_path / "m.json")], tiny_project)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["timesteps"] == 4 and metrics["epochs"] == 1


def test_an_interrupted_rerun_leaves_nothing_stale_to_evaluate(tiny_project: Path, finished_run: str, tmp_path: Path):
    from pipeline.config import load_config
    from pipeline.rundir import RunFolder

    run = tmp_path / "run"
    shutil.copytree(tiny_project / finished_run, run)
    cfg = load_config(tiny_project / "params.yaml",
                      [a for a in TINY if a != "--set"] + ["student.epochs=1", "student.distill=kd"])
    with RunFolder(run, cfg, "student", resume=False):
        pass  # a re-run that was killed right after it claimed the folder
    assert not (run / "student.safetensors").exists() and not (run / "history.json").exists()
    proc = run_bkd(["evaluate", *TINY, "--distill", "kd", "--set", "student.epochs=1", "--run-dir", str(run),
                    "--metrics", str(tmp_path / "m.json"), "--plots-dir", str(tmp_path / "p")],
                   tiny_project, check=False)
    _one_line_refusal(proc, "no trained student")


# --- 9: teacher weights and the teacher check ----------------------------------------------------

def test_nan_teacher_weights_are_refused_before_writing(tiny_project: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_project / "models/teacher.safetensors"))
    state[next(k for k, v in state.items() if v.is_floating_point())].fill_(float("nan"))
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    store = tmp_path / "nan.zarr"
    proc = run_bkd(["extract-teacher", *TINY, "--set", f"teacher.checkpoint={bad}", "--store", str(store)],
                   tiny_project, check=False)
    _one_line_refusal(proc, "NaN or infinite")
    assert not store.exists()


def test_missing_teacher_checkpoint_is_an_error_unless_waived(tiny_project: Path):
    args = ["train-student", *TINY, "--epochs", "1", "--distill", "none", "--set", "teacher.checkpoint=models/typo.st"]
    proc = run_bkd([*args, "--run-dir", "runs/refused"], tiny_project, check=False)
    _one_line_refusal(proc, "--trust-store-teacher")
    run_bkd([*args, "--run-dir", "runs/waived", "--trust-store-teacher"], tiny_project)


# --- randomised faults: kill extraction at random moments, re-run, same arrays -------------------

SHARDED = [*TINY, "--set", "extract.chunk_size=16", "--set", "extract.chunks_per_shard=1", "--set",
           "extract.views=2", "--set", "extract.splits=[train]"]


@pytest.mark.slow
def test_extraction_killed_at_random_points_converges_to_the_same_store(tiny_project: Path, tmp_path: Path):
    reference, store = tmp_path / "reference.zarr", tmp_path / "killed.zarr"
    run_bkd(["extract-teacher", *SHARDED, "--store", str(reference)], tiny_project)
    bkd = str(Path(sys.executable).with_name("bkd"))
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    delays = []
    for _ in range(3):
        proc = subprocess.Popen([bkd, "extract-teacher", *SHARDED, "--store", str(store)], cwd=tiny_project,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delays.append(float(rng.uniform(1.0, 8.0)))  # start-up, skeleton and shards all fall in this range
        try:
            proc.wait(timeout=delays[-1])
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    run_bkd(["extract-teacher", *SHARDED, "--store", str(store)], tiny_project)
    ours = zarr.open_group(str(store), mode="r")["train"]
    theirs = zarr.open_group(str(reference), mode="r")["train"]
    for name in ("features.pre_logits", "logits", "view_params", "labels", "index", "pixel_digest"):
        np.testing.assert_array_equal(ours[name][:], theirs[name][:], err_msg=f"{name} (kill delays {delays})")
    assert all(problem is None for _, _, problem in verify_store(store))


# --- the second adversarial round: each case it found, fed again --------------------------------

def test_overwrite_refuses_a_user_file_inside_a_split_folder(tmp_path: Path):
    path = tmp_path / "s.zarr"
    build_store(path)
    (path / "train" / "NOTES.txt").write_text("mine")
    with pytest.raises(StoreError, match="train/NOTES.txt"):
        open_writer(path, spec=make_test_spec(sha="c" * 64), overwrite=True)
    assert (path / "train" / "NOTES.txt").read_text() == "mine"


def test_a_manifest_naming_paths_outside_the_store_deletes_nothing_there(tmp_path: Path):
    path, victim = tmp_path / "s.zarr", tmp_path / "victim"
    build_store(path)
    victim.mkdir()
    (victim / "data.txt").write_text("precious")
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["manifest"]["splits"]["../victim"] = meta["attributes"]["manifest"]["splits"]["test"]
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="unknown split"):
        TeacherTargets(path, "train")
    open_writer(path, spec=make_test_spec(sha="c" * 64), overwrite=True)  # replaces only its own objects
    assert (victim / "data.txt").read_text() == "precious"


def test_swapped_shards_are_caught_by_their_chunk_digests(tmp_path: Path):
    path = tmp_path / "s.zarr"
    build_store(path)
    a, b = path / "train/logits/c/0/0/0", path / "train/logits/c/1/0/0"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    problems = {(s, i): p for s, i, p in verify_store(path)}
    assert "does not match its digest" in problems[("train", 0)] and "digest" in problems[("train", 1)]
    assert problems[("train", 2)] is None
    with pytest.raises(StoreError, match="digest"):
        TeacherTargets(path, "train").read_chunk(0)


@pytest.mark.parametrize("array", ["logits_index", "logits_target_class", "logits_target", "logits_tail"])
def test_cache_verify_catches_a_damaged_topk_array(tmp_path: Path, array: str):
    from tests.test_store import build_topk_store

    path = tmp_path / "s.zarr"
    build_topk_store(path)
    assert run_bkd(["cache", "verify", str(path)], tmp_path).returncode == 0
    stored = zarr.open_array(str(path / "train" / array), mode="r+")
    rows = stored[64:128]  # chunk 1, shard 0: rewritten behind bkd's back, digests untouched
    stored[64:128] = (rows + 1) % 10 if rows.dtype.kind == "i" else rows + 0.5
    proc = run_bkd(["cache", "verify", str(path)], tmp_path, check=False)
    assert proc.returncode == 1 and "bad shard train/0" in proc.stderr and array in proc.stderr, proc.stderr
    assert "train/1" not in proc.stderr and "train/2" not in proc.stderr
    with pytest.raises(StoreError, match=f"chunk 1 of {array} does not match its digest"):
        TeacherTargets(path, "train").read_chunk(1)


def test_topk_rows_that_cannot_be_rebuilt_are_refused(tmp_path: Path):
    from pipeline.targets import topk_arrays
    from tests.test_store import TOPK, make_arrays, write_split

    path = tmp_path / "s.zarr"
    writer = open_writer(path, spec=make_test_spec(logits_topk=TOPK))
    for split, n, views in (("train", N_TRAIN, 3), ("test", 150, 1)):
        data = make_arrays(n, 0, views)
        kept = topk_arrays(data["logits"], TOPK, np.repeat(data["labels"][:, None, None], views, 1).repeat(2, 2))
        if split == "train":
            kept["logits_tail"][200, 1, 0] = np.nan  # shard 1, written with matching digests
            kept["logits_target_class"][10, 0, 1] = 10  # shard 0: a class the teacher does not have
        write_split(writer, split, {**data, **kept})
    writer.finish()
    problems = {(s, i): p for s, i, p in verify_store(path)}
    assert "logits_target_class outside [0, 10)" in problems[("train", 0)]
    assert "non-finite logits_tail" in problems[("train", 1)] and problems[("train", 2)] is None
    with pytest.raises(StoreError, match="non-finite logits_tail"):
        TeacherTargets(path, "train").read_chunk(3)


def test_extraction_rerun_rewrites_a_deleted_shard(tiny_project: Path, tmp_path: Path):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_project / STORE, store)
    before = zarr.open_group(str(store), mode="r")["train/features.pre_logits"][:]
    (store / "train/features.pre_logits/c/1/0/0").unlink()
    out = run_bkd(["extract-teacher", *TINY, "--store", str(store)], tiny_project)
    assert "(1 shards written)" in out.stdout
    assert all(problem is None for _, _, problem in verify_store(store))
    np.testing.assert_array_equal(zarr.open_group(str(store), mode="r")["train/features.pre_logits"][:], before)


@pytest.mark.parametrize("damage, fragment", [
    (lambda s: (s / "train/features.pre_logits/zarr.json").unlink(), "train/features.pre_logits is missing"),
    (lambda s: (s / "train/zarr.json").unlink(), "'train' group's metadata is missing"),
    (lambda s: (s / "train/shards_done/c/1").write_bytes(b"\x00\x01"), "shards_done cannot be read"),
    (lambda s: _edit_manifest(s, ["splits", "train", "num_samples"], "160"), "splits.train.num_samples"),
    (lambda s: _edit_manifest(s, ["chunking", "chunk_size"], 0), "chunking.chunk_size"),
])
def test_damaged_store_metadata_is_one_line(tiny_project: Path, tmp_path: Path, damage, fragment):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_project / STORE, store)
    damage(store)
    for args in (["cache", "verify", str(store)],
                 ["train-student", *TINY, "--set", f"extract.store={store}", "--run-dir", "runs/refused"],
                 ["extract-teacher", *TINY, "--store", str(store)]):
        _one_line_refusal(run_bkd(args, tiny_project, check=False), fragment)


def _edit_manifest(store: Path, keys: list[str], value) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    node = meta["attributes"]["manifest"]
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    (store / "zarr.json").write_text(json.dumps(meta))


def test_run_folder_of_files_with_bkd_names_but_no_config_is_refused(tiny_project: Path, tmp_path: Path):
    folder = tmp_path / "userrun"
    folder.mkdir()
    (folder / "run.json").write_text('{"mine": 1}')
    proc = run_bkd(["train-student", *TINY, "--epochs", "1", "--run-dir", str(folder)], tiny_project, check=False)
    _one_line_refusal(proc, "not a bkd run folder")
    assert (folder / "run.json").read_text() == '{"mine": 1}'


def test_teacher_weights_and_metrics_never_overwrite_user_files(tiny_project: Path, tmp_path: Path):
    notes = tmp_path / "notes.yaml"
    notes.write_text("my: notes\n")
    proc = run_bkd(["train-teacher", *TINY, "--epochs", "1", "--set", f"teacher.checkpoint={notes}",
                    "--run-dir", str(tmp_path / "t")], tiny_project, check=False)
    _one_line_refusal(proc, "not a safetensors weights file")
    assert notes.read_text() == "my: notes\n"
    table = tmp_path / "table.csv"
    table.write_text("a,b\n1,2\n")
    proc = run_bkd(["evaluate", *TINY, "--distill", "mixed", "--metrics", str(table)], tiny_project, check=False)
    _one_line_refusal(proc, "not a JSON file")
    assert table.read_text() == "a,b\n1,2\n"


@pytest.mark.parametrize("args, fragment", [
    (["--run-dir", ""], "--run-dir is empty"),
    (["--set", "seed=99999999999999999999999"], "seed must be in"),
])
def test_more_bad_arguments_are_one_line(tiny_project: Path, args, fragment):
    _one_line_refusal(run_bkd(["train-student", *TINY, "--epochs", "1", *args], tiny_project, check=False), fragment)


def test_a_full_disk_while_saving_weights_is_one_line(tmp_path: Path, monkeypatch):
    import torch

    from pipeline import checkpoint

    class SafetensorError(Exception):  # what safetensors raises for "No space left on device"
        pass

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(BkdError, match="No space left"):
        checkpoint.save_weights({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_resume_refuses_another_store(tiny_project: Path, finished_run: str, tmp_path: Path):
    """The student takes K from the store, so a rebuilt store could change a run silently: refused."""
    other = tmp_path / "views2.zarr"
    run_bkd(["extract-teacher", *TINY, "--views", "2", "--store", str(other)], tiny_project)
    proc = run_bkd(["train-student", *TINY, "--epochs", "1", "--distill", "kd", "--set", f"extract.store={other}",
                    "--run-dir", finished_run, "--resume"], tiny_project, check=False)
    _one_line_refusal(proc, "not the one it started from")


# --- the third adversarial round --------------------------------------------------------------

def test_a_full_disk_while_saving_a_checkpoint_is_one_line(tmp_path: Path, monkeypatch):
    import torch

    from pipeline import checkpoint

    def full(*args, **kwargs):  # what torch.save raises when the disk fills mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 65216 vs 65112")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(BkdError, match="cannot write"):
        checkpoint.save_state({"step": 1}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_lock_left_by_a_full_disk_is_taken_over(tmp_path: Path):
    from pipeline import locks

    lock = tmp_path / "RUN.lock"
    lock.write_bytes(b"")  # created, then the disk was full before its owner was written
    old = time.time() - 2 * locks.UNREADABLE_LOCK_SECONDS
    os.utime(lock, (old, old))
    with locks.PathLock(str(lock), "busy"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_bytes(b"")  # a fresh one may be a writer between creating and filling it: respected
    with pytest.raises(BkdError, match="busy"):
        with locks.PathLock(str(lock), "busy"):
            pass


def test_plots_never_overwrite_user_files(tiny_project: Path, tmp_path: Path):
    folder = tmp_path / "userplots"
    folder.mkdir()
    (folder / "layers.png").write_bytes(b"my own picture")
    proc = run_bkd(["evaluate", *TINY, "--distill", "mixed", "--plots-dir", str(folder),
                    "--metrics", str(tmp_path / "m.json"), "--report", str(tmp_path / "r.json")],
                   tiny_project, check=False)
    _one_line_refusal(proc, "not a plot bkd wrote")
    assert (folder / "layers.png").read_bytes() == b"my own picture" and not (tmp_path / "m.json").exists()
    (folder / "layers.png").unlink()
    args = ["evaluate", *TINY, "--distill", "mixed", "--plots-dir", str(folder), "--metrics", str(tmp_path / "m.json"),
            "--report", str(tmp_path / "r.json")]
    run_bkd(args, tiny_project)
    run_bkd(args, tiny_project)  # its own plots are replaced
