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
    """``out`` -> (its tensors in order, a function rebuilding the same structure from new tensors)."""
    if isinstance(out, torch.Tensor):
        return [out], lambda parts: parts[0]
    if isinstance(out, (tuple, list)):
        _check_parts(out)
        kind = type(out)  # not `out` itself: the rebuild must not keep the tensors alive
        return list(out), lambda parts: kind(parts)
    if isinstance(out, Mapping):  # diffusers BaseOutput is an OrderedDict dataclass
        kind, keys = type(out), list(out.keys())
        _check_parts(out.values())
        return [out[k] for k in keys], lambda parts: kind(**dict(zip(keys, parts)))
    raise TypeError(f"a cache site returned {type(out).__name__}; cachelab caches tensors, tuples of "
                    f"tensors and diffusers outputs")


def _check_parts(parts) -> None:
    for part in parts:
        if part is not None and not isinstance(part, torch.Tensor):
            raise TypeError(f"a cache site returned a {type(part).__name__} inside its output; "
                            f"only tensors (or None) can be cached")
