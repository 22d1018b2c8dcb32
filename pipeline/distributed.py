"""DDP plumbing for student training: which rank this process is, and the few collectives we need.

torchrun (or `bkd train-student --nproc N`, which wraps it) starts one process per rank and sets
WORLD_SIZE / RANK / LOCAL_RANK; `process_group` turns that into an initialised process group
(gloo on CPU, nccl on GPU, one GPU per local rank). Without torchrun everything here is a no-op
for a single rank, so the training loop has one code path.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import signal
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import BkdError

PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def seed(self, base: int) -> int:
        """A reproducible seed for this rank's own random draws, distinct per rank."""
        return int(np.random.SeedSequence([base, self.rank]).generate_state(1)[0])

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def all_true(self, flag: bool) -> bool:
        """True only if `flag` holds on every rank (so all ranks take the same branch)."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([int(flag)], device=_collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return bool(tensor.item())

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (picklable objects)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def check_replicas(self, module: nn.Module, name: str) -> None:
        """Refuse to go on if the ranks' copies of `module`'s parameters differ.

        DDP keeps every parameter it wraps equal on all ranks; one left outside it (a head
        trained by the loss, say) would drift silently, so this is checked every epoch.
        """
        if not self.distributed:
            return
        digest = hashlib.sha256()
        for param in module.parameters():
            digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        if len(set(self.gather(digest.hexdigest()))) > 1:
            raise BkdError(f"the {self.world_size} ranks hold different '{name}' parameters: some are not synchronised "
                           "by DistributedDataParallel")

    def sync_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm statistics) to every rank, so all ranks hold rank 0's model."""
        if self.distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer, 0)


def split_global_batch(global_batch: int, processes: int) -> int:
    """Each process's part of student.batch_size, which is the global batch."""
    if global_batch % processes:
        raise BkdError(f"student.batch_size {global_batch} is the global batch; it must divide by the "
                       f"{processes} processes")
    return global_batch // processes


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def launched_ranks() -> Ranks:
    """The ranks torchrun describes in the environment (one rank when not launched by it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, ranks: Ranks = Ranks()) -> torch.device:
    """'auto' | 'cpu' | 'cuda[:N]'; under DDP each rank takes cuda:LOCAL_RANK.

    Also checked here, not only by config validation: `bkd extract-teacher --device` passes
    the command line's string straight in.
    """
    match = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", name)
    if match is None:
        shown = name if len(name) <= 40 else name[:37] + "..."
        raise BkdError(f"device {shown!r}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BkdError(f"device '{name}' requested but CUDA is not available on this machine")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise BkdError(f"device '{name}': this machine has {count} visible GPU{'s' * (count != 1)} "
                       f"(cuda:0 to cuda:{count - 1})")
    if ranks.distributed and name.startswith("cuda"):
        if name != "cuda":
            raise BkdError(f"device '{name}' names one GPU, but each of the {ranks.world_size} ranks takes "
                           "cuda:LOCAL_RANK; set the device to auto or cuda")
        name = f"cuda:{ranks.local_rank}"
    return torch.device(name)


def _die_with_launcher() -> None:
    """Have the kernel SIGKILL this rank when its launcher dies (Linux).

    torchrun starts every rank in a session of its own, so a launcher killed with SIGKILL (which
    it cannot forward) would leave its ranks training on, still writing the run directory that a
    `--resume` is about to use.
    """
    if not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise BkdError(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if os.getppid() != launcher:  # it died before the request took effect
        raise BkdError("the torchrun launcher of this rank is gone; not starting")


@contextlib.contextmanager
def process_group(device_name: str):
    """Yield (ranks, device); under torchrun, with the process group initialised for the duration."""
    ranks = launched_ranks()
    device = resolve_device(device_name, ranks)
    if not ranks.distributed:
        yield ranks, device
        return
    _die_with_launcher()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield ranks, device
    finally:
        dist.destroy_process_group()
