"""bkd: offline Blurred Knowledge Distillation for spiking neural networks."""

__version__ = "0.1.0"
