"""The model families the project describes, found from a model's class: one definition of a
family's cache sites for every entry point (``cachelab.apply`` and ``python run.py``).

:data:`FAMILIES` pairs the class of the model a family drives (the package and the class name) with
the family's adapter, whose ``sites`` are the granularities it chooses itself (the papers' module
sites for FLUX and HunyuanVideo, every granularity for cachelab's DiT). :func:`family_sites` finds
them for any model by ``isinstance`` (a subclass of a family's class is that family); the other
granularities, and the probes of a family's plain site lists, are discovered
(:mod:`cachelab.models.discovery`). Importing this module imports no Hydra; an adapter is imported
only for a model of its class.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

import torch
from torch import nn

from cachelab.core.sites import Site, SitePattern, SitePatterns
from cachelab.models.coverage import FlopTally, StackCoverage, stack_coverage, watch_blocks
from cachelab.models.discovery import DiscoveredSites, candidate_stacks, discover

# (package, model class) -> the adapter of its family (module:class)
FAMILIES = {("cachelab.models.dit", "DiT"): "cachelab.models.dit_adapter:DiTAdapter",
            ("diffusers", "DiTTransformer2DModel"): "cachelab.models.pipelines.dit:DiffusersDiTAdapter",
            ("diffusers", "PixArtTransformer2DModel"): "cachelab.models.pipelines.pixart:PixArtAdapter",
            ("diffusers", "SD3Transformer2DModel"): "cachelab.models.pipelines.sd3:SD3Adapter",
            ("diffusers", "FluxTransformer2DModel"): "cachelab.models.pipelines.flux:FluxAdapter",
            ("diffusers", "WanTransformer3DModel"): "cachelab.models.pipelines.wan:WanAdapter",
            ("diffusers", "HunyuanVideoTransformer3DModel"): "cachelab.models.pipelines.hunyuan_video:HunyuanVideoAdapter"}


def family_adapter(model: nn.Module) -> type | None:
    """The adapter class of ``model``'s family (``model`` is an instance of its class), else None."""
    for model_class, path in FAMILIES.items():
        if is_instance(model, model_class):
            module, _, name = path.partition(":")
            return getattr(importlib.import_module(module), name)
    return None


def is_instance(model: nn.Module, model_class: tuple[str, str]) -> bool:
    """Whether ``model`` is an instance of ``model_class`` (package, class name); a package that
    is not imported yet holds no class of ``model`` (and is not imported for the question)."""
    package = sys.modules.get(model_class[0])
    return package is not None and isinstance(model, getattr(package, model_class[1]))


def family_sites(model: nn.Module) -> dict[str, list[SitePattern]]:
    """Granularity -> the site patterns ``model``'s family chooses itself ({} for a model no family describes)."""
    adapter = family_adapter(model)
    return dict(adapter.sites) if adapter is not None else {}


def needs_discovery(own: dict[str, list[SitePattern]], granularity: str) -> bool:
    """Whether sites of ``granularity`` need a traced call: the family does not choose them, or
    gives a plain list, whose probes are discovered (a :class:`SitePatterns` carries its own)."""
    return not isinstance(own.get(granularity), SitePatterns)


class FamilySites:
    """A model's sites (a ``SiteSource``): its family's own patterns where the family chooses
    them, the discovered ones for the other granularities (``discovered`` None: not needed)."""

    def __init__(self, model: nn.Module, own: dict[str, list[SitePattern]], discovered: DiscoveredSites | None,
                 family: str = "the family"):
        self.model, self.own, self.discovered, self.family = model, own, discovered, family

    def site_patterns(self, granularity: str) -> list[SitePattern]:
        own = self.own.get(granularity)
        if isinstance(own, SitePatterns):
            return own
        if own is not None:
            return SitePatterns(own, self.discovered.probes)
        return self.discovered.site_patterns(granularity)

    def describe(self) -> str:
        """Which granularities are the family's own, and what was discovered."""
        lines = [f"{self.family}'s own sites at: {', '.join(self.own)}"] if self.own else []
        if self.discovered is not None:
            lines += [f"discovered{' (the other granularities, the probes)' if self.own else ''}:"]
            lines += [f"  {line}" for line in self.discovered.describe(module="module" not in self.own).splitlines()]
        return "\n".join(lines)


def model_sites(model: nn.Module, granularities: str | tuple[str, ...], call: Callable[[], object]) -> FamilySites:
    """The sites ``cachelab.apply`` hooks on ``model`` at ``granularities`` (one or several: a
    strategy's ``granularities``): its family's, with whatever they leave open discovered from
    ``call`` (one forward of ``model``)."""
    adapter = family_adapter(model)
    own = dict(adapter.sites) if adapter is not None else {}
    wanted = (granularities,) if isinstance(granularities, str) else granularities
    discovered = discover(model, call) if any(needs_discovery(own, g) for g in wanted) else None
    return FamilySites(model, own, discovered, adapter.__name__ if adapter is not None else "the family")


def site_coverage(model: nn.Module, sites: list[Site], call: Callable[[], object],
                  stack_names: list[str] | None = None) -> list[StackCoverage] | None:
    """Per stack of ``model`` (``stack_names``, default: every candidate list of blocks), the share
    of its blocks' FLOPs that ``sites`` hold (what a forecast step skips), counted over ``call``
    (one forward of ``model``, run for it); a site on the model itself (``output``) holds them all.
    None where the FLOPs cannot be counted (e.g. flex_attention under torch's dispatch modes)."""
    stacks = {name: blocks for name, blocks in candidate_stacks(model).items()
              if stack_names is None or name in stack_names}
    try:
        with FlopTally() as tally:
            watch_blocks(tally, stacks)
            for site in sites:
                for owner in site.members or (site.owner,):
                    tally.site(site.name, owner, site.method)
            with torch.no_grad():
                call()
    except Exception:  # noqa: BLE001 -- a model FlopCounterMode cannot run: no coverage, the caching is unaffected
        return None
    found = stack_coverage(tally, stacks)
    if any(site.owner is model for site in sites):
        return [StackCoverage(c.name, c.flops, c.flops) for c in found]
    return found
