"""Accuracy, firing rates, metrics JSON and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pipeline.neurons import spiking_layers


@torch.no_grad()
def predict(model: nn.Module, split, device: torch.device, batch_size: int = 500,
            indices: Sequence[int] | None = None) -> torch.Tensor:
    """Predicted classes for `indices` of the split (all of it by default)."""
    indices = range(len(split)) if indices is None else indices
    was_training = model.training
    model.eval()
    preds = []
    for start in range(0, len(indices), batch_size):
        images = split.load(indices[start:start + batch_size]).to(device)
        preds.append(model(images).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(preds)


def count_correct(model: nn.Module, split, device: torch.device,
                  indices: Sequence[int] | None = None) -> tuple[int, int]:
    """(correct top-1 predictions, samples) over `indices` of the split (all of it by default)."""
    indices = range(len(split)) if indices is None else indices
    correct = (predict(model, split, device, indices=indices) == split.labels[list(indices)]).sum().item()
    return correct, len(indices)


def accuracy(model: nn.Module, split, device: torch.device) -> float:
    correct, total = count_correct(model, split, device)
    return correct / total


@torch.no_grad()
def firing_rates(model: nn.Module, split, device: torch.device, batch_size: int = 500) -> dict[str, float]:
    """Mean spikes per neuron per timestep of every spiking layer over `split`."""
    totals: dict[str, list[float]] = {}
    hooks = []
    for name, module in spiking_layers(model):
        totals[name] = [0.0, 0.0]  # spikes, neuron-timesteps

        def hook(_m, _inp, out, name=name):
            totals[name][0] += out.sum().item()
            totals[name][1] += out.numel()

        hooks.append(module.register_forward_hook(hook))
    _predict_with_hooks(model, split, device, batch_size, hooks)
    return {name: s / n for name, (s, n) in totals.items() if n}


def _predict_with_hooks(model, split, device, batch_size, hooks) -> None:
    """Run the model over the split for its forward hooks' sake, then remove them."""
    try:
        predict(model, split, device, batch_size)
    finally:
        for h in hooks:
            h.remove()


# Energy per operation in 45 nm CMOS (Horowitz, ISSCC 2014), as SNN papers use them.
E_MAC_PJ, E_AC_PJ = 4.6, 0.9


@torch.no_grad()
def synaptic_operations(model: nn.Module, split, device: torch.device, batch_size: int = 500) -> dict:
    """Operations per sample of every Conv2d / Linear layer, summed over the T timesteps.

    MACs_l = sum over calls of (output elements) * (in_channels / groups) * kh * kw, divided by N
    SOPs_l = MACs_l * s_l,   s_l = mean input value: spikes per input (SEW ADD sums count twice)
    A layer fed integer-valued inputs (spikes) does accumulates only; a layer fed analog values
    (the encoding layer on the image) does MACs:
    energy = E_MAC * MACs(analog layers) + E_AC * SOPs(spiking layers).
    """
    stats: dict[str, dict] = {}
    hooks = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        stats[name] = {"macs": 0.0, "sops": 0.0, "spiking_input": True}

        def hook(m, inputs, out, name=name):
            x = inputs[0]
            fan_in = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1] \
                if isinstance(m, nn.Conv2d) else m.in_features
            macs = out.numel() * fan_in
            entry = stats[name]
            entry["macs"] += macs
            entry["sops"] += macs * x.float().mean().item()
            entry["spiking_input"] = entry["spiking_input"] and bool(((x >= 0) & (x == x.round())).all())

        hooks.append(module.register_forward_hook(hook))
    _predict_with_hooks(model, split, device, batch_size, hooks)
    n = len(split)
    layers = {name: {"macs": e["macs"] / n, "sops": e["sops"] / n, "spiking_input": e["spiking_input"]}
              for name, e in stats.items() if e["macs"]}
    sops = sum(v["sops"] for v in layers.values() if v["spiking_input"])
    analog_macs = sum(v["macs"] for v in layers.values() if not v["spiking_input"])
    return {"layers": layers, "total_sops": sops, "total_macs_analog": analog_macs,
            "energy_mj": (E_MAC_PJ * analog_macs + E_AC_PJ * sops) * 1e-9}  # pJ -> mJ


def plot_training_curves(history: list[dict], title: str, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    loss_keys = [k for k in history[0] if k.startswith("train_") and k != "train_accuracy"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key in loss_keys:
        ax_loss.plot(epochs, [row[key] for row in history], marker="o", label=key.removeprefix("train_"))
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss terms", yscale="log")
    ax_loss.legend()
    for key in ("train_accuracy", "test_accuracy"):
        ax_acc.plot(epochs, [row[key] for row in history], marker="o", label=key.replace("_", " "))
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy", title="accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_firing_rates(rates: dict[str, float], title: str, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rates)), 4))
    ax.bar(range(len(rates)), list(rates.values()))
    ax.set_xticks(range(len(rates)), list(rates), rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="spikes / neuron / timestep", title=title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def teacher_accuracy(targets, labels: torch.Tensor) -> float:
    """The teacher's top-1 on a split's clean inputs (view 0), from its cached logits (not run)."""
    correct = 0
    for chunk in range(targets.layout.num_chunks):
        rows = targets.read_chunk(chunk)
        start = chunk * targets.chunk_size
        correct += int((rows["logits"][:, 0].argmax(1) == labels[start:start + len(rows["logits"])].numpy()).sum())
    return correct / len(targets)


def run_config(cfg, run_dir: str | Path):
    """The config a student run was trained with; refused if `cfg` contradicts it.

    Evaluation takes the model, T and data from the run itself, so a run is never evaluated
    with settings it was not trained with; only result-neutral fields (the device) come from `cfg`.
    """
    from pipeline.config import format_override, load_config
    from pipeline.errors import BkdError
    from pipeline.rundir import config_difference, saved_config

    difference = config_difference(saved_config(run_dir), cfg.to_dict(), "evaluate")
    if difference:
        raise BkdError(f"{run_dir} was trained with another config: {difference}; evaluate it with the run's "
                       f"config ({Path(run_dir) / 'config.yaml'})")
    neutral = ("student.device", "extract.store", "teacher.checkpoint", "data.root")
    return load_config(Path(run_dir) / "config.yaml", [format_override(key, _get_dotted(cfg, key)) for key in neutral])


def _get_dotted(cfg, dotted: str):
    for key in dotted.split("."):
        cfg = getattr(cfg, key)
    return cfg


def evaluate_student(cfg, run_dir: str | Path, plots_dir: str | Path, trust_store_teacher: bool = False) -> dict:
    """Metrics of a trained student run: accuracies, firing rates; writes PNG plots."""
    import json

    from safetensors import safe_open

    from pipeline import checkpoint
    from pipeline.data import load_splits
    from pipeline.distributed import resolve_device
    from pipeline.errors import BkdError
    from pipeline.extract import open_student_targets
    from pipeline.models import create_student

    run_dir, plots_dir = Path(run_dir), Path(plots_dir)
    weights = run_dir / "student.safetensors"
    history_path = run_dir / "history.json"
    if not weights.is_file() or not history_path.is_file():
        raise BkdError(f"no trained student in {run_dir} (run `bkd train-student --distill {cfg.student.distill}` "
                       "to the end first)")
    cfg = run_config(cfg, run_dir)
    scfg = cfg.student
    test = load_splits(cfg.data, ("train", "test"))["test"]  # numbered as the student was trained
    student = create_student(scfg.model, test.num_classes, test.image_shape, scfg.timesteps, **scfg.model_kwargs)
    try:
        history = json.loads(history_path.read_text())
    except ValueError:
        raise BkdError(f"{history_path}: not a readable history; train the run again") from None
    try:
        with safe_open(str(weights), "pt") as fh:
            trained_epochs = (fh.metadata() or {}).get("epochs")
    except Exception as exc:  # a truncated or foreign file
        raise BkdError(f"{weights}: not a readable safetensors file ({type(exc).__name__})") from None
    if trained_epochs != str(len(history)) or len(history) != scfg.epochs:
        raise BkdError(f"{run_dir}: the weights ({trained_epochs} epochs), history ({len(history)}) and config "
                       f"({scfg.epochs}) do not belong to one finished run; train it again")
    device = resolve_device(scfg.device)
    student.load_state_dict(checkpoint.load_weights(weights))
    student.to(device).eval()
    rates = firing_rates(student, test, device)
    operations = synaptic_operations(student, test, device)
    teacher = teacher_accuracy(open_student_targets(cfg, "test", test, trust_store_teacher), test.labels)
    plot_training_curves(history, f"student [{scfg.distill}], T={scfg.timesteps}", plots_dir / "training_curves.png")
    plot_firing_rates(rates, f"firing rate per spiking layer [{scfg.distill}]", plots_dir / "firing_rates.png")
    return {
        "distill": scfg.distill,
        "timesteps": scfg.timesteps,
        "test_accuracy": accuracy(student, test, device),
        "teacher_test_accuracy": teacher,
        "firing_rate_mean": float(np.mean(list(rates.values()))),
        "firing_rates": rates,
        "sops_per_sample": operations["total_sops"],
        "analog_macs_per_sample": operations["total_macs_analog"],
        "energy_mj_per_sample": operations["energy_mj"],
        "operations": operations["layers"],
        "epochs": len(history),
        "train_seconds": float(sum(row["seconds"] for row in history)),
    }
