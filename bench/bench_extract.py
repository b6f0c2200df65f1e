"""Extraction throughput (images/s): pixel mode on CIFAR-10 read from its archive (--data), and with
--device cuda latent mode at 256 px through a VAE with the full sd-vae-ft-ema architecture (random
weights built from its config: same compute as the real one, which cannot be downloaded here).

  python -m bench.bench_extract                                  # pixel mode, CPU
  python -m bench.bench_extract --device cuda --latent-per-class 500
"""
import argparse
import os
import tempfile
import time

import torch

import extract_latents
from config import HelpFormatter

# AutoencoderKL config of stabilityai/sd-vae-ft-ema (8x downsampling, 4 latent channels, ~84M parameters).
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=256)


def timed_extract(args):
    start = time.perf_counter()
    extract_latents.main([str(a) for a in args])
    return time.perf_counter() - start


def main(argv=None):
    """Print the table; return its rows as dicts (benchmark, setting, figure, unit, extra)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--data", default="data/cifar10-jpeg.tar.gz",
                        help="CIFAR-10 as JPEG files in ImageNet folder layout (train/<class>/*.jpg, test/<class>/*.jpg), "
                             "as an archive (.tar.gz, .tar, .zip) or a folder (default: %(default)s, from the repository root)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda adds the latent-mode run")
    parser.add_argument("--pixel-per-class", type=int, default=1000, help="CIFAR-10 train images per class, pixel mode")
    parser.add_argument("--latent-per-class", type=int, default=200, help="images per class, latent mode at 256 px")
    parser.add_argument("--batch-size", type=int, default=64, help="images per decode/encode batch")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="decode processes")
    args = parser.parse_args(argv)
    if not os.path.exists(args.data):
        raise SystemExit(f"bench_extract: {args.data} not found: CIFAR-10 JPEGs are needed (see --data in --help)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n = 10 * args.pixel_per_class
        secs = timed_extract(["--data", args.data, "--split", "train", "--limit-per-class", args.pixel_per_class,
                              "--image-size", 32, "--vae", "none", "--flip", "--num-workers", args.num_workers,
                              "--batch-size", args.batch_size, "--out", os.path.join(tmp, "pixels")])
        rows.append(("pixels 32px +flip (CIFAR-10 tar.gz)", "cpu", n, secs))
        if args.device == "cuda":
            from diffusers import AutoencoderKL
            torch.manual_seed(0)
            vae = AutoencoderKL(**SD_VAE_CONFIG)
            vae_dir = os.path.join(tmp, "sd-vae-random")
            vae.save_pretrained(vae_dir)
            # The encoder alone on a synthetic batch: the ceiling the data pipeline is measured against.
            enc = vae.to("cuda").eval()
            x = torch.randn(args.batch_size, 3, 256, 256, device="cuda")
            with torch.inference_mode():
                for _ in range(2):
                    enc.encode(x)
                torch.cuda.synchronize()
                start, reps = time.perf_counter(), 5
                for _ in range(reps):
                    enc.encode(x).latent_dist.mean.cpu()
                torch.cuda.synchronize()
            rows.append((f"VAE encode only, batch {args.batch_size}, fp32", "cuda", reps * args.batch_size,
                         time.perf_counter() - start))
            del enc, vae
            torch.cuda.empty_cache()
            n = 10 * args.latent_per_class
            secs = timed_extract(["--data", args.data, "--split", "train", "--limit-per-class", args.latent_per_class,
                                  "--image-size", 256, "--vae", vae_dir, "--flip", "--num-workers", args.num_workers,
                                  "--batch-size", args.batch_size, "--out", os.path.join(tmp, "latents")])
            rows.append(("latents 256px +flip (CIFAR-10 upscaled)", "cuda", n, secs))
    print(f"\n| {'run':<42} | device | images | seconds | images/s |")
    print(f"|{'-' * 44}|--------|--------|---------|----------|")
    for name, device, count, secs in rows:
        print(f"| {name:<42} | {device:<6} | {count:>6} | {secs:>7.1f} | {count / secs:>8.1f} |")
    print(f"\n{torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs, {args.num_workers} decode workers; "
          f"flip encodes 2 views per image")
    return [{"benchmark": "extract", "setting": f"{name}, {device}", "figure": round(count / secs, 1),
             "unit": "img/s", "extra": f"{count} images in {secs:.1f} s"} for name, device, count, secs in rows]


if __name__ == "__main__":
    main()
