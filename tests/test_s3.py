"""Stores at s3:// URLs against a real S3 endpoint on 127.0.0.1 (moto's server, tests/s3server.py):
extraction in one process, on a dask LocalCluster and after SIGKILL; the lock against a second writer
and the conditional writes it rests on; --overwrite deleting only bkd's objects; `bkd cache verify`;
student training with loader workers and DDP ranks; the plan's free space; and a DVC remote on S3."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.errors import BkdError
from pipeline.locks import PathLock
from pipeline.teacher.extract import store_lock
from tests.helpers import TINY, build_store, run_bkd, run_bkd_process
from tests.s3server import s3_endpoint  # noqa: F401  (the module's S3 endpoint)

pytestmark = pytest.mark.slow

# 160 train samples in 10 shards of 16 rows, 2 views: enough shards to kill a run part-way.
ARGS = [*TINY, "--set", "extract.chunk_size=16", "--set", "extract.chunks_per_shard=1",
        "--set", "extract.views=2", "--set", "extract.splits=[train]"]
SHARDS = 10
NAMES = ("features.pre_logits", "logits", "view_params", "labels", "index", "pixel_digest")
SHARD_OBJECT = "train/logits/c/{}/0/0"  # one of a shard's objects, relative to the store


def _arrays(store: str | Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")["train"]
    return {name: group[name][:] for name in NAMES}


def _assert_same_arrays(store: str | Path, reference: Path) -> None:
    ours, theirs = _arrays(store), _arrays(reference)
    for name in NAMES:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def _copy_store(endpoint, source: str, name: str) -> str:
    """A server-side copy of the store at s3 URL `source` under `name` in the bucket; its URL."""
    fs = endpoint.fs()
    src = source.removeprefix("s3://")
    paths = fs.find(src)
    fs.copy(paths, [f"{endpoint.bucket}/{name}/{path[len(src) + 1:]}" for path in paths])
    assert len(endpoint.keys(name)) == len(paths)
    return endpoint.uri(name)


@pytest.fixture(scope="module")
def reference(tiny_project) -> Path:
    """The local store, extracted in one process, that every store on S3 must equal array for array."""
    run_bkd(["extract-teacher", *ARGS, "--store", "cache/s3-reference.zarr"], tiny_project)
    return tiny_project / "cache/s3-reference.zarr"


@pytest.fixture(scope="module")
def s3_store(tiny_project, reference, s3_endpoint) -> str:  # noqa: F811
    """The same extraction into s3://BUCKET/targets.zarr, in one process; shared read-only by the tests."""
    url = s3_endpoint.uri("targets.zarr")
    out = run_bkd(["extract-teacher", *ARGS, "--store", url], tiny_project)
    assert f"({SHARDS} shards written)" in out.stdout
    return url


# -- extraction -------------------------------------------------------------------------------------

def test_extraction_to_s3_equals_the_local_store(tiny_project, reference, s3_store, s3_endpoint):  # noqa: F811
    keys = s3_endpoint.keys("targets.zarr")
    assert "targets.zarr/zarr.json" in keys and f"targets.zarr/{SHARD_OBJECT.format(9)}" in keys  # on the server
    assert "targets.zarr.lock" not in s3_endpoint.keys()  # the lock went with the extraction
    _assert_same_arrays(s3_store, reference)
    info = json.loads(run_bkd(["cache", "info", s3_store, "--json"], tiny_project).stdout)
    assert info["complete"] is True and info["bytes_on_disk"] > 0
    assert info["splits"]["train"]["shards_complete"] == info["splits"]["train"]["shards_total"] == SHARDS
    out = run_bkd(["cache", "verify", s3_store], tiny_project)
    assert out.returncode == 0 and f"all {SHARDS} shards ok" in out.stdout


def test_two_worker_local_cluster_overwrites_a_store_of_another_run_on_s3(tiny_project, reference,
                                                                          s3_endpoint):  # noqa: F811
    """--workers 2 --overwrite: the dask workers write the store on S3, equal to the local one, in place
    of a store of another run; only bkd's objects are deleted."""
    url = s3_endpoint.uri("dask.zarr")
    build_store(url)  # a bkd store of another run: other views, a test split
    fs = s3_endpoint.fs()
    bystanders = {"other.txt": b"not bkd's", "dask.zarr-notes.txt": b"beside the store, its name a prefix"}
    for key, data in bystanders.items():
        fs.pipe_file(f"{s3_endpoint.bucket}/{key}", data)
    assert any(k.startswith("dask.zarr/test/") for k in s3_endpoint.keys("dask.zarr"))

    out = run_bkd(["extract-teacher", *ARGS, "--store", url, "--workers", "2", "--overwrite"], tiny_project)
    assert f"({SHARDS} shards written)" in out.stdout
    _assert_same_arrays(url, reference)
    assert not any(k.startswith("dask.zarr/test/") for k in s3_endpoint.keys("dask.zarr"))  # the old split went
    for key, data in bystanders.items():
        assert fs.cat_file(f"{s3_endpoint.bucket}/{key}") == data, key
    assert "dask.zarr.lock" not in s3_endpoint.keys()
    assert run_bkd(["cache", "verify", url], tiny_project).returncode == 0


def test_sigkill_then_rerun_on_s3_equals_the_local_store(tiny_project, reference, s3_endpoint,  # noqa: F811
                                                         tmp_path):
    url = s3_endpoint.uri("killed.zarr")
    flags = "killed.zarr/train/shards_done/c"
    bkd = str(Path(sys.executable).with_name("bkd"))
    with open(tmp_path / "stderr", "wb") as log:
        proc = subprocess.Popen([bkd, "extract-teacher", *ARGS, "--store", url], cwd=tiny_project,
                                env=dict(os.environ, **s3_endpoint.env), stdout=subprocess.DEVNULL, stderr=log)
    done, deadline = 0, time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and done < 1:
        done = len(s3_endpoint.keys(flags))  # a shard's flag object: written after its data
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stderr = (tmp_path / "stderr").read_text(errors="replace")
    assert 1 <= done < SHARDS, f"the run should have been killed part-way ({done} shards flagged):\n{stderr[-2000:]}"
    assert "killed.zarr.lock" in s3_endpoint.keys()  # the killed process's lock is left on the server
    info = json.loads(run_bkd(["cache", "info", url, "--json"], tiny_project).stdout)
    assert info["complete"] is False
    flagged = info["splits"]["train"]["shards_complete"]
    assert 1 <= flagged < SHARDS

    # The dead process's lock is stale (same host, its pid gone): the re-run takes it over.
    out = run_bkd(["extract-teacher", *ARGS, "--store", url], tiny_project)
    assert f"({SHARDS - flagged} shards written)" in out.stdout
    _assert_same_arrays(url, reference)
    assert run_bkd(["cache", "verify", url], tiny_project).returncode == 0
    assert "killed.zarr.lock" not in s3_endpoint.keys()


# -- the lock ---------------------------------------------------------------------------------------

def test_second_extraction_into_an_s3_store_is_refused(tiny_project, s3_endpoint):  # noqa: F811
    url = s3_endpoint.uri("busy.zarr")
    with store_lock(url):  # an extraction by a live process (this one) holds the store
        assert "busy.zarr.lock" in s3_endpoint.keys()
        out = run_bkd(["extract-teacher", *ARGS, "--store", url], tiny_project, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "being written by another extraction" in out.stderr and str(os.getpid()) in out.stderr
    assert not s3_endpoint.keys("busy.zarr")  # refused before anything was written
    assert "busy.zarr.lock" not in s3_endpoint.keys()  # and the holder's lock went when it let go


def _race(contenders: list, attempt) -> list:
    """Run attempt(contender) in one thread per contender, released together; the ones that succeeded."""
    barrier, won = threading.Barrier(len(contenders)), []

    def run(contender):
        barrier.wait()
        if attempt(contender):
            won.append(contender)

    threads = [threading.Thread(target=run, args=(c,)) for c in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won


def test_concurrent_exclusive_creations_let_exactly_one_through(s3_endpoint):  # noqa: F811
    """What makes the lock safe on S3: `open(path, "xb")` is a PUT with `If-None-Match: *`, which the
    server accepts for one writer only. Four clients of their own create the same key at once."""
    clients = [s3_endpoint.fs() for _ in range(4)]
    for client in clients:
        client.ls(s3_endpoint.bucket)  # connected before the race

    for round_ in range(8):
        key = f"{s3_endpoint.bucket}/race/{round_}.lock"

        def create(client, key=key):
            try:
                with client.open(key, "xb") as fh:
                    fh.write(str(clients.index(client)).encode())
                return True
            except FileExistsError:
                return False

        won = _race(clients, create)
        assert len(won) == 1, f"round {round_}: {len(won)} exclusive creations succeeded"
        assert clients[0].cat_file(key) == str(clients.index(won[0])).encode()  # the winner's, not overwritten

    # the same through bkd's lock: one holder, the other refused naming it
    url = s3_endpoint.uri("race/store.zarr")

    refusals = []

    def take(lock):
        try:
            lock.__enter__()
            return True
        except BkdError as exc:
            refusals.append(str(exc))
            return False

    locks = [PathLock(f"{url}.lock", f"{url} is being written") for _ in range(2)]
    won = _race(locks, take)
    assert len(won) == 1 and len(refusals) == 1, refusals
    assert "is being written" in refusals[0] and f"pid {os.getpid()}" in refusals[0]
    won[0].__exit__(None, None, None)
    assert "race/store.zarr.lock" not in s3_endpoint.keys("race")


def test_an_endpoint_ignoring_if_none_match_lets_an_exclusive_create_overwrite(s3_endpoint):  # noqa: F811
    """s3fs checks nothing itself in "xb" mode: it sends `If-None-Match: *` and relies on the server. An
    endpoint without conditional writes (here: the header dropped before it is sent) takes the second
    create as an overwrite, silently -- which is why the lock is only as safe as the store's support."""
    fs = s3_endpoint.fs()
    fs.ls(s3_endpoint.bucket)
    key = f"{s3_endpoint.bucket}/unconditional.lock"
    with fs.open(key, "xb") as fh:
        fh.write(b"first")
    with pytest.raises(FileExistsError):  # the server enforces it
        with fs.open(key, "xb") as fh:
            fh.write(b"second")

    def drop_condition(params, **kwargs):
        params.pop("IfNoneMatch", None)

    fs.s3.meta.events.register("before-parameter-build.s3.PutObject", drop_condition)
    with fs.open(key, "xb") as fh:  # no error
        fh.write(b"second")
    assert fs.cat_file(key) == b"second"


# -- --overwrite ------------------------------------------------------------------------------------

def test_overwrite_on_s3_refuses_a_store_holding_a_foreign_object(tiny_project, s3_endpoint):  # noqa: F811
    url = s3_endpoint.uri("foreign.zarr")
    build_store(url)
    fs = s3_endpoint.fs()
    fs.pipe_file(f"{s3_endpoint.bucket}/foreign.zarr/train/NOTES.txt", b"mine")
    before = {key: fs.cat_file(f"{s3_endpoint.bucket}/{key}") for key in s3_endpoint.keys("foreign.zarr")}
    out = run_bkd(["extract-teacher", *ARGS, "--store", url, "--overwrite"], tiny_project, check=False)
    assert out.returncode == 2 and "train/NOTES.txt" in out.stderr and "did not write" in out.stderr, out.stderr
    after = {key: fs.cat_file(f"{s3_endpoint.bucket}/{key}") for key in s3_endpoint.keys("foreign.zarr")}
    assert after == before  # nothing deleted, nothing written


# -- verify -----------------------------------------------------------------------------------------

def test_cache_verify_finds_a_missing_and_a_swapped_shard_object_on_s3(tiny_project, s3_store,
                                                                       s3_endpoint):  # noqa: F811
    url = _copy_store(s3_endpoint, s3_store, "damaged.zarr")  # the original verifies (the first test)
    fs, root = s3_endpoint.fs(), f"{s3_endpoint.bucket}/damaged.zarr"
    fs.rm_file(f"{root}/{SHARD_OBJECT.format(3)}")
    a, b = f"{root}/{SHARD_OBJECT.format(6)}", f"{root}/{SHARD_OBJECT.format(7)}"
    data_a, data_b = fs.cat_file(a), fs.cat_file(b)
    fs.pipe_file(a, data_b)
    fs.pipe_file(b, data_a)
    out = run_bkd(["cache", "verify", url], tiny_project, check=False)
    assert out.returncode == 1, out.stdout
    assert f"bad shard train/3: {SHARD_OBJECT.format(3)} is missing or empty" in out.stderr, out.stderr
    assert "bad shard train/6" in out.stderr and "bad shard train/7" in out.stderr and "digest" in out.stderr
    assert f"3 of {SHARDS} shards bad" in out.stderr
    assert "bad shard train/2" not in out.stderr


# -- training from S3 -------------------------------------------------------------------------------

def test_student_trains_from_s3_with_loader_workers(tiny_project, s3_store):
    run = tiny_project / "runs/s3-workers"
    out = run_bkd(["train-student", *ARGS, "--set", f"extract.store={s3_store}", "--set", "loader.workers=2",
                   "--epochs", "1", "--run-dir", str(run)], tiny_project, check=False)
    # the workers are forked with the trainer's open store: each opens it again, its s3fs client bound to
    # the child's own event loop
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "student.safetensors").is_file()


def test_student_trains_from_s3_on_two_ddp_ranks(tiny_project, s3_store, s3_endpoint):  # noqa: F811
    run = tiny_project / "runs/s3-ddp"
    out = run_bkd_process(["train-student", *ARGS, "--set", f"extract.store={s3_store}", "--epochs", "1",
                           "--run-dir", str(run), "--nproc", "2"], tiny_project,
                          env=dict(os.environ, **s3_endpoint.env, DVC_NO_ANALYTICS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("test accuracy") == 1  # rank 0 reports
    assert (run / "student.safetensors").is_file()


# -- free space -------------------------------------------------------------------------------------

def test_plan_reports_unknown_free_space_on_s3_and_the_check_never_refuses(tiny_project, reference, s3_store,
                                                                           s3_endpoint, monkeypatch):  # noqa: F811
    url = s3_endpoint.uri("planned.zarr")
    text = run_bkd(["extract-teacher", *ARGS, "--store", url, "--plan"], tiny_project).stdout
    assert "free at destination: unknown" in text, text
    plan = json.loads(run_bkd(["extract-teacher", *ARGS, "--store", url, "--plan", "--json"], tiny_project).stdout)
    assert plan["free_bytes"] is None and plan["total_bytes"] > 0
    assert not s3_endpoint.keys("planned.zarr")  # the plan writes nothing there

    # A local disk with 1,000 bytes free: a local store missing one shard is refused, one on S3 is not.
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    local = tiny_project / "cache/s3-space.zarr"
    shutil.rmtree(local, ignore_errors=True)
    shutil.copytree(reference, local)
    (local / SHARD_OBJECT.format(4)).unlink()
    out = run_bkd(["extract-teacher", *ARGS, "--store", str(local)], tiny_project, check=False)
    assert out.returncode == 2 and "projected at" in out.stderr and "1000 B free" in out.stderr, out.stderr

    url = _copy_store(s3_endpoint, s3_store, "space.zarr")
    s3_endpoint.fs().rm_file(f"{s3_endpoint.bucket}/space.zarr/{SHARD_OBJECT.format(4)}")
    out = run_bkd(["extract-teacher", *ARGS, "--store", url], tiny_project)
    assert "(1 shards written)" in out.stdout
    _assert_same_arrays(url, reference)


# -- a DVC remote on S3 -----------------------------------------------------------------------------

def _dvc(args: list[str], cwd: Path) -> str:
    tool = Path(sys.executable).with_name(args[0]) if args[0] == "dvc" else args[0]
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run([str(tool), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def _cache_files_match_their_names(repo: Path) -> int:
    """Every object in the repository's DVC cache has the md5 its path names (.dir manifests aside)."""
    files = [f for f in (repo / ".dvc/cache/files/md5").rglob("*") if f.is_file() and f.suffix != ".dir"]
    for f in files:
        assert hashlib.md5(f.read_bytes()).hexdigest() == f.parent.name + f.name, f
    return len(files)


def test_dvc_remote_on_s3_pushes_and_pulls_a_store_that_verifies_and_trains(tiny_project, reference, tmp_path,
                                                                            s3_endpoint):  # noqa: F811
    repo, clone = tmp_path / "repo", tmp_path / "clone"
    repo.mkdir()
    _dvc(["git", "init", "-q"], repo)
    _dvc(["dvc", "init", "-q"], repo)
    _dvc(["dvc", "config", "cache.type", "reflink,hardlink,symlink"], repo)
    _dvc(["dvc", "remote", "add", "-d", "s3", s3_endpoint.uri("dvcstore")], repo)
    _dvc(["dvc", "remote", "modify", "s3", "endpointurl", s3_endpoint.url], repo)
    shutil.copytree(reference, repo / "targets.zarr")
    _dvc(["dvc", "add", "-q", "targets.zarr"], repo)
    _dvc(["git", "add", "-A"], repo)
    _dvc(["git", "commit", "-q", "-m", "store"], repo)
    _dvc(["dvc", "push"], repo)
    files = [f for f in (repo / "targets.zarr").rglob("*") if f.is_file()]
    contents = {hashlib.md5(f.read_bytes()).hexdigest() for f in files}
    pushed = s3_endpoint.keys("dvcstore")
    assert len(pushed) == len(contents) + 1  # every distinct file, and the folder's .dir manifest
    assert {k.removeprefix("dvcstore/files/md5/").replace("/", "") for k in pushed if not k.endswith(".dir")} == contents

    _dvc(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    _dvc(["dvc", "pull"], clone)
    pulled = clone / "targets.zarr"
    _assert_same_arrays(pulled, reference)
    linked = [f for f in pulled.rglob("*") if not f.is_dir()]
    assert len(linked) == len(files)
    assert all(f.is_symlink() or f.stat().st_nlink > 1 for f in linked)  # links into the cache, not copies
    assert all(f.stat().st_mode & 0o222 == 0 for f in linked)  # which DVC keeps read-only

    out = run_bkd(["cache", "verify", str(pulled)], tiny_project)
    assert f"all {SHARDS} shards ok" in out.stdout
    run = tiny_project / "runs/s3-dvc-pulled"
    run_bkd(["train-student", *ARGS, "--set", f"extract.store={pulled}", "--epochs", "1", "--run-dir", str(run)],
            tiny_project)
    assert (run / "student.safetensors").is_file()
    assert _cache_files_match_their_names(clone) == len(contents)  # nothing written through the links
    assert _cache_files_match_their_names(repo) == len(contents)
