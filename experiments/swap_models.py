"""Which noise levels make two models' samples differ? Sample with one model at high noise and hand
the trajectory to another from timestep τ down, then compare FIDs.

Model --high predicts at every sampler step with t > τ, model --low at every step with t ≤ τ. The
samples, labels and noise are exactly those of `sample.py --out` with the same --seed, sampler and
number of images (sample i starts from the noise of (seed, i) and has label i % num_classes), so
--switch-t -1 reproduces --high's own sample.py batch and --switch-t 999 reproduces --low's. If the
hybrid scores like --low, the steps at t ≤ τ decide the difference in FID.

    python -m experiments.swap_models --high results/study-cpu/runs/eps-min_snr5-s0/checkpoints/step-0001000.pt \\
        --low results/study-cpu/runs/eps-snr-s0/checkpoints/step-0001000.pt --switch-t 105 \\
        --sampler ddim --steps 20 --clip-denoised --num-samples 250 --out swap.npz
    python evaluate.py swap.npz --ref results/study-cpu/ref/cifar10-train-500pc-stats.npz --no-pr

Pixel models, no guidance: the study's setting.
"""
import argparse
import sys

import numpy as np
import torch
from tqdm import tqdm

from config import HelpFormatter
from diffusion import generate
from distributed import DiskFullError, atomic_write
from export import ExportError, load_export
from store import model_to_images


def fail(message):
    sys.exit(f"swap_models.py: error: {message}")


class SwitchAtT(torch.nn.Module):
    """A DiT-like model(x, t, y) that runs `high` for t > tau and `low` for t ≤ tau."""

    def __init__(self, high, low, tau):
        super().__init__()
        self.high, self.low, self.tau = high, low, tau
        self.in_channels, self.input_size, self.num_classes = high.in_channels, high.input_size, high.num_classes

    def forward(self, x, t, y):
        # Every sample of a batch is at the same step in these samplers.
        return (self.low if int(t[0]) <= self.tau else self.high)(x, t, y)


def load(ckpt):
    try:
        model, diffusion, vae, _, _ = load_export(ckpt)
    except ExportError as e:
        fail(str(e))
    if vae is not None:
        fail(f"{ckpt} is a latent model; this experiment takes pixel models")
    return model.eval(), diffusion


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--high", required=True, help="exported checkpoint used at t > --switch-t")
    p.add_argument("--low", required=True, help="exported checkpoint used at t ≤ --switch-t")
    p.add_argument("--switch-t", type=int, required=True, help="τ (original timesteps, 0..T−1; −1 = never --low)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "heun"], default="ddim", help="as sample.py's")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic)")
    p.add_argument("--clip-denoised", action="store_true", help="clip predicted x0 to [-1, 1] (pixel models)")
    p.add_argument("--seed", type=int, default=0, help="sample i draws its noise from (seed, i)")
    p.add_argument("--num-samples", type=int, default=250, help="class-balanced samples")
    p.add_argument("--batch-size", type=int, default=125, help="samples per batch; does not change them")
    p.add_argument("--out", required=True, help=".npz (ADM layout)")
    args = p.parse_args(argv)
    if not args.out.endswith(".npz"):
        fail(f"--out must end in .npz, got {args.out}")

    high, diffusion = load(args.high)
    low, low_diffusion = load(args.low)
    for key in ("target", "schedule", "num_timesteps", "learn_sigma"):
        if getattr(diffusion, key) != getattr(low_diffusion, key):
            fail(f"the models differ in diffusion {key} ({getattr(diffusion, key)} vs "
                 f"{getattr(low_diffusion, key)}); their predictions cannot share one trajectory")
    if (high.in_channels, high.input_size, high.num_classes) != (low.in_channels, low.input_size, low.num_classes):
        fail("the models take different inputs (channels, size or classes)")
    model = SwitchAtT(high, low, args.switch_t)

    # sample.py's sampling (diffusion.generate), unguided and in fp32: what the study uses.
    images = []
    for lo in tqdm(range(0, args.num_samples, args.batch_size), unit="batch"):
        indices = range(lo, min(lo + args.batch_size, args.num_samples))
        x = generate(model, diffusion, indices, torch.tensor(indices) % model.num_classes, seed=args.seed,
                     sampler=args.sampler, steps=args.steps, eta=args.eta, clip_denoised=args.clip_denoised)
        images.append(model_to_images(x))
    labels = np.arange(args.num_samples, dtype=np.int64) % model.num_classes
    images = np.concatenate(images)
    try:
        atomic_write(args.out, lambda f: np.savez(f, arr_0=images, arr_1=labels))
    except DiskFullError as e:
        fail(str(e))
    print(f"saved {args.out}: {len(images)} images, --high above t = {args.switch_t}, --low at and below")


if __name__ == "__main__":
    main()
