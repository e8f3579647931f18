"""Context parallelism of diffusers transformers (``enable_parallelism`` with a
``ContextParallelConfig``: each rank holds a shard of the token sequence, attention exchanges
them): enabling it on a transformer with a context-parallel plan (``_cp_plan``: Flux, Flux2, Wan,
QwenImage, LTX, ...), and the group whose ranks share one generation, which a cache reduces its
signals over."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn

from cachelab.core.distributed import GroupReduce
from cachelab.errors import ConfigError
from cachelab.models.diffusers_private import (context_parallel_config, context_parallel_plan, mesh_device,
                                                mesh_group)


def enable_context_parallel(model: nn.Module, ulysses: int = 1, ring: int = 1) -> None:
    """``model.enable_parallelism`` with Ulysses degree ``ulysses`` and ring degree ``ring`` over
    the initialised default process group (one rank per shard)."""
    if context_parallel_plan(model) is None:
        raise ConfigError(f"parallel: {type(model).__name__} has no context-parallel plan (_cp_plan); allowed: a "
                          f"diffusers transformer with one (Flux, Flux2, Wan, QwenImage, LTX, ...)")
    if ring > 1 and next(model.parameters()).device.type == "cpu":
        raise ConfigError(f"parallel.ring={ring}: ring attention runs on GPUs only in diffusers' native attention "
                          f"backend; allowed on CPU: parallel.ulysses")
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring)
    if torch.accelerator.device_count():
        model.enable_parallelism(config=config)
        return
    # diffusers places rank r on device r % device_count(), a division by zero without accelerators
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        model.enable_parallelism(config=config)


class ContextParallelGroup(GroupReduce):
    """The ranks sharing one generation of ``model`` under diffusers context parallelism. Its
    split and gather hooks on submodules (Wan splits at its first block) are lifted while cache
    sites are hooked, so that the sites sit beneath them and see each rank's shard."""

    def __init__(self, model: nn.Module, config):
        group = mesh_group(config)
        super().__init__(group, mesh_device(config) if "nccl" in str(dist.get_backend(group)) else "cpu")
        self.model, self.config = model, config
        # the entries with a submodule name; the model's own (name "") hooks stay
        self.plan = {name: entry for name, entry in context_parallel_plan(model).items() if name}

    @contextmanager
    def lifted(self) -> Iterator[None]:
        from diffusers.hooks.context_parallel import apply_context_parallel, remove_context_parallel

        remove_context_parallel(self.model, self.plan)
        try:
            yield
        finally:
            apply_context_parallel(self.model, self.config, self.plan)


def context_parallel_group(model: nn.Module) -> ContextParallelGroup | None:
    """The context-parallel group of ``model`` (diffusers' ``_parallel_config``), or None."""
    config = context_parallel_config(model)
    return None if config is None else ContextParallelGroup(model, config)
