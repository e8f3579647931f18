"""The adapter for diffusers pipelines: load (hub id or local folder, or a tiny random
pipeline built and saved locally), generate through the real pipeline call, driven by
:class:`PipelineDriver`. The transformer's sites are discovered from its first forward in a
one-step pipeline call (:mod:`cachelab.models.discovery`); a family subclass says which
pipeline class, how to build its tiny components, and any sites it chooses itself (the papers'
module sites). A pipeline with a second expert (Wan 2.2's ``transformer_2``) offers both as
``experts``: a strategy attached to the adapter caches each with its own state
(:class:`~cachelab.core.experts.ExpertHandles`)."""
from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from cachelab.core.controller import CacheHandle
from cachelab.models.adapter import DTYPES, ModelAdapter
from cachelab.models.discovery import DiscoveredSites, FirstForward, discover
from cachelab.models.families import FamilySites, family_sites
from cachelab.models.loading import load_pretrained
from cachelab.models.pipelines.driver import PipelineDriver, experts
from cachelab.models.samplers import Callback
from cachelab.core.sites import SitePattern


@dataclass
class PromptInputs:
    """One generation's conditioning and seed (the pipeline draws the noise from the seed)."""

    prompts: list
    seed: int


class PipelineAdapter(ModelAdapter):
    """A diffusers pipeline, any one (``model=diffusers``) or a family's. ``path`` is a hub id
    or a local folder (both through ``from_pretrained``); ``pipeline`` the pipeline class
    (default: the family's, else ``DiffusionPipeline``, which reads it from the folder's
    ``model_index.json``). With ``tiny=True`` a missing ``path`` folder is first filled with
    tiny random components (``save_pretrained``) from the family's ``tiny_components`` or from
    ``components``, the dotted name of a function ``(scratch folder) -> components``; for tests
    and CPU runs. ``prompts`` are cycled over the images (in a chunked run, over all of them:
    chunk after chunk); ``call_kwargs`` go to the pipeline call."""

    pipeline_class: ClassVar[str] = "DiffusionPipeline"  # the diffusers pipeline class name
    # granularity -> site patterns where a family chooses its own (the papers' module sites);
    # the other granularities and the probes are discovered (cachelab.models.discovery)
    sites: ClassVar[dict[str, list[SitePattern]]] = {}
    prompt_key: ClassVar[str] = "prompt"      # the pipeline argument that takes the prompts

    def __init__(self, name: str, path: str, description: str = "", tiny: bool = False,
                 prompts: list | tuple = ("a photo of a cat",), negative_prompt: str | None = None,
                 num_steps: int = 50, guidance_scale: float = 5.0, call_kwargs: dict | None = None,
                 dtype: str = "fp32", device: str = "cpu", pipeline: str | None = None, components: str | None = None):
        self.name, self.path, self.tiny = name, os.path.expanduser(path), tiny
        self.description = description or self.path  # what runs report as the model's weights
        if pipeline is not None:
            self.pipeline_class = pipeline
        if components is not None:
            module, _, function = components.rpartition(".")
            self.tiny_components = getattr(importlib.import_module(module), function)
        self.prompts, self.negative_prompt = list(prompts), negative_prompt
        self.num_steps, self.guidance_scale = num_steps, guidance_scale
        # plain containers: pipelines type-check nested arguments (HunyuanVideo's prompt_template)
        self.call_kwargs = plain(dict(call_kwargs or {}))
        self.dtype, self.device = DTYPES[dtype], torch.device(device)

    # -- what a family defines -------------------------------------------------------
    @classmethod
    def tiny_components(cls, tmp_dir: Path) -> dict:
        """Tiny random components of the family's pipeline (``tmp_dir``: scratch space)."""
        raise NotImplementedError(f"{cls.__name__} has no tiny components")

    def call_arguments(self, inputs: PromptInputs) -> dict:
        """The pipeline call's arguments for ``inputs`` (without generator/steps/output)."""
        arguments = {self.prompt_key: inputs.prompts, "guidance_scale": self.guidance_scale, **self.call_kwargs}
        if self.negative_prompt is not None:
            arguments["negative_prompt"] = [self.negative_prompt] * len(inputs.prompts)
        return arguments

    # -- the adapter interface ----------------------------------------------------------
    @cached_property
    def pipe(self):
        """The pipeline, loaded on first use, on ``device`` in ``dtype``."""
        import diffusers
        import transformers

        for library in (diffusers, transformers):  # loading bars and notices would bury the run's output
            library.utils.logging.set_verbosity_error()
            library.utils.logging.disable_progress_bar()
        pipe = load_pretrained(getattr(diffusers, self.pipeline_class), self.source(), "model.path",
                               dtype=self.dtype)
        return pipe.to(self.device)

    def source(self) -> str:
        """What ``from_pretrained`` loads: ``path`` (with ``tiny``, first filled if missing)."""
        if self.tiny and not (Path(self.path) / "model_index.json").is_file():
            self.save_tiny(self.path)
        return self.path

    def save_tiny(self, folder: str | Path, seed: int = 0) -> Path:
        """Build the tiny random pipeline and ``save_pretrained`` it to ``folder`` (atomically)."""
        import diffusers

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                pipe = getattr(diffusers, self.pipeline_class)(**self.tiny_components(Path(tmp) / "scratch"))
            pipe.save_pretrained(Path(tmp) / "pipe")
            if not folder.exists():
                (Path(tmp) / "pipe").rename(folder)
        return folder

    def build(self) -> nn.Module:
        return self.pipe.transformer

    @cached_property
    def first_forward(self) -> FirstForward:
        """The transformer's first forward in a one-image, one-step generation, traced: its sites
        and its ``(args, kwargs)``. The call returns latents (no VAE decode) and runs to its end."""
        inputs = self.make_inputs(1, seed=0)
        return FirstForward(self.model).trace(lambda: self.call_pipeline(inputs, 1, "latent"))

    @property
    def discovered(self) -> DiscoveredSites:
        """The transformer's sites, read from its first forward (:attr:`first_forward`)."""
        return self.first_forward.sites

    @cached_property
    def experts(self) -> dict[str, FamilySites] | None:
        """Name -> sites of each expert where the pipeline has several (Wan 2.2: ``transformer``,
        ``transformer_2``), else None. The second expert's sites are read from one call with the
        first one's discovery inputs (no generation runs to its first step)."""
        models = experts(self.pipe)
        if len(models) < 2:
            return None
        first = self.discovered
        args, kwargs = self.first_forward.inputs  # the first expert's traced call
        found = {}
        for name, model in models.items():
            model.eval().requires_grad_(False)
            found[name] = first if model is self.model else discover(model, lambda m=model: m(*args, **kwargs))
        return {name: FamilySites(models[name], self.own_sites, sites) for name, sites in found.items()}

    @property
    def own_sites(self) -> dict[str, list[SitePattern]]:
        """The site patterns the family chooses itself: the adapter's, else those of the
        transformer's family (``model=diffusers`` on a FLUX folder caches FLUX's sites)."""
        return self.sites or family_sites(self.model)

    def site_patterns(self, granularity: str) -> list[SitePattern]:
        return FamilySites(self.model, self.own_sites, self.discovered).site_patterns(granularity)

    def make_inputs(self, num_images: int, seed: int, start: int = 0) -> PromptInputs:
        return PromptInputs([self.prompts[i % len(self.prompts)] for i in range(start, start + num_images)], seed)

    def generate(self, inputs: PromptInputs, handle: CacheHandle | None = None,
                 callback: Callback | None = None, progress: str | None = None) -> torch.Tensor:
        with PipelineDriver(self.pipe, handle, callback):
            return self.call_pipeline(inputs, self.num_steps, "pt", progress).float()

    @torch.no_grad()
    def call_pipeline(self, inputs: PromptInputs, num_steps: int, output_type: str, progress: str | None = None):
        """One pipeline call on ``inputs`` of ``num_steps`` steps; its first output (``output_type``:
        ``"pt"`` images, ``"latent"`` the latents, not decoded)."""
        self.model  # noqa: B018 -- eval mode, no gradients
        self.pipe.set_progress_bar_config(desc=progress, disable=progress is None)
        generator = torch.Generator(self.device).manual_seed(inputs.seed)
        return self.pipe(**self.call_arguments(inputs), generator=generator, num_inference_steps=num_steps,
                         output_type=output_type, return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline already decoded: images (B, C, H, W), or video frames (B, F, C, H, W)
        laid out as images."""
        return latents.flatten(0, 1) if latents.dim() == 5 else latents


def plain(value):
    """Nested mappings and sequences (Hydra's DictConfig and ListConfig among them) as plain
    dicts and lists; strings and other values as they are."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(item) for item in value]
    return value
