"""Other tools' caching on a model's diffusers transformer or pipeline: diffusers' own hooks
(``transformer.enable_cache``) and, when installed, cache-dit (``pip install -e ".[peers]"``);
MagCache's calibration by diffusers' own mode; what diffusers' SeaCache needs from a pipeline
(the step's coordinates in ``cache_context``, the input latent); and the grid-coverage check that
a benchmark grid names every parameter a peer's config class documents."""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import inspect
import io
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch

from cachelab.core.variables import StepGrid
from cachelab.errors import ConfigError
from cachelab.io import write_json_atomic

_MISSING = object()


@contextlib.contextmanager
def diffusers_hook(model: torch.nn.Module, config) -> Iterator[None]:
    """diffusers' caching hook ``config`` (``TaylorSeerCacheConfig``, ...) on ``model`` inside the block."""
    model.enable_cache(config)
    try:
        yield
    finally:
        model.disable_cache()


def diffusers_mag_ratios(adapter, inputs, model: torch.nn.Module | None = None) -> list[float]:
    """MagCache's magnitude ratios of ``adapter``'s transformer (or ``model``, the diffusers
    transformer inside ``adapter.model``) for ``inputs`` by diffusers' calibration mode
    (``MagCacheConfig(calibrate=True)``): per step, the mean over tokens of
    ``||R_s|| / ||R_{s-1}||``, ``R`` the image stream's residual over the whole block stack.
    The hook only prints them (and logs them at INFO level), so they are read from its output."""
    from diffusers import MagCacheConfig

    printed = io.StringIO()
    config = MagCacheConfig(calibrate=True, num_inference_steps=adapter.num_steps)
    with diffusers_hook(adapter.model if model is None else model, config), contextlib.redirect_stdout(printed):
        adapter.generate(inputs)
    lists = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
    if not lists:
        raise RuntimeError(f"diffusers' MagCache calibration printed no ratios; it printed: {printed.getvalue()!r}")
    return [float(r) for r in ast.literal_eval(lists[-1])]


def write_mag_ratios(path: str | Path, adapter, ratios: list[float]) -> Path:
    """A calibration file of ``ratios`` that both cachelab's MagCache (``calibration=path``) and
    diffusers' ``MagCacheConfig(mag_ratios=...)`` (through :func:`cachelab.assets.load_calibration`) read."""
    write_json_atomic(path, {"model": adapter.name, "num_steps": adapter.num_steps, "ratios": ratios,
                             "source": "diffusers MagCacheConfig(calibrate=True)"})
    return Path(path)


# -- diffusers' SeaCache --------------------------------------------------------------------
def raw_vision(module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """SeaCache's ``raw_vision_callback`` for image transformers: the input latent of each sample
    as ``(C, 1, H, W)`` (one frame): a ``(B, C, H, W)`` latent as it is; packed ``(B, N, C)``
    tokens (FLUX) on their square grid."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    if x.dim() == 4:
        return [sample.unsqueeze(1) for sample in x]
    side = math.isqrt(x.shape[1])
    if x.dim() != 3 or side * side != x.shape[1]:
        raise ValueError(f"SeaCache here reads (B, C, H, W) latents or (B, N, C) tokens on a square grid, got "
                         f"{tuple(x.shape)}")
    return [sample.reshape(side, side, -1).permute(2, 0, 1).unsqueeze(1) for sample in x]


@contextlib.contextmanager
def step_coordinates(transformer: torch.nn.Module, timestep: Callable[[], float],
                     grid: Callable[[], StepGrid]) -> Iterator[None]:
    """Inside the block every ``transformer.cache_context(name)`` the sampler opens also carries
    the step's ``step_index``, ``sigma`` and ``num_inference_steps`` (diffusers' ``CacheContext``
    fields, which its SeaCache reads; the FLUX pipeline and the DDIM loop here pass the name only):
    the step is the one of ``grid()`` nearest the current ``timestep()``; ``sigma`` is
    ``rho / (1 + rho)`` with ``rho = exp(-logsnr / 2)``: flow matching's own sigma, and for DDIM
    the flow sigma at the same noise-to-signal ratio."""
    original = transformer.cache_context

    @contextlib.contextmanager
    def with_coordinates(name: str, **kwargs):
        steps, t = grid(), float(timestep())
        s = min(range(len(steps.timestep)), key=lambda i: abs(steps.timestep[i] - t))
        rho = math.exp(-steps.logsnr[s] / 2)
        coordinates = {"step_index": s, "sigma": rho / (1 + rho), "num_inference_steps": len(steps.timestep)}
        with original(name, **{**coordinates, **kwargs}):
            yield

    transformer.cache_context = with_coordinates
    try:
        yield
    finally:
        del transformer.cache_context  # the class's own again


# -- cache-dit ------------------------------------------------------------------------------
def cache_dit_available() -> bool:
    """Whether cache-dit is installed (the optional extra ``peers``)."""
    return importlib.util.find_spec("cache_dit") is not None


def import_cache_dit():
    """The ``cache_dit`` module, its logging at ERROR unless ``CACHE_DIT_LOG_LEVEL`` says
    otherwise (it reads the variable once, at import; its INFO lines would bury a run)."""
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    import cache_dit

    return cache_dit


@contextlib.contextmanager
def cache_dit_enabled(pipe, **configs) -> Iterator[None]:
    """cache-dit on ``pipe`` inside the block (``cache_dit.enable_cache(pipe, **configs)``).

    On exit, besides ``cache_dit.disable_cache``, the transformer is put back as it was:
    cache-dit 1.5.3 leaves its own copy of FLUX's forward on it, and patching the block lists
    during each call re-registers them in a new order (``single_transformer_blocks`` first),
    which misleads diffusers' hooks enabled afterwards (they take the first and last
    registered blocks as head and tail)."""
    cache_dit = import_cache_dit()
    transformer = pipe.transformer
    order = list(transformer._modules)
    attributes = {name: vars(transformer).get(name, _MISSING) for name in ("forward", "_is_patched")}
    cache_dit.enable_cache(pipe, **configs)
    try:
        yield
    finally:
        cache_dit.disable_cache(pipe)
        for name, value in attributes.items():
            if value is _MISSING:
                vars(transformer).pop(name, None)
            else:
                setattr(transformer, name, value)
        for name in order:
            transformer._modules[name] = transformer._modules.pop(name)


# -- grid coverage ---------------------------------------------------------------------------
def documented_knobs(config_class: type) -> set[str]:
    """The parameters a peer's config class documents: its dataclass fields, else its
    constructor's keyword parameters."""
    if dataclasses.is_dataclass(config_class):
        return {f.name for f in dataclasses.fields(config_class) if f.init}
    return {name for name, p in inspect.signature(config_class).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def check_coverage(tool: str, config_class: type, searched: Iterable[str], not_searched: Mapping[str, str]) -> None:
    """A ConfigError unless the grid of ``tool`` names each documented parameter of
    ``config_class`` once: searched (given values), or in ``not_searched`` with a reason."""
    documented, searched = documented_knobs(config_class), set(searched)
    unexplained = sorted(name for name, reason in not_searched.items() if not str(reason or "").strip())
    missing = sorted(documented - searched - set(not_searched))
    unknown = sorted((searched | set(not_searched)) - documented)
    both = sorted(searched & set(not_searched))
    problems = [f"{what}: {', '.join(names)}" for what, names in
                (("not in the grid", missing), ("not parameters of it", unknown),
                 ("both searched and not searched", both), ("not searched without a reason", unexplained)) if names]
    if problems:
        raise ConfigError(f"grid of {tool} against {config_class.__name__}'s documented parameters: "
                          f"{'; '.join(problems)}; allowed: {', '.join(sorted(documented))}")
