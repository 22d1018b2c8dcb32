"""`bkd compare`: experiments that differ only in their seed are one group, reported as mean ± sd."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from pipeline import compare
from pipeline.compare import format_table, group_over_seeds, mode_groups, plot_groups, read_mode_metrics
from pipeline.errors import BkdError
from tests.helpers import REPO, assert_one_line, run_bkd


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


def _strict_json(text):
    """`text` parsed as RFC 8259 JSON: NaN, Infinity and -Infinity are refused."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def _workspace(tmp_path, **files):
    """metrics/student-MODE.json for each MODE=content (a dict as JSON, a string as written)."""
    (tmp_path / "metrics").mkdir()
    for mode, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (tmp_path / "metrics" / f"student-{mode}.json").write_text(text)


@pytest.mark.parametrize("written", ["NaN", "Infinity", "-Infinity", "1e400", "-0.5", "95.0", "1.0000001",
                                     "1" + "0" * 400])
@pytest.mark.parametrize("extra", [[], ["--json"], ["--plot", "p.png"]])
def test_a_metric_out_of_range_or_not_finite_is_refused_naming_file_metric_and_value(tmp_path, written, extra):
    """top1 is a fraction: a NaN, an infinity (written or overflowing, 1e400), a negative or a percentage is
    refused before anything is printed or drawn."""
    _workspace(tmp_path, none={"top1": 0.9}, kd=f'{{"top1": {written}, "top5": 0.99}}')
    proc = run_bkd(["compare", "--metrics-dir", "metrics", *extra], tmp_path, check=False)
    shown = written if len(written) < 40 else written[:20]
    assert_one_line(proc.returncode, proc.stderr, f"metrics/student-kd.json: top1 is {shown}")
    assert proc.stdout == "" and not (tmp_path / "p.png").exists()
    if written == "95.0":
        assert "not a fraction in [0, 1]; 95 % is 0.95" in proc.stderr


@pytest.mark.parametrize("metric, value, fragment", [
    ("firing_rate", 1.5, "firing_rate is 1.5, not a fraction in [0, 1]"),
    ("best_top1", -0.1, "best_top1 is -0.1, not a fraction in [0, 1]"),
    ("val_accuracy", 2.0, "val_accuracy is 2.0, not a fraction in [0, 1]"),
    ("sops_per_sample", -3.0, "sops_per_sample is -3.0, not >= 0"),
    ("train_seconds", -1, "train_seconds is -1, not >= 0"),
    ("train_loss", -0.5, "train_loss is -0.5, not >= 0"),
])
def test_each_metric_is_checked_against_its_own_range(tmp_path, metric, value, fragment):
    _workspace(tmp_path, none={"top1": 0.9, metric: value})
    proc = run_bkd(["compare", "--metric", metric], tmp_path, check=False)
    assert_one_line(proc.returncode, proc.stderr, f"metrics/student-none.json: {fragment}")


def test_fraction_bounds_and_unbounded_metrics_are_accepted(tmp_path):
    """0 and 1 are fractions; a count is any finite number >= 0 and is drawn on its own scale."""
    _workspace(tmp_path, none={"top1": 0.0, "sops_per_sample": 4.5e5, "delta": -2.5},
               mixed={"top1": 1, "sops_per_sample": 5.1e5, "delta": 3.0})
    assert "1.0000" in run_bkd(["compare"], tmp_path).stdout
    out = run_bkd(["compare", "--metric", "sops_per_sample", "--plot", "sops.png"], tmp_path).stdout
    assert "450000.0000" in out and (tmp_path / "sops.png").read_bytes()[:4] == b"\x89PNG"
    assert "-2.5000" in run_bkd(["compare", "--metric", "delta"], tmp_path).stdout  # no known range: finite


def test_one_seed_json_is_strict_and_the_table_marks_the_missing_sd(tmp_path):
    """One value per mode has no sd: null in JSON (never NaN, which no strict parser reads), `—` in the
    table with a note, and no error bar in the plot."""
    _workspace(tmp_path, none={"top1": 0.9}, mixed={"top1": 0.95})
    proc = run_bkd(["compare", "--json"], tmp_path)
    assert "NaN" not in proc.stdout
    (group,) = _strict_json(proc.stdout)
    assert group["split"] == "test"
    assert group["stats"] == {"none": {"n": 1, "mean": 0.9, "sd": None}, "mixed": {"n": 1, "mean": 0.95, "sd": None}}
    table = run_bkd(["compare", "--plot", "p.png"], tmp_path).stdout
    assert "0.9500 ± — (1)" in table and "— : one value (n = 1), no sd" in table and "nan" not in table
    assert (tmp_path / "p.png").is_file()


def test_the_plot_names_the_split_and_draws_no_error_bar_for_one_value(tmp_path, monkeypatch):
    from matplotlib.container import BarContainer

    import pipeline.checkpoint

    drawn = []
    monkeypatch.setattr(pipeline.checkpoint, "save_png", lambda fig, path: drawn.append(fig.axes[0]))
    groups = mode_groups({"none": {"top1": 0.9, "split": "validation"}, "mixed": {"top1": 0.95, "split": "validation"}},
                         "top1")
    plot_groups(groups, "top1", tmp_path / "p.png", "t")
    rows = [_row("a", 0, 0.15, 0.90, 0.91), _row("b", 1, 0.15, 0.92, 0.95), _row("d", 0, 0.3, 0.90, 0.80)]
    plot_groups(group_over_seeds(rows), "top1", tmp_path / "q.png", "t")
    one, several = drawn
    errorbars = lambda ax: [bars.errorbar is not None for bars in ax.containers  # noqa: E731
                            if isinstance(bars, BarContainer)]
    assert one.get_title() == "t\n(one seed: no sd, no error bar)" and one.get_ylabel() == "validation top1"
    assert errorbars(one) == [False]
    assert several.get_title() == "t\n(no error bar: one seed, no sd)"
    assert errorbars(several) == [True, False]  # blur 0.15: two seeds; blur 0.3: one


def test_experiments_json_is_strict_with_one_and_several_seeds(tmp_path):
    rows = [_row("a", 0, 0.15, 0.90, 0.91), _row("b", 1, 0.15, 0.92, 0.95), _row("d", 0, 0.3, 0.90, 0.80)]
    groups = group_over_seeds(rows)
    parsed = {g["params"]["student.bkd.blur_ratio"]: g for g in _strict_json(compare.to_json(groups))}
    assert parsed[0.3]["stats"]["mixed"] == {"n": 1, "mean": 0.8, "sd": None}
    assert parsed[0.15]["stats"]["mixed"]["sd"] == pytest.approx(statistics.stdev([0.91, 0.95]))
    table = format_table(groups, "top1")
    assert "0.8000 ± — (1)" in table and "0.9300 ± 0.0283 (2)" in table
    groups[0]["params"]["odd"] = math.inf  # a parameter value that JSON cannot spell: written as text
    assert _strict_json(compare.to_json(groups))[0]["params"]["odd"] == "inf"


def _experiments(monkeypatch, tmp_path, records):
    import dvc.api

    (tmp_path / "params.yaml").write_text("seed: 0\ndata: {holdout: 0}\nstudent:\n  bkd: {blur_ratio: 0.15}\n")
    monkeypatch.setattr(dvc.api, "exp_show", lambda repo=None: records)


def _record(name, seed, top1, split=None, holdout=0, mode="mixed"):
    record = {"Experiment": name, "rev": name, "seed": seed, "data.holdout": float(holdout),
              "student.bkd.blur_ratio": 0.15, f"metrics/student-{mode}.json:top1": top1}
    if split is not None:
        record[f"metrics/student-{mode}.json:split"] = split
    return record


@pytest.mark.parametrize("value, fragment", [
    (math.nan, "experiment exp-2: metrics/student-mixed.json: top1 is nan, not a finite number"),
    (math.inf, "experiment exp-2: metrics/student-mixed.json: top1 is inf, not a finite number"),
    (95.0, "experiment exp-2: metrics/student-mixed.json: top1 is 95.0, not a fraction in [0, 1]"),
    ("x", "experiment exp-2: metrics/student-mixed.json: top1 is 'x', not a number"),
])
def test_an_experiment_metric_out_of_range_is_refused_naming_the_experiment(tmp_path, monkeypatch, value, fragment):
    _experiments(monkeypatch, tmp_path, [_record("exp-1", 0, 0.9), _record("exp-2", 1, value)])
    proc = run_bkd(["compare", "--experiments", "--json"], tmp_path, check=False)
    assert_one_line(proc.returncode, proc.stderr, fragment)
    assert proc.stdout == ""


def test_modes_scored_on_different_splits_are_refused_unless_one_is_chosen(tmp_path):
    """A metrics file without `split` scored the test split; one scored on data.holdout's validation rows
    is never put in the same table."""
    _workspace(tmp_path, none={"top1": 0.9}, kd={"top1": 0.91, "split": "test"},
               mixed={"top1": 0.95, "split": "validation"})
    for extra in ([], ["--json"], ["--plot", "p.png"]):
        proc = run_bkd(["compare", *extra], tmp_path, check=False)
        assert_one_line(proc.returncode, proc.stderr, "the student metrics in metrics were scored on different "
                        "splits (test: none, kd; validation: mixed)", "--split test or --split validation")
        assert proc.stdout == "" and not (tmp_path / "p.png").exists()
    (group,) = _strict_json(run_bkd(["compare", "--split", "validation", "--json"], tmp_path).stdout)
    assert group["split"] == "validation" and set(group["stats"]) == {"mixed"}
    table = run_bkd(["compare", "--split", "test"], tmp_path).stdout
    assert table.startswith("top1 on the test split") and "kd top1" in table and "mixed" not in table
    validation = run_bkd(["compare", "--split", "validation"], tmp_path).stdout
    assert validation.startswith("top1 on validation rows (data.holdout), not the test split")


def test_a_split_no_run_was_scored_on_or_an_unknown_split_is_refused(tmp_path):
    _workspace(tmp_path, none={"top1": 0.9}, mixed={"top1": 0.95})
    proc = run_bkd(["compare", "--split", "validation"], tmp_path, check=False)
    assert_one_line(proc.returncode, proc.stderr, "none of the student metrics in metrics was scored on the "
                    "validation split (only on test)")
    proc = run_bkd(["compare", "--split", "train"], tmp_path, check=False)
    assert_one_line(proc.returncode, proc.stderr, "'train' is not one of 'test', 'validation'")
    (tmp_path / "metrics" / "student-kd.json").write_text(json.dumps({"top1": 0.9, "split": "train"}))
    proc = run_bkd(["compare"], tmp_path, check=False)
    assert_one_line(proc.returncode, proc.stderr, "metrics/student-kd.json: split is 'train', not one of test, "
                    "validation")


def test_experiments_scored_on_different_splits_are_refused_unless_one_is_chosen(tmp_path, monkeypatch):
    """An experiment's split is its metrics' `split`, or for metrics written before it was recorded, its
    data.holdout: a sweep on validation rows beside a baseline on the test split is no one table."""
    records = [_record("base", 0, 0.93), _record("exp-1", 1, 0.94, split="test"),
               _record("exp-2", 0, 0.91, split="validation", holdout=1000),
               _record("exp-3", 1, 0.92, holdout=1000)]  # older metrics: the split from data.holdout
    _experiments(monkeypatch, tmp_path, records)
    proc = run_bkd(["compare", "--experiments"], tmp_path, check=False)
    assert_one_line(proc.returncode, proc.stderr, "the DVC experiments were scored on different splits "
                    "(test: base, exp-1; validation: exp-2, exp-3)", "--split test or --split validation")
    groups = {g["split"]: g for split in ("test", "validation") for g in _strict_json(
        run_bkd(["compare", "--experiments", "--split", split, "--json"], tmp_path).stdout)}
    assert groups["test"]["names"] == ["base", "exp-1"] and groups["validation"]["names"] == ["exp-2", "exp-3"]
    assert groups["validation"]["stats"]["mixed"]["mean"] == pytest.approx(0.915)
    out = run_bkd(["compare", "--experiments", "--split", "validation", "--plot", "v.png"], tmp_path).stdout
    assert out.startswith("top1 on validation rows") and (tmp_path / "v.png").is_file()
    records[1]["metrics/student-mixed.json:split"] = "holdout"
    proc = run_bkd(["compare", "--experiments", "--split", "test"], tmp_path, check=False)
    assert_one_line(proc.returncode, proc.stderr, "experiment exp-1: metrics/student-mixed.json: split is 'holdout'")


def test_a_deeply_nested_file_a_non_number_and_an_empty_or_foreign_plot_are_one_line(tmp_path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "student-kd.json").write_text('{"top1": 0.5, "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    deep = run_bkd(["compare", "--metrics-dir", str(metrics)], tmp_path, check=False)
    assert_one_line(deep.returncode, deep.stderr, "student-kd.json: not a metrics JSON file")

    (metrics / "student-kd.json").write_text(json.dumps({"top1": "0.5"}))
    named = run_bkd(["compare", "--metrics-dir", str(metrics)], tmp_path, check=False)
    assert_one_line(named.returncode, named.stderr, "student-kd.json: top1 is '0.5', not a number")

    (metrics / "student-kd.json").write_text(json.dumps({"top1": 0.5}))
    empty = run_bkd(["compare", "--metrics-dir", str(metrics), "--plot", ""], tmp_path, check=False)
    assert_one_line(empty.returncode, empty.stderr, "--plot is empty")
    (tmp_path / "mine.png").write_text("my notes")
    foreign = run_bkd(["compare", "--metrics-dir", str(metrics), "--plot", str(tmp_path / "mine.png")], tmp_path,
                      check=False)
    assert_one_line(foreign.returncode, foreign.stderr, "is not a plot bkd wrote", "choose another path")
    assert foreign.stdout == "" and (tmp_path / "mine.png").read_text() == "my notes"  # refused before the table
