"""The share of each block's FLOPs that the cache sites hold (``handle.summary()``), against a
closed form; module granularity on discovered blocks whose expensive compute lies outside their
attention and feed-forward children (fused parallel blocks, bare linear MLPs) skips all of it on
forecast steps; one-block stacks are cached as they are."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

import cachelab
from cachelab.core.sites import SitePattern
from cachelab.errors import ConfigError
from cachelab.models.discovery import discover
from train_free_runs.coverage import zoo

B, N, D, T = 2, 6, 16, 6


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(1, 2) / D**0.5, dim=-1) @ v)


class ParallelBlock(nn.Module):
    """Attention and MLP side by side on one modulated input, merged by one projection (FLUX's single block)."""

    def __init__(self):
        super().__init__()
        self.norm, self.ada, self.attn = nn.LayerNorm(D), nn.Linear(D, D), SelfAttention()
        self.mlp_in, self.proj_out = nn.Linear(D, 2 * D), nn.Linear(3 * D, D)

    def forward(self, tokens, emb):
        h = self.norm(tokens) * (1 + self.ada(emb).unsqueeze(1))
        return tokens + self.proj_out(torch.cat([self.attn(h), F.gelu(self.mlp_in(h))], dim=-1))


class OpenBlock(nn.Module):
    """Attention as a module, its MLP as two bare linear layers of the block."""

    def __init__(self):
        super().__init__()
        self.norm, self.attn, self.fc1, self.fc2 = nn.LayerNorm(D), SelfAttention(), nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, tokens, emb):
        tokens = tokens + self.attn(self.norm(tokens))
        return tokens + self.fc2(F.gelu(self.fc1(self.norm(tokens) + emb.unsqueeze(1))))


class Net(nn.Module):
    def __init__(self, block: type, depth: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.out = nn.Linear(1, D), nn.Linear(D, D)
        self.layers = nn.ModuleList(block() for _ in range(depth))

    def forward(self, tokens, t):
        emb = self.embed(t.view(-1, 1) / 1000)
        for layer in self.layers:
            tokens = layer(tokens, emb)
        return self.out(tokens)


def inputs(s: int):
    return torch.randn(B, N, D, generator=torch.Generator().manual_seed(1)), torch.full((B,), 1000.0 - 100 * s)


def flops(call) -> int:
    with FlopCounterMode(display=False) as mode, torch.no_grad():
        call()
    return mode.get_total_flops()


def test_the_share_covered_is_the_closed_form_and_the_rest_is_named():
    """Only the attention of a parallel block as a site: the share is attention / block in FLOPs
    (2 per multiply-add of every matrix product), and the warning names what still runs."""
    model = Net(ParallelBlock).eval()
    attention = 2 * B * N * D * 3 * D + 2 * 2 * B * N * N * D + 2 * B * N * D * D
    block = attention + 2 * B * D * D + 2 * B * N * D * 2 * D + 2 * B * N * 3 * D * D
    with cachelab.apply(model, "taylor", sites={"module": [SitePattern(r"layers\.\d+\.attn")]}) as handle, \
            pytest.warns(UserWarning, match=r"still compute \d+% of the FLOPs of the blocks of layers"), \
            handle.generation(T), torch.no_grad():
        handle.step(0)
        model(*inputs(0))
        [coverage] = handle.coverage
        assert coverage.flops == 3 * block and coverage.covered == 3 * attention
        assert set(coverage.uncovered) == {"proj_out", "mlp_in", "ada"}
        assert "warning: forecast steps still compute" in handle.summary()


@pytest.mark.parametrize("block", [ParallelBlock, OpenBlock])
def test_module_granularity_skips_all_of_a_block_whose_compute_lies_outside_its_modules(block):
    model = Net(block).eval()
    x, t = inputs(0)
    found = discover(model, lambda: model(x, t))
    assert found.stacks[0].whole_blocks and found.module_sites == []
    trunk = copy.deepcopy(model)
    trunk.layers = nn.ModuleList()  # what a forecast step must still compute: the embedding and output layers
    with cachelab.apply(model, "taylor", interval=3, first_enhance=1, granularity="module") as handle, \
            handle.generation(T), torch.no_grad():
        for s in range(3):
            handle.step(s)
            counted = flops(lambda: model(*inputs(s)))
        assert handle.stats().forecast_steps == [1, 2]
        assert counted == flops(lambda: trunk(*inputs(2)))
        assert [c.share for c in handle.coverage] == [1.0]
        assert "cached whole at module granularity" in handle.summary()


@pytest.mark.parametrize("name", ["FluxTransformer2DModel", "HunyuanVideoTransformer3DModel"])
def test_discovered_single_stream_blocks_are_cached_whole_and_the_family_sites_cover_them(name):
    """Discovery alone caches the fused single-stream blocks whole; ``apply`` takes the family's
    official sites (the fused projection, its inputs skipped), which cover over 90 % of every stack."""
    spec = zoo.specimen(name)
    model = spec.build()
    found = discover(model, lambda: model(**spec.inputs(2, 500.0)))
    assert [s.whole_blocks for s in found.stacks] == [False, True]
    with cachelab.apply(model, "taylor") as handle, handle.generation(T), torch.no_grad():
        handle.step(0, 999.0)
        model(**spec.inputs(2, 999.0))
        assert {site.name.rpartition(".")[2] for site in handle.inner.sites} >= {"proj_out", "proj_mlp", "ff_context"}
        assert all(c.share > 0.9 and c.warning() is None for c in handle.coverage)


def test_one_block_stacks_are_cached_as_they_are():
    """HiDream with one double- and one single-stream block: no block hands an output to a next
    one, so the outputs are cached as they are; a span over them is refused in one line."""
    entry = next(e for e in zoo._TABLE if e.cls == "HiDreamImageTransformer2DModel")
    entry = zoo._Entry(entry.cls, dict(entry.config, num_layers=1, num_single_layers=1, llama_layers=(0, 1)), entry.make)
    model = zoo._build(entry)

    def run(handle=None):
        outputs = []
        with torch.no_grad(), (handle.generation(T) if handle else torch.no_grad()):
            for s, t in enumerate(torch.linspace(999, 1, T)):
                if handle:
                    handle.step(s, float(t))
                outputs.append(model(**zoo._inputs(entry, 2, float(t)))[0])
        return torch.stack(outputs)

    bare = run()
    for granularity in ("block", "module"):
        with cachelab.apply(model, "taylor", schedule="always", granularity=granularity) as handle:
            assert torch.equal(run(handle), bare)
        with cachelab.apply(model, "taylor", interval=3, first_enhance=1, granularity=granularity) as handle:
            cached = run(handle)
            assert handle.stats().forecast_steps == [1, 2, 4, 5]
            assert "(cached as is)" in handle.summary()
        assert torch.isfinite(cached).all() and not torch.equal(cached, bare)
    assert torch.equal(run(), bare)
    handle = cachelab.apply(model, "taylor", granularity="stack")
    with pytest.raises(ConfigError, match="none can be one span") as err:
        run(handle)
    assert "\n" not in str(err.value)
    handle.remove()
