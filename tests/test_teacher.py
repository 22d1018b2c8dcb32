"""Teachers: torchvision ResNet weights load into the timm teacher; inputs are adapted for it."""

from __future__ import annotations


import torch
import torchvision

from pipeline.checkpoint import save_weights
from pipeline.config import load_config
from pipeline.models import load_teacher
from pipeline.models import teacher_outputs


def test_torchvision_resnet_weights_load_into_the_timm_teacher(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10).eval()
    save_weights(reference.state_dict(), tmp_path / "tv.safetensors")
    cfg = load_config(None, ["teacher.model=resnet18", "teacher.small_input_stem=false",
                             f"teacher.checkpoint={tmp_path / 'tv.safetensors'}"])
    teacher = load_teacher(cfg.teacher, 10, 3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), reference(x), rtol=1e-4, atol=1e-4)
    features, logits = teacher_outputs(teacher, x)
    assert features.shape == (2, 512) and logits.shape == (2, 10)


def test_teacher_input_adapter_resizes_and_averages_frames():
    cfg = load_config(None, ["teacher.model=resnet18", "teacher.small_input_stem=false", "teacher.input_size=64"])
    from pipeline.models import create_teacher

    teacher = create_teacher(cfg.teacher, 10, 2).eval()
    frames = torch.rand(2, 5, 2, 32, 32)
    expected_input = torch.nn.functional.interpolate(frames.mean(1), size=(64, 64), mode="bilinear",
                                                     align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(teacher(frames), teacher.forward_head(
            type(teacher).forward_features(teacher, expected_input)))
    import timm

    # the adapter adds no state: a plain timm checkpoint still loads
    assert set(teacher.state_dict()) == set(timm.create_model("resnet18", num_classes=10, in_chans=2).state_dict())
