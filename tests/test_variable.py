"""``strategy.predictor.variable``: TaylorSeer and Newton expanded in the timestep, sigma or
log-SNR: the step default unchanged, exactness in x, the per-step grids of the samplers against
closed forms, the refusals, and end-to-end runs."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cachelab.core.controller import attach
from cachelab.core.schedules import Interval
from cachelab.core.sites import select_sites
from cachelab.core.variables import LOGSNR_LIMIT, VARIABLES, StepGrid, positions
from cachelab.errors import ConfigError
from cachelab.jobs.checks import check_config
from cachelab.jobs.runner import run
from cachelab.jobs.schema import compose_config
from cachelab.models.diffusion import DDIMSchedule
from cachelab.models.pipelines.driver import is_flow_matching, scheduler_grid
from cachelab.strategies.taylor import TaylorSeer

from conftest import tiny_adapter

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
DIFFERENCES = ["official", "newton"]


def history(predictor: TaylorSeer, steps, values, grid=None):
    """A state fed ``values`` at full ``steps``, with ``grid`` (x per step) as its positions."""
    state = predictor.new_state()
    state.positions = grid
    for s, value in zip(steps, values):
        predictor.update(state, s, value)
    return state


def random_grid(rng: random.Random, T: int, descending: bool) -> tuple[float, ...]:
    """A strictly monotone, non-uniform grid of ``T`` points."""
    x = [0.0]
    for _ in range(T - 1):
        x.append(x[-1] + rng.uniform(0.05, 2.0))
    offset = rng.uniform(-5, 5)
    return tuple(offset + (-v if descending else v) for v in x)


# -- variable=step computes exactly as before ----------------------------------------------------

@pytest.mark.parametrize("difference", DIFFERENCES)
@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_step_is_the_default_and_positions_equal_to_the_steps_change_no_bit(order, difference):
    """``variable="step"`` is the predictor without the knob; an x grid that is the step index itself
    (as floats) gives bit-identical factors and forecasts (float32 features)."""
    gen = torch.Generator().manual_seed(order)
    steps, T = [0, 1, 3, 4, 7, 9, 12], 16
    values = [torch.randn(3, 5, generator=gen) for _ in steps]
    plain = TaylorSeer(order, first_enhance=2, difference=difference)
    stepped = TaylorSeer(order, first_enhance=2, difference=difference, variable="step")
    in_x = TaylorSeer(order, first_enhance=2, difference=difference, variable="timestep")
    states = [history(plain, steps, values), history(stepped, steps, values),
              history(in_x, steps, values, tuple(float(s) for s in range(T)))]
    for a, b in zip(states[0].factors, states[1].factors):
        assert torch.equal(a, b)
    for a, b in zip(states[0].factors, states[2].factors):
        assert torch.equal(a, b)
    for s in (13, 14, 15):
        expected = plain.predict(states[0], s)
        assert torch.equal(stepped.predict(states[1], s), expected)
        assert torch.equal(in_x.predict(states[2], s), expected)


def test_the_official_test_vector_holds_with_the_knob_at_step():
    p = TaylorSeer(order=2, first_enhance=2, variable="step")
    state = history(p, (0, 4, 8), [torch.tensor([float(s * s)], dtype=torch.float64) for s in (0, 4, 8)])
    assert [f.item() for f in state.factors] == [64, 12, 2]
    assert [p.predict(state, s).item() for s in (9, 10, 11)] == [77, 92, 109]


# -- exactness and the rule in x ------------------------------------------------------------------

@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_newton_in_x_reproduces_polynomials_of_degree_up_to_order_on_non_uniform_grids(order, descending):
    rng = random.Random(10 * order + descending)
    for _ in range(10):
        T = 30
        grid = random_grid(rng, T, descending)
        degree = rng.randint(0, order)
        coefficients = torch.tensor([rng.uniform(-2, 2) for _ in range(degree + 1)], dtype=torch.float64)
        poly = lambda x: sum(c * x**i for i, c in enumerate(coefficients.tolist()))  # noqa: E731
        full = sorted(rng.sample(range(1, 20), order)) + [20]
        full = [0] + full
        p = TaylorSeer(order, first_enhance=1, difference="newton", variable="sigma")
        state = history(p, full, [torch.tensor([poly(grid[s])], dtype=torch.float64) for s in full], grid)
        for s in range(21, T):
            assert p.predict(state, s).item() == pytest.approx(poly(grid[s]), rel=1e-9, abs=1e-9)


def reference_official_in_x(order, first_enhance, full, values, grid, targets):
    """The official TaylorSeer rule written out on python floats, every distance taken in x:
    ``D_{i+1} = (new D_i - old D_i) / (x_s - x_last)``, forecast ``sum_i D_i (x - x_last)^i / i!``."""
    factors, last = [], None
    for s, value in zip(full, values):
        new = [value]
        if last is not None and s > first_enhance - 2:
            for i in range(min(len(factors), order)):
                new.append((new[i] - factors[i]) / (grid[s] - grid[last]))
        factors, last = new, s
    return [sum(d * (grid[s] - grid[last]) ** i / math.factorial(i) for i, d in enumerate(factors))
            for s in targets]


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_official_rule_in_x_matches_a_hand_written_float64_loop(order):
    rng = random.Random(order)
    for _ in range(20):
        T = 40
        grid = random_grid(rng, T, descending=rng.random() < 0.5)
        full = [0] + sorted(rng.sample(range(1, 30), rng.randint(1, 6)))
        values = [rng.uniform(-5, 5) for _ in full]
        fe = rng.randint(1, 4)
        targets = [full[-1] + k for k in (1, 2, 5)]
        p = TaylorSeer(order, first_enhance=fe, variable="logsnr")
        state = history(p, full, [torch.tensor([v], dtype=torch.float64) for v in values], grid)
        expected = reference_official_in_x(order, fe, full, values, grid, targets)
        assert [p.predict(state, s).item() for s in targets] == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_order_one_in_sigma_is_exact_on_lines_in_sigma_not_in_steps():
    """A feature linear in sigma is forecast exactly in sigma; in steps it is not (DDIM's sigma is not
    linear in the step index)."""
    grid = DDIMSchedule.respaced(20).grid()
    line = lambda s: torch.tensor([3.0 - 0.5 * grid.sigma[s]], dtype=torch.float64)  # noqa: E731
    full = [0, 1, 4]
    in_sigma = TaylorSeer(1, variable="sigma")
    in_steps = TaylorSeer(1)
    sigma_state = history(in_sigma, full, [line(s) for s in full], grid.sigma)
    step_state = history(in_steps, full, [line(s) for s in full])
    for s in (5, 6, 7):
        assert in_sigma.predict(sigma_state, s).item() == pytest.approx(line(s).item(), rel=1e-12)
        assert abs(in_steps.predict(step_state, s).item() - line(s).item()) > 1e-3


# -- the grids against closed forms ------------------------------------------------------------

@pytest.mark.parametrize("T", [8, 50])
def test_ddim_grid_against_the_closed_forms_of_the_linear_schedule(T):
    """The native DDIM's grid against DDPM's linear betas (1e-4 .. 0.02 over 1000 steps) written out
    in float64 torch, at ADM's respaced timesteps: sigma = sqrt((1 - a) / a), logsnr = log(a / (1 - a));
    and against diffusers' float32 ``alphas_cumprod`` of the same schedule to its precision."""
    from diffusers import DDIMScheduler

    kept = sorted({round(i * 999 / (T - 1)) for i in range(T)}, reverse=True)
    a = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[kept]
    grid = DDIMSchedule.respaced(T).grid()
    assert grid.timestep == tuple(float(t) for t in kept)
    np.testing.assert_allclose(grid.sigma, ((1 - a) / a).sqrt().numpy(), rtol=1e-12)
    np.testing.assert_allclose(grid.logsnr, (a / (1 - a)).log().numpy(), rtol=1e-12)
    a32 = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02).alphas_cumprod.double()[kept]
    np.testing.assert_allclose(grid.logsnr, (a32 / (1 - a32)).log().numpy(), rtol=1e-3)
    assert grid.timestep[0] > grid.timestep[-1] and grid.sigma[0] > grid.sigma[-1]
    assert grid.logsnr[0] < grid.logsnr[-1]  # noise first: the log-SNR rises as s counts up


def test_diffusers_ddim_scheduler_grid_against_its_alphas_cumprod():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    grid = scheduler_grid(scheduler)
    t = scheduler.timesteps.long()
    a = scheduler.alphas_cumprod.double()[t]
    assert grid.timestep == tuple(float(v) for v in t)
    np.testing.assert_allclose(grid.sigma, torch.sqrt((1 - a) / a).numpy(), rtol=1e-12)
    np.testing.assert_allclose(grid.logsnr, torch.log(a) - torch.log1p(-a), rtol=1e-9)


def test_euler_scheduler_grid_from_its_own_sigmas_and_a_bare_scheduler_gives_timesteps_alone():
    """Euler (non-integer timesteps): sigma is the scheduler's own, logsnr = -2 log sigma."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(7)
    grid = scheduler_grid(scheduler)
    sigma = scheduler.sigmas.double()[:7]
    np.testing.assert_allclose(grid.sigma, sigma.numpy(), rtol=1e-9)
    np.testing.assert_allclose(grid.logsnr, (-2 * sigma.log()).numpy(), rtol=1e-9)

    class Bare:
        timesteps = torch.tensor([30.0, 20.0, 10.0])

    assert scheduler_grid(Bare()).supplied() == ["step", "timestep"]


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_grid_against_its_sigmas_with_the_infinite_end_clamped(shift):
    """FlowMatchEuler: sigma is the scheduler's, logsnr = 2 log((1 - sigma) / sigma); sigma = 1 at step 0
    (pure noise) has logsnr -inf, clamped to -LOGSNR_LIMIT (documented)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(12)
    grid = scheduler_grid(scheduler)
    sigma = scheduler.sigmas.double()[:12]
    assert grid.timestep == tuple(scheduler.timesteps.double().tolist())
    np.testing.assert_allclose(grid.sigma, sigma.numpy(), rtol=0)
    assert sigma[0] == 1.0 and grid.logsnr[0] == -LOGSNR_LIMIT
    np.testing.assert_allclose(grid.logsnr[1:], (2 * torch.log((1 - sigma[1:]) / sigma[1:])).numpy(), rtol=1e-9)
    assert positions("logsnr", 12, grid) == grid.logsnr  # finite, strictly increasing


def test_a_flow_matching_scheduler_is_known_by_its_class_not_its_name():
    """A subclass of diffusers' FlowMatchEuler under another name samples a flow (sigmas from the
    scheduler); a scheduler merely named FlowMatch... does not."""
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    class RenamedFlow(FlowMatchEulerDiscreteScheduler):
        pass

    class FlowMatchLookalike(EulerDiscreteScheduler):
        pass

    assert is_flow_matching(RenamedFlow()) and not is_flow_matching(FlowMatchLookalike())
    scheduler = RenamedFlow(shift=3.0)
    scheduler.set_timesteps(5)
    np.testing.assert_allclose(scheduler_grid(scheduler).sigma, scheduler.sigmas.double()[:5].numpy(), rtol=0)


def test_clamps_at_both_ends():
    flow = StepGrid.from_flow_sigmas([1000.0, 500.0, 0.0], [1.0, 0.5, 0.0])
    assert flow.logsnr == (-LOGSNR_LIMIT, 0.0, LOGSNR_LIMIT)
    vp = StepGrid.from_alpha_bar([999.0, 0.0], [1e-12, 1.0])
    assert vp.logsnr == (-LOGSNR_LIMIT, LOGSNR_LIMIT) and vp.sigma[1] == 0.0


# -- refusals ----------------------------------------------------------------------------------

def test_a_bad_value_is_one_error_naming_the_key_and_the_allowed_values():
    with pytest.raises(ConfigError, match=r"strategy.predictor.variable='time' is not allowed; allowed: "
                                          r"step, timestep, sigma, logsnr"):
        TaylorSeer(2, variable="time")
    cfg = compose_config(["strategy=taylor_newton", "strategy.predictor.variable=snr"])
    with pytest.raises(ConfigError, match=r"strategy.predictor.variable='snr' is not allowed; allowed: step, "
                                          r"timestep, sigma, logsnr"):
        check_config(cfg)
    check_config(compose_config(["strategy=taylor", "strategy.predictor.variable=logsnr"]))


def test_a_sampler_without_the_variable_is_one_error_naming_the_key_and_what_it_allows():
    adapter = tiny_adapter()
    handle = attach(select_sites(adapter.model, adapter.site_patterns("module")), TaylorSeer(2, variable="sigma"),
                    Interval(3, 2))
    try:
        with pytest.raises(ConfigError, match=r"strategy.predictor.variable='sigma'.*allowed here: step$"):
            handle.begin(10)
        with pytest.raises(ConfigError, match=r"strategy.predictor.variable='sigma'.*does not supply the sigma.*"
                                              r"allowed here: step, timestep$"):
            handle.begin(10, StepGrid(timestep=tuple(float(t) for t in range(10, 0, -1)), source="MyScheduler"))
        with pytest.raises(ConfigError, match=r"sigma=inf at step 0; allowed here: step, timestep, logsnr"):
            handle.begin(2, StepGrid.from_alpha_bar([999.0, 0.0], [0.0, 0.9]))  # zero terminal SNR
        with pytest.raises(ConfigError, match="same sigma at steps 0 and 1"):
            handle.begin(2, StepGrid.from_flow_sigmas([1.0, 1.0], [0.5, 0.5]))
        handle.begin(10, DDIMSchedule.respaced(10).grid())
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="has no sigma values"):  # a state the controller did not set up
        predictor = TaylorSeer(1, variable="sigma")
        predictor.update(predictor.new_state(), 0, torch.zeros(1))


# -- end to end ---------------------------------------------------------------------------------

class Recording(TaylorSeer):
    """TaylorSeer that remembers the positions its states were given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = set()

    def update(self, state, s, value):
        self.seen.add(state.positions)
        super().update(state, s, value)


def test_native_dit_hands_its_ddim_grid_to_the_states():
    adapter = tiny_adapter(num_steps=8)
    inputs = adapter.make_inputs(2, seed=0)
    outputs = {}
    for variable in VARIABLES:
        predictor = Recording(2, first_enhance=2, variable=variable)
        handle = attach(select_sites(adapter.model, adapter.site_patterns("module")), predictor, Interval(3, 2))
        try:
            outputs[variable] = adapter.generate(inputs, handle)
            assert handle.stats().forecast_steps
        finally:
            handle.remove()
        expected = None if variable == "step" else getattr(DDIMSchedule.respaced(8).grid(), variable)
        assert predictor.seen == {expected}
        assert torch.isfinite(outputs[variable]).all()
    assert not torch.equal(outputs["step"], outputs["sigma"])  # sigma is not linear in the step index


@pytest.mark.parametrize("name", ["tiny_flux", "tiny_diffusers_dit"])
def test_pipelines_hand_their_scheduler_grid_to_the_states(name, tmp_path):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    cfg.merge_with({"path": str(tmp_path / "pipe"), "num_steps": 6, "device": "cpu"})
    adapter = instantiate(cfg)
    predictor = Recording(2, first_enhance=2, variable="logsnr")
    handle = attach(select_sites(adapter.model, adapter.site_patterns("module")), predictor, Interval(3, 2))
    try:
        images = adapter.generate(adapter.make_inputs(1, seed=0), handle)
    finally:
        handle.remove()
    scheduler = adapter.pipe.scheduler
    if name == "tiny_flux":  # flow matching: 2 log((1 - sigma) / sigma), sigma = 1 clamped
        sigma = scheduler.sigmas.double()[:6]
        expected = torch.where(sigma >= 1, -LOGSNR_LIMIT, 2 * torch.log((1 - sigma) / sigma))
    else:
        a = scheduler.alphas_cumprod.double()[scheduler.timesteps.long()]
        expected = torch.log(a / (1 - a))
    (seen,) = predictor.seen
    np.testing.assert_allclose(seen, expected.numpy(), rtol=1e-9)
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("variable", VARIABLES)
def test_a_tiny_dit_run_with_each_variable(variable, tmp_path):
    cfg = compose_config(["model=tiny_dit", "num_steps=8", "num_images=2", "interval=3", "measure.flops=false",
                          "logger=none", "progress=false", "threads=1", f"strategy.predictor.variable={variable}"])
    metrics = run(cfg, tmp_path)
    assert metrics["variable"] == variable
    assert metrics["num_forecast"] > 0 and math.isfinite(metrics["quality"]["rel_l2"])


def test_sweep_tables_show_the_variable_only_where_a_job_expands_in_another_than_step():
    from cachelab.analysis.sweep import COLUMNS, columns, markdown, sort_rows

    rows = [{"strategy": "taylor", "granularity": "module", "order": 2, "variable": v, "interval": 5}
            for v in ("logsnr", "step", "sigma")]
    assert columns(rows[1:2]) == COLUMNS and columns([{"strategy": "reuse"}]) == COLUMNS
    headers = [h for h, _, _ in columns(rows)]
    assert headers[headers.index("order") + 1] == "variable"
    assert [m["variable"] for m in sort_rows(rows)] == ["step", "sigma", "logsnr"]
    assert "| taylor | module | 2 | sigma | 5 |" in markdown(rows, [])
