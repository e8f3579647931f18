"""Loading pretrained components with errors that say what to do when offline."""
from __future__ import annotations

import os
from pathlib import Path

from cachelab.errors import WeightsUnavailable


def load_pretrained(cls, name_or_path: str, key: str, **kwargs):
    """``cls.from_pretrained(name_or_path)`` for a local folder or a hub id. A hub id is
    looked up in the local cache first; the network is tried only when not offline
    (``HF_HUB_OFFLINE``). Failure names the id and the config key to point at a folder."""
    local = Path(name_or_path).expanduser().is_dir()
    try:
        if local:
            return cls.from_pretrained(str(Path(name_or_path).expanduser()), **kwargs)
        try:
            return cls.from_pretrained(name_or_path, local_files_only=True, **kwargs)
        except (OSError, ValueError):
            if _offline():
                raise
            return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        where = "the local folder" if local else "the hub id (not in the local cache; offline or unreachable)"
        raise WeightsUnavailable(
            f"could not load {cls.__name__} from {where} {name_or_path!r} ({type(err).__name__}); "
            f"download it once elsewhere and set {key}=<local folder>"
        ) from err


def load_vae(name_or_path: str):
    """diffusers ``AutoencoderKL`` from a local folder or a hub id (config key ``model.vae``)."""
    from diffusers import AutoencoderKL

    return load_pretrained(AutoencoderKL, name_or_path, "model.vae")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
