"""A store at an s3:// URL under DVC, the supported way: `dvc repro` of the real extraction stage writes the
store at the URL and the identity file in the repository, and a forced re-run finds the store complete and
deletes nothing. The layout DVC cannot keep (the URL as a stage output) is refused by bkd before it loads
the teacher. Against moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, assert_one_line, run_bkd
from tests.s3server import s3_endpoint  # noqa: F401

pytestmark = pytest.mark.slow

TINY_PARAMS = {
    "data": {"limit": 160, "test_size": 500},
    "teacher": {"epochs": 1, "batch_size": 64},
    "extract": {"chunk_size": 32, "chunks_per_shard": 2, "features": ["pre_logits"],
                "identity": "cache/t.identity.json"},
}


def _dvc(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory, s3_endpoint) -> Path:  # noqa: F811
    """The project's files in a git repository, tiny params, the store at s3://BUCKET/dvc/t.zarr."""
    root = tmp_path_factory.mktemp("dvc-s3")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file() and name.startswith(("pipeline/", "stages/", ".dvc/")) or name in (
                "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY_PARAMS.items():
        params[section].update(values)
    params["extract"]["store"] = s3_endpoint.uri("dvc/t.zarr")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "s3 store"]):
        subprocess.run(command, cwd=root, check=True)
    return root


def _objects(s3_endpoint) -> dict[str, str]:  # noqa: F811
    """Every object of the store: key -> ETag (its content's md5)."""
    fs = s3_endpoint.fs()
    found = fs.find(f"{s3_endpoint.bucket}/dvc/t.zarr", detail=True)
    return {key: info["ETag"] for key, info in found.items()}


def test_dvc_repro_writes_the_store_at_its_url_and_a_forced_rerun_deletes_nothing(repo, s3_endpoint):  # noqa: F811
    _dvc(["dvc", "repro", "extract_teacher"], repo)
    identity = json.loads((repo / "cache/t.identity.json").read_text())
    before = _objects(s3_endpoint)
    assert any(key.endswith("/zarr.json") for key in before) and len(before) > 10
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["extract_teacher"]
    assert [out["path"] for out in lock["outs"]] == ["cache/t.identity.json"]  # DVC tracks the file, not the URL

    out = _dvc(["dvc", "repro", "--force", "--single-item", "extract_teacher"], repo)
    assert "(0 shards written)" in out
    after = _objects(s3_endpoint)
    assert set(after) == set(before)  # no object deleted or added
    assert {k: v for k, v in after.items() if not k.endswith("zarr.json")} == \
        {k: v for k, v in before.items() if not k.endswith("zarr.json")}  # no chunk rewritten
    assert json.loads((repo / "cache/t.identity.json").read_text()) == identity
    assert "Data and pipelines are up to date" in _dvc(["dvc", "status", "extract_teacher"], repo)
    assert run_bkd(["cache", "verify", s3_endpoint.uri("dvc/t.zarr")], repo).returncode == 0


def test_a_url_store_listed_as_a_dvc_output_is_refused_before_the_teacher_loads(repo, s3_endpoint):  # noqa: F811
    if not (repo / "dvc.lock").is_file():
        _dvc(["dvc", "repro", "extract_teacher"], repo)
    before = _objects(s3_endpoint)
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    pipeline["stages"]["extract_teacher"]["outs"] = ["${extract.store}"]  # what DVC 3 deletes, then cannot save
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    try:
        out = run_bkd(["extract-teacher", "--overwrite"], repo, check=False)
    finally:
        subprocess.run(["git", "checkout", "dvc.yaml"], cwd=repo, check=True)
    assert_one_line(out.returncode, out.stderr, s3_endpoint.uri("dvc/t.zarr"), "is a DVC output", "extract.identity")
    assert _objects(s3_endpoint) == before
