"""How often the tuner's choice holds on held-out inputs: per tuned run (train_free_runs/search/
<model>_<target>/tune.json), the PSNR it verified on the tuning split against the PSNR the lead
benchmark measured on the held-out split (train_free_runs/search/benchmark_<model>/benchmark.csv),
with the FLOPs speedups; then each run's choice and cost; printed as markdown tables.

    python train_free_runs/search/holds.py          (from the repository root)
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    print("| model | target | chosen | tuning FLOPs | tuning PSNR (16 img) | held-out FLOPs | held-out PSNR (64 img) [95 %] "
          "| holds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    held, total = 0, 0
    for path in sorted(HERE.glob("*_psnr_*/tune.json")):
        result = json.loads(path.read_text())
        chosen = result["chosen"]
        if chosen is None:
            continue
        (key, value), = result["target"].items()
        csv_path = HERE / f"benchmark_{result['model']}" / "benchmark.csv"
        rows = list(csv.DictReader(csv_path.open())) if csv_path.is_file() else []
        row = next((r for r in rows if r["split"] == "held_out" and r["tool"] == "cachelab tuned"
                    and r["setting"].endswith(" ".join(f"{k}={v}" for k, v in chosen["knobs"].items()))), None)
        v = chosen["verified"]
        if row is None:
            cells = "not selected by the benchmark | - | -"
        else:
            total += 1
            holds = float(row["psnr"]) >= value
            held += holds
            cells = (f"{float(row['flops_speedup']):.2f}x | {float(row['psnr']):.2f} [{float(row['psnr_low']):.2f}, "
                     f"{float(row['psnr_high']):.2f}] | {'yes' if holds else 'no'}")
        print(f"| {result['model']} | {key} {value:g} | {chosen['setting']} | {v['speedup']:.2f}x | {v['psnr_db']:.2f} | "
              f"{cells} |")
    print(f"\n{held} of {total} choices measured on the held-out split reach their target there.\n")
    print("| model | target | chosen | tuning FLOPs / PSNR (16 img) | generations run | seconds | measurements reused "
          "| load at the end |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in sorted(HERE.glob("*_*/tune.json")):
        result = json.loads(path.read_text())
        (key, value), = result["target"].items()
        chosen, total_cost = result["chosen"], result["cost"]["total"]
        verified = f"{chosen['verified']['speedup']:.2f}x / {chosen['verified']['psnr_db']:.2f} dB" if chosen else "-"
        print(f"| {result['model']} | {key} {value:g} | {chosen['setting'] if chosen else 'none met'} | {verified} | "
              f"{total_cost['runs']} | {total_cost['seconds']:.0f} | {result['probes']['reused']} | "
              f"{result['machine'].split('load ')[1].split(' at')[0]} |")


if __name__ == "__main__":
    main()
