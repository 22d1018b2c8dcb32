"""The benchmark suite's own machinery (its timings are not tested: speed lives in benchmarks)."""

from __future__ import annotations

import numpy as np

from benchmarks.__main__ import _store_size
from benchmarks.common import peak_rss_mb, reset_peak_rss
from benchmarks.reader import stream, tile_store
from pipeline.targets import TeacherTargets, store_info
from tests.test_store import build_store


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


def test_peak_rss_reset_then_growth():
    base = reset_peak_rss()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    assert peak_rss_mb() - base > 50
    del block


def test_store_size_ratio_against_raw_float32(tmp_path):
    build_store(tmp_path / "s.zarr")
    info = store_info(tmp_path / "s.zarr")
    size = _store_size(info)
    assert size["raw_float32_bytes"] == (12 + 10) * 4  # 12-d features + 10 logits, float32
    assert size["ratio"] == info["bytes_per_sample_view"] / size["raw_float32_bytes"]
    assert "float16 features" in size["codec"] and "Zstd" in size["codec"]
