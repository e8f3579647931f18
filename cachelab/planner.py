"""``cachelab.plan``: what a strategy will hold and save on a model, before any weight exists.

The planner builds the transformer on the meta device (:mod:`cachelab.models.meta_inputs`:
no weights, nothing downloaded), attaches the strategy to the sites ``cachelab.apply`` finds
(:func:`~cachelab.models.families.model_sites`: the family's, or discovered from one traced
call) and drives one whole generation on meta tensors with
the inputs the family's pipeline would pass at that resolution, batch and guidance. The cache
bytes are therefore read from the controller's own predictor states (``handle.stats()``: the
peak they held), and the FLOPs are counted with ``torch.utils.flop_counter`` on every step's
calls: the plan cannot drift from what a run holds and computes. Importing this module imports
no Hydra (a preset name is composed from ``conf/`` as ``apply`` does).

The activation peak of a full step is an estimate: the most bytes that the tensors the step's
operators allocate (views excluded) and its inputs hold at once, each freed when the last
Python reference to it goes, with ``scaled_dot_product_attention`` counted as a fused kernel
(its output only; the attention matrix is never held); no allocator rounding, fragmentation
or kernel workspaces.

A schedule that decides from the values the model computes (one reading signals: TeaCache,
FBCache, SeaCache, the error-controlled and verifying ones) is planned at its worst case (:class:`WorstCase`):
every step full but the last, forecast, so the plan holds what such a run can hold at most (the
predictor's whole history, what its forecasts fit, and the signal the schedule keeps); its FLOPs
are those of that sequence (no speedup is promised).

The schedule is driven with the timesteps (and sigmas, log-SNRs) of the run's sampler
(:func:`sampler_grid`), so a timestep window (PAB's) is planned as the run decides. With host
offload (``offload``) the states move through meta copies as they move on CUDA
(:class:`MetaCopies`): ``cache_bytes`` is what the device holds at a step's end (the state
prefetched for the next site, the schedule's and token selection's tensors) and ``host_bytes``
the states in host memory, as ``handle.stats()`` measures them.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import time
import weakref
from dataclasses import dataclass, field
from unittest import mock

import numpy
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from cachelab.core.controller import SAMPLER_SIGNALS, CacheHandle, controller_signals, decision_code
from cachelab.core.offload import HostOffload
from cachelab.core.schedules import Decision, Schedule, StepContext
from cachelab.core.sites import first_tensor
from cachelab.core.storage import CODECS
from cachelab.core.variables import StepGrid
from cachelab.errors import ConfigError
from cachelab.models.diffusion import DDIMSchedule
from cachelab.models.dit import DiT
from cachelab.models.pipelines.driver import is_pipeline, scheduler_grid
from cachelab.models.meta_inputs import Shape, family_calls, meta_model, step_calls

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
SHAPE_KEYS = ("height", "width", "num_frames", "batch_size", "guidance", "text_tokens", "vae_scale_factor")
PLAN_KEYS = ("num_inference_steps", *SHAPE_KEYS, "dtype", "device_memory", "expert_steps")


def parse_size(size, key: str = "budget") -> int:
    """Bytes from an int or a string like ``"4GiB"``, ``"80GB"``, ``"1.5e9"`` (GB = 10^9, GiB = 2^30)."""
    if isinstance(size, (int, float)) and not isinstance(size, bool) and size >= 0:
        return int(size)
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(size))
    if match is None or match.group(2).lower() not in UNITS:
        raise ConfigError(f"{key}={size!r} is not a size; allowed: bytes or a number with one of "
                          f"B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. 4GiB)")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def size_text(nbytes: float) -> str:
    """``nbytes`` in the largest binary unit below it (``1.50 GiB``)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


@dataclass
class SitePlan:
    """One cache site: the shapes of the values it records (per context) and the bytes its states hold."""

    name: str
    shapes: list[tuple[int, ...]]
    nbytes: int


@dataclass
class Plan:
    """What a strategy holds and saves on a model (:func:`plan`). ``cache_bytes``: the peak the
    caches hold on the device (every context and site; with ``offload``, the state prefetched for
    the next site and the schedule's tensors); ``host_bytes``: the peak of the states waiting in
    host memory (``offload``; else 0); ``flops_full_step``: one uncached step (every call of
    it); ``flops_total``: the cached generation's; ``activation_bytes``: the estimated peak of a
    full step's activations (module docstring); ``fits``: weights + cache + activations within
    ``device_memory`` (None when not given)."""

    model: str
    strategy: str
    shape: Shape
    num_inference_steps: int
    experts: int
    cache_bytes: int
    weight_bytes: int
    activation_bytes: int
    flops_full_step: int
    flops_total: int
    full_steps: int
    sites: list[SitePlan] = field(default_factory=list)
    device_memory: int | None = None
    seconds: float = 0.0
    worst_case: bool = False  # the schedule decides from values: planned at its worst case (module docstring)
    offload: bool = False  # the states wait in host memory between their uses (cache.offload)
    host_bytes: int = 0

    @property
    def flops_speedup(self) -> float:
        """Uncached FLOPs over the cached generation's."""
        return self.num_inference_steps * self.flops_full_step / self.flops_total if self.flops_total else 1.0

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.cache_bytes + self.activation_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.peak_bytes <= self.device_memory

    def __str__(self) -> str:
        s = self.shape
        frames = f" x {s.num_frames} frames" if s.num_frames > 1 else ""
        lines = [f"plan: {self.strategy} on {self.model}{f' ({self.experts} experts)' if self.experts > 1 else ''}, "
                 f"{s.height}x{s.width}{frames}, batch {s.batch_size}, guidance {s.guidance:g}, "
                 f"{self.num_inference_steps} steps",
                 f"  cache (peak): {size_text(self.cache_bytes)} ({self.cache_bytes} B) "
                 + (f"on the device (host offload: the state prefetched for the next site), "
                    f"{size_text(self.host_bytes)} ({self.host_bytes} B) in host memory, " if self.offload else "")
                 + f"in {len(self.sites)} sites"
                 + (" (the worst case of an adaptive schedule: every step but the last full)" if self.worst_case else ""),
                 f"  weights: {size_text(self.weight_bytes)}",
                 f"  activations of a full step (estimate): {size_text(self.activation_bytes)}",
                 f"  FLOPs: {self.flops_full_step:.4g} per full step, {self.full_steps} full steps, "
                 f"speedup {self.flops_speedup:.2f}x",
                 f"  planned in {self.seconds:.1f} s on the meta device"]
        if self.device_memory is not None:
            lines += [f"  device memory {size_text(self.device_memory)}: "
                      f"{'fits' if self.fits else 'does NOT fit'} (weights + cache + activations "
                      f"{size_text(self.peak_bytes)})"]
        lines += ["  sites (shapes per context, bytes):"]
        lines += [f"    {site.name}: {' '.join('x'.join(map(str, shape)) for shape in site.shapes)} "
                  f"{size_text(site.nbytes)}" for site in self.sites]
        return "\n".join(lines)


class LiveBytes(TorchDispatchMode):
    """The most bytes that the tensors allocated under it (views excluded) hold at once, each
    freed when its last Python reference goes: an activation estimate that runs on meta tensors."""

    def __init__(self, start: int = 0):
        super().__init__()
        self.live = self.peak = start

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for index, tensor in enumerate(outputs):
            views = index < len(returns) and returns[index].alias_info is not None
            if isinstance(tensor, torch.Tensor) and not views:
                nbytes = tensor.numel() * tensor.element_size()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._free, nbytes)
        return out

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


def plan(target, strategy="taylor", *, budget=None, offload: bool = False, **keys) -> Plan:
    """Plan ``strategy`` (a preset name with ``apply``'s keys, or a Strategy) on ``target``: a
    diffusers pipeline, a transformer, a diffusers ``config.json`` path or a shipped config name
    (:func:`~cachelab.models.meta_inputs.shipped_configs`). Keys besides the strategy's:
    ``num_inference_steps`` (default: the strategy's ``num_steps``, 50), ``height``, ``width``,
    ``num_frames``, ``batch_size`` (prompts), ``guidance`` (the scale: CFG above 1 doubles the
    batch or the calls as the family's pipeline does), ``text_tokens``, ``vae_scale_factor``
    (defaults: the family's pipeline; a pipeline's own VAE factor), ``dtype`` (of the weights),
    ``device_memory`` (a size: ``fits``), ``expert_steps`` (Wan 2.2: the steps of the first
    expert, default by diffusers' boundary 0.875 under flow shift 12). ``budget`` (a size): a
    plan whose cache on the device exceeds it is refused (:func:`check_budget`). ``offload``: the
    states wait in host memory between their uses (as ``apply(offload=True)``; a Strategy's own
    ``offload`` counts too)."""
    started = time.perf_counter()
    plan_keys = {key: keys.pop(key) for key in PLAN_KEYS if key in keys}
    steps = int(plan_keys.get("num_inference_steps", keys.get("num_steps", 50)))
    keys.setdefault("num_steps", steps)
    pipe = target if is_pipeline(target) else None
    dtype = _dtype(plan_keys.get("dtype"))
    model, experts = meta_model(pipe.transformer if pipe is not None else target, dtype)
    factor = getattr(pipe, "vae_scale_factor_spatial", getattr(pipe, "vae_scale_factor", None))
    if factor is not None and "vae_scale_factor" not in plan_keys:  # the pipeline's own VAE
        plan_keys["vae_scale_factor"] = factor
    experts = max(experts, 2 if pipe is not None and getattr(pipe, "transformer_2", None) is not None else 1)
    shape = _shape(model, plan_keys)
    strategy = _strategy(strategy, keys, offload)
    split = _expert_steps(steps, experts, plan_keys.get("expert_steps"))
    grid = sampler_grid(pipe, model, shape, steps)
    firsts = [sum(split[:i]) for i in range(len(split))]  # each expert's first step
    runs = [_generation(model, copy.deepcopy(strategy) if i else strategy, shape, count,
                        None if grid is None else grid.subset(range(first, first + count)))
            for i, (first, count) in enumerate(zip(firsts, split))]
    calls = step_calls(model, shape, next(model.parameters()).dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for _, kwargs in calls:
            model(**kwargs)
    with torch.no_grad(), mock.patch.object(F, "scaled_dot_product_attention", _fused_attention), \
            LiveBytes(sum(_nbytes(t) for _, kwargs in calls for t in tree_leaves(kwargs))) as live:
        for _, kwargs in calls:
            model(**kwargs)
        del kwargs
    weights = sum(_nbytes(t) for t in [*model.parameters(), *model.buffers()]) * experts
    device_memory = plan_keys.get("device_memory")
    result = Plan(model=_name(target), strategy=strategy.name, shape=shape, num_inference_steps=steps, experts=experts,
                  cache_bytes=max(run["cache_bytes"] for run in runs), weight_bytes=weights,
                  activation_bytes=live.peak, flops_full_step=counter.get_total_flops(),
                  flops_total=sum(run["flops"] for run in runs), full_steps=sum(run["full_steps"] for run in runs),
                  sites=max(runs, key=lambda run: run["cache_bytes"])["sites"],
                  device_memory=None if device_memory is None else parse_size(device_memory, "device_memory"),
                  worst_case=isinstance(strategy.schedule, WorstCase), offload=strategy.offload,
                  host_bytes=max(run["host_bytes"] for run in runs))
    result.seconds = time.perf_counter() - started
    if budget is not None:
        check_budget(result, budget, target, strategy, {**plan_keys, "num_inference_steps": steps})
    return result


def check_budget(result: Plan, budget, target=None, strategy=None, plan_keys: dict | None = None) -> None:
    """Refuse ``result`` (a ConfigError in one line) when its cache on the device exceeds ``budget``,
    naming the planned size, the limit and the cheapest settings of ``strategy`` that would fit on
    ``target`` (each planned again: host offload, then up to three of lower orders, bf16 or int8
    factors and both, then the first of per-site orders and of whole blocks, and block and output
    granularity)."""
    limit = parse_size(budget)
    if result.cache_bytes <= limit:
        return
    fitting = []
    for variants, most in _alternatives(strategy, result.sites) if target is not None else []:
        named = 0
        for change, variant in variants:
            try:
                other = plan(target, variant, **(plan_keys or {}))
            except ConfigError:
                continue
            if other.cache_bytes <= limit:
                lite = "TaylorSeer-Lite, " if change == "granularity=output" else ""
                device = " on the device" if change == "cache.offload=true" else ""
                fitting.append(f"{change} ({lite}{size_text(other.cache_bytes)}{device})")
                named += 1
            if named == most:
                break
    advice = (f"; the cheapest settings that fit: {', '.join(fitting)}" if fitting
              else "; no host offload, lower order, bf16 or int8 factors, per-site orders, whole blocks or coarser "
                   "granularity fits")
    where = (f" on the device (host offload; {size_text(result.host_bytes)} in host memory)" if result.offload
             else "")
    raise ConfigError(f"cache budget exceeded: {result.strategy} on {result.model} plans "
                      f"{size_text(result.cache_bytes)} ({result.cache_bytes} B) of cache{where}, over the budget of "
                      f"{size_text(limit)} ({limit} B){advice}")


def _alternatives(strategy, sites: list[SitePlan]) -> list[tuple[list[tuple[str, object]], int]]:
    """Cheaper variants of ``strategy`` (its keys as the command line writes them, the variant) in
    groups, each with the most of it a refusal names, least change first within each: host offload
    (the same results, the states in host memory; where not on already); each lower
    order, bf16 factors, both, int8 factors, with each lower order (three; a factor storage only
    where some factor is stored wider); a lower order on one family of blocks (``sites``' names
    ``<family>.<index>...``; the family holding the fewest bytes first), each lower order in turn;
    one family of blocks cached whole, then all (at module granularity); block and output granularity."""
    predictor = strategy.predictor
    orders: list[dict] = []
    if isinstance(getattr(predictor, "order", None), int):
        orders += [{"order": o} for o in range(predictor.order - 1, -1, -1)]
    changes = list(orders)
    stored = getattr(predictor, "factor_dtype", False)
    # int8 with per-token scales: a quarter of fp32's bytes at parity with it on both trained models, where
    # fp8 e4m3 lost 1-2 dB at the same size (train_free_runs/memory/storage/results.md)
    for name in ("bf16", "int8_token") if stored is not False else ():
        if stored is None or any(CODECS[each].itemsize > CODECS[name].itemsize for each in stored):
            changes += [{"factor_dtype": name}] + [{**c, "factor_dtype": name} for c in orders]
    families = _block_families(sites)
    per_site = [{"site_orders": {o["order"]: [family + suffix]}} for o in orders for family, suffix in families
                if getattr(predictor, "site_orders", None) == {}]
    blocks = [[family] for family, _ in families] + ([[f for f, _ in families]] if len(families) > 1 else [])
    whole = ([{"whole_blocks": each} for each in blocks]
             if strategy.granularity == "module" and not strategy.whole_blocks else [])
    granularities = [{"granularity": g} for g in ("block", "output") if g != strategy.granularity]
    offload = [] if strategy.offload else [{"cache.offload": True}]
    return [([_variant(strategy, change) for change in group], most)
            for group, most in ((offload, 1), (changes, 3), (per_site, 1), (whole, 1), (granularities, 2))]


def _block_families(sites: list[SitePlan]) -> list[tuple[str, str]]:
    """The families of numbered blocks among ``sites`` (names ``<family>.<index>[.<rest>]``), the
    one holding the fewest bytes first: each as a regex of its blocks' names and the suffix matching
    its sites inside a block."""
    held: dict[tuple[str, str], int] = {}
    for site in sites:
        match = re.fullmatch(r"(.+?)\.\d+(\..+)?", site.name)
        if match is not None:
            key = (re.escape(match.group(1)) + r"\.\d+", r"\..*" if match.group(2) else "")
            held[key] = held.get(key, 0) + site.nbytes
    return sorted(held, key=held.get)


def _variant(strategy, change: dict) -> tuple[str, object]:
    """``strategy`` with ``change`` (strategy keys as ``apply`` takes them) and the change as text."""
    variant = copy.deepcopy(strategy)
    for key, value in change.items():
        if key in ("granularity", "whole_blocks", "cache.offload"):
            setattr(variant, key.removeprefix("cache."), tuple(value) if key == "whole_blocks" else value)
        else:
            setattr(variant.predictor, key, (value,) if key == "factor_dtype" else value)
    return " ".join(f"{key}={_text(value)}" for key, value in change.items()), variant


def _text(value) -> str:
    """``value`` as the command line writes it (regexes with single backslashes)."""
    if isinstance(value, list):
        return "[" + ", ".join(f"'{each}'" for each in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_text(each)}" for key, each in value.items()) + "}"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _generation(model, strategy, shape: Shape, steps: int, grid: StepGrid | None) -> dict:
    """One cached generation of ``steps`` steps on meta tensors, driven with the sampler's ``grid``
    (None: no timesteps): the peak cache bytes on the device and in host memory (offload: the
    states move through :class:`MetaCopies`), the per-site shapes and bytes at the last step, the
    FLOPs and the full steps. Steps of one
    decision compute the same operators on the same shapes, so each decision's FLOPs are counted
    at its first step and added for the others (without token selection, whose refreshes compute
    some tokens, or a decision that waits for a probe: then every step is counted); a forecast
    step after the first of its decision is not run again unless the predictor's forecasts change
    its states (``forecasts_change_state``: DMD's fits, FoCa's window)."""
    from cachelab.models.families import model_sites

    calls = step_calls(model, shape, next(model.parameters()).dtype)
    signals = {"latent": first_tensor((), calls[0][1])}  # the sampler's: the model's input latent
    counted: dict[int, int] = {}
    flops = 0
    with torch.no_grad():  # the sites as cachelab.apply finds them (its family's, or from one traced call)
        source = model_sites(model, strategy.granularities, lambda: model(**calls[0][1]))
    if strategy.offload:  # the states move as on CUDA (nothing would move on meta tensors)
        strategy = dataclasses.replace(strategy, offload=False,
                                       predictor=HostOffload(strategy.predictor, transfers=lambda device: MetaCopies()))
    handle = strategy.attach(source)
    timesteps = [None] * steps if grid is None or grid.timestep is None else grid.timestep
    try:
        with torch.no_grad(), handle.generation(steps, grid):
            for s in range(steps):
                handle.step(s, timesteps[s], **signals)
                decision = handle.step_decision  # None: it waits for a probe the step's calls run
                code = decision_code(decision) if strategy.tokens is None and decision is not None else None
                if code in counted:
                    flops += counted[code]
                    if code == 0 or strategy.predictor.forecasts_change_state:
                        _step(handle, model, calls)
                else:
                    with FlopCounterMode(display=False) as counter:
                        _step(handle, model, calls)
                    if code is not None:
                        counted[code] = counter.get_total_flops()
                    flops += counter.get_total_flops()
            sites = _site_plans(handle)
        stats = handle.stats()
    except (RuntimeError, NotImplementedError) as err:
        if "meta" not in str(err).lower() and "data-dependent" not in str(err).lower():
            raise
        raise ConfigError(f"strategy {strategy.name}: its schedule decides from the values the model computes, which "
                          f"the planner (meta tensors, no values) cannot; allowed: a static schedule "
                          f"(schedule=interval): its plan bounds the adaptive one's cache") from None
    except ValueError as err:
        if grid is not None or "timestep" not in str(err):
            raise
        raise ConfigError(f"strategy {strategy.name}: its schedule reads the timestep, and the target has no sampler "
                          f"to give it (a bare transformer or a config); allowed: a diffusers pipeline (its "
                          f"scheduler's timesteps) or cachelab's DiT (DDIM)") from None
    finally:
        handle.remove()
    return {"cache_bytes": stats.cache_bytes, "host_bytes": stats.host_bytes, "sites": sites, "flops": flops,
            "full_steps": len(stats.full_steps)}


class MetaCopies:
    """The transfers of :class:`~cachelab.core.offload.HostOffload` on the planner's meta tensors:
    every copy a new meta tensor (no memory, no values), so the wrapper keeps the states on the
    host and prefetches the next site's as it does on CUDA."""

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone()

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone()

    def prefetch(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], None]:
        return [tensor.clone() for tensor in tensors], None

    def ready(self, copies: list[torch.Tensor], event) -> None:
        """Nothing to wait for: a meta copy is made at once."""


class WorstCase(Schedule):
    """A schedule that decides from values, as the planner drives it (meta tensors hold none): the
    same probes, every step full but the last, forecast, and each decision shown to the schedule
    (``record``) so that it keeps the signals it would keep; the predictor's own signals, which need
    values, are not read."""

    def __init__(self, schedule: Schedule, own: set[str]):
        self.schedule = schedule
        self.signals = tuple(signal for signal in schedule.signals if signal not in own - set(SAMPLER_SIGNALS))

    def decide(self, ctx: StepContext) -> Decision:
        decision = Decision.FORECAST if ctx.s == ctx.T - 1 > 0 else Decision.FULL
        record = getattr(self.schedule, "record", None)
        if record is not None:  # the noise level shapes no stored tensor: any one does on meta tensors
            record(dataclasses.replace(ctx, logsnr=0.0 if ctx.logsnr is None else ctx.logsnr), decision)
        return decision

    def reset(self) -> None:
        self.schedule.reset()

    def held_bytes(self) -> int:
        return self.schedule.held_bytes()


def _step(handle, model, calls) -> None:
    for context, kwargs in calls:
        if context is None:
            model(**kwargs)
        else:
            with handle.context(context):
                model(**kwargs)


def _site_plans(inner: CacheHandle) -> list[SitePlan]:
    """Per site, its recorded shapes (every context) and the bytes its states hold now."""
    sites: dict[str, SitePlan] = {}
    for caches in inner.caches.values():
        for name, cache in caches.items():
            site = sites.setdefault(name, SitePlan(name, [], 0))
            site.nbytes += cache.nbytes
            site.shapes += [tuple(state.tensors()[0].shape) for state in cache.states
                            if state is not None and state.tensors()]
    return list(sites.values())


def _strategy(strategy, keys: dict, offload: bool = False):
    """The strategy (a preset composed with ``keys``; ``offload`` set when asked), with the forecast
    guard off: meta tensors hold no values."""
    if isinstance(strategy, str):
        from cachelab.jobs.presets import preset

        strategy = preset(strategy, **keys)
    elif set(keys) - {"num_steps"}:
        raise ConfigError(f"keys {', '.join(keys)} apply to preset names only; set them on the Strategy object")
    if strategy.predictor is None:
        raise ConfigError(f"strategy={strategy.name!r} caches nothing; allowed: any other preset")
    strategy = dataclasses.replace(copy.deepcopy(strategy), guard="off", offload=strategy.offload or offload)
    if strategy.schedule.signals and not isinstance(strategy.schedule, WorstCase):  # it decides from values
        strategy.schedule = WorstCase(strategy.schedule, controller_signals(strategy.predictor))
    return strategy


def _shape(model, keys: dict) -> Shape:
    _, family = family_calls(model)
    values = {"height": family.height, "width": family.width, "num_frames": family.num_frames, "batch_size": 1,
              "guidance": family.guidance, "text_tokens": family.text_tokens,
              "vae_scale_factor": family.vae_scale_factor}
    if isinstance(model, DiT):  # cachelab's DiT takes latents at its own fixed size
        values.update(height=model.input_size, width=model.input_size)
    values.update({key: keys[key] for key in SHAPE_KEYS if key in keys})
    return Shape(**{key: (float if key == "guidance" else int)(value) for key, value in values.items()})


def _expert_steps(steps: int, experts: int, first: int | None) -> list[int]:
    """Steps per expert: all on one; with two, ``first`` on the high-noise one (default: the steps
    whose flow-matching timestep, under shift 12, is at least Wan 2.2's boundary 0.875 x 1000)."""
    if experts == 1:
        return [steps]
    if first is None:
        shift, boundary = 12.0, 0.875
        u = [1 - s / steps for s in range(steps)]
        first = sum(shift * x / (1 + (shift - 1) * x) >= boundary for x in u)
    return [int(first), steps - int(first)]


def sampler_grid(pipe, model, shape: Shape, steps: int) -> StepGrid | None:
    """The timesteps (sigmas, log-SNRs) of a run of ``steps`` steps, which the handle is driven with:
    a pipeline's scheduler (a copy) set as its pipeline sets it: sigmas from 1 to 1/steps where the
    transformer takes packed tokens (FLUX, Qwen-Image and LTX-Video pass them), else ``steps``
    timesteps; with dynamic shifting, shifted by the image's tokens (packed, or latent patches as SD3
    counts them). Cachelab's DiT: its sampler's DDIM, respaced. None for a bare transformer or a
    config (no sampler)."""
    if pipe is not None:
        scheduler = copy.deepcopy(pipe.scheduler)
        config = scheduler.config
        hidden = step_calls(model, shape, next(model.parameters()).dtype)[0][1].get("hidden_states")
        packed = hidden is not None and hidden.dim() == 3
        shift = {}
        if config.get("use_dynamic_shifting"):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            tokens = hidden.shape[1] if packed else hidden.shape[-2:].numel() // model.config.patch_size ** 2
            shift["mu"] = calculate_shift(tokens, config.get("base_image_seq_len", 256),
                                          config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                          config.get("max_shift", 1.15))
        if packed:
            scheduler.set_timesteps(sigmas=numpy.linspace(1.0, 1 / steps, steps), **shift)
        else:
            scheduler.set_timesteps(steps, **shift)
        return scheduler_grid(scheduler)
    if isinstance(model, DiT):
        return DDIMSchedule.respaced(steps).grid()
    return None


def _dtype(name) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in dtypes:
        raise ConfigError(f"dtype={name!r} is not allowed; allowed: {', '.join(dtypes)}")
    return dtypes[name]


def _name(target) -> str:
    if isinstance(target, str):
        return target
    model = target.transformer if is_pipeline(target) else target
    return type(model).__name__


def _fused_attention(query, key, value, *args, **kwargs):
    """What a fused attention kernel (flash, memory-efficient) allocates: its output alone (the
    meta device would otherwise take the math path, which materialises the attention matrix)."""
    return query.new_empty(*query.shape[:-1], value.shape[-1])


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0
