"""The spiking neuron every student uses, built from spikingjelly.

Multi-step LIF (tau = 2, hard reset to 0, threshold 1) with the reset detached from the
graph and an arctangent surrogate gradient, as in SEW-ResNet and the BKDSNN code.
"""

from __future__ import annotations

from spikingjelly.activation_based import neuron, surrogate


def lif(tau: float = 2.0, detach_reset: bool = True, **kwargs) -> neuron.LIFNode:
    """A multi-step LIF node: input and output shaped [T, B, ...]."""
    return neuron.LIFNode(
        tau=tau,
        detach_reset=detach_reset,
        surrogate_function=surrogate.ATan(),
        step_mode="m",
        **kwargs,
    )


def spiking_layers(model):
    """(name, module) for every LIF node of `model`, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, neuron.BaseNode)]
