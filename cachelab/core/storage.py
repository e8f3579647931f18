"""How a predictor stores the tensors it keeps between full steps: a float dtype, fp8 or int8
with scales (:data:`CODECS`, chosen by name; ``TaylorSeer(factor_dtype=...)`` takes one per
derivative order).

A codec turns a tensor into what is stored (:meth:`Codec.encode`) and back into a tensor
(:func:`decode`). Float storage keeps a plain tensor in its dtype and computes in it (decoding
is the tensor itself). Scaled storage keeps a :class:`Scaled`: the tensor divided by a scale
per channel (``*_channel``, and fp8) or per token (``*_token``), rounded to int8 or cast to fp8,
plus the scales (float32; float64 for float64 values) and the dtype to decode to (the
value's). Its ``nbytes`` count the scales too, so the controller's ``stats().cache_bytes``
and the planner count exactly what is held.

The axes: a value of shape ``(B, ..., C)`` has channels on its last axis and tokens on the
axes between the first and the last. A channel scale is the largest magnitude over one
sample's tokens in that channel (shape ``(B, 1, ..., C)``); a token scale over one token's
channels (``(B, ..., 1)``). Scales never mix the batch's samples, so a sample's storage does
not depend on what it is batched with. A 2-D value ``(B, C)`` has channel scales over the
batch, and a 1-D value one scale.

The error of a scaled encoding, element by element, for a scale ``s`` (derived in the
docs/guides/memory.md, "Factor storage"): int8 ``|x - decode(x)| <= s / 2`` with ``s = max|x| / 127`` (up
to float32 rounding of the division and product, ``127 * 2^-23 s``); fp8 e4m3 with ``s = max|x|
/ 448``: ``<= 2^-4 |x|`` where ``|x| / s`` is normal (``>= 2^-6``), ``<= 2^-10 s`` below
(subnormal spacing 2^-9); fp8 e5m2 with ``s = max|x| / 57344``: ``<= 2^-3 |x|``, and ``<=
2^-17 s`` below ``2^-14 s``. A scale is at least the smallest normal number of its dtype, so
an all-zero channel or token encodes as zeros. NaN and Inf are never scaled: the scales come
from the finite elements (whose bounds hold as stated) and every non-finite element decodes
as NaN (int8 keeps the code -128 for it).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

FLOATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
NON_FINITE = -128  # the int8 code of a non-finite element (finite ones use -127..127)


@dataclass
class Scaled:
    """A tensor stored as ``data * scale`` (``data`` int8 or fp8, ``scale`` broadcasting to it),
    decoded to ``dtype``."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    def decode(self) -> torch.Tensor:
        """The stored tensor in ``dtype`` (non-finite elements as NaN)."""
        values = self.data.to(self.scale.dtype) * self.scale
        if self.data.dtype == torch.int8:
            values = values.masked_fill_(self.data == NON_FINITE, torch.nan)
        return values.to(self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.data, self.scale]


Stored = torch.Tensor | Scaled


class Codec(ABC):
    """A storage format: :meth:`encode` a tensor into what is stored."""

    name: str
    itemsize: int  # bytes per element of the data

    @abstractmethod
    def encode(self, x: torch.Tensor) -> Stored:
        """What is stored of ``x`` (:func:`decode` gives it back)."""


class Float(Codec):
    """A float dtype: the tensor cast to it (no copy when it has it already)."""

    def __init__(self, name: str):
        self.name, self.dtype = name, FLOATS[name]
        self.itemsize = self.dtype.itemsize

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


class Quantized(Codec):
    """``x / s`` stored as ``storage`` (int8: rounded to nearest, clamped to +-127; fp8: cast,
    clamped to its largest finite magnitude ``largest``), with ``s = max(amax / largest,
    smallest normal)`` per channel or per token (module docstring)."""

    def __init__(self, name: str, storage: torch.dtype, largest: float, per: str):
        self.name, self.storage, self.largest, self.per = name, storage, largest, per
        self.itemsize = storage.itemsize  # bytes per element, besides the scales

    def encode(self, x: torch.Tensor) -> Scaled:
        scale_dtype = torch.promote_types(x.dtype, torch.float32)
        finite = torch.isfinite(x)
        wide = x.to(scale_dtype)
        magnitude = torch.where(finite, wide.abs(), 0)
        dims = reduced_dims(x.ndim, self.per)
        amax = magnitude.amax(dim=dims, keepdim=True) if dims else magnitude
        scale = (amax / self.largest).clamp_min_(torch.finfo(scale_dtype).tiny)
        q = (wide / scale).clamp_(-self.largest, self.largest)
        if self.storage == torch.int8:
            data = q.round_().masked_fill_(~finite, NON_FINITE).to(torch.int8)
        else:
            data = q.masked_fill_(~finite, torch.nan).to(self.storage)
        return Scaled(data, scale, x.dtype)


def reduced_dims(ndim: int, per: str) -> tuple[int, ...]:
    """The axes a scale is taken over: a channel's tokens of one sample (``per="channel"``) or a
    token's channels (``"token"``); a 2-D value's channel scales span the batch, a 1-D value has one."""
    if ndim <= 1:
        return tuple(range(ndim))
    if per == "token":
        return (ndim - 1,)
    return tuple(range(1, ndim - 1)) if ndim >= 3 else (0,)


CODECS: dict[str, Codec] = {
    **{name: Float(name) for name in FLOATS},
    "fp8_e4m3": Quantized("fp8_e4m3", torch.float8_e4m3fn, 448.0, "channel"),
    "fp8_e5m2": Quantized("fp8_e5m2", torch.float8_e5m2, 57344.0, "channel"),
    "int8_channel": Quantized("int8_channel", torch.int8, 127.0, "channel"),
    "int8_token": Quantized("int8_token", torch.int8, 127.0, "token"),
}


def decode(stored: Stored) -> torch.Tensor:
    """What ``stored`` holds, as a tensor: a float tensor itself, a :class:`Scaled` decoded."""
    return stored if isinstance(stored, torch.Tensor) else stored.decode()


def held(stored: Sequence[Stored]) -> list[torch.Tensor]:
    """Every tensor that ``stored`` holds (data and scales)."""
    return [t for each in stored for t in ([each] if isinstance(each, torch.Tensor) else each.tensors())]


def is_storage(value) -> bool:
    """Whether ``value`` is null, a codec name or a non-empty list of codec names."""
    if value is None or isinstance(value, str):
        return value is None or value in CODECS
    return isinstance(value, Sequence) and len(value) > 0 and all(isinstance(v, str) and v in CODECS for v in value)

