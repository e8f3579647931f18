"""Shipping trained weights inside the package: the training jobs' ``--export``."""
from __future__ import annotations

from cachelab import assets
from cachelab.io import save_torch_atomic, write_json_atomic


def write_asset(name: str, state_dict: dict, manifest: dict) -> None:
    """``state_dict`` as ``<name>.pt`` in the shipped assets, beside ``<name>.json``: ``manifest``
    with the file's name, sha256 and size (what :func:`cachelab.assets.load_asset` checks)."""
    folder = assets.ASSETS_DIR
    data = save_torch_atomic(folder / f"{name}.pt", state_dict)
    write_json_atomic(folder / f"{name}.json", {**manifest, "file": f"{name}.pt", "sha256": assets.sha256(data),
                                                "bytes": len(data)})
