"""The store's codecs on real features: bytes per sample and view, and the error each puts into every loss.

    python -m benchmarks.codecs [--quick] [--batch 16] [--json docs/studies/codecs.json] [--plot OUT.png]
    python -m benchmarks.codecs --replot docs/studies/codecs.json --plot docs/studies/codecs.png

Workloads (trained weights, never random ones: random-init activations have other statistics):

  default        the trained default teacher (`models/teacher.safetensors`, `dvc repro train_teacher`)
                 on the embedded digits: layer1 (64x14x14), layer2 (128x7x7), pre_logits, logits
  resnet18-224   timm resnet18 at 224, trained here from scratch for a few epochs to tell which of
                 the shipped photographs a random crop comes from: layer3 (256x14x14), layer4
                 (512x7x7, the shape of SEW-ResNet-18/34's cached map), pre_logits, logits
  vit_small-224  timm vit_small_patch16_224, trained the same way: pre_logits and logits (what the
                 Spikingformer rows cache; a transformer block's tokens are no store location)

Bytes: each codec's arrays (codes and scales) written through its real zarr codecs in chunks of
the store's default 256 rows, per sample and view, against float16 + zstd.

Errors, against float32 targets, for each form of the BKD loss a location is read in:
  map     a student map regressing the teacher's map at this location
  cml     a student map regressing the pooled vector (pre_logits)
  pooled  a student vector regressing the pooled vector
the student being the teacher's own previous stage (`STUDENT_OF`): a feature that carries much but not
all of the target. Its BKD head (alignment and generation block) is first fitted for `--steps` Adam
steps to the float32 targets, the blur mask then fixed; at that point the loss and its gradient with
respect to the student feature are computed with the float32 and the decoded targets:
  loss error = |L(decoded) - L(float32)| / L(float32), gradient error = |g(decoded) - g(float32)| / |g(float32)|.
`residual` is |restored - target| / |target| there: how close the fitted head came. KD and WSLD
(tau = 2) read the logits the same way, from a linear student head on pre_logits fitted by KD.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from tqdm import tqdm
from zarr.codecs import ZstdCodec

from pipeline.checkpoint import write_json
from pipeline.targets.codecs import CODECS, CodecError

CHUNK = 256
STEPS = 200
# For each workload: {target location: (student location, BKD forms)}; "pool:<loc>" is that map averaged.
STUDENT_OF = {
    "default": {"layer1": ("act1", ("map",)), "layer2": ("layer1", ("map",)),
                "pre_logits": ("layer3", ("cml",)), "pre_logits ": ("pool:layer3", ("pooled",))},
    "resnet18-224": {"layer3": ("layer2", ("map",)), "layer4": ("layer3", ("map",)),
                     "pre_logits": ("layer4", ("cml",)), "pre_logits ": ("pool:layer3", ("pooled",))},
    "vit_small-224": {"pre_logits": ("blocks.8", ("cml",)), "pre_logits ": ("pool:blocks.8", ("pooled",))},
}


# --- workloads -----------------------------------------------------------------------------------

def _outputs(model, images: torch.Tensor, locations: list[str], batch: int = 32) -> dict[str, np.ndarray]:
    """{location: float32 array} over `images`: pre_logits and logits as the teacher gives them to the store,
    module outputs by forward hooks (a transformer block's patch tokens as a (C, H, W) map)."""
    from pipeline.teacher.models import teacher_outputs

    modules = [loc for loc in locations if loc not in ("pre_logits", "logits")]
    captured: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(loc).register_forward_hook(
        lambda _m, _i, out, loc=loc: captured.__setitem__(loc, out)) for loc in modules]
    out: dict[str, list] = {loc: [] for loc in locations}
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch):
                features, logits = teacher_outputs(model, images[start:start + batch], ["pre_logits"])
                for loc in locations:
                    value = {"pre_logits": features["pre_logits"], "logits": logits}.get(loc, captured.get(loc))
                    if value.dim() == 3:  # tokens (B, 1 + HW, C): the patch tokens as a (C, H, W) map
                        side = int((value.shape[1] - 1) ** 0.5)
                        value = value[:, -side * side:].transpose(1, 2).reshape(len(value), -1, side, side)
                    out[loc].append(value.float().numpy())
    finally:
        for hook in hooks:
            hook.remove()
    return {loc: np.concatenate(v) for loc, v in out.items()}


def default_workload(n: int, config: str = "params.yaml") -> dict[str, np.ndarray]:
    from pipeline.config import load_config
    from pipeline.data import load_splits
    from pipeline.teacher.models import load_teacher

    cfg = load_config(config)
    if not Path(cfg.teacher.checkpoint).is_file():
        raise SystemExit(f"{cfg.teacher.checkpoint} not found: train the default teacher first "
                         "(`dvc repro train_teacher` or `make run`)")
    split = load_splits(cfg.data, ["train"])["train"]
    images = split.load(list(range(min(n, len(split)))))
    model = load_teacher(cfg.teacher, split.num_classes, split.image_shape).eval()
    return _outputs(model, images, ["act1", "layer1", "layer2", "layer3", "pre_logits", "logits"])


def photo_crops(n: int, size: int, seed: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 3, size, size) normalised float, labels): random crops of the shipped photographs,
    each labelled with the photograph it comes from."""
    from benchmarks.photos import _crop, _rng, load_photos

    photos = load_photos()
    images, labels = np.empty((n, size, size, 3), np.uint8), np.empty(n, np.int64)
    for i in range(n):
        rng = _rng(seed, split, 0, i)
        labels[i] = int(rng.integers(len(photos)))
        images[i] = np.asarray(_crop(photos[labels[i]][1], rng, size, size))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std, torch.from_numpy(labels)


def trained_on_photos(model_name: str, num_classes: int, epochs: int, train: int, seed: int = 0):
    """timm `model_name` trained from scratch for `epochs` on `train` photo crops at 224 to tell which
    photograph a crop comes from (label: the photograph's index, modulo `num_classes`), in eval mode."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    images, labels = photo_crops(train, 224, seed)
    labels = labels % num_classes
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3 if "vit" not in model_name else 3e-4, weight_decay=0.05)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(train)
        correct = 0
        for start in tqdm(range(0, train, 32), desc=f"{model_name} epoch {epoch + 1}/{epochs}", leave=False):
            idx = order[start:start + 32]
            logits = model(images[idx])
            loss = F.cross_entropy(logits, labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(1) == labels[idx]).sum())
        tqdm.write(f"{model_name} epoch {epoch + 1}: train accuracy {correct / train:.3f}")
    return model.eval()


def photo_workload(model_name: str, n: int, epochs: int, train: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`trained_on_photos`' model (a head per photograph), then its features on `n` other crops."""
    from benchmarks.photos import load_photos

    model = trained_on_photos(model_name, len(load_photos()), epochs, train, seed)
    evaluation, _ = photo_crops(n, 224, seed, split="val")
    locations = {"resnet18": ["layer2", "layer3", "layer4"], "vit_small_patch16_224": ["blocks.8"]}
    return _outputs(model, evaluation, [*locations[model_name], "pre_logits", "logits"])


# --- bytes ---------------------------------------------------------------------------------------

def stored_bytes(codec, values: np.ndarray, level: int = 3) -> float:
    """Bytes per row of `values` (N, ...) kept by `codec`, through its real zarr codecs in CHUNK-row chunks."""
    codes, scales = codec.encode(values[:, None])  # one view
    total = 0
    for array, compressors in ((codes, codec.compressors(level, codes.dtype.itemsize)),
                               (scales, [ZstdCodec(level=level, checksum=True)])):
        if array is None:
            continue
        store = zarr.storage.MemoryStore()
        z = zarr.create_array(store, shape=array.shape, dtype=array.dtype, chunks=(min(CHUNK, len(array)),) + array.shape[1:],
                              compressors=compressors, fill_value=0)
        z[:] = array
        total += sum(len(v.to_bytes()) for key, v in store._store_dict.items() if key.startswith("c/"))
    return total / len(values)


def decoded(codec, values: np.ndarray) -> np.ndarray:
    codes, scales = codec.encode(values[:, None])
    return np.asarray(codec.decode(codes, scales), np.float32)[:, 0]


# --- loss errors ---------------------------------------------------------------------------------

def fitted_head(student: torch.Tensor, target: torch.Tensor, form: str, steps: int, seed: int, batch: int = 64):
    """A BKD head (alpha 1, blur 0.15) fitted by Adam on batches of `batch` to `target` from `student`, and its
    fixed mask."""
    from pipeline.student.losses import BKDHead

    torch.manual_seed(seed)
    head = BKDHead(student.shape[1], target.shape[1], blur_ratio=0.15, alpha=1.0, form=form)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    for step in range(steps):
        idx = torch.randint(0, len(student), (min(batch, len(student)),))
        loss = head(student[idx], target[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        mask = head.blur_mask(head.align(student))
    return head, mask


def loss_and_grad(head, mask, student: torch.Tensor, target: torch.Tensor) -> tuple[float, torch.Tensor]:
    s = student.clone().requires_grad_(True)
    loss = head(s, target, mask=mask)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.item(), grad


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else float(a != b)


class BKDProbe:
    """A BKD head fitted once to the float32 targets of one (student, target, form) pair; `errors` then
    compares the loss and gradient at decoded targets with those at the float32 ones."""

    def __init__(self, student: np.ndarray, target: np.ndarray, form: str, steps: int, seed: int = 0,
                 batch: int = 64):
        self.s, self.t = (torch.from_numpy(np.ascontiguousarray(x)).float() for x in (student, target))
        self.head, self.mask = fitted_head(self.s, self.t, form, steps, seed, batch)
        self.loss, self.grad = loss_and_grad(self.head, self.mask, self.s, self.t)
        self.residual = float(np.sqrt(self.loss * len(self.s)) / self.t.norm())  # alpha 1: |restored - t|^2 / N

    def errors(self, approx: np.ndarray) -> dict[str, float]:
        loss, grad = loss_and_grad(self.head, self.mask, self.s, torch.from_numpy(np.ascontiguousarray(approx)).float())
        return {"loss": relative(loss, self.loss), "grad": float((grad - self.grad).norm() / self.grad.norm()),
                "residual": self.residual}


class LogitsProbe:
    """KD and WSLD (tau 2) loss and gradient errors, from a linear student on pre_logits fitted once by KD."""

    def __init__(self, pre_logits: np.ndarray, logits: np.ndarray, steps: int, seed: int = 0,
                 temperature: float = 2.0):
        from pipeline.student.losses import kd_loss, wsld_loss

        x, self.z = (torch.from_numpy(np.ascontiguousarray(v)).float() for v in (pre_logits, logits))
        labels = self.z.argmax(1)
        torch.manual_seed(seed)
        student = torch.nn.Linear(x.shape[1], self.z.shape[1])
        optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
        for _ in range(steps):
            loss = kd_loss(student(x), self.z, temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.student_logits = student(x).detach()
        self.losses = {"kd": lambda s, t: kd_loss(s, t, temperature),
                       "wsld": lambda s, t: wsld_loss(s, t, labels, temperature)}
        self.reference = {name: self._loss_and_grad(fn, self.z) for name, fn in self.losses.items()}

    def _loss_and_grad(self, fn, target: torch.Tensor) -> tuple[float, torch.Tensor]:
        s = self.student_logits.clone().requires_grad_(True)
        loss = fn(s, target)
        (grad,) = torch.autograd.grad(loss, s)
        return loss.item(), grad

    def errors(self, approx: np.ndarray) -> dict[str, float]:
        out = {}
        for name, fn in self.losses.items():
            loss, grad = self._loss_and_grad(fn, torch.from_numpy(np.ascontiguousarray(approx)).float())
            reference_loss, reference_grad = self.reference[name]
            out[f"{name}_loss"] = relative(loss, reference_loss)
            out[f"{name}_grad"] = float((grad - reference_grad).norm() / reference_grad.norm())
        return out


def student_features(features: dict[str, np.ndarray], source: str) -> np.ndarray:
    if source.startswith("pool:"):
        return features[source[5:]].mean(axis=(2, 3))
    return features[source]


def measure(workload: str, features: dict[str, np.ndarray], steps: int, batch: int = 64) -> list[dict]:
    """One row per (location, codec): bytes and every loss form's errors, each probe fitted once."""
    rows = []
    pairs = STUDENT_OF[workload]
    for index, location in enumerate([*dict.fromkeys(key.strip() for key in pairs), "logits"]):
        values, measured = features[location], []
        if location == "logits":
            probes = {"": LogitsProbe(features["pre_logits"], values, steps)}
        else:
            probes = {form: BKDProbe(student_features(features, source), values, form, steps, batch=batch)
                      for key, (source, forms) in pairs.items() if key.strip() == location for form in forms}
        baseline = stored_bytes(CODECS["float16"], values)
        for name, codec in tqdm(CODECS.items(), desc=f"{workload} {location}", leave=False):
            try:
                approx = decoded(codec, values)
            except CodecError:  # uint8 on signed values
                continue
            row = {"workload": workload, "location": location, "shape": list(values.shape[1:]), "codec": name,
                   "bytes": stored_bytes(codec, values), "zero_fraction": float((values == 0).mean())}
            row["ratio"] = row["bytes"] / baseline
            for form, probe in probes.items():
                errors = probe.errors(approx)
                row |= {(f"{form}_{k}" if form else k): v for k, v in errors.items()}
            measured.append(row)
        tqdm.write(table(measured, header=index == 0))  # as each location is done: a long run shows progress
        rows += measured
    return rows


def table(rows: list[dict], header: bool = True) -> str:
    """Markdown rows of `measure`'s results (with the header line unless `header` is off)."""
    forms = ("map", "cml", "pooled")
    lines = ["| workload | location | codec | B/sample/view | × float16 | " +
             " | ".join(f"{f} loss / grad err" for f in forms) + " | KD loss / grad | WSLD loss / grad |",
             "|---" * 10 + "|"] if header else []
    for r in rows:
        cells = [f"{r[f + '_loss']:.1e} / {r[f + '_grad']:.1e}" if f + "_loss" in r else "" for f in forms]
        cells += [f"{r[k + '_loss']:.1e} / {r[k + '_grad']:.1e}" if k + "_loss" in r else "" for k in ("kd", "wsld")]
        lines.append(f"| {r['workload']} | {r['location']} {tuple(r['shape'])} | {r['codec']} | {r['bytes']:.0f} | "
                     f"{r['ratio']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


BOUNDS = {"loss": 1e-3, "grad": 1e-2}  # the error a codec may put into a BKD loss and its gradient
UNSIGNED = ["uint8", "uint7", "uint6", "uint5", "uint4"]


def over_bound(row: dict, form: str) -> float:
    """The larger of a row's BKD loss and gradient errors in `form`, each over its bound (<= 1: within both)."""
    return max(row[f"{form}_loss"] / BOUNDS["loss"], row[f"{form}_grad"] / BOUNDS["grad"])


def plot(result: dict, path: Path) -> None:
    """Bytes against the BKD error over its bound, one panel per workload: the unsigned codes of 8 to 4
    bits as a line per (location, form), bfloat16 and float8 (and int8 where no unsigned code applies)
    as markers; the bound and 0.35x marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.checkpoint import save_png

    rows = [r for r in result["rows"] if r["location"] != "logits"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 3.8), squeeze=False, sharey=True)
    for ax, workload in zip(axes[0], workloads):
        here = [r for r in rows if r["workload"] == workload]
        pairs = [(location, form) for location in dict.fromkeys(r["location"] for r in here)
                 for form in ("map", "cml", "pooled")
                 if any(f"{form}_grad" in r for r in here if r["location"] == location)]
        for i, (location, form) in enumerate(pairs):
            at = {r["codec"]: r for r in here if r["location"] == location}
            line = [at[c] for c in UNSIGNED if c in at]
            ax.plot([r["ratio"] for r in line], [over_bound(r, form) for r in line], "o-", color=f"C{i}", ms=3,
                    label=f"{location} ({form})")
            for r in line:
                ax.annotate(r["codec"][4:], (r["ratio"], over_bound(r, form)), fontsize=6)
            for codec, marker in (("bfloat16", "s"), ("float8", "x")) + ((("int8", "^"),) if not line else ()):
                if codec in at:
                    ax.plot(at[codec]["ratio"], over_bound(at[codec], form), marker, color=f"C{i}", ms=5)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.axvline(0.35, color="k", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("bytes per sample and view (x float16 + zstd)")
        ax.set_title(workload, fontsize=9)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("BKD error / bound (loss 1e-3, gradient 1e-2)")
    fig.suptitle("uint8..uint4: o, bits annotated; bfloat16: s; float8: x; int8: ^ (signed values); "
                 "bound: --; 0.35x: :", fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codecs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, steps and epochs (a check of the script)")
    parser.add_argument("--workloads", nargs="+", default=list(STUDENT_OF), choices=list(STUDENT_OF))
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=64, help="batch of the BKD head fits (smaller is faster)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    parser.add_argument("--plot", type=Path, default=None, metavar="OUT.png")
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="draw --plot from a saved --json result instead of measuring")
    args = parser.parse_args(argv)
    if args.replot:
        import json

        result = json.loads(args.replot.read_text())
        plot(result, args.plot or args.replot.with_suffix(".png"))
        return result
    n = args.samples or (64 if args.quick else 512)
    steps = args.steps or (20 if args.quick else STEPS)
    started = time.perf_counter()
    rows = []
    for workload in args.workloads:
        if workload == "default":
            features = default_workload(n)
        else:
            model = {"resnet18-224": "resnet18", "vit_small-224": "vit_small_patch16_224"}[workload]
            features = photo_workload(model, min(n, 256), epochs=1 if args.quick else 4,
                                      train=64 if args.quick else 512)
        rows += measure(workload, features, steps, args.batch)  # prints each location's rows as they are measured
    result = {"samples": n, "steps": steps, "batch": args.batch, "seconds": time.perf_counter() - started, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(result, args.json)
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
