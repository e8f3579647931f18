"""The official TaylorSeer computation on the six paper families (tiny DiT, PixArt, SD3, FLUX,
Wan, HunyuanVideo), through both entry points: ``cachelab.apply`` on the pipeline (or the native
DiT) and the command line's path (``conf/`` composed as ``python run.py model=<family>
strategy=taylor ...``, the strategy attached to the family adapter).

The reference is written here from the paper's rule, independently of cachelab: plain forward
hooks on the paper's forecast sites (per block the attention and MLP outputs before the gate,
per stream for dual-stream blocks; the fused output projection of single-stream blocks) replace
each output on forecast steps, the steps counted from the model's calls. Its rule: steps
``s < first_enhance`` are full, then ``interval - 1`` forecasts and one full step; at a full step
``D_0 = F`` and, only when ``s > first_enhance - 2``, ``D_{i+1} = (D_i - D_i_old) / (s - s_last)``
while the old factor exists; a forecast is ``sum_i D_i k^i / i!`` with ``k = s - s_last``.
Each test checks the same full steps, every forecast feature to float32 rounding, and the same
final output."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

import cachelab
from cachelab.jobs.base import build, build_strategy
from cachelab.jobs.schema import compose_config
from tests.conftest import tiny_adapter

STEPS, ORDER, INTERVAL, FIRST_ENHANCE = 8, 2, 3, 3   # full steps 0, 1, 2, 5: derivatives start at step 2
KEYS = [f"order={ORDER}", f"interval={INTERVAL}", f"first_enhance={FIRST_ENHANCE}", f"num_steps={STEPS}"]
DOUBLE = r"transformer_blocks\.\d+\.(attn|ff|ff_context)"
# the paper's forecast sites of each family (module names), and its transformer calls per step
FAMILIES = {
    "tiny_dit_random": (r"blocks\.\d+\.(attn|mlp)", 1),
    "tiny_pixart": (r"transformer_blocks\.\d+\.(attn1|attn2|ff)", 1),
    "tiny_sd3": (DOUBLE, 1),
    "tiny_flux": (rf"{DOUBLE}|single_transformer_blocks\.\d+\.proj_out", 1),
    "tiny_wan": (r"blocks\.\d+\.(attn1|attn2|ffn)", 2),  # cond and uncond: a state each
    "tiny_hunyuan_video": (rf"{DOUBLE}|single_transformer_blocks\.\d+\.proj_out", 1),
}
# relative L2, float32 rounding (measured: features <= 6e-8, outputs <= 6e-7, where caching itself moves
# the outputs by 1e-5 (DiT) to 3e-2 (HunyuanVideo) from full compute)
FEATURES, OUTPUT = 1e-6, 2e-6


def official_full(s: int) -> bool:
    return s < FIRST_ENHANCE or (s - (FIRST_ENHANCE - 1)) % INTERVAL == 0


class OfficialTaylorSeer:
    """The paper's rule on plain forward hooks: per (call of the step, site, output) a list of
    factors and the step of the last full step; records every site value the model gets."""

    def __init__(self, model: torch.nn.Module, sites: str, calls_per_step: int):
        self.calls_per_step, self.calls = calls_per_step, 0
        self.factors: dict[tuple, tuple[int, list[torch.Tensor]]] = {}
        self.full: dict[tuple, torch.Tensor] = {}
        self.forecast: dict[tuple, torch.Tensor] = {}
        matched = [(name, module) for name, module in model.named_modules() if re.fullmatch(sites, name)]
        # a model call runs its first site once (the native DiT's sampler calls forward, not the module)
        self.hooks = [matched[0][1].register_forward_pre_hook(self.count)]
        self.hooks += [module.register_forward_hook(self.site(name)) for name, module in matched]

    def count(self, module, args):
        self.calls += 1

    def site(self, name: str):
        def hook(module, args, out):
            s, call = divmod(self.calls - 1, self.calls_per_step)
            outs = out if isinstance(out, tuple) else (out,)
            new = tuple(None if o is None else self.value(s, (call, name, j), o.float()).to(o.dtype)
                        for j, o in enumerate(outs))
            return new if isinstance(out, tuple) else new[0]
        return hook

    def value(self, s: int, key: tuple, fresh: torch.Tensor) -> torch.Tensor:
        if official_full(s):
            factors = [fresh]
            if key in self.factors and s > FIRST_ENHANCE - 2:
                last, old = self.factors[key]
                for i in range(ORDER):
                    if i >= len(old):
                        break
                    factors.append((factors[i] - old[i]) / (s - last))
            self.factors[key] = (s, factors)
            self.full[(s, *key)] = fresh
            return fresh
        last, factors = self.factors[key]
        k = s - last
        forecast = sum(factor * k**i / math.factorial(i) for i, factor in enumerate(factors))
        self.forecast[(s, *key)] = forecast
        return forecast

    def remove(self):
        for hook in self.hooks:
            hook.remove()


class Seen:
    """A cachelab handle's observer: every full-step value and forecast by (step, call, site, output)."""

    def __init__(self):
        self.full, self.forecast, self.order = {}, {}, {}

    def _key(self, site, context, s, j):
        call = self.order.setdefault(s, {}).setdefault(context, len(self.order[s]))
        return (s, call, site, j)

    def full_values(self, site, context, s, values):
        for j, value in enumerate(values):
            if value is not None:
                self.full[self._key(site, context, s, j)] = value.float().clone()

    def forecast_values(self, site, context, s, forecast, true):
        for j, value in enumerate(forecast):
            if value is not None:
                self.forecast[self._key(site, context, s, j)] = value.float().clone()


class Record:
    """The handle's observer (``full``/``forecast``), writing into a :class:`Seen`."""

    def __init__(self, seen: Seen):
        self.full, self.forecast = seen.full_values, seen.forecast_values


def observer() -> tuple[Seen, Record]:
    seen = Seen()
    return seen, Record(seen)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """The family's config composed as run.py composes it, its adapter (tiny pipelines built into a temporary folder)."""
    name = request.param
    overrides = [f"model={name}", "strategy=taylor", *KEYS, "device=cpu"]
    if name == "tiny_dit_random":
        overrides += ["model.input_size=8", "model.arch.hidden_size=32", "model.arch.depth=2"]
    else:
        overrides += [f"model.path={tmp_path_factory.mktemp(name) / 'pipe'}"]
    cfg = compose_config(overrides)
    return name, cfg, build(cfg, "model")


def generate(adapter, inputs, handle=None) -> torch.Tensor:
    """One generation of ``inputs``: the native DiT through its sampler, a pipeline called as a user calls it."""
    if not hasattr(adapter, "pipe"):
        return adapter.generate(inputs, handle)
    return adapter.pipe(**adapter.call_arguments(inputs), generator=torch.Generator().manual_seed(inputs.seed),
                        num_inference_steps=STEPS, output_type="pt", return_dict=False)[0].float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(seen: Seen, reference: OfficialTaylorSeer, out: torch.Tensor, expected: torch.Tensor, entry: str):
    full_steps = sorted({key[0] for key in seen.full})
    assert full_steps == [s for s in range(STEPS) if official_full(s)], entry
    assert set(seen.full) == set(reference.full), f"{entry}: the sites differ from the paper's"
    forecasts = {key: value for key, value in seen.forecast.items() if key[2:] in {k[2:] for k in reference.full}}
    assert set(forecasts) == set(reference.forecast), f"{entry}: the forecast sites differ from the paper's"
    worst = max(rel(forecasts[key], reference.forecast[key]) for key in reference.forecast)
    assert worst <= FEATURES, f"{entry}: a forecast feature differs by rel-L2 {worst:.2e}"
    assert max(rel(seen.full[key], reference.full[key]) for key in reference.full) <= FEATURES, entry
    assert rel(out, expected) <= OUTPUT, f"{entry}: the output differs by rel-L2 {rel(out, expected):.2e}"


@torch.no_grad()
def test_both_entry_points_compute_the_official_taylorseer(family):
    name, cfg, adapter = family
    sites, calls_per_step = FAMILIES[name]
    inputs = adapter.make_inputs(2, seed=7)
    reference = OfficialTaylorSeer(adapter.model, sites, calls_per_step)
    try:
        expected = generate(adapter, inputs)
    finally:
        reference.remove()
    assert reference.forecast, "the reference forecast nothing"

    # the command line's path: the composed strategy attached to the family adapter
    handle = build_strategy(cfg).attach(adapter)
    seen, record = observer()
    handle.observe(record)
    try:
        out = adapter.generate(inputs, handle)
    finally:
        handle.remove()
    check(seen, reference, out, expected, "run.py")

    # the API: apply to the pipeline (the native DiT: to the model, its sampler driving the handle);
    # the sites are hooked at the first generation, observed in the second
    target = adapter.pipe if hasattr(adapter, "pipe") else adapter.model
    with cachelab.apply(target, "taylor", order=ORDER, interval=INTERVAL, first_enhance=FIRST_ENHANCE) as api:
        generate(adapter, inputs, api)
        seen, record = observer()
        api.inner.observe(record)
        out = generate(adapter, inputs, api)
    check(seen, reference, out, expected, "cachelab.apply")


@pytest.mark.parametrize("granularity", ["module", "block", "stack", "output"])
def test_apply_and_the_command_line_hook_the_same_sites_on_the_native_dit(granularity):
    """cachelab's own DiT: apply finds its family (``DiTAdapter``), hooks the family's sites with
    the composed schedule and gives the command line's generation bit for bit."""
    adapter = tiny_adapter()
    inputs = adapter.make_inputs(2, seed=0)
    keys = [*KEYS[:3], f"strategy.granularity={granularity}"]
    family = build_strategy(compose_config(["strategy=taylor", *keys])).attach(adapter)
    expected = adapter.generate(inputs, family)
    names, full_steps = [site.name for site in family.sites], family.stats().full_steps
    family.remove()
    with cachelab.apply(adapter.model, "taylor", order=ORDER, interval=INTERVAL, first_enhance=FIRST_ENHANCE,
                        granularity=granularity) as handle:
        assert torch.equal(adapter.generate(inputs, handle), expected)
        assert [site.name for site in handle.inner.sites] == names
        assert handle.stats().full_steps == full_steps


@pytest.mark.parametrize("name", ["tiny_dit", "tiny_flux_digits"])
def test_the_shipped_twins_give_the_command_lines_generation_through_apply(name):
    """The trained models shipped with cachelab (native DiT, FLUX pipeline): ``run.py``'s
    composition and ``cachelab.apply`` hook the same sites and give the same images bit for bit."""
    cfg = compose_config([f"model={name}", "strategy=taylor", *KEYS[:3], "num_steps=6", "device=cpu",
                          "model.judge=null"])
    adapter = build(cfg, "model")
    inputs = adapter.make_inputs(1, seed=3)
    family = build_strategy(cfg).attach(adapter)
    expected = adapter.generate(inputs, family)
    names = [site.name for site in family.sites]
    family.remove()
    target = adapter.pipe if hasattr(adapter, "pipe") else adapter.model
    with cachelab.apply(target, "taylor", order=ORDER, interval=INTERVAL, first_enhance=FIRST_ENHANCE) as handle:
        # the DiT's sampler drives the handle; the pipeline drives apply's handle itself (the adapter's call, no handle)
        assert torch.equal(adapter.generate(inputs, handle if target is adapter.model else None), expected)
        assert [site.name for site in handle.inner.sites] == names
