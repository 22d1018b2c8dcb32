"""`bkd compare`: experiments that differ only in their seed are one group, reported as mean ± sd."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from pipeline import compare
from pipeline.compare import format_table, group_over_seeds, mode_groups, plot_groups, read_mode_metrics
from pipeline.errors import BkdError
from tests.helpers import REPO, run_bkd


def _row(name, seed, blur, none, mixed):
    return {"name": name, "params": {"seed": seed, "student.bkd.blur_ratio": blur},
            "values": {"none": none, "mixed": mixed}}


def test_seeds_are_grouped_into_mean_and_sd(tmp_path):
    rows = [_row("a", 0, 0.15, 0.90, 0.91), _row("b", 1, 0.15, 0.92, 0.95), _row("c", 2, 0.15, 0.94, 0.93),
            _row("d", 0, 0.3, 0.90, 0.80)]
    groups = {g["params"]["student.bkd.blur_ratio"]: g for g in group_over_seeds(rows)}
    assert set(groups) == {0.15, 0.3}
    mixed = groups[0.15]["stats"]["mixed"]
    assert mixed["n"] == 3 and mixed["mean"] == pytest.approx(0.93)
    assert mixed["sd"] == pytest.approx(statistics.stdev([0.91, 0.95, 0.93]))
    assert groups[0.3]["stats"]["mixed"]["n"] == 1 and math.isnan(groups[0.3]["stats"]["mixed"]["sd"])
    table = format_table(list(groups.values()), "top1")
    assert "blur_ratio=0.15 (3)" in table and "0.9300 ± 0.0200 (3)" in table
    plot_groups(list(groups.values()), "top1", tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_experiment_rows_keep_top_level_params_and_leave_out_metrics(tmp_path, monkeypatch):
    """exp_show flattens params and metrics alike and prefixes a name with its file only where two files
    share it: `seed` arrives bare, and so do metric names such as the teacher's `test_accuracy`."""
    import dvc.api

    (tmp_path / "params.yaml").write_text("seed: 0\nstudent:\n  bkd: {blur_ratio: 0.15}\n")
    records = [
        {"Experiment": None, "rev": "workspace", "seed": 0},
        {"Experiment": None, "rev": "abc123", "seed": 0.0, "student.bkd.blur_ratio": 0.15, "test_accuracy": 0.97,
         "model": "resnet18", "metrics/student-mixed.json:top1": 0.9},
        {"Experiment": "exp-1", "rev": "def456", "params.yaml:seed": 1, "student.bkd.blur_ratio": 0.15,
         "test_accuracy": 0.97, "metrics/student-mixed.json:top1": 0.92},
    ]
    monkeypatch.setattr(dvc.api, "exp_show", lambda repo=None: records)
    rows = compare.experiment_rows(str(tmp_path))
    assert [r["params"] for r in rows] == [{"seed": 0.0, "student.bkd.blur_ratio": 0.15},
                                           {"seed": 1, "student.bkd.blur_ratio": 0.15}]
    (group,) = group_over_seeds(rows)
    assert group["seeds"] == [0, 1] and group["stats"]["mixed"]["mean"] == pytest.approx(0.91)
    with pytest.raises(BkdError, match=r"--metric 'nosuch' is in no student's metrics \(they hold: top1\)"):
        compare.experiment_rows(str(tmp_path), metric="nosuch")


def test_sensitivity_tables_take_the_groups_that_differ_in_the_swept_parameter_alone(monkeypatch):
    """A swept value's row is the group equal to the config everywhere else, compared the way exp_show
    spells values (seed 1 as 1.0, lists as their repr); a group that also differs elsewhere, even
    inside a dict-valued field such as model_kwargs, is left out."""
    from benchmarks import sensitivity
    from pipeline.config import load_config

    current = load_config(REPO / "params.yaml", ["data.holdout=1000"])
    same = {"data.holdout": 1000, "student.model_kwargs.widths": "[8, 16, 32]", "augment.scale": "[0.08, 1.0]"}

    def row(seed, blur, top1, **changed):
        params = {**same, "seed": float(seed), "student.bkd.blur_ratio": blur, **changed}
        return {"name": f"e{seed}{blur}{len(changed)}", "rev": None, "params": params,
                "values": {"none": 0.9, "mixed": top1}}

    wider = {"student.model_kwargs.widths": "[16, 32, 64]"}
    rows = [row(0, 0.3, 0.1, **wider), row(1, 0.3, 0.1, **wider),  # another student: not this sweep
            row(0, 0.15, 0.91), row(1, 0.15, 0.93), row(0, 0.3, 0.80), row(1, 0.3, 0.82),
            row(2, 0.3, 0.5)]  # a seed not asked for
    monkeypatch.setattr(sensitivity, "experiment_rows", lambda: rows)
    table = sensitivity.tables({"student.bkd.blur_ratio": [0.15, 0.3, 0.5]}, [0, 1], current)
    found = table["student.bkd.blur_ratio"]
    assert [r["value"] for r in found] == [0.15, 0.3] and all(r["seeds"] == [0, 1] for r in found)
    assert all(type(seed) is int for r in found for seed in r["seeds"])  # exp_show's 1.0 reads back as seed 1
    assert found[1]["modes"]["mixed"]["mean"] == pytest.approx(0.81) and found[1]["modes"]["mixed"]["n"] == 2
    assert set(found[0]["modes"]) == {"none", "mixed"}


def test_sensitivity_queues_only_what_is_not_finished(monkeypatch):
    """Seed baselines first, then each swept value but the config's own; an experiment already
    finished with the same parameters (an interrupted sweep) is skipped, one that differs is not."""
    from benchmarks import sensitivity
    from pipeline.config import load_config

    current = load_config(REPO / "params.yaml", ["data.holdout=1000"])
    calls = []
    monkeypatch.setattr(sensitivity, "_dvc", lambda *args: calls.append(args[args.index("--queue") + 1:]))
    done = [{"seed": 1.0, "data.holdout": 1000, "student.bkd.blur_ratio": 0.5, "augment.scale": "[0.08, 1.0]"},
            {"seed": 0.0, "data.holdout": 0, "student.bkd.blur_ratio": 0.15}]  # scored on test: not this sweep
    queued, skipped = sensitivity.queue({"student.bkd.blur_ratio": [0.15, 0.5]}, [0, 1], ["data.holdout=1000"],
                                        current, done)
    assert (queued, skipped) == (3, 1)
    assert [tuple(a for a in c if a != "-S") for c in calls] == [
        ("data.holdout=1000", "seed=0"), ("data.holdout=1000", "seed=1"),
        ("data.holdout=1000", "seed=0", "student.bkd.blur_ratio=0.5")]


def test_compare_reads_the_workspace_metrics(tmp_path):
    (tmp_path / "metrics").mkdir()
    for mode, top1 in (("none", 0.9), ("mixed", 0.95)):
        (tmp_path / "metrics" / f"student-{mode}.json").write_text(json.dumps({"top1": top1}))
    assert set(read_mode_metrics(tmp_path / "metrics")) == {"none", "mixed"}
    assert mode_groups(read_mode_metrics(tmp_path / "metrics"), "top1")[0]["stats"]["mixed"]["mean"] == 0.95
    out = run_bkd(["compare", "--metrics-dir", "metrics", "--plot", "modes.png"], tmp_path)
    assert "0.9500" in out.stdout and (tmp_path / "modes.png").is_file()
    proc = run_bkd(["compare", "--metrics-dir", "nothing"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("bkd: error:")
    for extra in ([], ["--json"]):  # a metric no file holds is an error, not an empty table
        proc = run_bkd(["compare", "--metrics-dir", "metrics", "--metric", "nosuch", *extra], tmp_path, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stdout == ""
        assert "--metric 'nosuch'" in proc.stderr and "top1" in proc.stderr


@pytest.mark.parametrize("content, fragment", [
    ('{"top1": "x"}', "student-kd.json: top1 is 'x', not a number"),
    ("[1, 2]", "student-kd.json: not a metrics JSON file (an object of metrics expected, found a list)"),
])
def test_a_metrics_file_of_the_wrong_shape_is_one_line(tmp_path, content, fragment):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "student-none.json").write_text(json.dumps({"top1": 0.9}))
    (tmp_path / "metrics" / "student-kd.json").write_text(content)
    proc = run_bkd(["compare", "--metrics-dir", "metrics"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and fragment in proc.stderr, proc.stderr
