"""Safe checkpoint I/O: safetensors weights, weights-only torch files, atomic writes."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.checkpoint import load_state, load_weights, save_state, save_weights, sha256_file
from pipeline.errors import BkdError
from tests.helpers import TINY, assert_one_line, run_bkd


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    return model.state_dict()


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
        assert a[key].dtype == b[key].dtype, key


def test_safetensors_round_trip(tmp_path):
    state = _state_dict()
    path = tmp_path / "sub" / "model.safetensors"  # parent is created
    save_weights(state, path, metadata={"arch": "toy"})
    assert path.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then JSON
    loaded = load_weights(path)
    _assert_same(state, loaded)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"arch": "toy"}
    # tensors are written as they are (non-contiguous views included)
    view = {"t": torch.arange(12.0).view(3, 4).t()}
    save_weights(view, tmp_path / "v.safetensors")
    assert torch.equal(load_weights(tmp_path / "v.safetensors")["t"], view["t"])


def test_load_plain_torch_state_dict(tmp_path):
    state = _state_dict()
    path = tmp_path / "model.pt"
    torch.save(state, path)
    _assert_same(state, load_weights(path))
    # a {"state_dict": ...} wrapper is unwrapped
    torch.save({"state_dict": OrderedDict(state), "epoch": 3}, tmp_path / "wrapped.pt")
    _assert_same(state, load_weights(tmp_path / "wrapped.pt"))


def _leave_marker(path: str) -> None:
    """Called only if the pickle below is actually executed."""
    Path(path).write_text("executed")


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_leave_marker, (self.marker,))


def test_refuses_arbitrary_pickle_without_executing_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"x": Payload(marker)}, path)
    assert not marker.exists()
    # Sanity: the file really runs code when unpickled without weights_only (so the test can fail).
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(BkdError) as info:
        load_weights(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_refuses_custom_object_in_state_dict(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"weight": torch.zeros(2), "module": nn.Linear(2, 2)}, path)
    with pytest.raises(BkdError):
        load_weights(path)


def test_refuses_non_tensor_mapping(tmp_path):
    path = tmp_path / "numbers.pt"
    torch.save({"weight": torch.zeros(2), "epoch": 3}, path)
    with pytest.raises(BkdError, match="tensors"):
        load_weights(path)
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(BkdError):
        load_weights(tmp_path / "list.pt")


def test_refuses_corrupt_torch_file(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(BkdError, match="junk.pt"):
        load_weights(path)


def test_missing_file(tmp_path):
    for name in ("missing.safetensors", "missing.pt"):
        path = tmp_path / name
        with pytest.raises(BkdError) as info:
            load_weights(path)
        assert str(path) in str(info.value)
        assert "not found" in str(info.value)


def test_save_state_round_trip_and_atomic(tmp_path):
    state = {"epoch": 2, "model": _state_dict(), "history": [{"loss": 0.5}], "name": "run"}
    path = tmp_path / "state.pt"
    save_state(state, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temp file left
    loaded = load_state(path)
    assert loaded["epoch"] == 2 and loaded["history"] == [{"loss": 0.5}] and loaded["name"] == "run"
    _assert_same(state["model"], loaded["model"])

    # overwrite in place
    save_state({"epoch": 3}, path)
    assert load_state(path) == {"epoch": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_failed_save_leaves_previous_file_and_no_temp(tmp_path):
    path = tmp_path / "state.pt"
    save_state({"epoch": 1}, path)
    before = sha256_file(path)
    with pytest.raises(Exception):
        save_state({"epoch": 2, "bad": lambda: None}, path)  # a lambda cannot be pickled
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
    assert sha256_file(path) == before
    assert load_state(path) == {"epoch": 1}

    with pytest.raises(Exception):
        save_state({"bad": lambda: None}, tmp_path / "fresh.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_save_weights_is_atomic(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(_state_dict(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_sha256_file(tmp_path):
    import hashlib

    path = tmp_path / "x.bin"
    data = bytes(range(256)) * 5000  # more than one read block
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_refuses_corrupt_safetensors_with_one_line_error(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_weights(_state_dict(), path)
    path.write_bytes(path.read_bytes()[:40])  # truncated mid-header
    with pytest.raises(BkdError, match="teacher.safetensors") as info:
        load_weights(path)
    assert "\n" not in str(info.value)


def full_disk(monkeypatch) -> None:
    """Every file the checkpoint module writes goes to /dev/full, whose writes fail as a full disk's do."""
    import builtins

    from pipeline import checkpoint

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    real = builtins.open
    monkeypatch.setattr(checkpoint, "open", lambda file, mode="r", *args, **kwargs:
                        real("/dev/full", mode) if "w" in mode else real(file, mode, *args, **kwargs), raising=False)


@pytest.mark.parametrize("size", [2, 1 << 20])  # filling the write buffer, or failing only when it is flushed
def test_a_full_disk_while_saving_is_no_space_left_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch, size):
    import errno

    import torch

    from pipeline import checkpoint

    full_disk(monkeypatch)
    for save, name in ((checkpoint.save_weights, "w.safetensors"), (checkpoint.save_state, "last.pt")):
        with pytest.raises(OSError) as caught:
            save({"w": torch.zeros(size)}, tmp_path / name)
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / name)
        assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_training_on_a_full_disk_says_so_in_one_line_naming_the_checkpoint(tiny_project, monkeypatch):

    full_disk(monkeypatch)
    out = run_bkd(["train-student", *TINY, "--epochs", "1", "--distill", "none", "--run-dir", "runs/full"],
                  tiny_project, check=False)
    after_progress = out.stderr.split("\r")[-1].lstrip()  # the progress bar redraws its line with \r
    assert_one_line(out.returncode, after_progress, "No space left on device: runs/full/last.pt")
    assert "inline_container" not in out.stderr and "Traceback" not in out.stderr
