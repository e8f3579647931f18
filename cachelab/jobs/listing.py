"""``cachelab --list`` and ``cachelab --version``: what the configs offer, read from the yaml files'
leading comments (no Hydra, no torch: quick)."""
from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

GROUPS = ("strategy", "schedule", "model", "job")  # the config groups a user picks from
WIDTH = 100  # a description's most characters


def description(path: Path) -> str:
    """The first sentence of a yaml file's leading comment block (shortened to :data:`WIDTH`)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    first = re.split(r"(?<=[.;])\s+(?=[A-Z])", text, maxsplit=1)[0]  # not after "et al. 2025"
    return first if len(first) <= WIDTH else first[:WIDTH - 1].rstrip() + "…"


def catalogue(config_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """Per group, every choice's name and description, sorted by name."""
    return {group: [(path.stem, description(path)) for path in sorted((config_dir / group).glob("*.yaml"))]
            for group in GROUPS}


def listing(config_dir: Path) -> str:
    """The text ``cachelab --list`` prints: each group, then its choices, one per line."""
    out = []
    for group, choices in catalogue(config_dir).items():
        out.append(f"{group} (python run.py {group}=<name>):")
        width = max(len(name) for name, _ in choices)
        out += [f"  {name:<{width}}  {text}" for name, text in choices]
    return "\n".join(out)


def package_version() -> str:
    """cachelab's installed version (the checkout's ``pyproject.toml`` when it is not installed)."""
    try:
        return version("cachelab")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        return re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M).group(1)
