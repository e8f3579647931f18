"""The documentation: every public name of ``cachelab`` has its API reference entry (mkdocs build
--strict in .ci/run then fails on one that no longer exists), every preset and schedule config has
its page in the strategy library, and the README stays a short page whose links into docs/ and
the studies all exist (mkdocs does not build the README)."""
from __future__ import annotations

import re
from pathlib import Path

import cachelab

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "docs" / "reference"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_public_name_has_an_api_reference_entry():
    text = "\n".join(page.read_text() for page in REFERENCE.glob("*.md"))
    documented = set(re.findall(r"^::: (\S+)$", text, re.M))
    missing = [f"{module}.{name}" for name, module in cachelab._EXPORTS.items()
               if f"{module}.{name}" not in documented and module not in documented]
    assert not missing, f"no ::: entry in docs/reference/ for {missing}"


def test_every_preset_and_schedule_has_a_library_page():
    library = "\n".join(page.read_text() for page in (REPO / "docs" / "library").glob("*.md"))
    linked = library.replace("](../../", "](")
    configs = [c.relative_to(REPO) for group in ("strategy", "schedule")
               for c in sorted((REPO / "conf" / group).glob("*.yaml"))]
    missing = [str(c) for c in configs if f"]({c})" not in linked]
    assert not missing, f"no page of docs/library/ links to {missing}"


def test_readme_is_short_and_its_links_exist():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250, "the README is the short page; the rest belongs in docs/"
    relative = [t.split("#")[0] for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]
    assert any(t.startswith("docs/") for t in relative)
    broken = [t for t in relative if not (REPO / t).exists()]
    assert not broken, f"README.md links to files that do not exist: {broken}"


def test_the_readme_library_table_is_the_recorded_runs():
    """The README's library table is what ``train_free_runs/library/table.py`` writes from the
    recorded benchmark runs (no hand-typed number), and it has a row for every method."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("library_table", REPO / "train_free_runs" / "library" / "table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    readme = (REPO / "README.md").read_text()
    written = readme.split(table.README_START + "\n")[1].split(table.README_END)[0].splitlines()
    assert written == table.readme_table(table.read_runs())
    assert len(written) == 2 + sum(preset is not None for _, _, preset, _ in table.METHODS.values())
