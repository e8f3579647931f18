"""cachelab against other tools' caching, in one process, on the same FLUX pipeline and
seeds: wall time, FLOPs, the wall-time ratio cachelab / peer, cache memory, full steps, and
rel-L2 / PSNR against full compute (and rel-L2 between the two tools).

    python train_free_runs/peers/benchmark.py --repeats 5 --out train_free_runs/peers/results.md
    python train_free_runs/peers/benchmark.py --only magcache,pab --repeats 1   # some pair families

The pipeline has tiny text encoders and a random FLUX transformer of a measurable size
(``--layers``/``--width``); it is built once into ``--folder`` and loaded through
``from_pretrained``. Each pair (:mod:`train_free_runs.bench.peers`) uses settings that mean the same
thing in both tools. The peers are diffusers' own hooks and, when installed
(``pip install -e ".[peers]"``), cache-dit; without it its rows are skipped.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from train_free_runs.bench import peers  # noqa: E402
from train_free_runs.bench.timing import machine, median_seconds, seconds  # noqa: E402
from cachelab.evaluation.flops import count_flops  # noqa: E402
from cachelab.io import write_bytes_atomic  # noqa: E402
from cachelab.evaluation.metrics import psnr, relative_l2  # noqa: E402
from cachelab.models.pipelines.flux import FluxAdapter  # noqa: E402
from cachelab.models.pipelines.flux_digits import FluxDigitsAdapter  # noqa: E402

FAMILIES = ("taylorseer", "fbcache", "magcache", "pab", "dbcache")
TAYLORSEER = [dict(interval=5, warmup=3, order=order) for order in (1, 2)]
# 0.1 never skips on this random transformer (its first block's residual changes by more
# than 10 % every step): the rows measure the bookkeeping of full steps; the others skip.
FBCACHE = [0.1, 0.45, 0.6]
MAGCACHE = [dict(threshold=0.06, max_skip=3, retention=0.2),   # diffusers' defaults
            dict(threshold=0.24, max_skip=5, retention=0.1)]   # MagCache4FLUX's
PAB = [dict(interval=2, window=(100, 800)), dict(interval=3, window=(100, 800))]  # diffusers' default window
DBCACHE = [dict(threshold=0.45), dict(threshold=0.45, order=1), dict(threshold=0.45, order=2)]


def build_pipeline(folder: Path, layers: int, width: int) -> None:
    """A FLUX pipeline with ``layers`` double and ``2 * layers`` single blocks of ``width``."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    if (folder / "model_index.json").is_file():
        return
    torch.manual_seed(0)
    components = FluxAdapter.tiny_components(folder.parent / "scratch")
    heads = width // 64
    components["transformer"] = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=2 * layers, attention_head_dim=64,
        num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[16, 24, 24])
    FluxPipeline(**components).save_pretrained(folder)


def build_pairs(families: list[str], adapter: FluxAdapter, inputs, folder: Path) -> list[peers.Pair]:
    """The pairs of ``families``, in the order of :data:`FAMILIES`. MagCache first calibrates
    the magnitude ratios with diffusers' calibration mode (one generation of ``inputs``) into
    ``folder``; both tools read that file."""
    pairs = []
    if "taylorseer" in families:
        pairs += [peers.taylorseer(adapter, **setting) for setting in TAYLORSEER]
    if "fbcache" in families:
        pairs += [peers.fbcache(adapter, threshold) for threshold in FBCACHE]
    if "magcache" in families:
        ratios = peers.diffusers_mag_ratios(adapter, inputs)
        calibration = peers.write_mag_ratios(folder / f"magcache_diffusers_{adapter.num_steps}.json", adapter, ratios)
        pairs += [peers.magcache(adapter, str(calibration), **setting) for setting in MAGCACHE]
    if "pab" in families:
        pairs += [peers.pab(adapter, **setting) for setting in PAB]
    if "dbcache" in families:
        if peers.cache_dit_available():
            pairs += [peers.dbcache(adapter, **setting) for setting in DBCACHE]
        else:
            print('cache-dit is not installed (pip install -e ".[peers]"): the DBCache rows are skipped')
    return pairs


@dataclass
class Measured:
    """One tool on one setting: median wall time, FLOPs, and an observed generation."""

    wall: float
    flops: int
    seen: peers.Observation


def observed(adapter: FluxAdapter, inputs, probe: str, wall: float, handle=None, held=None) -> Measured:
    """``wall`` with the FLOPs of, and an observation (:func:`train_free_runs.bench.peers.observe`) of, one generation."""
    _, flops = count_flops(lambda: adapter.generate(inputs, handle))
    return Measured(wall, flops, peers.observe(adapter, inputs, probe, handle, held))


def run_pair(pair: peers.Pair, adapter: FluxAdapter, inputs, repeats: int) -> tuple[Measured, Measured]:
    """The peer and cachelab on one setting, timed alternately generation by generation
    (peer, cachelab, peer, ...; the first round untimed) so that the machine's drift hits
    both alike; each attached only around its own generations. Then each tool's FLOPs and
    observation."""
    cpu = torch.device("cpu")
    peer_times, our_times = [], []
    for round_ in range(repeats + 1):
        with pair.peer():
            peer_wall = seconds(lambda: adapter.generate(inputs), cpu)
        handle = pair.ours()
        try:
            our_wall = seconds(lambda: adapter.generate(inputs, handle), cpu)
        finally:
            handle.remove()
        if round_:
            peer_times.append(peer_wall)
            our_times.append(our_wall)
    with pair.peer():
        peer = observed(adapter, inputs, pair.probe, median(peer_times), held=pair.peer_bytes)
    handle = pair.ours()
    try:
        ours = observed(adapter, inputs, pair.probe, median(our_times), handle,
                        held=lambda: handle.stats().cache_bytes)
    finally:
        handle.remove()
    return peer, ours


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["random", "tiny_flux_digits"], default="random",
                        help="random: a random FLUX of --layers/--width; tiny_flux_digits: the shipped trained one")
    parser.add_argument("--folder", type=Path, default=Path.home() / ".cache/cachelab/peers_flux")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=",".join(FAMILIES), help=f"pair families, comma-separated: {','.join(FAMILIES)}")
    parser.add_argument("--out", type=Path, default=None, help="write the table (Markdown) here too")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"--only: unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
                     f"allowed: {', '.join(FAMILIES)}")
    torch.set_num_threads(args.threads)
    if args.model == "random":
        build_pipeline(args.folder, args.layers, args.width)
        adapter = FluxAdapter("peers_flux", str(args.folder), num_steps=args.steps, guidance_scale=3.5,
                              call_kwargs={"height": args.resolution, "width": args.resolution,
                                           "max_sequence_length": 32})
    else:  # the trained pipeline: real feature dynamics; its prompts ask for digits 0, 1, ...
        adapter = FluxDigitsAdapter(args.model, num_steps=args.steps, guidance_scale=3.5)
        args.folder.mkdir(parents=True, exist_ok=True)
    inputs = adapter.make_inputs(args.images, seed=0)
    adapter.generate(inputs)  # warm-up
    cpu = torch.device("cpu")
    base = observed(adapter, inputs, peers.stack_probe(adapter),
                    median_seconds(lambda: adapter.generate(inputs), cpu, args.repeats))
    pairs = build_pairs(families, adapter, inputs, args.folder)
    rows = [Row("no caching", "-", base, base)]
    for pair in pairs:
        peer, ours = run_pair(pair, adapter, inputs, args.repeats)
        rows += [Row(pair.setting, pair.tool, peer, base), Row(pair.setting, "cachelab", ours, base, peer)]
        if ours.seen.full_steps != peer.seen.full_steps:
            print(f"{pair.setting}: the tools' full steps differ: {pair.tool} {peer.seen.full_steps}, "
                  f"cachelab {ours.seen.full_steps}")
    table = markdown(rows, args)
    print(table)
    if args.out:
        write_bytes_atomic(args.out, table.encode())


@dataclass
class Row:
    """One line of the table: ``tool`` on ``setting``, against full compute ``base``
    (and, for cachelab, against the ``peer`` on the same setting)."""

    setting: str
    tool: str
    measured: Measured
    base: Measured
    peer: Measured | None = None

    def cells(self, steps: int) -> list[str]:
        m, base, peer, cached = self.measured, self.base, self.peer, self.measured is not self.base
        return [self.setting, self.tool, f"{m.wall:.3f}", f"{base.wall / m.wall:.2f}",
                "" if peer is None else f"**{m.wall / peer.wall:.3f}**", f"{base.flops / m.flops:.2f}",
                f"{len(m.seen.full_steps)}/{steps}", f"{m.seen.held_bytes / 2**20:.2f}",
                f"{relative_l2(m.seen.output, base.seen.output):.2e}" if cached else "",
                f"{psnr(m.seen.output, base.seen.output):.1f}" if cached else "",
                "" if peer is None else f"{relative_l2(m.seen.output, peer.seen.output):.2e}"]


def markdown(rows: list[Row], args) -> str:
    model = (f"FLUX {args.layers}+{2 * args.layers} blocks, width {args.width}, {args.resolution}^2"
             if args.model == "random" else f"{args.model} (trained, shipped)")
    lines = [f"Machine: {machine(torch.device('cpu'))}, torch "
             f"{torch.__version__}; {model}, {args.steps} steps, {args.images} images, median of {args.repeats} alternating rounds.", "",
             "| setting | tool | wall (s) | wall speedup | cachelab / peer wall | FLOPs speedup | full steps | "
             "cache MiB | rel-L2 | PSNR (dB) | rel-L2 to peer |", "| --- " * 11 + "|"]
    lines += ["| " + " | ".join(row.cells(args.steps)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
