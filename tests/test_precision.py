"""CPU stand-ins for what only GPUs run in practice: bf16 compute under FSDP2's MixedPrecisionPolicy and
per-block torch.compile (gcc is enough for the CPU backend), in train.py's own step functions in a world
of one and under torchrun with 2 gloo ranks, with resume; bf16 sampling.

Tolerances are set from measurements on the 2-core development machine (2026-12-02, torch 2.14, values
in the tests' docstrings) with a margin, so a real change in numerics fails them."""
import copy
import json

import numpy as np
import pytest
import torch

import sample
import train
from diffusion import GaussianDiffusion
from distributed import init_distributed
from test_train import launch, load_dcp, max_diff, tiny_args

MODEL = {"name": "DiT-Ti/4", "input_size": 16, "in_channels": 3, "num_classes": 4, "learn_sigma": False,
         "class_dropout_prob": 0.1}


def fixed_batch(n=8):
    g = torch.Generator().manual_seed(0)
    d = GaussianDiffusion()
    x0, y = torch.randn(n, 3, 16, 16, generator=g).clamp(-1, 1), torch.randint(0, 4, (n,), generator=g)
    return d, (x0, y, d.sample_timesteps(n, generator=g), torch.randn(n, 3, 16, 16, generator=g))


def build(precision="fp32", compile_blocks=False):
    """train.py's FSDP2 model (world of one) with the given precision, weights moved off adaLN-Zero's
    all-zero output so that every layer gets a gradient."""
    cfg = copy.deepcopy(train.DEFAULTS)
    cfg["train"]["precision"], cfg["model"]["compile"] = precision, compile_blocks
    model, _ = train.build_models(cfg, MODEL, init_distributed().device)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().add_(0.02 * torch.randn(p.to_local().shape, generator=g))
    return model


def gradient(model, diffusion, batch):
    train.forward_backward(model, diffusion, [batch], num_buckets=10)
    return torch.cat([p.grad.full_tensor().flatten().double() for p in model.parameters() if p.grad is not None])


def relative_error(a, b):
    return ((a - b).norm() / a.norm()).item()


def test_bf16_gradients_are_close_to_fp32():
    """bf16 compute, fp32 master weights and gradient reduction: the gradient differs from the fp32 one
    by 5.2e-3 relative (measured) — bf16 really ran — and points the same way."""
    diffusion, batch = fixed_batch()
    fp32, bf16 = gradient(build("fp32"), diffusion, batch), gradient(build("bf16"), diffusion, batch)
    print(f"bf16 vs fp32 gradient: relative error {relative_error(fp32, bf16):.2e}")
    assert 1e-4 < relative_error(fp32, bf16) < 2e-2
    assert torch.nn.functional.cosine_similarity(fp32, bf16, dim=0) > 0.999


def test_compiled_blocks_equal_eager():
    """Per-block torch.compile (inductor, CPU): loss and gradient equal eager to float rounding
    (gradient 1.3e-7 relative, measured)."""
    diffusion, batch = fixed_batch()
    eager, compiled = build(), build(compile_blocks=True)
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)   # nn.Module.compile() ran
    assert relative_error(gradient(eager, diffusion, batch), gradient(compiled, diffusion, batch)) < 1e-5


def test_bf16_loss_falls_on_a_fixed_batch():
    """30 AdamW steps of train.py's bf16 step on one batch: finite losses, the last below half the first."""
    diffusion, batch = fixed_batch()
    model, cfg = build("bf16"), copy.deepcopy(train.DEFAULTS)
    cfg["optim"]["lr"] = 1e-3
    optimizer = train.build_optimizer(cfg, model, torch.device("cpu"))
    losses = []
    for _ in range(30):
        stats = train.forward_backward(model, diffusion, [batch], num_buckets=10)
        losses.append((stats[0] / stats[2]).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses


@pytest.fixture(scope="module")
def data(make_store, tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "pixels")


@pytest.fixture(scope="module")
def eager_fp32(data, tmp_path_factory):
    results = tmp_path_factory.mktemp("eager")
    launch(tiny_args(data, results, "run", "train.steps=4", "checkpoint.every=2"), 2)
    return results / "run"


def test_bf16_training_under_torchrun_resumes_bitwise(data, tmp_path):
    """2 gloo ranks, train.precision=bf16: 2 steps, stop, resume to 4 equals 4 steps in one go, bit for bit."""
    sets = ("train.precision=bf16", "checkpoint.every=2")
    launch(tiny_args(data, tmp_path / "straight", "run", "train.steps=4", *sets), 2)
    launch(tiny_args(data, tmp_path / "split", "run", "train.steps=2", *sets), 2)
    launch(tiny_args(data, tmp_path / "split", "run", "train.steps=4", *sets), 2)
    assert max_diff(load_dcp(tmp_path / "straight" / "run", 4, tmp_path), load_dcp(tmp_path / "split" / "run", 4, tmp_path),
                    {"model", "ema", "optim", "rng"}) == 0
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "split" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(np.isfinite(losses))


def test_compiled_training_under_torchrun_resumes_and_matches_eager(data, eager_fp32, tmp_path):
    """2 gloo ranks, model.compile=true: 2 steps, stop, resume to 4 (compiling again) ends where the eager
    fp32 run ends, to float tolerance (the kernels differ, the arithmetic does not; 1.0e-7 measured)."""
    sets = ("model.compile=true", "checkpoint.every=2")
    launch(tiny_args(data, tmp_path, "run", "train.steps=2", *sets), 2)
    proc = launch(tiny_args(data, tmp_path, "run", "train.steps=4", *sets), 2)
    assert "resumed from" in proc.stdout
    diff = max_diff(load_dcp(eager_fp32, 4, tmp_path), load_dcp(tmp_path / "run", 4, tmp_path), {"model", "ema", "optim"})
    print(f"compiled + resumed vs eager after 4 steps: max abs difference {diff:.2e}")
    assert diff < 1e-5


def test_bf16_sampling_is_close_to_fp32(make_export, tmp_path):
    """sample.py --precision bf16 autocasts the network only: the images differ from fp32's by a little
    (mean 0.087 grey levels, measured, on 8 px images of a random DiT-Ti/2), not by much, and not by nothing."""
    ckpt = make_export(tmp_path / "export.pt")
    images = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.npz"
        sample.main(["--ckpt", str(ckpt), "--sampler", "ddim", "--steps", "5", "--num-samples", "6",
                     "--precision", precision, "--out", str(out)])
        with np.load(out) as f:
            images[precision] = f["arr_0"].astype(np.float64)
    diff = np.abs(images["fp32"] - images["bf16"]).mean()
    print(f"bf16 vs fp32 sampling: mean |diff| {diff:.3f} grey levels")
    assert 0 < diff < 1, diff
