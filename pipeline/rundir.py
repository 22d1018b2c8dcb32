"""A run folder belongs to the config that made it.

`RunFolder` claims a training run's folder for one process at a time (a lock file inside it)
and records what made the run: the resolved config (`config.yaml`) and `run.json` (command,
git commit, bkd version, start, resume and finish times). A fresh run into a folder that holds another
config's run is refused, and so is `--resume` with a config that would make the run differ
from an uninterrupted one; each refusal names the first differing field. Only fields that
cannot change the result (devices, checkpoint cadence, where files live) may differ. A finished
run of the same config is not trained over unless asked (`--overwrite`): nothing finished is
deleted by running the same command twice. An unfinished one is continued with `--resume`, or
started again without it.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml

from pipeline.checkpoint import write_json
from pipeline.config import Config, dump_config, flatten
from pipeline.errors import BkdError, short
from pipeline.locks import PathLock

# Fields that cannot change what a run computes: where things are read from or written to,
# the device, how often checkpoints are saved, how extraction batches the teacher.
RESULT_NEUTRAL = ("student.device", "teacher.device", "student.checkpoint_every", "student.out_dir",
                  "teacher.checkpoint", "extract.store", "extract.identity", "extract.batch_size", "data.root",
                  "loader.pin_memory", "loader.prefetch_factor", "loader.persistent_workers")
# What each kind of run depends on. A student depends on the teacher only through the store,
# whose identity (teacher weights included) is checked on its own; so teacher training settings
# are not part of a student run.
SCOPES = {
    "teacher": ("seed", "data", "teacher"),
    "student": ("seed", "data", "augment", "teacher.model", "teacher.small_input_stem", "teacher.input_size",
                "teacher.interpolation", "teacher.timesteps", "teacher.model_kwargs", "extract", "student",
                # the sample order interleaves one lane of shuffle windows per loader worker
                "loader.workers"),
    # Evaluating a finished run: what defines the model and the data it is evaluated on.
    "evaluate": ("data", "student.model", "student.model_kwargs", "student.timesteps", "student.distill"),
}
# What a run writes; a fresh run with the same config replaces exactly these.
RUN_OUTPUTS = ("last.pt", "history.json", "live", "student.safetensors", "config.yaml", "run.json")


def _in_scope(field: str, scope: tuple[str, ...]) -> bool:
    return any(field == s or field.startswith(s + ".") for s in scope) and field not in RESULT_NEUTRAL


def config_difference(have: dict, want: dict, kind: str) -> str | None:
    """'field: X in the run, Y now' for the first result-relevant field that differs, or None."""
    a, b = flatten(have), flatten(want)
    for field in sorted(set(a) | set(b)):
        if _in_scope(field, SCOPES[kind]) and a.get(field) != b.get(field):
            return f"{field} is {short(a.get(field))} in the run, {short(b.get(field))} now"
    return None


def saved_config(run_dir: str | Path) -> dict:
    """The resolved config a run folder was made with (raw mapping), or a one-line refusal."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise BkdError(f"{run_dir} is not a bkd run folder (no config.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise BkdError(f"{path}: unreadable ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise BkdError(f"{path}: not a bkd run config")
    return raw


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class RunFolder:
    """`with RunFolder(path, cfg, kind, resume):` -- claim `path` for this run (see the module doc)."""

    def __init__(self, path: str | Path, cfg: Config, kind: str, resume: bool, overwrite: bool = False):
        if resume and overwrite:
            raise BkdError("--resume continues the run in the folder and --overwrite trains over it: choose one")
        self.path, self.cfg, self.kind, self.resume, self.overwrite = Path(path), cfg, kind, resume, overwrite
        # The teacher-target store a student run trains from (its identity digest), set once opened:
        # a run resumes only from the store it started with.
        self.store_identity: str | None = None
        self.lock = PathLock(str(self.path / "RUN.lock"), f"run folder {self.path} is in use by another bkd process")

    def check(self) -> None:
        """Refuse, without writing anything, what `__enter__` would refuse: call it before heavy work."""
        if self.path.exists() and not self.path.is_dir():
            raise BkdError(f"--run-dir {self.path} is a file, not a folder")
        if self.resume and not (self.path / "config.yaml").is_file():
            raise BkdError(f"--resume: {self.path} holds no run to resume (no config.yaml)")
        if self.path.is_dir():
            self._refusal()

    def __enter__(self) -> "RunFolder":
        self.check()
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.__enter__()
        try:
            self._claim()  # checked again under the lock
        except BaseException:
            self.lock.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.lock.__exit__(*exc)

    def _refusal(self) -> None:
        """Raise if this run may not use the existing folder (another config's run, or not a run folder)."""
        if (self.path / "config.yaml").is_file():
            difference = config_difference(saved_config(self.path), self.cfg.to_dict(), self.kind)
            if difference and self.resume:
                raise BkdError(f"--resume would change the run in {self.path}: {difference}; resume with the run's "
                               f"config ({self.path}/config.yaml) or train into another --run-dir")
            if difference:
                raise BkdError(f"{self.path} holds a run of another config ({difference}); choose another "
                               f"--run-dir, or delete that folder to train over it")
            finished = self.finished()
            if finished and not self.resume and not self.overwrite:
                raise BkdError(f"{self.path} holds a finished run of this config ({finished}); pass --overwrite to "
                               "train it again (its results are deleted as the new run starts), or choose another "
                               "--run-dir")
            return
        # Without config.yaml nothing here is known to be bkd's, whatever the names: a run killed before
        # it wrote its config leaves at most its lock.
        strangers = sorted(p.name for p in self.path.iterdir() if p.name != "RUN.lock")
        if strangers:
            raise BkdError(f"{self.path} is not empty and is not a bkd run folder ('{strangers[0]}'); "
                           "choose another --run-dir")

    def _claim(self) -> None:
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        command = [Path(sys.argv[0]).name, *sys.argv[1:]]
        self._refusal()
        if self.resume:
            info = self._read_info()
            if info.get("store") != self.store_identity:
                raise BkdError(f"--resume would change the run in {self.path}: the teacher-target store is not the "
                               f"one it started from (identity {info.get('store')}, now {self.store_identity}); "
                               "train into another --run-dir")
            info.setdefault("resumed", []).append({"at": now, "command": command})
            self._write_info(info)
            return
        for name in RUN_OUTPUTS:  # the same config's earlier run: replaced as a whole, never mixed
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        dump_config(self.cfg, self.path / "config.yaml")
        self._write_info({"kind": self.kind, "command": command, "git_commit": _git_commit(),
                          "bkd_version": _version(), "started": now, "store": self.store_identity})

    def finished(self) -> str | None:
        """What shows the run in this folder finished (its finish time, or its final weights), or None."""
        when = self._read_info().get("finished")
        if when:
            return f"finished {when}"
        if self.kind == "student" and (self.path / "student.safetensors").is_file():  # from before run.json said it
            return "student.safetensors written"
        return None

    def record_weights(self, sha256: str) -> None:
        """Record in run.json the sha256 of the weights this run writes outside its folder (a teacher's)."""
        info = self._read_info()
        info["weights_sha256"] = sha256
        self._write_info(info)

    def weights_sha256(self) -> str | None:
        """The sha256 of the weights this folder's run wrote outside it, or None."""
        sha = self._read_info().get("weights_sha256") if self.path.is_dir() else None
        return sha if isinstance(sha, str) else None

    def finish(self) -> None:
        """Record in run.json that the run finished: a fresh run then refuses to start over it unasked."""
        info = self._read_info()
        info["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._write_info(info)

    def _read_info(self) -> dict:
        try:
            info = json.loads((self.path / "run.json").read_text())
        except (OSError, ValueError, RecursionError):
            return {}
        return info if isinstance(info, dict) else {}

    def _write_info(self, info: dict) -> None:
        write_json(info, self.path / "run.json")


def _version() -> str:
    try:
        return metadata.version("bkd")
    except metadata.PackageNotFoundError:
        return "unknown"
