"""The store's codecs: each one's round trip and error bound, and stores written and read through them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.config import STORE_CODECS
from pipeline.errors import BkdError, StoreError
from pipeline.targets import TeacherTargets, store_info, verify_store
from pipeline.targets.codecs import CODECS, CodecError, get_codec
from tests.helpers import N_TEST, N_TRAIN, VIEWS, make_arrays, make_test_spec, open_writer, write_split

MAP = (6, 4, 4)


def post_relu_maps(n: int = 40, seed: int = 0) -> np.ndarray:
    """(n, 2, C, H, W) non-negative maps with a wide spread of channel scales and all-zero channels,
    as post-ReLU stages have."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(-4, 3, (n, 2, MAP[0], 1, 1)))
    maps = np.maximum(rng.standard_normal((n, 2, *MAP)), 0) * scale
    maps[:, :, 0] = 0.0  # a dead channel
    return maps.astype(np.float32)


def test_the_config_names_every_codec_and_only_those():
    assert tuple(CODECS) == STORE_CODECS


@pytest.mark.parametrize("name", ["float16", "float16-shuffle", "float16-bitshuffle", "float32"])
def test_float_codecs_keep_their_dtype_exactly(name):
    codec = get_codec(name)
    values = post_relu_maps().astype(codec.dtype)
    codes, scales = codec.encode(values)
    assert scales is None
    np.testing.assert_array_equal(codec.decode(codes), values)


def test_bfloat16_rounds_to_nearest_with_8_bits_of_mantissa():
    codec = get_codec("bfloat16")
    values = post_relu_maps() * 3 - 1  # signed as well
    codes, _ = codec.encode(values)
    assert codes.dtype == np.uint16
    decoded = codec.decode(codes)
    assert decoded.dtype == np.float32
    assert np.all(np.abs(decoded - values) <= np.abs(values) * 2.0**-8)
    np.testing.assert_array_equal(codec.decode(codec.encode(decoded)[0]), decoded)  # idempotent


@pytest.mark.parametrize("name,signed,top", [("uint8", False, 255), ("uint7", False, 127), ("uint6", False, 63),
                                             ("uint5", False, 31), ("uint4", False, 15), ("int8", True, 127)])
def test_integer_codes_err_by_at_most_half_a_step_of_their_channel(name, signed, top):
    codec = get_codec(name)
    values = post_relu_maps()
    if signed:
        values = values - values.mean(axis=(3, 4), keepdims=True)
    codes, scales = codec.encode(values)
    assert codes.dtype == np.uint8 and scales.shape == values.shape[:3] and scales.dtype == np.float32
    assert np.abs(codes.view(np.int8) if signed else codes).max() == top  # b bits: codes up to 2^b - 1
    decoded = codec.decode(codes, scales)
    step = scales[..., None, None]
    assert np.all(np.abs(decoded - values) <= step * (0.5 + 1e-5))
    assert np.all(decoded[:, :, 0] == 0)  # an all-zero channel stays exactly zero
    peak = np.abs(values).max(axis=(3, 4))
    np.testing.assert_allclose(np.abs(decoded).max(axis=(3, 4)), peak, rtol=1e-6)  # the peak is a code


def test_float8_keeps_3_bits_of_mantissa_relative_to_the_channel_peak():
    codec = get_codec("float8")
    values = post_relu_maps() - 0.01
    codes, scales = codec.encode(values)
    decoded = codec.decode(codes, scales)
    step = scales[..., None, None]  # the scaled peak is 448; e4m3's smallest normal is 2**-6
    assert np.all(np.abs(decoded - values) <= np.maximum(np.abs(values) * 2.0**-4, step * 2.0**-7))


def test_vectors_get_one_scale_per_row():
    codec = get_codec("int8")
    values = np.random.default_rng(1).standard_normal((5, 3, 10)).astype(np.float32)
    codes, scales = codec.encode(values)
    assert scales.shape == (5, 3, 1) and codec.scale_shape((10,)) == (1,)
    assert np.all(np.abs(codec.decode(codes, scales) - values) <= scales * 0.5 + 1e-7)


@pytest.mark.parametrize("name", ["uint8", "uint5"])
def test_unsigned_codes_refuse_negative_values_naming_the_alternatives(name):
    with pytest.raises(CodecError, match="int8 or float8") as caught:
        get_codec(name).encode(-post_relu_maps() - 1)
    assert isinstance(caught.value, BkdError)  # one line at the command line


def coded_spec(codecs: dict):
    base = make_test_spec()
    features = {**base.features, "locations": {"pre_logits": base.features["locations"]["pre_logits"],
                                               "layer2": list(MAP)}}
    return dataclasses.replace(base, features=features, codecs=codecs)


def coded_arrays(n: int, seed: int, views: int = 1) -> dict[str, np.ndarray]:
    arrays = make_arrays(n, seed, views)
    rng = np.random.default_rng(seed + 10)
    arrays["features.layer2"] = (np.maximum(rng.standard_normal((n, views, *MAP)), 0) * 3).astype(np.float32)
    return arrays


def write_coded(path, codecs: dict) -> dict[str, dict]:
    writer = open_writer(path, spec=coded_spec(codecs))
    data = {"train": coded_arrays(N_TRAIN, 0, VIEWS["train"]), "test": coded_arrays(N_TEST, 1)}
    for split, arrays in data.items():
        write_split(writer, split, arrays)
    writer.finish()
    return data


def test_store_reads_back_through_each_locations_codec(tmp_path):
    path = tmp_path / "s.zarr"
    data = write_coded(path, {"layer2": "uint8", "pre_logits": "float8", "logits": "int8"})
    info = store_info(path)
    assert info["manifest"]["codecs"] == {"layer2": "uint8", "pre_logits": "float8", "logits": "int8"}
    assert info["codecs"] == {"pre_logits": "float8", "layer2": "uint8", "logits": "int8"}
    rows = TeacherTargets(path, "train").read_rows(0, N_TRAIN)
    for name, codec in (("features.layer2", "uint8"), ("features.pre_logits", "float8"), ("logits", "int8")):
        expected = get_codec(codec).decode(*get_codec(codec).encode(data["train"][name]))
        np.testing.assert_array_equal(rows[name], expected)
        assert rows[name].dtype == np.float32
    assert [problem for _, _, problem in verify_store(path)] == [None] * 5  # 3 train shards, 2 test


def test_a_tampered_scale_is_refused_like_any_other_chunk(tmp_path):
    path = tmp_path / "s.zarr"
    write_coded(path, {"layer2": "uint8"})
    import zarr

    scales = zarr.open_array(str(path / "train" / "scales.layer2"), mode="r+")
    scales[0, 0, 0] = scales[0, 0, 0] * 2
    with pytest.raises(StoreError, match="scales.layer2 does not match its digest"):
        TeacherTargets(path, "train").read_rows(0, N_TRAIN)


def test_the_codec_is_part_of_the_stores_identity(tmp_path):
    path = tmp_path / "s.zarr"
    writer = open_writer(path, spec=coded_spec({"layer2": "uint8"}))
    write_split(writer, "train", coded_arrays(N_TRAIN, 0, VIEWS["train"]), shards=[0])
    with pytest.raises(StoreError, match="codecs.layer2: 'uint8' in the store, 'int8' here"):
        open_writer(path, spec=coded_spec({"layer2": "int8"}))


# Each codec's error bound in the BKD loss (map form) and its gradient, on fixed data: dense post-ReLU
# maps and a student carrying part of them, its head fitted to the float32 targets (benchmarks.codecs).
BOUNDS = {"float32": (0, 0), "float16": (1e-4, 1e-3), "float16-shuffle": (1e-4, 1e-3),
          "float16-bitshuffle": (1e-4, 1e-3), "bfloat16": (1e-3, 1e-2), "uint8": (1e-3, 1e-2),
          "uint7": (1e-4, 1e-2), "uint6": (1e-3, 3e-2), "uint5": (3e-3, 6e-2), "uint4": (1e-2, 1.2e-1),
          "int8": (1e-3, 1e-2), "float8": (2e-2, 5e-2)}


@pytest.fixture(scope="module")
def probe():
    """Dense post-ReLU maps, a student carrying part of them, and a BKD head fitted to the float32 maps."""
    from benchmarks.codecs import BKDProbe

    rng = np.random.default_rng(0)
    target = np.maximum(rng.standard_normal((96, 16, 6, 6)), 0).astype(np.float32) * 2
    mixing = rng.standard_normal((16, 24)).astype(np.float32)
    student = np.einsum("nchw,cd->ndhw", target, mixing) + rng.standard_normal((96, 24, 6, 6)).astype(np.float32)
    return BKDProbe(student, target, "map", steps=60), target


@pytest.mark.parametrize("name", list(CODECS))
def test_each_codecs_error_in_the_bkd_loss_and_its_gradient_is_bounded(probe, name):
    from benchmarks.codecs import decoded

    fitted, target = probe
    errors = fitted.errors(decoded(get_codec(name), target))
    loss_bound, grad_bound = BOUNDS[name]
    assert errors["loss"] <= loss_bound and errors["grad"] <= grad_bound, errors
    assert 0.05 < errors["residual"] < 1  # the head fitted part, not all, of the target
    if name != "float32":
        assert errors["grad"] > 0  # the measurement sees the codec at all


def test_the_codec_benchmark_measures_every_codec_and_form_it_can():
    from benchmarks.codecs import measure, table

    rng = np.random.default_rng(2)
    relu = lambda *shape: np.maximum(rng.standard_normal((32, *shape)), 0).astype(np.float32)  # noqa: E731
    features = {"act1": relu(4, 8, 8), "layer1": relu(4, 8, 8), "layer2": relu(8, 4, 4), "layer3": relu(8, 2, 2),
                "pre_logits": relu(8), "logits": rng.standard_normal((32, 3)).astype(np.float32)}
    rows = measure("default", features, steps=5)
    by = {(r["location"], r["codec"]): r for r in rows}
    assert {loc for loc, _ in by} == {"layer1", "layer2", "pre_logits", "logits"}
    assert ("logits", "uint8") not in by and ("layer1", "uint8") in by  # uint8 only where values are >= 0
    assert {"map_loss", "map_grad", "map_residual"} <= set(by[("layer2", "int8")])
    assert {"cml_loss", "pooled_grad"} <= set(by[("pre_logits", "float8")])
    assert {"kd_loss", "wsld_grad"} <= set(by[("logits", "bfloat16")])
    assert by[("layer1", "float16")]["ratio"] == 1.0 and by[("layer1", "uint8")]["ratio"] < 0.75
    assert by[("layer1", "float32")]["map_loss"] == 0.0
    assert table(rows).count("\n") == len(rows) + 1
