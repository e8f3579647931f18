"""Tiny random pipeline components built offline (no hub): text encoders, tokenizers, a VAE.

The tokenizers are real ``transformers`` classes with a minimal vocabulary (bytes for the
CLIP BPE tokenizer, letters for the T5 unigram one), so prompts go through the same code
path as with the real checkpoints.
"""
from __future__ import annotations

import string

from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers import LlamaConfig, LlamaModel, LlamaTokenizerFast, T5Config, T5EncoderModel, T5Tokenizer
from transformers import UMT5Config, UMT5EncoderModel

WIDTH = 32  # hidden size of every tiny text encoder


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = 256 - len(printable)
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(others)]


def clip_tokenizer(tmp_dir: str, max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single bytes (no merges); written to ``tmp_dir`` first."""
    import json
    from pathlib import Path

    symbols = _byte_symbols()
    vocab = {c: i for i, c in enumerate(symbols)}
    vocab.update({c + "</w>": len(symbols) + i for i, c in enumerate(symbols)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    folder = Path(tmp_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def clip_text_model(tokenizer: CLIPTokenizer, projection: bool = False, seed: int = 0):
    """A 2-layer CLIP text encoder matching ``tokenizer``'s vocabulary."""
    import torch

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, projection_dim=WIDTH, max_position_embeddings=77,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5_tokenizer() -> T5Tokenizer:
    """A T5 unigram tokenizer over lower-case letters, digits and the word boundary."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -0.5)]
    pieces += [(c, -1.0) for c in string.ascii_lowercase + string.digits]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def t5_encoder(tokenizer: T5Tokenizer, umt5: bool = False, seed: int = 0):
    """A 2-layer T5 (or UMT5, for Wan) encoder matching ``tokenizer``."""
    import torch

    kwargs = dict(vocab_size=len(tokenizer), d_model=WIDTH, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return (UMT5EncoderModel(UMT5Config(**kwargs)) if umt5 else T5EncoderModel(T5Config(**kwargs))).eval()


def llama_tokenizer() -> LlamaTokenizerFast:
    """A byte-fallback-free Llama tokenizer over letters (HunyuanVideo's text encoder)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    vocab.update({c: len(vocab) + i for i, c in enumerate(string.ascii_letters + string.digits + string.punctuation)})
    return LlamaTokenizerFast(vocab=vocab, merges=[], pad_token="</s>")


def llama_model(tokenizer: LlamaTokenizerFast, seed: int = 0) -> LlamaModel:
    """A 2-layer Llama decoder used as a text encoder."""
    import torch

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaModel(config).eval()


def autoencoder_kl(latent_channels: int = 4, shift_factor: float | None = None, scaling_factor: float = 0.18215):
    """A 2-level ``AutoencoderKL`` (8x smaller than SD's in each dimension: factor 2)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                         shift_factor=shift_factor, scaling_factor=scaling_factor)
