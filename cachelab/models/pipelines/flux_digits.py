"""``tiny_flux_digits``: a FLUX pipeline the project trained on real digits, shipped in the package.

A ``FluxPipeline`` folder (``cachelab/assets/tiny_flux_digits/``, safetensors): the transformer
(``FluxTransformer2DModel``, double and single stream blocks, guidance embedding) trained with
rectified flow and then guidance-distilled, the ``AutoencoderKL`` trained on the same digits,
tiny frozen random text encoders, ``FlowMatchEulerDiscreteScheduler``. It loads through
``FluxPipeline.from_pretrained`` like any FLUX checkpoint, after every file's sha256 is checked
against the manifest ``tiny_flux_digits.json`` (training commands, data, wall time, quality).
Prompts name a digit ("a handwritten digit seven", four phrasings per class); the digit judge
scores every run. The builders here are shared by the trainer (``cachelab.jobs.train_flux_digits``).
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

from cachelab.assets import ASSETS_DIR, check_digest, read_manifest, sha256
from cachelab.models.pipelines import tiny
from cachelab.models.pipelines.base import PromptInputs
from cachelab.models.pipelines.flux import FluxAdapter

ASSET = "tiny_flux_digits"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PHRASINGS = ["a handwritten digit {word}", "the number {digit}", "a drawing of a {word}", "digit {word}"]
MAX_SEQUENCE_LENGTH = 8  # T5 tokens per prompt: the longest phrasing is 5 words and </s>
IMAGE_SIZE = 32
CALL_KWARGS = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "max_sequence_length": MAX_SEQUENCE_LENGTH}


def digit_prompts() -> list[tuple[str, int]]:
    """Every (prompt, class), phrasing-major: the i-th prompt asks for class ``i % 10``."""
    return [(phrasing.format(word=WORDS[d], digit=d), d) for phrasing in PHRASINGS for d in range(10)]


def word_tokenizer():
    """The tiny T5 unigram tokenizer with the prompts' words as whole pieces (a prompt is a few
    tokens); letters and digits remain for any other text."""
    words = {w for prompt, _ in digit_prompts() for w in prompt.split()}
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -0.5)]
    pieces += [(c, -1.0) for c in string.ascii_lowercase + string.digits]
    pieces += [("▁" + w, 0.0) for w in sorted(words) if not w.isdigit()]
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=pieces, extra_ids=0)


def untrained_vae():
    """A 2-level ``AutoencoderKL`` on one-channel 32x32 digits: 4 x 16 x 16 latents (FLUX packs
    them into 8 x 8 = 64 tokens of 16 channels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, latent_channels=4, norm_num_groups=8)


def untrained_transformer():
    """FLUX's transformer at 1/30 of FLUX.1's width: 2 double-stream and 2 single-stream
    blocks, 3 heads of 32, rotary axes (8, 12, 12), guidance embedding (1.0M parameters)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=32, num_attention_heads=3, joint_attention_dim=tiny.WIDTH,
                                  pooled_projection_dim=tiny.WIDTH, guidance_embeds=True, axes_dims_rope=(8, 12, 12))


def untrained_components(scratch: Path) -> dict:
    """Every ``FluxPipeline`` component; text encoders random and frozen (seeded), the VAE and
    transformer before training."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer, tokenizer_2 = tiny.clip_tokenizer(scratch / "clip"), word_tokenizer()
    return dict(transformer=untrained_transformer(), vae=untrained_vae(), scheduler=FlowMatchEulerDiscreteScheduler(),
                text_encoder=tiny.clip_text_model(tokenizer), tokenizer=tokenizer,
                text_encoder_2=tiny.t5_encoder(tokenizer_2), tokenizer_2=tokenizer_2)


def folder_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder``, by relative path."""
    return {str(p.relative_to(folder)): sha256(p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def verified_folder(name: str = ASSET) -> Path:
    """The shipped pipeline folder ``name`` after checking each file against its manifest."""
    manifest = read_manifest(name)
    folder = ASSETS_DIR / manifest["folder"]
    found = folder_digests(folder) if folder.is_dir() else {}
    for path, digest in manifest["files"].items():
        check_digest(folder / path, found.get(path), digest, name)
    return folder


class FluxDigitsAdapter(FluxAdapter):
    """The shipped trained FLUX pipeline on digits: ``FluxPipeline.from_pretrained`` of the
    verified asset folder; image ``i`` asks for digit ``i % 10`` (prompts cycled phrasing by
    phrasing), and the ``judge`` scores the decoded digits against the asked classes."""

    def __init__(self, name: str, weights: str = ASSET, judge=None, **kwargs):
        self.weights, self.judge = weights, judge
        prompts = [prompt for prompt, _ in digit_prompts()]
        kwargs.setdefault("call_kwargs", CALL_KWARGS)
        super().__init__(name=name, path=str(ASSETS_DIR / weights), prompts=prompts, **kwargs)

    def source(self) -> str:
        return str(verified_folder(self.weights))

    def labels(self, inputs: PromptInputs) -> torch.Tensor:
        """The asked class of each image of ``inputs``."""
        classes = dict(digit_prompts())
        return torch.tensor([classes[prompt] for prompt in inputs.prompts])

    def evaluate(self, images: torch.Tensor, inputs: PromptInputs) -> dict:
        return self.judge.evaluate(images, self.labels(inputs)) if self.judge is not None else {}
