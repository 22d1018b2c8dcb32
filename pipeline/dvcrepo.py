"""What bkd needs to know of the DVC repository it runs in.

DVC runs a queued or `--temp` experiment in a temporary clone of the repository
(`ROOT/.dvc/tmp/exps/NAME`, `ROOT/.dvc/tmp/exps/standalone/NAME`), restoring the outputs it tracks there. A store is not one of them (DVC
tracks the small identity file the extraction writes beside it, see `pipeline.targets.identity_file`):
a relative store path is read, and written, in the workspace the experiment was queued from, so every
experiment uses the one store on disk (`origin_path`).

The extraction's free-space check and `--plan` also ask whether DVC tracks the store anyway (an
`outs` entry, a `.dvc` file) and what its cache would then add on disk (`dvc_copies`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import BkdError

TEMP_WORKSPACES = Path(".dvc", "tmp", "exps")


def temporary_workspace(cwd: Path | None = None) -> tuple[Path, Path] | None:
    """(the temporary workspace, the repository it was queued from) when `cwd` lies in one of DVC's
    temporary experiment workspaces, else None. The workspace is the clone (the folder holding `.git`)
    nearest below `.dvc/tmp/exps`: `exps/tmpXXXX` for a queued experiment, `exps/standalone/tmpXXXX` for
    `dvc exp run --temp`."""
    here = (cwd or Path.cwd()).resolve()
    parts = here.parts
    marker = TEMP_WORKSPACES.parts
    for i in range(len(parts) - len(marker)):
        if parts[i:i + len(marker)] == marker and i + len(marker) < len(parts):
            origin = Path(*parts[:i])
            if not (origin / ".dvc").is_dir():
                continue
            below = range(i + len(marker) + 1, len(parts) + 1)
            clones = [Path(*parts[:end]) for end in below if (Path(*parts[:end]) / ".git").exists()]
            return (clones[0] if clones else Path(*parts[:i + len(marker) + 1])), origin
    return None


def origin_path(path: str) -> str:
    """`path` as the workspace the experiment was queued from sees it: a relative local path inside a
    temporary experiment workspace is taken relative to the same folder of the originating repository;
    anything else (absolute paths, URLs, paths outside a temporary workspace) is returned as it is."""
    if "://" in path or os.path.isabs(path):
        return path
    found = temporary_workspace()
    if found is None:
        return path
    workspace, origin = found
    return str(origin / Path.cwd().resolve().relative_to(workspace) / path)


@dataclass
class DvcCopies:
    """What DVC's cache adds on disk for a store it tracks: `extra` copies of the store's bytes on the
    file system of `cache_dir` (0 when it links), and why."""
    extra: int
    cache_dir: str | None
    same_filesystem: bool
    why: str


def dvc_copies(store: str) -> DvcCopies | None:
    """What DVC adds on disk for the store: None outside a DVC repository; no copies when no stage output
    or `.dvc` file names the store or a folder above it (the shipped dvc.yaml tracks its identity file);
    else how many more copies DVC's commit makes, and where. A store at a URL that DVC lists as an output
    is refused: DVC 3 deletes such an output before the stage runs and cannot save it afterwards."""
    url = "://" in store
    path = store if url else Path(store).resolve()
    root = _repository(Path.cwd().resolve() if url else path)
    if root is None:
        return None
    try:
        tracked = _tracking_output(root, path)
    except Exception as exc:  # a repository DVC itself cannot read: say so, count nothing
        return DvcCopies(0, None, True, f"DVC's repository at {root} could not be read ({type(exc).__name__}), "
                                        "so what DVC adds is unknown")
    if tracked is None:
        return DvcCopies(0, None, True, "DVC does not track the store (dvc.yaml tracks its identity file): "
                                        "nothing more")
    out_name, cache_dir, types = tracked
    if url:
        raise BkdError(f"{store} is a DVC output ({out_name}); DVC 3 cannot keep outputs outside the repository "
                       "and deletes them before the stage runs: make extract.identity the output instead "
                       "(docs/scaling.md)")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    existing = path if path.exists() else next(p for p in path.parents if p.exists())
    same = os.stat(cache).st_dev == os.stat(existing).st_dev
    where = f"DVC tracks it ({out_name}), cache.type {','.join(types)}"
    for kind in types:
        if kind == "hardlink" and same:
            return DvcCopies(0, str(cache), same, f"{where}: hard links, no second copy")
        if kind == "reflink" and _reflinks(cache):
            return DvcCopies(0, str(cache), same, f"{where}: reflinks, no second copy")
        if kind == "symlink":  # the files move into the cache: across file systems, a copy there
            return DvcCopies(0 if same else 1, str(cache), same,
                             f"{where}: symbolic links" + ("" if same else f", files moved to {cache}"))
        if kind == "copy":
            return DvcCopies(1, str(cache), same, f"{where}: a second copy in {cache}")
    return DvcCopies(1, str(cache), same, f"{where}: a second copy in {cache}")


def _repository(path: Path) -> Path | None:
    for folder in (path, *path.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def _tracking_output(root: Path, path: Path | str) -> tuple[str, str, list[str]] | None:
    """(the output naming `path` -- a local path, or a URL -- or a folder above it, the cache folder, the
    cache types) from DVC's own reading of the repository, or None."""
    from dvc.repo import Repo  # only here: seconds of imports that nothing else of bkd needs

    with Repo(str(root)) as repo:
        for out in repo.index.outs:
            if isinstance(path, str):
                if str(out.def_path).rstrip("/") == path.rstrip("/"):
                    return f"{out.stage.addressing}: {out.def_path}", "", []
                continue
            if not out.use_cache or out.protocol != "local":
                continue
            named = Path(out.fs_path).resolve()
            if named == path or named in path.parents:
                cache = repo.cache.local
                return f"{out.stage.addressing}: {out.def_path}", cache.path, list(cache.cache_types)
    return None


def _reflinks(folder: Path) -> bool:
    """Whether the file system of `folder` makes reflinks (a copy-on-write clone of a tiny file)."""
    if shutil.which("cp") is None:
        return False
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = Path(tmp, "a")
        src.write_bytes(b"x")
        done = subprocess.run(["cp", "--reflink=always", str(src), str(Path(tmp, "b"))], capture_output=True)
        return done.returncode == 0
