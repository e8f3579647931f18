"""Regional ``torch.compile`` of a model with a strategy attached: the blocks and the cache
sites' own computations are compiled, the controller's decisions stay eager."""
from __future__ import annotations

import re
from contextlib import contextmanager

from torch import nn

from cachelab.core.controller import CacheHandle
from cachelab.core.sites import SitePattern

# torch.compile's modes; CUDA_GRAPH_MODES replay CUDA graphs (on a CUDA device)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_regions(model: nn.Module, block_patterns: list[SitePattern], handle: CacheHandle | None,
                    **options) -> None:
    """Compile, in place, every module of ``model`` that ``block_patterns`` match (the
    adapter's ``block`` granularity: the repeated transformer blocks), and through
    ``handle.compile`` every cache site's and probe's computation, all with
    ``torch.compile(**options)``. A site inside a block is excluded from the block's graphs
    (a graph break), so the schedule's decisions, the forecasts and the caches' bookkeeping
    run eagerly between compiled regions and never cause a recompilation. ``model.compile``
    is undone by ``uncompile_regions``."""
    if handle is not None:
        handle.compile(**options)
    for name, module in model.named_modules():
        if any(re.fullmatch(pattern.regex, name) for pattern in block_patterns):
            module.compile(**options)


def uncompile_regions(model: nn.Module) -> None:
    """Undo the blocks' ``module.compile`` (the sites' compilation ends with ``handle.remove``)."""
    for module in model.modules():
        module._compiled_call_impl = None


@contextmanager
def compiled_if_asked(options, model: nn.Module, block_patterns: list[SitePattern], handle: CacheHandle | None):
    """``compile_regions`` with the run's ``compile`` options (none: eager) for the block's
    duration, undone after it (the sites' compilation ends with ``handle.remove``)."""
    if options:
        compile_regions(model, block_patterns, handle, **options)
    try:
        yield
    finally:
        if options:
            uncompile_regions(model)

