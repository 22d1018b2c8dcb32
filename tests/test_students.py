"""Every registered student: builds, takes images or event frames, and exposes timm's interface."""

from __future__ import annotations

import pytest
import torch
from spikingjelly.activation_based import neuron, surrogate
from torch import nn

from pipeline.errors import ConfigError
from pipeline.student.models import STUDENTS, create_student
from pipeline.locations import capture
from pipeline.student.neurons import spiking_layers

SMALL = {
    "sew_resnet_cifar": {"widths": [8, 16, 32, 64]},
    "sew_resnet_dvs": {"channels": [4, 8]},
    "spikformer": {"depths": 1, "embed_dims": 48, "num_heads": 4, "patch_size": 4},
    "spikingformer_cml": {"depths": 2, "embed_dims": 32, "num_heads": 2},
}


def _record_neuron_outputs(student):
    """Forward hooks on every spiking neuron; returns (outputs by name, hook handles)."""
    outputs, handles = {}, []

    def hook(_module, _inputs, out, name):
        outputs.setdefault(name, out.detach())  # returns None: the output is left as it is

    for name, module in spiking_layers(student):
        handles.append(module.register_forward_hook(lambda m, i, out, name=name: hook(m, i, out, name)))
    return outputs, handles


def _is_binary(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


@pytest.mark.parametrize("name", sorted(STUDENTS))
@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 2, 32, 32)], ids=["image", "frames"])
def test_student_interface(name, shape):
    torch.manual_seed(0)
    student = create_student(name, 7, shape, 2, **SMALL.get(name, {}))
    x = torch.rand(2, *shape)
    spikes, handles = _record_neuron_outputs(student)
    features = student.forward_features(x)
    for handle in handles:
        handle.remove()
    assert spikes and len(spikes) == len(spiking_layers(student))  # every neuron ran
    assert all(_is_binary(out) for out in spikes.values())  # neurons emit spikes only
    assert any(out.sum() > 0 for out in spikes.values())
    assert features.shape == (2, student.num_features)
    feature_map = student.forward_feature_map(x)  # for BKD on maps; pooled, it is the feature
    assert feature_map.dim() == 4 and feature_map.shape[:2] == (2, student.num_features)
    torch.testing.assert_close(feature_map.mean((2, 3)), features)
    logits = student.forward_head(features)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    missing = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
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


@pytest.mark.parametrize("name, shape, kwargs, fragment", [
    ("spikingformer_cml", (3, 32, 32), {"embed_dims": 36}, "multiple of 8"),
    ("spikingformer_cml", (3, 32, 32), {"embed_dims": 32, "num_heads": 3}, "num_heads"),
    ("spikingformer_cml", (3, 32, 32), {"patch_size": 32}, "patch_size"),
    ("spikingformer_cml", (3, 40, 40), {"patch_size": 16}, "does not divide"),
    ("spikingformer_cml", (3, 32, 32), {"depths": 0}, "depths"),
    ("sew_resnet_dvs", (2, 128, 128), {"channels": []}, "channels"),
    ("sew_resnet_dvs", (2, 128, 128), {"cnf": "XOR"}, "cnf"),
    ("sew_resnet18", (3, 32, 32), {"cnf": "XOR"}, "cnf"),
    ("sew_resnet18", (3, 32, 32), {"neuron": "relu"}, "neuron"),
])
def test_bad_new_student_kwargs_are_config_errors(name, shape, kwargs, fragment):
    with pytest.raises(ConfigError, match=f"^student.model_kwargs: .*{fragment}"):
        create_student(name, 10, shape, 2, **kwargs)


def test_bad_model_kwargs_are_config_errors():
    with pytest.raises(ConfigError, match="patch_size"):
        create_student("spikformer", 10, (3, 32, 32), 2, patch_size=8)
    with pytest.raises(ConfigError, match="student.model_kwargs"):
        create_student("sew_resnet18", 10, (3, 32, 32), 2, widths=[1])


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_documented_stages_capture_time_averaged_maps(name):
    """`stage_names` are module names whose outputs are [T, B, C, H, W]: capture gives their
    time averages [B, C, H, W], the same as a hand-made hook, and the last one is the map."""
    torch.manual_seed(0)
    student = create_student(name, 5, (3, 32, 32), 2, **SMALL.get(name, {}))
    names = student.stage_names
    assert names and all(n in dict(student.named_modules()) for n in names)
    modules = dict(student.named_modules())
    manual, handles = {}, []
    for n in names:
        handles.append(modules[n].register_forward_hook(
            lambda _m, _i, out, n=n: manual.__setitem__(n, (out.dim(), out.shape[:2], out.mean(0)))))
    with torch.no_grad(), capture(student, names, time_major=True) as got:
        feature_map = student.forward_feature_map(torch.rand(3, 3, 32, 32))
    for handle in handles:
        handle.remove()
    for n in names:
        dim, leading, mean = manual[n]
        assert dim == 5 and tuple(leading) == (2, 3)  # [T, B, ...]
        assert got[n].dim() == 4 and got[n].shape[0] == 3
        torch.testing.assert_close(got[n], mean)
    torch.testing.assert_close(got[names[-1]], feature_map)


# ---- Spikingformer-CML -------------------------------------------------------------------------

def test_spikingformer_cml_neurons_and_real_valued_residual_stream():
    torch.manual_seed(0)
    student = create_student("spikingformer_cml", 10, (3, 32, 32), 2, **SMALL["spikingformer_cml"])
    layers = spiking_layers(student)
    assert all(type(m) is neuron.LIFNode and isinstance(m.surrogate_function, surrogate.Sigmoid)
               and m.tau == 2.0 and m.detach_reset and m.v_reset == 0.0 and m.step_mode == "m"
               for _, m in layers)
    thresholds = {name: m.v_threshold for name, m in layers}
    attention = {name for name in thresholds if name.endswith("attn.attn_lif")}
    assert len(attention) == 2 and all(thresholds[n] == 0.5 for n in attention)
    assert all(v == 1.0 for n, v in thresholds.items() if n not in attention)
    # pre-activation: each block's output (the residual stream) is real-valued, its neurons spike
    streams, handles = {}, []
    for i, block in enumerate(student.blocks):
        handles.append(block.register_forward_hook(lambda _m, _i, out, i=i: streams.__setitem__(i, out)))
    conv_inputs = {}
    for name, m in student.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            handles.append(m.register_forward_pre_hook(
                lambda _m, inputs, name=name: conv_inputs.__setitem__(name, inputs[0])))
    spikes, more = _record_neuron_outputs(student)
    with torch.no_grad():
        student(torch.rand(2, 3, 32, 32))
    for handle in handles + more:
        handle.remove()
    assert all(not _is_binary(out) and (out < 0).any() for out in streams.values())
    assert all(_is_binary(out) for out in spikes.values()) and any(out.sum() > 0 for out in spikes.values())
    # every convolution but the first stem conv (on the analog image) is fed spikes
    assert not _is_binary(conv_inputs.pop("patch_embed.0.0"))
    assert len(conv_inputs) == 4 + 2 * 6 and all(_is_binary(x) for x in conv_inputs.values())


def test_spikingformer_cml_attention_matches_the_official_formula():
    """attn_lif's input is, per head h (channels h*d .. h*d+d-1), (q_h k_h^T) v_h * 0.125."""
    torch.manual_seed(0)
    student = create_student("spikingformer_cml", 10, (3, 32, 32), 2, depths=1, embed_dims=32, num_heads=4)
    attn = student.blocks[0].attn
    seen = {}
    for key, module in (("q", attn.q), ("k", attn.k), ("v", attn.v)):
        module.register_forward_hook(lambda _m, _i, out, key=key: seen.__setitem__(key, out))
    attn.attn_lif.register_forward_pre_hook(lambda _m, inputs: seen.__setitem__("in", inputs[0]))
    with torch.no_grad():
        student(torch.rand(2, 3, 32, 32))
    q, k, v = (seen[key].flatten(3) for key in "qkv")  # [T, B, C, N] spikes
    d = 32 // 4
    expected = torch.cat([(q[:, :, h * d:(h + 1) * d].transpose(-1, -2) @ k[:, :, h * d:(h + 1) * d]
                           @ v[:, :, h * d:(h + 1) * d].transpose(-1, -2)).transpose(-1, -2) * 0.125
                          for h in range(4)], dim=2)
    assert all(_is_binary(t) for t in (q, k, v))
    torch.testing.assert_close(seen["in"], expected)


@pytest.mark.parametrize("size, patch, pooled_stages, tokens", [(32, 4, [2, 3], 8), (224, 16, [0, 1, 2, 3], 14)],
                         ids=["cifar", "imagenet"])
def test_spikingformer_cml_stem(size, patch, pooled_stages, tokens):
    """CML: conv-BN-MaxPool before the next LIF; the stem is picked from the input size."""
    torch.manual_seed(0)
    student = create_student("spikingformer_cml", 10, (3, size, size), 1, depths=1, embed_dims=16, num_heads=2)
    assert student.patch_size == patch
    stages = [list(stage) for stage in student.patch_embed]
    assert len(stages) == 5 and not isinstance(stages[0][0], neuron.BaseNode)  # the first conv reads the image
    assert all(isinstance(stage[0], neuron.BaseNode) for stage in stages[1:])
    pooled = [i for i, stage in enumerate(stages) if isinstance(stage[-1], nn.MaxPool2d)]
    assert pooled == pooled_stages
    assert all(isinstance(stages[i][-2], nn.BatchNorm2d) for i in pooled)
    assert [stage[-2 if i in pooled else -1].num_features for i, stage in enumerate(stages)] == [2, 4, 8, 16, 16]
    with torch.no_grad():
        assert student.forward_feature_map(torch.rand(1, 3, size, size)).shape == (1, 16, tokens, tokens)


def _official_spikingformer_parameters(depths, dim, num_classes, in_chans=3, mlp_ratio=4, layer_norms=True):
    """A count of the official `vit_snn` constructor's parameters, layer by layer."""
    hidden = dim * mlp_ratio
    conv = lambda cin, cout, k, bias: cin * cout * k * k + (cout if bias else 0)  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731  (weight, bias; running stats are buffers)
    widths = [in_chans, dim // 8, dim // 4, dim // 2, dim, dim]
    tokenizer = sum(conv(widths[i], widths[i + 1], 3, False) + bn(widths[i + 1]) for i in range(5))
    ssa = 3 * (conv(dim, dim, 1, False) + bn(dim)) + conv(dim, dim, 1, True) + bn(dim)
    mlp = conv(dim, hidden, 1, True) + bn(hidden) + conv(hidden, dim, 1, True) + bn(dim)
    norms = 2 * bn(dim) if layer_norms else 0  # norm1, norm2: constructed, never called
    return tokenizer + depths * (ssa + mlp + norms) + dim * num_classes + num_classes


@pytest.mark.parametrize("shape, classes, depths, dims, heads, ours, official", [
    ((3, 32, 32), 10, 4, 384, 12, 9_320_122, 9_326_266),
    ((3, 32, 32), 100, 4, 384, 8, 9_354_772, 9_360_916),
    ((3, 224, 224), 1000, 8, 768, 8, 66_338_632, 66_363_208),
], ids=["cifar10-4-384", "cifar100-4-384", "imagenet-8-768"])
def test_spikingformer_cml_published_sizes(shape, classes, depths, dims, heads, ours, official):
    student = create_student("spikingformer_cml", classes, shape, 4, depths=depths, embed_dims=dims,
                             num_heads=heads)
    assert _official_spikingformer_parameters(depths, dims, classes) == official
    assert _official_spikingformer_parameters(depths, dims, classes, layer_norms=False) == ours
    assert sum(p.numel() for p in student.parameters()) == ours  # official minus its unused LayerNorms


# ---- SEW-ResNet ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, params", [("sew_resnet18", 11_689_512), ("sew_resnet34", 21_797_672),
                                          ("sew_resnet50", 25_557_032)])
def test_sew_imagenet_students_use_if_nodes_and_published_sizes(name, params):
    """IF nodes by default (official ImageNet code), with its ATan surrogate; the size is
    torchvision's ResNet's (IF nodes hold no parameters)."""
    student = create_student(name, 1000, (3, 224, 224), 4)
    layers = spiking_layers(student)
    assert layers and all(type(m) is neuron.IFNode and isinstance(m.surrogate_function, surrogate.ATan)
                          and m.surrogate_function.alpha == 2.0 and m.detach_reset and m.step_mode == "m"
                          for _, m in layers)
    assert sum(p.numel() for p in student.parameters()) == params
    assert student.backbone.layer1[0].cnf == "ADD"
    lif_student = create_student(name, 1000, (3, 224, 224), 4, neuron="lif")
    assert all(type(m) is neuron.LIFNode for _, m in spiking_layers(lif_student))


def test_sew_dvs_student_official_layout():
    """The default widths give the official ResNetN layout: conv.9 is the 64->128 unit (the
    official default export), seven pools take 128x128 frames to 1x1; PLIF neurons throughout."""
    student = create_student("sew_resnet_dvs", 10, (4, 2, 128, 128), 4)
    conv9 = student.conv[9]
    assert isinstance(conv9[0], nn.Conv2d) and conv9[0].kernel_size == (1, 1)
    assert (conv9[0].in_channels, conv9[0].out_channels) == (64, 128)
    assert student.stage_names == tuple(f"conv.{i}" for i in (2, 4, 6, 8, 11, 13, 15))
    layers = spiking_layers(student)
    assert all(type(m) is neuron.ParametricLIFNode and isinstance(m.surrogate_function, surrogate.ATan)
               and m.detach_reset for _, m in layers)
    # 2->64 unit, 4 blocks at 64, 64->128 unit, 3 blocks at 128 (conv + BN + one PLIF w per neuron), fc
    unit = lambda cin, cout, k: cin * cout * k * k + 2 * cout + 1  # noqa: E731
    expected = (unit(2, 64, 1) + 4 * 2 * unit(64, 64, 3) + unit(64, 128, 1) + 3 * 2 * unit(128, 128, 3)
                + 128 * 10 + 10)
    assert sum(p.numel() for p in student.parameters()) == expected == 1_192_218
    # the same layout at tiny widths runs on 128x128 frames; capture conv.9 at 8x8
    tiny = create_student("sew_resnet_dvs", 10, (2, 2, 128, 128), 2, channels=[2, 2, 2, 2, 4, 4, 4])
    with torch.no_grad(), capture(tiny, ["conv.9"], time_major=True) as got:
        assert tiny.forward_feature_map(torch.rand(1, 2, 2, 128, 128)).shape == (1, 4, 1, 1)
    assert got["conv.9"].shape == (1, 4, 8, 8)
    with pytest.raises(ConfigError, match="halve the input"):
        create_student("sew_resnet_dvs", 10, (2, 2, 64, 64), 2)
