"""Signed stores: with a signing key set, a store is read only if it is signed with that key and unchanged
since; a forgery that rewrites rows and their chunk digests together, which checksums cannot catch, is
refused. Without a key, nothing changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.errors import BkdError, StoreError
from pipeline.targets import TargetSpec, TeacherTargets, verify_store
from pipeline.targets.manifest import chunk_digests
from pipeline.targets.signing import KEY_ENV, KEY_FILE_ENV, key_id, store_key
from pipeline.targets.spec import CHUNK_DIGEST
from tests.helpers import TINY, assert_one_line, build_store, run_bkd

KEY, OTHER = "team-secret-0123456789", "someone-else"


def forge(path: Path) -> None:
    """Rewrite one train logit and every chunk digest to match: what a checksum cannot catch."""
    root = zarr.open_group(str(path), mode="r+")
    spec = TargetSpec.from_manifest(root.attrs["manifest"])
    group = root["train"]
    logits = group["logits"][:]
    logits[3, 0, 0] += 1
    group["logits"][:] = logits
    names = spec.row_arrays()
    group[CHUNK_DIGEST][:] = chunk_digests({name: group[name][:] for name in names}, names, 0,
                                           spec.layout("train").chunk_size)


def problems(path: Path) -> list[str]:
    return [p for _, _, p in verify_store(path) if p]


def sign(path: Path, monkeypatch, key: str = KEY):
    monkeypatch.setenv(KEY_ENV, key)
    return run_bkd(["cache", "sign", str(path)], path.parent, check=False)


def test_without_a_key_a_consistent_forgery_passes_and_with_one_it_is_refused(tmp_path: Path, monkeypatch):
    path = tmp_path / "s.zarr"
    build_store(path)
    assert sign(path, monkeypatch).returncode == 0
    forge(path)
    monkeypatch.delenv(KEY_ENV)
    assert problems(path) == []  # checksums alone: the documented limit
    TeacherTargets(path, "train").read_chunk(0)

    monkeypatch.setenv(KEY_ENV, KEY)
    assert any("does not match its contents" in p for p in problems(path))
    with pytest.raises(StoreError, match="changed since it was signed"):
        TeacherTargets(path, "train")
    verify = run_bkd(["cache", "verify", str(path)], tmp_path, check=False)
    assert verify.returncode == 1 and "does not match its contents" in verify.stderr


def test_unsigned_and_other_key_stores_are_refused_when_a_key_is_set(tmp_path: Path, monkeypatch):
    path = tmp_path / "s.zarr"
    build_store(path)
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(StoreError, match=f"unsigned, and a signing key is set \\({KEY_ENV}\\)"):
        TeacherTargets(path, "train")
    assert sign(path, monkeypatch, OTHER).returncode == 0
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(StoreError, match=f"another key \\(key id {key_id(OTHER.encode())}; yours is "
                                         f"{key_id(KEY.encode())}\\)"):
        TeacherTargets(path, "test")
    assert sign(path, monkeypatch).returncode == 0  # re-signed by the key holder after verifying
    assert TeacherTargets(path, "test").read_chunk(0)["logits"].shape[0] > 0
    info = run_bkd(["cache", "info", str(path)], tmp_path)
    assert f"signed:     key id {key_id(KEY.encode())} (checked: ok)" in info.stdout
    monkeypatch.delenv(KEY_ENV)
    assert "(not checked: no signing key set)" in run_bkd(["cache", "info", str(path)], tmp_path).stdout


def test_sign_will_not_launder_a_store_changed_under_its_key(tmp_path: Path, monkeypatch):
    """A consistent forgery verifies (its digests agree), so `cache sign` refuses a store whose signature
    under the same key no longer matches unless --force; the refusal to read it does not suggest signing."""
    path = tmp_path / "s.zarr"
    build_store(path)
    assert sign(path, monkeypatch).returncode == 0
    forge(path)
    with pytest.raises(StoreError, match="rebuild it with `bkd extract-teacher --overwrite`") as refused:
        TeacherTargets(path, "train")
    assert "cache sign" not in str(refused.value)
    laundered = sign(path, monkeypatch)
    assert_one_line(laundered.returncode, laundered.stderr, "not signed", "changed since it was signed", "--force")
    with pytest.raises(StoreError, match="changed since it was signed"):
        TeacherTargets(path, "train")
    forced = run_bkd(["cache", "sign", "--force", str(path)], tmp_path, check=False)
    assert forced.returncode == 0, forced.stderr
    TeacherTargets(path, "train")


@pytest.mark.parametrize("mac", ["é", "\udcff", None, 7, ["x"], "0" * 64])
def test_an_odd_signature_mac_is_refused_in_one_line(tmp_path: Path, monkeypatch, mac):
    path = tmp_path / "s.zarr"
    build_store(path)
    assert sign(path, monkeypatch).returncode == 0
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["signature"]["mac"] = mac
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="does not match its contents"):
        TeacherTargets(path, "train")
    verify = run_bkd(["cache", "verify", str(path)], tmp_path, check=False)
    assert verify.returncode == 1 and "does not match its contents" in verify.stderr
    assert "checked: its signature does not match" in run_bkd(["cache", "info", str(path)], tmp_path).stdout


def test_a_key_of_any_bytes_signs_and_checks(tmp_path: Path, monkeypatch):
    """The key is taken as the environment's bytes, whatever they are (not text)."""
    import os

    path = tmp_path / "s.zarr"
    build_store(path)
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setitem(os.environb, KEY_ENV.encode(), b"\xff\xfe binary")
    assert store_key() == b"\xff\xfe binary"
    assert run_bkd(["cache", "sign", str(path)], tmp_path).returncode == 0
    TeacherTargets(path, "train")
    monkeypatch.setitem(os.environb, KEY_ENV.encode(), b"\xff\xfd binary")
    with pytest.raises(StoreError, match="another key"):
        TeacherTargets(path, "train")


def test_rows_are_checked_against_the_digests_that_were_signed(tmp_path: Path, monkeypatch):
    """A reader that checked the signature keeps the signed digests: a forgery written after it opened
    the store is refused too."""
    path = tmp_path / "s.zarr"
    build_store(path)
    assert sign(path, monkeypatch).returncode == 0
    targets = TeacherTargets(path, "train")
    forge(path)
    with pytest.raises(StoreError, match="does not match its digest"):
        targets.read_chunk(0)


def test_sign_refuses_a_store_that_does_not_verify_and_needs_a_key(tmp_path: Path, monkeypatch):
    path = tmp_path / "s.zarr"
    build_store(path)
    (path / "train/logits/c/1/0/0").write_bytes(b"")
    refused = sign(path, monkeypatch)
    assert_one_line(refused.returncode, refused.stderr.splitlines()[-1] + "\n", "not signed, it does not verify")
    assert "signature" not in json.loads((path / "zarr.json").read_text())["attributes"]
    monkeypatch.delenv(KEY_ENV)
    no_key = run_bkd(["cache", "sign", str(path)], tmp_path, check=False)
    assert_one_line(no_key.returncode, no_key.stderr, "no signing key", KEY_ENV, KEY_FILE_ENV)


def test_the_key_comes_from_a_file_or_a_variable_and_an_unusable_one_is_an_error(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    assert store_key() is None
    key_file = tmp_path / "team.key"
    key_file.write_text(KEY + "\n")
    monkeypatch.setenv(KEY_FILE_ENV, str(key_file))
    assert store_key() == KEY.encode()
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(BkdError, match="both"):
        store_key()
    monkeypatch.delenv(KEY_ENV)
    key_file.write_text("\n")
    with pytest.raises(BkdError, match="key file is empty"):
        store_key()
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "absent.key"))
    with pytest.raises(BkdError, match="cannot read the key"):
        store_key()
    monkeypatch.delenv(KEY_FILE_ENV)
    monkeypatch.setenv(KEY_ENV, "  ")
    with pytest.raises(BkdError, match="set but empty"):
        store_key()


def test_extraction_signs_what_it_writes_and_training_refuses_an_unsigned_store(tiny_project: Path, tmp_path: Path,
                                                                               monkeypatch):
    root = tmp_path / "project"
    shutil.copytree(tiny_project / "configs", root / "configs")
    shutil.copy(tiny_project / "params.yaml", root / "params.yaml")
    shutil.copytree(tiny_project / "models", root / "models")
    shutil.copytree(tiny_project / "cache", root / "cache", ignore=shutil.ignore_patterns("*.lock"))
    train = ["train-student", *TINY, "--epochs", "1", "--distill", "none", "--run-dir", "runs/s"]

    monkeypatch.setenv(KEY_ENV, KEY)
    refused = run_bkd(train, root, check=False)  # the unsigned store the project extracted
    assert_one_line(refused.returncode, refused.stderr, "it is unsigned, and a signing key is set", "bkd cache sign")
    assert not (root / "runs/s/last.pt").exists()

    again = run_bkd(["extract-teacher", *TINY], root)  # nothing left to write: it signs nothing
    assert "is not signed with the key set" in again.stderr + again.stdout
    fresh = run_bkd(["extract-teacher", *TINY, "--set", "extract.store=cache/signed.zarr"], root)
    assert f"signed (key id {key_id(KEY.encode())})" in fresh.stderr + fresh.stdout
    run_bkd([*train, "--set", "extract.store=cache/signed.zarr"], root)
    assert (root / "runs/s/student.safetensors").is_file()
