"""The sharded Zarr v3 teacher-target store, written and read with pipeline.targets directly."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import StoreError
from pipeline.targets import FORMAT, SplitLayout, StoreWriter, TeacherTargets, store_info, verify_store
from tests.helpers import (CHUNK, CLASSES, DIM, N_TEST, N_TRAIN, PER_SHARD, TOPK, VIEWS, build_store,
                           build_topk_store, make_arrays, make_test_spec, open_writer, write_split)


def make_test_manifest(**kwargs) -> dict:
    return make_test_spec(**kwargs).to_manifest()


def layouts(n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict[str, SplitLayout]:
    return {split: SplitLayout(n, CHUNK, PER_SHARD, VIEWS[split])
            for split, n in (("train", n_train), ("test", n_test))}


def test_layout_last_shard_is_partial():
    lay = SplitLayout(N_TRAIN, CHUNK, PER_SHARD)
    assert lay.shard_size == 128
    assert lay.num_shards == 3 and lay.num_chunks == 5
    assert lay.shard_rows(0) == (0, 128)
    assert lay.shard_rows(2) == (256, 300)


def test_round_trip_values(tmp_path):
    path = tmp_path / "s.zarr"
    data = build_store(path)
    for split in ("train", "test"):
        targets = TeacherTargets(path, split)
        n = len(data[split]["labels"])
        assert len(targets) == n
        assert targets.feature_shapes == {"pre_logits": (DIM,)} and targets.chunk_size == CHUNK
        rows = targets.read_rows(0, n)
        assert rows["features.pre_logits"].dtype == np.float16 and rows["logits"].dtype == np.float16
        np.testing.assert_array_equal(rows["features.pre_logits"], data[split]["features.pre_logits"].astype(np.float16))
        np.testing.assert_array_equal(rows["logits"], data[split]["logits"].astype(np.float16))
        np.testing.assert_array_equal(rows["labels"], data[split]["labels"])
        np.testing.assert_array_equal(rows["index"], np.arange(n))
        # chunk reads cover the split, the last chunk is partial
        chunks = [targets.read_chunk(c) for c in range(targets.layout.num_chunks)]
        assert all(len(c["labels"]) == CHUNK for c in chunks[:-1])
        assert len(chunks[-1]["labels"]) == n - CHUNK * (len(chunks) - 1)
        np.testing.assert_array_equal(np.concatenate([c["features.pre_logits"] for c in chunks]), rows["features.pre_logits"])


def test_complete_only_after_finish(tmp_path):
    path = tmp_path / "s.zarr"
    writer = open_writer(path)
    data = make_arrays(N_TRAIN, 0, VIEWS["train"])
    assert store_info(path)["complete"] is False
    write_split(writer, "train", data)
    write_split(writer, "test", make_arrays(N_TEST, 1), shards=[0])  # test split has 2 shards; shard 1 missing
    assert store_info(path)["complete"] is False
    assert writer.missing_shards("test") == [1]
    with pytest.raises(StoreError, match="missing"):
        writer.finish()
    assert store_info(path)["complete"] is False
    # an incomplete store is refused for training
    with pytest.raises(StoreError, match="incomplete"):
        TeacherTargets(path, "train")
    # but can be inspected
    assert len(TeacherTargets(path, "train", require_complete=False)) == N_TRAIN

    write_split(writer, "test", make_arrays(N_TEST, 1), shards=[1])
    writer.finish()
    assert store_info(path)["complete"] is True
    TeacherTargets(path, "train")  # now accepted


def test_store_info_progress_and_bytes(tmp_path):
    path = tmp_path / "s.zarr"
    writer = open_writer(path)
    info = store_info(path)
    assert info["splits"]["train"] == {"samples": N_TRAIN, "views": 3, "shards_complete": 0, "shards_total": 3}
    assert info["splits"]["test"] == {"samples": N_TEST, "views": 1, "shards_complete": 0, "shards_total": 2}
    assert info["views"] == VIEWS
    before = info["bytes_on_disk"]

    write_split(writer, "train", make_arrays(N_TRAIN, 0, VIEWS["train"]), shards=[0, 2])
    info = store_info(path)
    assert info["splits"]["train"]["shards_complete"] == 2
    assert info["splits"]["test"]["shards_complete"] == 0
    assert info["bytes_on_disk"] > before
    total = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    assert info["bytes_on_disk"] == total
    assert info["bytes_per_sample"] == pytest.approx(total / (N_TRAIN + N_TEST))
    assert info["manifest"]["chunking"] == {"chunk_size": CHUNK, "chunks_per_shard": PER_SHARD}


def test_arrays_are_sharded_and_zstd_compressed(tmp_path):
    path = tmp_path / "s.zarr"
    build_store(path)
    targets = TeacherTargets(path, "train")
    for name, arr in targets.arrays.items():
        assert arr.chunks[0] == CHUNK, name
        assert arr.shards is not None and arr.shards[0] == CHUNK * PER_SHARD, name
        assert any(type(c).__name__ == "ZstdCodec" for c in arr.compressors), name

    meta = json.loads((Path(path) / "train" / "features.pre_logits" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [CHUNK * PER_SHARD, VIEWS["train"], DIM]
    (sharding,) = [c for c in meta["codecs"] if c["name"] == "sharding_indexed"]
    assert sharding["configuration"]["chunk_shape"] == [CHUNK, VIEWS["train"], DIM]
    inner = {c["name"]: c.get("configuration", {}) for c in sharding["configuration"]["codecs"]}
    assert inner["zstd"]["level"] == 3 and inner["zstd"]["checksum"] is True

    # one object per shard (3), not per chunk (5)
    files = [f for f in (Path(path) / "train" / "features.pre_logits" / "c").rglob("*") if f.is_file()]
    assert len(files) == 3


def _shard_files(path: Path, split: str, array: str) -> list[Path]:
    found = []
    for root, _, files in os.walk(path / split / array / "c"):
        found += [Path(root) / f for f in files]
    return sorted(found)


def test_verify_store_clean(tmp_path):
    path = tmp_path / "s.zarr"
    build_store(path)
    results = list(verify_store(path))
    assert sorted((s, i) for s, i, _ in results) == [("test", 0), ("test", 1), ("train", 0), ("train", 1), ("train", 2)]
    assert all(problem is None for _, _, problem in results)


def test_verify_store_flags_corrupted_shard(tmp_path):
    path = tmp_path / "s.zarr"
    build_store(path)
    files = _shard_files(path, "train", "features.pre_logits")
    # chunk key c/<shard>/0: pick shard 1
    victim = [f for f in files if f.relative_to(path / "train" / "features.pre_logits" / "c").parts[0] == "1"]
    assert len(victim) == 1
    victim = victim[0]
    raw = bytearray(victim.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 16] = bytes(b ^ 0xFF for b in raw[middle:middle + 16])
    victim.write_bytes(bytes(raw))

    problems = {(s, i): p for s, i, p in verify_store(path)}
    assert problems[("train", 1)] is not None
    assert "shard 1" in problems[("train", 1)] or "rows 128:256" in problems[("train", 1)]
    assert problems[("train", 0)] is None and problems[("train", 2)] is None
    assert problems[("test", 0)] is None and problems[("test", 1)] is None
    # reading the damaged rows for training fails with a StoreError, not garbage
    with pytest.raises(StoreError):
        TeacherTargets(path, "train").read_rows(128, 256)


def test_verify_store_flags_non_finite_and_incomplete(tmp_path):
    path = tmp_path / "s.zarr"
    writer = open_writer(path)
    data = make_arrays(N_TRAIN, 0, VIEWS["train"])
    data["features.pre_logits"][270, 1, 3] = np.nan  # shard 2
    write_split(writer, "train", data)
    write_split(writer, "test", make_arrays(N_TEST, 1), shards=[1])
    problems = {(s, i): p for s, i, p in verify_store(path)}
    assert problems[("train", 2)] == "non-finite teacher features (features.pre_logits)"
    assert problems[("train", 0)] is None and problems[("train", 1)] is None
    assert "not written" in problems[("test", 0)]
    assert problems[("test", 1)] is None


def test_verify_store_flags_bad_logits_and_labels(tmp_path):
    path = tmp_path / "s.zarr"
    writer = open_writer(path)
    data = make_arrays(N_TRAIN, 0, VIEWS["train"])
    data["logits"][5, 0] = np.inf  # shard 0
    data["labels"][200] = CLASSES  # shard 1
    write_split(writer, "train", data)
    problems = {(s, i): p for s, i, p in verify_store(path)}
    assert problems[("train", 0)] == "non-finite logits"
    assert "labels outside" in problems[("train", 1)]
    assert problems[("train", 2)] is None


def test_check_matches(tmp_path):
    path = tmp_path / "s.zarr"
    build_store(path)
    targets = TeacherTargets(path, "train")
    same = make_test_manifest()
    targets.check_matches(same)  # the identity it was built with is accepted

    other_sha = make_test_manifest(sha="b" * 64)
    with pytest.raises(StoreError) as info:
        targets.check_matches(other_sha)
    assert "teacher.checkpoint_sha256" in str(info.value)
    assert "b" * 64 in str(info.value)

    other_split = make_test_manifest(fingerprints={"train": "other", "test": "f-test"})
    with pytest.raises(StoreError) as info:
        targets.check_matches(other_split)
    assert "splits.train.fingerprint" in str(info.value)

    other_transform = copy.deepcopy(same)
    other_transform["transform"]["mean"] = [0.5]
    with pytest.raises(StoreError, match="transform"):
        targets.check_matches(other_transform)

    other_model = copy.deepcopy(same)
    other_model["teacher"]["model"] = "resnet34"
    with pytest.raises(StoreError, match="teacher.model"):
        targets.check_matches(other_model)

    # the test split is checked against its own fingerprint
    test_targets = TeacherTargets(path, "test")
    test_targets.check_matches(other_split)  # only the train fingerprint differs
    with pytest.raises(StoreError, match="splits.test.fingerprint"):
        test_targets.check_matches(make_test_manifest(fingerprints={"train": "f-train", "test": "x"}))


def test_unknown_split_and_missing_store(tmp_path):
    path = tmp_path / "s.zarr"
    with pytest.raises(StoreError, match="not found"):
        TeacherTargets(path, "train")
    build_store(path)
    with pytest.raises(StoreError, match="val"):
        TeacherTargets(path, "val")


def test_writer_refuses_other_identity_unless_overwrite(tmp_path):
    path = tmp_path / "s.zarr"
    writer = open_writer(path)
    write_split(writer, "train", make_arrays(N_TRAIN, 0, VIEWS["train"]), shards=[0])

    with pytest.raises(StoreError, match="another run"):
        open_writer(path, spec=make_test_spec(sha="c" * 64))
    # the refused attempt did not touch the store
    assert store_info(path)["splits"]["train"]["shards_complete"] == 1

    replaced = open_writer(path, spec=make_test_spec(sha="c" * 64), overwrite=True)
    assert replaced.missing_shards("train") == [0, 1, 2]
    assert store_info(path)["manifest"]["teacher"]["checkpoint_sha256"] == "c" * 64


def test_writer_resume_keeps_completed_shards(tmp_path):
    path = tmp_path / "s.zarr"
    data = make_arrays(N_TRAIN, 0, VIEWS["train"])
    writer = open_writer(path)
    assert writer.missing_shards("train") == [0, 1, 2]
    write_split(writer, "train", data, shards=[0, 2])
    del writer  # "crash"

    resumed = open_writer(path, spec=make_test_spec())  # same identity, new timestamp
    assert resumed.missing_shards("train") == [1]
    assert resumed.missing_shards("test") == [0, 1]
    write_split(resumed, "train", data, shards=[1])
    write_split(resumed, "test", make_arrays(N_TEST, 1))
    resumed.finish()
    rows = TeacherTargets(path, "train").read_rows(0, N_TRAIN)
    np.testing.assert_array_equal(rows["features.pre_logits"], data["features.pre_logits"].astype(np.float16))


@pytest.mark.filterwarnings("ignore:Object at zarr.:UserWarning")  # zarr, listing the group with the temp file
def test_another_writers_file_in_flight_is_the_stores_own(tmp_path):
    """zarr writes each object to a uuid-named temp file and renames it into place: a writer opening
    the store meanwhile (or after such a write was killed) sees that file. It is bkd's, so the store
    resumes and --overwrite removes it; a file named like one but not a bkd object is still refused."""
    path = tmp_path / "s.zarr"
    data = make_arrays(N_TRAIN, 0, VIEWS["train"])
    write_split(open_writer(path), "train", data, shards=[0])
    in_flight = path / "train" / "index" / "c" / f"1.{'0123456789abcdef' * 2}.partial"
    in_flight.write_bytes(b"half a chunk")
    (path / "train" / f"zarr.{'f' * 32}.partial").write_bytes(b"{")

    resumed = open_writer(path)
    assert resumed.missing_shards("train") == [1, 2]
    open_writer(path, overwrite=True)
    assert not in_flight.exists()

    notes = path / "train" / "index" / "c" / f"notes.{'0' * 32}.partial"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    with pytest.raises(StoreError, match="which bkd did not write"):
        open_writer(path)
    assert notes.read_text() == "mine"


@pytest.mark.filterwarnings("ignore:Object at stray.txt:UserWarning")
def test_attached_writer_adds_shards_without_listing_the_store(tmp_path):
    path = tmp_path / "s.zarr"
    data = make_arrays(N_TRAIN, 0, VIEWS["train"])
    planner = open_writer(path)
    (path / "train" / "stray.txt").write_text("listing the folder would refuse this")
    worker = StoreWriter.attach(path, make_test_spec())
    write_split(worker, "train", data, shards=[1])
    assert planner.missing_shards("train") == [0, 2]

    with pytest.raises(StoreError, match="not the store this run opened"):
        StoreWriter.attach(path, make_test_spec(sha="c" * 64))


def test_write_shard_rejects_wrong_row_count(tmp_path):
    writer = open_writer(tmp_path / "s.zarr")
    data = make_arrays(100, 0)
    with pytest.raises(ValueError, match="rows"):
        writer.write_shard("train", 0, data)  # shard 0 holds 128 rows
    assert writer.missing_shards("train") == [0, 1, 2]


def test_topk_store_round_trip_holds_what_the_losses_need(tmp_path):
    from pipeline.targets import TOPK_ARRAYS, TOPK_INDEX, TOPK_TAIL, TOPK_TARGET, TOPK_TARGET_CLASS

    path = tmp_path / "topk.zarr"
    full = build_topk_store(path)
    info = store_info(path)
    assert {name: info["manifest"]["arrays"][name] for name in TOPK_ARRAYS} == {
        TOPK_INDEX: "int32", TOPK_TARGET_CLASS: "int32", TOPK_TARGET: "float32", TOPK_TAIL: "float32"}
    assert all(problem is None for *_, problem in verify_store(path))
    targets = TeacherTargets(path, "train")
    raw = {name: targets.arrays[name][:] for name in TOPK_ARRAYS}
    z, classes = full["train"]["logits"].astype(np.float64), full["train"]["targets"]
    assert raw[TOPK_INDEX].shape == (N_TRAIN, VIEWS["train"], TOPK)
    np.testing.assert_array_equal(raw[TOPK_TARGET_CLASS], classes)
    np.testing.assert_array_equal(raw[TOPK_TARGET], np.take_along_axis(z, classes, -1).astype(np.float32))
    tail = np.ones(z.shape, bool)  # an independent tail: outside the top k and the target classes
    np.put_along_axis(tail, np.argsort(-z, -1)[..., :TOPK], False, -1)
    np.put_along_axis(tail, classes, False, -1)
    np.testing.assert_allclose(raw[TOPK_TAIL][..., 0], np.log(np.where(tail, np.exp(z), 0).sum(-1)), rtol=1e-6)
    np.testing.assert_allclose(raw[TOPK_TAIL][..., 1], np.where(tail, z, 0).sum(-1), rtol=1e-5, atol=1e-4)

    rows = targets.read_rows(0, N_TRAIN)
    assert not set(TOPK_ARRAYS) & set(rows) and rows["logits"].shape == (N_TRAIN, VIEWS["train"], CLASSES)
    dense = rows["logits"].astype(np.float64)
    np.testing.assert_array_equal(np.take_along_axis(dense, classes, -1), raw[TOPK_TARGET])  # exactly
    kept = np.take_along_axis(dense, raw[TOPK_INDEX].astype(np.int64), -1)
    on_target = (raw[TOPK_INDEX][..., None] == classes[..., None, :]).any(-1)
    np.testing.assert_array_equal(kept[~on_target], logits16(z)[~on_target])
    # the row's log-sum-exp and sum: exact up to the float16 top k; hence CE(z_t, y) and smoothed CE
    lse = lambda x: np.log(np.exp(x).sum(-1))  # noqa: E731
    np.testing.assert_allclose(lse(dense), lse(z), atol=1e-2)  # float16 at ~20: 0.008
    np.testing.assert_allclose(dense.sum(-1), z.sum(-1), atol=5e-2)
    ce = lse(dense)[:, :, None] - np.take_along_axis(dense, classes, -1)
    np.testing.assert_allclose(ce, lse(z)[:, :, None] - np.take_along_axis(z, classes, -1), atol=1e-2)
    assert (dense.argmax(-1) == z.argmax(-1)).all()


def logits16(z: np.ndarray) -> np.ndarray:
    """The top-k logits as a float16 store keeps them."""
    return np.take_along_axis(z, np.argsort(-z, -1)[..., :TOPK], -1).astype(np.float16).astype(np.float64)


def test_dense_logits_are_exact_where_the_losses_need_them():
    """float32 top k: the rebuilt row's log-sum-exp, sum and target logits are the full row's."""
    from pipeline.targets import dense_logits, topk_arrays

    rng = np.random.default_rng(3)
    for classes, k in ((1000, 10), (1000, 1), (50, 49), (50, 50), (7, 5)):
        z = rng.standard_normal((40, 2, classes)) * 3
        z[:, :, :4] += 12  # runners-up outside the top k
        targets = rng.integers(0, classes, (40, 2, 2))
        kept = topk_arrays(z, k, targets)
        dense = dense_logits(kept.pop("logits"), num_classes=classes, **{
            "indices": kept["logits_index"], "target_classes": kept["logits_target_class"],
            "target_logits": kept["logits_target"], "tail": kept["logits_tail"]}).astype(np.float64)
        lse = lambda x: np.log(np.exp(x).sum(-1))  # noqa: E731
        np.testing.assert_allclose(lse(dense), lse(z), atol=2e-5)
        np.testing.assert_allclose(dense.sum(-1), z.sum(-1), rtol=1e-5, atol=1e-2)
        np.testing.assert_allclose(np.take_along_axis(dense, targets, -1), np.take_along_axis(z, targets, -1),
                                   atol=1e-5)
        top = np.sort(z, -1)[..., -k:]
        np.testing.assert_allclose(np.sort(dense, -1)[..., -k:][..., -1], top[..., -1], atol=1e-5)
        assert (dense <= top[..., -1:] + 1e-4).all()  # nothing rebuilt above the top logit


def build_older_store(path, version: int, drop: tuple[str, ...] = ()) -> None:
    """A store as an older bkd left it: its manifest of format `version`, without the sections in `drop`."""
    import zarr

    build_store(path)
    root = zarr.open_group(str(path), mode="r+")
    manifest = {key: value for key, value in dict(root.attrs["manifest"]).items() if key not in drop}
    manifest["format"] = f"bkd-teacher-targets/{version}"
    root.attrs["manifest"] = manifest


def test_store_of_an_older_format_names_the_fix(tmp_path):
    build_older_store(tmp_path / "old.zarr", 1)
    with pytest.raises(StoreError, match="--overwrite"):
        TeacherTargets(tmp_path / "old.zarr", "train")


def test_store_in_the_files_row_order_is_refused_with_how_to_rebuild(tmp_path):
    """Format 5 and older kept the dataset's file order (class by class for image folders): never read
    as if shuffled, by training or by a resuming extraction."""
    path = tmp_path / "old.zarr"
    build_older_store(path, 5)
    for refuse in (lambda: TeacherTargets(path, "train"), lambda: open_writer(path)):
        with pytest.raises(StoreError) as info:
            refuse()
        message = str(info.value)
        assert "bkd-teacher-targets/5" in message and "files' order" in message and "--overwrite" in message
        assert "\n" not in message
    assert (path / "train").is_dir()  # nothing deleted


def test_store_without_a_view_layout_is_refused_with_how_to_rebuild(tmp_path):
    """Format 6 does not record augment.view_layout: its view parameters cannot be checked against the
    layout views are rebuilt from."""
    path = tmp_path / "old.zarr"
    build_older_store(path, 6)
    for refuse in (lambda: TeacherTargets(path, "train"), lambda: open_writer(path)):
        with pytest.raises(StoreError, match=r"bkd-teacher-targets/6.*augment\.view_layout.*--overwrite"):
            refuse()


def test_store_of_format_7_reads_as_its_dtypes_and_is_not_resumed(tmp_path):
    """Format 7 recorded no codecs: its arrays are its dtypes, which is what a reader takes them as.
    Extraction rebuilds rather than adds shards of another format to it."""
    path = tmp_path / "old.zarr"
    data = build_store(path)
    build_older_store(path, 7, drop=("codecs",))
    rows = TeacherTargets(path, "train").read_rows(0, N_TRAIN)
    np.testing.assert_array_equal(rows["features.pre_logits"], data["train"]["features.pre_logits"].astype(np.float16))
    assert [problem for _, _, problem in verify_store(path)] == [None] * 5
    with pytest.raises(StoreError, match=r"bkd-teacher-targets/7.*--overwrite"):
        open_writer(path)


def test_extraction_refuses_an_older_store_before_reading_any_data(tmp_path):
    """The old-format refusal comes first: no dataset listing or teacher load (hours on ImageNet) before it."""
    from pipeline.config import load_config
    from pipeline.teacher.extract import extract_teacher

    path = tmp_path / "old.zarr"
    build_older_store(path, 3, drop=("features",))  # format 3 had no features section
    cfg = load_config(None, ["data.name=imagenet", f"data.root={tmp_path / 'no-such-folder'}",
                             f"extract.store={path}", f"teacher.checkpoint={tmp_path / 'none.safetensors'}"])
    with pytest.raises(StoreError, match="format bkd-teacher-targets/3.*files' order.*--overwrite"):
        extract_teacher(cfg, torch.device("cpu"))
    with pytest.raises(StoreError, match="format bkd-teacher-targets/3.*--overwrite"):  # not 'damaged manifest'
        open_writer(path)


def test_the_contract_imports_no_data_loading_or_augmentation():
    import subprocess
    import sys

    code = ("import sys; import pipeline.targets; "
            "print(sorted(m for m in ('pipeline.data', 'pipeline.augment') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("topk", [None, TOPK])
def test_every_stored_array_belongs_to_one_field_codec(topk):
    from pipeline.targets import store_fields

    spec = make_test_spec(logits_topk=topk)
    owned = [name for field in store_fields(spec) for name in field.arrays]
    assert sorted(owned) == sorted(spec.row_arrays()) and len(owned) == len(set(owned))


def test_store_of_format_8_has_no_manifest_digest_and_reads_as_it_is(tmp_path):
    """Format 8 wrote no digest of its manifest: a reader takes it as it is; extraction rebuilds it."""
    import zarr

    path = tmp_path / "old.zarr"
    data = build_store(path)
    build_older_store(path, 8)
    root = zarr.open_group(str(path), mode="r+")
    del root.attrs["manifest_digest"]
    rows = TeacherTargets(path, "train").read_rows(0, N_TRAIN)
    np.testing.assert_array_equal(rows["labels"], data["train"]["labels"])
    assert [problem for _, _, problem in verify_store(path)] == [None] * 5
    with pytest.raises(StoreError, match=r"bkd-teacher-targets/8.*--overwrite"):
        open_writer(path)
    manifest = dict(root.attrs["manifest"])
    for digested in ("bkd-teacher-targets/9", FORMAT):  # formats that write a digest, without one
        root.attrs["manifest"] = {**manifest, "format": digested}
        with pytest.raises(StoreError, match="does not match the digest"):
            TeacherTargets(path, "train")
