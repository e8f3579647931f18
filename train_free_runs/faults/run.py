"""Faults end to end: every fault of the list run as a user would (``python run.py ...`` in a
fresh process, or a few lines of Python), each checked for its exit status, its one-line
message and what is left on disk; prints a table and ``faults N/N held``.

    python -m train_free_runs.faults.run [--only name,name] [--out train_free_runs/faults/results.md]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from train_free_runs.faults.faulty import STALLED

REPO = Path(__file__).resolve().parents[2]
FAULTY = ["model._target_=train_free_runs.faults.faulty.FaultyDiT", "+model.seed=${seed}"]
FAST = ["model=tiny_dit_random", "num_steps=6", "num_images=2", "measure.flops=false", "logger=none",
        "progress=false", "threads=1"]
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}


@dataclass
class Outcome:
    """What a fault left: exit status, stderr, the folder it ran into."""

    code: int
    stderr: str
    folder: Path


@dataclass
class Fault:
    """One fault: how to cause it, and what must hold afterwards (``check`` returns the problems)."""

    name: str
    cause: str                                  # the command or the situation, as the README's table says it
    run: Callable[[Path], Outcome]
    code: int
    message: str                                # a piece of the one line on stderr ("" for none expected)
    check: Callable[[Outcome], list[str]] = field(default=lambda outcome: [])


def cli(*overrides: str, sweep: bool = False, faults: str = "", where: str | None = None):
    """A fault caused on the command line: ``python run.py <FAST> <overrides>`` into the folder
    (``faults``: which sweep jobs FaultyDiT breaks, by seed)."""
    def run(folder: Path) -> Outcome:
        into = where or (f"hydra.sweep.dir={folder}" if sweep else f"hydra.run.dir={folder}")
        args = [sys.executable, "run.py", *(["-m"] if sweep else []), *FAST, *overrides, into]
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**ENV, "CACHELAB_TEST_FAULTS": faults},
                              timeout=600)
        return Outcome(proc.returncode, proc.stderr, folder)
    return run


def python(code: str):
    """A fault caused from Python: the snippet runs in a fresh interpreter with ``folder`` set."""
    def run(folder: Path) -> Outcome:
        script = f"from pathlib import Path\nfolder = Path({str(folder)!r})\n" + textwrap.dedent(code)
        proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, env=ENV,
                              timeout=600)
        return Outcome(proc.returncode, proc.stderr, folder)
    return run


def with_checkpoint(write: str):
    """``python run.py model=dit_s_2 +model.checkpoint=<file>`` with the file that ``write``
    (Python, given ``checkpoint``) makes."""
    return python(f"""
        import subprocess, sys
        checkpoint = folder.parent / (folder.name + ".pt")
        {write}
        proc = subprocess.run([sys.executable, "run.py", "model=dit_s_2", "model.input_size=8", "num_steps=4",
                               "num_images=1", "measure.flops=false", "logger=none", "progress=false",
                               f"+model.checkpoint={{checkpoint}}", f"hydra.run.dir={{folder}}"],
                              capture_output=True, text=True)
        sys.stderr.write(proc.stderr); sys.exit(proc.returncode)
    """)


def stalled(args: list[str]) -> subprocess.Popen:
    """``args`` started with FaultyDiT's ``stall`` armed, once it has stalled: its first
    generation done, the second held after its first step until a line arrives on its stdin."""
    proc = subprocess.Popen(args, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**ENV, "CACHELAB_TEST_FAULTS": "0=stall"})
    for line in proc.stdout:  # ends early only if the run ends first
        if line.rstrip("\n") == STALLED:
            break
    return proc


def concurrent(folder: Path) -> Outcome:
    """A second ``job=sample`` run into a folder that a first one holds: it must refuse (exit 2)."""
    args = [sys.executable, "run.py", *FAST, *FAULTY, "job=sample", "num_images=6", "job.batch_size=2",
            "num_steps=20", f"hydra.run.dir={folder}"]
    first = stalled(args)
    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=ENV, timeout=600)
    first.communicate("\n", timeout=600)
    return Outcome(second.returncode, second.stderr, folder)


def interrupted(sig: int, *overrides: str):
    """``python run.py`` (job=sample) sent ``sig`` in a known state: its first chunk written, the
    second stalled after its first step."""
    def run(folder: Path) -> Outcome:
        proc = stalled([sys.executable, "run.py", *FAST, *FAULTY, "job=sample", "num_images=8", "job.batch_size=2",
                        "num_steps=30", *overrides, f"hydra.run.dir={folder}"])
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        return Outcome(proc.returncode, err, folder)
    return run


# -- what must hold on disk ---------------------------------------------------------------
def nothing_written(outcome: Outcome) -> list[str]:
    return [f"{p.name} written" for p in ("metrics.json", "grid.png") if (outcome.folder / p).exists()]


def strict_metrics(outcome: Outcome) -> list[str]:
    path = outcome.folder / "metrics.json"
    if not path.is_file():
        return ["no metrics.json"]
    try:
        json.loads(path.read_text(), parse_constant=lambda token: (_ for _ in ()).throw(ValueError(token)))
    except ValueError as err:
        return [f"metrics.json is not strict JSON ({err})"]
    return []


def no_traceback(outcome: Outcome) -> list[str]:
    return ["a traceback on stderr"] if "Traceback" in outcome.stderr else []


def no_half_files(outcome: Outcome) -> list[str]:
    half = [str(p.relative_to(outcome.folder)) for p in outcome.folder.rglob(".*") if p.is_file()
            and p.name.startswith(".") and not p.name.startswith(".hydra") and ".hydra" not in p.parts]
    return [f"half-written {half}"] if half else []


def all_of(*checks):
    return lambda outcome: [problem for check in checks for problem in check(outcome)]


def sweep_summary(failed: int):
    def check(outcome: Outcome) -> list[str]:
        problems = []
        summary = outcome.folder / "sweep.md"
        if not summary.is_file():
            return ["no sweep.md"]
        errors = list(outcome.folder.glob("*/error.txt"))
        if len(errors) != failed:
            problems.append(f"{len(errors)} error.txt, expected {failed}")
        finished = list(outcome.folder.glob("*/metrics.json"))
        if not finished:
            problems.append("no job finished")
        return problems
    return check


def metrics_say(check: Callable[[dict], bool], what: str):
    def checked(outcome: Outcome) -> list[str]:
        problems = strict_metrics(outcome)
        if problems:
            return problems
        return [] if check(json.loads((outcome.folder / "metrics.json").read_text())) else [what]
    return checked


def chunks_complete(outcome: Outcome) -> list[str]:
    import numpy as np

    broken = []
    for path in (outcome.folder / "samples" / "cached").glob("*.npz"):
        try:
            np.load(path)["images"]
        except Exception:  # noqa: BLE001 -- any unreadable chunk is the problem reported
            broken.append(path.name)
    return [f"broken chunks {broken}"] if broken else []


FAULTS = [
    # configuration: refused before any model is built
    Fault("negative order", "order=-1", cli("order=-1"), 2, "order=-1 is out of range", nothing_written),
    Fault("huge order", "order=100000000", cli("order=100000000"), 2, "allowed: integers 0..16", nothing_written),
    Fault("zero interval", "interval=0", cli("interval=0"), 2, "interval=0 is out of range", nothing_written),
    Fault("warm-up past the end", "first_enhance=20 num_steps=10", cli("first_enhance=20", "num_steps=10"), 2,
          "no forecast step: first_enhance=20", nothing_written),
    Fault("interval past the end", "interval=20 num_steps=10", cli("interval=20", "num_steps=10"), 0,
          "warning: interval=20 with num_steps=10", strict_metrics),
    Fault("no GPU", "device=cuda on a CPU machine", cli("device=cuda"), 2, "device='cuda' is not available",
          nothing_written),
    Fault("unknown device", "device=tpu", cli("device=tpu"), 2, "device='tpu' is not a device", nothing_written),
    Fault("unknown strategy", "strategy=tayler", cli("strategy=tayler"), 2, "strategy='tayler' is unknown"),
    Fault("unknown model", "model=flux_schnell", cli("model=flux_schnell"), 2, "model='flux_schnell' is unknown"),
    Fault("unknown job", "job=fid", cli("job=fid"), 2, "job='fid' is unknown"),
    Fault("unknown granularity", "strategy.granularity=layer", cli("strategy.granularity=layer"), 2,
          "strategy.granularity='layer' is not allowed", nothing_written),
    Fault("threshold out of range", "strategy=fbcache schedule.threshold=-1",
          cli("strategy=fbcache", "schedule.threshold=-1"), 2, "schedule.threshold=-1 is out of range",
          nothing_written),
    Fault("preset with another schedule", "strategy=fbcache schedule=interval",
          cli("strategy=fbcache", "schedule=interval"), 2, "needs schedule._target_", nothing_written),
    Fault("mask of the wrong length", "schedule=mask schedule.mask=[true,false]",
          cli("schedule=mask", "schedule.mask=[true,false]"), 2, "schedule.mask has 2 entries", nothing_written),
    Fault("missing calibration", "strategy=magcache schedule.calibration=/nowhere.json",
          cli("strategy=magcache", "schedule.calibration=/nowhere.json"), 2, "schedule.calibration='/nowhere.json'",
          nothing_written),
    Fault("chunk size zero", "job=sample job.batch_size=0", cli("job=sample", "job.batch_size=0"), 2,
          "job.batch_size=0 is out of range", nothing_written),
    Fault("pipeline without a path", "model=diffusers", cli("model=diffusers"), 2, "model.path is required",
          nothing_written),
    Fault("not a checkpoint", "+model.checkpoint=<random bytes>",
          with_checkpoint("import os; checkpoint.write_bytes(os.urandom(4096))"), 2,
          "is not a readable torch checkpoint", all_of(nothing_written, no_traceback)),
    Fault("checkpoint of another shape", "+model.checkpoint=<a DiT-S/2 of another input size>",
          with_checkpoint("import torch; from cachelab.models.dit import dit_from_preset; "
                          "torch.save(dit_from_preset('DiT-S/2', input_size=16).state_dict(), checkpoint)"), 2,
          "does not fit: expected a state dict of", all_of(nothing_written, no_traceback)),
    # at run time
    Fault("overflowing guidance", "model=tiny_dit model.guidance_scale=1e38",
          cli("model=tiny_dit", "model.guidance_scale=1e38"), 0, "",
          metrics_say(lambda m: m["non_finite"] and m["guard_fallbacks"] > 0, "no non_finite flags / guard fallbacks")),
    Fault("non-finite forecast, guard=raise", "model=tiny_dit model.guidance_scale=1e38 guard=raise",
          cli("model=tiny_dit", "model.guidance_scale=1e38", "guard=raise"), 2, "error: ", no_traceback),
    Fault("infinite PSNR", "strategy=none (identical images)", cli("strategy=none"), 0, "",
          metrics_say(lambda m: m["quality"]["psnr_db"] is None and m["non_finite"]["quality/psnr_db"] == "inf",
                      "PSNR not null + flagged")),
    Fault("order not reached", "order=8 interval=3 num_steps=10", cli("order=8", "interval=3", "num_steps=10"), 0, "",
          metrics_say(lambda m: m["order_reached"]["max"] < 8, "order_reached says 8")),
    Fault("segfault in a sweep", "-m seed=0,1,2 (job 1 segfaults)", cli(*FAULTY, "seed=0,1,2", sweep=True, faults="1=segv"),
          1, "killed by SIGSEGV", all_of(sweep_summary(1), no_traceback)),
    Fault("exception in a sweep", "-m seed=0,1 (job 1 raises)", cli(*FAULTY, "seed=0,1", sweep=True, faults="1=raise"),
          1, "RuntimeError", sweep_summary(1)),
    Fault("hung job in a sweep", "-m seed=0,1 job_timeout_s=20 (job 1 hangs)",
          cli(*FAULTY, "seed=0,1", "job_timeout_s=20", sweep=True, faults="1=hang"), 1, "timed out after 20 s",
          sweep_summary(1)),
    Fault("disk full", "a run whose every fsync fails with ENOSPC", cli(*FAULTY, faults="0=enospc"), 2,
          "No space left on device", all_of(nothing_written, no_traceback, no_half_files)),
    Fault("run folder under a file", "hydra.run.dir=/etc/hostname/run", cli(where="hydra.run.dir=/etc/hostname/run"),
          2, "error: cannot write /etc/hostname", no_traceback),
    Fault("SIGINT", "Ctrl-C during job=sample", interrupted(signal.SIGINT), 130, "rerun the same command",
          all_of(no_traceback, no_half_files, chunks_complete)),
    Fault("SIGTERM", "kill during job=sample", interrupted(signal.SIGTERM), 143, "interrupted",
          all_of(no_traceback, no_half_files, chunks_complete)),
    Fault("two runs into one folder", "a second job=sample run into the folder a first one holds", concurrent, 2,
          "run.lock", no_traceback),
    Fault("caller changes the output in place", "a sampler adding to the model output in place (reuse)",
          python("""
              import sys, torch, cachelab
              from cachelab.core.strategy import Strategy
              from cachelab.core.schedules import Interval
              from cachelab.strategies.reuse import Reuse
              model = torch.nn.Sequential(torch.nn.Linear(2, 2))
              seen = []
              with cachelab.apply(model, Strategy("reuse", Reuse(), Interval(10, 1), "output")) as handle:
                  with handle.generation(4):
                      for s in range(4):
                          handle.step(s)
                          out = model(torch.ones(1, 2))
                          seen.append(float(out.sum()))
                          out.add_(100)  # the caller's own in-place change
              if len(set(seen)) != 1:
                  print(f"error: the cache was changed in place: {seen}", file=sys.stderr); sys.exit(1)
          """), 0, ""),
    # the Python API
    Fault("unknown key in apply", "cachelab.apply(model, 'taylor', ordr=2)",
          python("""
              import sys, torch, cachelab
              try:
                  cachelab.apply(torch.nn.Linear(2, 2), "taylor", ordr=2)
              except cachelab.ConfigError as err:
                  print(f"error: {err}", file=sys.stderr); sys.exit(2)
          """), 2, "ordr= is not a key of strategy='taylor'"),
    Fault("model without blocks", "cachelab.apply(nn.Sequential(...), 'taylor', granularity='block')",
          python("""
              import sys, torch, cachelab
              model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
              handle = cachelab.apply(model, "taylor", granularity="block")
              try:
                  with handle.generation(4):
                      handle.step(0); model(torch.randn(1, 4))
              except cachelab.ConfigError as err:
                  print(f"error: {err}", file=sys.stderr); sys.exit(2)
          """), 2, "Sequential has no discoverable blocks"),
    Fault("undriven model", "a model called outside handle.generation()",
          python("""
              import warnings, torch, cachelab
              from cachelab.models.dit import DiT
              model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                          num_classes=10, learn_sigma=False)
              handle = cachelab.apply(model, "taylor")
              model(torch.randn(1, 1, 8, 8), torch.tensor([5]), torch.tensor([1]))
          """), 0, "was called outside a generation, so it ran without caching"),
]


def run_all(faults: list[Fault]) -> list[tuple[Fault, list[str], Outcome | None, float]]:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for i, fault in enumerate(faults):
            folder = Path(scratch) / f"{i:02d}"
            start = time.perf_counter()
            try:
                outcome = fault.run(folder)
            except Exception as err:  # the harness itself: a fault that hangs past its timeout
                rows.append((fault, [f"{type(err).__name__}: {err}"], None, time.perf_counter() - start))
                continue
            lines = [line for line in outcome.stderr.splitlines() if fault.message and fault.message in line]
            problems = [] if outcome.code == fault.code else [f"exit {outcome.code}, expected {fault.code}"]
            if fault.message and not lines:
                problems.append(f"no line with {fault.message!r} on stderr")
            problems += fault.check(outcome)
            rows.append((fault, problems, outcome, time.perf_counter() - start))
            print(f"{'held' if not problems else 'BROKEN'}: {fault.name} ({time.perf_counter() - start:.1f} s)"
                  + ("" if not problems else f": {'; '.join(problems)}"), flush=True)
    return rows


def table(rows) -> str:
    lines = ["| fault | cause | exit | the one line (stderr) | held |", "| --- | --- | ---: | --- | --- |"]
    for fault, problems, outcome, _ in rows:
        said = next((line for line in (outcome.stderr.splitlines() if outcome else [])
                     if fault.message and fault.message in line), "")
        said = said.replace("|", "\\|")[:160]
        lines.append(f"| {fault.name} | `{fault.cause}` | {outcome.code if outcome else '-'} | {said} | "
                     f"{'yes' if not problems else 'NO: ' + '; '.join(problems)} |")
    held = sum(not problems for _, problems, _, _ in rows)
    return "\n".join(lines) + f"\n\nfaults {held}/{len(rows)} held\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated fault names")
    parser.add_argument("--out", type=Path, default=None, help="write the table (Markdown) here too")
    args = parser.parse_args()
    chosen = [f for f in FAULTS if not args.only or f.name in args.only.split(",")]
    start = time.perf_counter()
    rows = run_all(chosen)
    text = table(rows)
    print(text, end="")
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.out:
        args.out.write_text(text)
    sys.exit(0 if all(not problems for _, problems, _, _ in rows) else 1)


if __name__ == "__main__":
    main()
