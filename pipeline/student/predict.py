"""Run a trained student on new inputs, from its weights file alone.

`bkd train-student` writes `student.safetensors` with metadata naming the model, its
arguments, T, the classes and the input transform (`pipeline.student.train.student_metadata`); this
module rebuilds the student from it and classifies images: a folder of image files, one image
file, or a `.npy` array of raw images (N, C, H, W) or (N, H, W), uint8 as the dataset stores them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import BkdError, clip

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_student(weights: str | Path, device: torch.device):
    """(student in eval mode, its metadata) from a weights file written by `bkd train-student`."""
    from safetensors import safe_open

    from pipeline.checkpoint import load_weights
    from pipeline.student.models import create_student

    path = Path(weights)
    if path.is_dir():
        path = path / "student.safetensors"
    if not path.is_file():
        raise BkdError(f"{path} not found: give a run folder or its student.safetensors")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as exc:  # a truncated or foreign file
        raise BkdError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None
    if meta.get("format") != "bkd-student/1":
        raise BkdError(f"{path} carries no bkd student description (trained by an older bkd?); train it again")
    meta = {**meta, **{k: json.loads(meta[k]) for k in ("model_kwargs", "input_shape", "transform")},
            "timesteps": int(meta["timesteps"]), "num_classes": int(meta["num_classes"])}
    model = create_student(meta["model"], meta["num_classes"], tuple(meta["input_shape"]), meta["timesteps"],
                           **meta["model_kwargs"])
    model.load_state_dict(load_weights(path))
    return model.to(device).eval(), meta


def read_inputs(source: str | Path, input_shape: list[int]) -> tuple[list[str], np.ndarray]:
    """(names, raw images shaped (N, *input_shape)) from a folder, an image file or a .npy array."""
    path = Path(source)
    channels, height, width = input_shape[-3:]
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BkdError(f"{path}: not a readable .npy array ({exc})") from None
        if array.ndim == len(input_shape) and channels == 1 and tuple(array.shape[1:]) == (height, width):
            array = array[:, None]
        if array.ndim >= 1 and len(array) == 0:
            raise BkdError(f"{path}: holds no images (shape {array.shape})")
        if tuple(array.shape[1:]) != tuple(input_shape):
            raise BkdError(f"{path}: arrays of shape (N, {', '.join(map(str, input_shape))}) expected, "
                           f"found {array.shape}")
        if array.dtype != np.uint8 and len(input_shape) == 3:
            raise BkdError(f"{path}: raw uint8 images expected (as the dataset stores them), found {array.dtype}")
        return [f"{path.name}[{i}]" for i in range(len(array))], array
    if len(input_shape) != 3:
        raise BkdError(f"this student reads event frames {tuple(input_shape)}: give them as a .npy array")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise BkdError(f"{path}: no image files (expected {', '.join(IMAGE_SUFFIXES)}, or a .npy array)")
    from PIL import Image, UnidentifiedImageError

    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
                pixels = np.asarray(image, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:  # a bomb: PIL's pixel limit
            raise BkdError(f"{file}: not a readable image ({clip(str(exc), 160)})") from None
        images.append(pixels[None] if channels == 1 else pixels.transpose(2, 0, 1))
    return [f.name for f in files], np.stack(images)


@torch.no_grad()
def predict_raw(model, meta: dict, raw: np.ndarray, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Class probabilities (N, classes) of raw inputs, normalized with the student's training transform."""
    transform = meta["transform"]
    view = (-1,) + (1,) * 2
    mean = torch.tensor(transform["mean"]).view(view)
    std = torch.tensor(transform["std"]).view(view)
    out = []
    for start in range(0, len(raw), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(raw[start:start + batch_size])).float() * transform["scale"]
        out.append(torch.softmax(model(((x - mean) / std).to(device)).float(), 1).cpu())
    return torch.cat(out)
