"""Negative transfer between noise levels: does training one range of timesteps hurt the others?

From a trained checkpoint, one copy of the model per timestep bucket k is trained for --steps steps on
bucket k only (timesteps uniform within it; the model's own training loss; AdamW from a fresh state
with a linear warm-up, no label dropout), and a last copy on all timesteps as the control. Each copy's
held-out plain loss (the target's MSE) is then measured on every bucket, on a fixed held-out batch
(drawn as conflicts.py draws it), and reported as the relative change from the checkpoint's: a
(K+1) × K matrix (row: what was trained, column: where it is measured; < 0 = the loss fell). Every
copy sees the same images, noise and training-time draws but for the timesteps (common random numbers).

    python -m experiments.negative_transfer --ckpt results/run/checkpoints/step-0001000.pt \\
        --data data/builtin16 --buckets 4 --steps 200 --out results/transfer
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from config import HelpFormatter
from diffusion import BUCKET_SPACINGS, PLAIN_WEIGHTING, GaussianDiffusion
from distributed import DiskFullError, atomic_write
from experiments.buckets import bucket_ranges, held_out_noising, save_heatmap
from export import ExportError, load_export
from store import StoreError, held_out_batch, open_store


def fail(message):
    sys.exit(f"negative_transfer.py: error: {message}")


@torch.no_grad()
def held_out_losses(model, diffusion, plain, x0, labels, t, noise, batch_size):
    """Mean plain loss of each bucket over the held-out images -> float64 [K]."""
    out = torch.zeros(t.shape[0], dtype=torch.float64)
    for k in range(t.shape[0]):
        for start in range(0, len(x0), batch_size):
            rows = slice(start, start + batch_size)
            x_t = diffusion.q_sample(x0[rows], t[k, rows], noise[k, rows])
            pred, _ = diffusion.split_output(model(x_t, t[k, rows], labels[rows]))
            out[k] += plain.training_losses(pred, x0[rows], t[k, rows], noise[k, rows])["mse"].double().sum().cpu()
    return out / len(x0)


def train_on(model, diffusion, store, timesteps, args, device):
    """--steps AdamW steps of the model's own loss on batches of the store, t uniform over `timesteps`.
    Images, noise and the index into `timesteps` come from one generator seeded by --seed, so two calls
    differ only in the timesteps they are given."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed + 2)
    for step in range(args.steps):
        # Linear warm-up: a fresh AdamW's first steps move every weight by about lr, whatever its gradient.
        optimizer.param_groups[0]["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        indices = torch.randint(len(store), (args.batch_size,), generator=g).numpy()
        x0, y = store.read_model(indices)
        t = timesteps[(torch.rand(args.batch_size, generator=g) * len(timesteps)).long()]
        noise = torch.randn(x0.shape, generator=g)
        x0, y, t, noise = x0.to(device), y.to(device), t.to(device), noise.to(device)
        loss = diffusion.training_losses(model(diffusion.q_sample(x0, t, noise), t, y), x0, t, noise)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="exported checkpoint (train.py)")
    p.add_argument("--data", required=True, help="the store (extract_latents.py) the copies train on")
    p.add_argument("--held-out", help="the store their loss is measured on (default: --data)")
    p.add_argument("--weights", choices=["ema", "model"], default="model", help="which of the export's weights to train")
    p.add_argument("--buckets", type=int, default=4, help="K")
    p.add_argument("--spacing", choices=BUCKET_SPACINGS, default="t", help="equal bucket widths in t or in log SNR")
    p.add_argument("--steps", type=int, default=200, help="training steps per bucket")
    p.add_argument("--batch-size", type=int, default=32, help="images per training step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the copies")
    p.add_argument("--warmup", type=int, default=50, help="linear LR warm-up steps")
    p.add_argument("--num-images", type=int, default=128, help="held-out images per bucket")
    p.add_argument("--seed", type=int, default=0, help="picks the batches, timesteps and noise")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.num_images, args.warmup) < 1:
        fail("--steps, --batch-size, --num-images and --warmup must be at least 1")

    try:
        trained, diffusion, _, scale_factor, _ = load_export(args.ckpt, args.weights)
        mode = "pixels" if scale_factor is None else "latents"
        store = open_store(args.data, mode=mode)
        x0, labels = held_out_batch(open_store(args.held_out or args.data, mode=mode), args.num_images, args.seed)
        buckets = diffusion.timestep_buckets(args.buckets, args.spacing)
    except (ExportError, StoreError, ValueError) as e:
        fail(str(e))
    if [trained.in_channels, trained.input_size, trained.input_size] != list(store.manifest["shape"]):
        fail(f"{args.data} holds items of shape {store.manifest['shape']}, the model takes "
             f"{[trained.in_channels, trained.input_size, trained.input_size]}")
    plain = GaussianDiffusion(diffusion.schedule, diffusion.num_timesteps, diffusion.target,
                              PLAIN_WEIGHTING[diffusion.target], zero_terminal_snr=diffusion.zero_terminal_snr)
    device = torch.device(args.device)
    trained = trained.to(device).eval()   # eval(): no label dropout, in training as in measuring
    t, noise = held_out_noising(buckets, args.num_images, x0.shape[1:], args.seed + 1)
    held_out = (x0.to(device), labels.to(device), t.to(device), noise.to(device), args.batch_size)
    before = held_out_losses(trained, diffusion, plain, *held_out)

    ranges = bucket_ranges(buckets, diffusion)
    rows = [(f"t {a}-{b}", (buckets == k).nonzero().squeeze(1)) for k, (a, b, _, _) in enumerate(ranges)]
    rows.append(("all t", torch.arange(diffusion.num_timesteps)))
    change = torch.zeros(len(rows), args.buckets, dtype=torch.float64)
    for r, (_, timesteps) in enumerate(tqdm(rows, desc="trained bucket")):
        model = train_on(copy.deepcopy(trained), diffusion, store, timesteps, args, device)
        change[r] = held_out_losses(model, diffusion, plain, *held_out) / before - 1

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = [f"t {a}-{b}" for a, b, _, _ in ranges]
    lines = [f"Relative change of the held-out plain {diffusion.target}-MSE per bucket ({args.num_images} images of "
             f"{args.held_out or args.data}) after {args.steps} AdamW steps (lr {args.lr}, {args.warmup} warm-up, batch {args.batch_size}) on one bucket's "
             f"timesteps, from {args.ckpt} ({args.weights} weights); < 0 = lower loss.", "",
             "| trained on | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{c:+.1%}" for c in row) + " |"
              for (name, _), row in zip(rows, change.tolist())]
    lines += ["", "held-out loss before: " + ", ".join(f"{c} {v:.4g}" for c, v in zip(columns, before.tolist()))]
    report = {"ckpt": args.ckpt, "weights": args.weights, "data": args.data, "held_out": args.held_out or args.data,
              "buckets": ranges, "steps": args.steps,
              "lr": args.lr, "batch_size": args.batch_size, "num_images": args.num_images, "seed": args.seed,
              "before": before.tolist(), "rows": [name for name, _ in rows], "relative_change": change.tolist()}
    try:
        atomic_write(out / "transfer.json", lambda f: f.write(json.dumps(report, indent=1).encode()))
        atomic_write(out / "transfer.md", lambda f: f.write(("\n".join(lines) + "\n").encode()))
    except DiskFullError as e:
        fail(str(e))
    limit = max(change.abs().max().item(), 1e-6)
    save_heatmap(out / "transfer.png", change, [name for name, _ in rows], columns,
                 f"held-out loss change after {args.steps} steps on one bucket", "relative change", limit)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
