"""Other tools' feature caching set up to mean the same as a cachelab strategy, on a FLUX
pipeline (:class:`~cachelab.models.pipelines.flux.FluxAdapter`): diffusers' own hooks
(``transformer.enable_cache``) and, when installed, cache-dit (``pip install -e ".[peers]"``).

A :class:`Pair` runs one setting through the peer and through cachelab; the peers benchmark
(``train_free_runs/peers/benchmark.py``) times both and ``tests/test_diffusers_parity.py``
checks that they compute the same thing. Decisions are read the same way from both tools
(:func:`observe`): a step is full when a probe module, one that only a computed step runs,
is called during it.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from cachelab.assets import load_calibration
from cachelab.core.adaptive import FirstBlockCache, MagCache
from cachelab.core.controller import CacheHandle, attach
from cachelab.core.predictor import Predictor
from cachelab.core.schedules import Mask, PerKindInterval
from cachelab.core.sites import SitePattern, select_sites
from cachelab.core.strategy import Strategy
from cachelab.evaluation.peers import (cache_dit_available, cache_dit_enabled, diffusers_hook,  # noqa: F401 -- used as peers.*
                                      diffusers_mag_ratios, import_cache_dit, write_mag_ratios)
from cachelab.jobs import CONFIG_DIR
from cachelab.models.pipelines.base import PipelineAdapter, PromptInputs
from cachelab.strategies.reuse import Reuse
from cachelab.strategies.taylor import TaylorSeer

# Every attention module of FLUX: what diffusers' TaylorSeer and PAB hooks pick by default.
ATTENTION = [SitePattern(r"(single_)?transformer_blocks\.\d+\.attn")]


@dataclass(frozen=True)
class Pair:
    """One setting run by a peer tool and by cachelab.

    ``peer()`` is a context manager inside which the peer's caching is on; ``ours()``
    attaches cachelab and returns the handle (``handle.remove()`` detaches it).
    ``peer_bytes()`` is the size of the tensors the peer holds right now (read it during a
    generation: the peers drop their state when a pipeline call ends or starts). ``probe``
    names the module whose calls mark a tool's full steps (one that runs only when the part
    the setting may skip computes)."""

    setting: str
    tool: str
    peer: Callable[[], AbstractContextManager[None]]
    ours: Callable[[], CacheHandle]
    peer_bytes: Callable[[], int]
    probe: str


@dataclass
class Observation:
    """One generation: its output, the steps on which the probe module ran, and the most
    bytes ``held()`` reported at the end of a step (0 without ``held``)."""

    output: torch.Tensor
    full_steps: list[int]
    held_bytes: int


def observe(adapter: PipelineAdapter, inputs: PromptInputs, probe: str, handle: CacheHandle | None = None,
            held: Callable[[], int] | None = None) -> Observation:
    """Generate ``inputs`` (driving ``handle``, if any) and watch module ``probe`` of the transformer."""
    module = adapter.model.get_submodule(probe)
    step, ran, most = [0], set(), [0]

    def end_of_step(info: dict) -> None:
        step[0] = info["s"] + 1
        if held is not None:
            most[0] = max(most[0], held())

    hook = module.register_forward_hook(lambda *_: ran.add(step[0]))
    try:
        output = adapter.generate(inputs, handle, callback=end_of_step)
    finally:
        hook.remove()
    return Observation(output, sorted(ran), most[0])


def reachable_tensor_bytes(root, package: str, max_depth: int = 16) -> int:
    """Bytes of the distinct tensors reachable from ``root`` through dicts, lists, tuples and
    the attributes of objects whose class comes from a module of ``package``."""
    seen, total = set(), 0

    def walk(obj, depth: int) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += obj.numel() * obj.element_size()
        elif depth >= max_depth:
            return
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value, depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(package):
            walk(vars(obj), depth + 1)

    walk(root, 0)
    return total


def diffusers_hook_bytes(model: torch.nn.Module) -> int:
    """Bytes of the tensors held by diffusers' hook states on ``model``'s modules."""
    registries = [module._diffusers_hook.hooks for module in model.modules() if hasattr(module, "_diffusers_hook")]
    return reachable_tensor_bytes(registries, "diffusers.hooks")


def diffusers_pair(setting: str, adapter: PipelineAdapter, config: Callable[[], object],
                   ours: Callable[[], CacheHandle], probe: str) -> Pair:
    """A pair whose peer is diffusers' hook ``config()`` on ``adapter``'s transformer."""
    model = adapter.model
    return Pair(setting, "diffusers hook", lambda: diffusers_hook(model, config()), ours,
                lambda: diffusers_hook_bytes(model), probe)


def last_single_block(model: torch.nn.Module) -> str:
    """The name of FLUX's last block (the last single-stream block)."""
    return f"single_transformer_blocks.{len(model.single_transformer_blocks) - 1}"


def stack_probe(adapter: PipelineAdapter) -> str:
    """A module that runs only when the blocks after the first compute: the last block's output projection."""
    return f"{last_single_block(adapter.model)}.proj_out"


def attention_probe(adapter: PipelineAdapter) -> str:
    """A module that runs only when the last attention computes: its query projection."""
    return f"{last_single_block(adapter.model)}.attn.to_q"


# -- TaylorSeer ---------------------------------------------------------------------------
def diffusers_taylorseer_steps(T: int, interval: int, warmup: int) -> list[int]:
    """diffusers' TaylorSeer rule, read from its code: compute while ``s < D`` or ``(s - D - 1) % N == 0``."""
    return [s for s in range(T) if s < warmup or (s - warmup - 1) % interval == 0]


def taylorseer(adapter: PipelineAdapter, interval: int, warmup: int, order: int) -> Pair:
    """diffusers' ``TaylorSeerCacheConfig`` and cachelab's TaylorSeer with the same meaning:
    attention sites, the hook's schedule as a mask, derivatives from the first full step, fp32 factors."""
    from diffusers import TaylorSeerCacheConfig

    def ours():
        full = diffusers_taylorseer_steps(adapter.num_steps, interval, warmup)
        return attach(select_sites(adapter.model, ATTENTION), TaylorSeer(order, first_enhance=1, factor_dtype="fp32"),
                      Mask(full_steps=full))

    config = lambda: TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=warmup,  # noqa: E731
                                           max_order=order, taylor_factors_dtype=torch.float32)
    return diffusers_pair(f"TaylorSeer o{order} N={interval} D={warmup}", adapter, config, ours,
                          attention_probe(adapter))


def preset_granularity(preset: str) -> str:
    """The granularity of cachelab's strategy preset ``conf/strategy/<preset>.yaml``."""
    return OmegaConf.load(CONFIG_DIR / "strategy" / f"{preset}.yaml").granularity


# -- FirstBlockCache --------------------------------------------------------------------
def first_block_cache(adapter: PipelineAdapter, threshold: float, warmup: int = 1,
                      predictor: Predictor | None = None) -> CacheHandle:
    """cachelab's ``fbcache`` preset at its granularity (block 0 is the probe and always
    computes; the blocks after it are forecast) with ``predictor`` (default: reuse)."""
    schedule = FirstBlockCache(threshold=threshold, first_enhance=warmup)
    return Strategy("fbcache", predictor or Reuse(), schedule, preset_granularity("fbcache")).attach(adapter)


def fbcache(adapter: PipelineAdapter, threshold: float) -> Pair:
    """diffusers' ``FirstBlockCacheConfig`` and cachelab's ``fbcache`` preset: the first block's
    residual change against the last full step decides; skipped steps reuse the residual of
    the blocks after the first, one per stream in both tools (the preset's ``stack`` site)."""
    from diffusers import FirstBlockCacheConfig

    return diffusers_pair(f"FBCache threshold {threshold}", adapter, lambda: FirstBlockCacheConfig(threshold=threshold),
                          lambda: first_block_cache(adapter, threshold), stack_probe(adapter))


# -- MagCache -----------------------------------------------------------------------------
def magcache_first_step(T: int, retention: float) -> int:
    """The first step diffusers' MagCache may skip: ``int(retention T + 0.5)`` (rounded), and
    never step 0 (no residual yet). cachelab's MagCache starts at ``int(retention T)`` (floored)."""
    return max(1, int(retention * T + 0.5))


def magcache(adapter: PipelineAdapter, calibration: str, threshold: float, max_skip: int, retention: float) -> Pair:
    """diffusers' ``MagCacheConfig`` and cachelab's ``magcache`` preset on the same calibration
    file (:func:`write_mag_ratios`): the same rule (from the first step, ``G <- G r_s``,
    ``E <- E + |1 - G|``; skip while ``E <= threshold`` and at most ``max_skip`` in a row).

    The two tools round ``retention T`` differently (see :func:`magcache_first_step`), so
    cachelab gets the retention that starts at diffusers' step. On a skipped step diffusers
    adds its stack residual to block 0's image input and passes the text stream through;
    cachelab's ``stack`` site adds its residual to both streams (FLUX drops the text stream
    after the stack)."""
    from diffusers import MagCacheConfig

    ratios = load_calibration(calibration)["ratios"]
    ours_retention = (magcache_first_step(adapter.num_steps, retention) + 0.5) / adapter.num_steps
    config = lambda: MagCacheConfig(threshold=threshold, max_skip_steps=max_skip, retention_ratio=retention,  # noqa: E731
                                    num_inference_steps=adapter.num_steps, mag_ratios=ratios)
    schedule = MagCache(calibration, threshold, max_skip, ours_retention)
    ours = lambda: Strategy("magcache", Reuse(), schedule, preset_granularity("magcache")).attach(adapter)  # noqa: E731
    return diffusers_pair(f"MagCache {threshold} K={max_skip} r={retention}", adapter, config, ours,
                          stack_probe(adapter))


# -- PAB ----------------------------------------------------------------------------------
def pab(adapter: PipelineAdapter, interval: int, window: tuple[float, float]) -> Pair:
    """diffusers' ``PyramidAttentionBroadcastConfig`` and cachelab's ``PerKindInterval`` (the
    ``pab`` schedule) with reuse, on the same sites: every attention module (FLUX's are all
    self-attention: PAB's "spatial" kind, cachelab's kind ``attn``), recomputed when
    ``s % interval == 0`` or outside ``lo < t < hi`` (t: the scheduler's timestep, 0..1000).

    Not the ``pab`` preset: at its module granularity FLUX's single-block attention is a skip
    site of ``proj_out`` and computes whenever ``proj_out`` does, so the preset broadcasts the
    double blocks' attention only, where diffusers broadcasts every attention. diffusers counts each module's calls, cachelab the steps: the same
    with one transformer call per step (no true CFG)."""
    from diffusers import PyramidAttentionBroadcastConfig

    config = lambda: PyramidAttentionBroadcastConfig(  # noqa: E731
        spatial_attention_block_skip_range=interval, spatial_attention_timestep_skip_range=tuple(window),
        current_timestep_callback=lambda: adapter.pipe.current_timestep)
    ours = lambda: attach(select_sites(adapter.model, ATTENTION), Reuse(),  # noqa: E731
                          PerKindInterval({"attn": interval}, list(window)))
    return diffusers_pair(f"PAB N={interval} t in {tuple(window)}", adapter, config, ours, attention_probe(adapter))


# -- cache-dit ------------------------------------------------------------------------------
def dbcache(adapter: PipelineAdapter, threshold: float, warmup: int = 1, order: int | None = None) -> Pair:
    """cache-dit's DBCache as first-block cache (``Fn_compute_blocks=1, Bn_compute_blocks=0``,
    one block list: its FLUX adapter joins the double and single blocks) and cachelab's
    ``fbcache`` preset: the same decisions as diffusers' FirstBlockCache (residual diff
    ``mean|r - r_ref| / mean|r_ref| < threshold``, ``r_ref`` of the last computed step), the
    first ``warmup`` steps full, no cap on cached steps. Skipped steps reuse the stack
    residual of both streams, or, with ``order``, forecast it with cache-dit's TaylorSeer
    calibrator against cachelab's TaylorSeer of that order.

    cache-dit's calibrator is rebuilt at every pipeline call and counts steps from -1 (its
    states are created at step 0, after that step's tick); it takes derivatives when its
    count is above 1, i.e. at full steps from step 3 on: cachelab's ``first_enhance=4``
    (derivatives at ``s > first_enhance - 2``)."""
    cache_dit = import_cache_dit()

    def configs() -> dict:  # fresh objects per use: cache-dit fills in fields of the ones it is given
        cache = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
                                        max_warmup_steps=warmup)
        calibrator = None if order is None else cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order)
        return {"cache_config": cache, "calibrator_config": calibrator}

    setting = f"DBCache F1B0 threshold {threshold}" + ("" if order is None else f" + TaylorSeer o{order}")
    predictor = None if order is None else TaylorSeer(order, first_enhance=4)
    pipe = adapter.pipe
    return Pair(setting, "cache-dit", lambda: cache_dit_enabled(pipe, **configs()),
                lambda: first_block_cache(adapter, threshold, warmup, predictor),
                lambda: reachable_tensor_bytes(getattr(pipe, "_context_manager", None), "cache_dit"), stack_probe(adapter))
