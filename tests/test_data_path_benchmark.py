"""The data-path benchmark (benchmarks.data_path) end to end at its --quick sizes: every figure is there and
the JPEG folder is what it says. Speed itself is not tested: it lives in benchmarks/results-data-path.json."""

from __future__ import annotations

import json

from PIL import Image

from benchmarks import data_path


def test_quick_run_reports_every_figure(tmp_path, capsys):
    out = tmp_path / "data-path.json"
    r = data_path.main(["--quick", "--json", str(out), "--cache", str(tmp_path / "cache")])
    assert json.loads(out.read_text())["size"] == "quick"

    folder = r["folder"]  # ImageNet-like JPEGs: 500x375 or 375x500, the quality nearest a 110 kB mean
    files = sorted((tmp_path / "cache").glob("*/train/*/*.JPEG"))
    assert len(files) == folder["train_images"] == 10 and len(list((tmp_path / "cache").glob("*/val/*/*.JPEG"))) == 10
    for path in files[:4]:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size in data_path.IMAGE_SIZES
    assert folder["quality"] in data_path.QUALITIES and 0.75 < folder["mean_bytes"] / data_path.TARGET_BYTES < 1.25

    ex = r["extraction"]
    assert set(ex["loader"]) == set(ex["end_to_end"]) == {"1", "2"}
    assert all(ex["loader"][w]["views_per_s"] > 0 and ex["end_to_end"][w]["views_per_s"] > 0 for w in ("1", "2"))
    assert ex["consumer"]["views_per_s"] > 0 and ex["host_to_device"]["bytes_per_view"] > 0

    st = r["student"]
    assert set(st["loader"]) == set(st["loader/consumer"]) == {"0", "1", "2"}
    assert all(v["samples_per_s"] > 0 and v["bytes_per_sample"] > 0 for v in st["loader"].values())
    assert st["consumer"]["samples_per_s"] > 0 and st["consumer"]["model"] == "sew_resnet18"

    row, recipe = r["stage_split"]["row"], r["stage_split"]["recipe"]
    assert not row["notes"] and not recipe["notes"]  # every piece measurable on this code
    for stage in ("read/decompress: target chunk (K views)", "read/decompress: image block",
                  "JPEG decode (extraction side, once per image)", "crop/resize", "normalization",
                  "collate + worker-to-trainer copy (shared memory)", "view build in the loader (host), whole"):
        assert row["stages_cpu_ms_per_sample"][stage] > 0, stage
    for stage in ("RandAugment", "erasing", "mixing (partner view + blend)"):
        assert row["stages_cpu_ms_per_sample"][stage] is None and recipe["stages_cpu_ms_per_sample"][stage] > 0
    assert row["loader_total_cpu_ms_per_sample"] > 0 and row["host_to_device_bytes_per_sample"] > 0

    estimate = r["workers_per_gpu"]["rows"]["imagenet-sew-resnet18.yaml"]
    assert estimate["student_workers_per_gpu"] > 0 and estimate["extraction_workers_per_gpu"] > 0
    assert r["machine"]["cpu_model"] and r["machine"]["torch_version"]

    table = capsys.readouterr().out
    for heading in ("A. extraction", "B. student", "C. stage split", "D. loader workers per GPU -- ESTIMATE"):
        assert heading in table
