"""What the project ships inside the package, read-only: trained weights (``<name>.pt`` beside
``<name>.json``, its manifest: sha256, the exact training config and command, data, measured
quality) and calibrations of the adaptive schedules (``calibration_<model>.json``).
Imports only torch and the standard library, so the core's schedules can read calibrations."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

from cachelab.errors import AssetCorrupt, ConfigError

ASSETS_DIR = Path(__file__).resolve().parent
CALIBRATION_PREFIX = "calibration_"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_digest(path: Path, digest: str | None, expected: str, manifest: str) -> None:
    """Refuse a shipped file that is missing (``digest`` None) or whose sha256 is not its manifest's."""
    if digest is None:
        raise AssetCorrupt(f"{path} is missing (listed in {manifest}.json); reinstall or re-export it")
    if digest != expected:
        raise AssetCorrupt(f"{path} has sha256 {digest[:12]}..., its manifest says {expected[:12]}...: "
                           f"the file is corrupt or was replaced (git lfs pointer?); restore it from the repository")


def read_manifest(name: str) -> dict:
    path = ASSETS_DIR / f"{name}.json"
    if not path.is_file():
        available = sorted(p.stem for p in ASSETS_DIR.glob("*.json") if not p.stem.startswith(CALIBRATION_PREFIX))
        raise AssetCorrupt(f"no shipped asset {name!r} ({path}); available: {', '.join(available) or 'none'}")
    return json.loads(path.read_text())


def load_asset(name: str) -> tuple[dict, dict]:
    """The state dict and manifest of a shipped asset, after checking its sha256."""
    manifest = read_manifest(name)
    path = ASSETS_DIR / manifest["file"]
    data = path.read_bytes() if path.is_file() else None
    check_digest(path, None if data is None else sha256(data), manifest["sha256"], name)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), manifest


def shipped_calibrations() -> list[str]:
    """The model names with a shipped calibration."""
    return sorted(p.stem[len(CALIBRATION_PREFIX):] for p in ASSETS_DIR.glob(f"{CALIBRATION_PREFIX}*.json"))


def calibration_path(calibration: str) -> Path:
    """A ``.json`` path as given, else the shipped calibration of that model name."""
    return Path(calibration) if calibration.endswith(".json") else ASSETS_DIR / f"{CALIBRATION_PREFIX}{calibration}.json"


def load_calibration(calibration: str) -> dict:
    """The calibration record (``model``, ``num_steps``, ``ratios``, ``teacache_coefficients``, ...)
    of ``calibration``: a path to a ``.json`` file (``python run.py job=calibrate`` writes one into
    its run folder) or the name of a model with a shipped calibration."""
    path = calibration_path(calibration)
    if not path.is_file():
        raise ConfigError(f"schedule.calibration={calibration!r}: no file {path}; allowed: a path to a .json "
                          f"file or a shipped name ({', '.join(shipped_calibrations()) or 'none'}); record one "
                          f"with `python run.py job=calibrate model=<model> num_steps=<T>`")
    return json.loads(path.read_text())
