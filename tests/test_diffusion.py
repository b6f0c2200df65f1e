"""Tests of diffusion.py: weights against their closed forms, schedules, the loss reduction, the VB
term, and the samplers against a Gaussian data distribution whose optimal denoiser is known exactly."""
import math
from unittest import mock

import numpy as np
import pytest
import torch

from diffusion import (TARGETS, WEIGHTINGS, GaussianDiffusion, guided_model_fn, loss_weight,
                       randn_like_batch, respace_timesteps)

GAMMA = 5.0


# ----------------------------------------------------------------------------------------------
# Loss weights

def naive_weight(snr, weighting, target, gamma=GAMMA):
    """The paper's definition written directly (finite, positive SNR only)."""
    w = {"const": 1.0, "snr": snr, "snr_plus_one": snr + 1, "max_snr": max(snr, gamma), "min_snr": min(snr, gamma),
         "soft_min_snr": 1 / (1 / snr + 1 / gamma)}[weighting]
    return {"x0": w, "eps": w / snr, "v": w / (snr + 1)}[target]


# Limits at SNR = 0 and SNR = inf; None = genuinely infinite (must raise).
LIMITS = {
    0.0: {"x0": dict(const=1, snr=0, snr_plus_one=1, max_snr=GAMMA, min_snr=0, soft_min_snr=0),
          "eps": dict(const=None, snr=1, snr_plus_one=None, max_snr=None, min_snr=1, soft_min_snr=1),
          "v": dict(const=1, snr=0, snr_plus_one=1, max_snr=GAMMA, min_snr=0, soft_min_snr=0)},
    math.inf: {"x0": dict(const=1, snr=None, snr_plus_one=None, max_snr=None, min_snr=GAMMA, soft_min_snr=GAMMA),
               "eps": dict(const=0, snr=1, snr_plus_one=1, max_snr=1, min_snr=0, soft_min_snr=0),
               "v": dict(const=0, snr=1, snr_plus_one=1, max_snr=1, min_snr=0, soft_min_snr=0)},
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_loss_weight_closed_form(weighting, target):
    snrs = [1e-9, 1e-3, 0.1, 1.0, 4.5, GAMMA, 5.5, 100.0, 2.4e4, 1e12]
    got = loss_weight(torch.tensor(snrs, dtype=torch.float64), weighting, target, GAMMA)
    want = torch.tensor([naive_weight(s, weighting, target) for s in snrs], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for snr, table in LIMITS.items():
        limit = table[target][weighting]
        if limit is None:
            with pytest.raises(ValueError, match="infinite"):
                loss_weight(torch.tensor([1.0, snr], dtype=torch.float64), weighting, target, GAMMA)
        else:
            w = loss_weight(torch.tensor([snr], dtype=torch.float64), weighting, target, GAMMA)
            assert torch.isfinite(w).all() and w.item() == pytest.approx(limit, abs=1e-12)


def test_v_weight_is_min_snr_over_snr_plus_one():
    # The known library bug used min(SNR + 1, γ)/(SNR + 1); at SNR = 4.5 the two differ.
    w = loss_weight(torch.tensor([4.5], dtype=torch.float64), "min_snr", "v", GAMMA)
    assert w.item() == pytest.approx(4.5 / 5.5) and w.item() != pytest.approx(5.0 / 5.5)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="min_snr"):
        loss_weight(torch.ones(2), "truncated_snr", "eps")
    with pytest.raises(ValueError, match="'v'"):
        loss_weight(torch.ones(2), "min_snr", "score")
    with pytest.raises(ValueError, match="min_snr"):
        GaussianDiffusion(weighting="minsnr")
    with pytest.raises(ValueError, match="cosine"):
        GaussianDiffusion(schedule="sqrt")
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        GaussianDiffusion(target="eps", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="heun"):
        GaussianDiffusion().sample(lambda x, t: x, (2, 1), sampler="euler")


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_weighted_losses_agree_across_targets(weighting):
    """ε-MSE·w/SNR = x0-MSE·w and v-MSE·w/(SNR+1) = x0-MSE·w for any prediction (docs/reference.md §1)."""
    g = torch.Generator().manual_seed(0)
    d = GaussianDiffusion("cosine", target="eps", weighting=weighting)
    x0, noise, t = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64), \
        torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 1000, (64,), generator=g)
    x_t = d.q_sample(x0, t, noise)
    a = d.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    s = d.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    snr = d.snr[t]
    mse = lambda p, q: ((p - q) ** 2).flatten(1).mean(1)

    eps_hat = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x0_hat, _ = d.to_x0_eps(eps_hat, x_t, t, "eps")
    torch.testing.assert_close(mse(eps_hat, noise) * loss_weight(snr, weighting, "eps"),
                               mse(x0_hat, x0) * loss_weight(snr, weighting, "x0"), rtol=1e-9, atol=0)

    v_hat = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x0_hat, _ = d.to_x0_eps(v_hat, x_t, t, "v")
    torch.testing.assert_close(mse(v_hat, a * noise - s * x0) * loss_weight(snr, weighting, "v"),
                               mse(x0_hat, x0) * loss_weight(snr, weighting, "x0"), rtol=1e-9, atol=0)


@pytest.mark.parametrize("target", TARGETS)
def test_conversions_invert_the_targets(target):
    d = GaussianDiffusion("linear", target=target)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(16, 2, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (16,), generator=g)
    x0_back, eps_back = d.to_x0_eps(d.target_of(x0, t, noise), d.q_sample(x0, t, noise), t)
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(eps_back, noise, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Schedules and respacing

def test_linear_schedule():
    d = GaussianDiffusion("linear")
    ab = d.alphas_cumprod
    assert ab.dtype == torch.float64 and ab.shape == (1000,)
    assert ab[0].item() == 1 - 1e-4
    assert d.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert (ab[1:] < ab[:-1]).all() and 0 < ab[-1] < 1e-4


def test_cosine_schedule():
    d = GaussianDiffusion("cosine")
    ab = d.alphas_cumprod
    assert (ab[1:] < ab[:-1]).all() and ab[0] > 0.9999 and 0 < ab[-1] < 1e-8
    assert d.betas.max().item() == pytest.approx(0.999)  # the clip is active at the end
    # SNR spans ≈2.4e4 .. 2.4e-9 (docs/reference.md §1).
    assert 2e4 < d.snr[0] < 3e4 and 1e-9 < d.snr[-1] < 5e-9


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_zero_terminal_snr(schedule):
    plain = GaussianDiffusion(schedule, target="v")
    d = GaussianDiffusion(schedule, target="v", zero_terminal_snr=True)
    assert d.alphas_cumprod[-1].item() == 0.0 and d.snr[-1].item() == 0.0
    assert d.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)
    assert (d.alphas_cumprod[1:] < d.alphas_cumprod[:-1]).all()
    assert torch.isfinite(d.loss_weights).all() and torch.isfinite(d.posterior_log_variance_clipped).all()


@pytest.mark.parametrize("T,steps", [(1000, 250), (1000, 50), (1000, 21), (1000, 1000), (4000, 7), (10, 2)])
def test_respacing(T, steps):
    ts = respace_timesteps(T, steps)
    assert len(ts) == steps and ts[0] == 0 and ts[-1] == T - 1
    assert (ts[1:] > ts[:-1]).all()
    # Evenly spaced: every kept step is within one rounding of i·(T−1)/(steps−1).
    ideal = torch.arange(steps, dtype=torch.float64) * (T - 1) / (steps - 1)
    assert ((ts - ideal).abs() <= 0.5 + 1e-9).all()


def test_respacing_matches_dit_for_250_of_1000():
    # DiT samples with space_timesteps(1000, "250"): round(i·999/249), no ties occur for these counts.
    assert respace_timesteps(1000, 250).tolist() == [round(i * 999 / 249) for i in range(250)]


# ----------------------------------------------------------------------------------------------
# Training loss

def test_training_loss_reduction_by_hand():
    g = torch.Generator().manual_seed(2)
    d = GaussianDiffusion("linear", target="eps", weighting="min_snr", gamma=GAMMA)
    x0, noise = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 100, 400, 700, 999])
    out = torch.randn(6, 3, 4, 4, generator=g)
    terms = d.training_losses(out, x0, t, noise)
    mse = torch.stack([((out[i] - noise[i]) ** 2).mean() for i in range(6)])
    snr = d.alphas_cumprod[t] / (1 - d.alphas_cumprod[t])
    weight = torch.clamp(snr, max=GAMMA) / snr
    torch.testing.assert_close(terms["mse"], mse)
    torch.testing.assert_close(terms["weighted"], (weight * mse).float())
    torch.testing.assert_close(terms["loss"], (weight * mse).mean().float())
    assert "vb" not in terms


def test_bucket_sums_against_loop():
    g = torch.Generator().manual_seed(3)
    d = GaussianDiffusion(num_timesteps=1000)
    values, t = torch.rand(300, generator=g), torch.randint(0, 1000, (300,), generator=g)
    sums, counts = d.bucket_sums(values, t, num_buckets=7)
    want_sums, want_counts = np.zeros(7), np.zeros(7)
    for v, ti in zip(values.double().numpy(), t.numpy()):
        b = int(ti * 7 / 1000)
        want_sums[b] += v
        want_counts[b] += 1
    assert sums.dtype == torch.float64 and counts.dtype == torch.float64
    np.testing.assert_allclose(sums.numpy(), want_sums, rtol=1e-12)
    np.testing.assert_array_equal(counts.numpy(), want_counts)


def test_learned_sigma_vb():
    g = torch.Generator().manual_seed(4)
    d = GaussianDiffusion("linear", target="eps", learn_sigma=True)
    # Pixels on the 256-level grid, as the discretized decoder at t = 0 expects.
    x0 = torch.randint(0, 256, (8, 3, 4, 4), generator=g).float() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 0, 1, 5, 50, 300, 800, 999])

    out = torch.cat([torch.randn(x0.shape, generator=g), torch.rand(x0.shape, generator=g) * 2 - 1], 1)
    vb = d.training_losses(out, x0, t, noise)["vb"]
    assert torch.isfinite(vb).all() and (vb >= 0).all() and (vb[t > 0] > 0).all()

    # True ε and v = -1 (variance = β̃): p equals the true posterior, so KL = 0 for t > 0.
    exact = torch.cat([noise, -torch.ones_like(x0)], 1)
    vb = d.training_losses(exact, x0, t, noise)["vb"]
    assert vb[t > 0].abs().max() < 1e-5
    # At t = 0 (decoder NLL) the mean is x0 and σ = sqrt(β̃_1): −log2 of the mass of the pixel's bin
    # (half-width 1/255), whose outer side is open at x0 = ±1.
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    h = (1 / 255) / math.sqrt(d.posterior_variance[1].item())
    per_pixel = [-math.log2(phi(h)) if abs(v) == 1 else -math.log2(2 * phi(h) - 1) for v in x0[0].flatten().tolist()]
    assert vb[0].item() == pytest.approx(sum(per_pixel) / len(per_pixel), rel=1e-4)

    # True ε and v = +1 (variance = β): KL of two Gaussians with equal means, in bits.
    vb = d.training_losses(torch.cat([noise, torch.ones_like(x0)], 1), x0, t, noise)["vb"]
    beta, var = d.betas[t], d.posterior_variance[t]
    want = 0.5 * (-1 + torch.log(beta / var) + var / beta) / math.log(2)
    torch.testing.assert_close(vb[t > 0].double(), want[t > 0], rtol=1e-4, atol=1e-6)



def tanh_approx_decoder_log_likelihood(x, mean, log_scale):
    """The t = 0 decoder log-likelihood as DiT and guided-diffusion compute it, written from the formula:
    the normal CDF is replaced by its tanh approximation Φ(z) ≈ ½(1 + tanh(√(2/π)(z + 0.044715 z³))) and
    every probability (the two open end bins and the inner bins) is floored at 1e-12 before the log."""
    def approx_cdf(z):
        return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    inv_std = torch.exp(-log_scale)
    cdf_upper = approx_cdf(inv_std * (x - mean + 1 / 255))
    cdf_lower = approx_cdf(inv_std * (x - mean - 1 / 255))
    floor = lambda p: torch.log(p.clamp(min=1e-12))
    return torch.where(x < -0.999, floor(cdf_upper),
                       torch.where(x > 0.999, floor(1 - cdf_lower), floor(cdf_upper - cdf_lower)))


def decoder_case(max_offset, min_offset=0.0, batch=32, seed=0):
    """x0: every uint8 level once per sample (1×16×16, so 2 of 256 pixels sit in the open end bins);
    model mean = x0 ± an offset drawn uniformly from [min_offset, max_offset]; variance interpolation
    uniform in [-1, 1] (the t = 0 range [β̃_1, β_0]). Returns (model output of an x0-predicting
    learned-σ model, x0)."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.stack([torch.randperm(256, generator=g) for _ in range(batch)]).view(batch, 1, 16, 16)
    x0 = levels.float() / 127.5 - 1
    sign = torch.randint(0, 2, x0.shape, generator=g).float() * 2 - 1
    offset = sign * (min_offset + (max_offset - min_offset) * torch.rand(x0.shape, generator=g))
    var_interp = torch.rand(x0.shape, generator=g) * 2 - 1
    return torch.cat([x0 + offset, var_interp], 1), x0


def vb_with_decoder(out, x0, t, decoder=None):
    """training_losses' "vb" of an x0-predicting learned-σ model on the linear schedule, with the t = 0
    decoder log-likelihood optionally replaced by `decoder` (same signature as diffusion's)."""
    import diffusion

    d = GaussianDiffusion("linear", target="x0", learn_sigma=True)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    if decoder is None:
        return d.training_losses(out, x0, t, noise)["vb"]
    with mock.patch.object(diffusion, "_discretized_gaussian_log_likelihood", decoder):
        return d.training_losses(out, x0, t, noise)["vb"]


def decoder_differences():
    """{case: (DiT's t = 0 VB − ours) per sample, bits/dim} for the good and the poor prediction."""
    diffs = {}
    for name, case in (("good", decoder_case(1 / 255)), ("poor", decoder_case(0.5, min_offset=0.1))):
        t0 = torch.zeros(len(case[1]), dtype=torch.long)
        diffs[name] = vb_with_decoder(*case, t0, tanh_approx_decoder_log_likelihood) - vb_with_decoder(*case, t0)
    return diffs


def test_vb_decoder_exact_cdf_vs_dit_tanh_approximation():
    """Our t = 0 decoder NLL uses the exact normal CDF; DiT's uses the tanh approximation with a 1e-12
    floor (docs/reference.md §2). (a) For t > 0 the VB term is a Gaussian KL and does not touch the
    decoder. (b) At t = 0 the two differ, by amounts measured with this test's cases (float32, bits/dim
    = per-sample mean over 256 pixels; DiT's value minus ours, printed with pytest -s):
      good prediction (mean within ±1/255 of x0): +3.4e-4 .. +3.8e-4 per sample (ours lower);
      poor prediction (mean off by 0.1 .. 0.5): −4.4 on the batch mean, down to −14.0 in one sample
      (ours higher) — all of it from the two open end bins, where the exact log-CDF lies far below
      log 1e-12; both floor the inner bins, which the mean misses by more than 9 σ, at 1e-12."""
    # (a) a decoder that returns NaN changes t = 0 only.
    out, x0 = decoder_case(1 / 255, batch=6)
    t = torch.tensor([0, 1, 5, 50, 300, 999])
    exact = vb_with_decoder(out, x0, t)
    broken = vb_with_decoder(out, x0, t, lambda x, mean, log_scale: torch.full_like(x, math.nan))
    assert torch.isnan(broken[0]) and torch.equal(broken[1:], exact[1:])
    assert 1.4 < exact[0] < 1.7  # the decoder NLL itself, for scale

    # (b) t = 0, same mean and variance, exact CDF vs DiT's approximation: close, but never identical.
    diffs = decoder_differences()
    print({k: f"mean {v.mean().item():+.3g}, min {v.min().item():+.3g}, max {v.max().item():+.3g}" for k, v in diffs.items()})
    assert (diffs["good"] > 1e-4).all() and (diffs["good"] < 8e-4).all()   # measured 3.4e-4 .. 3.8e-4
    poor = -diffs["poor"]
    assert 2.0 < poor.mean() < 9.0 and poor.max() < 28.0                  # measured 4.4 and 14.0
    assert (poor >= 0).all()  # in this case the floor only ever raises DiT's likelihood

def test_vb_does_not_train_the_mean():
    g = torch.Generator().manual_seed(5)
    d = GaussianDiffusion("linear", target="eps", weighting="min_snr", learn_sigma=True)
    x0, noise = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([0, 3, 200, 999])
    out = torch.randn(4, 6, 4, 4, generator=g, requires_grad=True)
    d.training_losses(out, x0, t, noise)["loss"].backward()
    mean_only = out.detach()[:, :3].clone().requires_grad_(True)
    GaussianDiffusion("linear", target="eps", weighting="min_snr").training_losses(mean_only, x0, t, noise)["loss"].backward()
    torch.testing.assert_close(out.grad[:, :3], mean_only.grad)
    assert out.grad[:, 3:].abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Samplers on Gaussian data x0 ~ N(MU, S²) per dimension

MU, S = 0.5, 0.3
N, DIM = 4000, 2


def exact_model_fn(d, learned_variance_for=None):
    """model_fn returning d.target for the optimal denoiser E[x0|x_t] = μ + αs²/(α²s² + σ²)·(x_t − αμ).

    learned_variance_for: a respaced timestep grid; if given, also output the variance interpolation
    that makes p(x_prev|x_t) the exact reverse conditional of that grid, whose variance is
    β̃ + c²·Var[x0|x_t] (c = posterior coefficient on x0, Var[x0|x_t] = s²σ²/(α²s² + σ²)).
    """
    ab = d.alphas_cumprod
    prev = {}
    if learned_variance_for is not None:
        grid = learned_variance_for.tolist()
        prev = {t: (grid[i - 1] if i > 0 else None) for i, t in enumerate(grid)}

    def fn(x, t):
        a2 = ab[t].view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        a, s2 = a2.sqrt(), 1 - a2
        x0 = MU + a * S ** 2 / (a2 * S ** 2 + s2) * (x - a * MU)
        eps = (x - a * x0) / s2.sqrt()
        out = {"eps": eps, "x0": x0, "v": a * eps - s2.sqrt() * x0}[d.target]
        if learned_variance_for is None:
            return out
        ti = int(t[0])
        if prev[ti] is None:  # last step: no noise is added, the variance is unused
            return torch.cat([out, -torch.ones_like(out)], 1)
        ab_prev = ab[prev[ti]].item()
        beta = 1 - ab[ti].item() / ab_prev
        small = beta * (1 - ab_prev) / (1 - ab[ti].item())
        c = beta * math.sqrt(ab_prev) / (1 - ab[ti].item())
        var_x0 = S ** 2 * s2 / (a2 * S ** 2 + s2)
        frac = (torch.log(small + c ** 2 * var_x0) - math.log(small)) / (math.log(beta) - math.log(small))
        assert ((frac >= 0) & (frac <= 1)).all()  # the exact variance lies in [β̃, β]
        return torch.cat([out, 2 * frac - 1], 1)
    return fn


def draw(d, model_fn, sampler, steps, eta=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(N, DIM, generator=g, dtype=torch.float64)
    return d.sample(model_fn, (N, DIM), sampler, steps, eta, generator=g, noise=noise), noise


def assert_gaussian(x, extra_std_tol=0.0):
    # 4 standard errors of the sample mean (S/√n) and of the sample std (≈ S/√(2n)), n = N·DIM values.
    n = x.numel()
    assert abs(x.mean().item() - MU) < 4 * S / math.sqrt(n)
    assert abs(x.std().item() - S) < 4 * S / math.sqrt(2 * n) + extra_std_tol * S


@pytest.mark.parametrize("target,ztsnr", [("eps", False), ("x0", False), ("v", False), ("v", True)])
def test_ddpm_exact_reverse_process_recovers_data(target, ztsnr):
    """With the exact mean and the exact reverse variance (through the learned-σ channels), ancestral
    sampling on any respaced grid is exact, so only sampling error remains."""
    d = GaussianDiffusion("linear", target=target, zero_terminal_snr=ztsnr, learn_sigma=True)
    x, _ = draw(d, exact_model_fn(d, respace_timesteps(1000, 50)), "ddpm", 50)
    assert_gaussian(x)


def with_fixed_interpolation(model_fn, v):
    return lambda x, t: torch.cat([model_fn(x, t), torch.full_like(x, v)], 1)


def test_fixed_variances_equal_the_learned_range_ends():
    """DDPM without learned σ uses β (DiT's fixed-large), i.e. the learned range at v = +1; DDIM with
    η = 1 is DDPM with β̃, the learned range at v = −1. Same seed → same samples."""
    d = GaussianDiffusion("cosine", target="eps")
    d_learned = GaussianDiffusion("cosine", target="eps", learn_sigma=True)
    fn = exact_model_fn(d)
    for (sampler, eta), v in ((("ddpm", 0.0), 1.0), (("ddim", 1.0), -1.0)):
        x, _ = draw(d, fn, sampler, 100, eta)
        x_learned, _ = draw(d_learned, with_fixed_interpolation(fn, v), "ddpm", 100)
        torch.testing.assert_close(x, x_learned, rtol=0, atol=1e-9)


@pytest.mark.parametrize("sampler,eta,bias", [("ddpm", 0.0, 0.01), ("ddim", 1.0, 0.035)])
def test_stochastic_samplers_fixed_variance(sampler, eta, bias):
    """Fixed variances only approximate the reverse variance: at 250 steps on the cosine schedule the
    std is off by +0.5% (β) and −2.5% (β̃) for this data (measured with 10⁵ samples); the mean is exact."""
    d = GaussianDiffusion("cosine", target="eps")
    x, _ = draw(d, exact_model_fn(d), sampler, 250, eta)
    assert_gaussian(x, extra_std_tol=bias)


def probability_flow_map(x_start, sigma_start):
    """Exact ODE solution from noise level σ to 0 for Gaussian data, in x = x0 + σ·ε: with y = x − μ,
    dy/dσ = y·σ/(s² + σ²), so y(0) = y(σ)·s/sqrt(s² + σ²)."""
    return MU + (x_start - MU) * S / math.sqrt(S ** 2 + sigma_start ** 2)


def rms(x):
    return x.pow(2).mean().sqrt().item()


@pytest.mark.parametrize("target", TARGETS)
def test_ddim_follows_the_probability_flow(target):
    """DDIM η = 0 is a first-order solver of the probability-flow ODE: per-sample error against the exact
    solution halves when the steps double."""
    d = GaussianDiffusion("cosine", target=target)
    ab_T = d.alphas_cumprod[-1].item()
    errors = []
    for steps in (100, 200):
        x, noise = draw(d, exact_model_fn(d), "ddim", steps, 0.0)
        # At t = T−1, x_T = α·(x0 + σ_VE·ε) with σ_VE = σ/α.
        exact = probability_flow_map(noise / math.sqrt(ab_T), math.sqrt((1 - ab_T) / ab_T))
        errors.append(rms(x - exact) / S)
    assert errors[1] < 0.015 and 1.7 < errors[0] / errors[1] < 2.3
    assert_gaussian(x, extra_std_tol=0.015)


@pytest.mark.parametrize("target,ztsnr", [("eps", False), ("x0", False), ("v", False), ("v", True)])
def test_heun_follows_the_probability_flow(target, ztsnr):
    """EDM Heun is second order: doubling the σ levels cuts the error against the exact ODE solution
    by more than 3× (≈4.5× measured); at 100 levels it is ~0.1% of the data std."""
    d = GaussianDiffusion("linear", target=target, zero_terminal_snr=ztsnr)
    errors = []
    for steps in (50, 100):
        sigmas, timesteps = d.heun_grid(steps)
        assert sigmas[0].item() == pytest.approx(80, rel=0.01) and timesteps[-1] == 0
        assert torch.equal(sigmas, d.sigmas[timesteps]) and (timesteps[1:] <= timesteps[:-1]).all()
        x, noise = draw(d, exact_model_fn(d), "heun", steps)
        errors.append(rms(x - probability_flow_map(noise * sigmas[0].item(), sigmas[0].item())) / S)
    assert errors[1] < 0.002 and errors[0] / errors[1] > 3
    assert_gaussian(x, extra_std_tol=0.002)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "heun"])
def test_per_sample_generators_do_not_depend_on_the_batch(sampler):
    d = GaussianDiffusion("linear", target="v")
    fn = exact_model_fn(d)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    batch = d.sample(fn, (4, 3), sampler, 20, eta=1.0, generator=gens([10, 11, 12, 13]))
    for i, seed in enumerate([10, 11, 12, 13]):
        alone = d.sample(fn, (1, 3), sampler, 20, eta=1.0, generator=gens([seed]))
        assert torch.equal(batch[i:i + 1], alone)
    assert not torch.equal(batch[0], batch[1])
    assert torch.equal(randn_like_batch((2, 5), gens([1, 2]))[1], torch.randn(5, generator=gens([2])[0]))


def test_clip_denoised_bounds_the_prediction():
    d = GaussianDiffusion("linear", target="x0")
    far = lambda x, t: torch.full_like(x, 3.0)  # predicts x0 = 3, outside the pixel range
    for sampler in ("ddpm", "ddim", "heun"):
        x = d.sample(far, (8, 2), sampler, 10, generator=torch.Generator().manual_seed(0), clip_denoised=True)
        assert x.max().item() <= 1.0 + 1e-6
        x = d.sample(far, (8, 2), sampler, 10, generator=torch.Generator().manual_seed(0))
        assert x.max().item() > 2.0


def test_guided_model_fn_is_classifier_free_guidance():
    """Scale 1 is the plain conditional model; scale s is uncond + s·(cond − uncond) from two separate
    forwards (null label = num_classes), on all channels or, with guide_channels=3, DiT's first 3 only."""
    from models import ALL_MODELS
    torch.manual_seed(0)
    model = ALL_MODELS["DiT-Ti/4"](input_size=8, in_channels=4, num_classes=5, learn_sigma=True).eval()
    with torch.no_grad():
        for p in model.parameters():   # adaLN-Zero outputs 0 at init: give the output something to guide
            p.add_(0.05 * torch.randn_like(p))
        x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 999]), torch.tensor([0, 2, 4])
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 5))
        torch.testing.assert_close(guided_model_fn(model, y, 1.0)(x, t), cond)
        want = cond.clone()
        want[:, :4] = uncond[:, :4] + 2.5 * (cond[:, :4] - uncond[:, :4])   # the variance channels stay cond
        torch.testing.assert_close(guided_model_fn(model, y, 2.5)(x, t), want, rtol=1e-4, atol=1e-5)
        want[:, 3] = cond[:, 3]
        torch.testing.assert_close(guided_model_fn(model, y, 2.5, guide_channels=3)(x, t), want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(cond, uncond)
