"""Token selection (strategy.tokens): exact partial steps on the native DiT, the policies' scores
against hand-computed cases, partial-step FLOPs against a closed form, one-line config errors."""
from __future__ import annotations

import math

import pytest
import torch

from cachelab.core.controller import attach
from cachelab.core.schedules import Interval, Mask, ToCaInterval
from cachelab.core.sites import SitePattern, select_sites
from cachelab.core.strategy import Strategy
from cachelab.core.tokens import TOKENWISE, TokenPolicy, TokenState, TokenView
from cachelab.errors import ConfigError
from cachelab.evaluation.flops import count_flops
from cachelab.jobs.checks import check_strategy
from cachelab.jobs.presets import preset
from cachelab.jobs.schema import compose_config
from cachelab.models.dit import modulate
from cachelab.strategies.reuse import Reuse
from cachelab.strategies.taylor import TaylorSeer
from cachelab.strategies.tokens.clusca import ClusCa, kmeans
from cachelab.strategies.tokens.duca import DuCa
from cachelab.strategies.tokens.random_tokens import RandomTokens
from cachelab.strategies.tokens.scores import age_score, norm_score, normalised, spatial_bonus, top_tokens
from cachelab.strategies.tokens.toca import ToCa
from tests.conftest import tiny_adapter


class Fixed(TokenPolicy):
    """Selects the same tokens at every site and step; records what it was shown (the state as it
    was then: s, kind, depth, depths, forecasts, cache ages)."""

    def __init__(self, index: list[int], kinds=("attn", "mlp")):
        self.index, self.kinds, self.views = torch.tensor(index), kinds, []

    def computes(self, kind):
        return kind in self.kinds

    def select(self, view):
        self.views.append((view.s, view.kind, view.depth, view.depths, view.state.forecasts, view.state.age.clone()))
        return self.index.expand(view.tokens.shape[0], -1)


def generate(adapter, inputs, predictor, tokens, schedule=None):
    handle = Strategy("t", predictor, schedule or Interval(3, 2), "module", tokens=tokens).attach(adapter)
    try:
        return adapter.generate(inputs, handle)
    finally:
        handle.remove()


# -- exactness ---------------------------------------------------------------------------
@pytest.mark.parametrize("predictor", [Reuse(), TaylorSeer(2, 2)], ids=["reuse", "taylor"])
@pytest.mark.parametrize("tokens", [RandomTokens(1.0), ToCa(fresh_ratio=1.0, ratio_schedule="constant", score="norm")],
                         ids=["random", "toca"])
def test_every_token_selected_is_bit_identical_to_full_compute(adapter, predictor, tokens):
    inputs = adapter.make_inputs(2, seed=1)
    assert torch.equal(generate(adapter, inputs, predictor, tokens), adapter.generate(inputs))


@pytest.mark.parametrize("predictor", [Reuse(), TaylorSeer(2, 2)], ids=["reuse", "taylor"])
@pytest.mark.parametrize("tokens", [RandomTokens(0.0), ToCa(fresh_ratio=0.0, ratio_schedule="constant", score="random"),
                                    Fixed([])], ids=["random", "toca", "empty"])
def test_no_token_selected_is_the_predictor_alone(adapter, predictor, tokens):
    inputs = adapter.make_inputs(2, seed=2)
    alone = generate(adapter, inputs, predictor, None)
    assert torch.equal(generate(adapter, inputs, predictor, tokens), alone)
    assert not torch.equal(alone, adapter.generate(inputs))  # forecasts really happened


def test_a_partial_step_computes_the_selected_tokens_and_forecasts_the_rest(adapter):
    """At a forecast step the selected tokens are what the site computes from the same inputs
    (attention: those queries against every token), the others the predictor's forecast; the
    fresh tokens replace the cache's D_0, so the next step without selection returns them."""
    model, selected = adapter.model, [1, 5, 6, 12]
    policy = Fixed(selected)
    handle = attach(select_sites(model, adapter.site_patterns("module")), Reuse(), Mask(full_steps=[0]), tokens=policy)
    x0, x1 = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    shift, scale = torch.randn(2, 32), torch.randn(2, 32)
    block = model.blocks[1]
    with torch.no_grad(), handle.generation(3):
        handle.step(0)
        full_attn, full_mlp = block.attn_branch(x0, shift, scale), block.mlp_branch(x0, shift, scale)
        handle.step(1)
        attn, mlp = block.attn_branch(x1, shift, scale), block.mlp_branch(x1, shift, scale)
        policy.index = torch.tensor([], dtype=torch.long)
        handle.step(2)
        later = block.mlp_branch(torch.randn(2, 16, 32), shift, scale)
    ref_attn = block.attn.forward(modulate(block.norm1(x1), shift, scale))  # the bare timm modules
    ref_mlp = block.mlp.forward(modulate(block.norm2(x1), shift, scale))
    others = [i for i in range(16) if i not in selected]
    for out, ref, cached in ((attn, ref_attn, full_attn), (mlp, ref_mlp, full_mlp)):
        torch.testing.assert_close(out[:, selected], ref[:, selected], rtol=1e-6, atol=1e-6)
        assert torch.equal(out[:, others], cached[:, others])
    assert torch.equal(later, mlp)
    handle.remove()


def test_taylor_forecasts_the_unselected_tokens(adapter):
    inputs = adapter.make_inputs(2, seed=3)
    taylor = generate(adapter, inputs, TaylorSeer(2, 2), None)
    mixed = generate(adapter, inputs, TaylorSeer(2, 2), RandomTokens(0.25))
    assert not torch.equal(mixed, taylor)
    assert (mixed - adapter.generate(inputs)).norm() < (taylor - adapter.generate(inputs)).norm() * 1.5


def test_the_view_names_kind_depth_and_age(adapter):
    policy = Fixed([0, 3], kinds=("mlp",))
    generate(adapter, adapter.make_inputs(1, seed=4), Reuse(), policy, Mask(full_steps=[0, 3]))
    views = [seen[:5] for seen in policy.views]
    # CFG batch: one call per step; steps 1, 2 and 4.. are forecast; two mlp sites (depth 0, 1)
    assert views[:4] == [(1, "mlp", 0, 2, 1), (1, "mlp", 1, 2, 1), (2, "mlp", 0, 2, 2), (2, "mlp", 1, 2, 2)]
    age = policy.views[2][5]  # seen at step 2: after step 1 chose tokens 0 and 3
    assert age[0].tolist() == [0, 1, 1, 0] + [1] * 12


# -- scores against hand-computed cases ----------------------------------------------------
def test_norm_attention_and_age_scores():
    tokens = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])
    torch.testing.assert_close(norm_score(tokens), torch.tensor([[5 / math.sqrt(26), 1 / math.sqrt(26)]]))
    torch.testing.assert_close(normalised(torch.tensor([[1.0, 2.0, 2.0]])), torch.tensor([[1 / 3, 2 / 3, 2 / 3]]))
    torch.testing.assert_close(age_score(torch.tensor([[0, 2, 4]], dtype=torch.int32), 4), torch.tensor([[0.0, 0.5, 1.0]]))


def test_spatial_bonus_on_a_4x4_map():
    score = torch.arange(16.0).reshape(1, 16)  # rows 0..3 of a 4x4 map; 2x2 patches' maxima: 5, 7, 13, 15
    expected = score.clone()
    for i in (5, 7, 13, 15):
        expected[0, i] = 1.5 * i
    torch.testing.assert_close(spatial_bonus(score, 0.5, 2), expected)
    with pytest.raises(ConfigError, match="square token map"):
        spatial_bonus(torch.zeros(1, 12), 0.5, 2)


def test_top_tokens():
    assert top_tokens(torch.tensor([[0.1, 0.9, 0.5, 0.7]]), 2).sort().values.tolist() == [[1, 3]]


def view(s=0, T=50, kind="mlp", depth=0, depths=28, tokens=None, age=None, scores=None, forecasts=1):
    tokens = torch.zeros(1, 16, 4) if tokens is None else tokens
    age = torch.zeros(tokens.shape[:2], dtype=torch.int32) if age is None else age
    return TokenView(s, T, kind, depth, depths, tokens, TokenState(age, forecasts), scores or {})


def test_toca_ratio_schedule_closed_form():
    toca = ToCa()
    # d = T - 1 - s counted down: step factor 1.4 - 0.8 d / T; layer 1.8 - 1.6 l / 27; module 2.5 (MLP)
    assert toca.ratio(view(s=49, depth=0)) == pytest.approx(0.07 * 1.4 * 1.8 * 2.5)
    assert toca.ratio(view(s=0, depth=27)) == pytest.approx(0.07 * (1.4 - 0.8 * 49 / 50) * 0.2 * 2.5)
    assert toca.ratio(view(s=49, kind="attn")) == 0.0 and not toca.computes("attn") and toca.computes("mlp")
    assert ToCa(fresh_ratio=0.3, ratio_schedule="constant").ratio(view(kind="attn")) == 0.3


def test_toca_selects_by_score_age_and_bonus():
    toca = ToCa(fresh_ratio=0.25, ratio_schedule="constant", score="attention", fresh_threshold=4,
                soft_fresh_weight=0.25, bonus_ratio=0.0)
    received = torch.tensor([[4.0, 3.0, 2.0, 1.0] + [0.0] * 12])
    age = torch.tensor([[0, 0, 0, 0] + [0] * 11 + [20]], dtype=torch.int32)  # token 15 unseen for 20 steps
    # scores: 4/sqrt(30), 3/sqrt(30), ... (0.73, 0.55, 0.37, 0.18) and 0.25 * 20 / 4 = 1.25 for token 15
    chosen = toca.select(view(scores={"attention": received}, age=age))
    assert chosen.sort().values.tolist() == [[0, 1, 2, 15]]
    assert toca.needs == ("attention",) and ToCa(score="norm").needs == ()
    value_norm = ToCa(fresh_ratio=0.25, ratio_schedule="constant", score="value_norm", bonus_ratio=0.0)
    assert value_norm.needs == ("value_norm",)
    assert value_norm.select(view(scores={"value_norm": received}, age=age)).sort().values.tolist() == [[0, 1, 2, 15]]


def test_the_dit_attention_received_matches_an_explicit_map():
    block = tiny_adapter().model.blocks[0]
    x, shift, scale = torch.randn(2, 16, 32), torch.randn(2, 32), torch.randn(2, 32)
    h = modulate(block.norm1(x), shift, scale).double()
    w, b = block.attn.qkv.weight.double(), block.attn.qkv.bias.double()
    q, k = (h @ w[:32].T + b[:32]).reshape(2, 16, 2, 16), (h @ w[32:64].T + b[32:64]).reshape(2, 16, 2, 16)
    weights = torch.einsum("bqhd,bkhd->bhqk", q, k).div(4.0).softmax(-1)  # head_dim 16: scale 1/4
    with torch.no_grad():
        torch.testing.assert_close(block.attention_received(x, shift, scale).double(), weights.mean(1).sum(1),
                                   rtol=1e-5, atol=1e-6)  # float32 against a float64 reference


def test_the_dit_value_norms_match_the_value_projection():
    block = tiny_adapter().model.blocks[0]
    x, shift, scale = torch.randn(2, 16, 32), torch.randn(2, 32), torch.randn(2, 32)
    h = modulate(block.norm1(x), shift, scale).double()
    v = h @ block.attn.qkv.weight[64:].double().T + block.attn.qkv.bias[64:].double()
    with torch.no_grad():
        torch.testing.assert_close(block.value_norms(x, shift, scale).double(), v.norm(dim=-1), rtol=1e-5, atol=1e-6)


def test_value_norm_selection_runs_on_the_dit(adapter):
    inputs = adapter.make_inputs(2, seed=7)
    out = generate(adapter, inputs, Reuse(), DuCa(score="value_norm", fresh_ratio=0.2))
    assert not torch.equal(out, generate(adapter, inputs, Reuse(), DuCa(fresh_ratio=0.2)))


def test_duca_alternates_conservative_and_aggressive_steps():
    duca = DuCa(fresh_ratio=0.5, ratio_schedule="constant")
    assert duca.select(view(forecasts=1)).shape == (1, 8)
    assert duca.select(view(forecasts=2)) is None
    assert duca.select(view(forecasts=3)).shape == (1, 8)


def test_kmeans_and_one_token_per_cluster():
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(6, 2, generator=g) * 0.1 + 10, torch.randn(10, 2, generator=g) * 0.1]).unsqueeze(0)
    labels, centroids = kmeans(points, 2, 5, g)
    assert labels[0, :6].unique().numel() == 1 and labels[0, 6:].unique().numel() == 1 and labels[0, 0] != labels[0, 6]
    torch.testing.assert_close(centroids[0, labels[0, 0]], points[0, :6].mean(0))
    clusca = ClusCa(clusters=2)
    state = TokenState(torch.zeros(1, 16, dtype=torch.int32))
    clusca.full(state, points)
    for _ in range(5):
        chosen = clusca.select(TokenView(1, 10, "mlp", 0, 1, points, state))
        assert sorted(state.extra[0][0, chosen[0]].tolist()) == [0, 1]  # one token of each cluster


def test_toca_interval_hand_computed():
    # T = 10, N = 3: d = 9 - s, full where d % round(3 / (1.4 - 0.08 d)) == 0: d = 8, 6, 3, 2, 0, and s = 0
    assert ToCaInterval(3).full_steps(10) == [0, 1, 3, 6, 7, 9]
    assert ToCaInterval(4).full_steps(50) == [0, 1, 9, 14, 21, 25, 29, 34, 37, 40, 43, 46, 49]


# -- FLOPs of a partial step ----------------------------------------------------------------
def test_partial_step_flops_closed_form(adapter):
    """A forecast step with k of N tokens recomputed costs, per block, the MLP on k tokens
    (2 k D 4D x 2) and the attention of k queries (q and output projections on k tokens, k and v
    on all N, k x N scores and values: 2 k D D x 2 + 2 N D 2D + 4 k N D), times the batch."""
    model, B, N, D, L, k = adapter.model, 2, 16, 32, 2, 4

    def forecast_flops(tokens):
        handle = attach(select_sites(model, adapter.site_patterns("module")), Reuse(), Mask(full_steps=[0]),
                        tokens=tokens)
        x, t, y = torch.randn(B, 1, 8, 8), torch.full((B,), 10), torch.tensor([1, 2])
        with torch.no_grad(), handle.generation(2):
            handle.step(0)
            model(x, t, y)
            handle.step(1)
            flops = count_flops(lambda: model(x, t, y))[1]
        handle.remove()
        return flops

    extra = forecast_flops(RandomTokens(k / N)) - forecast_flops(None)
    mlp = 2 * k * D * 4 * D * 2
    attn = 2 * k * D * D * 2 + 2 * N * D * 2 * D + 4 * k * N * D
    assert extra == B * L * (mlp + attn)
    assert forecast_flops(RandomTokens(0.0)) == forecast_flops(None)


# -- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("value, message", [
    ("foo", "strategy.tokens='foo' is not allowed; allowed: null, random, toca, duca, clusca, or a node with _target_"),
    ("3", "strategy.tokens=3 is not allowed; allowed: null, random, toca, duca, clusca, or a node with _target_"),
])
def test_bad_tokens_values_are_one_line(value, message):
    cfg = compose_config(["strategy=taylor", f"strategy.tokens={value}"])
    with pytest.raises(ConfigError) as err:
        check_strategy(cfg)
    assert str(err.value) == message


@pytest.mark.parametrize("keys, message", [
    (dict(fresh_ratio=2.0), "strategy.tokens: fresh_ratio must be a number in [0, 1], got 2.0"),
    (dict(score="cosine"), "strategy.tokens: score must be one of attention, value_norm, norm, random, got 'cosine'"),
    (dict(tokens="fast"), "strategy.tokens='fast' is not allowed"),
])
def test_bad_policy_keys_are_one_line(keys, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        preset("toca", **keys)
    assert "\n" not in str(err.value)


def test_sites_that_cannot_compute_a_subset_are_refused(adapter):
    with pytest.raises(ConfigError, match="cannot compute a subset of their tokens exactly") as err:
        preset("toca", granularity="block").attach(adapter)
    assert "\n" not in str(err.value) and "blocks.0" in str(err.value)
    mlp_only = [SitePattern(r"blocks\.\d+", "mlp_branch", label="mlp", tokens=TOKENWISE)]
    with pytest.raises(ConfigError, match="scores tokens by attention, which the module of blocks.0.mlp"):
        attach(select_sites(adapter.model, mlp_only), Reuse(), Interval(3), tokens=ToCa())
    attach(select_sites(adapter.model, mlp_only), Reuse(), Interval(3), tokens=ToCa(score="norm")).remove()


@pytest.mark.parametrize("name, predictor, schedule, policy", [
    ("toca", Reuse, ToCaInterval, ToCa), ("duca", Reuse, ToCaInterval, DuCa),
    ("clusca", TaylorSeer, Interval, ClusCa), ("taylor_toca", TaylorSeer, Interval, ToCa)])
def test_presets(name, predictor, schedule, policy):
    strategy = preset(name)
    assert (type(strategy.predictor), type(strategy.schedule), type(strategy.tokens)) == (predictor, schedule, policy)
    assert preset("taylor", tokens="random").tokens.fresh_ratio == 0.07
    assert preset("toca", score="norm", fresh_ratio=0.1).tokens.score == "norm"  # keys as cachelab.apply takes them
    if policy is ClusCa:  # its own Taylor order (its DiT code's max_order), not the top-level one
        assert strategy.predictor.order == 4 and preset(name, order=1).predictor.order == 4
    if policy is ToCa:
        toca = strategy.tokens
        assert (toca.fresh_ratio, toca.score, toca.soft_fresh_weight, toca.bonus_ratio, toca.grid) == (
            0.07, "attention", 0.25, 0.6, 2)


def test_presets_run_on_the_embedded_dit(adapter):
    inputs = adapter.make_inputs(2, seed=5)
    plain = adapter.generate(inputs)
    for name in ("toca", "duca", "clusca", "taylor_toca"):
        handle = preset(name, num_steps=10).attach(adapter)
        out = adapter.generate(inputs, handle)
        handle.remove()
        assert torch.isfinite(out).all() and 0 < (out - plain).norm() / plain.norm() < 0.2, name


# -- diffusers pipelines -----------------------------------------------------------------------
@pytest.fixture(scope="module", params=["tiny_pixart", "tiny_flux"])
def pipeline(request, tmp_path_factory):
    from tests.test_pipelines import tiny

    return tiny(request.param, tmp_path_factory.mktemp(request.param) / "pipe")


class All(Fixed):
    """Selects every token (in order) at the site kinds it names."""

    def select(self, view):
        return torch.arange(view.tokens.shape[1]).expand(view.tokens.shape[0], -1)


def test_pipelines_partial_steps_are_exact(pipeline):
    """PixArt: cross-attention (attn2) and feed-forward recompute tokens, self-attention (attn1) is
    forecast whole; FLUX: the double blocks' feed-forwards and the single blocks' fused projection
    (from the skipped attention and MLP inputs) recompute tokens, the joint attention is forecast
    whole. All tokens selected = those kinds computing at every step."""
    from cachelab.core.schedules import PerKindInterval

    partial, whole = (("attn2", "ff"), ("attn1",)) if "attn1" in kinds_of(pipeline) else (("ff", "ff_context", "proj_out"),
                                                                                        ("attn",))
    inputs = pipeline.make_inputs(2, seed=3)
    reference = generate(pipeline, inputs, Reuse(), None, PerKindInterval({kind: 3 for kind in whole}))
    every = PerKindInterval({kind: 3 for kind in whole + partial})
    assert torch.equal(generate(pipeline, inputs, Reuse(), All([], partial), every), reference)
    assert torch.equal(generate(pipeline, inputs, Reuse(), Fixed([], partial)), generate(pipeline, inputs, Reuse(), None))
    toca = ToCa(score="norm", bonus_ratio=0.0)
    assert torch.isfinite(generate(pipeline, inputs, Reuse(), toca)).all()
    with pytest.raises(ConfigError, match="cannot compute a subset of their tokens exactly"):
        generate(pipeline, inputs, Reuse(), RandomTokens())
    if "attn1" in kinds_of(pipeline):  # PixArt's attention gives no map; FLUX's does (attention_received)
        with pytest.raises(ConfigError, match="scores tokens by attention"):
            generate(pipeline, inputs, Reuse(), ToCa())
    else:
        assert torch.isfinite(generate(pipeline, inputs, Reuse(), ToCa(bonus_ratio=0.0))).all()


def test_flux_single_block_tokens_are_its_fused_projection_at_those_tokens(tmp_path):
    """FLUX's single block at the selected tokens (per sample, rotary at their own positions) from
    the skipped calls' arguments = the block's own proj_out output at those tokens."""
    from cachelab.core.tokens import gather_tokens
    from cachelab.models.pipelines.flux import single_block_tokens
    from tests.test_pipelines import tiny

    block = tiny("tiny_flux", tmp_path / "pipe").pipe.transformer.single_transformer_blocks[0]
    torch.manual_seed(0)
    B, N, D = 2, 12, block.proj_out.out_features
    hidden, text, temb = torch.randn(B, N - 4, D), torch.randn(B, 4, D), torch.randn(B, D)
    angles = torch.randn(N, block.attn.head_dim // 2).repeat_interleave(2, dim=1)
    rotary = (angles.cos(), angles.sin())
    seen = {}
    block.attn.register_forward_pre_hook(lambda m, args, kwargs: seen.update(attn=(args, kwargs)), with_kwargs=True)
    block.proj_out.register_forward_hook(lambda m, args, out: seen.update(out=out))
    with torch.no_grad():
        block(hidden, text, temb, image_rotary_emb=rotary)
        index = torch.tensor([[0, 3, 4, 11], [2, 5, 7, 9]])
        fresh = single_block_tokens(block, {"attn": seen["attn"]}, index)
    torch.testing.assert_close(fresh, gather_tokens(seen["out"], index), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("joint", [False, True], ids=["single", "joint"])
def test_flux_attention_received_against_a_hand_written_loop(joint):
    """ToCa's score from a FluxAttention call = softmax(q.k / sqrt(d)) of its RMS-normed projections
    (text first when joint), averaged over heads and summed over queries, in float64 loops; with
    zero keys every token receives exactly 1 (uniform rows)."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    from cachelab.models.pipelines.flux import attention_received

    torch.manual_seed(1)
    heads, d, width, T, N, B = 2, 4, 8, 2, 5, 2
    attn = FluxAttention(query_dim=width, heads=heads, dim_head=d, bias=True, out_dim=width, eps=1e-6,
                         added_kv_proj_dim=width if joint else None, context_pre_only=False if joint else None,
                         pre_only=not joint).double().requires_grad_(False)
    for norm in (attn.norm_q, attn.norm_k, *((attn.norm_added_q, attn.norm_added_k) if joint else ())):
        norm.weight.data.uniform_(0.5, 1.5)
    h, text = torch.randn(B, N, width, dtype=torch.float64), torch.randn(B, T, width, dtype=torch.float64)
    got = attention_received(attn, h, text if joint else None, chunk=2)

    def rms(x, weight):
        return x / math.sqrt(sum(float(v) ** 2 for v in x) / len(x) + 1e-6) * weight

    def rows(x, proj, norm, head):
        return [rms(proj(t)[head * d:(head + 1) * d], norm.weight) for t in x]

    want = torch.zeros(B, (T if joint else 0) + N, dtype=torch.float64)
    for b in range(B):
        for head in range(heads):
            q = (rows(text[b], attn.add_q_proj, attn.norm_added_q, head) if joint else []) + rows(h[b], attn.to_q, attn.norm_q, head)
            k = (rows(text[b], attn.add_k_proj, attn.norm_added_k, head) if joint else []) + rows(h[b], attn.to_k, attn.norm_k, head)
            for qi in q:
                logits = [float(qi @ kj) / math.sqrt(d) for kj in k]
                total = sum(math.exp(v) for v in logits)
                for j, v in enumerate(logits):
                    want[b, j] += math.exp(v) / total / heads
    if joint:
        assert set(got) == {"ff", "ff_context"}
        torch.testing.assert_close(got["ff_context"], want[:, :T])
        got = torch.cat([got["ff_context"], got["ff"]], dim=1)
    torch.testing.assert_close(got, want)
    for proj in (attn.to_k, *((attn.add_k_proj,) if joint else ())):
        proj.weight.data.zero_(), proj.bias.data.zero_()
    uniform = attention_received(attn, h, text if joint else None)
    uniform = torch.cat([uniform["ff_context"], uniform["ff"]], dim=1) if joint else uniform
    torch.testing.assert_close(uniform, torch.ones_like(uniform))


def kinds_of(adapter) -> set[str]:
    handle = Strategy("t", Reuse(), Interval(3), "module").attach(adapter)
    handle.remove()
    return {site.kind for site in handle.sites}


def test_cache_bytes_count_the_token_state(adapter):
    handle = Strategy("t", Reuse(), Interval(3, 2), "module", tokens=ToCa(score="attention")).attach(adapter)
    adapter.generate(adapter.make_inputs(2, seed=6), handle)
    stats = handle.stats()
    handle.remove()
    # 2 blocks x (attn, mlp) x D_0 (batch 2 x CFG 2, 16 tokens, width 32) fp32, int32 ages of the 2 MLP
    # sites (ToCa forecasts self-attention whole), the 2 blocks' attention received (4 x 16 fp32)
    assert stats.cache_bytes == 2 * 2 * (4 * 16 * 32) * 4 + 2 * (4 * 16) * 4 + 2 * (4 * 16) * 4


def test_apply_on_a_bare_dit_takes_its_family_token_sites():
    """cachelab's DiT through ``apply`` gets its family's sites (its attention recomputes selected
    queries and scores tokens: ToCa's attention score works); a model no family describes gets
    discovered sites, and ToCa on its MLPs of its own class is refused in one line."""
    import cachelab
    from cachelab.models.discovery import discover
    from tests.test_api import user_model

    adapter = tiny_adapter()
    model, x, y = adapter.model, torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    handle = cachelab.apply(model, "toca", interval=3)
    outs = []
    with torch.no_grad(), handle.generation(6):
        for s in range(6):
            handle.step(s)
            outs.append(model(x, torch.full((2,), 999 - 100 * s), y))
    kinds = {site.kind: site.tokens for site in handle.inner.sites}
    handle.remove()
    assert kinds == {"attn": "attn_tokens", "mlp": "tokenwise"} and all(torch.isfinite(o).all() for o in outs)
    found = discover(model, lambda: model(x, torch.full((2,), 999), y))  # discovery alone: timm's Mlp is token-wise
    assert {p.regex.split("\\.")[-1]: p.tokens for p in found.site_patterns("module")} == {"attn": None, "mlp": "tokenwise"}
    user = user_model()
    with pytest.raises(ConfigError, match=r"UserDiT: strategy\.tokens .* cannot compute a subset"):
        with cachelab.apply(user, "toca") as refused, refused.generation(2):
            refused.step(0)
            user(torch.randn(2, 6, 16), torch.full((2,), 999.0))