"""A training run's metrics.jsonl as pictures: what a run is doing while it runs, or after.

    python -m experiments.plot_run results/quickstart            # -> results/quickstart/plots/*.png

  loss.png       the (weighted) training loss over steps
  mse.png        the raw MSE of the network's target over steps (no weighting: comparable across weightings)
  loss_by_t.png  heatmaps over training of the loss and the raw MSE in each timestep bucket
                 (train.num_buckets equal ranges of t): which noise levels the run is still learning,
                 the paper's lens on how a weighting spends the network's capacity

Reads only what train.py logs; safe to run while training goes on (a half-written last line is ignored).
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from config import HelpFormatter
from distributed import atomic_write


def read_metrics(path):
    """The records of a metrics.jsonl, in order. A last line cut short by a running writer is dropped;
    a bad line before it is an error naming the line."""
    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path} line {number} is not JSON: {line[:80]!r}") from None
    return records


def bucket_table(records, key):
    """(steps [n], values [buckets, n]) of a per-bucket key ("loss_by_t_bucket", "mse_by_t_bucket");
    a bucket no sample fell into at a log step (logged as null) is NaN."""
    steps = np.array([r["step"] for r in records])
    values = np.array([[math.nan if v is None else v for v in r[key]] for r in records], dtype=np.float64).T
    return steps, values


def save_figure(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def plot_curve(records, key, label, path):
    """One metric over steps, log scale (the loss spans decades)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot([r["step"] for r in records], [r[key] for r in records], marker="o", ms=2)
    ax.set_xlabel("training step")
    ax.set_ylabel(label)
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_buckets(records, path):
    """Heatmaps: step across, timestep bucket up (t = 0 at the bottom), colour = the bucket's value (log)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for ax, (key, title) in zip(axes, (("loss_by_t_bucket", "weighted loss"), ("mse_by_t_bucket", "raw MSE"))):
        steps, values = bucket_table(records, key)
        # Cell edges halfway between log steps, so uneven logging (the last step) keeps its place.
        mids = (steps[1:] + steps[:-1]) / 2
        x = np.concatenate([[2 * steps[0] - mids[0]], mids, [2 * steps[-1] - mids[-1]]]) if len(mids) else \
            steps[0] + np.array([-0.5, 0.5])
        y = np.linspace(0, 1, values.shape[0] + 1)
        positive = values[np.isfinite(values) & (values > 0)]
        norm = LogNorm(positive.min(), positive.max()) if positive.size else None
        mesh = ax.pcolormesh(x, y, np.ma.masked_invalid(values), norm=norm, cmap="viridis")
        fig.colorbar(mesh, ax=ax)
        ax.set_title(f"{title} per timestep bucket")
        ax.set_xlabel("training step")
        ax.set_ylabel("t / T (bucket)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("run", help="a train.py run directory (holding metrics.jsonl)")
    p.add_argument("--out", help="folder for the PNGs (default: <run>/plots)")
    args = p.parse_args(argv)
    run = Path(args.run)
    out = Path(args.out) if args.out else run / "plots"
    try:
        records = read_metrics(run / "metrics.jsonl")
    except (OSError, ValueError) as e:
        sys.exit(f"plot_run: error: {e}")
    if not records:
        sys.exit(f"plot_run: error: {run / 'metrics.jsonl'} has no records yet (train.py logs every "
                 f"train.log_every steps)")
    import matplotlib
    matplotlib.use("Agg")
    try:
        out.mkdir(parents=True, exist_ok=True)
        plot_curve(records, "loss", "training loss (weighted)", out / "loss.png")
        plot_curve(records, "mse", "raw MSE of the target", out / "mse.png")
        plot_buckets(records, out / "loss_by_t.png")
    except OSError as e:
        sys.exit(f"plot_run: error: cannot write the plots to {out}: {e}")
    print(f"wrote {out / 'loss.png'}, {out / 'mse.png'}, {out / 'loss_by_t.png'} ({len(records)} log steps, "
          f"last step {records[-1]['step']})")


if __name__ == "__main__":
    main()
