"""The spiking neurons the students use, built from spikingjelly's own classes.

Every factory returns a multi-step node (`step_mode="m"`: input and output shaped [T, B, ...])
with a hard reset to 0, threshold 1 unless said otherwise, and the reset detached from the graph
(`detach_reset=True`), as every official BKDSNN model builds them. They differ in the charge
equation and in the surrogate gradient, which follow the code each paper row comes from:

  lif()                 LIF, tau 2, arctangent surrogate (alpha 2): the MNIST/CIFAR SEW students.
  spikingformer_lif()   LIF, tau 2, sigmoid surrogate (alpha 4): Spikingformer-CML. The official
                        code builds `spikingjelly.clock_driven.neuron.MultiStepLIFNode(tau=2.0,
                        detach_reset=True)`, whose default surrogate is `surrogate.Sigmoid()`;
                        its attention LIF passes `v_threshold=0.5`.
  if_node()             IF, arctangent surrogate (alpha 2): SEW-ResNet ImageNet. The official code
                        builds `spikingjelly.cext.neuron.MultiStepIFNode(detach_reset=True)`, whose
                        default is `surrogate_function='ATan', alpha=2.0`. spikingjelly 2.0's own
                        IFNode defaults to the sigmoid, so the surrogate is passed explicitly.
  plif()                parametric LIF (learnable 1/tau = sigmoid(w), initial tau 2), arctangent
                        surrogate (alpha 2): the CIFAR10-DVS SEW student, from the official
                        `cext.neuron.MultiStepParametricLIFNode(init_tau=2.0, detach_reset=True)`.

All of them are `neuron.BaseNode`s, which is what `spiking_layers` (and the activity probe in
pipeline.student.evaluate) looks for.
"""

from __future__ import annotations

from typing import Callable

from spikingjelly.activation_based import neuron, surrogate

from pipeline.errors import ConfigError, clip


def lif(tau: float = 2.0, detach_reset: bool = True, **kwargs) -> neuron.LIFNode:
    """A multi-step LIF node with the arctangent surrogate."""
    return neuron.LIFNode(
        tau=tau,
        detach_reset=detach_reset,
        surrogate_function=surrogate.ATan(),
        step_mode="m",
        **kwargs,
    )


def spikingformer_lif(v_threshold: float = 1.0, tau: float = 2.0, **kwargs) -> neuron.LIFNode:
    """Spikingformer-CML's LIF: tau 2, detached reset, spikingjelly's default Sigmoid surrogate."""
    return neuron.LIFNode(
        tau=tau,
        v_threshold=v_threshold,
        detach_reset=True,
        surrogate_function=surrogate.Sigmoid(),
        step_mode="m",
        **kwargs,
    )


def if_node(**kwargs) -> neuron.IFNode:
    """SEW-ResNet ImageNet's IF node: detached reset, the cext default ATan surrogate."""
    return neuron.IFNode(
        detach_reset=True,
        surrogate_function=surrogate.ATan(),
        step_mode="m",
        **kwargs,
    )


def plif(init_tau: float = 2.0, **kwargs) -> neuron.ParametricLIFNode:
    """The DVS SEW student's parametric LIF: learnable tau from 2, detached reset, ATan surrogate."""
    return neuron.ParametricLIFNode(
        init_tau=init_tau,
        detach_reset=True,
        surrogate_function=surrogate.ATan(),
        step_mode="m",
        **kwargs,
    )


NEURONS: dict[str, Callable[..., neuron.BaseNode]] = {"lif": lif, "if": if_node, "plif": plif}


def neuron_factory(name: str) -> Callable[..., neuron.BaseNode]:
    """The factory for a neuron named in `student.model_kwargs` (`lif`, `if` or `plif`)."""
    if not isinstance(name, str) or name not in NEURONS:
        raise ConfigError(f"student.model_kwargs: neuron must be one of {', '.join(NEURONS)}, "
                          f"got {clip(repr(name), 80)}")
    return NEURONS[name]


def spiking_layers(model):
    """(name, module) for every spiking neuron node of `model`, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, neuron.BaseNode)]
