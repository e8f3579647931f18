"""Weights the project trains and ships: ``<name>.pt`` beside ``<name>.json`` (its manifest:
sha256, the exact training config and command, data, measured quality)."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

from cachelab.checks import UserError
from cachelab.io import save_torch_atomic, write_json_atomic

ASSETS_DIR = Path(__file__).resolve().parent


class AssetCorrupt(UserError, RuntimeError):
    """A shipped weights file is missing or does not match its manifest's sha256."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_asset(name: str, state_dict: dict, manifest: dict) -> None:
    data = save_torch_atomic(ASSETS_DIR / f"{name}.pt", state_dict)
    write_json_atomic(ASSETS_DIR / f"{name}.json", {**manifest, "file": f"{name}.pt", "sha256": sha256(data),
                                                    "bytes": len(data)})


def read_manifest(name: str) -> dict:
    path = ASSETS_DIR / f"{name}.json"
    if not path.is_file():
        available = sorted(p.stem for p in ASSETS_DIR.glob("*.json"))
        raise AssetCorrupt(f"no shipped asset {name!r} ({path}); available: {', '.join(available) or 'none'}")
    return json.loads(path.read_text())


def load_asset(name: str) -> tuple[dict, dict]:
    """The state dict and manifest of a shipped asset, after checking its sha256."""
    manifest = read_manifest(name)
    path = ASSETS_DIR / manifest["file"]
    if not path.is_file():
        raise AssetCorrupt(f"{path} is missing (its manifest {name}.json is there); reinstall or re-export it")
    data = path.read_bytes()
    digest = sha256(data)
    if digest != manifest["sha256"]:
        raise AssetCorrupt(f"{path} has sha256 {digest[:12]}..., its manifest says {manifest['sha256'][:12]}...: "
                           f"the file is corrupt or was replaced (git lfs pointer?); restore it from the repository")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), manifest
