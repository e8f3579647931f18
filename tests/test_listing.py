"""``cachelab --version`` and ``cachelab --list``: answered before Hydra, from the configs' own comments."""
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from cachelab.jobs import CONFIG_DIR
from cachelab.jobs.listing import GROUPS, WIDTH, catalogue, description

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_version_is_the_installed_distribution_s():
    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"cachelab {version('cachelab')}"


def test_list_names_every_choice_of_every_group_with_its_description():
    done = run("--list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for group in GROUPS:
        assert f"{group} (python run.py {group}=<name>):" in lines
        for path in (CONFIG_DIR / group).glob("*.yaml"):
            text = description(path)
            assert text, f"{path} has no leading comment to describe it"
            assert any(line.split()[:1] == [path.stem] and line.endswith(text) for line in lines), path.stem


def test_a_description_is_the_comment_s_first_sentence_shortened(tmp_path):
    config = tmp_path / "x.yaml"
    config.write_text("# TaylorSeer (Liu et al. 2025, ICCV): forecasts\n# of features. Second sentence.\nname: x\n")
    assert description(config) == "TaylorSeer (Liu et al. 2025, ICCV): forecasts of features."
    config.write_text("# " + "word " * 40 + "\nname: x\n")
    long = description(config)
    assert len(long) == WIDTH and long.endswith("…")
    config.write_text("name: x\n# a later comment\n")
    assert description(config) == ""


def test_the_catalogue_is_sorted_by_name():
    for choices in catalogue(CONFIG_DIR).values():
        names = [name for name, _ in choices]
        assert names == sorted(names) and names


def test_a_reader_that_stops_early_ends_the_list_quietly():
    """``cachelab --list | head -1``: the pipe is closed before the list is written; no traceback."""
    reader, writer = os.pipe()
    os.close(reader)  # nobody will read: the first write raises BrokenPipeError
    done = subprocess.run([sys.executable, "run.py", "--list"], cwd=ROOT, stdout=writer, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    os.close(writer)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 141
