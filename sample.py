"""
Sample a trained class-conditional diffusion model: a PNG grid to look at, or a class-balanced
batch of images in ADM's .npz format (`arr_0` uint8 NHWC, `arr_1` int64 labels) for evaluate.py
and ADM's evaluator.

    # grid: one row per class
    python sample.py --ckpt results/export.pt --grid grid.png --classes 0,1,2 --per-class 8
    # FID batch on 8 GPUs; rerunning the same command resumes an interrupted run
    torchrun --nproc-per-node=8 sample.py --ckpt results/export.pt --num-samples 50000 \
        --cfg-scale 1.5 --out samples.npz
    # an official DiT checkpoint (a plain state dict): model, size and VAE come from flags
    python sample.py --ckpt DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 \
        --vae /path/to/sd-vae-ft-ema --cfg-scale 4 --grid dit.png --classes 207,360,387

Sample i's initial noise and all later noise come from its own generator seeded from
(--seed, i), and its label in the FID batch is i % num_classes, so a seed gives the same images
whatever the number of ranks or the batch size.
"""
import argparse
import json
import os
import shutil
import sys
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from config import HelpFormatter
from diffusion import generate
from distributed import DiskFullError, atomic_write, barrier, cleanup_distributed, init_distributed
from export import DIT_DEFAULTS, ExportError, load_export
from store import StoreError, load_vae, model_to_images, save_grid


def fail(message):
    sys.exit(f"sample.py: error: {message}")


def write_npz(f, shard_paths, shard_sizes, image_shape):
    """Write ADM's .npz (a zip of arr_0.npy and arr_1.npy, as np.savez makes it) one shard at a time:
    np.savez needs the whole array in memory, 9.8 GB for 50k images at 256 px."""
    num = sum(shard_sizes)
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, shape, dtype in (("arr_0", (num, *image_shape), np.uint8), ("arr_1", (num,), np.int64)):
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:  # zip64: arr_0 passes 4 GB
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                          "shape": shape}
                np.lib.format.write_array_header_1_0(member, header)
                for path, size in zip(shard_paths, shard_sizes):
                    with np.load(path) as shard:
                        array = shard[key]
                    if array.shape != (size, *shape[1:]) or array.dtype != dtype:
                        fail(f"{path}: {key} is {array.dtype} {list(array.shape)}, expected {np.dtype(dtype)} "
                             f"{[size, *shape[1:]]}; delete it and rerun")
                    member.write(np.ascontiguousarray(array).data)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except DiskFullError as e:
        fail(f"{e}: free space and rerun the same command"
             + ("" if args.grid else f" (finished shards in {args.out}.shards are kept)"))


@torch.no_grad()
def run(args):
    world = init_distributed()
    device = world.device
    if args.precision == "tf32":
        torch.set_float32_matmul_precision("high")

    try:
        model, diffusion, vae_id, scale_factor, class_names = load_export(
            args.ckpt, args.weights, model=args.model, image_size=args.image_size, num_classes=args.num_classes,
            learn_sigma=args.learn_sigma, vae=args.vae)
    except ExportError as e:
        fail(str(e))
    model = model.to(device).eval()
    latent = vae_id is not None
    if latent and args.clip_denoised:
        fail("--clip-denoised is for pixel models only: latents are not confined to [-1, 1]")
    try:
        vae = load_vae(vae_id, device) if latent else None
    except StoreError as e:
        fail(str(e))
    if args.cfg_channels is not None and not 1 <= args.cfg_channels <= model.in_channels:
        fail(f"--cfg-channels must be in [1, {model.in_channels}], got {args.cfg_channels}")
    num_classes = model.num_classes
    sampling = {k: getattr(args, k) for k in ("seed", "sampler", "steps", "eta", "cfg_scale", "cfg_channels",
                                              "clip_denoised")}

    def images_of(indices, labels):
        x = generate(model, diffusion, indices, labels, bf16=args.precision == "bf16", **sampling)
        return model_to_images(x, vae, scale_factor)

    if args.grid:
        # A picture to look at: one process is enough, other ranks have nothing to do.
        if world.is_main:
            try:
                classes = [int(c) for c in args.classes.split(",")]
            except ValueError:
                fail(f"--classes must be comma-separated integers, got {args.classes!r}")
            if not all(0 <= c < num_classes for c in classes):
                fail(f"--classes must be in [0, {num_classes}), got {args.classes}")
            labels = torch.tensor(classes).repeat_interleave(args.per_class)  # row r holds classes[r]
            images = np.concatenate([images_of(range(lo, min(lo + args.batch_size, len(labels))),
                                              labels[lo:lo + args.batch_size])
                                     for lo in tqdm(range(0, len(labels), args.batch_size), unit="batch")])
            # Official DiT files record no class names: their rows are labelled by class id.
            save_grid(args.grid, images, [class_names[c] if class_names else f"class {c}" for c in classes],
                      zoom=args.zoom)
            print(f"saved {args.grid}")
        cleanup_distributed()
        return

    # FID batch. Shards are fixed ranges of sample indices, so which rank made one does not matter,
    # and finished shards (written atomically: present means complete) are skipped on a rerun.
    if not args.out.endswith(".npz"):
        fail(f"--out must end in .npz, got {args.out}")
    if os.path.exists(args.out):
        fail(f"{args.out} exists; remove it to sample again")
    shard_dir = args.out + ".shards"
    starts = range(0, args.num_samples, args.shard_size)
    shard_paths = [os.path.join(shard_dir, f"shard-{s:06d}.npz") for s in range(len(starts))]
    shard_sizes = [min(args.shard_size, args.num_samples - lo) for lo in starts]

    # Refuse to mix shards from a run with other settings (batch size and world size may differ).
    settings = {k: getattr(args, k) for k in ("weights", "sampler", "steps", "eta", "cfg_scale", "cfg_channels",
                                              "clip_denoised", "precision", "seed", "num_samples", "shard_size")}
    settings.update(ckpt=os.path.realpath(args.ckpt), ckpt_bytes=os.path.getsize(args.ckpt), vae=vae_id)
    settings_path = os.path.join(shard_dir, "settings.json")
    if world.is_main:
        os.makedirs(shard_dir, exist_ok=True)
        if not os.path.exists(settings_path):
            atomic_write(settings_path, lambda f: f.write(json.dumps(settings, indent=2).encode()))
    barrier()
    with open(settings_path) as f:
        recorded = json.load(f)
    changed = [k for k in settings if recorded.get(k) != settings[k]]
    if changed:
        fail(f"{shard_dir} holds shards made with other settings ({changed[0]}: {recorded.get(changed[0])!r} "
             f"there, {settings[changed[0]]!r} now); use another --out or delete {shard_dir}")
    todo = [s for s, path in enumerate(shard_paths) if not os.path.exists(path)]
    barrier()  # every rank lists the finished shards before any rank adds one, so all agree on the split
    mine = todo[world.rank::world.world_size]
    if world.is_main:
        print(f"{len(shard_paths) - len(todo)} of {len(shard_paths)} shards already done; "
              f"{len(todo)} to sample on {world.world_size} rank(s)")

    progress = tqdm(total=sum(shard_sizes[s] for s in mine), unit="img", disable=not world.is_main)
    for s in mine:
        lo, hi = starts[s], starts[s] + shard_sizes[s]
        images = []
        for b in range(lo, hi, args.batch_size):
            indices = range(b, min(b + args.batch_size, hi))
            images.append(images_of(indices, torch.tensor(indices) % num_classes))  # balanced labels
            progress.update(len(indices))
        images, labels = np.concatenate(images), np.arange(lo, hi, dtype=np.int64) % num_classes
        atomic_write(shard_paths[s], lambda f: np.savez(f, arr_0=images, arr_1=labels))
    progress.close()

    barrier()  # every shard is on disk
    if world.is_main:
        with np.load(shard_paths[0]) as first:
            image_shape = first["arr_0"].shape[1:]
        atomic_write(args.out, lambda f: write_npz(f, shard_paths, shard_sizes, image_shape))
        shutil.rmtree(shard_dir)
        print(f"saved {args.out}: {args.num_samples} images {list(image_shape)}, labels i % {num_classes}")
    cleanup_distributed()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Sample a class-conditional diffusion model to a grid or an ADM .npz.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--ckpt", required=True, help="exported checkpoint (train.py) or an official DiT .pt")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema",
                        help="which weights of an exported checkpoint (official DiT files hold EMA weights)")
    plain = parser.add_argument_group("plain state dicts (official DiT files); exported checkpoints record these")
    plain.add_argument("--model", default=None, help=f"model name (default {DIT_DEFAULTS['model']})")
    plain.add_argument("--image-size", type=int, default=None, help="pixels; the latent is 1/8 (default 256)")
    plain.add_argument("--num-classes", type=int, default=None, help="default 1000")
    plain.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=None, help="default on")
    parser.add_argument("--vae", default=None,
                        help=f"VAE hub id or local folder for latent models (default: the checkpoint's, "
                             f"{DIT_DEFAULTS['vae']} for DiT files)")
    parser.add_argument("--sampler", choices=["ddpm", "ddim", "heun"], default="ddpm",
                        help="ancestral DDPM, DDIM (see --eta) or EDM's Heun")
    parser.add_argument("--steps", type=int, default=250, help="sampling steps (DiT: DDPM 250)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic)")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--cfg-channels", type=int, default=None,
                        help="guide only the first N channels; 3 is DiT's legacy behaviour, which DiT's "
                             "reported FIDs used (default: all channels)")
    parser.add_argument("--clip-denoised", action="store_true", help="clip predicted x0 to [-1, 1] (pixel models)")
    parser.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                        help="bf16 autocasts the network only")
    parser.add_argument("--seed", type=int, default=0, help="sample i draws its noise from (seed, i)")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank; does not change the images")
    use = parser.add_mutually_exclusive_group(required=True)
    use.add_argument("--grid", help="write a PNG grid (rows = --classes, columns = --per-class)")
    use.add_argument("--out", help="write an ADM .npz of --num-samples class-balanced images")
    parser.add_argument("--classes", default="0,1,2,3", help="grid: comma-separated class ids")
    parser.add_argument("--per-class", type=int, default=8, help="grid: images per class")
    parser.add_argument("--zoom", type=int, default=None,
                        help="grid: enlarge each image this many times by pixel repetition (default: images under 64 px to at least 64 px)")
    parser.add_argument("--num-samples", type=int, default=50_000, help="npz: number of images")
    parser.add_argument("--shard-size", type=int, default=1000, help="npz: images per resumable shard")
    args = parser.parse_args(argv)
    if args.steps < 2:
        fail(f"--steps must be at least 2, got {args.steps}")  # every sampler needs a start and an end level
    for name in ("batch_size", "per_class", "num_samples", "shard_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")
    return args


if __name__ == "__main__":
    main()
