"""Gradient conflicts between noise levels (the paper's §3): each timestep bucket is a task, and the
cosine similarity of two buckets' loss gradients says whether training one helps (> 0) or hinders
(< 0) the other.

The timesteps are split into K buckets (equal widths in t, or in log SNR). Each bucket's gradient is
that of the mean weighted loss of N held-out images (a fixed subset of a store), each noised at a
timestep drawn uniformly within the bucket with a fixed ε: with the same --seed every model sees the
same images, timesteps and noise. Loss: the model's own target under --weighting ("plain": its plain
MSE). Reported per model: the K×K cosine matrix and each bucket's gradient norm, as a table
(conflicts.md), JSON (conflicts.json) and a heatmap (<model>.png); with several models (the
checkpoints of a run, optionally step 0 from --fresh), how each adjacent pair's cosine and each
bucket's norm evolve (across_training.png).

    python -m experiments.conflicts --ckpt results/run/checkpoints/step-0001000.pt --data data/builtin16 --out results/conflicts
    python -m experiments.conflicts --ckpt results/run/checkpoints --fresh DiT-Ti/4 --schedule cosine \\
        --data data/builtin16 --buckets 4 --out results/conflicts-run     # every step-*.pt of a run, and step 0
"""
import argparse
import json
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from config import HelpFormatter
from diffusion import BUCKET_SPACINGS, PLAIN_WEIGHTING, SCHEDULES, TARGETS, WEIGHTINGS, GaussianDiffusion, gram_matrix
from distributed import DiskFullError, atomic_write
from experiments.buckets import bucket_ranges, held_out_noising, save_heatmap
from export import ExportError, load_export
from models import ALL_MODELS
from store import StoreError, held_out_batch, open_store


def fail(message):
    sys.exit(f"conflicts.py: error: {message}")


def bucket_gradients(model, diffusion, loss_diffusion, x0, labels, t, noise, batch_size):
    """Gradient of each bucket's mean loss over the N images -> float32 [K, P] (P = trainable parameters,
    in model.parameters() order). model(x_t, t, y) is noised and split by `diffusion` (the model's own);
    the loss is loss_diffusion.training_losses (same target, the chosen weighting) on its prediction."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.zeros(t.shape[0], sum(p.numel() for p in params))
    n = len(x0)
    for k in range(t.shape[0]):
        model.zero_grad(set_to_none=True)
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            x_t = diffusion.q_sample(x0[rows], t[k, rows], noise[k, rows])
            pred, _ = diffusion.split_output(model(x_t, t[k, rows], labels[rows]))
            loss = loss_diffusion.training_losses(pred, x0[rows], t[k, rows], noise[k, rows])["loss"]
            (loss * len(x_t) / n).backward()   # the batch mean, weighted to make the mean over all N
        grads[k] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    model.zero_grad(set_to_none=True)
    return grads


def conflict_matrix(grads):
    """(cosine [K, K], norms [K]) of the rows of `grads`, in float64; a zero gradient has cosine 0."""
    gram = gram_matrix(grads)
    norms = gram.diagonal().sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return gram / safe[:, None] / safe[None, :], norms


def models_to_score(args):
    """[(label, step or None, path or None)] in the order given: the fresh model (step 0) first, a directory
    stands for its step-*.pt. Labels are file stems (the heatmaps' names)."""
    found = [("fresh", 0, None)] if args.fresh else []
    for given in args.ckpt:
        path = Path(given)
        files = sorted(path.glob("step-*.pt")) if path.is_dir() else [path]
        if path.is_dir() and not files:
            fail(f"{path} holds no exported checkpoints (step-*.pt)")
        for f in files:
            match = re.fullmatch(r"step-(\d+)", f.stem)
            found.append((f.stem, int(match.group(1)) if match else None, f))
    if not found:
        fail("give --ckpt (files or run checkpoint directories) and/or --fresh MODEL")
    labels = [label for label, _, _ in found]
    twice = next((label for label in labels if labels.count(label) > 1), None)
    if twice:
        fail(f"two models would both be named {twice!r} (their file stem): score them in separate --out folders")
    return found


def build_model(args, store, path):
    """(model, diffusion) of an export, or of a fresh models.py init (seeded as train.py seeds it)."""
    if path is None:
        c, h, _ = store.manifest["shape"]
        torch.manual_seed(args.init_seed)
        model = ALL_MODELS[args.fresh](input_size=h, in_channels=c, num_classes=store.num_classes,
                                       learn_sigma=False, class_dropout_prob=0.1)
        return model, GaussianDiffusion(args.schedule, target=args.target)
    try:
        model, diffusion, _, scale_factor, _ = load_export(path, args.weights)
    except ExportError as e:
        fail(str(e))
    if store.scale_factor != scale_factor:
        fail(f"{args.data} holds {store.mode} at scale {store.scale_factor}, {path} was trained at {scale_factor}")
    if [model.in_channels, model.input_size, model.input_size] != list(store.manifest["shape"]):
        fail(f"{args.data} holds items of shape {store.manifest['shape']}, {path} takes "
             f"{[model.in_channels, model.input_size, model.input_size]}")
    return model, diffusion


def save_across_training(path, results, ranges):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in results if r["step"] is not None]
    steps = [r["step"] for r in scored]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k in range(len(ranges) - 1):
        left.plot(steps, [r["cosine"][k][k + 1] for r in scored], marker="o", label=f"buckets {k},{k + 1}")
    left.plot(steps, [r["cosine"][0][-1] for r in scored], marker="s", ls="--", color="k", label="first, last")
    left.axhline(0, color="grey", lw=0.5)
    left.set(xlabel="training step", ylabel="cosine", title="gradient cosine between buckets")
    for k, (a, b, _, _) in enumerate(ranges):
        right.plot(steps, [r["norms"][k] for r in scored], marker="o", label=f"t {a}-{b}")
    right.set(xlabel="training step", ylabel="‖g_k‖", yscale="log", title="bucket gradient norm")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results, ranges, setting):
    lines = [setting, "", "| bucket | t | SNR |", "|---|---|---|"]
    lines += [f"| {k} | {a}-{b} | {sa:.3g} to {sb:.3g} |" for k, (a, b, sa, sb) in enumerate(ranges)]
    k = len(ranges)
    for r in results:
        lines += ["", f"**{r['label']}**: cosine of bucket gradients; last column ‖g_k‖", "",
                  "| bucket | " + " | ".join(str(j) for j in range(k)) + " | ‖g‖ |", "|---" * (k + 2) + "|"]
        lines += [f"| {i} | " + " | ".join(f"{c:+.3f}" for c in row) + f" | {n:.3g} |"
                  for i, (row, n) in enumerate(zip(r["cosine"], r["norms"]))]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--ckpt", nargs="*", default=[], help="exported checkpoints, or run checkpoint directories")
    p.add_argument("--fresh", metavar="MODEL", choices=list(ALL_MODELS),
                   help="also score a freshly initialised MODEL (as step 0), with --schedule and --target")
    p.add_argument("--schedule", choices=SCHEDULES, default="linear", help="the fresh model's schedule")
    p.add_argument("--target", choices=TARGETS, default="eps", help="the fresh model's target")
    p.add_argument("--init-seed", type=int, default=0, help="the fresh model's seed (train.py's run.seed)")
    p.add_argument("--data", required=True, help="held-out store (extract_latents.py), same kind as the training data")
    p.add_argument("--weights", choices=["ema", "model"], default="model",
                   help="exported weights to score (default: the optimizer's, whose gradients training follows)")
    p.add_argument("--weighting", choices=("plain",) + WEIGHTINGS, default="plain",
                   help="loss weighting of the buckets' losses; plain = the target's MSE")
    p.add_argument("--gamma", type=float, default=5.0, help="γ of --weighting")
    p.add_argument("--buckets", type=int, default=4, help="K")
    p.add_argument("--spacing", choices=BUCKET_SPACINGS, default="t", help="equal bucket widths in t or in log SNR")
    p.add_argument("--num-images", type=int, default=64, help="held-out images")
    p.add_argument("--seed", type=int, default=0, help="picks the images, their timesteps and noise")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward/backward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1:
        fail("--num-images and --batch-size must be at least 1")

    try:
        store = open_store(args.data)
        x0, labels = held_out_batch(store, args.num_images, args.seed)
    except StoreError as e:
        fail(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x0, labels = x0.to(args.device), labels.to(args.device)
    results, setting = [], None
    for label, step, path in tqdm(models_to_score(args), desc="models"):
        model, diffusion = build_model(args, store, path)
        weighting = PLAIN_WEIGHTING[diffusion.target] if args.weighting == "plain" else args.weighting
        try:
            loss_diffusion = GaussianDiffusion(diffusion.schedule, diffusion.num_timesteps, diffusion.target,
                                               weighting, args.gamma, diffusion.zero_terminal_snr)
            buckets = diffusion.timestep_buckets(args.buckets, args.spacing)
        except ValueError as e:
            fail(str(e))
        this = (diffusion.schedule, diffusion.num_timesteps, diffusion.target, diffusion.zero_terminal_snr)
        if setting not in (None, this):
            fail(f"{path} has diffusion (schedule, T, target, zero-terminal SNR) = {this}, the others {setting}: "
                 f"conflicts compare models of one diffusion")
        setting = this
        t, noise = held_out_noising(buckets, args.num_images, x0.shape[1:], args.seed + 1)
        # eval(): no label dropout, so every model's labels are the held-out batch's
        grads = bucket_gradients(model.to(args.device).eval(), diffusion, loss_diffusion, x0, labels, t.to(args.device),
                                 noise.to(args.device), args.batch_size)
        cosine, norms = conflict_matrix(grads)
        ranges = bucket_ranges(buckets, diffusion)
        save_heatmap(out / f"{label}.png", cosine.cpu(), [f"t {a}-{b}\n|g| {n:.2g}" for (a, b, _, _), n in
                                                           zip(ranges, norms.tolist())],
                     [f"{a}-{b}" for a, b, _, _ in ranges], f"{label}: {diffusion.target}, {weighting}, "
                     f"{args.num_images} images", "cosine of bucket gradients", 1.0)
        results.append({"label": label, "step": step, "ckpt": None if path is None else str(path),
                        "cosine": cosine.tolist(), "norms": norms.tolist()})
    summary = (f"Gradient cosine between {args.buckets} {args.spacing}-spaced timestep buckets, target "
               f"{setting[2]}, weighting {args.weighting} (γ = {args.gamma}), {args.num_images} held-out images of "
               f"{args.data} (seed {args.seed}), {args.weights} weights.")
    report = {"data": args.data, "weighting": args.weighting, "gamma": args.gamma, "spacing": args.spacing,
              "buckets": ranges, "num_images": args.num_images, "seed": args.seed, "weights": args.weights,
              "models": results}
    try:
        atomic_write(out / "conflicts.json", lambda f: f.write(json.dumps(report, indent=1).encode()))
        atomic_write(out / "conflicts.md", lambda f: f.write(markdown(results, ranges, summary).encode()))
        if sum(r["step"] is not None for r in results) > 1:
            save_across_training(out / "across_training.png", results, ranges)
    except DiskFullError as e:
        fail(str(e))
    print(f"wrote {out}/conflicts.md, conflicts.json and {len(results)} heatmaps")


if __name__ == "__main__":
    main()
