"""What the timestep-bucket diagnostics (conflicts.py, negative_transfer.py, pareto_weights.py) share:
each bucket's timesteps, a held-out draw of timesteps and noise per bucket, and the K×K heatmap."""
import torch


def bucket_ranges(buckets, diffusion):
    """[(first t, last t, SNR at first t, SNR at last t)] of each bucket; `buckets`: the bucket of every
    timestep (GaussianDiffusion.timestep_buckets)."""
    out = []
    for k in range(int(buckets.max()) + 1):
        members = (buckets == k).nonzero().squeeze(1)
        first, last = int(members[0]), int(members[-1])
        out.append((first, last, float(diffusion.snr[first]), float(diffusion.snr[last])))
    return out


def held_out_noising(buckets, num_images, shape, seed):
    """Per bucket k and image i, a timestep drawn uniformly among bucket k's and a standard normal ε ->
    (t long [K, N], noise [K, N, *shape]): with the same seed, every model sees the same draws."""
    g = torch.Generator().manual_seed(seed)
    k = int(buckets.max()) + 1
    t = torch.empty(k, num_images, dtype=torch.long)
    for b in range(k):
        members = (buckets == b).nonzero().squeeze(1)
        t[b] = members[torch.randint(len(members), (num_images,), generator=g)]
    return t, torch.randn(k, num_images, *shape, generator=g)


def save_heatmap(path, matrix, row_labels, col_labels, title, colorbar, limit):
    """A [R, C] matrix as a diverging heatmap over [−limit, limit], each cell printed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = matrix.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.75 * cols, 0.8 + 0.65 * rows))
    image = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
    for i in range(rows):
        for j in range(cols):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(cols), col_labels, fontsize=7, rotation=45)
    ax.set_yticks(range(rows), row_labels, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=colorbar)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
