"""Every registered student: builds, takes images or event frames, and exposes timm's interface."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models import STUDENTS, create_student

SMALL = {
    "sew_resnet_cifar": {"widths": [8, 16, 32, 64]},
    "spikformer": {"depths": 1, "embed_dims": 48, "num_heads": 4, "patch_size": 4},
}


@pytest.mark.parametrize("name", sorted(STUDENTS))
@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 2, 32, 32)], ids=["image", "frames"])
def test_student_interface(name, shape):
    torch.manual_seed(0)
    student = create_student(name, 7, shape, 2, **SMALL.get(name, {}))
    x = torch.rand(2, *shape)
    features = student.forward_features(x)
    assert features.shape == (2, student.num_features)
    feature_map = student.forward_feature_map(x)  # for BKD on maps; pooled, it is the feature
    assert feature_map.dim() == 4 and feature_map.shape[:2] == (2, student.num_features)
    torch.testing.assert_close(feature_map.mean((2, 3)), features)
    logits = student.forward_head(features)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    # state is reset per batch: the same input gives the same output twice
    with torch.no_grad():
        torch.testing.assert_close(student(x), student(x))


def test_frames_must_match_timesteps():
    student = create_student("sew_resnet_mnist", 10, (4, 2, 16, 16), 3)
    with pytest.raises(ConfigError, match="4 event frames"):
        student(torch.rand(1, 4, 2, 16, 16))


def test_spikformer_stem_downsamples_cml_style():
    """Spikingformer-CML moves max-pooling before the spiking neuron (conv-BN-MaxPool-LIF);
    spikingjelly's Spikformer stem is built that way: the pool sits inside the conv-BN block."""
    student = create_student("spikformer", 10, (3, 32, 32), 2, **SMALL["spikformer"])
    pooled = 0
    for stage in student.backbone.patch_embed.stages:
        block = list(stage.conv_bn.block)
        if any(isinstance(m, nn.MaxPool2d) for m in block):
            assert isinstance(block[-1], nn.MaxPool2d) and isinstance(block[-2], nn.BatchNorm2d)
            pooled += 1
    assert pooled == 2  # patch 4 on 32x32: two downsampling stages, both before their LIF


def test_bad_model_kwargs_are_config_errors():
    with pytest.raises(ConfigError, match="patch_size"):
        create_student("spikformer", 10, (3, 32, 32), 2, patch_size=8)
    with pytest.raises(ConfigError, match="student.model_kwargs"):
        create_student("sew_resnet18", 10, (3, 32, 32), 2, widths=[1])
