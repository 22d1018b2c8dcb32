"""Safe checkpoint I/O: safetensors for weights, `weights_only` torch files for training state.

Every write goes to a temporary file first and is renamed into place, so a crash during a
save never leaves a truncated file under the final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from pipeline.errors import BkdError


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the file gets the mode any other would
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_json(data, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


class _Sink(io.RawIOBase):
    """The file torch.save writes through, keeping the OSError a write raised: torch reports it as its own
    RuntimeError ("enforce fail at inline_container.cc"), which says nothing of a full disk."""

    def __init__(self, fh):
        super().__init__()
        self.fh, self.error = fh, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise


def _write_bytes(tmp: str, path: str | Path, write_to) -> None:
    """`write_to(file)` into `tmp`; a failing write (a full disk) is an OSError naming `path`, the file meant."""
    try:
        with open(tmp, "wb") as fh:
            write_to(fh)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None


def weights_bytes(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors file of `state_dict` (on the CPU) with `metadata`, as bytes."""
    return save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, metadata=metadata)


def same_weights(a: bytes, b: bytes) -> bool:
    """Whether two safetensors files hold the same tensors and metadata (their headers are JSON whose
    metadata order varies from one serialisation to the next, so equal weights need not be equal bytes)."""
    def split(data: bytes):
        size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
        try:
            return json.loads(data[8:8 + size]), data[8 + size:]
        except ValueError:
            return None, data

    header, payload = split(a)
    return header is not None and (header, payload) == split(b)


def write_weights_bytes(data: bytes, path: str | Path) -> None:
    """Atomically write a serialised weights file; a full disk is an OSError naming `path`."""
    _atomic_write(Path(path), lambda tmp: _write_bytes(tmp, path, lambda fh: fh.write(data)))


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    write_weights_bytes(weights_bytes(state_dict, metadata), path)


PNG_MARK = "bkd"  # the PNG `Software` text chunk of every plot bkd writes


def check_replaceable_png(path: str | Path) -> None:
    """Refuse to write a plot over a file that is not a PNG bkd wrote (marked in its Software chunk)."""
    path = Path(path)
    if path.exists():
        head = path.read_bytes()[:4096] if path.is_file() else b""
        if f"Software\x00{PNG_MARK}".encode() not in head:
            raise BkdError(f"{path} exists and is not a plot bkd wrote; bkd will not overwrite it "
                           "(choose another path for it)")


def save_png(fig, path: str | Path, dpi: int = 100) -> None:
    """Save a matplotlib figure atomically as a PNG marked as bkd's; never over a PNG bkd did not write."""
    check_replaceable_png(path)
    _atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": PNG_MARK}))


def check_replaceable_json(path: str | Path) -> None:
    """Refuse to write a JSON result over a file that is not JSON (a user's file, never overwritten)."""
    path = Path(path)
    if path.is_dir():
        raise BkdError(f"{path} is a folder; a JSON file path is needed")
    if path.exists():
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise BkdError(f"{path} exists and is not a JSON file bkd wrote; bkd will not overwrite it") from None


def check_replaceable_weights(path: str | Path) -> None:
    """Refuse to write weights over a file that is not a safetensors weights file (bkd writes only those)."""
    path = Path(path)
    if path.is_dir():
        raise BkdError(f"{path} is a folder; a weights file path is needed")
    if not path.exists():
        return
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt"):
            return
    except Exception:  # not safetensors: a user's file, never overwritten
        raise BkdError(f"{path} exists and is not a safetensors weights file; bkd will not overwrite it "
                       "(choose another teacher.checkpoint)") from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors, or from a torch file without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise BkdError(f"checkpoint not found: {path} (train one with `bkd train-teacher`, or pass a local file)")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # SafetensorError, or an OS error on a truncated file
            raise BkdError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an untrusted pickle or a corrupt file: refuse, never unpickle code
        raise BkdError(f"{path}: not a safetensors file or a weights-only torch checkpoint ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BkdError(f"{path}: expected a mapping of parameter names to tensors")
    return state


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors weights file ({} when it has none)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BkdError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), "pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # a truncated or foreign file
        raise BkdError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """Atomically save a training state (tensors, numbers, strings, lists, dicts)."""
    def write_to(fh):
        sink = _Sink(fh)
        try:
            torch.save(state, sink)
        except RuntimeError as exc:  # torch reports a failing write as its own RuntimeError
            if sink.error is not None:
                raise sink.error from None  # named by _write_bytes: "No space left on device: PATH"
            raise BkdError(f"cannot write {path}: {str(exc).splitlines()[-1] if str(exc) else 'write failed'}") \
                from None

    _atomic_write(Path(path), lambda tmp: _write_bytes(tmp, path, write_to))


def load_state(path: str | Path) -> dict[str, Any]:
    """A training state saved by `save_state`; a truncated or foreign file is refused in one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, an untrusted pickle: never unpickle code
        raise BkdError(f"{path}: not a readable bkd checkpoint ({type(exc).__name__}); delete it and train "
                       "again without --resume") from None
    if not isinstance(state, dict):
        raise BkdError(f"{path}: not a bkd checkpoint")
    return state
