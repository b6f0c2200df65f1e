"""The run-time Pareto weighting of timestep buckets (issue #10): diffusion.min_norm_weights against
closed forms and the optimality conditions, and the bucket tables."""
import pytest
import torch

from diffusion import GaussianDiffusion, gram_matrix, min_norm_weights


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
