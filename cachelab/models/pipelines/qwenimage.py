"""Tiny random components of Qwen-Image (``QwenImagePipeline``), built offline.

The text encoder is a 2-layer ``Qwen2_5_VLForConditionalGeneration`` (with a 2-layer vision
tower, part of the model though unused for text-to-image) and the tokenizer a real
``Qwen2Tokenizer``. Its vocabulary is byte-level BPE over the 256 bytes, the special tokens,
and whole-word merges for the words of the pipeline's prompt template: the template's system
prefix then takes exactly ``prompt_template_encode_start_idx`` (34) tokens, as with the real
tokenizer, so the pipeline drops precisely it and the transformer sees only the prompt (one
token per byte, except template words) and the template's 5-token tail.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from cachelab.models.pipelines import tiny

# QwenImagePipeline.prompt_template_encode (set in its __init__, so not importable)
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
# chat and vision special tokens of Qwen2.5-VL (the vision ones only give the config valid ids)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                  "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _template_merges() -> list[tuple[str, str]]:
    """Left-to-right BPE merges that make each word of ``PROMPT_TEMPLATE`` a single token."""
    from tokenizers.pre_tokenizers import ByteLevel

    pieces = re.split("|".join(map(re.escape, ["{}", *SPECIAL_TOKENS])), PROMPT_TEMPLATE)
    words = [w for piece in pieces for w, _ in ByteLevel(add_prefix_space=False).pre_tokenize_str(piece)]
    merges: list[tuple[str, str]] = []
    for word in words:
        merges += [(word[:i], word[i]) for i in range(1, len(word)) if (word[:i], word[i]) not in merges]
    return merges


def qwen_tokenizer(tmp_dir: Path):
    """A byte-level ``Qwen2Tokenizer`` (bytes, template words, special tokens); written to ``tmp_dir`` first."""
    from transformers import Qwen2Tokenizer

    merges = _template_merges()
    tokens = tiny._byte_symbols() + [a + b for a, b in merges] + SPECIAL_TOKENS
    folder = Path(tmp_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *(f"{a} {b}" for a, b in merges)]) + "\n")
    return Qwen2Tokenizer.from_pretrained(str(folder), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                          extra_special_tokens=SPECIAL_TOKENS[1:])


def qwen_vl_model(tokenizer, seed: int = 0):
    """A 2-layer Qwen2.5-VL (text width ``tiny.WIDTH``, 2-layer vision tower) matching ``tokenizer``."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=tiny.WIDTH, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters=dict(rope_type="default", mrope_section=[1, 1, 2]),  # sums to head_dim / 2
                         bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, patch_size=2,
                           window_size=8, fullatt_block_indexes=[1], out_hidden_size=tiny.WIDTH),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_components(tmp_dir: Path) -> dict:
    """Tiny random components of QwenImagePipeline: transformer, vae, scheduler, text_encoder, tokenizer.

    The VAE downsamples 4x (Qwen-Image: 8x) into 4 latent channels (Qwen-Image: 16), packed 2x2 into the
    transformer's 16 input channels, so a 32x32 image is 16 image tokens.
    """
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    z_dim = 4
    tokenizer = qwen_tokenizer(Path(tmp_dir) / "qwen_tokenizer")
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=tiny.WIDTH, axes_dims_rope=(4, 6, 6))
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * z_dim,
                                 latents_std=[1.0] * z_dim)
    # Qwen/Qwen-Image's scheduler config: resolution-dependent exponential shift
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, time_shift_type="exponential",
        base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02)
    return dict(transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler,
                text_encoder=qwen_vl_model(tokenizer), tokenizer=tokenizer)
