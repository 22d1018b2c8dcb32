"""`dvc repro` of the real dvc.yaml in a temporary copy of the repository, on tiny parameters."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

pytestmark = pytest.mark.slow

TINY_PARAMS = {
    "data": {"limit": 160, "test_size": 500},
    "teacher": {"epochs": 1, "batch_size": 64},
    "extract": {"chunk_size": 32, "chunks_per_shard": 2},
    "student": {"epochs": 1, "batch_size": 32, "model_kwargs": {"widths": [8, 16, 32], "blocks": [1, 1, 1]}},
}
MODES = ["none", "mixed"]  # two of the five modes keep the test short: one without BKD, one with


def _merge(base: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _only_modes(pipeline: dict) -> dict:
    """dvc.yaml restricted to MODES: the per-mode stages and the compare stage's inputs."""
    stages = pipeline["stages"]
    foreach = stages["train_student"]["foreach"]
    stages["train_student"]["foreach"] = {mode: foreach[mode] for mode in MODES}
    stages["evaluate"]["foreach"] = [m for m in stages["evaluate"]["foreach"] if m in MODES]
    stages["compare"]["deps"] = [d for d in stages["compare"]["deps"]
                                 if not d.startswith("metrics/student-") or any(f"-{m}.json" in d for m in MODES)]
    return pipeline


def _run(args: list[str], cwd: Path) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _queue_log(name: str, root: Path, tries: int = 3) -> str:
    """`dvc queue logs NAME`: what a finished queued experiment printed. Every run of the pipeline names each
    stage it ran or skipped; a log naming none was not read back whole (DVC serves it from its task store),
    so it is read again, a few times at most."""
    for _ in range(tries):
        log = _run(["dvc", "queue", "logs", name], root)
        if "stage '" in log.lower():
            return log
        time.sleep(2)
    return log


@pytest.fixture(scope="module")
def dvc_copy(tmp_path_factory) -> Path:
    """A git repository holding the project's files (tracked and new), with tiny params and two modes."""
    root = tmp_path_factory.mktemp("dvc-repo")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if not (REPO / name).is_file():  # deleted in the working tree
            continue
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    _merge(params, TINY_PARAMS)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text(yaml.safe_dump(_only_modes(yaml.safe_load((root / "dvc.yaml").read_text())),
                                                  sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        subprocess.run(command, cwd=root, check=True)
    return root


def test_repro_runs_every_stage_then_nothing(dvc_copy):
    first = _run(["dvc", "repro"], dvc_copy)
    expected = {"train_teacher", "extract_teacher", "compare"} | {
        f"{stage}@{mode}" for stage in ("train_student", "evaluate") for mode in MODES}
    assert _stages_run(first) == expected
    for mode in MODES:
        metrics = json.loads((dvc_copy / f"metrics/student-{mode}.json").read_text())
        assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
        assert metrics["split"] == "test"  # what the figures were scored on, beside them
        assert all(isinstance(v, (int, float)) for k, v in metrics.items() if k != "split")  # readable columns
        report = json.loads((dvc_copy / f"reports/student-{mode}.json").read_text())
        assert report["firing_rates"] and all(op["sops"] >= 0 for op in report["operations"].values())
        assert (dvc_copy / f"runs/students/{mode}/live/metrics.json").is_file()  # dvclive's per-epoch log
    assert (dvc_copy / "plots/accuracy_by_mode.png").read_bytes()[:4] == b"\x89PNG"
    assert (dvc_copy / "dvc.lock").is_file()

    second = _run(["dvc", "repro"], dvc_copy)
    assert _stages_run(second) == set()

    shown = _run(["dvc", "metrics", "show"], dvc_copy)
    for mode in MODES:
        assert f"metrics/student-{mode}.json" in shown


def _commit(root: Path, message: str) -> None:
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], root)


def test_sensitivity_sweep_queues_from_one_store_and_reruns_only_what_reads_the_parameter(dvc_copy):
    """benchmarks.sensitivity: queued experiments over a blur ratio and two seeds. The seed-1 baseline
    retrains the students alone (teacher.seed is the teacher's); a blur-ratio experiment retrains only
    the student whose loss reads it, the others of its seed coming back from DVC's run cache."""
    if not (dvc_copy / "dvc.lock").is_file():
        _run(["dvc", "repro"], dvc_copy)
    _commit(dvc_copy, "baseline")  # dvc.lock, metrics and plots: what experiments compare against
    sweep = [sys.executable, "-m", "benchmarks.sensitivity", "--seeds", "0", "1", "--blur-ratio", "0.15", "0.3",
             "--alpha", "--temperature", "--set", "data.holdout=0", "--json", "sweep.json", "--plot-dir", "sweep-plots"]
    output = _run(sweep, dvc_copy)
    assert "queued 3 experiments (1 already finished)" in output  # seed 0 at blur 0.15 is the committed baseline

    records = _exp_show_json(dvc_copy)
    experiments = [r for r in records if r["name"] != "baseline"]
    assert sorted((r["blur"], r["seed"]) for r in experiments) == [(0.15, 1), (0.3, 0), (0.3, 1)]
    for record in records:
        for mode in MODES:
            assert 0.0 <= record["top1"][mode] <= 1.0, record  # every experiment has every accuracy
    # What each experiment ran, from its queue log.
    student_stages = {f"{stage}@{mode}" for stage in ("train_student", "evaluate") for mode in MODES}
    for record in experiments:
        ran = _stages_run(_queue_log(record["name"], dvc_copy))
        assert "train_teacher" not in ran and "extract_teacher" not in ran, (record, ran)
        if record["blur"] == 0.3:  # the none student of the same seed comes from the run cache
            assert "train_student@mixed" in ran and "train_student@none" not in ran, (record, ran)
            # (evaluations write metrics kept in git, not in DVC's cache, so one may re-run: seconds)
            assert ran <= {"train_student@mixed", "evaluate@mixed", "evaluate@none", "compare"}, (record, ran)
        else:
            assert student_stages <= ran, (record, ran)  # seed 1: new students, the same teacher and store
    # Run again, the sweep resumes: everything is finished, nothing is queued or re-run.
    assert "queued 0 experiments (4 already finished)" in _run(sweep, dvc_copy)
    assert len(_exp_show_json(dvc_copy)) == len(records)
    result = json.loads((dvc_copy / "sweep.json").read_text())
    rows = result["sweeps"]["student.bkd.blur_ratio"]
    assert [row["value"] for row in rows] == [0.15, 0.3] and all(row["seeds"] == [0, 1] for row in rows)
    assert all(row["modes"]["mixed"]["n"] == 2 and row["modes"]["none"]["n"] == 2 for row in rows)
    by_value = {r["blur"]: [] for r in records}
    for record in records:
        by_value[record["blur"]].append(record["top1"]["mixed"])
    for row in rows:  # the table is the experiments' own metrics
        assert row["modes"]["mixed"]["mean"] == pytest.approx(sum(by_value[row["value"]]) / 2)
    assert (dvc_copy / "sweep-plots/sensitivity-blur_ratio.png").read_bytes()[:4] == b"\x89PNG"
    # Metrics of the baseline and an experiment side by side (--all: unchanged ones too).
    shown = _run(["dvc", "metrics", "diff", "--all", "HEAD", experiments[0]["name"]], dvc_copy)
    assert "metrics/student-mixed.json" in shown and "top1" in shown
    table = run_compare(dvc_copy)
    assert "blur_ratio=0.3" in table and "blur_ratio=0.15" in table


def _exp_show_json(root: Path) -> list[dict]:
    """(name, blur ratio, seed, top1 per mode) of every row of `dvc exp show --json`."""
    import dvc.api

    env_cwd = os.getcwd()
    os.chdir(root)
    try:
        records = dvc.api.exp_show()
    finally:
        os.chdir(env_cwd)
    rows = []
    for r in records:
        if r.get("Experiment") is None and r.get("rev") == "workspace":
            continue
        rows.append({"name": r.get("Experiment") or "baseline",
                     "blur": r.get("params.yaml:student.bkd.blur_ratio", r.get("student.bkd.blur_ratio")),
                     "seed": r.get("params.yaml:seed", r.get("seed")),
                     "top1": {m: r.get(f"metrics/student-{m}.json:top1") for m in MODES}})
    return rows


def run_compare(root: Path) -> str:
    bkd = str(Path(sys.executable).with_name("bkd"))
    return _run([bkd, "compare", "--experiments", "--plot", "sweep.png"], root)


def test_student_param_experiment_reruns_only_student_stages(dvc_copy):
    if not (dvc_copy / "dvc.lock").is_file():
        _run(["dvc", "repro"], dvc_copy)
    _commit(dvc_copy, "repro")
    # --temp: DVC runs it in a clone under .dvc/tmp/exps/standalone/, which reads this workspace's store
    output = _run(["dvc", "exp", "run", "--temp", "-S", "student.lr=0.003"], dvc_copy)
    ran = _stages_run(output)
    assert "train_teacher" not in ran and "extract_teacher" not in ran
    assert {f"train_student@{mode}" for mode in MODES} <= ran
    store = yaml.safe_load((dvc_copy / "params.yaml").read_text())["extract"]["store"]
    assert f"queued from ({dvc_copy.resolve() / store})" in output


def _changed_stages(root: Path) -> set[str]:
    """The stages `dvc status` reports as changed (their deps, params or outs differ from dvc.lock)."""
    return set(json.loads(_run(["dvc", "status", "--json"], root).splitlines()[-1] or "{}"))


@pytest.mark.parametrize("edited, expected", [
    ("pipeline/student/losses.py", {"train_student"}),
    ("pipeline/student/models.py", {"train_student", "evaluate"}),
    ("pipeline/targets/fields.py", {"extract_teacher", "train_student", "evaluate"}),
    ("pipeline/teacher/models.py", {"train_teacher", "extract_teacher", "train_student", "evaluate", "compare"}),
])
def test_a_code_change_reruns_only_the_stages_that_import_it(dvc_copy, edited, expected):
    """The research loop over code: a one-line change to a loss or a student model leaves the teacher and
    its store valid (only student-side stages are out of date); a store codec change re-extracts but keeps
    the trained teacher; a teacher-side change re-runs stage one."""
    if not (dvc_copy / "dvc.lock").is_file() or _changed_stages(dvc_copy):
        _run(["dvc", "repro"], dvc_copy)
    assert _changed_stages(dvc_copy) == set()
    path = dvc_copy / edited
    original = path.read_text()
    path.write_text(original + "# a one-line change\n")
    try:
        changed = _changed_stages(dvc_copy)
    finally:
        path.write_text(original)
    assert {stage.split("@")[0] for stage in changed} == expected, changed
    per_mode = {"train_student", "evaluate"} & expected
    assert {f"{stage}@{mode}" for stage in per_mode for mode in MODES} <= changed


def test_a_teacher_param_change_retrains_over_the_weights_dvc_tracks(dvc_copy):
    """bkd refuses to replace teacher weights it did not write for this run unless asked; under
    `dvc repro` DVC removes a stage's outputs (keeping them in its cache) before it runs, so a changed
    teacher parameter retrains and the old weights come back from the run cache."""
    if not (dvc_copy / "dvc.lock").is_file():
        _run(["dvc", "repro"], dvc_copy)
    params = dvc_copy / "params.yaml"
    original = params.read_text()
    weights = dvc_copy / yaml.safe_load(original)["teacher"]["checkpoint"]
    before = weights.read_bytes()
    changed = yaml.safe_load(original)
    changed["teacher"]["seed"] = changed["teacher"]["seed"] + 1
    params.write_text(yaml.safe_dump(changed, sort_keys=False))
    try:
        assert "train_teacher" in _stages_run(_run(["dvc", "repro", "train_teacher"], dvc_copy))
        assert weights.read_bytes() != before
    finally:
        params.write_text(original)
    _run(["dvc", "repro", "train_teacher"], dvc_copy)  # restored from DVC's run cache
    assert weights.read_bytes() == before
