"""One generation across a process group (context parallelism: each rank holds a shard of the
same activations). Schedules reduce their signals as sums (``StepContext.reduce``) and divide
afterwards, so a mean is right even when shards are unequal; the controller checks after every
decision that all ranks took the same one. The only module of the core that uses torch.distributed."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums over the ranks sharing one generation


def local(sums: torch.Tensor) -> torch.Tensor:
    """The reduction of a single process: its own sums."""
    return sums


class LocalGroup:
    """A generation in this process alone: its sums are the totals, its decisions agree, and no
    engine hooks are to be lifted (the group of a handle without context parallelism)."""

    def __call__(self, sums: torch.Tensor) -> torch.Tensor:
        return local(sums)

    def lifted(self) -> AbstractContextManager:
        return nullcontext()

    def agree(self, code: int, where: str) -> None:
        """Nothing to check: one process always agrees with itself."""

    def everywhere(self, holds: bool) -> bool:
        """Whether ``holds`` holds on every rank: here, itself."""
        return holds


class DivergentDecisions(RuntimeError):
    """Ranks of one generation decided differently (their collectives would deadlock)."""


class GroupReduce:
    """Sums a tensor over the ranks of ``group`` (an all-reduce: every rank gets the same totals,
    in float64 so the order of the ranks hardly matters) and checks that decisions agree.
    ``device``: where the group's backend communicates (CPU for gloo, the rank's GPU for NCCL).
    A parallel engine whose own hooks shard a module's inputs or gather its outputs overrides
    :meth:`lifted`, so that the cache sites are hooked beneath them and see the shards."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device | str = "cpu"):
        self.group, self.device = group, torch.device(device)

    def __call__(self, sums: torch.Tensor) -> torch.Tensor:
        total = sums.detach().to(self.device, torch.float64).clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total.to(sums.device)

    def lifted(self) -> AbstractContextManager:
        """While the block runs (cache sites are hooked or unhooked), the engine's own hooks are
        off the model, and afterwards back on, outermost again (here: none)."""
        return nullcontext()

    def everywhere(self, holds: bool) -> bool:
        """Whether ``holds`` holds on every rank (one all-reduce of the ranks where it does not)."""
        return not self(torch.tensor([float(not holds)])).item()

    def agree(self, code: int, where: str) -> None:
        """Raise :class:`DivergentDecisions` on every rank, naming ``where`` and each rank's
        ``code``, unless all ranks passed the same ``code`` (one all-reduce of (code, -code))."""
        both = torch.tensor([code, -code], dtype=torch.int64, device=self.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        if int(both[0]) == -int(both[1]):
            return
        codes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(codes, torch.tensor([code], dtype=torch.int64, device=self.device), group=self.group)
        ranks = ", ".join(f"rank {r}: {int(c)}" for r, c in enumerate(codes))
        raise DivergentDecisions(f"the ranks of one generation decided differently at {where} ({ranks}); a schedule "
                                 f"read a signal that was not reduced over the context-parallel group")
