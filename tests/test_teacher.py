"""Teachers: torchvision ResNet weights load into the timm teacher; inputs are adapted for it; features
are read at named locations; a trained bkd SNN serves as teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from pipeline.checkpoint import save_weights
from pipeline.config import load_config
from pipeline.errors import BkdError, ConfigError
from pipeline.teacher.models import (check_teacher_locations, create_teacher, load_teacher, teacher_metadata, teacher_outputs)
from tests.helpers import REPO, TINY, assert_refused, run_bkd


def test_torchvision_resnet_weights_load_into_the_timm_teacher(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10).eval()
    save_weights(reference.state_dict(), tmp_path / "tv.safetensors")
    cfg = load_config(None, ["teacher.model=resnet18", "teacher.small_input_stem=false",
                             f"teacher.checkpoint={tmp_path / 'tv.safetensors'}"])
    teacher = load_teacher(cfg.teacher, 10, (3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), reference(x), rtol=1e-4, atol=1e-4)
    features, logits = teacher_outputs(teacher, x)
    assert list(features) == ["pre_logits"]
    assert features["pre_logits"].shape == (2, 512) and logits.shape == (2, 10)


def test_teacher_input_adapter_resizes_and_averages_frames():
    cfg = load_config(None, ["teacher.model=resnet18", "teacher.small_input_stem=false", "teacher.input_size=64"])
    teacher = create_teacher(cfg.teacher, 10, (5, 2, 32, 32)).eval()
    frames = torch.rand(2, 5, 2, 32, 32)
    expected_input = torch.nn.functional.interpolate(frames.mean(1), size=(64, 64), mode="bilinear",
                                                     align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(teacher(frames), teacher.forward_head(
            type(teacher).forward_features(teacher, expected_input)))
    import timm

    # the adapter adds no state: a plain timm checkpoint still loads
    assert set(teacher.state_dict()) == set(timm.create_model("resnet18", num_classes=10, in_chans=2).state_dict())


# --- feature locations -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchvision_pair(tmp_path_factory):
    """(our timm resnet18 teacher, torchvision's resnet18) with the same random weights."""
    tmp = tmp_path_factory.mktemp("tv")
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    save_weights(reference.state_dict(), tmp / "tv.safetensors")
    cfg = load_config(None, ["teacher.model=resnet18", "teacher.small_input_stem=false",
                             f"teacher.checkpoint={tmp / 'tv.safetensors'}"])
    return load_teacher(cfg.teacher, 10, (3, 64, 64)), reference


def test_layer4_pre_logits_and_logits_equal_torchvision(torchvision_pair):
    teacher, reference = torchvision_pair
    x = torch.randn(3, 3, 64, 64)
    extractor = create_feature_extractor(reference, {"layer3": "layer3", "layer4": "layer4", "flatten": "pooled",
                                                     "fc": "logits"})
    with torch.no_grad():
        want = extractor(x)
    got, logits = teacher_outputs(teacher, x, ["layer4", "pre_logits", "layer3"])
    assert list(got) == ["layer4", "pre_logits", "layer3"]
    assert got["layer4"].shape == (3, 512, 2, 2)
    for ours, theirs in (("layer4", "layer4"), ("layer3", "layer3"), ("pre_logits", "pooled")):
        torch.testing.assert_close(got[ours], want[theirs], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, want["logits"], rtol=1e-5, atol=1e-5)


def test_map_is_layer4_for_a_resnet_and_the_hooks_leave_nothing_behind(torchvision_pair):
    teacher, _ = torchvision_pair
    x = torch.randn(2, 3, 64, 64)
    got, logits = teacher_outputs(teacher, x, ["map", "layer4", "pre_logits"])
    torch.testing.assert_close(got["map"], got["layer4"], rtol=0, atol=0)
    torch.testing.assert_close(got["pre_logits"], got["map"].mean((2, 3)), rtol=1e-5, atol=1e-6)
    assert all(not m._forward_hooks for m in teacher.modules())
    with torch.no_grad():
        torch.testing.assert_close(logits, teacher(x))


def test_a_location_is_its_modules_output_even_when_the_next_module_works_in_place(torchvision_pair):
    """bn1 feeds a ReLU(inplace=True): the cached features are the batch norm's signed output, not the
    ReLU's, as torchvision's feature extractor (which traces the graph) reads them."""
    teacher, reference = torchvision_pair
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = create_feature_extractor(reference, {"layer1.0.bn1": "bn1"})(x)["bn1"]
    got, _ = teacher_outputs(teacher, x, ["layer1.0.bn1"])
    assert want.min() < 0
    torch.testing.assert_close(got["layer1.0.bn1"], want, rtol=1e-5, atol=1e-5)


def test_unknown_location_is_refused_naming_it(torchvision_pair):
    teacher, _ = torchvision_pair
    with pytest.raises(ConfigError, match="'layer9'.*conv1"):
        check_teacher_locations(teacher, ["layer4", "layer9"])
    with pytest.raises(ConfigError, match="'layer9'"):
        teacher_outputs(teacher, torch.randn(1, 3, 32, 32), ["layer9"])
    check_teacher_locations(teacher, ["pre_logits", "map", "layer3", "layer4.1.conv2"])


@pytest.fixture(scope="module")
def vit():
    cfg = load_config(None, ["teacher.model=test_vit", "teacher.small_input_stem=false"])
    torch.manual_seed(0)
    return create_teacher(cfg.teacher, 10, (3, 160, 160)).eval()


@pytest.mark.parametrize("location", ["map", "blocks.0"])
def test_vit_token_locations_are_refused_naming_location_and_shape(vit, location):
    x = torch.randn(2, 3, 160, 160)
    with pytest.raises(ConfigError) as info:
        teacher_outputs(vit, x, ["pre_logits", location])
    message = str(info.value)
    assert f"'{location}'" in message and "(2, " in message and "\n" not in message
    features, _ = teacher_outputs(vit, x, ["pre_logits"])
    assert features["pre_logits"].shape == (2, vit.num_features)


def test_bicubic_resize_differs_from_bilinear_and_matches_interpolate():
    import torch.nn.functional as F

    x = torch.rand(2, 3, 32, 32)
    outputs = {}
    for mode in ("bilinear", "bicubic"):
        cfg = load_config(None, ["teacher.model=test_vit", "teacher.small_input_stem=false",
                                 "teacher.input_size=160", f"teacher.interpolation={mode}"])
        torch.manual_seed(0)
        teacher = create_teacher(cfg.teacher, 10, (3, 32, 32)).eval()
        with torch.no_grad():
            outputs[mode] = teacher(x)
            expected = teacher.forward_head(type(teacher).forward_features(
                teacher, F.interpolate(x, size=(160, 160), mode=mode, align_corners=False)))
        torch.testing.assert_close(outputs[mode], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs["bilinear"], outputs["bicubic"], atol=1e-4)


def test_interpolation_is_validated():
    with pytest.raises(ConfigError, match="teacher.interpolation.*nearest"):
        load_config(None, ["teacher.interpolation=nearest"])


# --- a trained bkd SNN as teacher ------------------------------------------------------------------

SNN_KWARGS = {"widths": [4, 8], "blocks": [1, 1]}
SNN_SET = ["teacher.model=bkd:sew_resnet_mnist", "teacher.timesteps=2",
           f"teacher.model_kwargs={json.dumps(SNN_KWARGS)}"]


class _Split:
    """What teacher_metadata reads of a split."""

    name, num_classes, image_shape = "digits", 10, (1, 8, 8)
    transform = {"scale": 1.0}


@pytest.fixture(scope="module")
def snn_weights(tmp_path_factory):
    from pipeline.student.models import create_student

    path = tmp_path_factory.mktemp("snn") / "snn.safetensors"
    cfg = load_config(None, SNN_SET + [f"teacher.checkpoint={path}"])
    torch.manual_seed(0)
    model = create_student("sew_resnet_mnist", 10, (1, 8, 8), 2, **SNN_KWARGS)
    save_weights(model.state_dict(), path, metadata=teacher_metadata(cfg.teacher, _Split(), epochs=1))
    return path


def _snn_cfg(path, *extra):
    return load_config(None, SNN_SET + [f"teacher.checkpoint={path}", *extra])


def test_snn_teacher_loads_and_reads_time_averaged_locations(snn_weights):
    from spikingjelly.activation_based import functional

    from pipeline.student.models import encode

    teacher = load_teacher(_snn_cfg(snn_weights).teacher, 10, (1, 8, 8))
    assert teacher.num_features == 8 and not teacher.training
    x = torch.randn(3, 1, 8, 8)
    got, logits = teacher_outputs(teacher, x, ["pre_logits", "map", "stages.0", "stages.1"])
    with torch.no_grad():
        functional.reset_net(teacher)
        first = teacher.stages[0](teacher.stem(encode(x, 2)))  # [T, B, C, H, W]
        last = teacher.stages[1](first)
        torch.testing.assert_close(got["stages.0"], first.mean(0))
        torch.testing.assert_close(got["stages.1"], last.mean(0))
        torch.testing.assert_close(got["map"], last.mean(0))
        torch.testing.assert_close(got["pre_logits"], last.mean(0).mean((2, 3)))
        torch.testing.assert_close(logits, teacher(x))
    assert got["stages.0"].shape == (3, 4, 8, 8) and got["map"].shape == (3, 8, 4, 4)
    with pytest.raises(ConfigError, match="'fc'"):  # the head is not a [T, B, ...] module
        teacher_outputs(teacher, x, ["fc"])


@pytest.mark.parametrize("override, field", [
    ("teacher.timesteps=3", "timesteps"),
    ('teacher.model_kwargs={"widths": [4, 16], "blocks": [1, 1]}', "model_kwargs"),
    ("teacher.model=bkd:sew_resnet_cifar", "model"),
])
def test_snn_teacher_refuses_mismatched_metadata(snn_weights, override, field):
    with pytest.raises(BkdError) as info:
        load_teacher(_snn_cfg(snn_weights, override).teacher, 10, (1, 8, 8))
    message = str(info.value)
    assert f"teacher.{field} is" in message and "\n" not in message


def test_snn_teacher_refuses_a_file_without_student_metadata(snn_weights, tmp_path):
    from pipeline.checkpoint import load_weights

    bare = tmp_path / "bare.safetensors"
    save_weights(load_weights(snn_weights), bare, metadata={"model": "sew_resnet_mnist"})
    with pytest.raises(BkdError, match="bkd-student/1"):
        load_teacher(_snn_cfg(bare).teacher, 10, (1, 8, 8))
    with pytest.raises(BkdError, match="10 classes.*5"):
        load_teacher(_snn_cfg(snn_weights).teacher, 5, (1, 8, 8))


def test_snn_teacher_timesteps_must_equal_the_event_frames(snn_weights):
    cfg = _snn_cfg(snn_weights)
    with pytest.raises(ConfigError, match="5 event frames.*teacher.timesteps is 2.*frame count"):
        create_teacher(cfg.teacher, 10, (5, 1, 8, 8))
    teacher = create_teacher(cfg.teacher, 10, (2, 1, 8, 8)).eval()
    with pytest.raises(ConfigError, match="3 event frames.*teacher.timesteps"):
        teacher_outputs(teacher, torch.randn(2, 3, 1, 8, 8))
    features, logits = teacher_outputs(teacher, torch.randn(2, 2, 1, 8, 8), ["map"])
    assert features["map"].shape == (2, 8, 4, 4) and logits.shape == (2, 10)


@pytest.mark.parametrize("overrides, fragment", [
    (["teacher.model=bkd:sew_resnet_mnist"], "teacher.timesteps is required"),
    (["teacher.model=bkd:sew_resnet_mnist", "teacher.timesteps=0"], "teacher.timesteps must be >= 1"),
    (["teacher.timesteps=4"], "teacher.timesteps is for bkd:<student>"),
    (['teacher.model_kwargs={"widths": [4]}'], "teacher.model_kwargs is for bkd:<student>"),
    (["teacher.model=bkd:sew_resnet_mnist", "teacher.timesteps=2", "teacher.input_size=32"], "teacher.input_size"),
])
def test_snn_teacher_config_is_validated(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


def test_registry_accepts_known_bkd_students_only():
    from pipeline.registry import check_names

    check_names(load_config(None, SNN_SET))
    with pytest.raises(ConfigError) as info:
        check_names(load_config(None, ["teacher.model=bkd:resnet18", "teacher.timesteps=2"]))
    assert "'bkd:resnet18'" in str(info.value) and "sew_resnet_mnist" in str(info.value)


def test_train_teacher_trains_an_snn_teacher_that_load_teacher_accepts(tmp_path):
    ckpt = tmp_path / "models" / "snn_teacher.safetensors"
    args = ["--config", str(REPO / "params.yaml"), "--set", "data.name=digits",
            "--set", "data.limit=64", "--set", "data.test_size=100", "--set", "teacher.batch_size=32",
            "--set", "teacher.device=cpu", "--set", f"teacher.checkpoint={ckpt}"]
    for item in SNN_SET:
        args += ["--set", item]
    run_bkd(["train-teacher", *args, "--epochs", "1", "--run-dir", str(tmp_path / "run"),
             "--metrics", str(tmp_path / "teacher.json")], tmp_path)
    from pipeline.checkpoint import read_metadata

    meta = read_metadata(ckpt)
    assert meta["format"] == "bkd-student/1" and meta["model"] == "sew_resnet_mnist"
    assert json.loads(meta["model_kwargs"]) == SNN_KWARGS and meta["timesteps"] == "2" and meta["epochs"] == "1"
    cfg = load_config(None, SNN_SET + [f"teacher.checkpoint={ckpt}"])
    teacher = load_teacher(cfg.teacher, 10, (1, 8, 8))
    features, logits = teacher_outputs(teacher, torch.randn(2, 1, 8, 8), ["pre_logits", "stages.1"])
    assert features["pre_logits"].shape == (2, 8) and features["stages.1"].shape == (2, 8, 4, 4)
    assert json.loads((tmp_path / "teacher.json").read_text())["model"] == "bkd:sew_resnet_mnist"


@pytest.mark.slow
def test_nan_teacher_weights_are_refused_before_writing(tiny_project: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_project / "models/teacher.safetensors"))
    state[next(k for k, v in state.items() if v.is_floating_point())].fill_(float("nan"))
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    store = tmp_path / "nan.zarr"
    proc = run_bkd(["extract-teacher", *TINY, "--set", f"teacher.checkpoint={bad}", "--store", str(store)],
                   tiny_project, check=False)
    assert_refused(proc, "NaN or infinite")
    assert not store.exists()


@pytest.mark.slow
def test_missing_teacher_checkpoint_is_an_error_unless_waived(tiny_project: Path):
    args = ["train-student", *TINY, "--epochs", "1", "--distill", "none", "--set", "teacher.checkpoint=models/typo.st"]
    proc = run_bkd([*args, "--run-dir", "runs/refused"], tiny_project, check=False)
    assert_refused(proc, "--trust-store-teacher")
    run_bkd([*args, "--run-dir", "runs/waived", "--trust-store-teacher"], tiny_project)
