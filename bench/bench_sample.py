"""
Sampling throughput (images/s) of sample.py's own code path, with random weights: the time does
not depend on the weights. Times --timed-steps sampler steps and extrapolates per image to the full
--steps (every step costs the same model calls), then times the VAE decode separately for latent
models (the full-size SD VAE architecture, random weights).

    python -m bench.bench_sample --model DiT-Ti/2 --image-size 64 --steps 250 --batch-size 8 --timed-steps 5
    python -m bench.bench_sample --model DiT-XL/2 --image-size 256 --sampler ddpm --steps 250 \
        --cfg-scale 1.5 --precision bf16 --batch-size 64 --timed-steps 10 --device cuda
"""
import argparse
import time

import torch

from bench.bench_extract import SD_VAE_CONFIG
from config import HelpFormatter
from diffusion import GaussianDiffusion, generate
from models import ALL_MODELS
from store import SD_VAE_SCALE_FACTOR, model_to_images


def model_calls(diffusion, args, steps):
    """How many model calls the sampler makes for `steps`, counted on a dummy model (so the count
    comes from diffusion.py itself, e.g. 2·steps − 1 for Heun)."""
    calls = 0

    def count(x, t):
        nonlocal calls
        calls += 1
        return torch.zeros(x.shape[0], x.shape[1] * (2 if args.learn_sigma else 1), *x.shape[2:])

    diffusion.sample(count, (1, 1, 1, 1), sampler=args.sampler, steps=steps, eta=args.eta)
    return calls


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


@torch.no_grad()
def run(args):
    """Print the figures; return them as one row (benchmark, setting, figure, unit, extra)."""
    device = torch.device(args.device)
    if args.precision == "tf32":
        torch.set_float32_matmul_precision("high")
    latent = args.mode == "latents"
    size = args.image_size // 8 if latent else args.image_size
    with device:  # build directly on the device: initializing DiT-XL/2 on a CPU takes longer than the benchmark
        model = ALL_MODELS[args.model](input_size=size, in_channels=4 if latent else 3, num_classes=args.num_classes,
                                       learn_sigma=args.learn_sigma, class_dropout_prob=0.1).to(device).eval()
    diffusion = GaussianDiffusion(learn_sigma=args.learn_sigma)
    indices = range(args.batch_size)
    labels = torch.arange(args.batch_size) % args.num_classes

    sampling = {k: getattr(args, k) for k in ("seed", "sampler", "eta", "cfg_scale", "cfg_channels")}

    def denoise(steps):
        return generate(model, diffusion, indices, labels, steps=steps, bf16=args.precision == "bf16", **sampling)

    full_steps = args.steps
    denoise(2)  # warm-up (the fewest steps every sampler takes): kernels, allocator, autotuning
    x, seconds = timed(lambda: denoise(args.timed_steps), device)
    per_call = seconds / model_calls(diffusion, args, args.timed_steps)
    denoise_s = per_call * model_calls(diffusion, args, full_steps) / args.batch_size  # per image

    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model} ({params / 1e6:.1f}M params) {args.mode} {args.image_size}px, {args.sampler}-{full_steps}, "
          f"cfg {args.cfg_scale}, batch {args.batch_size}, {device.type} {args.precision}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"denoise: {per_call * 1e3:.1f} ms per model call (timed {args.timed_steps} steps, extrapolated to "
          f"{full_steps}) -> {1 / denoise_s:.3f} images/s")
    total_s = denoise_s
    extra = f"denoise {1 / denoise_s:.3f} img/s ({per_call * 1e3:.1f} ms/model call, {args.timed_steps} steps timed)"
    if latent:
        from diffusers.models import AutoencoderKL

        with device:
            vae = AutoencoderKL(**SD_VAE_CONFIG).eval()
        model_to_images(x, vae, SD_VAE_SCALE_FACTOR)  # warm-up
        _, seconds = timed(lambda: model_to_images(x, vae, SD_VAE_SCALE_FACTOR), device)
        decode_s = seconds / args.batch_size
        total_s += decode_s
        print(f"VAE decode (SD-VAE architecture, fp32): {1 / decode_s:.2f} images/s")
        extra += f", VAE decode {1 / decode_s:.2f} img/s"
    print(f"total: {1 / total_s:.3f} images/s; 50,000 images would take {50_000 * total_s / 3600:.2f} h on this device")
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return [{"benchmark": "sample", "figure": round(1 / total_s, 3), "unit": "img/s",
             "setting": f"{args.model} {args.mode} {args.image_size}px {args.sampler}-{full_steps} cfg {args.cfg_scale} "
                        f"b{args.batch_size} {args.precision}{threads}",
             "extra": f"{extra}; 50k images: {50_000 * total_s / 3600:.2f} h"}]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2", choices=list(ALL_MODELS), metavar="NAME", help="models.py name")
    parser.add_argument("--mode", choices=["latents", "pixels"], default="latents", help="latents decode through a random-weight SD-sized VAE")
    parser.add_argument("--image-size", type=int, default=256, help="pixels (latents are 1/8)")
    parser.add_argument("--num-classes", type=int, default=1000, help="label table size")
    parser.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=True, help="DiT's learned variance")
    parser.add_argument("--sampler", choices=["ddpm", "ddim", "heun"], default="ddpm", help="as sample.py's")
    parser.add_argument("--steps", type=int, default=250, help="the full run's steps (extrapolated to)")
    parser.add_argument("--timed-steps", type=int, default=10, help="steps actually timed")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--cfg-channels", type=int, default=None, help="guide only the first N channels (default: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    parser.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32", help="as sample.py's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
