"""Training throughput (images/s) and model FLOP utilisation of train.py's step, on synthetic data.

    python -m bench.bench_train --models DiT-Ti/4 --input-size 32 --in-channels 3 --batch-size 32   # CPU
    python -m bench.bench_train --models DiT-B/2 DiT-XL/2 --input-size 32 --in-channels 4 \\
        --batch-size 64 --dtype bf16 --compile both --checkpointing both                      # one GPU
    python -m bench.bench_train --randomness --global-batch 256 2048 --ranks 1 2 8              # per-rank draws

The step is train.py's own (FSDP2 world of one, MixedPrecisionPolicy, AdamW, grad-norm, EMA update);
only the data is synthetic. MFU = model FLOPs per second / the matmul rate measured in the same run,
same device and dtype (a large square matmul), so it reads "fraction of attainable matmul throughput".

Model FLOPs are counted analytically from one forward pass at batch 1: 2·in·out per token for every
Linear, 2·weight·positions for convolutions, 4·T²·D per attention call (QKᵀ and AV). Training FLOPs =
3 × forward (backward ≈ 2 × forward). The recomputation of activation checkpointing is not counted,
so a checkpointed run shows a lower MFU for the same hardware work, as is the convention.
"""
import argparse
import copy
import itertools
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from config import HelpFormatter
from diffusion import PARETO, WEIGHTINGS, GaussianDiffusion
from distributed import cleanup_distributed, init_distributed
from models import ALL_MODELS


def forward_flops_per_image(name, input_size, in_channels, learn_sigma):
    """Analytic forward FLOPs for one image, from the layer shapes seen in one forward pass."""
    model = ALL_MODELS[name](input_size=input_size, in_channels=in_channels, num_classes=1000,
                             learn_sigma=learn_sigma, class_dropout_prob=0.1).eval()
    total = 0

    def count_layer(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features * (inputs[0].numel() // module.in_features)
        else:   # Conv2d: each output position is a dot product over the weight's fan-in
            total += 2 * module.weight[0].numel() * output.numel()

    def count_attention(q, k, v, *args, **kwargs):
        nonlocal total
        total += 4 * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1]   # 4·T²·D summed over heads
        return sdpa(q, k, v, *args, **kwargs)

    hooks = [m.register_forward_hook(count_layer) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, count_attention
    try:
        with torch.no_grad():
            model(torch.randn(1, in_channels, input_size, input_size), torch.tensor([500]), torch.tensor([0]))
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return total, params


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, dtype, n, repeats=10, rounds=3):
    """Achieved FLOP/s of an n×n @ n×n matmul, best of `rounds`: the attainable ceiling MFU is measured
    against (best-of, so a busy machine does not inflate the MFU)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
    return best


PHASES = ("randomness", "forward_backward", "grad_norm", "optimizer", "ema")


def plain_models(cfg, margs, device):
    """The reference the FSDP2 path is measured against: the same model, EMA twin and optimizer settings
    on a plain module (no sharding, no DTensor), fp32."""
    torch.manual_seed(cfg["run"]["seed"])
    model = ALL_MODELS[margs["name"]](**{k: v for k, v in margs.items() if k != "name"}).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    model.gradient_checkpointing = cfg["model"]["gradient_checkpointing"]
    if cfg["model"]["compile"]:
        for block in model.blocks:
            block.compile()
    return model, ema


@torch.no_grad()
def plain_update_ema(ema, model, decay):
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def bench_one(args, world, name, compiled, checkpointing, sharded, diffusion):
    """Seconds per phase of train.py's step for `name` (mean over the timed steps, after warm-up) and
    peak memory. Each phase is timed between device synchronisations, so on a GPU the split hides the
    overlap a real step has; the sum is the step time without that overlap."""
    cfg = copy.deepcopy(train.DEFAULTS)
    cfg["model"].update(name=name, learn_sigma=args.learn_sigma, compile=compiled, gradient_checkpointing=checkpointing)
    cfg["train"]["precision"] = args.dtype
    margs = {"name": name, "input_size": args.input_size, "in_channels": args.in_channels, "num_classes": 1000,
             "learn_sigma": args.learn_sigma, "class_dropout_prob": 0.1}
    model, ema = (train.build_models if sharded else plain_models)(cfg, margs, world.device)
    update_ema = train.update_ema if sharded else plain_update_ema
    optimizer = train.build_optimizer(cfg, model, world.device)
    b, c, s = args.batch_size, args.in_channels, args.input_size
    batch = (torch.randn(b, c, s, s, device=world.device), torch.randint(0, 1000, (b,), device=world.device),
             diffusion.sample_timesteps(b, device=world.device), torch.randn(b, c, s, s, device=world.device))
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(world.device)
    seconds = dict.fromkeys(PHASES, 0.0)

    def timed(phase, fn, step):
        synchronize(world.device)
        start = time.perf_counter()
        fn()
        synchronize(world.device)
        if step >= args.warmup:
            seconds[phase] += (time.perf_counter() - start) / args.steps

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup + args.steps):
        timed("randomness", lambda: train.step_randomness(0, i, diffusion, range(b), (c, s, s), 0.1), i)
        timed("forward_backward", lambda: train.forward_backward(model, diffusion, [batch], num_buckets=10), i)
        timed("grad_norm", lambda: train.clip_gradients(model, 0.0), i)
        timed("optimizer", optimizer_step, i)
        timed("ema", lambda: update_ema(ema, model, 0.9999), i)
    return seconds, train.peak_memory_gb(world.device)


def bench_randomness(args):
    """ms per step of train.step_randomness on one rank of each world size: a rank draws only its own
    rows of the global batch, so the cost should follow global batch / ranks."""
    diffusion = GaussianDiffusion()
    shape = (args.in_channels, args.input_size, args.input_size)
    print(f"step_randomness, {'x'.join(map(str, shape))} per sample: ms per step on one rank "
          f"(median of {args.steps}, {torch.get_num_threads()} threads)")
    print(f"{'global batch':>12} " + " ".join(f"{f'{r} ranks':>9}" for r in args.ranks))
    for batch in args.global_batch:
        times = []
        for ranks in args.ranks:
            rows = range(0, batch // ranks)   # rank 0's rows; every rank's cost is the same
            samples = []
            for step in range(args.warmup + args.steps):
                start = time.perf_counter()
                train.step_randomness(0, step, diffusion, rows, shape, 0.1)
                samples.append(time.perf_counter() - start)
            times.append(sorted(samples[args.warmup:])[args.steps // 2] * 1e3)
        print(f"{batch:>12} " + " ".join(f"{ms:>9.1f}" for ms in times), flush=True)


def main(argv=None):
    """Print the table; return its rows as dicts (benchmark, setting, figure, unit, extra), or nothing
    with --randomness."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", default=["DiT-Ti/4"], help="models.py names, timed one after another")
    parser.add_argument("--input-size", type=int, default=32, help="model input side (latents: image size / 8)")
    parser.add_argument("--in-channels", type=int, default=4, help="4 = SD latents, 3 = pixels")
    parser.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=True, help="DiT's learned variance")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="compute dtype (train.precision); master weights stay fp32")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off", help="per-block torch.compile")
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="off", help="activation checkpointing")
    parser.add_argument("--path", choices=["fsdp", "plain", "both"], default="fsdp",
                        help="train.py's FSDP2 step, the same step on a plain module (fp32 only), or both side by side")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="min_snr", help="the static loss weighting")
    parser.add_argument("--pareto-buckets", type=int, nargs="*", default=[], metavar="K",
                        help="also time weighting pareto with K buckets (K passes per micro-batch, a Gram matrix, a solve)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--matmul-size", type=int, default=None, help="side of the peak-rate matmul (default: 8192 GPU, 1024 CPU)")
    parser.add_argument("--randomness", action="store_true",
                        help="only time the per-rank randomness at --global-batch x --ranks (no model)")
    parser.add_argument("--global-batch", type=int, nargs="+", default=[256, 2048], help="global batch sizes (with --randomness)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 8], help="world sizes whose rank-0 share is timed (with --randomness)")
    args = parser.parse_args(argv)
    if args.randomness:
        return bench_randomness(args)
    if args.path != "fsdp" and args.dtype != "fp32":
        parser.error("--path plain/both compares fp32 steps: bf16 on a plain module would need autocast, not train.py's step")
    try:
        losses = [(args.weighting, GaussianDiffusion(learn_sigma=args.learn_sigma, weighting=args.weighting))]
        losses += [(f"pareto-{k}", GaussianDiffusion(learn_sigma=args.learn_sigma, weighting=PARETO, pareto_buckets=k))
                   for k in args.pareto_buckets]
    except ValueError as e:
        parser.error(str(e))

    world = init_distributed()
    if world.device.type == "cuda":
        torch.set_float32_matmul_precision("high")   # as train.py
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    n = args.matmul_size or (8192 if world.device.type == "cuda" else 1024)
    peak = matmul_peak(world.device, dtype, n)
    device_name = torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; torch {torch.__version__}; measured {args.dtype} matmul peak "
          f"({n}x{n}): {peak / 1e12:.2f} TFLOP/s")
    print(f"batch {args.batch_size}, input {args.in_channels}x{args.input_size}x{args.input_size}, "
          f"learn_sigma {args.learn_sigma}; GFLOP/img = training FLOPs per image = 3 x analytic forward (recompute not counted)")
    print(f"{'model':<10} {'path':>5} {'loss':>9} {'params':>8} {'GFLOP/img':>10} {'dtype':>5} {'compile':>7} {'ckpt':>4} "
          f"{'img/s':>9} {'step ms':>9} {'TFLOP/s':>8} {'MFU':>6} {'mem GB':>7}  ms per phase: "
          + ", ".join(PHASES) + " (optimizer+EMA share)")
    choices = {"off": [False], "on": [True], "both": [False, True]}
    paths = {"fsdp": [True], "plain": [False], "both": [True, False]}[args.path]
    rows = []
    for name in args.models:
        forward, params = forward_flops_per_image(name, args.input_size, args.in_channels, args.learn_sigma)
        for sharded, compiled, checkpointing, (loss, diffusion) in itertools.product(
                paths, choices[args.compile], choices[args.checkpointing], losses):
            phases, memory = bench_one(args, world, name, compiled, checkpointing, sharded, diffusion)
            if world.device.type == "cuda":
                torch.cuda.empty_cache()   # the last configuration's model is gone; its cache need not stay
            seconds = sum(phases.values())
            share = (phases["optimizer"] + phases["ema"]) / seconds
            images = args.batch_size / seconds
            achieved = 3 * forward * images
            path = "fsdp2" if sharded else "plain"
            split = ", ".join(f"{phases[k] * 1e3:.1f}" for k in PHASES)
            print(f"{name:<10} {path:>5} {loss:>9} {params / 1e6:>7.1f}M {3 * forward / 1e9:>10.2f} {args.dtype:>5} "
                  f"{'on' if compiled else 'off':>7} {'on' if checkpointing else 'off':>4} {images:>9.1f} "
                  f"{seconds * 1e3:>9.1f} {achieved / 1e12:>8.3f} {achieved / peak:>6.1%} {memory:>7.2f}  "
                  f"{split} ({share:.0%})", flush=True)
            rows.append({"benchmark": "train", "figure": round(images, 1), "unit": "img/s",
                         "setting": f"{name} {path} {loss} {args.in_channels}x{args.input_size}x{args.input_size} "
                                    f"b{args.batch_size} {args.dtype} compile {'on' if compiled else 'off'} "
                                    f"ckpt {'on' if checkpointing else 'off'}",
                         "extra": f"MFU {achieved / peak:.0%} of {peak / 1e12:.2f} TFLOP/s {args.dtype} matmul, "
                                  f"{memory:.2f} GB; ms {', '.join(f'{k} {phases[k] * 1e3:.1f}' for k in PHASES)}; "
                                  f"optimizer+EMA {share:.0%}"})
    cleanup_distributed()
    return rows


if __name__ == "__main__":
    main()
