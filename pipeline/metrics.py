"""Predictions and accuracy of any classifier over a split (teacher and student alike)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.rawviews import device_batches


class _Batches(Dataset):
    """Item i: the clean inputs of the i-th span of rows of a split (loaded in a loader worker)."""

    def __init__(self, split, spans: list[Sequence[int]]):
        self.split, self.spans = split, spans

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _clean_inputs(self.split, self.spans[i])


def _clean_inputs(split, rows):
    """The clean inputs of `rows` as they cross to the device (`load_views`, where the split has it)."""
    return split.load_views(rows) if hasattr(split, "load_views") else split.load(rows)


def _input_batches(split, indices: Sequence[int], batch_size: int, device: torch.device, loader=None):
    """The split's clean inputs for `indices`, `batch_size` at a time, in order: read in `loader.workers`
    worker processes when given and the split is read from files (decoding overlaps the model)."""
    spans = [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    if loader is None or not loader.workers or split.in_memory or len(spans) < 2:
        return (_clean_inputs(split, span) for span in spans)
    from pipeline.data import data_loader

    workers = min(loader.workers, len(spans))
    return data_loader(_Batches(split, spans), None, None, dataclasses.replace(loader, persistent_workers=False),
                       device, workers=workers)


@torch.no_grad()
def predict_logits(model: nn.Module, split, device: torch.device, batch_size: int = 500,
                   indices: Sequence[int] | None = None, loader=None) -> torch.Tensor:
    """Logits for `indices` of the split (all of it by default), in eval mode; `loader` (a LoaderConfig):
    read the inputs in its worker processes."""
    indices = range(len(split)) if indices is None else indices
    was_training = model.training
    model.eval()
    out = []
    for images in device_batches(_input_batches(split, indices, batch_size, device, loader), device):
        out.append(model(images).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def predict(model: nn.Module, split, device: torch.device, batch_size: int = 500,
            indices: Sequence[int] | None = None, loader=None) -> torch.Tensor:
    """Predicted classes for `indices` of the split (all of it by default)."""
    return predict_logits(model, split, device, batch_size, indices, loader).argmax(1)


def count_correct(model: nn.Module, split, device: torch.device,
                  indices: Sequence[int] | None = None, loader=None) -> tuple[int, int]:
    """(correct top-1 predictions, samples) over `indices` of the split (all of it by default)."""
    indices = range(len(split)) if indices is None else indices
    correct = (predict(model, split, device, indices=indices, loader=loader) == split.labels[list(indices)]).sum().item()
    return correct, len(indices)


def accuracy(model: nn.Module, split, device: torch.device, loader=None) -> float:
    correct, total = count_correct(model, split, device, loader=loader)
    return correct / total


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of samples whose label is among the k largest logits (k capped at the class count)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels.view(-1, 1)).any(1).float().mean().item()


# The plots `evaluate_student` writes into its plots folder.
