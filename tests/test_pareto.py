"""Gradient conflicts between timestep buckets and the run-time Pareto weighting (issue #10):
diffusion.min_norm_weights against closed forms and the optimality conditions, the bucket tables,
experiments/conflicts.py against a model whose bucket gradients are known."""
import argparse
import json

import pytest
import torch

import config
import distributed
import extract_latents
import models
import train
from diffusion import GaussianDiffusion, gram_matrix, min_norm_weights
from conftest import _random_weights as random_weights
from experiments import buckets as buckets_lib, conflicts, negative_transfer, pareto_weights
from store import open_store


def gradients(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def min_norm_point(g):
    return min_norm_weights(gram_matrix(g)) @ g


@pytest.mark.parametrize("g", [gradients([1.0, 0.0], [0.0, 2.0]),              # interior
                               gradients([1.0, 0.2, 0.0], [3.0, -1.0, 2.0]),    # interior, obtuse
                               gradients([0.1, 0.1], [2.0, 1.0]),               # g_1 alone: w_1 = 1 (clipped)
                               gradients([2.0, 1.0], [0.1, 0.1])])              # g_2 alone: w_1 = 0 (clipped)
def test_two_gradients_closed_form(g):
    g1, g2 = g
    want = ((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2))).clamp(0, 1)
    w = min_norm_weights(gram_matrix(g))
    torch.testing.assert_close(w, torch.stack([want, 1 - want]), rtol=0, atol=1e-12)


def test_orthogonal_gradients_weigh_inverse_squared_norms():
    """Orthogonal g_k: ‖Σ w_k g_k‖² = Σ w_k² ‖g_k‖² on the simplex is least at w_k ∝ 1/‖g_k‖²."""
    norms = torch.tensor([0.5, 1.0, 2.0, 3.0, 7.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    g = (q * norms).T   # [5, 9], orthogonal rows of the given norms
    want = norms ** -2 / (norms ** -2).sum()
    torch.testing.assert_close(min_norm_weights(gram_matrix(g)), want, rtol=1e-9, atol=1e-12)


def test_gradient_inside_the_hull_changes_nothing():
    """A gradient inside the hull of the others leaves the min-norm point where it was (weights may
    differ, the point may not); a short one that every other gradient projects beyond is the answer."""
    g1, g2 = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), torch.tensor([-1.0, 2.0, 1.0], dtype=torch.float64)
    two = min_norm_point(torch.stack([g1, g2]))
    inside = torch.stack([g1, g2, 0.3 * g1 + 0.7 * g2, 0.5 * g1 + 0.5 * g2])
    torch.testing.assert_close(min_norm_point(inside), two, rtol=0, atol=1e-12)
    short = torch.tensor([0.0, 0.1, 0.1], dtype=torch.float64)   # g·short ≥ ‖short‖² for g1, g2
    w = min_norm_weights(gram_matrix(torch.stack([g1, g2, short])))
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k, dim", [(3, 50), (6, 4), (10, 3), (10, 1000)])
def test_random_gradients_meet_the_optimality_conditions(k, dim):
    """KKT of min wᵀGw on the simplex: every g_k·x ≥ ‖x‖² (x = Σ w g), with equality where w_k > 0.
    More gradients than dimensions (dim < k) makes G singular, the case Wolfe's steps must survive."""
    g = torch.randn(k, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(k * dim)) + 0.3
    gram = gram_matrix(g)
    w = min_norm_weights(gram)
    assert w.min() >= 0 and abs(w.sum().item() - 1) < 1e-12
    dots, xx = gram @ w, w @ gram @ w
    scale = gram.diagonal().max()
    assert (dots >= xx - 1e-9 * scale).all()
    assert (dots[w > 1e-9] - xx).abs().max() < 1e-9 * scale
    assert xx <= min(gram.diagonal().min(), (gram.sum() / k ** 2)) + 1e-12   # no worse than a vertex or the mean


def test_gram_matrix_in_chunks_is_the_full_product():
    v = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gram_matrix(v, chunk=64), v.double() @ v.double().T, rtol=1e-12, atol=1e-12)


def test_timestep_buckets():
    d = GaussianDiffusion("linear")
    t_buckets = d.timestep_buckets(4)
    assert torch.equal(torch.bincount(t_buckets), torch.full((4,), 250))
    assert torch.equal(t_buckets, d.bucket_index(torch.arange(1000), 4))
    log_snr = d.snr.log()
    b = d.timestep_buckets(4, "log_snr")
    assert (b.diff() >= 0).all()
    edges = torch.linspace(log_snr[0].item(), log_snr[-1].item(), 5, dtype=torch.float64)
    for k in range(4):   # every timestep's log SNR lies in its bucket's quarter of the range
        inside = log_snr[b == k]
        assert inside.max() <= edges[k] + 1e-9 and inside.min() >= edges[k + 1] - 1e-9
    with pytest.raises(ValueError, match="without a timestep"):
        GaussianDiffusion("cosine").timestep_buckets(10, "log_snr")


def test_pareto_settings_are_checked():
    assert torch.equal(GaussianDiffusion(weighting="pareto", pareto_buckets=4).loss_weights, torch.ones(1000, dtype=torch.float64))
    for kwargs, message in (({"weighting": "pareto"}, "needs pareto_buckets"),
                            ({"weighting": "pareto", "pareto_buckets": 0}, "needs pareto_buckets"),
                            ({"weighting": "min_snr", "pareto_buckets": 4}, "is for weighting 'pareto'"),
                            ({"weighting": "pareto", "pareto_buckets": 4, "learn_sigma": True}, "learn_sigma")):
        with pytest.raises(ValueError, match=message):
            GaussianDiffusion(**kwargs)


# ----------------------------------------------------------------------------------------------------
# experiments/conflicts.py


class Affine(torch.nn.Module):
    """out = θ ⊙ x_t + b: each bucket's loss gradient has a closed form in the batch."""

    def __init__(self, shape):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.theta = torch.nn.Parameter(torch.randn(shape, generator=g))
        self.bias = torch.nn.Parameter(torch.randn(shape, generator=g))

    def forward(self, x, t, y):
        return self.theta * x + self.bias


def test_conflict_matrix_of_an_affine_model_matches_the_closed_form():
    """ε-target, Min-SNR-5 weights w(t): bucket k's loss mean_i w_i·mean_D(ε_i − θx_i − b)² has gradients
    −2/(N·D)·Σ_i w_i·r_i (for b) and −2/(N·D)·Σ_i w_i·r_i·x_i (for θ), r_i the residual: cosines and norms
    from those, against the script's (mini-batches of 3 over N = 8 images)."""
    d = GaussianDiffusion("cosine", target="eps", weighting="snr")
    weighted = GaussianDiffusion("cosine", target="eps", weighting="min_snr", gamma=5.0)
    model = Affine((2, 3, 3))
    x0 = torch.randn(8, 2, 3, 3, generator=torch.Generator().manual_seed(4))
    buckets = d.timestep_buckets(3, "log_snr")
    t, noise = buckets_lib.held_out_noising(buckets, 8, (2, 3, 3), seed=5)
    assert all((buckets[t[k]] == k).all() for k in range(3))
    got_cos, got_norms = conflicts.conflict_matrix(
        conflicts.bucket_gradients(model, d, weighted, x0, torch.zeros(8, dtype=torch.long), t, noise, batch_size=3))

    want = []
    with torch.no_grad():
        for k in range(3):
            x_t = d.q_sample(x0, t[k], noise[k])
            w = weighted.loss_weights[t[k]].float().reshape(-1, 1, 1, 1)
            r = noise[k] - model.theta * x_t - model.bias
            scale = -2 / (8 * r[0].numel())
            want.append(torch.cat([(scale * w * r * x_t).sum(0).flatten(), (scale * w * r).sum(0).flatten()]))
    want = torch.stack(want).double()
    norms = want.norm(dim=1)
    torch.testing.assert_close(got_norms, norms, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_cos, want @ want.T / norms[:, None] / norms[None, :], rtol=0, atol=1e-5)
    assert got_cos.min() < 0.9   # the buckets do differ: a test that cannot pass with all cosines 1


@pytest.fixture(scope="module")
def conflict_files(make_export, tmp_path_factory):
    """A builtin 8-px store; a run's checkpoint folder with two random DiT-Ti/4 ε exports; one v export."""
    tmp = tmp_path_factory.mktemp("conflicts")
    extract_latents.main(["--data", "builtin", "--num-images", "20", "--image-size", "8", "--vae", "none",
                          "--out", str(tmp / "store")])
    (tmp / "run").mkdir()
    for step, seed in ((100, 1), (200, 2)):
        make_export(tmp / "run" / f"step-{step:07d}.pt", name="DiT-Ti/4", num_classes=10, schedule="cosine", seed=seed)
    make_export(tmp / "v.pt", name="DiT-Ti/4", num_classes=10, schedule="cosine", target="v")
    return tmp


def test_conflicts_over_a_run_and_a_fresh_model(conflict_files, tmp_path):
    """A run folder stands for its checkpoints in step order, --fresh adds step 0; the fresh model is
    train.py's own step-0 model (same seed, same init); every model gets a heatmap, the run one figure."""
    out = tmp_path / "out"
    conflicts.main(["--ckpt", str(conflict_files / "run"), "--fresh", "DiT-Ti/4", "--schedule", "cosine",
                    "--data", str(conflict_files / "store"), "--num-images", "3", "--buckets", "3", "--device", "cpu",
                    "--out", str(out)])
    report = json.loads((out / "conflicts.json").read_text())
    assert [(m["label"], m["step"]) for m in report["models"]] == [("fresh", 0), ("step-0000100", 100),
                                                                   ("step-0000200", 200)]
    for m in report["models"]:
        cos = torch.tensor(m["cosine"], dtype=torch.float64)
        torch.testing.assert_close(cos.diagonal(), torch.ones(3, dtype=torch.float64))
        torch.testing.assert_close(cos, cos.T)
        assert (out / f"{m['label']}.png").exists()
    assert report["models"][1]["cosine"] != report["models"][2]["cosine"]
    assert (out / "across_training.png").exists() and "| 0 | 0-333 |" in (out / "conflicts.md").read_text()

    cfg = config.load_config(train.DEFAULTS, None, ["model.name=DiT-Ti/4", "model.class_dropout_prob=0.1"])
    margs = {"name": "DiT-Ti/4", "input_size": 8, "in_channels": 3, "num_classes": 10, "learn_sigma": False,
             "class_dropout_prob": 0.1}
    torch.manual_seed(cfg["run"]["seed"])
    step0 = models.ALL_MODELS["DiT-Ti/4"](**{k: v for k, v in margs.items() if k != "name"})
    fresh = conflicts.build_model(argparse.Namespace(
        fresh="DiT-Ti/4", init_seed=0, schedule="cosine", target="eps"), open_store(conflict_files / "store"), None)[0]
    assert all(torch.equal(a, b) for a, b in zip(step0.state_dict().values(), fresh.state_dict().values()))


def test_conflicts_errors_are_one_line(conflict_files, tmp_path):
    def error_of(*argv):
        with pytest.raises(SystemExit) as e:
            conflicts.main([*argv, "--data", str(conflict_files / "store"), "--num-images", "2", "--out", str(tmp_path)])
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "conflicts compare models of one diffusion" in error_of("--ckpt", str(conflict_files / "v.pt"),
                                                                   str(conflict_files / "run" / "step-0000100.pt"))
    assert "holds no exported checkpoints" in error_of("--ckpt", str(tmp_path))
    assert "give --ckpt" in error_of()
    assert "without a timestep" in error_of("--fresh", "DiT-Ti/4", "--schedule", "cosine", "--buckets", "10",
                                            "--spacing", "log_snr")


# ----------------------------------------------------------------------------------------------------
# train.py's weighting "pareto"


@pytest.fixture(scope="module")
def world():
    """An in-process gloo world of one (train.py's collectives need a process group)."""
    was_initialized = torch.distributed.is_initialized()
    yield distributed.init_distributed()
    if not was_initialized:
        distributed.cleanup_distributed()


def tiny_step(timesteps, micro=2):
    """A plain two-block DiT of width 32 on 8 px with random weights (a fresh DiT's adaLN-Zero output would
    be 0; label dropout off, as train.py builds it) and the micro-batches of one step at `timesteps`."""
    model = models.DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                       class_dropout_prob=0.0, num_classes=4, learn_sigma=False)
    model.load_state_dict(random_weights(model, 0))
    g = torch.Generator().manual_seed(1)
    n = len(timesteps)
    batch = (torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g),
             torch.tensor(timesteps), torch.randn(n, 3, 8, 8, generator=g))
    per = n // micro
    return model, [tuple(a[i:i + per] for a in batch) for i in range(0, n, per)]


def gradient_of(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]).double()


def plain_gradient(model, micro_batches):
    """train.py's step under plain ε-MSE (weighting snr on ε)."""
    model.zero_grad(set_to_none=True)
    train.forward_backward(model, GaussianDiffusion("cosine", weighting="snr"), micro_batches, num_buckets=10)
    return gradient_of(model)


def test_bucket_gradients_weighted_by_fractions_add_up_to_the_plain_gradient(world):
    """Σ_k (N_k/N)·g_k = ∇ mean_i mse_i: the buckets split the plain loss, two micro-batches and a bucket
    missing from one of them (bucket 2 of 3 has samples in the second micro-batch only) included."""
    timesteps = [5, 400, 120, 10, 350, 800, 999, 340]
    model, micro_batches = tiny_step(timesteps)
    d = GaussianDiffusion("cosine", weighting="pareto", pareto_buckets=3)
    grads, stats = train.bucket_gradients(model, d, micro_batches, num_buckets=10)
    counts = torch.bincount(d.bucket_index(torch.tensor(timesteps), 3), minlength=3).double()
    flat = torch.stack([torch.cat([g.flatten() for g in grads[k]]).double() for k in range(3)])
    want = plain_gradient(model, micro_batches)
    torch.testing.assert_close(counts @ flat / counts.sum(), want, rtol=1e-5, atol=1e-8)
    assert (torch.nn.functional.cosine_similarity(flat, want[None], dim=1) < 0.999).all()   # no g_k is the mean
    assert stats[2] == len(timesteps) and stats[3:13].sum() > 0


@pytest.mark.parametrize("k, timesteps", [(1, [5, 400, 120, 10, 350, 800, 999, 340]),   # K = 1
                                          (4, [300, 301, 499, 260, 402, 333, 275, 498])])  # one bucket (1)
def test_pareto_step_with_one_bucket_is_the_plain_step(world, k, timesteps):
    model, micro_batches = tiny_step(timesteps)
    want = plain_gradient(model, micro_batches)
    model.zero_grad(set_to_none=True)
    d = GaussianDiffusion("cosine", weighting="pareto", pareto_buckets=k)
    stats = train.forward_backward(model, d, micro_batches, num_buckets=10)
    torch.testing.assert_close(gradient_of(model), want, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(stats[-k:], torch.eye(k, dtype=torch.float64)[k // 4])   # all weight on the one bucket


def test_pareto_step_descends_on_every_bucket(world):
    """The step direction x = Σ w_k g_k is MGDA's common descent direction: g_k·x ≥ ‖x‖² for every bucket
    (so no bucket's loss rises to first order), with equality where w_k > 0; the plain mean gradient is not."""
    timesteps = [5, 400, 120, 10, 350, 800, 999, 340, 620, 30, 700, 210]
    model, micro_batches = tiny_step(timesteps, micro=3)
    d = GaussianDiffusion("cosine", weighting="pareto", pareto_buckets=4)
    stats = train.forward_backward(model, d, micro_batches, num_buckets=10)
    x, w = gradient_of(model), stats[-4:]
    model.zero_grad(set_to_none=True)
    grads, _ = train.bucket_gradients(model, d, micro_batches, num_buckets=10)
    flat = torch.stack([torch.cat([g.flatten() for g in grads[k]]).double() for k in range(4)])
    assert abs(w.sum().item() - 1) < 1e-12 and w.min() >= 0
    torch.testing.assert_close(x, w @ flat, rtol=1e-6, atol=1e-9)
    dots, xx = flat @ x, x @ x
    assert (dots >= xx * (1 - 1e-5)).all() and ((dots - xx)[w > 1e-6].abs() <= 1e-5 * xx).all()
    plain = plain_gradient(model, micro_batches)
    assert (flat @ plain < plain @ plain).any()   # the plain step favours some buckets over others


def test_static_bucket_weights_and_the_mean_over_steps():
    """The plain loss weighs each bucket by its share of the timesteps (uneven under log-SNR spacing);
    Min-SNR-γ on ε by f_k·mean min(SNR, γ)/SNR, so the buckets entirely at SNR ≤ γ weigh the same;
    a logged record stands for the steps since the previous one."""
    d = GaussianDiffusion("cosine", target="eps")
    uneven = d.timestep_buckets(3, "log_snr")
    shares = torch.bincount(uneven).double() / 1000
    torch.testing.assert_close(pareto_weights.static_bucket_weights(d, uneven, "snr", 5.0), shares)
    even = d.timestep_buckets(4)
    w = pareto_weights.static_bucket_weights(d, even, "min_snr", 5.5)
    assert (d.snr[250:] <= 5.5).all() and d.snr[0] > 5.5
    torch.testing.assert_close(w[1:], torch.full((3,), w[1].item(), dtype=torch.float64))
    assert w[0] < w[1] and abs(w.sum().item() - 1) < 1e-12
    steps, history = torch.tensor([10, 20, 50]), torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(pareto_weights.mean_over_steps(steps, history, 0),
                               torch.tensor([0.7, 0.3], dtype=torch.float64))   # (10·1 + 10·1 + 30·0.5)/50
    torch.testing.assert_close(pareto_weights.mean_over_steps(steps, history, 10),
                               torch.tensor([0.625, 0.375], dtype=torch.float64))   # (10·1 + 30·0.5)/40


# ----------------------------------------------------------------------------------------------------
# experiments/negative_transfer.py


def test_negative_transfer_trains_each_bucket_and_measures_every_bucket(conflict_files, tmp_path):
    """One row per trained bucket and the all-t control, one column per measured bucket. Training a
    random model on a bucket lowers that bucket's held-out loss more than any other row does (the
    diagonal is each column's minimum among the bucket rows); the control lowers every bucket."""
    out = tmp_path / "transfer"
    negative_transfer.main(["--ckpt", str(conflict_files / "run" / "step-0000100.pt"), "--data",
                            str(conflict_files / "store"), "--buckets", "2", "--steps", "20", "--warmup", "5",
                            "--batch-size", "8", "--num-images", "8", "--lr", "3e-3", "--device", "cpu",
                            "--out", str(out)])
    report = json.loads((out / "transfer.json").read_text())
    change = torch.tensor(report["relative_change"])
    assert report["rows"][-1] == "all t" and change.shape == (3, 2)
    assert (change[-1] < 0).all()
    for k in range(2):
        assert change[k, k] < 0 and change[k, k] == change[:2, k].min()
    assert (out / "transfer.png").exists()
