"""Atomic writes: a file is either absent or complete, never half-written."""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np
import torch
from PIL import Image


@contextmanager
def open_atomic(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary file in the same folder, renamed
    to ``path`` when the block ends without an error and removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with open_atomic(path) as f:
        f.write(data)


def finite_json(obj) -> tuple[object, dict[str, str]]:
    """``obj`` with every NaN and +-Inf float (in dicts, lists and tuples) replaced by None,
    and which ones were: ``{"quality/psnr_db": "inf", "per_step_rel_l2/3": "nan", ...}`` (keys
    joined by "/", list positions as numbers; values "nan", "inf", "-inf"). Strict JSON
    readers (jq, JavaScript) reject the NaN and Infinity that ``json.dumps`` writes by default."""
    flags: dict[str, str] = {}

    def clean(value, path: str):
        if isinstance(value, float) and not math.isfinite(value):
            flags[path] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
            return None
        if isinstance(value, dict):
            return {key: clean(item, f"{path}/{key}" if path else str(key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item, f"{path}/{i}" if path else str(i)) for i, item in enumerate(value)]
        return value

    return clean(obj, ""), flags


def write_json_atomic(path: str | Path, obj) -> None:
    """``obj`` as strict JSON (NaN and +-Inf written as null, see :func:`finite_json`), atomically."""
    write_bytes_atomic(path, (json.dumps(finite_json(obj)[0], indent=2, allow_nan=False) + "\n").encode())


def save_torch_atomic(path: str | Path, obj) -> bytes:
    """``torch.save`` atomically; returns the bytes written (e.g. to hash them)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    write_bytes_atomic(path, data)
    return data


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """Images in [0, 1], (..., C, H, W) -> uint8 (..., H, W, C), rounded to the nearest level;
    NaN becomes 0 and +-Inf 1 / 0 (a uint8 cannot hold them; the image still shows the rest)."""
    return (images.nan_to_num(nan=0.0).clamp(0, 1) * 255).round().byte().movedim(-3, -1).cpu().numpy()


def from_uint8_hwc(array: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, C) -> float images in [0, 1], (..., C, H, W); inverts :func:`to_uint8_hwc`."""
    return torch.from_numpy(array).movedim(-1, -3).float() / 255


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as the bytes of a compressed ``.npz`` (to write atomically)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def save_png_atomic(path: str | Path, image: torch.Tensor) -> None:
    """``image``: (C, H, W) in [0, 1]."""
    array = to_uint8_hwc(image)
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


@dataclass
class ArrayParts:
    """An array of ``shape`` and ``dtype`` given as consecutive parts along axis 0 (an
    iterable, consumed once), for :func:`write_npz_atomic`."""

    shape: tuple[int, ...]
    dtype: np.dtype
    parts: Iterable[np.ndarray]


def write_npz_atomic(path: str | Path, arrays: dict[str, np.ndarray | ArrayParts]) -> None:
    """An uncompressed ``.npz`` as ``np.savez`` writes it (``np.load`` reads it), atomically.
    An :class:`ArrayParts` is streamed part by part, so it never has to be in memory whole;
    its parts must add up to its shape."""
    with open_atomic(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as out:
                if isinstance(array, ArrayParts):
                    _write_parts(out, name, array)
                else:
                    np.lib.format.write_array(out, np.asanyarray(array), allow_pickle=False)


def _write_parts(out: BinaryIO, name: str, array: ArrayParts) -> None:
    dtype, shape = np.dtype(array.dtype), tuple(array.shape)
    np.lib.format.write_array_header_1_0(
        out, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    rows = 0
    for part in array.parts:
        if part.shape[1:] != shape[1:] or part.dtype != dtype:
            raise ValueError(f"{name}: a part of shape {part.shape} and dtype {part.dtype} does not fit "
                             f"{shape} {dtype}")
        out.write(np.ascontiguousarray(part).data)
        rows += len(part)
    if rows != shape[0]:
        raise ValueError(f"{name}: the parts hold {rows} rows, the header says {shape[0]}")
