"""Gaussian diffusion for Min-SNR-γ training (Hang et al., ICCV 2023): schedules, prediction targets,
loss weighting, the training loss (optionally with DiT's learned-σ VB term) and three samplers
(ancestral DDPM and DDIM over a respaced grid, EDM's second-order Heun over the discrete model).

Notation (docs/reference.md §1): ᾱ_t = alphas_cumprod[t], α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t),
x_t = α_t·x0 + σ_t·ε, SNR(t) = ᾱ_t / (1 − ᾱ_t), v = α_t·ε − σ_t·x0.
All tables are float64 on the CPU (copied once to each device that uses them); coefficients are gathered
per sample and cast to the data dtype.
"""
import math

import torch

from distributed import seed_for

WEIGHTINGS = ("const", "snr", "snr_plus_one", "max_snr", "min_snr", "soft_min_snr")
# Not a function of t: the weights of the per-bucket losses are chosen every training step (min_norm_weights).
PARETO = "pareto"
BUCKET_SPACINGS = ("t", "log_snr")
TARGETS = ("eps", "x0", "v")
PLAIN_WEIGHTING = {"eps": "snr", "x0": "const", "v": "snr_plus_one"}   # each target's own MSE, unweighted
SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim", "heun")


# ----------------------------------------------------------------------------------------------
# Schedules

def make_betas(schedule, num_timesteps):
    """β_t for t = 0..T−1 in float64."""
    if schedule == "linear":
        # DDPM's 1e-4 → 0.02 for T = 1000, stretched so other T keep the same total noise (DiT, iDDPM).
        scale = 1000.0 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if schedule == "cosine":
        # iDDPM eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s))·π/2), s = 0.008;
        # β_t = 1 − ᾱ(t+1)/ᾱ(t) clipped at 0.999 so the last step is not a pure-noise singularity.
        s = 0.008
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")


def rescale_zero_terminal_snr(alphas_cumprod):
    """Lin et al. 2024 (Alg. 1): shift and scale sqrt(ᾱ) so ᾱ_0 is kept and ᾱ_{T−1} = 0 exactly."""
    sqrt_ab = alphas_cumprod.sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    return sqrt_ab ** 2


def respace_timesteps(num_timesteps, steps):
    """`steps` evenly spaced original timesteps from 0 to T−1, increasing.

    Same grid as DiT's space_timesteps(T, str(steps)): a float stride (T−1)/(steps−1) is accumulated
    and each position rounded half-to-even; the accumulation (not i·stride) decides the ties, so it is
    kept to reproduce DiT's grids exactly.
    """
    if not 2 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [2, {num_timesteps}], got {steps}")
    stride = (num_timesteps - 1) / (steps - 1)
    pos, out = 0.0, []
    for _ in range(steps):
        out.append(round(pos))
        pos += stride
    return torch.tensor(out, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Loss weighting

def loss_weight(snr, weighting, target, gamma=5.0):
    """Weight multiplying the per-sample MSE of `target` (docs/reference.md §1).

    Defined on x0-space as in the paper (w = 1, SNR, SNR + 1, max(SNR, γ), min(SNR, γ),
    1/(1/SNR + 1/γ)) and converted: ε-MSE weight = w/SNR, v-MSE weight = w/(SNR + 1), x0-MSE weight
    = w. `snr_plus_one` is plain v-MSE, the v-prediction baseline. Each form is written so that it
    stays exact at SNR = 0 and SNR = inf. The few weights that are genuinely infinite there
    (const/snr_plus_one/max_snr on ε at SNR = 0; snr/snr_plus_one/max_snr on x0 at SNR = inf) raise
    ValueError rather than returning inf.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    snr = torch.as_tensor(snr)
    one = torch.ones_like(snr)
    inv = snr.reciprocal()  # 1/SNR: inf at SNR = 0, 0 at SNR = inf
    if target == "x0":
        w = {"const": one,
             "snr": snr,
             "snr_plus_one": snr + 1,
             "max_snr": snr.clamp(min=gamma),
             "min_snr": snr.clamp(max=gamma),
             "soft_min_snr": (inv + 1 / gamma).reciprocal()}[weighting]
    elif target == "eps":
        w = {"const": inv,
             "snr": one,                                  # plain ε-MSE
             "snr_plus_one": 1 + inv,
             "max_snr": (gamma * inv).clamp(min=1),       # max(SNR, γ)/SNR
             "min_snr": (gamma * inv).clamp(max=1),       # min(SNR, γ)/SNR
             "soft_min_snr": (1 + snr / gamma).reciprocal()}[weighting]  # γ/(SNR + γ)
    else:
        snr_frac = (1 + inv).reciprocal()  # SNR/(SNR+1) without inf/inf
        one_frac = (1 + snr).reciprocal()  # 1/(SNR+1)
        # min(SNR, γ)/(SNR+1), not min(SNR+1, γ)/(SNR+1) (a known bug in a popular library).
        w = {"const": one_frac,
             "snr": snr_frac,
             "snr_plus_one": one,                         # plain v-MSE
             "max_snr": torch.maximum(snr_frac, gamma * one_frac),
             "min_snr": torch.minimum(snr_frac, gamma * one_frac),
             "soft_min_snr": (1 + inv + (1 + snr) / gamma).reciprocal()}[weighting]
    if not torch.isfinite(w).all():
        raise ValueError(f"weighting {weighting!r} on target {target!r} is infinite at SNR = "
                         f"{snr[~torch.isfinite(w)].flatten()[0].item()}; use another weighting or target")
    return w


# ----------------------------------------------------------------------------------------------
# Pareto weighting of timestep buckets (the paper's §3: each noise level is a task)

def gram_matrix(vectors, chunk=1 << 20):
    """G_ij = v_i · v_j in float64 for vectors [K, P] (any float dtype), over column chunks so that the
    float64 copy never holds more than K·chunk values."""
    gram = torch.zeros(vectors.shape[0], vectors.shape[0], dtype=torch.float64, device=vectors.device)
    for start in range(0, vectors.shape[1], chunk):
        part = vectors[:, start:start + chunk].double()
        gram += part @ part.T
    return gram


def min_norm_weights(gram, tol=1e-12, max_iter=1000):
    """Convex weights w [K] (w ≥ 0, Σw = 1) minimising ‖Σ_k w_k·g_k‖² = wᵀGw, from the Gram matrix
    G_ij = g_i·g_j alone ([K, K], float64 on the CPU): the min-norm point of the gradients' convex
    hull, MGDA's common descent direction (Désidéri 2012; Sener & Koltun 2018).

    K = 2 in closed form, w_1 = clip((g_2 − g_1)·g_2 / ‖g_1 − g_2‖², 0, 1). K > 2 by Wolfe's
    minimum-norm-point algorithm (1976), which is exact up to rounding and ends in finitely many steps,
    where Frank-Wolfe only converges; `tol` is relative to the largest ‖g_k‖². When the min-norm point
    is not unique in w (a gradient inside the others' hull) any minimiser may be returned.
    """
    gram = gram.double().cpu()
    k = gram.shape[0]
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    scale = gram.diagonal().max().item()
    if scale <= 0:   # every gradient is zero: every convex combination is the min-norm point
        return torch.full((k,), 1 / k, dtype=torch.float64)
    if k == 2:
        gap = (gram[0, 0] + gram[1, 1] - 2 * gram[0, 1]).item()   # ‖g_1 − g_2‖²
        w1 = min(max((gram[1, 1] - gram[0, 1]).item() / gap, 0.0), 1.0) if gap > tol * scale else 0.5
        return torch.tensor([w1, 1 - w1], dtype=torch.float64)
    w = torch.zeros(k, dtype=torch.float64)
    first = int(gram.diagonal().argmin())
    support, w[first] = [first], 1.0
    for _ in range(max_iter):
        dots = gram @ w                  # g_k · x for x = Σ w_k g_k
        j = int(dots.argmin())
        # x is optimal when no vertex lies further along −x than x itself: x·x ≤ g_j·x (+ tol).
        if w @ dots - dots[j] <= tol * scale or j in support:
            break
        support.append(j)
        while True:   # Wolfe's minor cycle: move to the affine minimiser of the support, dropping vertices
            affine = _affine_min_norm(gram, support)
            current = w[support]
            if (affine > tol).all():
                w.zero_()
                w[support] = affine
                break
            leaving = affine <= tol
            step = (current[leaving] / (current[leaving] - affine[leaving])).min()
            moved = current + step * (affine - current)
            w.zero_()
            w[support] = moved.clamp(min=0)
            support = [s for s, m in zip(support, moved.tolist()) if m > tol]
            w /= w.sum()
    return w


def _affine_min_norm(gram, support):
    """Weights a (Σa = 1, signs free) of the min-norm point of the affine hull of the gradients in
    `support`: the KKT system [[G_SS, 1], [1ᵀ, 0]]·[a; μ] = [0; 1] (least squares, for a singular G_SS)."""
    n = len(support)
    system = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    system[:n, :n] = gram[support][:, support]
    system[:n, n] = system[n, :n] = 1.0
    rhs = torch.zeros(n + 1, 1, dtype=torch.float64)
    rhs[n] = 1.0
    return torch.linalg.lstsq(system, rhs, driver="gelsd").solution[:n, 0]


# ----------------------------------------------------------------------------------------------
# Small helpers

def randn_like_batch(shape, generator=None, device="cpu", dtype=torch.float32):
    """Standard normal noise of `shape`; with a list of B generators, row i comes from generator i,
    so a sample's noise does not depend on the batch it is drawn in."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def _mean_flat(x):
    """Mean over every dimension but the batch: [B, ...] → [B]."""
    return x.flatten(1).mean(1)


def _normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) per element for x on the 256-level grid in [-1, 1], under N(mean, e^(2·log_scale))
    integrated over the pixel's bin; the end bins extend to ±inf (DDPM §3.3 decoder)."""
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1 / 255)
    lower = inv_std * (x - mean - 1 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)   # bin (-inf, upper] at x = -1
    log_sf_lower = torch.special.log_ndtr(-lower)   # bin [lower, inf) at x = +1
    log_mid = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mid))


def _posterior_tables(ab_t, ab_prev):
    """Coefficients of q(x_prev | x_t, x0) between two levels ᾱ_t < ᾱ_prev (DDPM eq. 6–7).

    Used for the full chain (prev = t−1) and for respaced grids alike; returns float64
    (beta, posterior variance β̃, coefficient on x0, coefficient on x_t).
    """
    beta = 1 - ab_t / ab_prev
    var = beta * (1 - ab_prev) / (1 - ab_t)
    coef_x0 = beta * ab_prev.sqrt() / (1 - ab_t)
    coef_xt = (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab_t)
    return beta, var, coef_x0, coef_xt


# ----------------------------------------------------------------------------------------------

class GaussianDiffusion:
    """The diffusion process, its training loss and its samplers.

    zero_terminal_snr with target "eps" is refused: at t = T−1 the input is pure noise, so an ε
    prediction carries no information about x0 (x0 = (x_t − σ·ε)/α with α = 0). Use "v" or "x0".

    weighting "pareto" (with pareto_buckets = K) is the run-time weighting of train.py: the static
    weight is 1 (the plain MSE of the target, per bucket), and every step weighs the K buckets' mean
    losses by min_norm_weights of their gradients.
    """

    def __init__(self, schedule="linear", num_timesteps=1000, target="eps", weighting="min_snr",
                 gamma=5.0, zero_terminal_snr=False, learn_sigma=False, pareto_buckets=None):
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
        if zero_terminal_snr and target == "eps":
            raise ValueError("zero_terminal_snr needs target 'v' or 'x0': x0 cannot be recovered from ε at SNR = 0")
        if weighting == PARETO:
            if not isinstance(pareto_buckets, int) or not 1 <= pareto_buckets <= num_timesteps:
                raise ValueError(f"weighting 'pareto' needs pareto_buckets in [1, {num_timesteps}], got {pareto_buckets!r}")
            if learn_sigma:
                raise ValueError("weighting 'pareto' weighs MSE terms only; it does not take learn_sigma's VB term")
        elif pareto_buckets is not None:
            raise ValueError(f"pareto_buckets is for weighting 'pareto', not {weighting!r}")
        self.schedule, self.num_timesteps, self.target = schedule, num_timesteps, target
        self.weighting, self.gamma, self.pareto_buckets = weighting, gamma, pareto_buckets
        self.zero_terminal_snr, self.learn_sigma = zero_terminal_snr, learn_sigma

        alphas_cumprod = torch.cumprod(1 - make_betas(schedule, num_timesteps), 0)
        if zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - alphas_cumprod).sqrt()
        self.snr = alphas_cumprod / (1 - alphas_cumprod)
        # σ of the "x = x0 + σ·ε" parametrisation (EDM); inf at a zero-terminal-SNR last step.
        self.sigmas = self.snr.rsqrt()
        (self.betas, self.posterior_variance,
         self.posterior_coef_x0, self.posterior_coef_xt) = _posterior_tables(alphas_cumprod, self.alphas_cumprod_prev)
        # β̃_0 = 0: its log is replaced by log β̃_1 (the lower end of the learned range at t = 0, iDDPM).
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        # Computed once here (CPU, float64) so training only gathers; raises early on an infinite weight.
        self.loss_weights = (torch.ones_like(self.snr) if weighting == PARETO
                             else loss_weight(self.snr, weighting, target, gamma))
        self._device_tables = {}  # (id of a table above, device) -> its copy there; see _gather

    def _gather(self, table, t, like):
        """table[t] → [B, 1, ..., 1] in like's dtype and device, broadcastable over like.

        `table` is one of the float64 CPU tables set in __init__ (never reassigned, so its id is a stable
        key). It is copied to t's device once and kept: a copy per call would be a blocking host-to-device
        transfer, i.e. a GPU stream synchronisation, several times in every training and sampler step.
        """
        key = (id(table), t.device)
        if key not in self._device_tables:
            self._device_tables[key] = table.to(t.device)
        values = self._device_tables[key][t].to(like.dtype)
        return values.reshape(-1, *([1] * (like.dim() - 1)))

    def _alpha_sigma(self, t, like):
        """(α_t, σ_t), gathered as in _gather."""
        return (self._gather(self.sqrt_alphas_cumprod, t, like),
                self._gather(self.sqrt_one_minus_alphas_cumprod, t, like))

    # -- forward process and conversions --------------------------------------------------------

    def sample_timesteps(self, n, generator=None, device="cpu"):
        """Training timesteps, uniform over the integers [0, T)."""
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    def q_sample(self, x0, t, noise):
        """x_t = α_t·x0 + σ_t·ε."""
        a, s = self._alpha_sigma(t, x0)
        return a * x0 + s * noise

    def target_of(self, x0, t, noise):
        """What the network is trained to output for (x0, t, ε)."""
        if self.target == "eps":
            return noise
        if self.target == "x0":
            return x0
        a, s = self._alpha_sigma(t, x0)
        return a * noise - s * x0

    def to_x0_eps(self, pred, x_t, t, target=None):
        """(x0, ε) implied by a prediction of `target` (default: this model's target) at x_t.

        The one place where predictions are converted; every loss and sampler goes through it.
        """
        target = target or self.target
        a, s = self._alpha_sigma(t, x_t)
        if target == "eps":
            return (x_t - s * pred) / a, pred
        if target == "x0":
            return pred, (x_t - a * pred) / s
        if target == "v":
            # x0 = α·x_t − σ·v and ε = σ·x_t + α·v, since α² + σ² = 1.
            return a * x_t - s * pred, s * x_t + a * pred
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")

    def split_output(self, out):
        """Model output → (prediction, variance interpolation or None). Learned σ doubles the channels."""
        if self.learn_sigma:
            return out.chunk(2, dim=1)
        return out, None

    # -- training ---------------------------------------------------------------------------------

    def training_losses(self, model_output, x0, t, noise):
        """Loss terms for model_output = model(q_sample(x0, t, noise), t, y).

        loss = mean_B(weight(t) · mean_CHW((target − pred)²)) [+ mean_B(vb) with learned σ]
        (Min-SNR official reduction; the VB term is added unweighted as in DiT).
        Returns {"loss": scalar to backprop, "mse": [B] raw, "weighted": [B], "vb": [B] if learn_sigma};
        the per-sample terms are detached (for logging).
        """
        pred, var_interp = self.split_output(model_output.float())
        x0, noise = x0.float(), noise.float()
        mse = _mean_flat((self.target_of(x0, t, noise) - pred) ** 2)
        weighted = self._gather(self.loss_weights, t, mse) * mse
        terms = {"loss": weighted.mean(), "mse": mse.detach(), "weighted": weighted.detach()}
        if self.learn_sigma:
            x_t = self.q_sample(x0, t, noise)
            # The VB term only trains the variance: the mean comes from the detached prediction (iDDPM §3.1).
            vb = self._vb_terms_bpd(pred.detach(), var_interp, x0, x_t, t)
            terms["loss"] = terms["loss"] + vb.mean()
            terms["vb"] = vb.detach()
        return terms

    @staticmethod
    def _p_log_variance(var_interp, log_beta, log_var_small):
        """iDDPM eq. 15: log σ² = frac·log β + (1 − frac)·log β̃, frac = (v + 1)/2, v ∈ [-1, 1]."""
        frac = (var_interp + 1) / 2
        return frac * log_beta + (1 - frac) * log_var_small

    def _vb_terms_bpd(self, pred, var_interp, x0, x_t, t):
        """Per-sample variational-bound term in bits/dim: KL(q(x_{t−1}|x_t, x0) ‖ p(x_{t−1}|x_t)) for
        t > 0, the discretized-Gaussian decoder NLL at t = 0; × T/1000 (iDDPM's rescaling of the
        hybrid loss, a factor 1 for DiT's T = 1000)."""
        x0_hat, _ = self.to_x0_eps(pred, x_t, t)
        coef_x0, coef_xt = self._gather(self.posterior_coef_x0, t, x_t), self._gather(self.posterior_coef_xt, t, x_t)
        true_mean = coef_x0 * x0 + coef_xt * x_t
        true_log_var = self._gather(self.posterior_log_variance_clipped, t, x_t)
        model_mean = coef_x0 * x0_hat + coef_xt * x_t
        model_log_var = self._p_log_variance(var_interp, torch.log(self._gather(self.betas, t, x_t)), true_log_var)
        kl = _mean_flat(_normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
        nll = -_mean_flat(_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl) * (self.num_timesteps / 1000.0)

    def bucket_index(self, t, num_buckets):
        """Equal-width timestep bucket of each t: t·n // T (bucket 0 = least noise)."""
        return t * num_buckets // self.num_timesteps

    def timestep_buckets(self, num_buckets, spacing="t"):
        """Bucket of every timestep 0..T−1 -> long [T], non-decreasing in t. spacing "t": bucket_index;
        "log_snr": equal widths in log SNR between log SNR(0) and the smallest finite log SNR (a
        zero-terminal-SNR last step joins the last bucket). A bucket without timesteps is a ValueError."""
        if spacing not in BUCKET_SPACINGS:
            raise ValueError(f"unknown bucket spacing {spacing!r}; expected one of {BUCKET_SPACINGS}")
        if not 1 <= num_buckets <= self.num_timesteps:
            raise ValueError(f"num_buckets must be in [1, {self.num_timesteps}], got {num_buckets}")
        if spacing == "t":
            buckets = self.bucket_index(torch.arange(self.num_timesteps), num_buckets)
        else:
            log_snr = self.snr.log()
            top, bottom = log_snr[0], log_snr[torch.isfinite(log_snr)].min()
            position = ((top - log_snr) / (top - bottom)).nan_to_num(posinf=1.0)   # 0 at t = 0, 1 at the end
            buckets = (position * num_buckets).long().clamp(max=num_buckets - 1)
        empty = sorted(set(range(num_buckets)) - set(buckets.tolist()))
        if empty:
            raise ValueError(f"{num_buckets} {spacing}-spaced buckets leave bucket {empty[0]} without a timestep; "
                             f"use fewer buckets")
        return buckets

    def bucket_sums(self, values, t, num_buckets=10):
        """Float64 sums and counts of `values` [B] per equal-width timestep bucket (bucket_index)."""
        buckets = self.bucket_index(t, num_buckets)
        sums = torch.zeros(num_buckets, dtype=torch.float64, device=values.device)
        counts = torch.zeros(num_buckets, dtype=torch.float64, device=values.device)
        sums.index_add_(0, buckets, values.detach().double())
        counts.index_add_(0, buckets, torch.ones_like(sums[buckets]))
        return sums, counts

    # -- sampling ---------------------------------------------------------------------------------

    def _predict(self, model_fn, x_t, t, clip_denoised):
        """Run the model at integer timesteps t → (x0, ε, variance interpolation or None)."""
        pred, var_interp = self.split_output(model_fn(x_t, t))
        x0, eps = self.to_x0_eps(pred, x_t, t)
        if clip_denoised:
            # Pixels live in [-1, 1]; ε is re-derived so the step stays consistent with the clipped x0.
            x0, eps = self.to_x0_eps(x0.clamp(-1, 1), x_t, t, target="x0")
        return x0, eps, var_interp

    @torch.no_grad()
    def sample(self, model_fn, shape, sampler="ddpm", steps=250, eta=0.0, generator=None, noise=None,
               clip_denoised=False, progress=False):
        """Draw samples of `shape` from model_fn(x_t, t) (t: LongTensor [B] of original training steps).

        ddpm: ancestral sampling over `steps` respaced timesteps (learned variance if learn_sigma, else
              β of the respaced chain, DiT's "fixed large"). ddim: DDIM with `eta` on the same grid.
        heun: EDM's deterministic 2nd-order sampler with `steps` σ levels (2·steps − 1 model calls).
        generator: a torch.Generator or a list of B generators (one per sample). noise: optional x_T,
        which also sets dtype and device (otherwise float32 on the generator's device).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
        if noise is None:
            first = generator[0] if isinstance(generator, (list, tuple)) else generator
            device = first.device if first is not None else torch.device("cpu")
            noise = randn_like_batch(shape, generator, device)
        elif tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        if sampler == "heun":
            return self._sample_heun(model_fn, noise, steps, generator, clip_denoised, progress)
        return self._sample_respaced(model_fn, noise, sampler, steps, eta, generator, clip_denoised, progress)

    def _sample_respaced(self, model_fn, x, sampler, steps, eta, generator, clip_denoised, progress):
        """DDPM / DDIM over the respaced grid; the chain's ᾱ are the original ᾱ at the kept timesteps."""
        timesteps = respace_timesteps(self.num_timesteps, steps)
        ab = self.alphas_cumprod[timesteps]
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        betas, post_var, coef_x0, coef_xt = _posterior_tables(ab, ab_prev)
        for i in _progress(range(steps - 1, -1, -1), progress):
            t = torch.full((x.shape[0],), int(timesteps[i]), dtype=torch.long, device=x.device)
            x0, eps, var_interp = self._predict(model_fn, x, t, clip_denoised)
            if sampler == "ddpm":
                # Posterior mean of the respaced chain with x0 replaced by its prediction (DDPM eq. 7).
                x = float(coef_x0[i]) * x0 + float(coef_xt[i]) * x
                if i > 0:  # no noise on the last step (σ at t = 0 is irrelevant there)
                    if var_interp is not None:
                        log_var = self._p_log_variance(var_interp.to(x.dtype), math.log(betas[i].item()),
                                                       math.log(post_var[i].item()))
                    else:
                        log_var = torch.full_like(x, math.log(betas[i].item()))
                    x = x + torch.exp(0.5 * log_var) * randn_like_batch(x.shape, generator, x.device, x.dtype)
            else:
                # DDIM eq. 12 with σ_η² = η²·(1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev); σ_η = 0 at the last step.
                sigma = eta * math.sqrt(post_var[i].item())
                x = math.sqrt(ab_prev[i].item()) * x0 + math.sqrt(max(1 - ab_prev[i].item() - sigma ** 2, 0.0)) * eps
                if i > 0 and sigma > 0:
                    x = x + sigma * randn_like_batch(x.shape, generator, x.device, x.dtype)
        return x

    def heun_grid(self, steps, sigma_max=80.0, rho=7.0):
        """EDM σ levels (Karras et al. eq. 5, ρ = 7) from σ_max down to σ_min = σ(0), each rounded to the
        nearest training σ (EDM's round_sigma for discrete models); returns (sigmas float64, timesteps long).

        σ_max = min(80, σ(T−1)) as in EDM and the official Min-SNR sampler (the paper's 2.06): at σ = 80
        the input is already pure noise for unit-scale data, and the cosine schedule's σ(T−1) ≈ 2·10⁴
        would spend most of the ρ-grid above it. A zero-terminal-SNR σ(T−1) = inf is never chosen.
        """
        if steps < 2:
            raise ValueError(f"heun needs steps >= 2, got {steps}")
        sigma_max = min(sigma_max, self.sigmas[torch.isfinite(self.sigmas)].max().item())
        sigma_min = self.sigmas[0].item()
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        grid = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
        timesteps = (grid[:, None] - self.sigmas[None, :]).abs().argmin(1)  # an inf σ is never nearest
        return self.sigmas[timesteps], timesteps

    def _sample_heun(self, model_fn, noise, steps, generator, clip_denoised, progress):
        """EDM Algorithm 1 (no churn) in x = x0 + σ·ε; the VP model sees x_t = x/sqrt(1 + σ²) and its t."""
        sigmas, timesteps = self.heun_grid(steps)
        sigmas = sigmas.tolist() + [0.0]
        x = noise * sigmas[0]

        def derivative(x, i):
            # dx/dσ = (x − D(x; σ))/σ = ε̂, the model's ε at that noise level.
            t = torch.full((x.shape[0],), int(timesteps[i]), dtype=torch.long, device=x.device)
            _, eps, _ = self._predict(model_fn, x / math.sqrt(1 + sigmas[i] ** 2), t, clip_denoised)
            return eps

        for i in _progress(range(steps), progress):
            d = derivative(x, i)
            x_next = x + (sigmas[i + 1] - sigmas[i]) * d
            if sigmas[i + 1] > 0:  # 2nd-order correction; the last step to σ = 0 stays Euler
                x_next = x + (sigmas[i + 1] - sigmas[i]) * 0.5 * (d + derivative(x_next, i + 1))
            x = x_next
        return x


def _progress(iterable, enabled):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # only needed for interactive runs
    return tqdm(iterable)


def guided_model_fn(model, y, cfg_scale, *, guide_channels=None):
    """model_fn(x, t) for the samplers: classifier-free guidance at `cfg_scale` through
    model.forward_with_cfg (which adds the null-label rows itself), or a plain conditional forward
    when cfg_scale == 1. guide_channels=3 reproduces DiT's legacy 3-channel guidance."""
    if cfg_scale == 1:
        return lambda x, t: model(x, t, y)
    return lambda x, t: model.forward_with_cfg(x, t, y, cfg_scale, guide_channels)


def sample_generators(seed, indices, device):
    """One generator per sample index. CPU generators keep only the low 32 bits of a seed, so each
    run gets a 32-bit offset mixed from `seed` and sample i uses offset + i: distinct for every
    sample of a run, and the same whatever rank or batch the sample lands in."""
    offset = seed_for(seed) % 2**32
    return [torch.Generator(device).manual_seed((offset + int(i)) % 2**32) for i in indices]


def generate(model, diffusion, indices, labels, *, seed=0, sampler="ddpm", steps=250, eta=0.0, cfg_scale=1.0,
             cfg_channels=None, bf16=False, clip_denoised=False):
    """Model-space samples [B, C, h, w] of sample indices `indices` with class `labels` [B]: sample i
    draws all its noise from its own generator (sample_generators), so a (seed, i) gives the same
    sample in any batch on any rank. bf16 autocasts the network only; the sampler's arithmetic stays
    in full precision."""
    device = next(model.parameters()).device
    guided = guided_model_fn(model, labels.to(device), cfg_scale, guide_channels=cfg_channels)

    def model_fn(x, t):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            return guided(x, t).float()

    shape = (len(indices), model.in_channels, model.input_size, model.input_size)
    return diffusion.sample(model_fn, shape, sampler=sampler, steps=steps, eta=eta,
                            generator=sample_generators(seed, indices, device), clip_denoised=clip_denoised)
