"""The tuner's choices against the uniform TaylorSeer frontier on the same images, and the
additivity check of the sensitivity runs (train_free_runs/tuner/README.md).

    python train_free_runs/tuner/compare.py <frontier sweep folder> <sensitivity.json> <tune folder>...

Prints markdown: the uniform frontier (orders 1-3, N=2..10), each tune's verified choice against
it, and per order and N the uniform run's measured PSNR against the sum of its groups' own MSEs."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from cachelab.analysis.sensitivity import psnr_from_mse as psnr
from cachelab.analysis.sweep import collect


def frontier(sweep: Path) -> list[dict]:
    """Every uniform run of the sweep: order, N, FLOPs speedup, PSNR, rel-L2."""
    runs = [{"order": m["order"], "N": m["interval"], "speedup": m["flops"]["speedup"],
             "psnr": m["quality"]["psnr_db"], "rel_l2": m["quality"]["rel_l2"]} for m in collect(sweep)[0]]
    return sorted(runs, key=lambda r: (r["order"], r["N"]))


def envelope(runs: list[dict], speedup: float) -> float:
    """The uniform frontier's PSNR at ``speedup``: linear between the Pareto points around it."""
    pareto = [r for r in runs if not any(o["speedup"] >= r["speedup"] and o["psnr"] > r["psnr"] for o in runs)]
    pareto.sort(key=lambda r: r["speedup"])
    for a, b in zip(pareto, pareto[1:]):
        if a["speedup"] <= speedup <= b["speedup"]:
            w = (speedup - a["speedup"]) / (b["speedup"] - a["speedup"]) if b["speedup"] > a["speedup"] else 0
            return a["psnr"] + w * (b["psnr"] - a["psnr"])
    return math.nan


def main() -> None:
    sweep, sensitivity, tunes = Path(sys.argv[1]), Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]
    runs = frontier(sweep)
    print("| order | N | FLOPs speedup | PSNR | rel-L2 |\n| --- | --- | --- | --- | --- |")
    for r in runs:
        print(f"| {r['order']} | {r['N']} | {r['speedup']:.2f}x | {r['psnr']:.1f} dB | {r['rel_l2']:.3g} |")
    print("\n| target | try | configuration | predicted -> measured FLOPs | speedup error | predicted -> measured PSNR "
          "| met | uniform frontier at that speedup | dominated by (uniform: at least as fast, better PSNR) "
          "| tuning runs / s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for folder in tunes:
        t = json.loads((folder / "tune.json").read_text())
        (key, value), = t["target"].items()
        for i, tr in enumerate(t["tries"]):
            p, m = tr["predicted"], tr["measured"]
            better = [r for r in runs if r["speedup"] >= m["speedup"] - 1e-9 and r["psnr"] > m["psnr_db"]]
            best = max(better, key=lambda r: (r["speedup"], r["psnr"]), default=None)
            dominated = "none" if best is None else (f"{len(better)}, e.g. o{best['order']} N={best['N']} "
                                                     f"({best['speedup']:.2f}x, {best['psnr']:.1f} dB)")
            cost = t["cost"]["total"]
            print(f"| {key} {value:g} | {i + 1} | {tr['setting']} | {p['speedup']:.2f}x -> {m['speedup']:.2f}x | "
                  f"{100 * abs(p['speedup'] / m['speedup'] - 1):.1g} % | {p['psnr_db']:.1f} -> {m['psnr_db']:.1f} dB | "
                  f"{'yes' if tr['met'] else 'no'} | {envelope(runs, m['speedup']):.1f} dB | {dominated} | "
                  f"{cost['runs']} / {cost['seconds']:.0f} |")
    tables = json.loads(sensitivity.read_text())["tables"]
    print("\n| order | N | uniform run PSNR (measured) | sum of the groups' own MSEs as PSNR | measured / summed MSE |")
    print("| --- | --- | --- | --- | --- |")
    for name, table in tables.items():
        for n, mse in table["uniform"]["mse"].items():
            summed = sum(row[n] for row in table["mse"].values())
            print(f"| {name[-1]} | {n} | {psnr(mse):.1f} dB | {psnr(summed):.1f} dB | {mse / summed:.2f} |")


if __name__ == "__main__":
    main()
