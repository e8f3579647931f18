"""Train the digit judge (a small CNN) on the train split and ship it with reference statistics.

    python -m cachelab.jobs.train_classifier

Trains on the 4,000-digit train split with small random shifts, reports accuracy on the
1,000 held-out digits, and writes into ``cachelab/assets/``: ``digit_classifier`` (weights,
manifest with the held-out accuracy) and ``digit_reference_stats`` (mean and covariance of the
classifier's features over all 5,000 real digits, for the Fréchet distance).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cachelab.jobs.shipping import write_asset
from cachelab.evaluation.digits import load_digits32
from cachelab.evaluation.judge import DigitClassifier, classify, gaussian_stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background -1 fills in)."""
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_x, train_y = load_digits32("train")
    test_x, test_y = load_digits32("heldout")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(train_x) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    for _ in tqdm(range(args.epochs), desc="train digit classifier"):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for batch in order.split(args.batch_size)[: len(train_x) // args.batch_size]:
            loss = F.cross_entropy(model(random_shift(train_x[batch], generator)), train_y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    predicted, _ = classify(model, test_x)
    accuracy = (predicted == test_y).float().mean().item()
    print(f"held-out accuracy: {accuracy:.4f} on {len(test_y)} digits")
    all_x, _ = load_digits32("all")
    mu, cov = gaussian_stats(classify(model, all_x)[1])
    command = "python -m cachelab.jobs.train_classifier " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    write_asset("digit_classifier", model.state_dict(), {
        "kind": "DigitClassifier", "command": command, "train_args": vars(args),
        "data": "train split of load_digits32 (4,000 digits); held-out split 1,000 digits (100 per class)",
        "heldout_accuracy": accuracy,
    })
    write_asset("digit_reference_stats", {"mu": mu, "cov": cov}, {
        "kind": "gaussian feature statistics", "command": command,
        "data": "all 5,000 digits of load_digits32, DigitClassifier.features (128-d)", "num_samples": len(all_x),
    })


if __name__ == "__main__":
    main()
