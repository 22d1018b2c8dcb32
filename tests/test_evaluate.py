"""Synaptic operations and energy against a hand count on a tiny spiking network; the split a run is
scored on, in its metrics file and on stdout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from spikingjelly.activation_based import functional, layer
from torch import nn

from pipeline.student.evaluate import E_AC_PJ, E_MAC_PJ, synaptic_operations
from pipeline.student.neurons import lif
from tests.helpers import TINY, assert_one_line, run_bkd


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


class TwoLayerSNN(nn.Module):
    """conv -> LIF (2x4x4 neurons) -> conv -> LIF (4x4x4 neurons), T = 3, classifier on time-averaged spikes."""

    timesteps = 3

    def __init__(self):
        super().__init__()
        self.conv1 = layer.Conv2d(1, 2, 3, padding=1, bias=False)
        self.sn1 = lif(v_threshold=0.3)
        self.conv2 = layer.Conv2d(2, 4, 3, padding=1, bias=False)
        self.sn2 = lif(v_threshold=0.3)
        self.fc = nn.Linear(64, 3, bias=False)
        functional.set_step_mode(self, "m")

    def forward(self, x):
        functional.reset_net(self)
        x = x.unsqueeze(0).repeat(3, 1, 1, 1, 1)
        self.s1 = self.sn1(self.conv1(x))
        self.s2 = self.sn2(self.conv2(self.s1))
        self.avg = self.s2.mean(0).flatten(1)  # [B, 64]: the classifier sees the spikes averaged over T
        return self.fc(self.avg)


def test_weighted_firing_rate_and_the_classifier_on_averaged_spikes():
    from pipeline.student.evaluate import ActivityProbe, _probe_pass

    torch.manual_seed(1)
    model = TwoLayerSNN()
    for conv in (model.conv1, model.conv2):
        conv.weight.data = torch.rand_like(conv.weight) * 0.4
    images = torch.rand(5, 1, 4, 4) * 2
    probe, _ = _probe_pass(model, Split(images), torch.device("cpu"), timesteps=3, batch_size=5)
    model(images)
    s1, s2 = model.s1.sum().item(), model.s2.sum().item()
    n1, n2 = model.s1.numel(), model.s2.numel()
    assert probe.firing_rate() == pytest.approx((s1 + s2) / (n1 + n2))  # weighted by neurons, not mean of rates
    ops = probe.operations(len(images))
    kinds = {name: layer_ops["kind"] for name, layer_ops in ops["layers"].items()}
    assert kinds == {"conv1": "analog", "conv2": "spiking", "fc": "spiking"}
    fc_macs = 3 * 64  # one call on [B, 64] per sample
    assert ops["layers"]["fc"]["macs"] == pytest.approx(fc_macs)
    # T accumulates per input spike: SOPs = T * MACs * mean(averaged input) = fan-out * spikes
    assert ops["layers"]["fc"]["sops"] == pytest.approx(3 * fc_macs * model.avg.mean().item(), rel=1e-5)
    assert ops["layers"]["fc"]["sops"] == pytest.approx(3 * s2 / len(images), rel=1e-5)
    conv2_macs = 3 * 4 * 4 * 4 * 2 * 9
    assert ops["layers"]["conv2"]["sops"] == pytest.approx(conv2_macs * model.s1.mean().item(), rel=1e-5)
    assert all(layer_ops["sops"] >= 0 for layer_ops in ops["layers"].values())
    assert isinstance(probe, ActivityProbe)


@pytest.fixture(scope="module")
def holdout_project(tiny_project, tmp_path_factory):
    """tiny_project's teacher, a store and a `none` student of 40 train rows held out (data.holdout), and
    the stdout of its evaluation."""
    root = tmp_path_factory.mktemp("holdout")
    shutil.copytree(tiny_project / "configs", root / "configs")
    shutil.copytree(tiny_project / "models", root / "models")
    shutil.copy(tiny_project / "params.yaml", root / "params.yaml")
    args = [*TINY, "--set", "data.holdout=40"]
    run_bkd(["extract-teacher", *args], root)
    run_bkd(["train-student", *args, "--epochs", "1", "--distill", "none"], root)
    return root, run_bkd(["evaluate", *args, "--distill", "none"], root).stdout


@pytest.mark.slow
def test_a_run_scored_on_held_out_rows_says_validation_in_its_metrics_and_on_stdout(holdout_project, tiny_project,
                                                                                     tmp_path):
    root, stdout = holdout_project
    metrics = json.loads((root / "metrics/student-none.json").read_text())
    assert metrics["split"] == "validation" and 0.0 <= metrics["top1"] <= 1.0
    assert stdout.startswith("student [none]: validation top-1 ")
    assert "scored on validation: 40 held-out rows of the train split (data.holdout)" in stdout
    report = json.loads((root / "reports/student-none.json").read_text())
    assert report["scored_on"].startswith("validation: 40 held-out rows")

    again = ["--metrics", str(tmp_path / "m.json"), "--report", str(tmp_path / "r.json"),
             "--plots-dir", str(tmp_path / "plots")]  # tiny_project's own outputs are left as they are
    out = run_bkd(["evaluate", *TINY, "--distill", "mixed", *again], tiny_project).stdout
    assert out.startswith("student [mixed]: test top-1 ") and "validation" not in out
    assert json.loads((tmp_path / "m.json").read_text())["split"] == "test"

    # the two side by side: refused by `bkd compare` until one split is chosen
    shutil.copy(tmp_path / "m.json", root / "metrics/student-mixed.json")
    proc = run_bkd(["compare"], root, check=False)
    assert_one_line(proc.returncode, proc.stderr, "scored on different splits (test: mixed; validation: none)")
    assert "none top1" in run_bkd(["compare", "--split", "validation"], root).stdout
