"""DVC at store scale: what DVC costs in time and disk when the teacher store is its output ("before")
and when only the store's identity file is ("after"). Run from the repository root::

    python -m benchmarks.dvc_scale [--gib 5.0] [--files 20000] [--experiments 2] [--workdir DIR]
                                   [--json benchmarks/results-dvc.json] [--keep] [--smoke]

Put the virtualenv's bin folder first on PATH (its `dvc` and `git` run the pipeline). No torch: a
stand-in script (`standin.py`, written into each repository) plays the extraction and a student.
Its `extract` writes FILES files of random bytes (incompressible, each different) totalling GIB GiB,
laid out as a zarr store (`cache/standin.zarr/zarr.json`, `train/features.NN/c/<shard>/0`, at most
1000 shards per array), and records its own wall seconds in `timings/extract.txt` (git-ignored);
its `student` reads zarr.json and 20 store files and writes `metrics/student.json`. Two fresh
git + DVC repositories under --workdir (default: a new folder under /tmp), one at a time, each removed
once measured (unless --keep):

  before  dvc.yaml `extract` outs: [cache/standin.zarr]; `student` deps: [cache/standin.zarr, standin.py];
          .dvc/config as `dvc init` leaves it (no cache.type: on ext4 DVC copies into .dvc/cache)
          plus core.autostage
  after   `extract` outs: [cache/standin.identity.json] (the manifest digest the extraction writes beside
          the store; the store is git-ignored and no output); `student` deps: [the identity file,
          standin.py] and reads the store through `pipeline.dvcrepo.origin_path`;
          .dvc/config as the project ships it (cache.type = hardlink,symlink)

Measured for each layout, as a new user would meet it:
  1. `dvc repro extract` wall seconds against the stand-in's own seconds inside it: DVC's overhead (s, %
     of own); then `dvc repro student`; and the stand-in's extraction once more outside any repository
  2. disk of the repository after `dvc repro` (`du -s -B1`: hard-linked files once) over the store's
  3. `dvc status` with nothing changed, and after touching the mtime of every store file
  4. after `git add -A && git commit`: `dvc exp run --queue -S seed=K` for K = 1..E and one
     `dvc exp run --run-all`: seconds per experiment and the disk peak while they run (the file system's
     used bytes every 0.1 s minus the value before; `du` of .dvc/tmp/exps, the temporary workspaces,
     beside it), and whether `dvc exp show --json` has E experiments whose metrics carry seed = K
A third repository, `before_files` (the before layout with the same number of files at 4 KiB each;
not in a --smoke run), calibrates the per-file part of each cost. Then each figure is extrapolated to
the paper row SEW-ResNet-18 (ImageNet), from the store bytes of docs/studies/paper_plans.json and the
object count of its config (`paper_row`): for `before`, the after layout's value is DVC's fixed cost
and the rest per_file * files + per_byte * bytes (hashing, copying; the two rates from before and
before_files, `rates`); for `after`, DVC never lists or reads the store, so the measured figures are
kept. It prints a table and writes every figure, the machine and the commands to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = "imagenet-sew-resnet18.yaml"
PAPER_PLANS = REPO / "docs" / "studies" / "paper_plans.json"
CUDA_RESULTS = REPO / "benchmarks" / "results-cuda-paper.json"
GIB = 2 ** 30
LAYOUTS = ("before", "after")
STORE = "cache/standin.zarr"
IDENTITY = "cache/standin.identity.json"
SMOKE = {"gib": 16 / 1024, "files": 200, "experiments": 1}
CONFIG = {"before": "[core]\n    autostage = true\n",  # as `dvc init` leaves it, with autostage
          "after": (REPO / ".dvc" / "config").read_text()}  # the project's, as shipped
CALIBRATION_FILE_BYTES = 4096  # the before layout once more with the same files at one block each: per-file costs

STANDIN = r'''"""Stand-in for bkd's extraction and a student (written by benchmarks.dvc_scale; layout: @LAYOUT@)."""
import hashlib, json, math, os, random, shutil, sys, time

LAYOUT = "@LAYOUT@"
BKD_ROOT = @BKD_ROOT@
LOG = @LOG@
STORE = "cache/standin.zarr"
IDENTITY = "cache/standin.identity.json"
MAX_SHARDS = 1000  # shard folders per array (a zarr array's c/ folder)


def extract(gib, files):
    started = time.perf_counter()
    if os.path.exists(STORE):
        shutil.rmtree(STORE)
    total = int(gib * 2 ** 30)
    arrays = max(4, math.ceil(files / MAX_SHARDS))
    shards = [files // arrays + (j < files % arrays) for j in range(arrays)]
    manifest = {"files": files, "bytes": total, "arrays": [f"train/features.{j:02d}" for j in range(arrays)],
                "shards": shards, "nonce": os.urandom(16).hex()}
    os.makedirs(STORE)
    root = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"manifest": manifest}},
                      sort_keys=True).encode()
    with open(os.path.join(STORE, "zarr.json"), "wb") as fh:  # the manifest first, as bkd writes it
        fh.write(root)
    per, extra, i = total // files, total % files, 0
    for name, count in zip(manifest["arrays"], shards):
        os.makedirs(os.path.join(STORE, name))
        with open(os.path.join(STORE, name, "zarr.json"), "w") as fh:
            json.dump({"zarr_format": 3, "node_type": "array", "shape": [count]}, fh)
        for shard in range(count):
            folder = os.path.join(STORE, name, "c", str(shard))
            os.makedirs(folder)
            with open(os.path.join(folder, "0"), "wb") as fh:
                fh.write(os.urandom(per + (i < extra)))
            i += 1
    if LAYOUT == "after":
        with open(IDENTITY, "w") as fh:
            json.dump({"manifest_digest": hashlib.sha256(root).hexdigest()}, fh)
    seconds = time.perf_counter() - started
    os.makedirs("timings", exist_ok=True)
    with open(os.path.join("timings", "extract.txt"), "w") as fh:
        fh.write(f"{seconds}\n")


def student():
    started = time.time()
    seed = 0
    with open("params.yaml") as fh:
        for line in fh:
            if line.split(":")[0].strip() == "seed":
                seed = int(line.split(":", 1)[1])
    store = STORE
    if LAYOUT == "after":
        sys.path.insert(0, BKD_ROOT)
        from pipeline.dvcrepo import origin_path
        store = origin_path(STORE)
    with open(os.path.join(store, "zarr.json"), "rb") as fh:
        raw = fh.read()
    manifest = json.loads(raw)["attributes"]["manifest"]
    rng = random.Random(seed)
    read = len(raw)
    for _ in range(20):
        j = rng.randrange(len(manifest["arrays"]))
        with open(os.path.join(store, manifest["arrays"][j], "c", str(rng.randrange(manifest["shards"][j])), "0"),
                  "rb") as fh:
            read += len(fh.read())
    os.makedirs("metrics", exist_ok=True)
    with open(os.path.join("metrics", "student.json"), "w") as fh:
        json.dump({"seed": seed, "bytes_read": read}, fh)
    with open(LOG, "a") as fh:
        fh.write(json.dumps({"seed": seed, "cwd": os.getcwd(), "store": os.path.abspath(store),
                             "start": started, "end": time.time()}) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "extract":
        extract(float(sys.argv[2]), int(sys.argv[3]))
    else:
        student()
'''


# --- the repositories ------------------------------------------------------------------------------------------


class Runner:
    """Runs commands with the benchmark's environment and records each (layout, command, folder, seconds)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.commands: list[dict] = []
        self.env = dict(os.environ)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["DVC_NO_ANALYTICS"] = "1"
        # DVC's state and index databases (default /var/tmp/dvc) go under the workdir, removed with it.
        self.env["DVC_SITE_CACHE_DIR"] = str(workdir / "dvc-site-cache")
        for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
            self.env[key] = "bkd benchmark"
        for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
            self.env[key] = "bench@example.invalid"

    def __call__(self, layout: str, cmd: str, cwd: Path, check: bool = True) -> tuple[float, str]:
        started = time.perf_counter()
        done = subprocess.run(cmd, shell=True, cwd=cwd, env=self.env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        self.stdout = done.stdout
        self.commands.append({"layout": layout, "cmd": cmd, "cwd": os.path.relpath(cwd, self.workdir),
                              "seconds": round(seconds, 3), "rc": done.returncode})
        if check and done.returncode != 0:
            raise RuntimeError(f"[{layout}] `{cmd}` failed ({done.returncode}) in {cwd}:\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return seconds, done.stdout + done.stderr


def _dvc_yaml(layout: str, gib: float, files: int) -> str:
    extract = f"{sys.executable} standin.py extract {gib!r} {files}"
    student = f"{sys.executable} standin.py student"
    if layout == "before":
        return f"""stages:
  extract:
    cmd: {extract}
    deps: [standin.py]
    outs: [{STORE}]
  student:
    cmd: {student}
    deps: [{STORE}, standin.py]
    params: [seed]
    metrics:
      - metrics/student.json:
          cache: false
"""
    return f"""stages:
  extract:
    cmd: {extract}
    deps: [standin.py]
    outs: [{IDENTITY}]
  student:
    cmd: {student}
    deps: [{IDENTITY}, standin.py]
    params: [seed]
    metrics:
      - metrics/student.json:
          cache: false
"""


def write_standin(folder: Path, layout: str, log: Path) -> None:
    text = (STANDIN.replace("@LAYOUT@", layout).replace("@BKD_ROOT@", repr(str(REPO)))
            .replace("@LOG@", repr(str(log))))
    (folder / "standin.py").write_text(text)


def make_repo(run: Runner, repo: Path, layout: str, kind: str, gib: float, files: int, log: Path) -> None:
    """A fresh git + DVC repository of the `kind` (before | after) layout at `repo`, committed."""
    repo.mkdir(parents=True)
    write_standin(repo, kind, log)
    (repo / "params.yaml").write_text("seed: 0\n")
    (repo / "dvc.yaml").write_text(_dvc_yaml(kind, gib, files))
    ignored = ["/timings/"] + ([f"/{STORE}"] if kind == "after" else [])
    (repo / ".gitignore").write_text("\n".join(ignored) + "\n")
    run(layout, "git init -q", repo)
    run(layout, "dvc init -q", repo)
    # what `dvc config core.autostage true` (and `dvc config cache.type ...`) write, without a second or
    # two of DVC's start-up each
    config = CONFIG[kind]
    run.commands.append({"layout": layout, "cmd": f"write .dvc/config: {config!r}", "cwd": layout, "seconds": 0,
                         "rc": 0})
    with open(repo / ".dvc" / "config", "a") as fh:
        fh.write(config)
    run(layout, "git add -A && git commit -q -m setup", repo)


# --- measuring ---------------------------------------------------------------------------------------------------


def du(path: Path) -> int:
    """Bytes `path` takes on disk, each inode counted once (du -s -B1)."""
    if not path.exists():
        return 0
    done = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True)
    return int(done.stdout.split()[0]) if done.stdout.strip() else 0


def store_files(store: Path) -> list[Path]:
    return [Path(root, name) for root, _, names in os.walk(store) for name in names]


class DiskPeak:
    """Peaks while a block runs: the file system's used bytes (every 0.1 s) over the value before, and
    `du` of one folder (every second: a du of a big store costs CPU the measured commands share)."""

    def __init__(self, fs_path: Path, folder: Path):
        self.fs_path, self.folder = fs_path, folder
        self.stop = threading.Event()
        self.base = shutil.disk_usage(fs_path).used
        self.peak_used, self.peak_du, self.du_samples, self.used_samples = self.base, 0, 0, 0

    def _used(self):
        while not self.stop.is_set():
            self.peak_used = max(self.peak_used, shutil.disk_usage(self.fs_path).used)
            self.used_samples += 1
            self.stop.wait(0.1)

    def _du(self):
        while not self.stop.is_set():
            self.peak_du = max(self.peak_du, du(self.folder))
            self.du_samples += 1
            self.stop.wait(1.0)

    def __enter__(self):
        self.threads = [threading.Thread(target=self._used, daemon=True), threading.Thread(target=self._du, daemon=True)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def result(self) -> dict:
        return {"fs_used_peak_over_before_bytes": self.peak_used - self.base, "fs_samples": self.used_samples,
                "temp_workspaces_du_peak_bytes": self.peak_du, "du_samples": self.du_samples}


def _experiments(show: list) -> list[dict]:
    """(name, rev, seed param, metrics) of every experiment in `dvc exp show --json`."""
    found = []
    for entry in show:
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
                metrics = ((data.get("metrics") or {}).get("metrics/student.json") or {}).get("data")
                found.append({"name": rev.get("name"), "rev": rev.get("rev"), "param_seed": params.get("seed"),
                              "metrics": metrics, "error": rev.get("error")})
    return found


def _log_lines(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def plain_extraction(run: Runner, workdir: Path, gib: float, files: int) -> dict:
    """The stand-in's extraction in a folder of its own, no git or DVC around it."""
    folder = workdir / "plain"
    folder.mkdir()
    write_standin(folder, "before", workdir / "plain.log")
    wall, _ = run("plain", f"{sys.executable} standin.py extract {gib!r} {files}", folder)
    own = float((folder / "timings" / "extract.txt").read_text())
    paths = store_files(folder / STORE)
    out = {"wall_s": wall, "own_s": own, "store_files": len(paths), "store_bytes": sum(p.stat().st_size for p in paths),
           "store_du_bytes": du(folder / STORE)}
    shutil.rmtree(folder)
    return out


def measure(run: Runner, workdir: Path, layout: str, kind: str, gib: float, files: int, experiments: int,
            keep: bool) -> dict:
    """Every figure of one repository (`layout` names it, `kind` is its dvc.yaml: before | after);
    experiments = 0 leaves out the queued experiments."""
    repo = workdir / layout
    log = workdir / f"{layout}-students.log"
    make_repo(run, repo, layout, kind, gib, files, log)
    out: dict = {"layout": layout, "kind": kind, "repo": str(repo), "gib": gib}

    wall, _ = run(layout, "dvc repro extract", repo)
    own = float((repo / "timings" / "extract.txt").read_text())
    out["repro_extract"] = {"wall_s": wall, "own_s": own, "overhead_s": wall - own, "overhead_pct": 100 * (wall - own) / own}
    out["repro_student_s"], _ = run(layout, "dvc repro student", repo)

    store = repo / STORE
    paths = store_files(store)
    store_bytes, store_du, repo_du = sum(p.stat().st_size for p in paths), du(store), du(repo)
    out["disk"] = {"store_files": len(paths), "store_bytes": store_bytes, "store_du_bytes": store_du,
                   "repo_du_bytes": repo_du, "dvc_cache_du_bytes": du(repo / ".dvc" / "cache"),
                   "git_du_bytes": du(repo / ".git"), "multiple": repo_du / store_du}

    status_s, status_text = run(layout, "dvc status", repo)
    now = time.time()
    for p in paths:
        os.utime(p, (now, now))
    touched_s, touched_text = run(layout, "dvc status", repo)
    out["status"] = {"unchanged_s": status_s, "unchanged_output": status_text.strip()[-300:],
                     "after_touch_s": touched_s, "after_touch_output": touched_text.strip()[-300:],
                     "touched_files": len(paths)}

    if experiments:
        out["experiments"] = queued_experiments(run, workdir, repo, layout, experiments, log)
    out["repo_du_end_bytes"] = du(repo)
    out["leftover_processes"] = _processes_in(repo)
    if not keep:
        shutil.rmtree(repo, ignore_errors=True)
    return out


def queued_experiments(run: Runner, workdir: Path, repo: Path, layout: str, experiments: int, log: Path) -> dict:
    """Commit, queue `experiments` experiments (seed = 1..E), run them all in one job; time, disk, outcome."""
    run(layout, "git add -A && git commit -q -m 'pipeline ran'", repo)
    queue_s = []
    for k in range(1, experiments + 1):
        queue_s.append(run(layout, f"dvc exp run --queue -S seed={k}", repo)[0])
    with DiskPeak(workdir, repo / ".dvc" / "tmp" / "exps") as peak:
        started_at = time.time()
        run_all_s, run_all_text = run(layout, "dvc exp run --run-all", repo)
    students = [line for line in _log_lines(log) if line["start"] >= started_at]
    ends = sorted(line["end"] for line in students)
    run(layout, "dvc exp show --json", repo)
    show = json.loads(run.stdout)
    found = _experiments(show)
    succeeded = sorted(e["metrics"]["seed"] for e in found
                       if e["metrics"] and e["param_seed"] == e["metrics"].get("seed") and not e["error"])
    return {
        "queued": experiments, "queue_s": queue_s, "run_all_s": run_all_s,
        "per_experiment_s": run_all_s / experiments,
        "per_experiment_from_log_s": [b - a for a, b in zip([started_at] + ends[:-1], ends)],
        "student_stage_s": [line["end"] - line["start"] for line in students],
        "student_workspaces": [line["cwd"] for line in students],
        "student_store_paths": [line["store"] for line in students],
        "store_read_from_origin": bool(students) and all(line["store"] == str((repo / STORE).resolve())
                                                         for line in students),
        "disk": peak.result(),
        "found": found, "succeeded_seeds": succeeded,
        "all_succeeded": succeeded == list(range(1, experiments + 1)) and len(found) == experiments,
        "run_all_output": run_all_text.strip()[-1500:],
        "temp_workspaces_left_bytes": du(repo / ".dvc" / "tmp" / "exps"),
    }


def _processes_in(folder: Path) -> list[str]:
    """Command lines of processes still running with `folder` in their working directory (a queue worker
    DVC left behind, say)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            if cwd.startswith(str(folder)):
                found.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except OSError:
            continue
    return found


# --- the paper row -------------------------------------------------------------------------------------------------


def paper_row() -> dict:
    """Store bytes, object count and extraction seconds of SEW-ResNet-18 (ImageNet) at its config's settings.

    paper_plans.json ("config" variant) gives the bytes and the planned seconds but no file count. The
    count follows from the writer (pipeline.targets.writer): every array of a split is sharded along rows
    with shards of chunk_size * chunks_per_shard rows, one object per shard (views are a dimension of a
    row, not more objects); each split also has `chunk_digest` and `shards_done` with one object per shard;
    plus a zarr.json per array, per split group and at the root."""
    import yaml

    plans = json.loads(PAPER_PLANS.read_text())
    entry = next(p for p in plans["plans"] if p["config"] == PAPER_CONFIG and p["variant"] == "config")
    plan = entry["plan"]
    extract = yaml.safe_load((REPO / "configs" / PAPER_CONFIG).read_text())["extract"]
    shard_rows = extract["chunk_size"] * extract["chunks_per_shard"]
    splits = {}
    files = 1
    for split, samples in plan["samples"].items():
        arrays = sorted({a["name"] for a in plan["arrays"] if a["split"] == split})
        shards = math.ceil(samples / shard_rows)
        objects = shards * (len(arrays) + 2)
        metadata = 1 + len(arrays) + 2
        splits[split] = {"samples": samples, "row_arrays": len(arrays), "shards": shards, "shard_objects": objects,
                         "metadata_files": metadata}
        files += objects + metadata
    out = {"config": f"configs/{PAPER_CONFIG}", "codecs": entry["codecs"], "views": entry["views"],
           "store_bytes": plan["total_bytes"], "files": files, "mean_file_bytes": plan["total_bytes"] / files,
           "chunk_size": extract["chunk_size"], "chunks_per_shard": extract["chunks_per_shard"],
           "shard_rows": shard_rows, "splits": splits,
           "files_how": "sum over splits of ceil(samples / (chunk_size * chunks_per_shard)) shards x (row arrays "
                        "of the plan + chunk_digest + shards_done), + a zarr.json per array, split and the root",
           "extraction_s": plan["seconds"], "extraction_plan_device": plan["device"],
           "forward_passes": plan["forward_passes"]}
    if CUDA_RESULTS.exists():  # the measured GPU extraction rate of this row's workload, where there is one
        cuda = json.loads(CUDA_RESULTS.read_text())
        work = cuda.get("paper_scale", {}).get("workloads", {}).get("sew_resnet18@224", {}).get("extraction")
        if work and work.get("extract_samples_per_s"):
            out["extraction_s_at_measured_gpu_rate"] = plan["forward_passes"] / work["extract_samples_per_s"]
            out["gpu_rate"] = {"source": str(CUDA_RESULTS.relative_to(REPO)),
                               "device": cuda.get("machine", {}).get("device"),
                               "size": cuda.get("paper_scale", {}).get("size"),
                               "extract_samples_per_s": work["extract_samples_per_s"]}
    return out


def rates(fixed: float, big: float, big_files: int, big_bytes: int, cal: float | None = None,
          cal_files: int = 0, cal_bytes: int = 0) -> dict:
    """DVC's cost over its fixed part as per_file * files + per_byte * bytes, from the measured store (`big`)
    and the calibration store (`cal`: the same files at one block each). Without a calibration, or where
    the fit gives a negative rate (noise), the excess goes to the other term alone."""
    e_big = max(0.0, big - fixed)
    per_file = per_byte = 0.0
    if cal is not None:
        e_cal = max(0.0, cal - fixed)
        det = big_files * cal_bytes - big_bytes * cal_files
        if det:
            per_file = (e_big * cal_bytes - big_bytes * e_cal) / det
            per_byte = (big_files * e_cal - cal_files * e_big) / det
    if cal is None or per_file < 0 or per_byte < 0 or not (per_file or per_byte):
        if cal is not None and per_byte < 0:
            per_file, per_byte = e_big / big_files, 0.0
        else:
            per_file, per_byte = 0.0, e_big / big_bytes
    return {"fixed": fixed, "per_file": per_file, "per_byte": per_byte}


def extrapolate(results: dict, paper: dict) -> dict:
    """Each figure at the paper row's size.

    before: the after layout's value of the same figure is DVC's fixed cost (the same command with the
    store out of DVC's sight); the rest is per_file * files + per_byte * bytes, the two rates from the
    measured store and the calibration store (`before_files`: the same number of files at 4 KiB each).
    after: DVC never lists or reads the store, so no figure depends on it: the measured values are kept.
    Disk: the repository's bytes beyond the store's, the same way; the multiple is 1 + that / store bytes."""
    b, a, c = results["before"], results["after"], results.get("before_files")
    files, size = paper["files"], paper["store_bytes"]
    big_files, big_bytes = b["disk"]["store_files"], b["disk"]["store_du_bytes"]
    cal_files, cal_bytes = (c["disk"]["store_files"], c["disk"]["store_du_bytes"]) if c else (0, 0)
    fits = {}

    def pair(name: str, get) -> dict:
        cal = None
        if c is not None:
            try:
                cal = get(c)
            except KeyError:  # the calibration ran without this part (experiments, in a smoke run)
                cal = None
        fit = rates(get(a), get(b), big_files, big_bytes, cal, cal_files, cal_bytes)
        fits[name] = fit
        return {"before": fit["fixed"] + fit["per_file"] * files + fit["per_byte"] * size, "after": get(a)}

    def extra(x: dict) -> float:
        return x["disk"]["repo_du_bytes"] - x["disk"]["store_du_bytes"]

    out = {
        "bytes_scale": size / big_bytes, "files_scale": files / big_files,
        "dvc_overhead_s": pair("dvc_overhead_s", lambda x: x["repro_extract"]["overhead_s"]),
        "repro_student_s": pair("repro_student_s", lambda x: x["repro_student_s"]),
        "status_unchanged_s": pair("status_unchanged_s", lambda x: x["status"]["unchanged_s"]),
        "status_after_touch_s": pair("status_after_touch_s", lambda x: x["status"]["after_touch_s"]),
        "per_experiment_s": pair("per_experiment_s", lambda x: x["experiments"]["per_experiment_s"]),
        "experiment_disk_peak_bytes": pair(
            "experiment_disk_peak_bytes", lambda x: x["experiments"]["disk"]["fs_used_peak_over_before_bytes"]),
        "experiment_temp_workspaces_peak_bytes": pair(
            "experiment_temp_workspaces_peak_bytes", lambda x: x["experiments"]["disk"]["temp_workspaces_du_peak_bytes"]),
        "repo_extra_bytes": pair("repo_extra_bytes", extra),
    }
    out["disk_multiple"] = {layout: 1 + out["repo_extra_bytes"][layout] / size for layout in LAYOUTS}
    for key in ("extraction_s", "extraction_s_at_measured_gpu_rate"):
        if key in paper:
            out[f"dvc_overhead_pct_of_{key}"] = {layout: 100 * out["dvc_overhead_s"][layout] / paper[key]
                                                  for layout in LAYOUTS}
    out["rates"] = fits
    out["calibrated"] = c is not None
    return out


# --- output ----------------------------------------------------------------------------------------------------


def machine(workdir: Path) -> dict:
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(workdir)], capture_output=True,
                        text=True).stdout.strip() if shutil.which("findmnt") else ""
    fs = fs or subprocess.run(["stat", "-f", "-c", "%T", str(workdir)], capture_output=True, text=True).stdout.strip()
    dvc = subprocess.run(["dvc", "--version"], capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                              "DVC_NO_ANALYTICS": "1"}).stdout.strip()
    git = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip()
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), None)
    probe = Path(tempfile.mkdtemp(dir=workdir))
    (probe / "a").write_bytes(b"x")
    reflink = subprocess.run(["cp", "--reflink=always", str(probe / "a"), str(probe / "b")],
                             capture_output=True).returncode == 0
    shutil.rmtree(probe)
    return {"cpu_count": os.cpu_count(), "filesystem": fs, "reflink": reflink, "memory_bytes": mem,
            "dvc_version": dvc, "git_version": git, "python_version": platform.python_version(),
            "platform": platform.platform(), "workdir": str(workdir)}


def _g(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB"


def rows(r: dict) -> list[tuple[str, str, str]]:
    b, a = r["before"], r["after"]
    out = [("stand-in extraction alone (own s)", f"{r['plain_extraction']['own_s']:.1f}", "(same)")]
    for label, f in (
        ("dvc repro extract (wall s)", lambda x: f"{x['repro_extract']['wall_s']:.1f}"),
        ("  stand-in's own s inside it", lambda x: f"{x['repro_extract']['own_s']:.1f}"),
        ("  DVC overhead s (% of own)",
         lambda x: f"{x['repro_extract']['overhead_s']:.1f} ({x['repro_extract']['overhead_pct']:.0f} %)"),
        ("dvc repro student (s)", lambda x: f"{x['repro_student_s']:.1f}"),
        ("disk after repro (x store)",
         lambda x: f"{x['disk']['multiple']:.3f} ({_g(x['disk']['repo_du_bytes'])})"),
        ("dvc status, no change (s)", lambda x: f"{x['status']['unchanged_s']:.1f}"),
        ("dvc status, store mtimes touched (s)", lambda x: f"{x['status']['after_touch_s']:.1f}"),
        ("exp run --run-all (s, all)", lambda x: f"{x['experiments']['run_all_s']:.1f}"),
        ("  per experiment (s)", lambda x: f"{x['experiments']['per_experiment_s']:.1f}"),
        ("  each, start to its student's end (s)",
         lambda x: " ".join(f"{v:.1f}" for v in x["experiments"]["per_experiment_from_log_s"])),
        ("  disk peak, fs used over before", lambda x: _g(x["experiments"]["disk"]["fs_used_peak_over_before_bytes"])),
        ("  disk peak, du .dvc/tmp/exps", lambda x: _g(x["experiments"]["disk"]["temp_workspaces_du_peak_bytes"])),
        ("  experiments succeeded",
         lambda x: f"{len(x['experiments']['succeeded_seeds'])}/{x['experiments']['queued']}"),
        ("  student read the origin's store", lambda x: "yes" if x["experiments"]["store_read_from_origin"] else "no"),
    ):
        out.append((label, f(b), f(a)))
    return out


def paper_rows(r: dict) -> list[tuple[str, str, str]]:
    x, p = r["extrapolation"], r["paper_row"]
    out = [("DVC overhead of the extraction (s)", f"{x['dvc_overhead_s']['before']:.0f}",
            f"{x['dvc_overhead_s']['after']:.1f}")]
    for key, label in (("extraction_s", f"  % of the planned extraction ({p['extraction_s'] / 3600:.0f} h, "
                                        f"{p['extraction_plan_device']})"),
                       ("extraction_s_at_measured_gpu_rate", "  % of it at the measured GPU rate "
                        f"({p.get('extraction_s_at_measured_gpu_rate', 0) / 3600:.1f} h)")):
        if f"dvc_overhead_pct_of_{key}" in x:
            pct = x[f"dvc_overhead_pct_of_{key}"]
            out.append((label, f"{pct['before']:.2f} %", f"{pct['after']:.4f} %"))
    out += [
        ("dvc repro student (s)", f"{x['repro_student_s']['before']:.0f}", f"{x['repro_student_s']['after']:.1f}"),
        ("dvc status after touching the store (s)", f"{x['status_after_touch_s']['before']:.0f}",
         f"{x['status_after_touch_s']['after']:.1f}"),
        ("disk after repro (x store)", f"{x['disk_multiple']['before']:.3f}", f"{x['disk_multiple']['after']:.4f}"),
        ("per queued experiment (s)", f"{x['per_experiment_s']['before']:.0f}", f"{x['per_experiment_s']['after']:.1f}"),
        ("queued experiments' disk peak (fs used)", _g(x["experiment_disk_peak_bytes"]["before"]),
         _g(x["experiment_disk_peak_bytes"]["after"])),
        ("  temporary workspaces (du)", _g(x["experiment_temp_workspaces_peak_bytes"]["before"]),
         _g(x["experiment_temp_workspaces_peak_bytes"]["after"])),
    ]
    return out


def print_table(r: dict) -> None:
    def show(title: str, table: list[tuple[str, str, str]]) -> None:
        width = max(len(row[0]) for row in table) + 2
        print(f"\n{title}")
        print(f"{'':{width}}{'before':>24}{'after':>24}")
        for label, before, after in table:
            print(f"{label:{width}}{before:>24}{after:>24}")

    d = r["before"]["disk"]
    show(f"DVC at store scale: {_g(d['store_bytes'])} in {d['store_files']:,} files, "
         f"{r['experiments']} queued experiment(s), {r['machine']['filesystem']}, {r['machine']['cpu_count']} cores, "
         f"{r['machine']['dvc_version'] and 'DVC ' + r['machine']['dvc_version']}", rows(r))
    p = r["paper_row"]
    show(f"extrapolated to SEW-ResNet-18 (ImageNet): {p['store_bytes'] / GIB:.0f} GiB in {p['files']:,} files "
         f"(x{r['extrapolation']['bytes_scale']:.0f} bytes, x{r['extrapolation']['files_scale']:.2f} files; "
         f"{'per-file and per-byte rates' if r['extrapolation']['calibrated'] else 'per-byte rates only'})",
         paper_rows(r))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dvc_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=5.0, help="store size in GiB (default 5)")
    parser.add_argument("--files", type=int, default=20000, help="store files (default 20000)")
    parser.add_argument("--experiments", type=int, default=2, help="queued experiments (default 2)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the repositories go (default: a new folder under /tmp)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results-dvc.json"), metavar="OUT")
    parser.add_argument("--keep", action="store_true", help="keep the repositories (and the workdir)")
    parser.add_argument("--smoke", action="store_true", help="16 MiB in 200 files, 1 experiment (the test)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.gib, args.files, args.experiments = SMOKE["gib"], SMOKE["files"], SMOKE["experiments"]
    if shutil.which("dvc", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}") is None:
        parser.exit(2, f"{parser.prog}: error: no `dvc` next to {sys.executable} or on PATH\n")
    if args.workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="bkd-dvc-scale-"))
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="bkd-dvc-scale-", dir=args.workdir))
    started = time.perf_counter()
    run = Runner(workdir)
    results: dict = {"machine": machine(workdir), "gib": args.gib, "files": args.files,
                     "experiments": args.experiments, "smoke": args.smoke}
    try:
        print(f"stand-in extraction alone: {args.gib:g} GiB in {args.files} files ...", flush=True)
        results["plain_extraction"] = plain_extraction(run, workdir, args.gib, args.files)
        for layout in LAYOUTS:
            print(f"{layout}: repro, status, {args.experiments} queued experiment(s) ...", flush=True)
            results[layout] = measure(run, workdir, layout, layout, args.gib, args.files, args.experiments,
                                      args.keep)
        if not args.smoke:  # the smoke run (the test: under a minute) extrapolates by bytes alone
            print(f"before_files (calibration, {args.files} files of {CALIBRATION_FILE_BYTES} B): repro, status, "
                  f"{args.experiments} queued experiment(s) ...", flush=True)
            results["before_files"] = measure(run, workdir, "before_files", "before",
                                              args.files * CALIBRATION_FILE_BYTES / GIB, args.files,
                                              args.experiments, args.keep)
    finally:
        results["commands"] = run.commands
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["paper_row"] = paper_row()
    results["extrapolation"] = extrapolate(results, results["paper_row"])
    results["total_s"] = time.perf_counter() - started
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json} ({results['total_s'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()
