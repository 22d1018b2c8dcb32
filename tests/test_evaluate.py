"""Synaptic operations and energy against a hand count on a tiny spiking network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from spikingjelly.activation_based import functional, layer
from torch import nn

from pipeline.evaluate import E_AC_PJ, E_MAC_PJ, synaptic_operations
from pipeline.neurons import lif


class TinySNN(nn.Module):
    """conv(1->2, 3x3, pad 1) on the analog image, LIF, linear(2*4*4 -> 3) on spikes, T = 2."""

    def __init__(self):
        super().__init__()
        self.conv = layer.Conv2d(1, 2, 3, padding=1, bias=False)
        self.sn = lif(v_threshold=0.5)
        self.fc = layer.Linear(32, 3, bias=False)
        functional.set_step_mode(self, "m")

    def forward(self, x):
        functional.reset_net(self)
        x = x.unsqueeze(0).repeat(2, 1, 1, 1, 1)
        spikes = self.sn(self.conv(x))
        self.last_spikes = spikes
        return self.fc(spikes.flatten(2)).mean(0)


class Split:
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def load(self, rows):
        return self.images[torch.as_tensor(list(rows))]


def test_sops_and_energy_match_a_hand_count():
    torch.manual_seed(0)
    model = TinySNN()
    model.conv.weight.data = torch.rand_like(model.conv.weight) * 0.3  # positive: some neurons fire
    images = torch.rand(6, 1, 4, 4) * 2
    result = synaptic_operations(model, Split(images), torch.device("cpu"), batch_size=4)
    model(images)  # the same spikes again (deterministic), for the hand count
    conv_macs = 2 * 2 * 4 * 4 * 9  # T * out_channels * H * W * fan-in, per sample
    fc_macs = 2 * 3 * 32
    spikes_per_input = model.last_spikes.float().mean().item()
    assert result["layers"]["conv"]["macs"] == pytest.approx(conv_macs)
    assert result["layers"]["conv"]["kind"] == "analog"  # the analog image: MACs, not SOPs
    assert result["layers"]["conv"]["sops"] == 0
    assert result["layers"]["fc"]["macs"] == pytest.approx(fc_macs)
    assert result["layers"]["fc"]["kind"] == "spiking"
    assert result["total_sops"] == pytest.approx(fc_macs * spikes_per_input, rel=1e-4)
    assert result["energy_mj"] == pytest.approx((E_MAC_PJ * conv_macs + E_AC_PJ * fc_macs * spikes_per_input) * 1e-9,
                                                rel=1e-4)
    assert 0 < spikes_per_input < 1
