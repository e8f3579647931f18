"""What a cache site returns, taken apart into tensors and put back together.

Sites return a tensor, a tuple of tensors (FLUX/SD3 joint attention: image and text
streams; diffusers blocks: ``(encoder_hidden_states, hidden_states)``), possibly with
``None`` entries, or a diffusers ``BaseOutput`` (a model's ``Transformer2DModelOutput``).
Each tensor gets its own predictor state.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

Parts = list[torch.Tensor | None]


def split(out) -> tuple[Parts, Callable[[Parts], object]]:
    """``out`` -> (its tensors in order, a function rebuilding the same structure from new tensors).
    Tuples, lists and mappings may nest (Z-Image returns a list of per-sample tensors in its output)."""
    if isinstance(out, torch.Tensor):
        return [out], lambda parts: parts[0]
    if isinstance(out, (tuple, list, Mapping)):
        items = list(out.values()) if isinstance(out, Mapping) else list(out)
        if all(item is None or isinstance(item, torch.Tensor) for item in items):  # flat: the hot path
            return items, _rebuilder(out, None)
        pieces = [([None], _none) if item is None else split(item) for item in items]
        return [part for parts, _ in pieces for part in parts], _rebuilder(out, pieces)
    raise TypeError(f"a cache site returned {type(out).__name__}; cachelab caches tensors, tuples and lists of "
                    f"tensors and diffusers outputs")


def _none(parts: Parts) -> None:
    return None


def _rebuilder(out, pieces) -> Callable[[Parts], object]:
    """Rebuild ``out``'s structure (its type and keys, never its tensors: they must not stay
    alive) from new parts; ``pieces``: each item's own split when the structure nests."""
    kind, keys = type(out), list(out.keys()) if isinstance(out, Mapping) else None
    sizes = None if pieces is None else [len(parts) for parts, _ in pieces]
    items = None if pieces is None else [rebuild for _, rebuild in pieces]

    def rebuild(parts: Parts):
        if sizes is not None:
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            parts = [item(parts[start:start + size]) for item, start, size in zip(items, starts, sizes)]
        return kind(**dict(zip(keys, parts))) if keys is not None else kind(parts)

    return rebuild
