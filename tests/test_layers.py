"""The layering: core <- strategies <- models <- evaluation <- analysis <- jobs <- run.py, no
import cycle, only the jobs know Hydra, the core imports only torch and the standard library;
the documentation's layout page (docs/reference/layout.md) is the tree; shipped assets are never
rewritten by a job."""
from __future__ import annotations

import ast
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# import name -> folder: the folders strategies/ and analysis/ keep the design-card layout and are
# imported through the links cachelab/strategies and cachelab/analysis (the wheel holds them there)
PACKAGES = {"cachelab": REPO / "cachelab", "cachelab.strategies": REPO / "strategies",
            "cachelab.analysis": REPO / "analysis"}
# (rank, module prefixes): a module may import modules of its own rank or below, never above
LAYERS = [
    (0, ("cachelab.errors", "cachelab.core", "cachelab.assets")),   # the core
    (1, ("cachelab.io",)),                                           # atomic files (numpy, PIL)
    (2, ("cachelab.strategies",)),
    (3, ("cachelab.models",)),
    (4, ("cachelab.evaluation",)),
    (5, ("cachelab.analysis",)),
    (6, ("cachelab.jobs", "cachelab.planner")),  # the planner composes presets as the jobs do
    (7, ("cachelab", "cachelab.api")),   # the public API at the root: presets come from the jobs' config
]
CORE_RANK = 0
HYDRA = ("hydra", "omegaconf")


def module_files() -> dict[str, Path]:
    files = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):  # rglob does not follow the links: each file once
            parts = package.split(".") + list(path.relative_to(folder).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


MODULES = module_files()


def imported_names(module: str) -> set[str]:
    """Every module ``module`` imports, at module level or inside functions, absolute names."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def own(name: str) -> str | None:
    """The project module ``name`` refers to (the longest matching prefix), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def rank(module: str) -> int:
    matches = [(len(prefix), r) for r, prefixes in LAYERS for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer"
    return max(matches)[1]


def edges() -> dict[str, set[str]]:
    graph = {}
    for module in MODULES:
        targets = {own(name) for name in imported_names(module)} - {None, module}
        # a package's own __init__ is imported by Python before its modules, not by them
        graph[module] = {t for t in targets if not (MODULES[t].name == "__init__.py" and module.startswith(t + "."))}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk of ``graph`` closes."""
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_import_cycle():
    cycles = find_cycles(edges())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_walk_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_every_module_belongs_to_a_layer_and_imports_only_downward():
    upward = [f"{module} ({rank(module)}) imports {target} ({rank(target)})"
              for module, targets in edges().items() for target in targets if rank(target) > rank(module)]
    assert not upward, "\n".join(upward)


def test_the_core_imports_only_torch_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"torch"}
    outside = [f"{module} imports {name}" for module in MODULES if rank(module) == CORE_RANK
               for name in imported_names(module)
               if (own(name) is None and name.split(".")[0] not in allowed and name)
               or (own(name) is not None and rank(own(name)) != CORE_RANK)]
    assert not outside, "\n".join(outside)


def test_only_the_jobs_know_hydra():
    knowing = [f"{module} imports {name}" for module in MODULES if rank(module) != 6
               for name in imported_names(module) if name.split(".")[0] in HYDRA]
    assert not knowing, "\n".join(knowing)


def test_diffusers_private_names_are_imported_in_one_module():
    """Only ``cachelab.models.diffusers_private`` imports a private diffusers module or name."""
    private = [f"{module} imports {name}" for module in MODULES if module != "cachelab.models.diffusers_private"
               for name in imported_names(module)
               if name.split(".")[0] == "diffusers" and any(part.startswith("_") for part in name.split(".")[1:])]
    assert not private, "\n".join(private)


def test_core_and_public_api_import_without_hydra_in_a_fresh_interpreter():
    core = sorted(m for m in MODULES if rank(m) == CORE_RANK) + ["cachelab"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in core)
            + "print(sorted({n.split('.')[0] for n in sys.modules} & {'hydra', 'omegaconf', 'diffusers', 'timm'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"the core pulled in {out.strip()}"


# -- one import name: cachelab ----------------------------------------------------------
# the top-level names the folders strategies/ and analysis/ would have: other projects' names on
# the package index, and importing one beside cachelab.<name> would load every module twice
OLD_NAMES = ("strategies", "analysis")
# a dotted reference to one of them: a _target_, a module string, python -m, a docs reference
OLD_REFERENCE = re.compile(r"(?<![\w./-])(?:" + "|".join(OLD_NAMES) + r")\.[a-z_]\w*")
SCANNED = (".py", ".yaml", ".md", ".sh", ".toml")


def old_imports(source: str, filename: str) -> list[str]:
    """The import statements of ``source`` that name a top-level ``strategies``/``analysis``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        found += [f"{filename}:{node.lineno}: {ast.unparse(node)}" for name in names
                  if name.split(".")[0] in OLD_NAMES]
    return found


def recorded_run(path: Path) -> bool:
    """A file of a run folder under train_free_runs/ (.hydra/, multirun.yaml, report.md): the record
    of what ran then, class paths of that day included; only its overrides are recomposed."""
    return path.is_relative_to(REPO / "train_free_runs") and any(
        (folder / ".hydra").is_dir() or (folder / "multirun.yaml").is_file() or folder.name == ".hydra"
        for folder in path.parents)


def project_files() -> list[Path]:
    skip = {".git", ".venv", "__pycache__", "build", "dist", "site"}
    return sorted(path for path in REPO.rglob("*") if path.suffix in SCANNED and path.is_file()
                  and not skip & set(path.relative_to(REPO).parts) and not path.name.endswith(".egg-info")
                  and not recorded_run(path))


def test_the_folders_are_imported_under_cachelab():
    for name in OLD_NAMES:
        link = REPO / "cachelab" / name
        assert link.is_symlink() and link.resolve() == (REPO / name).resolve(), f"cachelab/{name} -> ../{name}"
    assert {"cachelab.strategies.taylor", "cachelab.analysis.sweep"} <= set(MODULES)


def test_nothing_imports_or_names_the_top_level_folders():
    files = project_files()
    assert REPO / "conf" / "strategy" / "taylor.yaml" in files and Path(__file__) in files
    found = [hit for path in files if path.suffix == ".py" for hit in old_imports(path.read_text(), str(path))]
    found += [f"{path}:{text[:m.start()].count(chr(10)) + 1}: {m.group()}" for path in files
              if path != Path(__file__)  # its own examples, below
              for text in [path.read_text()] for m in OLD_REFERENCE.finditer(text)]
    assert not found, "use cachelab.strategies / cachelab.analysis:\n" + "\n".join(found)


def test_the_scan_finds_old_names():
    assert len(old_imports("import strategies\nfrom analysis.sweep import x\nimport analysis.sink as s\n"
                           "from cachelab.strategies import taylor\nfrom . import analysis\n", "x.py")) == 3
    text = "_target_: strategies.taylor.TaylorSeer\npython -m analysis.sweep\ncachelab.analysis.sweep analysis/sweep.py"
    assert [m.group() for m in OLD_REFERENCE.finditer(text)] == ["strategies.taylor", "analysis.sweep"]
    assert recorded_run(REPO / "train_free_runs" / "x" / ".hydra" / "config.yaml")
    assert not recorded_run(REPO / "train_free_runs" / "tuner" / "README.md")


# -- the documentation's layout page is the tree -----------------------------------------
LAYOUT_PAGE = REPO / "docs" / "reference" / "layout.md"


def layout_paths() -> list[str]:
    """The paths in the layout page's "## Layout" block: an entry per line (name in the first 24
    columns, two spaces of indent per level), descriptions and continuations further right."""
    text = LAYOUT_PAGE.read_text()
    block = re.search(r"## Layout\n.*?```\n(.*?)```", text, re.S).group(1)
    paths, stack = [], []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        if not line.strip() or indent >= 24:
            continue
        depth = indent // 2
        stack = stack[:depth] + [line.split()[0]]
        paths.append("".join(stack))
    return paths


def test_layout_page_lists_only_what_exists():
    missing = [path for path in layout_paths() if not (REPO / path).exists()]
    assert not missing, f"{LAYOUT_PAGE.relative_to(REPO)} lists paths that do not exist: {missing}"


def test_layout_page_lists_every_module_and_package():
    listed = {path.rstrip("/") for path in layout_paths()}
    tree = {str(path.relative_to(REPO)) for folder in PACKAGES.values() for path in folder.rglob("*")
            if path.name != "__init__.py" and "__pycache__" not in path.parts
            and (path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()))}
    tree |= {str(p.relative_to(REPO)) for p in (REPO / "conf").iterdir() if p.is_dir()}
    assert not tree - listed, f"{LAYOUT_PAGE.relative_to(REPO)} misses: {sorted(tree - listed)}"


# -- jobs write into their run folder, never into the package ----------------------------
def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_calibration_is_written_to_the_run_folder_and_assets_stay_untouched(tmp_path):
    assets = REPO / "cachelab" / "assets"
    before = digest(assets)
    proc = subprocess.run([sys.executable, "run.py", "job=calibrate", "model=tiny_dit_random", "num_steps=6",
                           "logger=none", "progress=false", f"hydra.run.dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "calibration.json").read_text())
    assert record["model"] == "tiny_dit_random" and len(record["ratios"]) == 6
    assert f"schedule.calibration={tmp_path / 'calibration.json'}" in proc.stdout
    assert digest(assets) == before
