"""diffusers' private names behind one module: each one present in the installed release, the one
fallback (an optional name reads as None), and any other missing name is one error naming it."""
from __future__ import annotations

import pytest
import torch

from cachelab.models import diffusers_private


def test_a_missing_private_name_is_one_line_naming_it_and_the_release_checked():
    with pytest.raises(RuntimeError, match=r"has no Linear\._renamed, a private name cachelab uses \(checked against "
                                           rf"diffusers {diffusers_private.CHECKED}\)") as err:
        diffusers_private.private(torch.nn.Linear(2, 2), "_renamed")
    assert "\n" not in str(err.value)
    assert diffusers_private.private(torch.nn.Linear(2, 2), "_renamed", optional=True) is None


def test_block_metadata_where_diffusers_has_it_and_none_elsewhere():
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    metadata = diffusers_private.block_metadata(FluxTransformerBlock)
    assert (metadata.return_hidden_states_index, metadata.return_encoder_hidden_states_index) == (1, 0)
    assert diffusers_private.block_metadata(torch.nn.Linear) is None


def test_a_module_that_is_not_diffusers_has_no_context_parallel_plan():
    model = torch.nn.Linear(2, 2)
    assert diffusers_private.context_parallel_plan(model) is None
    assert diffusers_private.context_parallel_config(model) is None


def test_flux_latents_pack_into_tokens_with_their_positions():
    """2x2 patches of the latents, row-major, as tokens; each token's (0, row, column) id."""
    from diffusers import FluxPipeline

    latents = torch.arange(2 * 4 * 4 * 6, dtype=torch.float32).reshape(2, 4, 4, 6)
    tokens = diffusers_private.pack_latents(FluxPipeline, latents, 2, 4, 4, 6)
    patch = latents[:, :, 2:4, 4:6]  # row 1, column 2 of a 2 x 3 grid of patches: token 5
    assert torch.equal(tokens[:, 5], patch.reshape(2, 16))  # features: channel, then the patch's row and column
    ids = diffusers_private.latent_image_ids(FluxPipeline, 2, 2, 3, "cpu", torch.float32)
    assert ids[5].tolist() == [0.0, 1.0, 2.0]
