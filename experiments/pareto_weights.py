"""Does Min-SNR-γ approximate the Pareto weighting? The weights a `diffusion.weighting=pareto` run gave
its timestep buckets (metrics.jsonl, pareto_weights), averaged over training, against the bucket
weights each static weighting implies on the same target.

The Pareto step is Σ_k w_k·g_k, g_k the gradient of bucket k's plain mean loss (the target's MSE). A
static weighting λ(t) of the same plain loss, with t uniform, steps along Σ_k f_k·mean_{t∈k} λ(t)·∇mse_t
≈ Σ_k (f_k·λ̄_k)·g_k, f_k the bucket's share of the timesteps and λ̄_k the mean of λ over them
(diffusion.loss_weight: min(SNR, γ)/SNR for ε, ...): its effective bucket weights are f_k·λ̄_k,
normalised to sum 1 (the plain loss itself: f_k). Writes a table (pareto_weights.md), JSON and a
figure (pareto_weights.png: the weights per bucket, and the Pareto weights during training).

    python -m experiments.pareto_weights --run results/eps-pareto4 --out results/pareto-weights
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from config import HelpFormatter
from diffusion import PARETO, WEIGHTINGS, GaussianDiffusion, loss_weight
from distributed import DiskFullError, atomic_write
from experiments.buckets import bucket_ranges


def fail(message):
    sys.exit(f"pareto_weights.py: error: {message}")


def pareto_history(run_dir):
    """(steps [R], weights [R, K]) of every logged record of a Pareto run: each the mean over its steps."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        fail(f"{path} not found: give a train.py run directory")
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    records = [r for r in records if "pareto_weights" in r]
    if not records:
        fail(f"{path} logs no pareto_weights: the run was not trained with diffusion.weighting=pareto")
    return torch.tensor([r["step"] for r in records]), torch.tensor([r["pareto_weights"] for r in records],
                                                                   dtype=torch.float64)


def mean_over_steps(steps, weights, from_step):
    """Mean weights per training step from `from_step` on: a record stands for the steps since the previous one."""
    spans = torch.diff(steps, prepend=torch.zeros(1, dtype=steps.dtype)).double()
    keep = steps > from_step
    if not keep.any():
        fail(f"no logged step after --from-step {from_step}")
    return (spans[keep, None] * weights[keep]).sum(0) / spans[keep].sum()


def static_bucket_weights(diffusion, buckets, weighting, gamma):
    """f_k·λ̄_k normalised (see the module docstring) -> float64 [K]."""
    lam = loss_weight(diffusion.snr, weighting, diffusion.target, gamma)
    sums = torch.zeros(int(buckets.max()) + 1, dtype=torch.float64).index_add_(0, buckets, lam)
    return sums / sums.sum()   # Σ_{t∈k} λ(t) = T·f_k·λ̄_k


def save_figure(path, ranges, pareto, static, steps, history):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(ranges)
    names = [f"{a}-{b}" for a, b, _, _ in ranges]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(range(k), pareto, color="k", lw=2.5, marker="o", label="Pareto (mean over steps)")
    for name, w in static.items():
        left.plot(range(k), w, marker=".", ls="--", label=name)
    left.set(xticks=range(k), xticklabels=names, xlabel="timestep bucket", ylabel="normalised bucket weight",
             yscale="log", title="bucket weights: Pareto vs static weightings")
    left.legend(fontsize=7)
    for j in range(k):
        right.plot(steps, history[:, j], label=f"t {names[j]}")
    right.set(xlabel="training step", ylabel="Pareto weight (mean over the logged interval)",
              title="Pareto weights during training")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--run", required=True, help="a train.py run directory trained with diffusion.weighting=pareto")
    p.add_argument("--gamma", type=float, default=5.0, help="γ of the static weightings that have one")
    p.add_argument("--from-step", type=int, default=0, help="average the Pareto weights over later steps only")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)

    settings_path = Path(args.run) / "run.json"
    if not settings_path.exists():
        fail(f"{settings_path} not found: give a train.py run directory")
    settings = json.loads(settings_path.read_text())
    if settings.get("diffusion.weighting") != PARETO:
        fail(f"{args.run} was trained with diffusion.weighting={settings.get('diffusion.weighting')!r}, not 'pareto'")
    diffusion = GaussianDiffusion(settings["diffusion.schedule"], settings["diffusion.num_timesteps"],
                                  settings["diffusion.target"], zero_terminal_snr=settings["diffusion.zero_terminal_snr"])
    buckets = diffusion.timestep_buckets(settings["diffusion.pareto_buckets"])   # train.py's buckets: equal in t
    steps, history = pareto_history(args.run)
    pareto = mean_over_steps(steps, history, args.from_step)
    pareto_std = history[steps > args.from_step].std(0) if (steps > args.from_step).sum() > 1 else torch.zeros_like(pareto)
    static = {}
    for weighting in WEIGHTINGS:
        try:
            static[weighting] = static_bucket_weights(diffusion, buckets, weighting, args.gamma)
        except ValueError:   # infinite on this target (const on ε at SNR = 0, ...): no bucket weight
            continue

    ranges = bucket_ranges(buckets, diffusion)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = [f"t {a}-{b}" for a, b, _, _ in ranges]
    lines = [f"Normalised bucket weights, target {diffusion.target}, {diffusion.schedule} schedule: the Pareto run "
             f"{args.run} (mean over steps > {args.from_step}, ± sd over logged intervals) against each static "
             f"weighting's f_k·mean λ (γ = {args.gamma}); the last column is the total variation distance to Pareto.", "",
             "| weighting | " + " | ".join(header) + " | TV to Pareto |", "|---" * (len(header) + 2) + "|",
             "| **pareto** | " + " | ".join(f"{w:.3f} ± {s:.3f}" for w, s in zip(pareto.tolist(), pareto_std.tolist()))
             + " | 0 |"]
    for name, w in static.items():
        tv = 0.5 * (w - pareto).abs().sum().item()
        lines.append(f"| {name} | " + " | ".join(f"{x:.3g}" for x in w.tolist()) + f" | {tv:.3f} |")
    report = {"run": args.run, "gamma": args.gamma, "from_step": args.from_step, "buckets": ranges,
              "pareto": pareto.tolist(), "pareto_std": pareto_std.tolist(),
              "static": {k: v.tolist() for k, v in static.items()}}
    try:
        atomic_write(out / "pareto_weights.json", lambda f: f.write(json.dumps(report, indent=1).encode()))
        atomic_write(out / "pareto_weights.md", lambda f: f.write(("\n".join(lines) + "\n").encode()))
    except DiskFullError as e:
        fail(str(e))
    save_figure(out / "pareto_weights.png", ranges, pareto.numpy(),
                {k: v.numpy() for k, v in static.items()}, steps.numpy(), history.numpy())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
