"""Accuracy, firing rates, metrics JSON and plots."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.checkpoint import save_png
from pipeline.data import scored_split
from pipeline.metrics import predict_logits, topk_accuracy
from pipeline.student.neurons import spiking_layers


PLOT_FILES = ("training_curves.png", "layers.png")

# Energy per operation in 45 nm CMOS (Horowitz, ISSCC 2014), as SNN papers use them.
E_MAC_PJ, E_AC_PJ = 4.6, 0.9


class ActivityProbe:
    """Forward hooks that count, over one prediction pass, spikes per spiking layer and the
    operations of every Conv2d / Linear layer.

    A layer is *analog* (multiply-accumulates) when it runs before any spiking neuron in the
    forward pass -- the encoding layer on the image -- or when its input holds negative values;
    every other layer is fed spikes (or sums / averages of spikes) and does accumulates only.
    The kind is decided on the first batch and kept, so it does not depend on the data.

      MACs_l = (output elements) * (in_channels / groups) * kh * kw     (per call)
      SOPs_l = MACs_l * mean(input) * f,  f = T when the input is a time average (one call for
               all T steps: the classifier on averaged spikes), else 1
    Layers inside spikingjelly's multi-step wrappers run on all T steps at once, so MACs
    already count every timestep (direct encoding: the encoding layer's MACs are counted T times).
    """

    def __init__(self, model: nn.Module, timesteps: int):
        self.model, self.timesteps = model, timesteps
        self.spikes = {name: [0.0, 0.0] for name, _ in spiking_layers(model)}  # spikes, neuron-timesteps
        self.ops: dict[str, dict] = {}
        self._batch, self._spiked = 0, False
        self._hooks = [model.register_forward_pre_hook(self._start)]
        for name, module in spiking_layers(model):
            self._hooks.append(module.register_forward_hook(self._spiking_hook(name)))
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                self._hooks.append(module.register_forward_hook(self._ops_hook(name)))

    def _start(self, _module, inputs):
        self._batch, self._spiked = inputs[0].shape[0], False

    def _spiking_hook(self, name):
        def hook(_m, _inp, out):
            self._spiked = True
            self.spikes[name][0] += out.sum().item()
            self.spikes[name][1] += out.numel()
        return hook

    def _ops_hook(self, name):
        def hook(m, inputs, out):
            x = inputs[0]
            fan_in = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1] \
                if isinstance(m, nn.Conv2d) else m.in_features
            macs = out.numel() * fan_in
            entry = self.ops.get(name)
            if entry is None:
                analog = not self._spiked or bool((x < 0).any())
                averaged = not analog and self.timesteps > 1 and x.shape[0] == self._batch
                entry = self.ops[name] = {"kind": "analog" if analog else "spiking", "macs": 0.0, "sops": 0.0,
                                          "time_factor": self.timesteps if averaged else 1}
            entry["macs"] += macs
            if entry["kind"] == "spiking":
                entry["sops"] += macs * x.float().mean().item() * entry["time_factor"]
        return hook

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def firing_rates(self) -> dict[str, float]:
        return {name: s / n for name, (s, n) in self.spikes.items() if n}

    def firing_rate(self) -> float:
        """All spikes over all neuron-timesteps: the mean rate weighted by each layer's neurons."""
        spikes, count = (sum(v[i] for v in self.spikes.values()) for i in (0, 1))
        return spikes / count if count else 0.0

    def operations(self, samples: int) -> dict:
        layers = {name: {"kind": e["kind"], "macs": e["macs"] / samples, "sops": e["sops"] / samples}
                  for name, e in self.ops.items() if e["macs"]}
        sops = sum(v["sops"] for v in layers.values() if v["kind"] == "spiking")
        analog_macs = sum(v["macs"] for v in layers.values() if v["kind"] == "analog")
        return {"layers": layers, "total_sops": sops, "total_macs_analog": analog_macs,
                "energy_mj": (E_MAC_PJ * analog_macs + E_AC_PJ * sops) * 1e-9}  # pJ -> mJ


def _probe_pass(model: nn.Module, split, device: torch.device, timesteps: int, batch_size: int = 500, loader=None):
    probe = ActivityProbe(model, timesteps)
    try:
        logits = predict_logits(model, split, device, batch_size, loader=loader)
    finally:
        probe.remove()
    return probe, logits


def firing_rates(model: nn.Module, split, device: torch.device, batch_size: int = 500) -> dict[str, float]:
    """Mean spikes per neuron per timestep of every spiking layer over `split`."""
    return _probe_pass(model, split, device, getattr(model, "timesteps", 1), batch_size)[0].firing_rates()


def synaptic_operations(model: nn.Module, split, device: torch.device, batch_size: int = 500,
                        timesteps: int | None = None) -> dict:
    """Operations per sample of every Conv2d / Linear layer over the T timesteps (see ActivityProbe)."""
    timesteps = timesteps if timesteps is not None else getattr(model, "timesteps", 1)
    return _probe_pass(model, split, device, timesteps, batch_size)[0].operations(len(split))


def plot_training_curves(history: list[dict], title: str, path: str | Path, split: str = "test") -> None:
    """Loss terms and accuracies per epoch; `split` names what `test_accuracy` was scored on."""
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
        ax_acc.plot(epochs, [row[key] for row in history], marker="o",
                    label=key.replace("_", " ").replace("test", split))
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy", title="accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def plot_layers(rates: dict[str, float], operations: dict[str, dict], title: str, path: str | Path) -> None:
    """Firing rate per spiking layer, and MACs / SOPs per Conv/Linear layer (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_ops) = plt.subplots(1, 2, figsize=(max(10, 0.5 * (len(rates) + len(operations))), 4.5))
    ax_rate.bar(range(len(rates)), list(rates.values()))
    ax_rate.set_xticks(range(len(rates)), list(rates), rotation=45, ha="right", fontsize=8)
    ax_rate.set(ylabel="spikes / neuron / timestep", title="firing rate")
    names = list(operations)
    counts = [operations[n]["macs"] if operations[n]["kind"] == "analog" else operations[n]["sops"] for n in names]
    colors = ["tab:red" if operations[n]["kind"] == "analog" else "tab:blue" for n in names]
    ax_ops.bar(range(len(names)), counts, color=colors)
    ax_ops.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax_ops.set(yscale="log", ylabel="operations / sample", title="MACs (red, analog input) and SOPs (blue)")
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path)
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
    neutral = ("student.device", "extract.store", "extract.identity", "teacher.checkpoint", "data.root")
    return load_config(Path(run_dir) / "config.yaml", [format_override(key, _get_dotted(cfg, key)) for key in neutral])


def _get_dotted(cfg, dotted: str):
    for key in dotted.split("."):
        cfg = getattr(cfg, key)
    return cfg


def evaluate_student(cfg, run_dir: str | Path, plots_dir: str | Path, trust_store_teacher: bool = False) -> dict:
    """Metrics of a trained student run: accuracies, firing rates, and the split they were scored on
    (`split`: test, or validation for the train rows data.holdout holds out); writes PNG plots."""
    import json

    from safetensors import safe_open

    from pipeline import checkpoint
    from pipeline.distributed import resolve_device
    from pipeline.errors import BkdError, StoreError
    from pipeline.student.models import create_student
    from pipeline.student.splits import dataset_files, student_splits

    run_dir, plots_dir = Path(run_dir), Path(plots_dir)
    weights = run_dir / "student.safetensors"
    history_path = run_dir / "history.json"
    if not weights.is_file() or not history_path.is_file():
        raise BkdError(f"no trained student in {run_dir} (run `bkd train-student --distill {cfg.student.distill}` "
                       "to the end first)")
    cfg = run_config(cfg, run_dir)
    scfg = cfg.student
    files = dataset_files(cfg)  # numbered as the student was trained
    if scfg.targets == "online" and isinstance(files, Exception):  # trained without a store: the files
        raise files
    test = None if isinstance(files, Exception) else files["test"]
    student = None
    if test is not None:  # a student the config cannot build is refused before the store is opened
        student = create_student(scfg.model, test.num_classes, test.image_shape, scfg.timesteps, **scfg.model_kwargs)
    if scfg.targets != "online":  # the store's test split, and its images where it holds them
        splits, stores = student_splits(cfg, trust_store_teacher, log=True, files=files)
        test, stored = splits["test"], stores.get("test")
        if stored is None:
            raise StoreError(f"{cfg.extract.store} holds no test split, so the teacher's test accuracy is unknown "
                             "(add test to extract.splits and re-extract)")
    if student is None:
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
    if trained_epochs != str(len(history)) or len(history) != scfg.train_epochs():
        raise BkdError(f"{run_dir}: the weights ({trained_epochs} epochs), history ({len(history)}) and config "
                       f"({scfg.train_epochs()}) do not belong to one finished run; train it again")
    device = resolve_device(scfg.device)
    student.load_state_dict(checkpoint.load_weights(weights))
    student.to(device).eval()
    probe, logits = _probe_pass(student, test, device, scfg.timesteps, loader=cfg.loader)
    rates, operations = probe.firing_rates(), probe.operations(len(test))
    if scfg.targets == "online":  # trained without a store: the teacher's own test accuracy
        from pipeline.metrics import accuracy
        from pipeline.teacher.models import load_teacher

        model = load_teacher(cfg.teacher, test.num_classes, test.image_shape).to(device).eval()
        teacher = accuracy(model, test, device, loader=cfg.loader)
    else:
        teacher = teacher_accuracy(stored, test.labels)
    curves, layers = (plots_dir / name for name in PLOT_FILES)
    holdout = cfg.data.holdout
    split = scored_split(cfg.data)  # what every accuracy here was scored on
    plot_training_curves(history, f"student [{scfg.distill}], T={scfg.timesteps}", curves, split)
    plot_layers(rates, operations["layers"], f"per layer [{scfg.distill}], T={scfg.timesteps}", layers)
    best = max(range(len(history)), key=lambda i: history[i]["test_accuracy"])
    headline = {
        "split": split,
        "top1": topk_accuracy(logits, test.labels, 1),
        "top5": topk_accuracy(logits, test.labels, 5),
        "best_epoch": best + 1,
        "best_top1": history[best]["test_accuracy"],
        "teacher_top1": teacher,
        "firing_rate": probe.firing_rate(),
        "sops_per_sample": operations["total_sops"],
        "analog_macs_per_sample": operations["total_macs_analog"],
        "energy_mj_per_sample": operations["energy_mj"],
        "timesteps": scfg.timesteps,
        "epochs": len(history),
        "train_seconds": float(sum(row["seconds"] for row in history)),
    }
    scored_on = f"validation: {holdout} held-out rows of the train split (data.holdout)" if holdout else "test"
    report = {"distill": scfg.distill, "targets": scfg.targets, "scored_on": scored_on, "firing_rates": rates,
              "operations": operations["layers"],
              "energy_pj": {"mac": E_MAC_PJ, "ac": E_AC_PJ}}
    return headline, report
