"""A store under DVC at scale: the identity file DVC tracks in its place, a store whose files are read-only
links into DVC's cache (`dvc add` with the shipped cache.type), what `--plan` counts of DVC's cache, and the
store of the workspace a temporary experiment was queued from."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.dvcrepo import DvcCopies, origin_path, temporary_workspace
from pipeline.teacher import plan as planning
from tests.helpers import REPO, TINY, assert_one_line, project_with_store, run_bkd

STORE = "cache/mnist5k-resnet18.zarr"
IDENTITY = "cache/mnist5k-resnet18.identity.json"
TRAIN = ["train-student", *TINY, "--epochs", "1"]


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout + done.stderr


def _cache_files(root: Path) -> dict[Path, str]:
    """Every data file of DVC's cache and the md5 its name says it has."""
    files = {}
    for path in (root / ".dvc/cache/files/md5").rglob("*"):
        if path.is_file() and not path.name.endswith(".dir"):
            files[path] = path.parent.name + path.name
    return files


def _assert_cache_intact(root: Path) -> None:
    """No file of DVC's cache was written through a link: each still has the md5 it is named by."""
    files = _cache_files(root)
    assert files
    for path, md5 in files.items():
        assert hashlib.md5(path.read_bytes()).hexdigest() == md5, f"{path} was modified through a link"


def _store_files(root: Path) -> list[Path]:
    return [p for p in (root / STORE).rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def linked(tmp_path_factory) -> Path:
    """A project whose store was `dvc add`ed under the shipped .dvc/config: its files are read-only hard
    links into DVC's cache (ext4 has no reflinks)."""
    root = project_with_store(tmp_path_factory, "links", TINY, teacher_epochs=1)
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")  # the store's .dvc file must not be git-ignored
    _run(["git", "init", "-q"], root)
    _run(["dvc", "add", "-q", STORE], root)
    _run(["git", "add", "-A"], root)  # a first commit: dvclive, logging a run, reads the repository's HEAD
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "store"], root)
    return root


@pytest.mark.slow
def test_a_linked_store_is_one_copy_and_every_command_reads_it(linked):
    files = _store_files(linked)
    assert files and all(f.stat().st_nlink >= 2 for f in files)  # hard links: one copy on disk
    assert all(stat.S_IMODE(f.stat().st_mode) & 0o222 == 0 for f in files)  # read-only (root writes anyway)
    cached = {p.stat().st_ino for p in _cache_files(linked)}
    assert {f.stat().st_ino for f in files} <= cached
    assert run_bkd(["cache", "verify", STORE], linked).returncode == 0
    assert json.loads(run_bkd(["cache", "info", STORE, "--json"], linked).stdout)["complete"] is True
    run_bkd([*TRAIN, "--run-dir", "runs/linked"], linked)
    assert (linked / "runs/linked/student.safetensors").is_file()
    run_bkd(["evaluate", "--run-dir", "runs/linked", "--metrics", "m.json", *TINY], linked)
    assert 0 <= json.loads((linked / "m.json").read_text())["top1"] <= 1
    _assert_cache_intact(linked)


@pytest.mark.slow
def test_resume_rewrites_a_shard_beside_links_without_touching_the_cache(linked):
    shard = linked / STORE / "train/logits/c/1/0/0"
    assert shard.stat().st_nlink >= 2
    shard.unlink()
    out = run_bkd(["extract-teacher", *TINY], linked)
    assert "(1 shards written)" in out.stdout
    assert shard.stat().st_nlink == 1  # a new file of its own, not written through the link
    assert run_bkd(["cache", "verify", STORE], linked).returncode == 0
    _assert_cache_intact(linked)
    assert "modified" not in _run(["dvc", "status", f"{STORE}.dvc"], linked)  # the same bytes as before


@pytest.mark.slow
def test_overwrite_then_relink_and_the_identity_file_follows_the_store(linked):
    before = json.loads((linked / IDENTITY).read_text())
    run_bkd(["extract-teacher", *TINY, "--views", "2", "--overwrite"], linked)
    _assert_cache_intact(linked)  # --overwrite unlinked the files; it wrote none through them
    assert json.loads(run_bkd(["cache", "info", STORE, "--json"], linked).stdout)["views"]["train"] == 2
    after = json.loads((linked / IDENTITY).read_text())
    assert after["manifest_digest"] != before["manifest_digest"] and after["splits"]["train"]["views"] == 2

    # DVC brings back the store it tracks, as links again
    _run(["dvc", "checkout", "--relink", "--force", f"{STORE}.dvc"], linked)
    assert all(f.stat().st_nlink >= 2 for f in _store_files(linked))
    assert json.loads(run_bkd(["cache", "info", STORE, "--json"], linked).stdout)["views"]["train"] == 1
    assert run_bkd(["cache", "verify", STORE], linked).returncode == 0
    # the identity file still names the replaced store: a student run refuses the store now there
    out = run_bkd([*TRAIN, "--run-dir", "runs/refused"], linked, check=False)
    assert_one_line(out.returncode, out.stderr, STORE, IDENTITY, "replaced")
    assert not (linked / "runs/refused/student.safetensors").exists()
    # the extraction (nothing to write) names the store there again, and training goes on
    assert "(0 shards written)" in run_bkd(["extract-teacher", *TINY], linked).stdout
    assert json.loads((linked / IDENTITY).read_text()) == before
    run_bkd([*TRAIN, "--run-dir", "runs/relinked"], linked)
    _assert_cache_intact(linked)


@pytest.mark.slow
def test_plan_counts_what_dvc_adds(linked):
    shown = run_bkd(["extract-teacher", *TINY, "--plan"], linked).stdout
    assert f"DVC: DVC tracks it ({STORE}.dvc" in shown and "hard links, no second copy" in shown
    _run(["dvc", "config", "--local", "cache.type", "copy"], linked)
    try:
        plan = json.loads(run_bkd(["extract-teacher", *TINY, "--plan", "--json"], linked).stdout)
        assert plan["dvc"]["bytes"] == plan["total_bytes"] and plan["dvc"]["same_filesystem"] is True
        shown = run_bkd(["extract-teacher", *TINY, "--plan"], linked).stdout
        assert "a second copy in" in shown and "on the store's disk" in shown
    finally:
        _run(["dvc", "config", "--local", "--unset", "cache.type"], linked)
    # a store DVC does not track (the shipped dvc.yaml tracks the identity file): nothing more
    shown = run_bkd(["extract-teacher", *TINY, "--plan", "--store", "cache/untracked.zarr"], linked).stdout
    assert "DVC: DVC does not track the store" in shown


def test_free_space_counts_dvcs_copy(monkeypatch):
    """The store fits its disk alone but not with DVC's second copy: refused; DVC's copy on a cache of its own
    file system is checked against that file system."""
    plan = planning.Plan("cache/x.zarr", {"train": 1}, {"train": 1}, [], {("train", "a"): 1000}, 0, 0.0, 0.0,
                         {"train": 1}, "cpu")
    free = {"cache/x.zarr": 1500, "/other/cache": 10**9}
    monkeypatch.setattr(planning, "free_space", lambda where: free[where])
    assert plan.shortfall() is None  # no DVC: 1000 bytes fit in 1500
    plan.dvc = DvcCopies(1, "/other/cache", True, "copy")
    assert "(1000 B and DVC's copy)" in plan.shortfall()
    plan.dvc = DvcCopies(1, "/other/cache", False, "copy")
    assert plan.shortfall() is None
    free["/other/cache"] = 999
    assert "DVC's cache /other/cache would take 1000 B" in plan.shortfall()
    plan.dvc = DvcCopies(0, "/other/cache", True, "hard links")
    assert plan.shortfall() is None


@pytest.mark.slow
def test_a_store_named_on_the_command_line_keeps_its_identity_file_beside_it(linked):
    before = (linked / IDENTITY).read_bytes()
    run_bkd(["extract-teacher", *TINY, "--store", "cache/other.zarr"], linked)
    assert json.loads((linked / "cache/other.identity.json").read_text())["format"] == "bkd-store-identity/1"
    assert (linked / IDENTITY).read_bytes() == before


def test_an_identity_path_holding_something_else_is_refused(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "cache").mkdir()
    (tmp_path / IDENTITY).write_text("my notes\n")
    out = run_bkd(["extract-teacher", *TINY], tmp_path, check=False)
    assert_one_line(out.returncode, out.stderr, IDENTITY, "not a bkd store identity file")
    assert (tmp_path / IDENTITY).read_text() == "my notes\n"
    assert not (tmp_path / STORE).exists()


@pytest.mark.parametrize("identity", ["./cache/new.zarr", "cache//new.zarr/", "cache/new.zarr/id.json"])
def test_an_identity_path_that_is_the_store_however_spelt_is_refused_before_extraction(tmp_path, identity):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    out = run_bkd(["extract-teacher", *TINY, "--store", "cache/new.zarr", "--set", f"extract.identity={identity}"],
                  tmp_path, check=False)
    assert_one_line(out.returncode, out.stderr, "is the store", "or inside it")
    assert not (tmp_path / "cache/new.zarr").exists()


def test_a_url_identity_file_under_dvc_is_refused(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.setenv("DVC_STAGE", "extract_teacher")
    out = run_bkd(["extract-teacher", *TINY, "--set", "extract.identity=memory://b/t.identity.json"], tmp_path,
                  check=False)
    assert_one_line(out.returncode, out.stderr, "a URL", "DVC")


@pytest.mark.parametrize("clone", ["tmpab12", "standalone/tmpcd34"])  # queued, and `dvc exp run --temp`
def test_a_temporary_experiment_reads_the_store_of_its_origin(tmp_path, monkeypatch, clone):
    (tmp_path / ".dvc").mkdir()
    workspace = tmp_path / ".dvc/tmp/exps" / clone
    (workspace / "sub").mkdir(parents=True)
    (workspace / ".git").mkdir()
    monkeypatch.chdir(workspace / "sub")
    assert temporary_workspace() == (workspace.resolve(), tmp_path.resolve())
    assert origin_path("cache/x.zarr") == str(tmp_path.resolve() / "sub/cache/x.zarr")
    assert origin_path("/data/x.zarr") == "/data/x.zarr" and origin_path("s3://b/x.zarr") == "s3://b/x.zarr"
    monkeypatch.chdir(tmp_path)
    assert temporary_workspace() is None and origin_path("cache/x.zarr") == "cache/x.zarr"
