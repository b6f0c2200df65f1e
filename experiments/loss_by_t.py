"""Held-out denoising error of a trained model at each noise level: where along the schedule a loss
weighting has spent the network's capacity.

N held-out images (a fixed random subset of a store made by extract_latents.py) are noised at K
timesteps spread evenly over [0, T), each image with one fixed ε, and the EMA network's prediction is
converted to x0. Reported per timestep: the x0-space MSE ‖x0 − x̂0‖² (mean over C·H·W, then over the
images) and its standard error. With the same --seed every checkpoint sees the same images, noise and
timesteps, so two models compare pairwise; their ratio at a timestep is the same in ε-, v- or x0-space
(‖ε − ε̂‖² = SNR·‖x0 − x̂0‖², ‖v − v̂‖² = (SNR+1)·‖x0 − x̂0‖², factors that depend on t only).

    python -m experiments.loss_by_t --ckpt results/cifar10/checkpoints/step-0100000.pt \
        --data data/cifar10-test --num-images 256 --timesteps 20 --out loss_by_t.json

Latent stores give their posterior mean (no sampling) in model space (store.Store.read_model).
"""
import argparse
import json
import math
import sys

import torch
from tqdm import tqdm

from config import HelpFormatter
from diffusion import respace_timesteps
from distributed import DiskFullError, atomic_write
from export import ExportError, load_export
from store import StoreError, held_out_batch, open_store


def fail(message):
    sys.exit(f"loss_by_t.py: error: {message}")


@torch.no_grad()
def x0_mse_by_t(model_fn, diffusion, x0, labels, timesteps, noise, batch_size):
    """Per-sample x0-space MSE of model_fn's prediction at each timestep -> float64 [K, N].

    model_fn(x_t, t, y) returns the raw network output (learned-σ channels are dropped here)."""
    out = torch.empty(len(timesteps), len(x0), dtype=torch.float64)
    for k, step in enumerate(timesteps):
        for start in range(0, len(x0), batch_size):
            x0_b, eps_b = x0[start:start + batch_size], noise[start:start + batch_size]
            t = torch.full((len(x0_b),), int(step), dtype=torch.long, device=x0.device)
            x_t = diffusion.q_sample(x0_b, t, eps_b)
            pred, _ = diffusion.split_output(model_fn(x_t, t, labels[start:start + batch_size]).float())
            x0_hat, _ = diffusion.to_x0_eps(pred, x_t, t)
            out[k, start:start + len(x0_b)] = ((x0_hat - x0_b) ** 2).flatten(1).mean(1).double().cpu()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="exported checkpoint (train.py)")
    p.add_argument("--data", required=True, help="held-out store (extract_latents.py), same kind as the training data")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of the export")
    p.add_argument("--num-images", type=int, default=256, help="held-out images, each at every timestep")
    p.add_argument("--timesteps", type=int, default=20, help="K timesteps evenly spaced over [0, T), ends included")
    p.add_argument("--seed", type=int, default=0, help="picks the images and their noise")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--out", required=True, help="JSON file")
    args = p.parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1:
        fail("--num-images and --batch-size must be at least 1")

    try:
        model, diffusion, _, scale_factor, _ = load_export(args.ckpt, args.weights)
        store = open_store(args.data, mode="pixels" if scale_factor is None else "latents")
    except (ExportError, StoreError) as e:
        fail(str(e))
    if store.scale_factor != scale_factor:
        fail(f"{args.data} holds latents at scale {store.scale_factor}, the model was trained at {scale_factor}")
    model = model.to(args.device).eval()
    model_shape = [model.in_channels, model.input_size, model.input_size]
    if list(store.manifest["shape"]) != model_shape:
        fail(f"{args.data} holds items of shape {store.manifest['shape']}, the model takes {model_shape}")
    if not 2 <= args.timesteps <= diffusion.num_timesteps:
        fail(f"--timesteps must be in [2, {diffusion.num_timesteps}], got {args.timesteps}")

    try:
        x0, labels = held_out_batch(store, args.num_images, args.seed)
    except StoreError as e:
        fail(str(e))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed + 1))
    timesteps = respace_timesteps(diffusion.num_timesteps, args.timesteps)
    x0, labels, noise = x0.to(args.device), labels.to(args.device), noise.to(args.device)
    mse = x0_mse_by_t(model, diffusion, x0, labels, tqdm(timesteps, desc="timesteps"), noise, args.batch_size)

    result = {"ckpt": str(args.ckpt), "weights": args.weights, "data": str(args.data), "num_images": args.num_images,
              "seed": args.seed,
              "t": [int(t) for t in timesteps], "snr": [float(diffusion.snr[t]) for t in timesteps],
              "x0_mse": mse.mean(1).tolist(), "x0_mse_se": (mse.std(1) / math.sqrt(mse.shape[1])).tolist()}
    try:
        atomic_write(args.out, lambda f: f.write(json.dumps(result, indent=1).encode()))
    except DiskFullError as e:
        fail(str(e))
    print(f"wrote {args.out}: x0-MSE from {result['x0_mse'][0]:.3g} (t = 0) to {result['x0_mse'][-1]:.3g} "
          f"(t = {timesteps[-1]})")


if __name__ == "__main__":
    main()
