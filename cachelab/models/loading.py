"""Loading pretrained components with errors that say what to do when offline."""
from __future__ import annotations

import os
from pathlib import Path

from cachelab.checks import UserError


class WeightsUnavailable(UserError, RuntimeError):
    """Pretrained weights could not be loaded; the message names them and the fix."""


def load_vae(name_or_path: str):
    """diffusers ``AutoencoderKL`` from a local folder or a hub id."""
    from diffusers import AutoencoderKL

    local = Path(name_or_path).is_dir()
    try:
        return AutoencoderKL.from_pretrained(name_or_path, local_files_only=not local and _offline())
    except (OSError, ValueError) as err:
        raise WeightsUnavailable(
            f"could not load the VAE {name_or_path!r} ({type(err).__name__}); "
            f"download it once elsewhere and set model.vae=<local folder>"
        ) from err


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
