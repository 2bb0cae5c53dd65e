"""Data-parallel training under torchrun (docs/training.md, "Multi-GPU (torchrun)").

torchrun starts one process per GPU and tells each its place through the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Why no DistributedDataParallel: an estimator runs several
backward passes per step (train.estimators), and the trainable parameters are a few small adapters, so
one all_reduce of their gradients per step, before clipping, is both simpler and exact.

How N ranks stay one run:
- every rank draws the step's whole batch (N x --batch crops) from the same seeded rng and trains on
  its own slice of it, so the ranks together see exactly the crops one process with N times the batch
  would, and every rank's rng stays in step with that process's;
- the averaged gradient is the same on every rank, so is the clipped AdamW step, and the weights stay
  equal without being sent again (they are broadcast once, at the start);
- rank 0 alone writes files (tokens, checkpoints, the log); the others wait for it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank (0..world-1), world size, and its GPU index on this node."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """The place torchrun gave this process; one process of one when not started by torchrun (or by
        torchrun with a single process, which then runs exactly as a plain command)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and the log."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def start(self, device: torch.device) -> None:
        """Joins the process group: NCCL between GPUs, gloo between CPU processes."""
        if self.parallel and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            # an hour, not NCCL's 10 minutes: the other ranks wait while rank 0 loads a 7B base and tokenizes
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(hours=1))

    def stop(self) -> None:
        if self.parallel and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (it may write files: tokens.npz, the task pools), then the
        others (which read them back)."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def own_rows(self, rows):
        """This rank's share of a batch drawn for all ranks: rows rank·b .. (rank+1)·b - 1."""
        share = len(rows) // self.world
        return rows[self.rank * share : (self.rank + 1) * share]

    def broadcast_parameters(self, params: list[torch.Tensor]) -> None:
        """Rank 0's weights on every rank (they start equal anyway; this makes it certain)."""
        if self.parallel:
            with torch.no_grad():
                for param in params:
                    dist.broadcast(param.data, src=0)

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Each parameter's .grad becomes the mean over the ranks (one all_reduce of one flat buffer).
        A parameter without a gradient keeps none, as in one process (AdamW then leaves it alone, weight
        decay included); which ones have none depends on the model alone, so it is the same on every rank."""
        if not self.parallel:
            return
        params = [p for p in params if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.world
        for param, part in zip(params, flat.split([p.numel() for p in params])):
            param.grad = part.view_as(param)

    def average(self, value: float, device: torch.device) -> float:
        """The mean of a number over the ranks (the step's loss, as one process would log it)."""
        if not self.parallel:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return total.item() / self.world

    def agree(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's answer on every rank (e.g. whether --max-minutes ran out: all ranks stop together)."""
        if not self.parallel:
            return flag
        value = torch.tensor([int(flag)], device=device)
        dist.broadcast(value, src=0)
        return bool(value.item())

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None on the others)."""
        if not self.parallel:
            return [obj]
        gathered = [None] * self.world if self.main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered
