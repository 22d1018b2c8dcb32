"""Config loading, overrides and refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, load_config
from pipeline.errors import BkdError, ConfigError

REPO = Path(__file__).resolve().parents[1]
MNIST5K = REPO / "params.yaml"  # the default config


def _assert_matches(cfg_part, raw_part, where=""):
    """Every value written in the YAML file is the value in the loaded config."""
    for key, value in raw_part.items():
        have = getattr(cfg_part, key) if not isinstance(cfg_part, dict) else cfg_part[key]
        if isinstance(value, dict) and not isinstance(have, dict):
            _assert_matches(have, value, f"{where}{key}.")
        else:
            if isinstance(value, str) and isinstance(have, float):
                value = float(value)  # YAML 1.1 reads 1e-3 as a string
            assert have == value, f"{where}{key}: {have!r} != {value!r}"


@pytest.fixture(scope="module")
def mnist_cfg() -> Config:
    return load_config(MNIST5K)


def test_mnist5k_loads_with_file_values(mnist_cfg):
    raw = yaml.safe_load(MNIST5K.read_text())
    _assert_matches(mnist_cfg, raw)
    # spot checks, including nested sections and floats written as 2.0e-3
    assert mnist_cfg.student.bkd.blur_ratio == 0.15
    assert mnist_cfg.student.bkd.alpha == pytest.approx(2e-3)
    assert mnist_cfg.student.logits.temperature == 2.0
    assert mnist_cfg.extract.splits == ["train", "test"]
    assert mnist_cfg.data.limit == 1000
    assert isinstance(mnist_cfg.teacher.lr, float)


def test_override_applies():
    cfg = load_config(MNIST5K, ["student.lr=0.01", "student.bkd.blur_ratio=0.3", "data.limit=50",
                                "extract.splits=[train]", "student.distill=kd"])
    assert cfg.student.lr == 0.01
    assert cfg.student.bkd.blur_ratio == 0.3
    assert cfg.data.limit == 50
    assert cfg.extract.splits == ["train"]
    assert cfg.student.distill == "kd"
    # untouched values stay as in the file
    assert cfg.student.bkd.alpha == pytest.approx(2e-3)
    assert cfg.teacher.lr == pytest.approx(2e-3)


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == Config()


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def _refuse(path, overrides=(), *fragments):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert isinstance(info.value, BkdError)
    return message


def test_unknown_top_level_key(tmp_path):
    msg = _refuse(_write(tmp_path, "seed: 0\nbogus: 1\n"), (), "bogus")
    assert "known" in msg and "student" in msg  # lists the valid keys


def test_unknown_nested_key_names_dotted_path(tmp_path):
    _refuse(_write(tmp_path, "student:\n  bkd:\n    blurr_ratio: 0.1\n"), (), "student.bkd.blurr_ratio")
    _refuse(MNIST5K, ["teacher.lrr=0.1"], "teacher.lrr")


def test_wrong_type_string_for_int(tmp_path):
    _refuse(_write(tmp_path, "student:\n  timesteps: four\n"), (), "student.timesteps", "integer", "four")
    _refuse(MNIST5K, ["student.epochs=abc"], "student.epochs", "integer")
    _refuse(MNIST5K, ["student.epochs=2.5"], "student.epochs")
    _refuse(MNIST5K, ["student.bkd.rescale=maybe"], "student.bkd.rescale")


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_blur_ratio_out_of_range(value):
    _refuse(MNIST5K, [f"student.bkd.blur_ratio={value}"], "blur_ratio", "[0, 1)")


def test_timesteps_zero():
    _refuse(MNIST5K, ["student.timesteps=0"], "timesteps", ">= 1")


def test_unknown_distill_mode():
    _refuse(MNIST5K, ["student.distill=magic"], "student.distill", "magic", "mixed")


@pytest.mark.parametrize("override, fragments", [
    ("data.name=imagenet9000", ("data.name", "imagenet9000", "mnist5k")),
    ("student.model=resnet_of_dreams", ("student.model", "unknown student", "sew_resnet_mnist")),
    ("teacher.model=resnet9000", ("teacher.model", "not a timm model")),
    ("augment.kind=rotate", ("augment.kind", "rotate", "pad_crop_flip")),
])
def test_unknown_names_are_refused_by_the_registries(override, fragments):
    from pipeline.registry import check_names
    from pipeline.student.models import STUDENTS

    cfg = load_config(MNIST5K, [override])  # types and ranges: fine
    with pytest.raises(ConfigError) as info:
        check_names(cfg, STUDENTS)
    assert all(f in str(info.value) for f in fragments)


def test_config_validation_imports_no_registry():
    import subprocess
    import sys

    code = ("import sys; from pipeline.config import load_config; load_config(None); "
            "print(sorted(m for m in ('pipeline.data', 'pipeline.teacher.models', 'pipeline.student.models', 'pipeline.augment', 'timm', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    _refuse(missing, (), "not found", str(missing))


def test_invalid_yaml(tmp_path):
    path = _write(tmp_path, "student: [unclosed\n  lr: 1\n")
    _refuse(path, (), str(path), "YAML")


def test_top_level_not_a_mapping(tmp_path):
    _refuse(_write(tmp_path, "- a\n- b\n"), (), "mapping")


def test_override_without_equals():
    _refuse(MNIST5K, ["student.lr"], "student.lr", "=")


def test_section_given_a_scalar(tmp_path):
    _refuse(_write(tmp_path, "student: 3\n"), (), "student", "mapping")


def test_params_yaml_is_the_default_config():
    """params.yaml, the default config and DVC's parameters, is the dataclass defaults spelt out."""
    params = REPO / "params.yaml"
    cfg = load_config(params)
    _assert_matches(cfg, yaml.safe_load(params.read_text()))
    # what the file spells out beyond the defaults: the student's model_kwargs, and the embedded data's
    # 1,000-digit subset (a config for another dataset must not inherit a subset unawares), and the store's
    # identity file, which dvc.yaml names (by default it goes beside the store, where params.yaml puts it)
    assert cfg.data.limit == 1000
    assert cfg.extract.identity == Config().extract.identity_path() == "cache/mnist5k-resnet18.identity.json"
    assert dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, model_kwargs={}),
                               data=dataclasses.replace(cfg.data, limit=None),
                               extract=dataclasses.replace(cfg.extract, identity="")) == Config()


@pytest.mark.parametrize("override,field", [
    ("student.logits.temperature=.inf", "temperature"),
    ("student.bkd.alpha=.inf", "alpha"),
    ("student.logits.weight=.nan", "weight"),
    ("student.lr=.inf", "student.lr"),
])
def test_non_finite_values_refused(override, field):
    _refuse(MNIST5K, [override], field, "finite")


def _float_fields(cls, prefix=""):
    """Dotted keys of every float (or list of floats) field of the config, nested sections included."""
    import typing

    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _float_fields(tp, f"{prefix}{f.name}.")
        elif tp is float or tp == list[float]:
            yield f"{prefix}{f.name}", tp


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_field_refuses_non_finite_values_at_load(value):
    fields = list(_float_fields(Config))
    assert len(fields) > 15 and ("teacher.weight_decay", float) in fields
    for key, tp in fields:
        _refuse(MNIST5K, [f"{key}={value}" if tp is float else f"{key}=[0.5, {value}]"], key, "finite")


@pytest.mark.parametrize("device", ["gpu", "cudax", "cuda:-1", "cuda:one", "CPU"])
def test_bad_device_refused(device):
    _refuse(MNIST5K, [f"student.device={device}"], "student.device", device)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_good_device_accepted(device):
    assert load_config(MNIST5K, [f"student.device={device}"]).student.device == device


@pytest.mark.parametrize("path", [REPO / "params.yaml", *sorted((REPO / "configs").glob("*.yaml"))],
                         ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.student.bkd.blur_ratio == 0.15 and cfg.student.distill == "mixed"


def test_anchors_and_merge_keys_still_load(tmp_path):
    """Aliases are bounded, not banned: sharing a block between sections keeps working."""
    cfg = load_config(_write(tmp_path, "teacher: &opt\n  lr: 0.1\n  weight_decay: 0.0\n"
                                       "student:\n  <<: *opt\n  lr: 0.2\n"))
    assert (cfg.teacher.lr, cfg.student.lr, cfg.student.weight_decay) == (0.1, 0.2, 0.0)


def test_recursive_alias_refused(tmp_path):
    path = _write(tmp_path, "student: &s\n  model_kwargs: *s\n")
    _refuse(path, (), str(path), "recursive alias", "line 2")


def test_duplicate_key_in_override_value_refused():
    _refuse(MNIST5K, ["student.model_kwargs={widths: [8], widths: [16]}"], "student.model_kwargs", "duplicate key")


def test_unknown_huge_key_is_clipped(tmp_path):
    # an explicit key (`? KEY`): YAML limits implicit keys to 1024 characters
    message = _refuse(_write(tmp_path, f"student:\n  ? {'k' * 100_000}\n  : 1\n"), (), "unknown config key")
    assert len(message) < 400


def test_validate_returns_a_checked_copy_and_leaves_its_argument():
    from pipeline.config import ExtractConfig, StudentConfig, validate

    cfg = Config(extract=ExtractConfig(channels_last="on"))
    before = dataclasses.asdict(cfg)
    checked = validate(cfg)
    assert checked == cfg and checked is not cfg and checked.student is not cfg.student
    assert dataclasses.asdict(cfg) == before
    checked.student.features["map"] = "map"
    assert cfg.student.features == {"pre_logits": "pre_logits"}
    with pytest.raises(ConfigError, match="student.distill must be one of .*mixed.*got 'magic'"):
        validate(Config(student=StudentConfig(distill="magic")))  # choices are checked on a built config too


@pytest.mark.parametrize("override, fragments", [
    ("student.optimizer=adam", ("student.optimizer must be one of adamw, sgd", "'adam'")),
    ("student.schedule.per=batch", ("student.schedule.per must be one of step, epoch",)),
    ("data.interpolation=nearest", ("data.interpolation", "bilinear, bicubic")),
    ("teacher.interpolation=3", ("teacher.interpolation", "bilinear, bicubic", "got 3")),
    ("extract.splits=[train, val]", ("extract.splits[1]", "train, test", "'val'")),
    ("extract.feature_dtype=float64", ("extract.feature_dtype", "float16, float32")),
    ("extract.channels_last=sometimes", ("extract.channels_last must be one of auto, on, off",)),
    ("student.neuron_backend=cupy", ("student.neuron_backend", "cupy", "spikingjelly 2.0")),
    ("extract.codecs={layer1: jpeg}", ("extract.codecs.layer1 must be one of float32", "uint8", "'jpeg'")),
    ("extract.codecs={layer4: uint8}", ("extract.codecs names 'layer4'", "pre_logits", "nor logits")),
    ("extract.codecs={logits: uint8}", ("extract.codecs.logits is uint8", "int8 or float8")),
    ("extract.codecs={logits: uint5}", ("extract.codecs.logits is uint5", "int8 or float8")),
    ("extract.codecs={1: uint8}", ("extract.codecs key 1: expected a string",)),
])
def test_choices_are_refused_naming_the_field_and_the_choices(override, fragments):
    message = _refuse(MNIST5K, [override], *fragments)
    assert "\n" not in message


def test_yaml_on_off_booleans_are_channels_last_names(tmp_path):
    assert load_config(_write(tmp_path, "extract:\n  channels_last: on\n")).extract.channels_last == "on"
    assert load_config(None, ["extract.channels_last=false"]).extract.channels_last == "off"


def test_the_mode_table_drives_the_feature_pairs():
    from pipeline.config import StudentConfig
    from pipeline.modes import MODES

    for name, mode in MODES.items():
        pairs = StudentConfig(distill=name).feature_pairs()
        assert pairs == (getattr(StudentConfig(), mode.pairs) if mode.pairs else {}), name
        assert (mode.features == "none") == (not mode.pairs), name
    _refuse(MNIST5K, ["student.distill=lasnn", "student.lasnn_features={}"], "at least one pair",
            "student.lasnn_features")


@pytest.mark.parametrize("spec, why", [
    ("rand-foo", "section 'foo' is none timm understands"),  # timm skipped it and built its default policy
    ("rand-tfoo", "section 'tfoo'"),  # timm took an unknown transform set for its default one
    ("rand-m9.5-n1", "'9.5' is not an integer"),
    ("rand-m9-n", "section 'n'"),
    ("augmix-m9", "start with 'rand'"),
])
def test_a_randaugment_spec_timm_would_not_build_as_written_is_refused(spec, why):
    _refuse(MNIST5K, [f"augment.randaugment={spec}"], "augment.randaugment", why)


@pytest.mark.parametrize("spec", ["rand-m9-n1-mstd0.4-inc1", "rand-m9-mstd0.5-tweights", "rand-mmax8-m7-p0.3"])
def test_randaugment_specs_timm_understands_are_taken(spec):
    from timm.data.auto_augment import rand_augment_transform

    assert load_config(MNIST5K, [f"augment.randaugment={spec}"]).augment.randaugment == spec
    rand_augment_transform(spec, {})  # and timm builds it
