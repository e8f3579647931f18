"""DiT (Peebles & Xie, 2023) in the original architecture and checkpoint layout.

Built on timm's PatchEmbed, Attention and Mlp as the reference code is, so the original
``DiT-XL-2-256x256.pt`` state dict loads key for key. The only change from the reference
is that each block's two residual branches are methods (``attn_branch``, ``mlp_branch``):
they return the pre-gate attention / MLP outputs, which cachelab's module granularity
caches (skipping the norm and modulation too); the attention branch's modulated input is a
method too (``modulated_input``: TeaCache's signal), and so are the attention at a subset of
query tokens, the attention each token receives and its value vector's norm (``attn_tokens``,
``attention_received``, ``value_norms``: token selection). Parameters and numerics are unchanged.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed
from torch import nn

from cachelab.core.tokens import gather_tokens
from cachelab.errors import CheckpointMismatch


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal frequencies, then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; index ``num_classes`` is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(
            in_features=hidden_size,
            hidden_features=int(hidden_size * mlp_ratio),
            act_layer=lambda: nn.GELU(approximate="tanh"),
            drop=0,
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def modulated_input(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The attention branch's adaLN-modulated input (TeaCache's signal). (B, N, D) -> (B, N, D)."""
        return modulate(self.norm1(x), shift, scale)

    def attn_branch(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Attention output after its projection, before the gate. (B, N, D) -> (B, N, D)."""
        return self.attn(self.modulated_input(x, shift, scale))

    def attn_tokens(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, index: torch.Tensor
                    ) -> torch.Tensor:
        """``attn_branch`` at the query tokens ``index`` (B, k) only, against every key and value
        (token selection): the same values, with the query projection, the attention and the
        output projection run on the k tokens. (B, N, D) -> (B, k, D)."""
        attn = self.attn
        h = self.modulated_input(x, shift, scale)
        B, N, _ = h.shape
        width = attn.num_heads * attn.head_dim
        weight, bias = attn.qkv.weight, attn.qkv.bias
        q = F.linear(gather_tokens(h, index), weight[:width], None if bias is None else bias[:width])
        kv = F.linear(h, weight[width:], None if bias is None else bias[width:])
        kv = kv.reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q = attn.q_norm(q.reshape(B, -1, attn.num_heads, attn.head_dim).transpose(1, 2))
        out = attend(attn, q, attn.k_norm(kv[0]), kv[1]).transpose(1, 2).reshape(B, -1, width)
        return attn.proj(attn.norm(out))

    def attention_received(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """How much attention each token receives: the softmax attention map of ``attn_branch``'s
        input, averaged over heads and summed over queries (ToCa's self-attention score before
        its normalisation; an extra computation of the map, done only when asked). (B, N)."""
        attn = self.attn
        h = self.modulated_input(x, shift, scale)
        B, N, _ = h.shape
        qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        weights = (q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)
        return weights.mean(dim=1).sum(dim=1)

    def value_norms(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The L2 norm of every token's value vector (all heads) in ``attn_branch`` (DuCa's V-caching
        score; the value projection run again, only when asked). (B, N)."""
        attn, width = self.attn, self.attn.num_heads * self.attn.head_dim
        weight, bias = attn.qkv.weight[2 * width:], None if attn.qkv.bias is None else attn.qkv.bias[2 * width:]
        return F.linear(self.modulated_input(x, shift, scale), weight, bias).norm(dim=-1)

    def mlp_branch(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """MLP output, before the gate. (B, N, D) -> (B, N, D)."""
        return self.mlp(modulate(self.norm2(x), shift, scale))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn_branch(x, shift_msa, scale_msa)
        x = x + gate_mlp.unsqueeze(1) * self.mlp_branch(x, shift_mlp, scale_mlp)
        return x


def attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """timm ``Attention``'s own attention of (B, heads, n, head_dim) queries against keys and values,
    by the same path its ``forward`` takes (fused or explicit softmax)."""
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v)
    return (q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1) @ v


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map back to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone (the DiT paper's ``DiT`` class)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.input_size = input_size

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding, stored in the checkpoint as in the reference code.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def describe(self) -> str:
        """The architecture in the paper's terms: depth, width, patch, input, classes."""
        return (f"depth {len(self.blocks)}, width {self.pos_embed.shape[-1]}, patch {self.patch_size}, "
                f"input {self.input_size}x{self.input_size}x{self.in_channels}, {self.num_classes} classes")

    def initialize_weights(self) -> None:
        """The reference initialisation: adaLN-Zero (gates and final layer start at zero)."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        grid = int(self.x_embedder.num_patches**0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        c, p = self.out_channels, self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) latents, t: (B,) timesteps, y: (B,) labels -> (B, out_C, H, W)."""
        x = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (B, D)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, guided_channels: int | None = None
    ) -> torch.Tensor:
        """Classifier-free guidance batched into one forward: the batch is [cond; uncond].

        ``guided_channels`` (default: all) reproduces the reference code, which guides only
        the first 3 of 4 latent channels "for exact reproducibility" of the paper's FIDs.
        """
        return guided_forward(self.forward, x, t, y, cfg_scale, self.in_channels, guided_channels)


def guided_forward(forward, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, in_channels: int,
                   guided_channels: int | None = None) -> torch.Tensor:
    """The reference ``forward_with_cfg`` around ``forward(x, t, y)``: the batch is [cond; uncond],
    the first half is run twice, the first ``guided_channels`` (default ``in_channels``) are guided."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = forward(combined, t, y)
    guided = guided_channels or in_channels
    eps, rest = model_out[:, :guided], model_out[:, guided:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) fixed 2-D sine-cosine position embedding (MAE/DiT)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# The paper's presets: name -> (depth, hidden_size, patch_size, num_heads).
PRESETS = {
    "DiT-XL/2": (28, 1152, 2, 16), "DiT-XL/4": (28, 1152, 4, 16), "DiT-XL/8": (28, 1152, 8, 16),
    "DiT-L/2": (24, 1024, 2, 16), "DiT-L/4": (24, 1024, 4, 16), "DiT-L/8": (24, 1024, 8, 16),
    "DiT-B/2": (12, 768, 2, 12), "DiT-B/4": (12, 768, 4, 12), "DiT-B/8": (12, 768, 8, 12),
    "DiT-S/2": (12, 384, 2, 6), "DiT-S/4": (12, 384, 4, 6), "DiT-S/8": (12, 384, 8, 6),
}


def dit_from_preset(preset: str, **kwargs) -> DiT:
    """``dit_from_preset("DiT-XL/2", input_size=32)`` builds the paper's architecture."""
    if preset not in PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; allowed: {', '.join(PRESETS)}")
    depth, hidden_size, patch_size, num_heads = PRESETS[preset]
    return DiT(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads, **kwargs)


def load_checkpoint(model: DiT, path: str | Path) -> None:
    """Load an original DiT checkpoint (a plain state dict, or a training one with ``ema``).
    A file that is not a checkpoint, or one of another architecture, is a one-line
    :class:`~cachelab.errors.CheckpointMismatch` naming the file, what was expected and found."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DiT checkpoint not found: {path}")
    expected = f"a state dict of {sum(p.numel() for p in model.parameters()):,} parameters ({model.describe()})"
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: pickle, zip, truncation errors alike
        raise CheckpointMismatch(f"model.checkpoint={str(path)!r} is not a readable torch checkpoint "
                                 f"({type(err).__name__}); expected {expected}") from err
    if isinstance(state_dict, dict) and "ema" in state_dict:
        state_dict = state_dict["ema"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointMismatch(f"model.checkpoint={str(path)!r} holds a {type(state_dict).__name__}, not a state "
                                 f"dict; expected {expected}")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    wrong = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        found = sum(v.numel() for v in state_dict.values())
        detail = (f"shape of {wrong[0]}: {tuple(state_dict[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}" if wrong
                  else f"{len(missing)} keys missing (e.g. {missing[0]})" if missing
                  else f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise CheckpointMismatch(f"model.checkpoint={str(path)!r} does not fit: expected {expected}, found "
                                 f"{found:,} parameters ({detail}); allowed: a checkpoint of this preset")
    model.load_state_dict(state_dict, strict=True)
