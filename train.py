"""Train a class-conditional diffusion transformer with Min-SNR-γ loss weighting (Hang et al., ICCV 2023).

    python train.py --config configs/quickstart.yaml                        # one process
    torchrun --nproc-per-node=8 train.py --config configs/imagenet256_dit_xl2.yaml --set optim.lr=2e-4

One code path for one CPU process and many GPUs on many nodes: FSDP2 (`fully_shard` per transformer
block, then the root), fp32 master weights and optimizer, an fp32 EMA twin sharded the same way,
sharded resumable checkpoints (torch.distributed.checkpoint). Started again with the same arguments
it resumes from its newest complete checkpoint, which is what lets `torchrun --max-restarts` survive a
dead worker. Data order and all per-sample randomness are functions of (seed, step, global sample
index) only, so the result does not depend on how many ranks share the batch.
"""
import argparse
import copy
import difflib
import functools
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from config import ConfigError, HelpFormatter, flatten, load_config
from diffusion import PARETO, GaussianDiffusion, generate, gram_matrix, min_norm_weights
from distributed import (DiskFullError, atomic_write, barrier, cleanup_distributed, disk_full, init_distributed,
                         seed_for)
from export import save_export
from models import ALL_MODELS
from store import StoreError, load_vae, model_to_images, open_store, save_grid

# Every config key and its default. A YAML file overrides these, `--set key=value` overrides the YAML;
# a key not listed here is an error.
DEFAULTS = {
    "run": {
        "name": None,               # run directory name; None = the config file's stem
        "results_dir": "results",   # the run lives in <results_dir>/<name>
        "seed": 0,
    },
    "data": {
        "path": "data/quickstart",  # a store written by extract_latents.py
        "mode": None,               # "pixels" | "latents": checked against the store (None = accept either)
        "image_size": None,         # checked against the store (None = accept any)
        "random_flip": True,        # horizontal flips: drawn from the store's flipped copies, or flipped here for pixels
    },
    "model": {
        "name": "DiT-S/2",
        "learn_sigma": False,
        "class_dropout_prob": 0.1,  # label dropout for classifier-free guidance (null label = num_classes)
        "gradient_checkpointing": False,
        "compile": False,           # torch.compile each transformer block
    },
    "diffusion": {
        "schedule": "linear",
        "num_timesteps": 1000,
        "target": "eps",
        "weighting": "min_snr",
        "gamma": 5.0,
        "zero_terminal_snr": False,
        "pareto_buckets": None,     # K equal-width t buckets of weighting "pareto" (only with it)
    },
    "optim": {
        "lr": 1e-4,
        "betas": [0.9, 0.999],
        "weight_decay": 0.0,
        "eps": 1e-8,
        "warmup_steps": 0,          # linear LR warm-up from lr/warmup_steps to lr
        "grad_clip": 0.0,           # max global grad norm; 0 = no clipping (the norm is logged either way)
    },
    "train": {
        "steps": 1000,
        "global_batch_size": 256,   # images per optimizer step, summed over ranks and micro-batches
        "grad_accum": 1,            # micro-batches per step on each rank
        "precision": "fp32",        # "fp32" | "bf16" (bf16 compute, fp32 master weights and gradient reduction)
        "ema_decay": 0.9999,
        "ema_warmup": False,        # decay min(ema_decay, (1+step)/(10+step)): lets short runs' EMA track the model
        "log_every": 10,
        "num_buckets": 10,          # timestep buckets of the logged per-t losses
        "tensorboard": True,        # also write TensorBoard events when tensorboard is installed
        "sample_every": 0,          # every N steps a grid of EMA samples, <run>/samples/step-XXXXXXX.png (0 = never)
        "sample_per_class": 8,      # grid columns; rows: the first (up to) 10 classes; the same noise every time
        "sample_steps": 20,         # DDIM steps of the grid
        "sample_cfg": 3.0,          # classifier-free guidance scale of the grid
    },
    "checkpoint": {
        "every": 1000,              # sharded DCP checkpoint every N steps (and at the end / on SIGTERM)
        "keep_last": 3,             # sharded checkpoints kept
        "export_every": 0,          # single-file export every N steps (0 = only at the end); never deleted
    },
}

ORDER_STREAM, STEP_STREAM, RANK_STREAM = 0, 1, 2   # independent random streams derived from run.seed


# ----------------------------------------------------------------------------------------------------
# Configuration (config.py loads it; these are the choices DEFAULTS' types cannot express)


def validate(cfg):
    """Choices that DEFAULTS' types cannot express; diffusion.py checks its own names."""
    name = cfg["model"]["name"]
    if name not in ALL_MODELS:
        close = difflib.get_close_matches(name, list(ALL_MODELS), n=1)
        raise ConfigError(f"unknown model.name '{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    if cfg["train"]["precision"] not in ("fp32", "bf16"):
        raise ConfigError(f"train.precision must be 'fp32' or 'bf16', got '{cfg['train']['precision']}'")
    for key in ("train.steps", "train.global_batch_size", "train.grad_accum", "train.log_every",
                "train.num_buckets", "train.sample_per_class", "train.sample_steps", "checkpoint.every",
                "checkpoint.keep_last"):
        section, leaf = key.split(".")
        if cfg[section][leaf] < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {cfg[section][leaf]}")


# ----------------------------------------------------------------------------------------------------
# Process group, seeds, data


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed, count, epoch):
    return np.random.default_rng(seed_for(seed, ORDER_STREAM, epoch)).permutation(count)


def sample_indices(seed, count, start, n):
    """Store indices of global sample positions [start, start+n) of the endless stream made of one
    permutation per epoch. A function of (seed, position) only: any world size, any resume point."""
    positions = np.arange(start, start + n)
    epochs = positions // count
    indices = np.empty(n, dtype=np.int64)
    for epoch in np.unique(epochs):
        rows = epochs == epoch
        indices[rows] = epoch_permutation(seed, count, int(epoch))[positions[rows] % count]
    return indices


def step_randomness(seed, step, diffusion, rows, shape, label_dropout):
    """t, flips, diffusion noise, posterior noise and the label-dropout mask of the global sample positions
    `rows` (a range) of step `step`. Row g draws from its own generator, so a rank draws only its own rows
    (the cost follows the local batch) and a row's randomness does not depend on the world size. CPU
    generators keep 32 bits of a seed: row g gets (a 32-bit offset mixed from (seed, step)) + g, distinct
    within a step, as sample.py seeds its samples."""
    offset = seed_for(seed, STEP_STREAM, step) % 2**32
    n = len(rows)
    t, flips, drop_label = torch.empty(n, dtype=torch.long), torch.empty(n), torch.empty(n)
    noise, posterior_noise = torch.empty(n, *shape), torch.empty(n, *shape)
    for i, g in enumerate(rows):
        gen = torch.Generator().manual_seed((offset + g) % 2**32)
        t[i] = diffusion.sample_timesteps(1, generator=gen)[0]
        flips[i] = torch.rand((), generator=gen)
        torch.randn(shape, generator=gen, out=noise[i])
        torch.randn(shape, generator=gen, out=posterior_noise[i])   # latent stores draw x0 from N(mean, std²)
        drop_label[i] = torch.rand((), generator=gen)               # last: dropout leaves the rest unchanged
    return t, flips < 0.5, noise, posterior_noise, drop_label < label_dropout


# ----------------------------------------------------------------------------------------------------
# Model, EMA, optimizer and the step's parts (bench/bench_train.py times these same functions)


def model_args(cfg, store):
    c, h, _ = store.manifest["shape"]
    return {"name": cfg["model"]["name"], "input_size": h, "in_channels": c, "num_classes": store.num_classes,
            "learn_sigma": cfg["model"]["learn_sigma"], "class_dropout_prob": cfg["model"]["class_dropout_prob"]}


def build_models(cfg, margs, device):
    """The FSDP2-sharded model and its EMA twin. Same seed on every rank, so every rank starts from
    the same weights before sharding."""
    torch.manual_seed(cfg["run"]["seed"])
    # Label dropout is drawn here from the step's generator (step_randomness), not by the model from
    # its rank's RNG, so that it does not depend on the world size: the model's own dropout is off.
    kwargs = {k: v for k, v in margs.items() if k != "name"} | {"class_dropout_prob": 0.0}
    model = ALL_MODELS[margs["name"]](**kwargs).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)   # before sharding: a sharded module cannot be deep-copied
    model.gradient_checkpointing = cfg["model"]["gradient_checkpointing"]
    if cfg["model"]["compile"]:
        for block in model.blocks:
            block.compile()
    bf16 = cfg["train"]["precision"] == "bf16"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32)
    for m in (model, ema):
        for block in m.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(m, mp_policy=mp)
    register_fsdp_forward_method(ema, "forward_with_cfg")   # guided sampling (write_samples) bypasses forward()
    return model, ema


def build_optimizer(cfg, model, device):
    o = cfg["optim"]
    return torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                             weight_decay=o["weight_decay"], fused=True)


def lr_at(cfg, step):
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant (the paper's)."""
    warmup = cfg["optim"]["warmup_steps"]
    return cfg["optim"]["lr"] * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay*ema + (1-decay)*model on each rank's own fp32 shards: no communication."""
    ema_shards = [p.to_local() for p in ema.parameters()]
    model_shards = [p.to_local() for p in model.parameters()]
    torch._foreach_lerp_(ema_shards, model_shards, 1.0 - decay)


def forward_backward(model, diffusion, micro_batches, num_buckets):
    """Forward and backward over this rank's micro-batches (gradients accumulate; FSDP averages them
    over ranks). Returns float64 sums to all-reduce: [loss·n, mse, n, weighted per bucket, mse per
    bucket, count per bucket] (see loss_stats), then, under weighting "pareto", the step's bucket
    weights divided by the world size."""
    if diffusion.weighting == PARETO:
        return pareto_forward_backward(model, diffusion, micro_batches, num_buckets)
    stats = []
    for x0, y, t, noise in micro_batches:
        losses = micro_batch_losses(model, diffusion, x0, y, t, noise)
        (losses["loss"] / len(micro_batches)).backward()
        stats.append(loss_stats(diffusion, losses, t, num_buckets))
    return torch.stack(stats).sum(0)


def micro_batch_losses(model, diffusion, x0, y, t, noise):
    """diffusion.training_losses of the model on these samples."""
    x_t = diffusion.q_sample(x0, t, noise)
    out = model(x_t, t, y).float()   # bf16 compute returns bf16; the loss is taken in fp32
    return diffusion.training_losses(out, x0, t, noise)


def loss_stats(diffusion, losses, t, num_buckets):
    """Float64 sums of one micro-batch's losses for the log: [loss·n, mse, n, weighted per bucket, mse per
    bucket, count per bucket]."""
    w_sums, counts = diffusion.bucket_sums(losses["weighted"].detach(), t, num_buckets)
    m_sums, _ = diffusion.bucket_sums(losses["mse"].detach(), t, num_buckets)
    # torch.full, not torch.tensor(n, device=...): a blocking host-to-device copy would wait for this
    # micro-batch's backward before the next forward could be queued.
    n = t.shape[0]
    head = torch.stack([losses["loss"].detach().double() * n, losses["mse"].detach().double().sum(),
                        torch.full((), float(n), dtype=torch.float64, device=t.device)])
    return torch.cat([head, w_sums.to(head), m_sums.to(head), counts.to(head)])


def local_shard(tensor):
    """This rank's part of a gradient: the local shard of an FSDP2 DTensor, a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def bucket_gradients(model, diffusion, micro_batches, num_buckets):
    """Each Pareto bucket's gradient g_k = Σ ∇mse_i / N_k over the samples i of bucket k in the global
    batch (all ranks, all micro-batches), N_k their global count: the gradient of bucket k's plain mean
    loss, whatever the world size and accumulation. Returns (g: per bucket, None for a bucket the global
    batch has no sample of, else its gradients in model.parameters() order (sharded like the model's);
    stats: loss_stats summed over this rank's samples).

    Bucket k's samples of a micro-batch get a forward and a backward of their own: DiT treats samples
    independently, so this is the shared forward's per-bucket backward at no extra FLOPs."""
    k_buckets, world = diffusion.pareto_buckets, dist.get_world_size()
    buckets = [diffusion.bucket_index(t, k_buckets) for _, _, t, _ in micro_batches]
    counts = torch.stack([torch.bincount(b, minlength=k_buckets) for b in buckets]).sum(0).double()
    dist.all_reduce(counts)
    counts = counts.tolist()   # which passes run is decided on the host, the same on every rank
    params = [p for p in model.parameters() if p.requires_grad]
    grads, stats = [], []
    for k in range(k_buckets):
        if counts[k] == 0:
            grads.append(None)
            continue
        for (x0, y, t, noise), b in zip(micro_batches, buckets):
            rows = (b == k).nonzero().squeeze(1)
            # × world: FSDP2 averages gradients over ranks, and g_k is their sum over the global batch.
            scale = len(rows) * world / counts[k]
            if len(rows) == 0:
                # FSDP2's collectives need every rank in every pass: a rank without samples of bucket k
                # in this micro-batch passes one sample at weight 0.
                rows, scale = torch.zeros(1, dtype=torch.long, device=t.device), 0.0
            losses = micro_batch_losses(model, diffusion, x0[rows], y[rows], t[rows], noise[rows])
            (losses["loss"] * scale).backward()
            if scale > 0:
                stats.append(loss_stats(diffusion, losses, t[rows], num_buckets))
        grads.append([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        for p in params:
            p.grad = None
    return grads, torch.stack(stats).sum(0)


def pareto_forward_backward(model, diffusion, micro_batches, num_buckets):
    """forward_backward under weighting "pareto": leaves Σ_k w_k·g_k in the gradients, w the min-norm
    convex combination of the bucket gradients g_k (min_norm_weights; weight 0 for an empty bucket).
    Their Gram matrix is the all-reduced sum of each rank's shard dot products, so every rank solves
    the same problem. Returns loss_stats' sums, then w / world size (all-reduced back to w)."""
    grads, stats = bucket_gradients(model, diffusion, micro_batches, num_buckets)
    present = [k for k, g in enumerate(grads) if g is not None]
    params = [p for p in model.parameters() if p.requires_grad]
    gram = sum(gram_matrix(torch.stack([local_shard(grads[k][i]).flatten() for k in present]))
               for i in range(len(params)))
    dist.all_reduce(gram)
    w = min_norm_weights(gram).tolist()
    for i, p in enumerate(params):
        combined = w[0] * grads[present[0]][i]
        for weight, k in zip(w[1:], present[1:]):
            combined = combined + weight * grads[k][i]
        p.grad = combined
    weights = torch.zeros(diffusion.pareto_buckets, dtype=torch.float64)
    weights[present] = torch.tensor(w, dtype=torch.float64)
    return torch.cat([stats, (weights / dist.get_world_size()).to(stats)])


def clip_gradients(model, max_norm):
    """Clip the gradients to global norm `max_norm` (0 = no clipping); returns the norm before clipping,
    a 0-d device tensor (not read here: reading it would wait for the backward)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm   # FSDP2's grads are DTensors


def to_device(tensor, device):
    """Host to device without making the host wait: from pinned memory the copy is queued like a kernel
    (from pageable memory it would wait for the device's queue)."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def first_non_finite(first_bad):
    """The first step whose loss (on any rank) or gradient norm was not finite, or None. A collective
    that reads a device value: the training loop calls it only on log steps and before every save."""
    agreed = first_bad.clone()
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    bad = agreed.item()
    return None if math.isinf(bad) else int(bad)


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def step_dirs(run_dir):
    """Sharded checkpoint directories step-XXXXXXX, complete or not, oldest first (set-aside damaged
    ones, step-XXXXXXX.damaged, are not among them)."""
    found = (run_dir / "checkpoints").glob("step-*")
    return sorted((p for p in found if p.is_dir() and re.fullmatch(r"step-\d{7}", p.name)), key=lambda p: p.name)


def checkpoint_dirs(run_dir):
    """Complete sharded checkpoints, oldest first: a directory counts once DCP has written .metadata
    (it does so last). Complete is not the same as loadable: see load_newest."""
    return [p for p in step_dirs(run_dir) if (p / ".metadata").exists()]


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def training_state(model, ema, optimizer, step, samples_seen, world):
    """The DCP state dict. Same-named entries keep rank 0's value, so each rank's global RNG state goes
    under its own key."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    progress = {k: torch.tensor(v, dtype=torch.int64)
                for k, v in (("step", step), ("samples_seen", samples_seen), ("world_size", world.world_size))}
    return {"model": model_sd, "optim": optim_sd, "ema": get_model_state_dict(ema), "progress": progress,
            "rng": {f"rank{world.rank}": rng_state(world.device)}}


def save_checkpoint(run_dir, model, ema, optimizer, step, samples_seen, world, keep_last):
    path = run_dir / "checkpoints" / f"step-{step:07d}"
    if world.is_main and path.exists():
        shutil.rmtree(path)   # an incomplete save of this step by an earlier, interrupted run
    barrier()
    error = None
    try:
        dcp.save(training_state(model, ema, optimizer, step, samples_seen, world), checkpoint_id=path)
    except (Exception, CheckpointException) as e:  # DCP's comes on every rank
        error = e
    full = torch.tensor([float(error is not None and disk_full(path))], device=world.device)
    dist.all_reduce(full)   # agreed before rank 0 frees the space the partial checkpoint holds
    if full.item() > 0:
        if world.is_main:
            shutil.rmtree(path, ignore_errors=True)   # no .metadata: never counted complete anyway
        newest = checkpoint_dirs(run_dir)
        fail(f"disk full while writing checkpoint {path}; the newest complete checkpoint "
             f"({newest[-1].name if newest else 'none'}) is intact: free space and rerun the same command")
    if error is not None:
        raise error
    barrier()
    if world.is_main:   # keep the newest `keep_last`; drop everything older, complete or not
        kept = checkpoint_dirs(run_dir)[-keep_last:]
        for old in step_dirs(run_dir):
            if old.name < kept[0].name:
                shutil.rmtree(old)


def load_checkpoint(path, model, ema, optimizer, world):
    """Restore model, EMA, optimizer (resharded by DCP to this world size) and progress. Each rank's
    RNG is restored only onto the same world size; otherwise ranks reseed (see main)."""
    progress = {k: torch.tensor(0, dtype=torch.int64) for k in ("step", "samples_seen", "world_size")}
    dcp.load({"progress": progress}, checkpoint_id=path)
    state = training_state(model, ema, optimizer, 0, 0, world)
    same_world = int(progress["world_size"]) == world.world_size
    if not same_world:
        del state["rng"]
    del state["progress"]
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    set_model_state_dict(ema, state["ema"])
    if same_world:
        rng = state["rng"][f"rank{world.rank}"]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], world.device)
    return int(progress["step"]), int(progress["samples_seen"])


def export_checkpoint(path, model, ema, export_args, world):
    """The single-file export (export.py's format) with full tensors and models.py's own keys, for
    sample.py and DiT-style tools. Gathering is a collective: every rank calls this; rank 0 writes."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    ema_sd = get_model_state_dict(ema, options=options)
    full = False
    if world.is_main:
        try:
            save_export(path, model_sd, ema_sd, **export_args)
        except DiskFullError as e:
            full = str(e)
    flag = torch.tensor([float(bool(full))], device=world.device)
    dist.all_reduce(flag)   # rank 0 alone writes; every rank must learn that it failed
    if flag.item() > 0:
        fail(f"{full}; the sharded checkpoints are intact: free space and rerun the same command to export")


def samples_vae(cfg, store, world):
    """The VAE that decodes a latent run's sample grids, else None. Every rank loads it, so a VAE that cannot
    load stops every rank with the same one-line error (rank 0 alone decodes)."""
    if cfg["train"]["sample_every"] == 0 or store.mode != "latents":
        return None
    try:
        return load_vae(store.manifest["vae"], world.device)
    except StoreError as e:
        fail(f"train.sample_every needs the store's VAE to decode the grids: {e}")


@torch.no_grad()
def write_samples(path, ema, diffusion, cfg, store, vae, world):
    """A grid of the EMA's samples: one row per class of the first (up to) 10, train.sample_per_class columns,
    DDIM with guidance, sample i drawing its noise from (run.seed, i), so every grid of a run starts from the
    same noise and the grids show the run improving. A collective under FSDP2: every rank samples the whole
    grid through its EMA shards; rank 0 writes, and a grid it cannot write is reported, not fatal."""
    t = cfg["train"]
    classes = list(range(min(10, store.num_classes)))
    labels = torch.tensor(classes).repeat_interleave(t["sample_per_class"])
    x = generate(ema, diffusion, range(len(labels)), labels, seed=cfg["run"]["seed"], sampler="ddim",
                 steps=t["sample_steps"], cfg_scale=t["sample_cfg"], clip_denoised=store.mode == "pixels")
    ema.reshard()   # FSDP2 keeps the root's parameters gathered after a forward (for a backward); update_ema needs shards
    if world.is_main:
        try:
            path.parent.mkdir(exist_ok=True)
            save_grid(path, model_to_images(x, vae, store.scale_factor), [store.class_names[c] for c in classes])
        except OSError as e:
            print(f"\ntrain.py: could not write {path} ({e}); training goes on", flush=True)


# ----------------------------------------------------------------------------------------------------
# Logging


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux reports KiB


def metrics_record(step, totals, steps, seconds, cfg, grad_norm, device):
    """One metrics.jsonl line from the all-reduced sums of the last `steps` steps."""
    k = cfg["train"]["num_buckets"]
    loss_sum, mse_sum, n = totals[:3].tolist()
    w_sums, m_sums, counts = totals[3:3 + k], totals[3 + k:3 + 2 * k], totals[3 + 2 * k:3 + 3 * k]

    def per_bucket(sums):
        return [round(s / c, 6) if c > 0 else None for s, c in zip(sums.tolist(), counts.tolist())]

    record = {"step": step, "loss": loss_sum / n, "mse": mse_sum / n, "grad_norm": grad_norm,
              "lr": lr_at(cfg, step - 1), "images_per_s": cfg["train"]["global_batch_size"] * steps / seconds,
              "step_time_s": seconds / steps, "peak_mem_gb": round(peak_memory_gb(device), 3),
              "loss_by_t_bucket": per_bucket(w_sums), "mse_by_t_bucket": per_bucket(m_sums)}
    if cfg["diffusion"]["weighting"] == PARETO:   # the bucket weights, mean over the logged steps
        weights = totals[3 + 3 * k:3 + 3 * k + cfg["diffusion"]["pareto_buckets"]]
        record["pareto_weights"] = [round(w / steps, 6) for w in weights.tolist()]
    return record


def open_tensorboard(cfg, run_dir):
    if not cfg["train"]["tensorboard"]:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:   # optional dependency
        return None
    return SummaryWriter(run_dir / "tensorboard")


def truncate_metrics(path, step):
    """Drop lines logged after the checkpoint we resume from: those steps are about to be redone."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        atomic_write(path, lambda f: f.write("".join(ln + "\n" for ln in lines).encode()))


# ----------------------------------------------------------------------------------------------------
# Main


STOP = {"requested": False}


def request_stop(signum, frame):
    """SIGTERM/SIGINT: finish the step, save, exit 0. Further SIGTERMs change nothing: a job scheduler
    signals the whole process group and torchrun forwards its own SIGTERM too, so a worker gets two,
    and the second must not kill the save (torchrun sends SIGKILL after its own grace period). A second
    Ctrl-C interrupts as usual."""
    STOP["requested"] = True
    signal.signal(signal.SIGINT, signal.default_int_handler)


class StopVote:
    """Whether any rank was asked to stop, agreed without waiting for the device: each step casts this
    rank's STOP asynchronously over a CPU (gloo) group and reads the previous step's result, so every
    rank stops after the same step, one or two steps after the signal. Sharing the log step's all-reduce
    instead would put up to log_every steps between SIGTERM and the save: longer, on a large model, than
    the 30 s torchrun waits before it sends SIGKILL."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo")
        self.pending = None

    def agreed(self):
        """The previous call's result (False on the first call); casts this call's vote."""
        stop = self.wait()
        vote = torch.tensor([float(STOP["requested"])])   # host memory: reading it syncs nothing
        self.pending = vote, dist.all_reduce(vote, group=self.group, async_op=True)
        return stop

    def wait(self):
        if self.pending is None:
            return False
        vote, work = self.pending
        work.wait()
        self.pending = None
        return vote.item() > 0


def run_settings(margs, dargs, store):
    """What the weights of a run mean, as dotted keys: the model, the whole diffusion, the data space.
    Recorded in <run>/run.json; a run resumes only under the same values (steps, batch, world size,
    logging and checkpoint cadence may change)."""
    return flatten({"model": margs, "diffusion": dargs,
                    "data": {"mode": store.manifest["mode"], "image_size": store.manifest["image_size"]}})


def check_resumable(run_dir, settings):
    """A run directory that holds checkpoints or exports continues only under its recorded settings:
    one line naming the first changed key and both values, before anything in it is touched."""
    recorded = run_dir / "run.json"
    if not (recorded.exists() and any((run_dir / "checkpoints").glob("step-*"))):
        return
    before = json.loads(recorded.read_text())
    for key in sorted(before.keys() | settings.keys()):
        if before.get(key) != settings.get(key):
            fail(f"{run_dir} was trained with {key}={before.get(key)!r}, this config and data store give "
                 f"{settings.get(key)!r}: resume with the run's settings ({recorded}), or choose another run.name")


def one_line(error):
    """'Type: first line' of an exception; for DCP's CheckpointException, of the first rank's cause."""
    if isinstance(error, CheckpointException):
        error = next(iter(error.failures.values()))[0]
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def load_newest(run_dir, model, ema, optimizer, world):
    """Restore the newest complete checkpoint that loads. One that does not (a shard or .metadata cut
    short by a dead node or a full disk) is reported, set aside as step-XXXXXXX.damaged (never deleted)
    and the previous one tried. Returns (step, samples_seen, path), or None when there is nothing to
    resume; refuses to start over when all there was is damaged."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            step, samples_seen = load_checkpoint(path, model, ema, optimizer, world)
            error = None
        except (Exception, CheckpointException) as e:  # DCP's (a BaseException) comes on every rank
            error = e
        failed = torch.tensor([float(error is not None)], device=world.device)
        dist.all_reduce(failed)   # all ranks set the same checkpoint aside, even if only one failed
        if failed.item() == 0:
            return step, samples_seen, path
        aside = path.with_name(path.name + ".damaged")
        if world.is_main:
            n = 1
            while aside.exists():
                n += 1
                aside = path.with_name(f"{path.name}.damaged{n}")
            path.rename(aside)
            reason = one_line(error) if error else "it failed on another rank"
            print(f"train.py: {path.name} does not load ({reason}); set aside as {aside.name}", flush=True)
        barrier()
    damaged = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.damaged*"))
    if damaged:
        fail(f"no checkpoint of {run_dir} loads (set aside: {', '.join(damaged)}): move them out of "
             f"{run_dir / 'checkpoints'} to start this run over, or choose another run.name")
    return None


def fail(message):
    if int(os.environ.get("RANK", 0)) == 0:
        # On a line of its own even when the progress bar (stderr, no newline) is showing.
        print(f"\ntrain.py: error: {message}", file=sys.stderr, flush=True)
    cleanup_distributed()
    sys.exit(1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--config", help="YAML file overriding train.py's DEFAULTS")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set optim.lr=2e-4 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(DEFAULTS, args.config, args.set)
        validate(cfg)
    except ConfigError as e:
        fail(str(e))
    if args.print_config:
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return
    run_name = cfg["run"]["name"] or (Path(args.config).stem if args.config else "default")
    try:
        store = open_store(cfg["data"]["path"], mode=cfg["data"]["mode"], image_size=cfg["data"]["image_size"])
    except (OSError, ValueError) as e:
        fail(str(e))
    run_dir = Path(cfg["run"]["results_dir"]) / run_name
    margs = model_args(cfg, store)
    dargs = {**cfg["diffusion"], "learn_sigma": cfg["model"]["learn_sigma"]}
    try:
        diffusion = GaussianDiffusion(**dargs)
    except ValueError as e:
        fail(str(e))
    settings = run_settings(margs, dargs, store)
    check_resumable(run_dir, settings)
    world = init_distributed()
    if world.device.type == "cuda":
        torch.set_float32_matmul_precision("high")   # TF32 for fp32 matmuls, as DiT trains
    t_cfg, seed = cfg["train"], cfg["run"]["seed"]
    batch, accum = t_cfg["global_batch_size"], t_cfg["grad_accum"]
    if batch % (world.world_size * accum):
        fail(f"train.global_batch_size {batch} is not divisible by world size {world.world_size} "
             f"x train.grad_accum {accum}")
    local_batch, micro = batch // world.world_size, batch // world.world_size // accum

    export_args = {"config": cfg, "model_args": margs, "diffusion_args": dargs,
                   "data": {"mode": store.manifest["mode"], "image_size": store.manifest["image_size"],
                            "vae": store.manifest.get("vae"), "scale_factor": store.manifest.get("scale_factor"),
                            "class_names": list(store.class_names)}}
    vae = samples_vae(cfg, store, world)
    if world.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.yaml", lambda f: f.write(yaml.safe_dump(cfg, sort_keys=False).encode()))
        atomic_write(run_dir / "run.json", lambda f: f.write(json.dumps(settings, indent=1).encode()))
    barrier()

    model, ema = build_models(cfg, margs, world.device)
    optimizer = build_optimizer(cfg, model, world.device)
    # Per-rank global RNG, saved per rank in checkpoints. The step itself draws nothing from it: t, noise,
    # flips and label dropout come from step_randomness, so they do not depend on the world size.
    torch.manual_seed(seed_for(seed, RANK_STREAM, world.rank))
    step, samples_seen = 0, 0
    resumed = load_newest(run_dir, model, ema, optimizer, world)
    if resumed:
        step, samples_seen, path = resumed
        if world.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", step)
            print(f"train.py: resumed from {path} (step {step})", flush=True)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    stop_vote = StopVote()
    tb = open_tensorboard(cfg, run_dir) if world.is_main else None
    shape = tuple(store.manifest["shape"])
    num_buckets = t_cfg["num_buckets"]
    every_log, every_save, every_export = t_cfg["log_every"], cfg["checkpoint"]["every"], cfg["checkpoint"]["export_every"]
    # Device-side running values, read only at sync points: the stats' sums since the last log step, and
    # the first step (1-based) whose loss or gradient norm was not finite (inf: none yet).
    totals, logged_steps, t_log = 0, 0, time.perf_counter()
    first_bad = torch.full((), math.inf, dtype=torch.float64, device=world.device)
    bar = tqdm(total=t_cfg["steps"], initial=step, disable=not world.is_main, dynamic_ncols=True, desc=run_name)
    model.train()

    # A step that neither logs nor saves never waits for the device: it reads no device value (the
    # gradient norm, the loss and the non-finite check stay on the device; the stop flag is a host-side
    # vote), and its batch reaches the device by asynchronous copies. So the host prepares the next batch
    # and queues its work while the device still runs this step. tests/test_train.py counts the reads.
    while step < t_cfg["steps"]:
        # This rank's rows [rank*local_batch, (rank+1)*local_batch) of the global batch; micro-batches
        # are contiguous sub-slices of those rows.
        rows = range(world.rank * local_batch, (world.rank + 1) * local_batch)
        indices = sample_indices(seed, len(store), samples_seen + rows.start, local_batch)
        t, flips, noise, posterior_noise, drop_label = step_randomness(
            seed, step, diffusion, rows, shape, cfg["model"]["class_dropout_prob"])
        flips &= cfg["data"]["random_flip"]
        x0, y = store.read_model(indices, flips, posterior_noise)
        y = torch.where(drop_label, store.num_classes, y)   # the null label trains the unconditional model
        x0, y, t, noise = (to_device(a, world.device) for a in (x0, y, t, noise))
        micro_batches = [(x0[i:i + micro], y[i:i + micro], t[i:i + micro], noise[i:i + micro])
                         for i in range(0, local_batch, micro)]

        stats = forward_backward(model, diffusion, micro_batches, num_buckets)
        grad_norm = clip_gradients(model, cfg["optim"]["grad_clip"])
        finite = torch.isfinite(stats[0]) & torch.isfinite(grad_norm)
        first_bad = torch.where(finite, first_bad, first_bad.clamp(max=step + 1))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        samples_seen += batch
        decay = min(t_cfg["ema_decay"], (1 + step) / (10 + step)) if t_cfg["ema_warmup"] else t_cfg["ema_decay"]
        update_ema(ema, model, decay)
        totals, logged_steps = totals + stats, logged_steps + 1
        bar.update(1)

        stop = stop_vote.agreed()
        log_now = step % every_log == 0 or step == t_cfg["steps"]
        save_now = step % every_save == 0 or step == t_cfg["steps"] or stop
        export_now = every_export > 0 and step % every_export == 0 and step != t_cfg["steps"]
        sample_now = t_cfg["sample_every"] > 0 and (step % t_cfg["sample_every"] == 0 or step == t_cfg["steps"])
        # A non-finite step is caught here, before any checkpoint, export or grid could hold its weights.
        bad = first_non_finite(first_bad) if log_now or save_now or export_now or sample_now else None
        if bad is not None:
            bar.close()
            newest = checkpoint_dirs(run_dir)
            fail(f"non-finite loss or gradient norm at step {bad}; found at step {step} (checked every log "
                 f"step and before every save), stopped without saving, last checkpoint: "
                 f"{newest[-1].name if newest else 'none'}")
        if log_now:
            dist.all_reduce(totals)
            seconds = time.perf_counter() - t_log
            record = metrics_record(step, totals.cpu(), logged_steps, seconds, cfg, grad_norm.item(), world.device)
            if world.is_main:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
                if tb is not None:
                    for key, value in record.items():
                        if isinstance(value, float):
                            tb.add_scalar(key, value, step)
            totals, logged_steps, t_log = 0, 0, time.perf_counter()

        if save_now:
            save_checkpoint(run_dir, model, ema, optimizer, step, samples_seen, world, cfg["checkpoint"]["keep_last"])
        if export_now:
            export_checkpoint(run_dir / "checkpoints" / f"step-{step:07d}.pt", model, ema,
                              {**export_args, "step": step}, world)
        if sample_now:
            write_samples(run_dir / "samples" / f"step-{step:07d}.png", ema, diffusion, cfg, store, vae, world)
        if stop:
            if world.is_main:
                print(f"\ntrain.py: stopped by signal after step {step}; checkpoint saved", flush=True)
            break
    stop_vote.wait()   # the last step's vote: no collective left unfinished
    bar.close()

    if step >= t_cfg["steps"]:   # also when resumed at the end: a crash may have come before the export
        export_checkpoint(run_dir / "checkpoints" / f"step-{step:07d}.pt", model, ema,
                          {**export_args, "step": step}, world)
    if tb is not None:
        tb.close()
    cleanup_distributed()


if __name__ == "__main__":
    main()
