"""What discovery finds, written per model, so that two checkouts can be compared line by line:
every zoo specimen (one forward at the middle of its timestep range) and every tiny pipeline of
``conf/model`` (the adapter's own discovery call; Wan 2.2: both experts) and the converted DiT.
Each line: the stacks, the module sites, the probes and the site patterns at every granularity
(an error as its message). Run it from a checkout to record that checkout's ``cachelab``:

    python -m train_free_runs.coverage.discovery_diff dump OUT.jsonl
    python -m train_free_runs.coverage.discovery_diff compare BEFORE.jsonl AFTER.jsonl
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import torch

from cachelab.io import write_bytes_atomic

PIPELINES = ["tiny_diffusers_dit", "tiny_pixart", "tiny_sd3", "tiny_flux", "tiny_wan", "tiny_hunyuan_video",
             "tiny_qwenimage", "tiny_wan22"]


def described(found) -> dict:
    """The stacks, module sites, probes and patterns of a ``DiscoveredSites`` (addresses blanked)."""
    def text(value) -> str:
        return re.sub(r"0x[0-9a-f]+", "0x", repr(value))

    record = {"stacks": [text(s) for s in found.stacks], "module_sites": list(found.module_sites),
              "probes": {name: text(pattern) for name, pattern in sorted(found.probes.items())}}
    for granularity in ("module", "block", "stack", "output"):
        try:
            record[granularity] = text(list(found.site_patterns(granularity)))
        except Exception as err:  # noqa: BLE001 -- a refused granularity is part of what was found
            record[granularity] = f"{type(err).__name__}: {err}"
    return record


def records():
    """(name, record) per model."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from cachelab.models.convert_dit import ConvertedDiTAdapter
    from cachelab.models.discovery import discover
    from train_free_runs.coverage import zoo

    for name, spec in zoo.SPECIMENS.items():
        model = spec.build()
        inputs = spec.inputs(2, sum(spec.timestep_range) / 2)
        yield name, described(discover(model, lambda: model(**inputs, return_dict=False)))
    scratch = Path(tempfile.mkdtemp())
    for family in PIPELINES:
        cfg = OmegaConf.load(Path("conf/model") / f"{family}.yaml")
        cfg.merge_with({"path": str(scratch / family), "num_steps": 6, "device": "cpu"})
        adapter = instantiate(cfg)
        record = described(adapter.discovered)
        if adapter.experts:
            record["experts"] = {expert: described(sites.discovered) for expert, sites in adapter.experts.items()}
        yield f"pipeline:{family}", record
    adapter = ConvertedDiTAdapter(name="converted", weights="tiny_dit_mnist", num_steps=20, guidance_scale=1.5)
    yield "converted_dit", described(adapter.discovered)


def compare(before: Path, after: Path) -> None:
    def read(path):
        return {(line := json.loads(text))["name"]: line for text in path.read_text().splitlines()}

    old, new = read(before), read(after)
    print(f"{len(old)} models before, {len(new)} after; only before: {sorted(set(old) - set(new))}, "
          f"only after: {sorted(set(new) - set(old))}")
    for name in old.keys() & new.keys():
        changed = sorted(key for key in old[name].keys() | new[name].keys() if old[name].get(key) != new[name].get(key))
        if changed:
            print(f"{name}: {', '.join(changed)} differ")
            for key in changed:
                print(f"  {key}: {old[name].get(key)}\n  -> {new[name].get(key)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dump").add_argument("out", type=Path)
    both = sub.add_parser("compare")
    both.add_argument("before", type=Path)
    both.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "compare":
        compare(args.before, args.after)
        return
    torch.set_num_threads(1)
    lines = [json.dumps({"name": name, **record}, sort_keys=True) + "\n" for name, record in records()]
    write_bytes_atomic(args.out, "".join(lines).encode())


if __name__ == "__main__":
    main()
