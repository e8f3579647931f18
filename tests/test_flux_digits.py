"""The shipped FLUX pipeline trained on digits: hash-checked ``from_pretrained`` loading, a
manifest that says how it was made, short generations the judge recognises, and the cached
path that is exact when every step computes."""
from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import FluxPipeline

from cachelab.assets import ASSETS_DIR, read_manifest
from cachelab.core.schedules import Always, Interval
from cachelab.core.strategy import Strategy
from cachelab.errors import AssetCorrupt
from cachelab.evaluation.judge import DigitJudge
from cachelab.models.pipelines import flux_digits
from cachelab.models.pipelines.flux_digits import FluxDigitsAdapter
from cachelab.strategies.taylor import TaylorSeer

STEPS = 10


@pytest.fixture(scope="module")
def adapter() -> FluxDigitsAdapter:
    return FluxDigitsAdapter(name="tiny_flux_digits", judge=DigitJudge(), num_steps=STEPS, guidance_scale=3.5)


def test_manifest_records_how_the_model_was_made_and_every_file():
    manifest = read_manifest(flux_digits.ASSET)
    assert {"files", "command", "data", "training_seconds", "machine", "quality", "vae_reconstruction_psnr_db"} \
        <= manifest.keys()
    assert manifest["quality"]["num_samples"] >= 500 and manifest["quality"]["class_accuracy"] >= 0.9
    folder = ASSETS_DIR / manifest["folder"]
    shipped = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert shipped == set(manifest["files"])  # every file is hashed, nothing unlisted
    assert all(not name.endswith((".bin", ".pt")) for name in shipped)  # safetensors only
    assert sum((folder / name).stat().st_size for name in shipped) <= 20e6


def test_the_folder_is_a_flux_checkpoint_for_from_pretrained():
    pipe = FluxPipeline.from_pretrained(flux_digits.verified_folder())
    transformer = pipe.transformer
    assert type(transformer).__name__ == "FluxTransformer2DModel" and transformer.config.guidance_embeds
    assert len(transformer.transformer_blocks) >= 1 and len(transformer.single_transformer_blocks) >= 1
    assert type(pipe.vae).__name__ == "AutoencoderKL" and type(pipe.scheduler).__name__ == \
        "FlowMatchEulerDiscreteScheduler"


def test_a_changed_file_is_refused_naming_it(tmp_path, monkeypatch):
    manifest = read_manifest(flux_digits.ASSET)
    copy = tmp_path / manifest["folder"]
    shutil.copytree(ASSETS_DIR / manifest["folder"], copy)
    (tmp_path / f"{flux_digits.ASSET}.json").write_text((ASSETS_DIR / f"{flux_digits.ASSET}.json").read_text())
    victim = next(name for name in manifest["files"] if name.endswith(".safetensors"))
    with open(copy / victim, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    monkeypatch.setattr(flux_digits, "ASSETS_DIR", tmp_path)
    monkeypatch.setattr("cachelab.assets.ASSETS_DIR", tmp_path)
    with pytest.raises(AssetCorrupt, match=victim.replace("/", ".")):
        flux_digits.verified_folder()


def test_prompts_ask_for_balanced_classes(adapter):
    inputs = adapter.make_inputs(40, seed=0)
    labels = adapter.labels(inputs)
    assert torch.equal(labels, torch.arange(40) % 10)
    assert len(set(inputs.prompts)) == 40  # four phrasings of each class
    assert all(flux_digits.WORDS[label] in prompt or str(label) in prompt
               for prompt, label in zip(inputs.prompts, labels.tolist()))


def test_short_generation_is_recognised_well_above_chance(adapter):
    inputs = adapter.make_inputs(20, seed=0)
    plain_images = adapter.generate(inputs)
    plain = adapter.evaluate(plain_images, inputs)["class_accuracy"]
    assert plain >= 0.7  # chance is 0.1
    handle = Strategy("taylor", TaylorSeer(2, 2), Interval(3, 2), "module").attach(adapter)
    try:
        cached_images = adapter.generate(inputs, handle)
        full_steps = handle.stats().full_steps
    finally:
        handle.remove()
    assert len(full_steps) < STEPS and not torch.equal(cached_images, plain_images)  # the cache forecast
    assert adapter.evaluate(cached_images, inputs)["class_accuracy"] >= 0.6


def test_all_full_steps_are_bit_identical_to_the_bare_pipeline(adapter):
    inputs = adapter.make_inputs(4, seed=1)
    bare = adapter.pipe(**adapter.call_arguments(inputs), generator=torch.Generator().manual_seed(1),
                        num_inference_steps=STEPS, output_type="pt", return_dict=False)[0].float()
    for granularity in ("module", "block", "output"):
        handle = Strategy("taylor", TaylorSeer(2, 2), Always(), granularity).attach(adapter)
        try:
            assert torch.equal(adapter.generate(inputs, handle), bare), granularity
        finally:
            handle.remove()
    assert torch.equal(adapter.generate(inputs), bare)  # removal restores
