"""How much of each block's compute the cache sites cover, counted with ``torch.utils.flop_counter``
over one call of the model.

:class:`FlopTally` counts the FLOPs of watched modules (the blocks, their children) and of
watched callables (the cache sites: a site's FLOPs are those it skips on a forecast step), and
for each watched module how many of its FLOPs ran inside a site. :class:`StackCoverage` gives a
stack's share covered and names the block children that forecast steps still run.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cachelab.core import hooks

UNCOVERED_LIMIT = 0.10  # more than this share of a block's FLOPs left to forecast steps is warned about


class FlopTally:
    """FLOPs of one call (a context manager around it): ``flops[name]`` of each watched module,
    ``covered[name]`` the part of them that ran inside a watched callable (a site: nested sites
    count once), ``site_flops[name]`` of each watched callable."""

    def __init__(self):
        self.mode = FlopCounterMode(display=False)
        self.flops: dict[str, int] = defaultdict(int)
        self.covered: dict[str, int] = defaultdict(int)
        self.site_flops: dict[str, int] = defaultdict(int)
        self._in_sites = 0  # FLOPs run inside sites so far
        self._depth = 0     # site calls open now
        self._hooks, self._patched = [], []

    def total(self) -> int:
        return self.mode.get_total_flops()

    def watch(self, name: str, module: nn.Module) -> None:
        """Count ``module``'s FLOPs, and those of them inside sites, as ``name``."""
        opened = []

        def before(*_):
            opened.append((self.total(), self._in_sites))

        def after(*_):
            flops, in_sites = opened.pop()
            self.flops[name] += self.total() - flops
            self.covered[name] += self._in_sites - in_sites

        self._hooks += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def site(self, name: str, owner: nn.Module, method: str = "forward") -> None:
        """Count the calls of ``owner.method`` (hooked until the tally closes) as a site's."""
        def wrap(bound):
            def counted(*args, **kwargs):
                start = self.total()
                self._depth += 1
                try:
                    return bound(*args, **kwargs)
                finally:
                    self._depth -= 1
                    self.site_flops[name] += self.total() - start
                    if self._depth == 0:
                        self._in_sites += self.total() - start
            return counted

        hook = f"cachelab tally {len(self._patched)} at {id(self):#x}"
        hooks.install(owner, method, hook, wrap, hooks.TALLY, by=self)
        self._patched.append((owner, method, hook))

    def __enter__(self) -> FlopTally:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)
        for hook in self._hooks:
            hook.remove()
        for owner, method, hook in reversed(self._patched):
            hooks.remove(owner, method, hook)


@dataclass(frozen=True)
class StackCoverage:
    """One stack's FLOPs in one model call, the part inside cache sites (skipped on forecast
    steps), and the block children's FLOPs outside them (by name within a block, summed)."""

    name: str
    flops: int
    covered: int
    uncovered: dict[str, int] = field(default_factory=dict)

    @property
    def share(self) -> float:
        return self.covered / self.flops if self.flops else 1.0

    def line(self) -> str:
        return f"{self.name}: sites cover {self.share:.1%} of the blocks' FLOPs"

    def warning(self) -> str | None:
        """One line when forecast steps still compute more than ``UNCOVERED_LIMIT`` of the blocks' FLOPs."""
        if 1 - self.share <= UNCOVERED_LIMIT:
            return None
        named = sorted(self.uncovered, key=self.uncovered.get, reverse=True)
        return (f"forecast steps still compute {1 - self.share:.0%} of the FLOPs of the blocks of {self.name} "
                f"(uncovered: {', '.join(named) or 'the blocks own operations'})")


def watch_blocks(tally: FlopTally, stacks: dict[str, nn.ModuleList]) -> None:
    """Watch every block of ``stacks`` (``<stack>.<i>``) and each block's children (``<stack>.<i>.<child>``)."""
    for stack_name, blocks in stacks.items():
        for index, block in enumerate(blocks):
            tally.watch(f"{stack_name}.{index}", block)
            for child_name, child in block.named_children():
                tally.watch(f"{stack_name}.{index}.{child_name}", child)


def stack_coverage(tally: FlopTally, stacks: dict[str, nn.ModuleList]) -> list[StackCoverage]:
    """The coverage of each stack that ran (``watch_blocks`` watched it), from ``tally``."""
    found = []
    for stack_name, blocks in stacks.items():
        prefixes = [f"{stack_name}.{i}" for i in range(len(blocks))]
        flops = sum(tally.flops.get(p, 0) for p in prefixes)
        if not flops:
            continue
        uncovered: dict[str, int] = defaultdict(int)
        for prefix, block in zip(prefixes, blocks):
            for child_name, _ in block.named_children():
                name = f"{prefix}.{child_name}"
                outside = tally.flops.get(name, 0) - tally.covered.get(name, 0)
                if outside > 0:
                    uncovered[child_name] += outside
        found.append(StackCoverage(stack_name, flops, sum(tally.covered.get(p, 0) for p in prefixes),
                                   dict(uncovered)))
    return found
